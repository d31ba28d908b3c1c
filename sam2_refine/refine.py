"""The engine at one location: embed each region once, prompt with every box, one polygon each.

For each original annotation the outcome is either :class:`Refined` (a clean polygon) or
:class:`Kept` (with the reason it was not refined). Nothing here talks to the server.

The frame is embedded whole or in object crops (:mod:`sam2_refine.regions`). Prompts are the
box (optionally with the original outline as mask logits, or asking for three masks and keeping
the one that agrees best with the original). Per mask, only a window around the object is ever
upsampled from the model's low-resolution logits (:func:`sam2_refine.logits.upsample_window`):
first the prompt box plus a margin; if the chosen component reaches a window edge, the window
grows until it does not (or the mask is rejected as far larger than the original). Memory
therefore grows with the objects' size, not with N x frame size. A quality gate can reject
refined shapes that overlap their original too little.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from shapely import affinity
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from sam2_refine.geometry import (
    AnnotationProblem,
    Window,
    finish_polygon,
    frame_polygon,
    outline_from_logits,
    prompt_box,
    rasterize_rough,
    select_component,
    touches_edges,
)
from sam2_refine.logits import GridPatch, grid_window, upsample_window
from sam2_refine.predictor import BoxPredictor, Decoded
from sam2_refine.imaging import ArrayImage, LocationImage
from sam2_refine.regions import AUTO, CROPS, plan_regions
from sam2_refine.selection import Original

#: Frames with more pixels than this are always refined in object crops: a whole-frame RGB
#: float copy of 16384 x 16384 pixels alone is 3.2 GB (a 20000 x 20000 frame: 4.8 GB).
MAX_WHOLE_FRAME_PIXELS = 16384 * 16384

#: A mask whose chosen component covers more than this multiple of the prompt box's area is
#: rejected: the model has segmented something else than the outlined object.
MAX_AREA_RATIO = 4.0


#: Windowed decoding asks for each prompt's logits in the window of this multiple of its first
#: margin, so that the first two growths of the window (margin x 2, x 4) need no second decoding
#: (a few cells more per prompt; a second decoding costs a whole prompt's transformer pass).
GROWTH_PAID = 4.0

BOX, BOX_AND_SHAPE, BEST_OF_THREE = "box", "box+shape", "best3"


@dataclass(frozen=True)
class GeometryOptions:
    """How the engine prompts the model and turns masks into polygons.

    Attributes:
        smoothing: Simplification tolerance in pixels (0 = none).
        padding: Buffer distance in pixels (negative shrinks).
        resolution: ``"whole"`` frame, object ``"crops"``, or ``"auto"`` (see :mod:`sam2_refine.regions`).
        prompt: ``"box"``; ``"box+shape"`` (the original outline also given as mask logits);
            ``"best3"`` (three masks per box, the one that overlaps the original most is kept).
        min_overlap: Quality gate: a refined shape whose IoU with its original is below this is
            not used (0 = off).
    """

    smoothing: float = 0.7
    padding: float = 0.0
    resolution: str = AUTO
    prompt: str = BOX
    min_overlap: float = 0.0


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


@dataclass(frozen=True)
class LargerWindow:
    """:func:`mask_to_polygon` needs logits beyond the grid cells it was given: decode the prompt
    again for ``window`` (frame pixels; :func:`decode_window`) and call again with ``margin``."""

    margin: float
    window: Window


def first_margin(box: np.ndarray, region: Window, grid_hw: tuple[int, int]) -> float:
    """The margin (pixels) of the first window around a prompt box: 8 px, a quarter of the box's
    larger side, or two grid cells, whichever is largest."""
    x0, y0, x1, y1 = box
    cell = max(region.height / grid_hw[0], region.width / grid_hw[1])
    return max(8.0, 0.25 * max(x1 - x0, y1 - y0), 2.0 * cell)


def decode_window(prompt: _Prompt, margin: float, region: Window, grid_hw: tuple[int, int],
                  reference: np.ndarray | None = None) -> Window:
    """The frame pixels whose logits :func:`mask_to_polygon` reads at ``margin``: the box plus
    the margin, clipped to the region (and, given the prompt's ``reference`` cells on the
    grid, enlarged to cover them, so that its overlap with each mask is in the window)."""
    window = Window.around(prompt.box, margin, region)
    if reference is not None and reference.any():
        rows, cols = np.flatnonzero(reference.any(axis=1)), np.flatnonzero(reference.any(axis=0))
        sy, sx = region.height / grid_hw[0], region.width / grid_hw[1]
        covered = Window(region.top + int(rows[0] * sy), region.left + int(cols[0] * sx),
                         region.top + int(np.ceil((rows[-1] + 1) * sy)),
                         region.left + int(np.ceil((cols[-1] + 1) * sx)))
        window = Window(min(window.top, covered.top), min(window.left, covered.left),
                        max(window.bottom, covered.bottom), max(window.right, covered.right))
    return window.intersect(region)


def mask_to_polygon(
    grid: np.ndarray | GridPatch,
    prompt: _Prompt,
    region: Window,
    frame_hw: tuple[int, int],
    options: GeometryOptions,
    margin: float | None = None,
) -> Polygon | LargerWindow:
    """One polygon from one mask's low-resolution logits (see the module docstring).

    Pure: no model call. When the chosen component reaches the edge of its window the window
    grows; when the grown window needs logits that ``grid`` does not hold, the answer is a
    :class:`LargerWindow` and the caller decodes the prompt again.

    Args:
        grid: float32 (h, w) logits covering ``region``, or a :class:`GridPatch` of them.
        prompt: The original and its box (frame coordinates).
        region: The window of the frame the model embedded.
        frame_hw: (H, W) of the frame.
        margin: The window's margin around the box (pixels); default :func:`first_margin`.

    Raises:
        AnnotationProblem: empty mask, no overlap with the original, far larger than the
            original's box, cut by the edge of its crop, or no valid polygon.
    """
    patch = grid if isinstance(grid, GridPatch) else GridPatch.whole(grid)
    height, width = frame_hw
    x0, y0, x1, y1 = prompt.box
    box_area = max((x1 - x0) * (y1 - y0), 1.0)
    if margin is None:
        margin = first_margin(prompt.box, region, patch.grid_hw)
    region_hw = (region.height, region.width)
    while True:
        window = Window.around(prompt.box, margin, region)  # frame coordinates, inside the region
        rows = (window.top - region.top, window.bottom - region.top)
        cols = (window.left - region.left, window.right - region.left)
        if not patch.covers(grid_window(patch.grid_hw, region_hw, rows, cols)):
            return LargerWindow(margin, window)
        logits = upsample_window(patch, region_hw, rows, cols)
        mask = logits > 0
        if not mask.any():
            raise AnnotationProblem("empty mask")
        component, _ = select_component(mask, rasterize_rough(prompt.original.shape, window))
        if component is None:
            raise AnnotationProblem("the mask does not overlap the original outline")
        area = int(np.count_nonzero(component))
        if area > MAX_AREA_RATIO * box_area:
            raise AnnotationProblem(
                f"the mask is far larger than the original (over {MAX_AREA_RATIO:g}x its box area)")
        top, left, bottom, right = touches_edges(component)
        sides = ((top, window.top, region.top, 0), (left, window.left, region.left, 0),
                 (bottom, window.bottom, region.bottom, height), (right, window.right, region.right, width))
        if any(touch and edge == limit != frame_edge for touch, edge, limit, frame_edge in sides):
            raise AnnotationProblem("the mask runs past the edge of the crop it was segmented in")
        if not any(touch and edge != limit for touch, edge, limit, _ in sides):
            break
        margin *= 2.0
    outline = outline_from_logits(logits, component) + (window.left, window.top)
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


def refine_location(
    predictor: BoxPredictor,
    image: np.ndarray | LocationImage | ArrayImage,
    originals: Sequence[Original],
    options: GeometryOptions,
    on_progress: Callable[[int], None] | None = None,
) -> list[Outcome]:
    """Refine every original of one location.

    The frame is split into regions (:func:`sam2_refine.regions.plan_regions`); each region is
    embedded once and its prompts are decoded in batches of at most ``predictor.max_batch``.

    Args:
        predictor: The model (its embedding is replaced).
        image: The merged frame: float32 (H, W, 3) RGB in [0, 1], or a
            :class:`~sam2_refine.imaging.LocationImage` that merges only the windows embedded.
        originals: Annotations at this location.
        options: Resolution, prompt, smoothing, padding, quality gate.
        on_progress: Called with the number of originals done so far.

    Returns:
        One outcome per original, in the order given.
    """
    source = ArrayImage(image) if isinstance(image, np.ndarray) else image
    height, width = source.height, source.width
    prompts, kept = _prepare(originals, width, height)
    outcomes: dict[str, Outcome] = {k.original_id: k for k in kept}
    done = len(kept)
    boxes = np.stack([p.box for p in prompts]) if prompts else np.zeros((0, 4))
    resolution = options.resolution
    if height * width > MAX_WHOLE_FRAME_PIXELS and resolution != CROPS:
        resolution = CROPS  # a whole-frame RGB copy would not fit in memory: crops need only windows
    for region in plan_regions(boxes, height, width, resolution) if prompts else []:
        win = region.window
        size = getattr(predictor, "input_size", None)
        if size and (win.height > 2 * size or win.width > 2 * size):
            predictor.embed(source.window_shrunk(win.top, win.left, win.bottom, win.right, size),
                            region_hw=(win.height, win.width))
        else:
            predictor.embed(source.window(win.top, win.left, win.bottom, win.right))
        members = [prompts[i] for i in region.members]
        for start in range(0, len(members), max(1, predictor.max_batch)):
            chunk = members[start:start + predictor.max_batch]
            for prompt, outcome in zip(chunk, _refine_chunk(predictor, chunk, win, (height, width), options),
                                       strict=True):
                outcomes[prompt.original.id] = outcome
            done += len(chunk)
            if on_progress is not None:
                on_progress(done)
    return [outcomes[o.id] for o in originals]


def _refine_chunk(predictor: BoxPredictor, chunk: Sequence[_Prompt], win: Window,
                  frame_hw: tuple[int, int], options: GeometryOptions) -> list[Outcome]:
    """The outcomes of one batch of prompts in the embedded region ``win``.

    Every model call happens here, on the calling thread; :func:`mask_to_polygon` is pure. A
    predictor with a fixed ``logit_grid`` is asked only for each prompt's window of logits; a
    prompt whose mask outgrows its window is decoded again for the larger window (all such
    prompts of the batch in one call), as often as needed.
    """
    grid_hw = getattr(predictor, "logit_grid", None)
    offset = np.array([win.left, win.top, win.left, win.top], dtype=np.float64)
    references = None
    if options.prompt in (BOX_AND_SHAPE, BEST_OF_THREE):
        references = [shape_on_grid(p.original.shape, win, predictor.mask_input_size) for p in chunk]
    mask_inputs = (np.stack([shape_logits(r) for r in references])[:, None]
                   if options.prompt == BOX_AND_SHAPE and references is not None else None)
    multimask = options.prompt == BEST_OF_THREE
    best3 = multimask and references is not None
    if grid_hw is not None:
        grid_refs = [_regrid(r, grid_hw) for r in references] if best3 and references else None
        margins = [first_margin(p.box, win, grid_hw) for p in chunk]
        # decoded for GROWTH_PAID x the first margin; tracing starts at the first margin
        windows = [decode_window(p, GROWTH_PAID * m, win, grid_hw, grid_refs[k] if grid_refs else None)
                   for k, (p, m) in enumerate(zip(chunk, margins, strict=True))]
        decoded = predictor.decode(np.stack([p.box for p in chunk]) - offset, mask_inputs, multimask=multimask,
                                   windows=_relative(windows, win), areas=best3)
    else:
        margins = [None] * len(chunk)
        decoded = predictor.decode(np.stack([p.box for p in chunk]) - offset, mask_inputs, multimask=multimask)
    outcomes: list[Outcome | None] = [None] * len(chunk)
    todo = []  # (index in chunk, mask index, margin, logits, score) still to trace
    for k in range(len(chunk)):
        reference = None
        if best3 and references is not None:
            reference = _regrid(references[k], decoded.grid_size)
        best = _choose_mask(decoded, k, reference)
        todo.append((k, best, margins[k], decoded.mask(k, best), float(decoded.scores[k, best])))
    while todo:
        again = []
        for k, best, margin, patch, score in todo:
            prompt = chunk[k]
            try:
                result = mask_to_polygon(patch, prompt, win, frame_hw, options, margin)
                if isinstance(result, LargerWindow):
                    again.append((k, best, result, score))
                    continue
                if options.min_overlap > 0 and overlap(result, prompt.original.shape) < options.min_overlap:
                    raise AnnotationProblem(
                        f"its overlap with the original is below the minimum ({options.min_overlap:g})")
                outcomes[k] = Refined(prompt.original.id, result, score)
            except AnnotationProblem as exc:
                outcomes[k] = Kept(prompt.original.id, exc.reason)
        todo = []
        if again:  # the same prompts, larger windows; the mask chosen first is kept
            idx = [k for k, _, _, _ in again]
            redecoded = predictor.decode(
                np.stack([chunk[k].box for k in idx]) - offset,
                None if mask_inputs is None else mask_inputs[idx], multimask=multimask,
                windows=_relative([grow.window for _, _, grow, _ in again], win))
            todo = [(k, best, grow.margin, redecoded.mask(i, best), score)
                    for i, (k, best, grow, score) in enumerate(again)]
    return [o for o in outcomes if o is not None]


def _relative(windows: Sequence[Window], region: Window) -> np.ndarray:
    """Frame windows as int (N, 4) (top, left, bottom, right) pixels of the region."""
    return np.array([[w.top - region.top, w.left - region.left, w.bottom - region.top,
                      w.right - region.left] for w in windows], dtype=np.int64).reshape(-1, 4)


def _regrid(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """A bool grid resampled (nearest) to another grid size over the same region."""
    if mask.shape == tuple(hw):
        return mask
    return cv2.resize(mask.astype(np.uint8), (int(hw[1]), int(hw[0])), interpolation=cv2.INTER_NEAREST) > 0
