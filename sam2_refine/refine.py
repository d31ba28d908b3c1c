"""The engine at one location: embed the image once, prompt with every box, one polygon each.

For each original annotation the outcome is either :class:`Refined` (a clean polygon) or
:class:`Kept` (with the reason it was not refined). Nothing here talks to the server.

Per mask, only a window around the object is ever upsampled from the model's low-resolution
logits (:func:`sam2_refine.logits.upsample_window`): first the prompt box plus a margin; if the
chosen component reaches a window edge that is not the frame's, the window grows until it does
not (or the mask is rejected as far larger than the original). Memory therefore grows with the
objects' size, not with N x frame size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from shapely.geometry import Polygon

from sam2_refine.geometry import (
    AnnotationProblem,
    Window,
    finish_polygon,
    frame_polygon,
    frame_window,
    outline_from_logits,
    prompt_box,
    rasterize,
    select_component,
    touches_edges,
)
from sam2_refine.logits import upsample_window
from sam2_refine.predictor import BoxPredictor
from sam2_refine.selection import Original

#: A mask whose chosen component covers more than this multiple of the prompt box's area is
#: rejected: the model has segmented something else than the outlined object.
MAX_AREA_RATIO = 4.0


@dataclass(frozen=True)
class GeometryOptions:
    """How masks become polygons.

    Attributes:
        smoothing: Simplification tolerance in pixels (0 = none).
        padding: Buffer distance in pixels (negative shrinks).
    """

    smoothing: float = 0.7
    padding: float = 0.0


@dataclass(frozen=True)
class Refined:
    """A refined shape for one original.

    Attributes:
        original_id: The original annotation's id.
        polygon: The new outline, frame coordinates (x = column, y = row).
        score: The model's quality estimate of the mask.
    """

    original_id: str
    polygon: Polygon
    score: float


@dataclass(frozen=True)
class Kept:
    """An original that is not refined (and must never be deleted), with the reason."""

    original_id: str
    reason: str


Outcome = Refined | Kept


@dataclass(frozen=True)
class _Prompt:
    original: Original
    box: np.ndarray  # (4,) x0, y0, x1, y1


def _prepare(originals: Sequence[Original], width: int, height: int) -> tuple[list[_Prompt], list[Kept]]:
    prompts, kept = [], []
    for original in originals:
        if original.problem is not None or original.shape is None:
            kept.append(Kept(original.id, original.problem or "no shape"))
            continue
        try:
            prompts.append(_Prompt(original, prompt_box(original.shape, width, height)))
        except AnnotationProblem as exc:
            kept.append(Kept(original.id, exc.reason))
    return prompts, kept


def mask_to_polygon(
    grid: np.ndarray,
    prompt: _Prompt,
    frame_hw: tuple[int, int],
    options: GeometryOptions,
) -> Polygon:
    """One polygon from one mask's low-resolution logits (see the module docstring).

    Args:
        grid: float32 (h, w) logits covering the whole frame.
        prompt: The original and its box.
        frame_hw: (H, W) of the frame.

    Raises:
        AnnotationProblem: empty mask, no overlap with the original, far larger than the
            original's box, or no valid polygon.
    """
    height, width = frame_hw
    bounds = frame_window(width, height)
    x0, y0, x1, y1 = prompt.box
    box_area = max((x1 - x0) * (y1 - y0), 1.0)
    cell = max(height / grid.shape[0], width / grid.shape[1])
    margin = max(8.0, 0.25 * max(x1 - x0, y1 - y0), 2.0 * cell)
    while True:
        window = Window.around(prompt.box, margin, bounds)
        logits = upsample_window(grid, frame_hw, (window.top, window.bottom), (window.left, window.right))
        mask = logits > 0
        if not mask.any():
            raise AnnotationProblem("empty mask")
        component, _ = select_component(mask, rasterize(prompt.original.shape, window))
        if component is None:
            raise AnnotationProblem("the mask does not overlap the original outline")
        area = int(np.count_nonzero(component))
        if area > MAX_AREA_RATIO * box_area:
            raise AnnotationProblem(
                f"the mask is far larger than the original (over {MAX_AREA_RATIO:g}x its box area)")
        top, left, bottom, right = touches_edges(component)
        open_sides = ((top and window.top > 0) or (left and window.left > 0)
                      or (bottom and window.bottom < height) or (right and window.right < width))
        if not open_sides:
            break
        margin *= 2.0
    outline = outline_from_logits(logits, component) + (window.left, window.top)
    return finish_polygon(outline, options.smoothing, options.padding, frame_polygon(width, height))


def refine_location(
    predictor: BoxPredictor,
    image: np.ndarray,
    originals: Sequence[Original],
    options: GeometryOptions,
    on_progress: Callable[[int], None] | None = None,
) -> list[Outcome]:
    """Refine every original of one location.

    Args:
        predictor: The model (its embedding is replaced).
        image: float32 (H, W, 3) RGB in [0, 1], the merged frame.
        originals: Annotations at this location.
        options: Smoothing and padding.
        on_progress: Called with the number of originals done so far.

    Returns:
        One outcome per original, in the order given.
    """
    height, width = image.shape[:2]
    prompts, kept = _prepare(originals, width, height)
    outcomes: dict[str, Outcome] = {k.original_id: k for k in kept}
    if prompts:
        predictor.embed(image)
    done = len(kept)
    for start in range(0, len(prompts), max(1, predictor.max_batch)):
        chunk = prompts[start:start + predictor.max_batch]
        decoded = predictor.decode(np.stack([p.box for p in chunk]))
        for k, prompt in enumerate(chunk):
            best = int(np.argmax(decoded.scores[k]))
            try:
                polygon = mask_to_polygon(decoded.logits[k, best], prompt, (height, width), options)
                outcomes[prompt.original.id] = Refined(prompt.original.id, polygon, float(decoded.scores[k, best]))
            except AnnotationProblem as exc:
                outcomes[prompt.original.id] = Kept(prompt.original.id, exc.reason)
        done += len(chunk)
        if on_progress is not None:
            on_progress(done)
    return [outcomes[o.id] for o in originals]
