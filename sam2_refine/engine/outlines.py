"""Stage 4, pure: object masks -> polygons (:func:`trace`, and :func:`trace_objects`, the pool's
task for a chunk of them), and :class:`EarlyTraces`, which traces box prompts' outlines in the
pool while the location is still being decoded.

Polygons are in frame coordinates, x = column, y = row.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from sam2_refine.engine.geometry import AnnotationProblem, Window, finish_polygon, frame_polygon, outline_from_logits
from sam2_refine.engine.objects import ObjectMask
from sam2_refine.engine.options import GeometryOptions
from sam2_refine.engine.outline_pool import OutlinePool
from sam2_refine.engine.prompts import Prompt


@dataclass(frozen=True)
class Traced:
    """An object's outline (:func:`trace_objects`): ``core`` unpadded when padding comes later
    (separation with a positive Padding), else ``core is polygon``; ``overlap`` with the
    original where the quality gate asked for it."""

    core: Polygon
    polygon: Polygon
    overlap: float | None = None


def trace_objects(masks: Sequence[ObjectMask], gates: Sequence[BaseGeometry | None], options: GeometryOptions,
                  frame_hw: tuple[int, int], apart: bool) -> list[Traced | str]:
    """Each mask's outline (:func:`trace`; with ``apart``, unpadded and then padded), with its
    overlap with ``gates[k]`` (the original's shape, where the gate applies now), or the
    reason it has none (a str). Pure; runs in the outline pool."""
    out: list[Traced | str] = []
    for mask, gate in zip(masks, gates, strict=True):
        try:
            if apart:
                core = trace(mask, replace(options, padding=0.0), frame_hw)
                out.append(Traced(core, _padded(core, options.padding, frame_hw)))
            else:
                polygon = trace(mask, options, frame_hw)
                out.append(Traced(polygon, polygon, None if gate is None else overlap(polygon, gate)))
        except AnnotationProblem as exc:
            out.append(exc.reason)
    return out


# -- stage 4: tracing ---------------------------------------------------------------------------------


def trace(mask: ObjectMask, options: GeometryOptions, frame_hw: tuple[int, int]) -> Polygon:
    """The object's polygon: traced at the logits' sub-pixel zero crossing, simplified with
    Smoothing, buffered by Padding, clipped to the frame, made valid.

    Raises:
        AnnotationProblem: nothing valid is left.
    """
    height, width = frame_hw
    outline = outline_from_logits(mask.logits, mask.component) + (mask.window.left, mask.window.top)
    return finish_polygon(outline, options.smoothing, options.padding, frame_polygon(width, height))


def overlap(polygon: Polygon, shape: BaseGeometry) -> float:
    """IoU of two areas (0 when both are empty)."""
    union = polygon.union(shape).area
    return polygon.intersection(shape).area / union if union > 0 else 0.0


def _padded(core: Polygon, padding: float, frame_hw: tuple[int, int]) -> Polygon:
    """An unpadded outline buffered by ``padding``, clipped to the frame, made valid."""
    outline = np.asarray(core.exterior.coords)[:-1]
    return finish_polygon(outline, 0.0, padding, frame_polygon(frame_hw[1], frame_hw[0]))


#: Objects per tracing task: about four tasks per worker (some balance between them), within these bounds.
TRACE_CHUNK = (8, 64)


def in_chunks(pool: OutlinePool, fn: Callable[..., list[Any]], items: Sequence[Any], more: Sequence[Any],
               *args: Any, on_done: Callable[[int], None] | None = None) -> list[Any]:
    """``fn(items, more, *args)`` in chunks on the pool; the results in order. ``on_done``: called
    with the number of items done so far, as each chunk's results are taken."""
    if not items:
        return []
    size = len(items) if pool.inline else min(max(-(-len(items) // (4 * pool.workers)), TRACE_CHUNK[0]),
                                              TRACE_CHUNK[1])
    futures = [pool.submit(fn, items[i:i + size], more[i:i + size], *args) for i in range(0, len(items), size)]
    results: list[Any] = []
    for future in futures:
        results.extend(future.result())
        if on_done is not None:
            on_done(len(results))
    return results


class EarlyTraces:
    """Stage 4 ahead of time: box prompts' outlines traced in the pool as their masks are found,
    while the location is still being decoded (points wait for their choice).

    With separation on, a mask is traced early only if its window meets no window of a mask of
    its group found before it (touching objects are likely to change; a later mask may still
    meet it, and then that early outline may be wasted). Stage 4 uses an early outline only
    where its object's mask is still the one traced (separation,
    :func:`sam2_refine.engine.location._separate`, replaces every mask it changes) and traces the
    others then: the outlines are those stage 4 makes alone.
    """

    #: Side (pixels) of the buckets the windows seen are filed under.
    BUCKET = 64

    def __init__(self, pool: OutlinePool, options: GeometryOptions, frame_hw: tuple[int, int]) -> None:
        self.pool, self.options, self.frame_hw = pool, options, frame_hw
        self.apart = options.pad_apart
        self.batches: list[tuple[list[str], list[ObjectMask], Future[list[Traced | str]]]] = []
        self._seen: dict[tuple[Hashable, int, int], list[Window]] = defaultdict(list)

    def offer(self, found: Sequence[tuple[Prompt, ObjectMask]]) -> None:
        """Masks just found: those that qualify are traced now (one task)."""
        take = [(p, m) for p, m in found if not self.options.separate or self._alone(p.group, m.window)]
        if not take:
            return
        gated = self.options.min_overlap > 0 and not self.apart
        masks = [m for _, m in take]
        shapes = [p.original.shape if gated else None for p, _ in take]
        future = self.pool.submit(trace_objects, masks, shapes, self.options, self.frame_hw, self.apart)
        self.batches.append(([p.original.id for p, _ in take], masks, future))

    def _alone(self, group: Hashable, window: Window) -> bool:
        """Whether ``window`` meets no window seen before in ``group``; it is seen from now on."""
        b = self.BUCKET
        keys = [(group, row, col) for row in range(window.top // b, (window.bottom - 1) // b + 1)
                for col in range(window.left // b, (window.right - 1) // b + 1)]
        alone = not any(window.top < other.bottom and other.top < window.bottom and window.left < other.right
                        and other.left < window.right for key in keys for other in self._seen.get(key, ()))
        for key in keys:
            self._seen[key].append(window)
        return alone

    def results(self) -> dict[str, tuple[ObjectMask, Traced | str]]:
        """original id -> (the mask traced, its outline or reason); waits for every task."""
        out = {}
        for ids, masks, future in self.batches:
            out.update(zip(ids, zip(masks, future.result(), strict=True), strict=True))
        self.batches = []
        return out
