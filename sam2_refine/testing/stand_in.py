"""Stand-in predictors with known answers, for geometry, accuracy and load tests.

They satisfy :class:`sam2_refine.model.predictor.BoxPredictor`, so the engine runs them exactly as it
runs SAM2.

- :class:`KnownMaskPredictor` returns, for each box, the bright object of the embedded image
  that fills most of the box: the "known mask", at full resolution (or on a coarse grid, like
  SAM2's 256x256 logits).
- :class:`ModelResolutionPredictor` segments like a model that sees only its 1024x1024 input:
  it thresholds the image after resizing it to the model input, so objects only a few pixels
  wide in a large frame come out coarse or lost.

Both answer point prompts (issue 13) the way SAM2 answers one positive click, with three masks
of different extents: a part of the object under the point (eroded), the object, and the object
with whatever it touches (its neighbours within a few pixels, or, alone, the object grown by
half its radius). Their scores (the model's own quality estimate) favour the object for two
objects in three and the largest mask for the third (objects whose label is a multiple of 3),
so that a choice by score alone is sometimes wrong. Negative points remove the objects they lie
on from every mask (as a negative click makes SAM2 leave that region out).

``spill`` (pixels) makes every object mask also claim the parts of touching neighbours within
that distance, with weaker logits (+3 against +8 inside the object): the way a box over one of
two touching nuclei gives a mask that spills into the other. Negative points on a neighbour
stop the spill into it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import cv2
import numpy as np

from sam2_refine.model.logits import cells_for_windows
from sam2_refine.model.predictor import Decoded, from_whole_grid

#: Logit magnitude of a known mask: inside +LOGIT, outside -LOGIT.
LOGIT = 8.0
#: Logits of the pixels a mask spills into (a neighbour's), and of the neighbours merged into
#: the largest of a point's three masks.
SPILL_LOGIT, MERGE_LOGIT = 3.0, 5.0
#: Scores of a point's three masks (part, object, object with its neighbours): usually the
#: object scores best; for objects whose label is a multiple of 3 the largest mask does.
POINT_SCORES = (0.80, 0.90, 0.85)
POINT_SCORES_WRONG = (0.80, 0.85, 0.90)


def _labels(image: np.ndarray, threshold: float, band: int | None = None) -> np.ndarray:
    bright = ((image.max(axis=2) if band is None else image[..., band]) > threshold).astype(np.uint8)
    _, labels = cv2.connectedComponents(bright, connectivity=8)
    return labels


def _box_slices(box: np.ndarray, height: int, width: int) -> tuple[slice, slice]:
    x0, y0, x1, y1 = box
    c0 = int(np.clip(np.ceil(x0), 0, width - 1))
    c1 = int(np.clip(np.floor(x1), c0, width - 1)) + 1
    r0 = int(np.clip(np.ceil(y0), 0, height - 1))
    r1 = int(np.clip(np.floor(y1), r0, height - 1)) + 1
    return slice(r0, r1), slice(c0, c1)


def _to_grid(logits: np.ndarray, grid: tuple[int, int] | None) -> np.ndarray:
    """Full-resolution logits, or their average over each cell of a coarse grid."""
    if grid is None:
        return logits.astype(np.float32)
    return cv2.resize(logits.astype(np.float32), (grid[1], grid[0]), interpolation=cv2.INTER_AREA)


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


class _Answers:
    """Masks as logit maps over a label image (0 = background, k = object k)."""

    def __init__(self, labels: np.ndarray, spill: float, wrong_scores: bool = True) -> None:
        self.labels = labels
        self.spill = spill
        self.wrong_scores = wrong_scores

    def label_at(self, x: float, y: float, reach: int = 2) -> int:
        height, width = self.labels.shape
        row, col = int(np.floor(y + 0.5)), int(np.floor(x + 0.5))
        if 0 <= row < height and 0 <= col < width and self.labels[row, col]:
            return int(self.labels[row, col])
        r0, c0 = max(row - reach, 0), max(col - reach, 0)
        near = self.labels[r0:row + reach + 1, c0:col + reach + 1]
        if near.size == 0 or not near.any():
            return 0
        rows, cols = np.nonzero(near)
        k = int(np.argmin((rows + r0 - row) ** 2 + (cols + c0 - col) ** 2))
        return int(near[rows[k], cols[k]])

    def label_in_box(self, box: np.ndarray) -> int:
        height, width = self.labels.shape
        rows, cols = _box_slices(box, height, width)
        counts = np.bincount(self.labels[rows, cols].ravel())
        counts[0] = 0
        return int(np.argmax(counts)) if counts.size > 1 and counts.max() > 0 else 0

    def _near(self, label: int, reach: int) -> tuple[tuple[slice, slice], np.ndarray]:
        """A window around the object (reach pixels more), and the object's mask in it."""
        rows, cols = np.nonzero(self.labels == label)
        height, width = self.labels.shape
        win = (slice(max(rows.min() - reach, 0), min(rows.max() + reach + 1, height)),
               slice(max(cols.min() - reach, 0), min(cols.max() + reach + 1, width)))
        return win, self.labels[win] == label

    def object_logits(self, label: int, excluded: set[int] = frozenset()) -> np.ndarray:
        """The object (+LOGIT), spilling into touching neighbours not excluded (+SPILL_LOGIT)."""
        out = np.full(self.labels.shape, -LOGIT, dtype=np.float32)
        if not label:
            return out
        reach = int(np.ceil(self.spill))
        win, own = self._near(label, reach)
        local = out[win]
        if reach > 0:
            grown = cv2.dilate(own.astype(np.uint8), _disk(reach)) > 0
            others = self.labels[win]
            spill = grown & (others != 0) & ~own & ~np.isin(others, list(excluded))
            local[spill] = SPILL_LOGIT
        local[own] = LOGIT
        return out

    def point_logits(self, label: int, excluded: set[int], multimask: bool) -> tuple[list[np.ndarray], tuple]:
        """(masks, scores) for a point on ``label``: [part, object, whole] or [object]."""
        middle = self.object_logits(label, excluded)
        if not multimask:
            return [middle], (POINT_SCORES[1],)
        if not label:
            return [middle, middle, middle], POINT_SCORES
        radius = max(1, int(round(np.sqrt(np.count_nonzero(self.labels == label) / np.pi))))
        reach = max(2, int(np.ceil(self.spill))) + 2
        win, own = self._near(label, max(reach, radius))
        others = self.labels[win]
        part = np.full(self.labels.shape, -LOGIT, dtype=np.float32)
        eroded = cv2.erode(own.astype(np.uint8), _disk(max(1, int(round(0.4 * radius))))) > 0
        part[win][eroded if eroded.any() else own] = LOGIT
        whole = middle.copy()
        touching = set(np.unique(others[cv2.dilate(own.astype(np.uint8), _disk(reach)) > 0]).tolist())
        touching -= {0, label} | set(excluded)
        if touching:
            whole[win][np.isin(others, list(touching))] = MERGE_LOGIT
        else:
            grown = cv2.dilate(own.astype(np.uint8), _disk(max(1, radius // 2))) > 0
            whole[win][grown & ~own & (others == 0)] = MERGE_LOGIT
        scores = POINT_SCORES_WRONG if self.wrong_scores and label % 3 == 0 else POINT_SCORES
        return [part, middle, whole], scores


def _point_prompts(answers: _Answers, points: np.ndarray, point_labels: np.ndarray, multimask: bool,
                   ) -> tuple[list[list[np.ndarray]], list[tuple]]:
    masks, scores = [], []
    for pts, labs in zip(np.asarray(points, dtype=np.float64), np.asarray(point_labels), strict=True):
        positive = [answers.label_at(x, y) for (x, y), lab in zip(pts, labs, strict=True) if lab == 1]
        excluded = {answers.label_at(x, y, reach=0) for (x, y), lab in zip(pts, labs, strict=True) if lab == 0}
        label = next((p for p in positive if p), 0)
        m, s = answers.point_logits(label, excluded - {0, label}, multimask)
        masks.append(m)
        scores.append(s)
    return masks, scores


class KnownMaskPredictor:
    """Each box gets the connected bright object that covers most of it; each point the object
    under it (three masks with ``multimask``, see the module docstring).

    Args:
        threshold: An object is where the image's brightest band exceeds this.
        grid: (h, w) of the logit grid, or None for full resolution (grid = image).
        max_batch: Prompts per decode call.
        labels: (H, W) int label image to answer from instead of thresholding the image (the
            ground truth of a synthetic scene).
        spill: Pixels by which masks spill into touching neighbours (0: none).
        wrong_scores: Score the largest of a point's masks best for one object in three (else
            the object's mask always scores best).
    """

    description = "known-mask stand-in"
    mask_input_size = (256, 256)
    input_size = None

    def __init__(self, threshold: float = 0.5, grid: tuple[int, int] | None = None, max_batch: int = 16,
                 labels: np.ndarray | None = None, spill: float = 0.0, wrong_scores: bool = True) -> None:
        self.threshold = threshold
        self.wrong_scores = wrong_scores
        self.truth = labels
        self.grid = grid
        self.max_batch = max_batch
        self.spill = spill
        self.embed_calls = 0
        self.decode_calls = 0
        self.prompts = 0
        self.point_calls: list[np.ndarray] = []  # the point labels of each point decode
        #: decode's grid when it does not depend on the image (else windows are not offered)
        self.logit_grid = grid
        self._labels: np.ndarray | None = None

    def embed(self, image: np.ndarray) -> None:
        self.embed_calls += 1
        if self.truth is not None and image.shape[:2] != self.truth.shape:
            raise ValueError(f"the truth labels {self.truth.shape} answer for the whole frame only, "
                             f"not a {image.shape[:2]} crop")
        self._labels = self.truth if self.truth is not None else _labels(image, self.threshold)

    def decode(self, boxes: np.ndarray | None, mask_inputs: np.ndarray | None = None,
               multimask: bool = False, *, points: np.ndarray | None = None,
               point_labels: np.ndarray | None = None, windows: np.ndarray | None = None,
               areas: bool = False) -> Decoded:
        assert self._labels is not None, "embed() first"
        answers = _Answers(self._labels, self.spill, self.wrong_scores)
        self.decode_calls += 1
        channels = 3 if multimask else 1
        region_hw = self._labels.shape
        if boxes is None:
            assert points is not None and point_labels is not None
            self.prompts += len(points)
            self.point_calls.append(np.asarray(point_labels))
            masks, scores = _point_prompts(answers, points, point_labels, multimask)
            logits = np.stack([np.stack([_to_grid(m, self.grid) for m in ms]) for ms in masks])
            return from_whole_grid(logits, np.asarray(scores, dtype=np.float32), region_hw, windows=windows,
                                   areas=areas)
        self.prompts += len(boxes)
        out = [_to_grid(answers.object_logits(answers.label_in_box(box)), self.grid)
               for box in np.asarray(boxes, dtype=np.float64).reshape(-1, 4)]
        logits = np.repeat(np.stack(out)[:, None], channels, axis=1)
        return from_whole_grid(logits, np.ones((len(out), channels), dtype=np.float32), region_hw,
                               windows=windows, areas=areas)


class ModelResolutionPredictor:
    """Segments at the model's input resolution, as SAM2 effectively does on a whole frame.

    The embedded image is resized (area averaging) to ``input_size`` x ``input_size``; objects
    are thresholded there (the brightest band, or band ``band`` of the RGB image), and each box
    gets the object covering most of it (each point the object under it, three masks with
    ``multimask``), as logits on a ``grid`` x ``grid`` map (SAM2: 256), upsampled back by the engine.
    """

    description = "model-resolution stand-in"
    mask_input_size = (256, 256)

    def __init__(self, threshold: float = 0.5, input_size: int = 1024, grid: int = 256,
                 max_batch: int = 16, band: int | None = None) -> None:
        self.threshold = threshold
        self.band = band
        self.input_size = input_size
        self.grid = grid
        self.max_batch = max_batch
        self.logit_grid = (grid, grid)
        self._labels: np.ndarray | None = None
        self._hw: tuple[int, int] = (0, 0)

    def embed(self, image: np.ndarray, region_hw: tuple[int, int] | None = None) -> None:
        self._hw = region_hw or image.shape[:2]
        small = cv2.resize(image, (self.input_size, self.input_size), interpolation=cv2.INTER_AREA)
        self._labels = _labels(small, self.threshold, self.band)

    def decode(self, boxes: np.ndarray | None, mask_inputs: np.ndarray | None = None,
               multimask: bool = False, *, points: np.ndarray | None = None,
               point_labels: np.ndarray | None = None, windows: np.ndarray | None = None,
               areas: bool = False) -> Decoded:
        assert self._labels is not None, "embed() first"
        height, width = self._hw
        answers = _Answers(self._labels, 0.0)
        grid = (self.grid, self.grid)
        scale = np.array([self.input_size / width, self.input_size / height])
        channels = 3 if multimask else 1
        if boxes is None:
            assert points is not None and point_labels is not None
            model_points = (np.asarray(points, dtype=np.float64) + 0.5) * scale - 0.5
            masks, scores = _point_prompts(answers, model_points, point_labels, multimask)
            logits = np.stack([np.stack([_to_grid(m, grid) for m in ms]) for ms in masks])
            return from_whole_grid(logits, np.asarray(scores, dtype=np.float32), (height, width),
                                   windows=windows, areas=areas)
        out = []
        for box in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
            model_box = (box + 0.5) * np.tile(scale, 2) - 0.5
            out.append(_to_grid(answers.object_logits(answers.label_in_box(model_box)), grid))
        logits = np.stack(out)[:, None]
        return from_whole_grid(np.repeat(logits, channels, axis=1), np.ones((len(out), channels), dtype=np.float32),
                               (height, width), windows=windows, areas=areas)


class ZeroCostPredictor:
    """Valid masks at (almost) no cost: the model's part of a job on a GPU, without a GPU.

    :meth:`embed` reduces the embedded region to the ``grid`` x ``grid`` logit grid (area
    averaging of its brightest band), thresholds and labels it once; :meth:`decode` gives each
    box the labelled object covering most of it, as logits ``(fraction - 0.5) * 2 * LOGIT`` (a
    ramp across the boundary, like a trained model's), ``-LOGIT`` elsewhere. When the engine
    asks for ``windows`` (as it asks SAM2, whose logits on CUDA are cut to the same windows),
    only each prompt's window is made, from the object's cells (cached per object); else the
    whole (grid, grid) map. Like SAM2 it takes regions already shrunk to ``input_size``
    (``region_hw``), so the engine prepares its input exactly as for SAM2.

    Args:
        threshold: An object is where the image's brightest band exceeds this.
        embed_seconds: Time each :meth:`embed` call sleeps (the GIL released, as while a GPU
            computes): one value, or one per call in order (repeated cyclically).
        decode_seconds_per_box: Time each :meth:`decode` call sleeps per prompt.
        grid: Side of the logit grid (SAM2: 256).
        max_batch: Prompts per decode call.

    Attributes:
        embed_calls, decode_calls, prompts: Counters.
    """

    description = "zero-cost stand-in"

    def __init__(self, threshold: float = 0.5, embed_seconds: float | Sequence[float] = 0.0,
                 decode_seconds_per_box: float = 0.0, grid: int = 256, input_size: int = 1024,
                 max_batch: int = 64) -> None:
        self.threshold = threshold
        self.embed_seconds = [embed_seconds] if isinstance(embed_seconds, (int, float)) else list(embed_seconds)
        self.decode_seconds_per_box = decode_seconds_per_box
        self.grid = grid
        self.input_size = input_size
        self.mask_input_size = (grid, grid)
        #: decode's grid: fixed, so the engine asks for windows
        self.logit_grid = (grid, grid)
        self.max_batch = max_batch
        self.embed_calls = self.decode_calls = self.prompts = 0
        self._hw = (0, 0)
        self._labels: np.ndarray | None = None  # (grid, grid) int32, 0 = background
        self._ramp: np.ndarray | None = None  # (grid, grid) float32 logits where an object is
        self._maps: dict[int, np.ndarray] = {}
        self._stats: np.ndarray | None = None  # (labels, 5) OpenCV's component statistics
        self._local: dict[int, tuple[int, int, np.ndarray]] = {}  # label -> (top, left, its cells' logits)

    def embed(self, image: np.ndarray, region_hw: tuple[int, int] | None = None) -> None:
        pause = self.embed_seconds[self.embed_calls % len(self.embed_seconds)] if self.embed_seconds else 0.0
        self.embed_calls += 1
        if pause > 0:
            time.sleep(pause)
        self._hw = tuple(region_hw or image.shape[:2])
        image = np.asarray(image)
        brightest = image[..., 0].copy()  # = image.max(axis=2), 15x faster, and no copy of the whole image
        for band in range(1, image.shape[2]):
            np.maximum(brightest, image[..., band], out=brightest)
        bright = (brightest > self.threshold).astype(np.float32)
        fraction = cv2.resize(bright, (self.grid, self.grid), interpolation=cv2.INTER_AREA)
        _, self._labels, self._stats, _ = cv2.connectedComponentsWithStats((fraction >= 0.5).astype(np.uint8),
                                                                           connectivity=4)
        self._ramp = ((fraction - 0.5) * (2.0 * LOGIT)).astype(np.float32)
        self._maps, self._local = {}, {}

    def _map(self, label: int) -> np.ndarray:
        """The object's logits over the whole grid."""
        if label not in self._maps:
            self._maps[label] = np.full((self.grid, self.grid), -LOGIT, np.float32)
            if label:
                top, left, cells = self._cells(label)
                self._maps[label][top:top + cells.shape[0], left:left + cells.shape[1]] = cells
        return self._maps[label]

    def _cells(self, label: int) -> tuple[int, int, np.ndarray]:
        """(top, left, logits over the object's bounding box of cells)."""
        assert self._labels is not None and self._ramp is not None and self._stats is not None, "embed() first"
        if label not in self._local:
            left, top, width, height = (int(v) for v in self._stats[label, :4])
            rows, cols = slice(top, top + height), slice(left, left + width)
            self._local[label] = (top, left, np.where(self._labels[rows, cols] == label, self._ramp[rows, cols],
                                                      -LOGIT).astype(np.float32))
        return self._local[label]

    def _area(self, label: int) -> int:
        return int(np.count_nonzero(self._cells(label)[2] > 0)) if label else 0

    def _window(self, label: int, cells: np.ndarray, channels: int) -> np.ndarray:
        """(channels, rows, cols) logits of grid cells (top, left, bottom, right)."""
        top, left, bottom, right = (int(v) for v in cells)
        out = np.full((channels, bottom - top, right - left), -LOGIT, np.float32)
        if label:
            otop, oleft, values = self._cells(label)
            r0, r1 = max(top, otop), min(bottom, otop + values.shape[0])
            c0, c1 = max(left, oleft), min(right, oleft + values.shape[1])
            if r0 < r1 and c0 < c1:
                out[:, r0 - top:r1 - top, c0 - left:c1 - left] = values[r0 - otop:r1 - otop, c0 - oleft:c1 - oleft]
        return out

    def decode(self, boxes: np.ndarray | None, mask_inputs: np.ndarray | None = None,
               multimask: bool = False, *, points: np.ndarray | None = None,
               point_labels: np.ndarray | None = None, windows: np.ndarray | None = None,
               areas: bool = False) -> Decoded:
        """Box prompts as above; a point prompt gets the object under its first point (the same
        mask for each of the three with ``multimask``)."""
        assert self._labels is not None and self._ramp is not None, "embed() first"
        if boxes is None:
            assert points is not None, "boxes or points"
            first = np.asarray(points, dtype=np.float64)[:, 0]
            boxes = np.concatenate([first - 0.5, first + 0.5], axis=1)
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        self.decode_calls += 1
        self.prompts += len(boxes)
        if self.decode_seconds_per_box > 0:
            time.sleep(self.decode_seconds_per_box * len(boxes))
        height, width = self._hw
        grid = self.grid
        channels = 3 if multimask else 1
        labels = []
        scaled = boxes * np.array([grid / width, grid / height] * 2)
        for x0, y0, x1, y1 in scaled.tolist():  # Python floats: scalar numpy calls cost more than the work
            c0, r0 = min(max(math.floor(x0), 0), grid - 1), min(max(math.floor(y0), 0), grid - 1)
            c1, r1 = min(max(math.ceil(x1), c0 + 1), grid), min(max(math.ceil(y1), r0 + 1), grid)
            counts = np.bincount(self._labels[r0:r1, c0:c1].ravel())
            counts[0] = 0
            labels.append(int(np.argmax(counts)) if counts.max(initial=0) > 0 else 0)
        scores = np.ones((len(boxes), channels), dtype=np.float32)
        counts = (np.array([[self._area(label)] * channels for label in labels], np.int64).reshape(-1, channels)
                  if areas else None)
        if windows is None:
            out = np.full((len(boxes), channels, grid, grid), -LOGIT, dtype=np.float32)
            for k, label in enumerate(labels):
                out[k, :] = self._map(label)
            return Decoded(out, scores, areas=counts)
        cells = cells_for_windows(windows, (grid, grid), (height, width))
        patches = tuple(self._window(label, c, channels) for label, c in zip(labels, cells, strict=True))
        return Decoded(patches, scores, cells, (grid, grid), counts)
