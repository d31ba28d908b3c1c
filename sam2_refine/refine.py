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
from sam2_refine.logits import upsample_window
from sam2_refine.predictor import BoxPredictor
from sam2_refine.imaging import ArrayImage, LocationImage
from sam2_refine.regions import AUTO, CROPS, plan_regions
from sam2_refine.selection import Original

#: Frames with more pixels than this are always refined in object crops: a whole-frame RGB
#: float copy of 16384 x 16384 pixels alone is 3.2 GB (a 20000 x 20000 frame: 4.8 GB).
MAX_WHOLE_FRAME_PIXELS = 16384 * 16384

#: A mask whose chosen component covers more than this multiple of the prompt box's area is
#: rejected: the model has segmented something else than the outlined object.
MAX_AREA_RATIO = 4.0


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


def mask_to_polygon(
    grid: np.ndarray,
    prompt: _Prompt,
    region: Window,
    frame_hw: tuple[int, int],
    options: GeometryOptions,
) -> Polygon:
    """One polygon from one mask's low-resolution logits (see the module docstring).

    Args:
        grid: float32 (h, w) logits covering ``region``.
        prompt: The original and its box (frame coordinates).
        region: The window of the frame the model embedded.
        frame_hw: (H, W) of the frame.

    Raises:
        AnnotationProblem: empty mask, no overlap with the original, far larger than the
            original's box, cut by the edge of its crop, or no valid polygon.
    """
    height, width = frame_hw
    x0, y0, x1, y1 = prompt.box
    box_area = max((x1 - x0) * (y1 - y0), 1.0)
    cell = max(region.height / grid.shape[0], region.width / grid.shape[1])
    margin = max(8.0, 0.25 * max(x1 - x0, y1 - y0), 2.0 * cell)
    region_hw = (region.height, region.width)
    while True:
        window = Window.around(prompt.box, margin, region)  # frame coordinates, inside the region
        logits = upsample_window(grid, region_hw, (window.top - region.top, window.bottom - region.top),
                                 (window.left - region.left, window.right - region.left))
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


def _choose_mask(decoded_logits: np.ndarray, scores: np.ndarray, reference: np.ndarray | None) -> int:
    """Which of a prompt's C masks to use: the one overlapping ``reference`` most (ties: the
    model's score), or the best-scored when there is no reference."""
    if reference is None or decoded_logits.shape[0] == 1:
        return int(np.argmax(scores))
    masks = decoded_logits > 0
    inter = np.count_nonzero(masks & reference[None], axis=(1, 2))
    union = np.count_nonzero(masks | reference[None], axis=(1, 2))
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
    gate = f"its overlap with the original is below the minimum ({options.min_overlap:g})"
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
        offset = np.array([win.left, win.top, win.left, win.top], dtype=np.float64)
        members = [prompts[i] for i in region.members]
        for start in range(0, len(members), max(1, predictor.max_batch)):
            chunk = members[start:start + predictor.max_batch]
            references = None
            if options.prompt in (BOX_AND_SHAPE, BEST_OF_THREE):
                references = [shape_on_grid(p.original.shape, win, predictor.mask_input_size) for p in chunk]
            mask_inputs = (np.stack([shape_logits(r) for r in references])[:, None]
                           if options.prompt == BOX_AND_SHAPE else None)
            decoded = predictor.decode(np.stack([p.box for p in chunk]) - offset, mask_inputs,
                                       multimask=options.prompt == BEST_OF_THREE)
            for k, prompt in enumerate(chunk):
                reference = None
                if options.prompt == BEST_OF_THREE and references is not None:
                    reference = _regrid(references[k], decoded.logits.shape[-2:])
                best = _choose_mask(decoded.logits[k], decoded.scores[k], reference)
                try:
                    polygon = mask_to_polygon(decoded.logits[k, best], prompt, win, (height, width), options)
                    if options.min_overlap > 0 and overlap(polygon, prompt.original.shape) < options.min_overlap:
                        raise AnnotationProblem(gate)
                    outcomes[prompt.original.id] = Refined(prompt.original.id, polygon,
                                                           float(decoded.scores[k, best]))
                except AnnotationProblem as exc:
                    outcomes[prompt.original.id] = Kept(prompt.original.id, exc.reason)
            done += len(chunk)
            if on_progress is not None:
                on_progress(done)
    return [outcomes[o.id] for o in originals]


def _regrid(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """A bool grid resampled (nearest) to another grid size over the same region."""
    if mask.shape == tuple(hw):
        return mask
    return cv2.resize(mask.astype(np.uint8), (int(hw[1]), int(hw[0])), interpolation=cv2.INTER_NEAREST) > 0
