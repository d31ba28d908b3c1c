"""Stage 1, pure: one mask's low-resolution logits -> the object's full-resolution mask in a
window of the frame (:func:`object_mask`), and the pool's task that does it for a chunk of
objects (:func:`find_objects`).

Coordinates are frame pixels, x = column, y = row; arrays are (rows, columns).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from shapely.geometry.base import BaseGeometry

from sam2_refine.engine import point_choice
from sam2_refine.engine.geometry import (
    AnnotationProblem,
    Window,
    point_component,
    rasterize_rough,
    select_component,
    touches_edges,
)
from sam2_refine.engine.prompts import Prompt
from sam2_refine.model.logits import GridPatch, grid_window, upsample_window


#: A mask whose chosen component covers more than this multiple of the prompt box's area is
#: rejected: the model has segmented something else than the outlined object.
MAX_AREA_RATIO = 4.0


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
    return cropped(window, logits, component, area)


def cropped(window: Window, logits: np.ndarray, component: np.ndarray, area: int) -> ObjectMask:
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


def chooser(prompt: Prompt) -> Chooser:
    return _PointChooser(*prompt.pixel) if prompt.point is not None else _OutlineChooser(prompt.original.shape)


def box_limits(prompt: Prompt) -> tuple[float, str, str]:
    """(max_area, too_large, no_match) of a box prompt's mask."""
    x0, y0, x1, y1 = prompt.box
    box_area = max((x1 - x0) * (y1 - y0), 1.0)
    return (MAX_AREA_RATIO * box_area,
            f"the mask is far larger than the original (over {MAX_AREA_RATIO:g}x its box area)",
            "the mask does not overlap the original outline")


def _box_object(grid: np.ndarray | GridPatch, prompt: Prompt, region: Window, frame_hw: tuple[int, int],
                margin: float | None = None) -> ObjectMask | LargerWindow:
    return object_mask(grid, region, frame_hw, prompt.box, chooser(prompt), *box_limits(prompt), margin)


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
class MaskJob:
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


def find_objects(jobs: Sequence[MaskJob], region: Window, frame_hw: tuple[int, int]) -> list[MaskResult]:
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
