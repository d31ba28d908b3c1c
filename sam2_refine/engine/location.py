"""The engine at one location: embed each region once, prompt with every annotation, one polygon each.

For each original annotation the outcome is either :class:`Refined` (a clean polygon) or
:class:`Kept` (with the reason it was not refined). Nothing here talks to the server.

The frame is embedded whole or in object crops (:mod:`sam2_refine.engine.regions`). Polygons and
rectangles prompt with their box (optionally with the original outline as mask logits, or asking
for three masks and keeping the one that agrees best with the original). Points prompt with the
point and ask for three masks; which one is kept is decided once the whole location is decoded
(:mod:`sam2_refine.engine.point_choice`): the best-scored mask of a size plausible for the point's
tags, among those that hold no other point of the same tags. A location is refined in stages:

1. **Object masks** (per region, while its embedding is current): each mask's low-resolution
   logits are upsampled only in a window around the object
   (:func:`sam2_refine.model.logits.upsample_window`) and the component that matches the original
   is chosen (:func:`object_mask`): first the prompt box plus a margin; if the chosen component
   reaches a window edge, the window grows until it does not (or the mask is rejected as far
   larger than the original). The result is kept cropped to the component's bounding box.
   A predictor with a fixed ``logit_grid`` is asked for box prompts' logits only in such a
   window (for :data:`GROWTH_PAID` x the first margin); :func:`object_mask` is pure and answers
   :class:`LargerWindow` when a window outgrows the logits it has, and :func:`_decode_boxes`
   decodes those prompts again for it, on the calling thread.
2. **Points' choice** among their three candidates, by the expected area of their tag.
3. **Separation** (option): objects of the same tags whose windows meet give up the pixels
   their neighbours claim more strongly (:mod:`sam2_refine.engine.separation`).
4. **Tracing** (:func:`trace`): the outline at the logits' sub-pixel zero crossing, simplified,
   padded, clipped to the frame; then the quality gate.

Memory therefore grows with the objects' size, not with N x frame size.

Where the work runs: the model (embedding, decoding, the decodings of larger windows) and
separation run on the calling thread; the per-object work of stages 1 and 4 (:func:`find_objects`,
:func:`trace_objects`: pure functions of picklable arguments, a chunk of objects each) runs on an
:class:`~sam2_refine.engine.outline_pool.OutlinePool`: inline by default (the CPU job), on worker
processes on a GPU host, where box prompts' outlines are traced while the next batch is decoded
(:class:`_EarlyTraces`). The outcomes are the same either way (``tests/test_outline_pool.py``).
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Protocol

import cv2
import numpy as np
from shapely import affinity
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from sam2_refine.engine import point_choice
from sam2_refine.engine.geometry import (
    AnnotationProblem,
    Window,
    fill_holes,
    finish_polygon,
    frame_polygon,
    outline_from_logits,
    point_component,
    point_in_frame,
    prompt_box,
    rasterize_rough,
    select_component,
    touches_edges,
)
from sam2_refine.engine.imaging import ArrayImage, LocationImage
from sam2_refine.model.logits import GridPatch, grid_window, upsample_window
from sam2_refine.engine.outline_pool import OutlinePool
from sam2_refine.model.predictor import BoxPredictor, Decoded
from sam2_refine.engine.regions import CROPS, choose_mode, plan_regions
from sam2_refine.annotations import POINT, Kept, Original, Outcome, Refined
from sam2_refine.engine.separation import Claim, keep_padded_apart, neighbour_pairs, separate

#: Frames with more pixels than this are always refined in object crops: a whole-frame RGB
#: float copy of 16384 x 16384 pixels alone is 3.2 GB (a 20000 x 20000 frame: 4.8 GB).
MAX_WHOLE_FRAME_PIXELS = 16384 * 16384

#: A mask whose chosen component covers more than this multiple of the prompt box's area is
#: rejected: the model has segmented something else than the outlined object.
MAX_AREA_RATIO = 4.0

#: A point has no size. For choosing the resolution (Auto) it counts as an object of this many
#: pixels (nuclei-sized: Auto then uses crops on frames over 1024 px, where small objects need them).
POINT_SIZE_FOR_AUTO = 32.0
#: In object crops, the window around a point reaches at least this far from it in every direction
#: (its planning box is the point +- half of it, plus the regions' context margin).
POINT_CONTEXT = 128.0
#: At most this many other points are given as negative points with one point prompt.
MAX_NEGATIVES = 8

#: Windowed decoding asks for each box prompt's logits in the window of this multiple of its
#: first margin, so that the first two growths of the window (margin x 2, x 4) need no second
#: decoding (a few cells more per prompt; a second decoding costs a whole transformer pass).
GROWTH_PAID = 4.0

BOX, BOX_AND_SHAPE, BEST_OF_THREE = "box", "box+shape", "best3"
#: Point mask choice (:mod:`sam2_refine.engine.point_choice`): plausible size then score (the rule),
#: BIIGLE's closest to the expected area, or the model's score alone (both for measuring).
BY_SIZE_AND_SCORE, BY_AREA, BY_SCORE = "both", "area", "score"


@dataclass(frozen=True)
class GeometryOptions:
    """How the engine prompts the model and turns masks into polygons.

    Attributes:
        smoothing: Simplification tolerance in pixels (0 = none).
        padding: Buffer distance in pixels (negative shrinks).
        resolution: ``"whole"`` frame, object ``"crops"``, or ``"auto"`` (see :mod:`sam2_refine.engine.regions`).
        prompt: For polygons and rectangles: ``"box"``; ``"box+shape"`` (the original outline
            also given as mask logits); ``"best3"`` (three masks per box, the one that overlaps
            the original most is kept). Points always prompt with the point and three masks.
        min_overlap: Quality gate: a refined shape whose IoU with its original (polygon or
            rectangle) is below this is not used (0 = off; points have no area to compare).
        separate: Keep touching objects apart (:mod:`sam2_refine.engine.separation`).
        point_choice: :data:`BY_SIZE_AND_SCORE` (the two-pass rule of
            :mod:`sam2_refine.engine.point_choice`), or, for measuring it, :data:`BY_AREA` (BIIGLE's
            second pass) or :data:`BY_SCORE` (the model's score alone).
        negative_points: Give the other points (same tags) that fall inside a point's candidate
            masks as negative points, in a second decoding of that point (off: measured worse
            than ``exclusive_points``, and half the points of a dense field decoded twice; kept
            for measuring real models).
        exclusive_points: Set aside a point's candidates that hold other points of its group
            (:func:`sam2_refine.engine.point_choice.without_merges`).
        group_tags: Objects are grouped by the ones of these tags they carry (all their tags
            when empty): points' expected areas and separation are per group.
    """

    smoothing: float = 0.7
    padding: float = 0.0
    resolution: str = "auto"
    prompt: str = BOX
    min_overlap: float = 0.0
    separate: bool = False
    point_choice: str = BY_SIZE_AND_SCORE
    negative_points: bool = False
    exclusive_points: bool = True
    group_tags: tuple[str, ...] = ()


#: Chooses an object's component in a mask over a window of the frame (None: no match).
Chooser = Callable[[np.ndarray, Window], "np.ndarray | None"]


@dataclass(frozen=True)
class ObjectMask:
    """One object's mask at full resolution, in a window of the frame: what is traced.

    Attributes:
        window: The frame pixels the arrays cover (the component's bounding box, one pixel
            more on each side where the frame allows).
        logits: float32 (window.height, window.width): positive = object.
        component: bool, same shape: the chosen 8-connected component of ``logits > 0``.
        area: Pixels in ``component``.
    """

    window: Window
    logits: np.ndarray
    component: np.ndarray
    area: int


@dataclass(frozen=True)
class _Prompt:
    original: Original
    box: np.ndarray  # (4,) x0, y0, x1, y1: the prompt box, or a point's planning box
    point: np.ndarray | None = None  # (2,) x, y for a point
    group: Hashable = ()

    @property
    def pixel(self) -> tuple[int, int]:
        """(row, col) of the frame pixel holding the point."""
        assert self.point is not None
        return int(np.floor(self.point[1] + 0.5)), int(np.floor(self.point[0] + 0.5))


def object_group(original: Original, group_tags: Sequence[str]) -> tuple[str, ...]:
    """The group an object belongs to: the ones of ``group_tags`` it carries (all its tags when
    ``group_tags`` is empty), sorted."""
    tags = set(original.tags)
    return tuple(sorted(tags & set(group_tags) if group_tags else tags))


def _prepare(originals: Sequence[Original], width: int, height: int, group_tags: Sequence[str],
             ) -> tuple[list[_Prompt], list[Kept]]:
    prompts, kept = [], []
    for original in originals:
        if original.problem is not None or original.shape is None:
            kept.append(Kept(original.id, original.problem or "no shape"))
            continue
        group = object_group(original, group_tags)
        try:
            if original.kind == POINT:
                point = np.array([original.shape.x, original.shape.y], dtype=np.float64)
                point_in_frame(point, width, height)
                # a point on the frame's last edge (x = W - 0.5) belongs to the last pixel
                point = np.minimum(point, [width - 0.5 - 1e-6, height - 0.5 - 1e-6])
                half = POINT_CONTEXT / 2
                box = np.clip(np.concatenate([point - half, point + half]), -0.5,
                              [width - 0.5, height - 0.5, width - 0.5, height - 0.5])
                prompts.append(_Prompt(original, box, point, group))
            else:
                prompts.append(_Prompt(original, prompt_box(original.shape, width, height), None, group))
        except AnnotationProblem as exc:
            kept.append(Kept(original.id, exc.reason))
    return prompts, kept


def shape_on_grid(shape: BaseGeometry, region: Window, grid_hw: tuple[int, int]) -> np.ndarray:
    """The original's shape rasterised on the model's logit grid over ``region``.

    Grid cell (i, j) stands for the region's rows ``[i*Hr/h, (i+1)*Hr/h)`` (columns alike); its
    centre in frame coordinates is ``top + (i + 0.5) * Hr / h - 0.5``.

    Returns:
        bool (h, w).
    """
    h, w = grid_hw
    sy, sx = h / region.height, w / region.width
    local = affinity.affine_transform(shape, [sx, 0, 0, sy, (0.5 - region.left) * sx - 0.5,
                                              (0.5 - region.top) * sy - 0.5])
    return rasterize_rough(local, Window(0, 0, h, w))


def shape_logits(on_grid: np.ndarray) -> np.ndarray:
    """Mask-prompt logits for a rasterised outline: +8 well inside, -8 well outside, a smooth
    signed-distance ramp (tanh over ~2 cells) across the boundary. float32, same shape."""
    inside = cv2.distanceTransform(on_grid.astype(np.uint8), cv2.DIST_L2, 3)
    outside = cv2.distanceTransform((~on_grid).astype(np.uint8), cv2.DIST_L2, 3)
    return (8.0 * np.tanh((inside - outside) / 2.0)).astype(np.float32)


# -- stage 1: one object's mask ---------------------------------------------------------------------


@dataclass(frozen=True)
class LargerWindow:
    """:func:`object_mask` needs logits beyond the grid cells it was given: decode the prompt
    again for ``window`` (frame pixels) and call again with ``margin``."""

    margin: float
    window: Window


def first_margin(box: Sequence[float], region: Window, grid_hw: tuple[int, int]) -> float:
    """The margin (pixels) of the first window around a box: 8 px, a quarter of the box's
    larger side, or two grid cells, whichever is largest."""
    x0, y0, x1, y1 = box
    cell = max(region.height / grid_hw[0], region.width / grid_hw[1])
    return max(8.0, 0.25 * max(x1 - x0, y1 - y0), 2.0 * cell)


def decode_window(box: Sequence[float], margin: float, region: Window, grid_hw: tuple[int, int],
                  reference: np.ndarray | None = None) -> Window:
    """The frame pixels whose logits :func:`object_mask` reads at ``margin``: the box plus the
    margin, clipped to the region (and, given the prompt's ``reference`` cells on the grid,
    enlarged to cover them, so that its overlap with each mask is counted in the window)."""
    window = Window.around(box, margin, region)
    if reference is not None and reference.any():
        rows, cols = np.flatnonzero(reference.any(axis=1)), np.flatnonzero(reference.any(axis=0))
        sy, sx = region.height / grid_hw[0], region.width / grid_hw[1]
        covered = Window(region.top + int(rows[0] * sy), region.left + int(cols[0] * sx),
                         region.top + int(np.ceil((rows[-1] + 1) * sy)),
                         region.left + int(np.ceil((cols[-1] + 1) * sx)))
        window = Window(min(window.top, covered.top), min(window.left, covered.left),
                        max(window.bottom, covered.bottom), max(window.right, covered.right))
    return window.intersect(region)


def object_mask(
    grid: np.ndarray | GridPatch,
    region: Window,
    frame_hw: tuple[int, int],
    start_box: Sequence[float],
    choose: Chooser,
    max_area: float,
    too_large: str,
    no_match: str,
    margin: float | None = None,
) -> ObjectMask | LargerWindow:
    """One object's full-resolution mask from one mask's low-resolution logits.

    Pure (no model call): when the grown window needs cells ``grid`` does not hold, the answer
    is a :class:`LargerWindow` and the caller decodes the prompt again.

    Args:
        grid: float32 (h, w) logits covering ``region``, or a :class:`GridPatch` of them.
        region: The window of the frame the model embedded.
        frame_hw: (H, W) of the frame.
        start_box: (x0, y0, x1, y1) frame coordinates: the first window is this box plus a margin.
        choose: Picks the object's component of the mask in a window (None: none matches).
        max_area: A component larger than this (pixels) is rejected with ``too_large``.
        too_large, no_match: Reasons for a component that is too large / for no match.
        margin: The window's margin (pixels); default :func:`first_margin`.

    Raises:
        AnnotationProblem: empty mask, no match, too large, or cut by the edge of its crop.
    """
    patch = grid if isinstance(grid, GridPatch) else GridPatch.whole(grid)
    height, width = frame_hw
    if margin is None:
        margin = first_margin(start_box, region, patch.grid_hw)
    region_hw = (region.height, region.width)
    while True:
        window = Window.around(start_box, margin, region)  # frame coordinates, inside the region
        rows = (window.top - region.top, window.bottom - region.top)
        cols = (window.left - region.left, window.right - region.left)
        if not patch.covers(grid_window(patch.grid_hw, region_hw, rows, cols)):
            return LargerWindow(margin, window)
        logits = upsample_window(patch, region_hw, rows, cols)
        mask = logits > 0
        if not mask.any():
            raise AnnotationProblem("empty mask")
        component = choose(mask, window)
        if component is None:
            raise AnnotationProblem(no_match)
        area = int(np.count_nonzero(component))
        if area > max_area:
            raise AnnotationProblem(too_large)
        top, left, bottom, right = touches_edges(component)
        sides = ((top, window.top, region.top, 0), (left, window.left, region.left, 0),
                 (bottom, window.bottom, region.bottom, height), (right, window.right, region.right, width))
        if any(touch and edge == limit != frame_edge for touch, edge, limit, frame_edge in sides):
            raise AnnotationProblem("the mask runs past the edge of the crop it was segmented in")
        if not any(touch and edge != limit for touch, edge, limit, _ in sides):
            break
        margin *= 2.0
    return _cropped(window, logits, component, area)


def _cropped(window: Window, logits: np.ndarray, component: np.ndarray, area: int) -> ObjectMask:
    """The object mask cut to its component's bounding box plus one pixel (what tracing uses)."""
    rows = np.flatnonzero(component.any(axis=1))
    cols = np.flatnonzero(component.any(axis=0))
    top, left = max(int(rows[0]) - 1, 0), max(int(cols[0]) - 1, 0)
    bottom = min(int(rows[-1]) + 2, component.shape[0])
    right = min(int(cols[-1]) + 2, component.shape[1])
    sub = Window(window.top + top, window.left + left, window.top + bottom, window.left + right)
    return ObjectMask(sub, np.ascontiguousarray(logits[top:bottom, left:right], dtype=np.float32),
                      component[top:bottom, left:right].copy(), area)


@dataclass(frozen=True)
class _OutlineChooser:
    """The component of a mask that overlaps the original outline most (picklable)."""

    shape: BaseGeometry

    def __call__(self, mask: np.ndarray, window: Window) -> np.ndarray | None:
        return select_component(mask, rasterize_rough(self.shape, window))[0]


@dataclass(frozen=True)
class _PointChooser:
    """The component of a mask that holds frame pixel (row, col), or the nearest within 2 px."""

    row: int
    col: int

    def __call__(self, mask: np.ndarray, window: Window) -> np.ndarray | None:
        return point_component(mask, self.row - window.top, self.col - window.left)


def _chooser(prompt: _Prompt) -> Chooser:
    return _PointChooser(*prompt.pixel) if prompt.point is not None else _OutlineChooser(prompt.original.shape)


def _box_limits(prompt: _Prompt) -> tuple[float, str, str]:
    """(max_area, too_large, no_match) of a box prompt's mask."""
    x0, y0, x1, y1 = prompt.box
    box_area = max((x1 - x0) * (y1 - y0), 1.0)
    return (MAX_AREA_RATIO * box_area,
            f"the mask is far larger than the original (over {MAX_AREA_RATIO:g}x its box area)",
            "the mask does not overlap the original outline")


def _box_object(grid: np.ndarray | GridPatch, prompt: _Prompt, region: Window, frame_hw: tuple[int, int],
                margin: float | None = None) -> ObjectMask | LargerWindow:
    return object_mask(grid, region, frame_hw, prompt.box, _chooser(prompt), *_box_limits(prompt), margin)


def _point_start(grid: np.ndarray | GridPatch, region: Window, point: np.ndarray,
                 ) -> tuple[np.ndarray, float] | LargerWindow | None:
    """Where a point's mask is on the low-resolution grid: (box of its grid component in frame
    coordinates, the component's area in frame pixels), or None when no positive grid cell is
    at (or next to) the point.

    Given a :class:`GridPatch`, the answer is the one over the whole grid, or a
    :class:`LargerWindow` (the whole region) when the patch cannot tell: the cells next to the
    point are not all in it, or the component reaches an edge of the patch that is not an edge
    of the grid (it may go on beyond)."""
    patch = grid if isinstance(grid, GridPatch) else GridPatch.whole(grid)
    h, w = patch.grid_hw
    cell_h, cell_w = region.height / h, region.width / w
    row = int(np.clip((point[1] - region.top + 0.5) / cell_h, 0, h - 1))
    col = int(np.clip((point[0] - region.left + 0.5) / cell_w, 0, w - 1))
    near_cells = (max(row - 1, 0), max(col - 1, 0), min(row + 2, h), min(col + 2, w))
    whole = LargerWindow(0.0, region)
    if not patch.covers(near_cells):
        return whole
    rows, cols = patch.values.shape
    positive = patch.values > 0
    near_rows = slice(near_cells[0] - patch.top, near_cells[2] - patch.top)
    near_cols = slice(near_cells[1] - patch.left, near_cells[3] - patch.left)
    if not positive[near_rows, near_cols].any():
        return None
    count, labels, stats, _ = cv2.connectedComponentsWithStats(positive.astype(np.uint8), connectivity=8)
    near = labels[near_rows, near_cols]
    label = int(labels[row - patch.top, col - patch.left]) or int(near[near > 0][0])
    c0, r0, cw, ch, cells = stats[label]
    if ((r0 == 0 and patch.top > 0) or (c0 == 0 and patch.left > 0)
            or (r0 + ch == rows and patch.top + rows < h) or (c0 + cw == cols and patch.left + cols < w)):
        return whole
    r0, c0 = r0 + patch.top, c0 + patch.left
    box = np.array([region.left + c0 * cell_w - 0.5, region.top + r0 * cell_h - 0.5,
                    region.left + (c0 + cw) * cell_w - 0.5, region.top + (r0 + ch) * cell_h - 0.5])
    return box, float(cells) * cell_h * cell_w


def _point_limits(frame_hw: tuple[int, int]) -> tuple[float, str]:
    """(max_area, too_large) of a point's mask."""
    max_area = point_choice.MAX_FRAME_FRACTION * frame_hw[0] * frame_hw[1]
    return max_area, point_choice.area_problem(max_area + 1, None, frame_hw[0] * frame_hw[1]) or ""


def _point_object(grid: np.ndarray | GridPatch, point: np.ndarray, chooser: Chooser, region: Window,
                  frame_hw: tuple[int, int]) -> ObjectMask | LargerWindow:
    """One of a point's masks -> its object (the component holding the point), or a
    :class:`LargerWindow` when ``grid`` is a patch that does not hold enough of the grid (the
    caller then gives the whole grid)."""
    max_area, too_large = _point_limits(frame_hw)
    start = _point_start(grid, region, point)
    if start is None:
        raise AnnotationProblem("the mask does not reach the point")
    if isinstance(start, LargerWindow):
        return start
    box, grid_area = start
    if grid_area > 2 * max_area:  # far too large already on the grid: not upsampled at all
        raise AnnotationProblem(too_large)
    return object_mask(grid, region, frame_hw, box, chooser, max_area, too_large,
                       "the mask does not reach the point")


# -- the pool's tasks: pure, picklable, one chunk of objects each ---------------------------------------


@dataclass(frozen=True)
class _MaskJob:
    """One mask's object to find (:func:`find_objects`).

    Attributes:
        patch: The mask's logits (a window of the grid, or the whole grid).
        box: The prompt box (x0, y0, x1, y1), frame coordinates; None for a point's mask.
        point: (x, y) of a point prompt, else None.
        chooser: Picks the object's component.
        margin: The window's margin to go on from (:class:`LargerWindow`); None: the first.
    """

    patch: GridPatch
    box: np.ndarray | None
    point: np.ndarray | None
    chooser: Chooser
    max_area: float = 0.0
    too_large: str = ""
    no_match: str = ""
    margin: float | None = None


MaskResult = ObjectMask | LargerWindow | str


def find_objects(jobs: Sequence[_MaskJob], region: Window, frame_hw: tuple[int, int]) -> list[MaskResult]:
    """Each job's object mask, or the :class:`LargerWindow` it needs, or the reason it has none
    (a str: that object is kept). Pure; runs in the outline pool."""
    out: list[MaskResult] = []
    for job in jobs:
        try:
            if job.point is not None:
                out.append(_point_object(job.patch, job.point, job.chooser, region, frame_hw))
            else:
                assert job.box is not None
                out.append(object_mask(job.patch, region, frame_hw, job.box, job.chooser, job.max_area,
                                       job.too_large, job.no_match, job.margin))
        except AnnotationProblem as exc:
            out.append(exc.reason)
    return out


@dataclass(frozen=True)
class _Traced:
    """An object's outline (:func:`trace_objects`): ``core`` unpadded when padding comes later
    (separation with a positive Padding), else ``core is polygon``; ``overlap`` with the
    original where the quality gate asked for it."""

    core: Polygon
    polygon: Polygon
    overlap: float | None = None


def trace_objects(masks: Sequence[ObjectMask], gates: Sequence[BaseGeometry | None], options: GeometryOptions,
                  frame_hw: tuple[int, int], apart: bool) -> list[_Traced | str]:
    """Each mask's outline (:func:`trace`; with ``apart``, unpadded and then padded), with its
    overlap with ``gates[k]`` (the original's shape, where the gate applies now), or the
    reason it has none (a str). Pure; runs in the outline pool."""
    out: list[_Traced | str] = []
    for mask, gate in zip(masks, gates, strict=True):
        try:
            if apart:
                core = trace(mask, replace(options, padding=0.0), frame_hw)
                out.append(_Traced(core, _padded(core, options.padding, frame_hw)))
            else:
                polygon = trace(mask, options, frame_hw)
                out.append(_Traced(polygon, polygon, None if gate is None else overlap(polygon, gate)))
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


def _choose_mask(decoded: Decoded, k: int, reference: np.ndarray | None) -> int:
    """Which of prompt ``k``'s C masks to use: the one overlapping ``reference`` (bool, the whole
    grid) most (ties: the model's score), or the best-scored when there is no reference.

    The overlap is the IoU on the grid; with windowed logits the intersection is counted in the
    window (which holds the whole reference) and each mask's area comes from the whole grid
    (``Decoded.areas``), so the choice is the same as over whole-grid logits."""
    scores = decoded.scores[k]
    if reference is None or scores.shape[0] == 1:
        return int(np.argmax(scores))
    inter = np.zeros(scores.shape[0], dtype=np.int64)
    for c in range(scores.shape[0]):
        patch = decoded.mask(k, c)
        rows, cols = patch.values.shape
        inside = reference[patch.top:patch.top + rows, patch.left:patch.left + cols]
        if np.count_nonzero(inside) != np.count_nonzero(reference):
            raise ValueError("the decoded window does not hold the whole reference")
        inter[c] = np.count_nonzero((patch.values > 0) & inside)
    union = decoded.positive_areas(k) + np.count_nonzero(reference) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return int(np.lexsort((scores, iou))[-1])


def overlap(polygon: Polygon, shape: BaseGeometry) -> float:
    """IoU of two areas (0 when both are empty)."""
    union = polygon.union(shape).area
    return polygon.intersection(shape).area / union if union > 0 else 0.0


# -- the location -------------------------------------------------------------------------------------


@dataclass
class _Candidate:
    """One of a point's masks: its object mask (None when unusable, with the reason) and score."""

    mask: ObjectMask | None
    score: float
    reason: str = ""
    others: int = 0  # other points of the group inside the mask


class _Location:
    """What one location's stages hand each other: object masks, points' candidates, outcomes."""

    def __init__(self, prompts: Sequence[_Prompt], height: int, width: int) -> None:
        self.height, self.width = height, width
        self.masks: dict[str, ObjectMask] = {}
        self.scores: dict[str, float] = {}
        self.candidates: dict[str, list[_Candidate]] = {}
        self.outcomes: dict[str, Outcome] = {}
        self.early: _EarlyTraces | None = None  # outlines traced ahead (with a pool)
        # the location's points by group, sorted by x, for finding the points inside a mask
        self._points: dict[Hashable, tuple[np.ndarray, np.ndarray, list[str]]] = {}
        by_group: dict[Hashable, list[_Prompt]] = defaultdict(list)
        for prompt in prompts:
            if prompt.point is not None:
                by_group[prompt.group].append(prompt)
        for group, members in by_group.items():
            members.sort(key=lambda p: p.pixel[1])
            pixels = np.array([p.pixel for p in members], dtype=np.int64).reshape(-1, 2)
            self._points[group] = (pixels[:, 1].copy(), pixels, [p.original.id for p in members])

    @property
    def frame_hw(self) -> tuple[int, int]:
        return self.height, self.width

    def keep(self, original_id: str, reason: str) -> None:
        self.outcomes[original_id] = Kept(original_id, reason)
        self.masks.pop(original_id, None)

    def points_inside(self, prompt: _Prompt, mask: ObjectMask) -> list[tuple[str, tuple[int, int]]]:
        """Other points of ``prompt``'s group whose pixel lies in ``mask``'s component:
        (id, (row, col)), nearest first."""
        cols, pixels, ids = self._points.get(prompt.group, (np.zeros(0, np.int64), np.zeros((0, 2)), []))
        win = mask.window
        found = []
        first, stop = np.searchsorted(cols, [win.left, win.right])
        for k in range(int(first), int(stop)):
            row, col = int(pixels[k, 0]), int(pixels[k, 1])
            if ids[k] != prompt.original.id and win.top <= row < win.bottom \
                    and mask.component[row - win.top, col - win.left]:
                found.append((ids[k], (row, col)))
        own_row, own_col = prompt.pixel
        return sorted(found, key=lambda f: (f[1][0] - own_row) ** 2 + (f[1][1] - own_col) ** 2)


def _cut(patch: GridPatch, window: Window, region: Window) -> GridPatch:
    """The cells of ``patch`` (which holds them) that upsampling ``window`` (frame pixels inside
    ``region``) reads, copied: what a windowed decoder would have returned for it."""
    rows = (window.top - region.top, window.bottom - region.top)
    cols = (window.left - region.left, window.right - region.left)
    top, left, bottom, right = grid_window(patch.grid_hw, (region.height, region.width), rows, cols)
    values = patch.values[top - patch.top:bottom - patch.top, left - patch.left:right - patch.left].copy()
    return GridPatch(values, top, left, patch.grid_hw)


class _BoxChunk:
    """Box prompts of one chunk (polygons, rectangles) -> their object masks.

    Decoded here, on the model's thread, when made; :meth:`start` and :meth:`take` turn the
    answers into :class:`_MaskJob` rounds for :func:`find_objects`. A predictor with a fixed
    ``logit_grid`` is asked only for each prompt's window of logits; a prompt whose mask
    outgrows it is decoded again for the larger window (all such prompts of the chunk and round
    in one call, in the chunk's order), as often as needed, keeping the mask chosen first.
    Whole-grid answers are cut to the same windows (the pool gets only those cells) and a larger
    window is cut again from them, without a model call.
    """

    def __init__(self, predictor: BoxPredictor, chunk: Sequence[_Prompt], win: Window, options: GeometryOptions,
                 work: _Location) -> None:
        self.predictor, self.chunk, self.win, self.work = predictor, chunk, win, work
        grid_hw = getattr(predictor, "logit_grid", None)
        offset = np.array([win.left, win.top, win.left, win.top], dtype=np.float64)
        self.boxes = np.stack([p.box for p in chunk]) - offset
        references = None
        if options.prompt in (BOX_AND_SHAPE, BEST_OF_THREE):
            references = [shape_on_grid(p.original.shape, win, predictor.mask_input_size) for p in chunk]
        self.mask_inputs = (np.stack([shape_logits(r) for r in references])[:, None]
                            if options.prompt == BOX_AND_SHAPE and references is not None else None)
        self.multimask = options.prompt == BEST_OF_THREE
        best3 = self.multimask and references is not None
        if grid_hw is not None:
            refs = [_regrid(r, grid_hw) for r in references] if best3 and references else None
            margins = [first_margin(p.box, win, grid_hw) for p in chunk]
            windows = [decode_window(p.box, GROWTH_PAID * m, win, grid_hw, refs[k] if refs else None)
                       for k, (p, m) in enumerate(zip(chunk, margins, strict=True))]
            decoded = predictor.decode(self.boxes, self.mask_inputs, multimask=self.multimask,
                                       windows=_relative(windows, win), areas=best3)
        else:
            decoded = predictor.decode(self.boxes, self.mask_inputs, multimask=self.multimask)
        self.decoded: Decoded | None = decoded
        self.todo: list[tuple[int, int]] = []  # (index in chunk, mask index) of the jobs in flight
        for k in range(len(chunk)):
            reference = _regrid(references[k], decoded.grid_size) if best3 and references is not None else None
            best = _choose_mask(decoded, k, reference)
            work.scores[chunk[k].original.id] = float(decoded.scores[k, best])
            self.todo.append((k, best))

    def _job(self, k: int, patch: GridPatch, margin: float | None) -> _MaskJob:
        prompt = self.chunk[k]
        return _MaskJob(patch, prompt.box, None, _chooser(prompt), *_box_limits(prompt), margin=margin)

    def start(self) -> list[_MaskJob]:
        """The first round: each prompt's chosen mask in its first window."""
        assert self.decoded is not None
        jobs = []
        for k, best in self.todo:
            patch = self.decoded.mask(k, best)
            if self.decoded.windows is None:
                box = self.chunk[k].box
                margin = first_margin(box, self.win, patch.grid_hw)
                patch = _cut(patch, decode_window(box, GROWTH_PAID * margin, self.win, patch.grid_hw), self.win)
            jobs.append(self._job(k, patch, None))
        return jobs

    def take(self, results: Sequence[MaskResult]) -> list[_MaskJob]:
        """Record a round's results; the next round's jobs (larger windows), or none."""
        again, found = [], []
        for (k, best), result in zip(self.todo, results, strict=True):
            original_id = self.chunk[k].original.id
            if isinstance(result, str):
                self.work.keep(original_id, result)
            elif isinstance(result, LargerWindow):
                again.append((k, best, result))
            else:
                self.work.masks[original_id] = result
                found.append((self.chunk[k], result))
        if found and self.work.early is not None:
            self.work.early.offer(found)
        self.todo = [(k, best) for k, best, _ in again]
        decoded = self.decoded
        if not again or decoded is None:
            self.decoded = None
            return []
        if decoded.windows is None:  # the whole grid is at hand: cut the larger windows from it
            patches = [_cut(decoded.mask(k, best), grow.window, self.win) for k, best, grow in again]
        else:  # the same prompts, decoded again for their larger windows
            idx = [k for k, _, _ in again]
            inputs = None if self.mask_inputs is None else self.mask_inputs[idx]
            redecoded = self.predictor.decode(self.boxes[idx], inputs, multimask=self.multimask,
                                              windows=_relative([g.window for _, _, g in again], self.win))
            patches = [redecoded.mask(i, best) for i, (_, best, _) in enumerate(again)]
        return [self._job(k, patch, grow.margin) for (k, _, grow), patch in zip(again, patches, strict=True)]


def _relative(windows: Sequence[Window], region: Window) -> np.ndarray:
    """Frame windows as int (N, 4) (top, left, bottom, right) pixels of the region."""
    return np.array([[w.top - region.top, w.left - region.left, w.bottom - region.top,
                      w.right - region.left] for w in windows], dtype=np.int64).reshape(-1, 4)


class _PointChunk:
    """Point prompts of one chunk -> three candidate object masks each (:meth:`start`,
    :meth:`take`, as :class:`_BoxChunk`). The pool gets each mask's logits around the point's
    planning box (the whole grid where a mask turns out to need more); then, with negative
    points on, points whose candidates hold other points of their group are decoded a second
    time with those as negative points (grouped by their number, so that no padding point is
    added), their candidates found at once."""

    def __init__(self, predictor: BoxPredictor, chunk: Sequence[_Prompt], win: Window, options: GeometryOptions,
                 work: _Location, pool: OutlinePool, decoded: Decoded | None = None) -> None:
        self.predictor, self.chunk, self.win, self.options, self.work, self.pool = (
            predictor, chunk, win, options, work, pool)
        self.origin = np.array([win.left, win.top], dtype=np.float64)
        if decoded is None:
            points = np.stack([p.point for p in chunk])[:, None] - self.origin
            decoded = predictor.decode(None, multimask=True, points=points,
                                       point_labels=np.ones((len(chunk), 1), np.int64))
        self.decoded: Decoded | None = decoded
        self.results: dict[tuple[int, int], MaskResult] = {}
        self.todo: list[tuple[int, int]] = []

    def _job(self, k: int, patch: GridPatch) -> _MaskJob:
        prompt = self.chunk[k]
        return _MaskJob(patch, None, prompt.point, _chooser(prompt))

    def _first(self, decoded: Decoded, ks: Sequence[int]) -> list[_MaskJob]:
        if decoded.windows is not None:
            raise ValueError("point prompts are decoded over the whole grid")
        self.todo = [(k, c) for k in ks for c in range(decoded.scores.shape[1])]
        jobs = []
        for k, c in self.todo:
            patch = decoded.mask(k, c)
            box = self.chunk[k].box  # the point's planning box
            margin = first_margin(box, self.win, patch.grid_hw)
            jobs.append(self._job(k, _cut(patch, decode_window(box, GROWTH_PAID * margin, self.win, patch.grid_hw),
                                          self.win)))
        return jobs

    def start(self) -> list[_MaskJob]:
        assert self.decoded is not None
        return self._first(self.decoded, range(len(self.chunk)))

    def take(self, results: Sequence[MaskResult]) -> list[_MaskJob]:
        decoded = self.decoded
        assert decoded is not None
        again = []
        for key, result in zip(self.todo, results, strict=True):
            if isinstance(result, LargerWindow):
                again.append(key)
            else:
                self.results[key] = result
        if again:  # the whole grid of those masks
            self.todo = again
            return [self._job(k, decoded.mask(k, c)) for k, c in again]
        for k in sorted({k for k, _ in self.results}):
            self.work.candidates[self.chunk[k].original.id] = self._candidates(decoded, k)
        self.results, self.decoded = {}, None
        if self.options.negative_points:
            self._negative_points()
        return []

    def _candidates(self, decoded: Decoded, k: int) -> list[_Candidate]:
        prompt = self.chunk[k]
        out = []
        for c in range(decoded.scores.shape[1]):
            result, score = self.results[(k, c)], float(decoded.scores[k, c])
            if isinstance(result, str):
                out.append(_Candidate(None, score, result))
            else:
                assert isinstance(result, ObjectMask)
                out.append(_Candidate(result, score, others=len(self.work.points_inside(prompt, result))))
        return out

    def _negative_points(self) -> None:
        work = self.work
        again: dict[int, list[tuple[int, np.ndarray]]] = defaultdict(list)
        for k, prompt in enumerate(self.chunk):
            inside: dict[str, tuple[int, int]] = {}
            for candidate in work.candidates[prompt.original.id]:
                if candidate.mask is not None:
                    inside.update(work.points_inside(prompt, candidate.mask))
            if inside:
                negatives = sorted(inside.values(), key=lambda rc: (rc[0] - prompt.pixel[0]) ** 2
                                   + (rc[1] - prompt.pixel[1]) ** 2)[:MAX_NEGATIVES]
                xy = np.array([[c, r] for r, c in negatives], dtype=np.float64) - self.origin
                again[len(xy)].append((k, xy))
        step = max(1, self.predictor.max_batch)
        for count, items in sorted(again.items()):
            for start in range(0, len(items), step):
                part = items[start:start + step]
                pts = np.stack([np.vstack([self.chunk[k].point - self.origin, xy]) for k, xy in part])
                labels = np.zeros((len(part), count + 1), np.int64)
                labels[:, 0] = 1
                redecoded = self.predictor.decode(None, multimask=True, points=pts, point_labels=labels)
                sub = _PointChunk(self.predictor, [self.chunk[k] for k, _ in part], self.win,
                                  replace(self.options, negative_points=False), work, self.pool, redecoded)
                jobs = sub.start()
                while jobs:  # found at once: negative points are for measuring, not overlapped
                    jobs = sub.take(self.pool.submit(find_objects, jobs, self.win, work.frame_hw).result())


class _Chunk(Protocol):
    def start(self) -> list[_MaskJob]: ...

    def take(self, results: Sequence[MaskResult]) -> list[_MaskJob]: ...


class _ObjectMasks:
    """Stage 1 of one region: chunks decoded on this thread, their objects found by the pool
    while the next chunks are decoded; what a chunk's round gives back (larger windows) is
    decoded again here, while the region's embedding is current (:meth:`finish` before the
    next region is embedded). At most ``pool.max_in_flight`` chunks wait for the pool, so
    decoded batches do not pile up."""

    def __init__(self, pool: OutlinePool, win: Window, frame_hw: tuple[int, int]) -> None:
        self.pool, self.win, self.frame_hw = pool, win, frame_hw
        self.pending: deque[tuple[_Chunk, Future[list[MaskResult]]]] = deque()

    def add(self, chunk: _Chunk) -> None:
        """Hand a decoded chunk to the pool; collect the chunks that are done."""
        while len(self.pending) >= self.pool.max_in_flight:
            self._collect_first()
        self._submit(chunk, chunk.start())
        while self.pending and self.pending[0][1].done():
            self._collect_first()

    def finish(self) -> None:
        """Wait for every chunk of the region to be done."""
        while self.pending:
            self._collect_first()

    def _submit(self, chunk: _Chunk, jobs: list[_MaskJob]) -> None:
        if jobs:
            self.pending.append((chunk, self.pool.submit(find_objects, jobs, self.win, self.frame_hw)))

    def _collect_first(self) -> None:
        chunk, future = self.pending.popleft()
        self._submit(chunk, chunk.take(future.result()))


class _EarlyTraces:
    """Stage 4 ahead of time: box prompts' outlines traced in the pool as their masks are found,
    while the location is still being decoded (points wait for their choice).

    With separation on, a mask is traced early only if its window meets no window of a mask of
    its group found before it (touching objects are likely to change; a later mask may still
    meet it, and then that early outline may be wasted). Stage 4 uses an early outline only
    where its object's mask is still the one traced (:func:`_separate` replaces every mask it
    changes) and traces the others then: the outlines are those stage 4 makes alone.
    """

    #: Side (pixels) of the buckets the windows seen are filed under.
    BUCKET = 64

    def __init__(self, pool: OutlinePool, options: GeometryOptions, frame_hw: tuple[int, int]) -> None:
        self.pool, self.options, self.frame_hw = pool, options, frame_hw
        self.apart = options.separate and options.padding > 0
        self.batches: list[tuple[list[str], list[ObjectMask], Future[list[_Traced | str]]]] = []
        self._seen: dict[tuple[Hashable, int, int], list[Window]] = defaultdict(list)

    def offer(self, found: Sequence[tuple[_Prompt, ObjectMask]]) -> None:
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

    def results(self) -> dict[str, tuple[ObjectMask, _Traced | str]]:
        """original id -> (the mask traced, its outline or reason); waits for every task."""
        out = {}
        for ids, masks, future in self.batches:
            out.update(zip(ids, zip(masks, future.result(), strict=True), strict=True))
        self.batches = []
        return out


def _choose_points(prompts: Sequence[_Prompt], options: GeometryOptions, work: _Location) -> None:
    """Stage 2: each point's candidate, by the two-pass rule (or the score), and its quality checks."""
    points = [p for p in prompts if p.point is not None and p.original.id in work.candidates]
    table = {p.original.id: (p.group, [c.mask.area if c.mask is not None else None
                                       for c in work.candidates[p.original.id]],
                             [c.score for c in work.candidates[p.original.id]]) for p in points}
    others = ({p.original.id: [c.others for c in work.candidates[p.original.id]] for p in points}
              if options.exclusive_points else None)
    chosen, expected = point_choice.choose_all(table, rule=options.point_choice, others=others)
    frame_area = float(work.height * work.width)
    for prompt in points:
        pid = prompt.original.id
        candidates = work.candidates.pop(pid)
        index = chosen[pid]
        if index is None:
            best = max(range(len(candidates)), key=lambda c: candidates[c].score)
            work.keep(pid, candidates[best].reason or "no usable mask")
            continue
        candidate = candidates[index]
        assert candidate.mask is not None
        problem = point_choice.area_problem(candidate.mask.area, expected.get(prompt.group), frame_area)
        if problem is not None:
            work.keep(pid, problem)
            continue
        work.masks[pid] = candidate.mask
        work.scores[pid] = candidate.score


_NO_FIELD = np.zeros((0, 0), dtype=np.float32)  # a claim's field where only its window is looked at


def _claim_field(mask: ObjectMask) -> np.ndarray:
    magnitude = np.maximum(np.abs(mask.logits), np.float32(1e-3))
    return np.where(fill_holes(mask.component), magnitude, -magnitude).astype(np.float32)


def _separate(prompts: Sequence[_Prompt], work: _Location) -> None:
    """Stage 3: touching objects of one group give up the pixels their neighbours win."""
    members = [p for p in prompts if p.original.id in work.masks]
    if len(members) < 2:
        return
    # only objects whose windows meet a neighbour's can lose pixels: their claim fields alone are made
    windows = [Claim(work.masks[p.original.id].window, _NO_FIELD, (0.0, 0.0), p.group) for p in members]
    members = [members[k] for k in sorted({k for pair in neighbour_pairs(windows) for k in pair})]
    claims = []
    for prompt in members:
        mask = work.masks[prompt.original.id]
        anchor = prompt.original.shape.centroid
        claims.append(Claim(mask.window, _claim_field(mask), (float(anchor.x), float(anchor.y)), prompt.group))
    for prompt, claim, field in zip(members, claims, separate(claims), strict=True):
        if field is claim.field:
            continue
        component = _chooser(prompt)(field > 0, claim.window)
        if component is None or not component.any():
            work.keep(prompt.original.id, "its mask lies within masks of touching objects that the model is "
                                          "surer of (Keep touching objects apart)")
            continue
        work.masks[prompt.original.id] = _cropped(claim.window, field, component, int(np.count_nonzero(component)))


def _trace_all(prompts: Sequence[_Prompt], options: GeometryOptions, work: _Location, pool: OutlinePool,
               on_traced: Callable[[int, int], None] | None = None) -> None:
    """Stage 4: polygons (in the pool, :func:`trace_objects`) and the quality gate. With
    separation and a positive Padding, the outlines are traced unpadded first, then padded
    without growing into each other (:func:`sam2_refine.engine.separation.keep_padded_apart`, here:
    it needs them all)."""
    gate = f"its overlap with the original is below the minimum ({options.min_overlap:g})"
    traced = [p for p in prompts if p.original.id in work.masks]
    apart = options.separate and options.padding > 0
    gated = options.min_overlap > 0
    masks = [work.masks.pop(p.original.id) for p in traced]
    early = work.early.results() if work.early is not None else {}
    results: list[_Traced | str | None] = [None] * len(traced)
    for k, prompt in enumerate(traced):  # outlines traced ahead, of masks separation left as they were
        ahead = early.get(prompt.original.id)
        if ahead is not None and ahead[0] is masks[k]:
            results[k] = ahead[1]
    todo = [k for k, result in enumerate(results) if result is None]
    shapes = [traced[k].original.shape if gated and not apart and traced[k].point is None else None for k in todo]
    early_done = len(traced) - len(todo)
    if on_traced is not None:  # (issue 23: progress as outlines are traced)
        on_traced(early_done, len(traced))
    on_done = None if on_traced is None else (lambda n: on_traced(early_done + n, len(traced)))
    for k, result in zip(todo, _in_chunks(pool, trace_objects, [masks[k] for k in todo], shapes, options,
                                          work.frame_hw, apart, on_done=on_done), strict=True):
        results[k] = result
    del masks, early
    polygons: list[Polygon | None] = []
    cores: list[Polygon | None] = []
    for prompt, result in zip(traced, results, strict=True):
        if isinstance(result, str):
            work.outcomes[prompt.original.id] = Kept(prompt.original.id, result)
            cores.append(None)
            polygons.append(None)
        else:
            assert result is not None
            cores.append(result.core)
            polygons.append(result.polygon)
    if apart:
        polygons = keep_padded_apart(polygons, cores, [p.group for p in traced])
        for prompt, core, polygon in zip(traced, cores, polygons, strict=True):
            if core is not None and polygon is None:
                work.outcomes[prompt.original.id] = Kept(prompt.original.id, "nothing is left of the padded "
                                                         "shape beside its neighbours")
    for prompt, polygon, result in zip(traced, polygons, results, strict=True):
        pid = prompt.original.id
        if polygon is None:
            continue
        if prompt.point is None and gated:
            value = result.overlap if not apart and isinstance(result, _Traced) else None
            if (overlap(polygon, prompt.original.shape) if value is None else value) < options.min_overlap:
                work.outcomes[pid] = Kept(pid, gate)
                continue
        work.outcomes[pid] = Refined(pid, polygon, work.scores[pid])


#: Objects per tracing task: about four tasks per worker (some balance between them), within these bounds.
TRACE_CHUNK = (8, 64)


def _in_chunks(pool: OutlinePool, fn: Callable[..., list[Any]], items: Sequence[Any], more: Sequence[Any],
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


def _padded(core: Polygon, padding: float, frame_hw: tuple[int, int]) -> Polygon:
    """An unpadded outline buffered by ``padding``, clipped to the frame, made valid."""
    outline = np.asarray(core.exterior.coords)[:-1]
    return finish_polygon(outline, 0.0, padding, frame_polygon(frame_hw[1], frame_hw[0]))


def _planning(prompts: Sequence[_Prompt], height: int, width: int, resolution: str) -> tuple[str, np.ndarray]:
    """The resolution mode (Auto resolved) and the boxes regions are planned with."""
    boxes = np.stack([p.box for p in prompts]) if prompts else np.zeros((0, 4))
    sizes = boxes.copy()
    for k, prompt in enumerate(prompts):
        if prompt.point is not None:
            half = POINT_SIZE_FOR_AUTO / 2
            sizes[k] = np.concatenate([prompt.point - half, prompt.point + half])
    if height * width > MAX_WHOLE_FRAME_PIXELS and resolution != CROPS:
        resolution = CROPS  # a whole-frame RGB copy would not fit in memory: crops need only windows
    return choose_mode(sizes, height, width, resolution), boxes


#: The steps of a location that :func:`refine_location` reports to ``on_step(step, done, total)``:
#: a region embedded (``done`` of ``total`` regions, called before it), prompts decoded (originals
#: done of the location's), outlines traced (of those that had a mask).
STEP_EMBED, STEP_DECODE, STEP_TRACE = "embedding", "decoding", "tracing"


def refine_location(
    predictor: BoxPredictor,
    image: np.ndarray | LocationImage | ArrayImage,
    originals: Sequence[Original],
    options: GeometryOptions,
    on_progress: Callable[[int], None] | None = None,
    pool: OutlinePool | None = None,
    on_step: Callable[[str, int, int], None] | None = None,
) -> list[Outcome]:
    """Refine every original of one location (see the module docstring for the stages).

    The frame is split into regions (:func:`sam2_refine.engine.regions.plan_regions`); each region is
    embedded once and its prompts are decoded in batches of at most ``predictor.max_batch``
    (box prompts and point prompts in separate batches).

    Args:
        predictor: The model (its embedding is replaced).
        image: The merged frame: float32 (H, W, 3) RGB in [0, 1], or a
            :class:`~sam2_refine.engine.imaging.LocationImage` that merges only the windows embedded.
        originals: Annotations at this location.
        options: Resolution, prompt, smoothing, padding, quality gate, separation, points.
        on_progress: Called with the number of originals decoded so far (after each batch).
        pool: Where the outline work runs (:mod:`sam2_refine.engine.outline_pool`); default: on this
            thread. The outlines are the same either way.
        on_step: Called as ``on_step(step, done, total)`` at each step (:data:`STEP_EMBED`,
            :data:`STEP_DECODE`, :data:`STEP_TRACE`), for a progress bar that moves within a
            location.

    Returns:
        One outcome per original, in the order given.
    """
    pool = pool if pool is not None else OutlinePool(0)
    source = ArrayImage(image) if isinstance(image, np.ndarray) else image
    height, width = source.height, source.width
    prompts, kept = _prepare(originals, width, height, options.group_tags)
    work = _Location(prompts, height, width)
    if not pool.inline:
        work.early = _EarlyTraces(pool, options, work.frame_hw)
    work.outcomes.update({k.original_id: k for k in kept})
    done = len(kept)
    mode, boxes = _planning(prompts, height, width, options.resolution)
    tell = on_step or (lambda name, done, total: None)
    regions = plan_regions(boxes, height, width, mode) if prompts else []
    for number, region in enumerate(regions, start=1):
        tell(STEP_EMBED, number, len(regions))
        win = region.window
        size = getattr(predictor, "input_size", None)
        if size and (win.height > 2 * size or win.width > 2 * size):
            predictor.embed(source.window_shrunk(win.top, win.left, win.bottom, win.right, size),
                            region_hw=(win.height, win.width))
        else:
            predictor.embed(source.window(win.top, win.left, win.bottom, win.right))
        members = [prompts[i] for i in region.members]
        step = max(1, predictor.max_batch)
        stage = _ObjectMasks(pool, win, work.frame_hw)
        boxes_here = [p for p in members if p.point is None]
        points_here = [p for p in members if p.point is not None]
        for kind_members, points in ((boxes_here, False), (points_here, True)):
            for start in range(0, len(kind_members), step):
                chunk = kind_members[start:start + step]
                stage.add(_PointChunk(predictor, chunk, win, options, work, pool) if points
                          else _BoxChunk(predictor, chunk, win, options, work))
                done += len(chunk)
                if on_progress is not None:
                    on_progress(done)
                tell(STEP_DECODE, done, len(originals))
        stage.finish()  # before the next region replaces the embedding
    _choose_points(prompts, options, work)
    if options.separate:
        _separate(prompts, work)
    _trace_all(prompts, options, work, pool, lambda done, total: tell(STEP_TRACE, done, total))
    return [work.outcomes[o.id] for o in originals]


def _regrid(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """A bool grid resampled (nearest) to another grid size over the same region."""
    if mask.shape == tuple(hw):
        return mask
    return cv2.resize(mask.astype(np.uint8), (int(hw[1]), int(hw[0])), interpolation=cv2.INTER_NEAREST) > 0
