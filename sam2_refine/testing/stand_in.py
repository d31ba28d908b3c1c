"""Stand-in predictors with known answers, for geometry, accuracy and load tests.

They satisfy :class:`sam2_refine.predictor.BoxPredictor`, so the engine runs them exactly as it
runs SAM2.

- :class:`KnownMaskPredictor` returns, for each box, the bright object of the embedded image
  that fills most of the box: the "known mask", at full resolution (or on a coarse grid, like
  SAM2's 256x256 logits).
- :class:`ModelResolutionPredictor` segments like a model that sees only its 1024x1024 input:
  it thresholds the image after resizing it to the model input, so objects only a few pixels
  wide in a large frame come out coarse or lost.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import cv2
import numpy as np

from sam2_refine.predictor import Decoded

#: Logit magnitude of a known mask: inside +LOGIT, outside -LOGIT.
LOGIT = 8.0


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


def _to_grid(mask: np.ndarray, grid: tuple[int, int] | None) -> np.ndarray:
    if grid is None:
        return np.where(mask, LOGIT, -LOGIT).astype(np.float32)
    frac = cv2.resize(mask.astype(np.float32), (grid[1], grid[0]), interpolation=cv2.INTER_AREA)
    return ((frac - 0.5) * 2.0 * LOGIT).astype(np.float32)


class KnownMaskPredictor:
    """Each box gets the connected bright object that covers most of it.

    Args:
        threshold: An object is where the image's brightest band exceeds this.
        grid: (h, w) of the logit grid, or None for full resolution (grid = image).
        max_batch: Prompts per decode call.
        labels: (H, W) int label image to answer from instead of thresholding the image (the
            ground truth of a synthetic scene).
    """

    description = "known-mask stand-in"
    mask_input_size = (256, 256)
    input_size = None

    def __init__(self, threshold: float = 0.5, grid: tuple[int, int] | None = None, max_batch: int = 16,
                 labels: np.ndarray | None = None) -> None:
        self.threshold = threshold
        self.truth = labels
        self.grid = grid
        self.max_batch = max_batch
        self.embed_calls = 0
        self.decode_calls = 0
        self.prompts = 0
        self._labels: np.ndarray | None = None

    def embed(self, image: np.ndarray) -> None:
        self.embed_calls += 1
        self._labels = self.truth if self.truth is not None else _labels(image, self.threshold)

    def decode(self, boxes: np.ndarray, mask_inputs: np.ndarray | None = None,
               multimask: bool = False) -> Decoded:
        assert self._labels is not None, "embed() first"
        self.decode_calls += 1
        self.prompts += len(boxes)
        height, width = self._labels.shape
        out = []
        for box in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
            rows, cols = _box_slices(box, height, width)
            counts = np.bincount(self._labels[rows, cols].ravel())
            counts[0] = 0
            label = int(np.argmax(counts)) if counts.size > 1 and counts.max() > 0 else 0
            mask = (self._labels == label) if label else np.zeros((height, width), dtype=bool)
            out.append(_to_grid(mask, self.grid))
        logits = np.stack(out)[:, None]
        channels = 3 if multimask else 1
        logits = np.repeat(logits, channels, axis=1)
        return Decoded(logits, np.ones((len(out), channels), dtype=np.float32))


class ModelResolutionPredictor:
    """Segments at the model's input resolution, as SAM2 effectively does on a whole frame.

    The embedded image is resized (area averaging) to ``input_size`` x ``input_size``; objects
    are thresholded there (the brightest band, or band ``band`` of the RGB image), and each box
    gets the object covering most of it, as logits on a ``grid`` x ``grid`` map (SAM2: 256),
    upsampled back by the engine.
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
        self._labels: np.ndarray | None = None
        self._hw: tuple[int, int] = (0, 0)

    def embed(self, image: np.ndarray, region_hw: tuple[int, int] | None = None) -> None:
        self._hw = region_hw or image.shape[:2]
        small = cv2.resize(image, (self.input_size, self.input_size), interpolation=cv2.INTER_AREA)
        self._labels = _labels(small, self.threshold, self.band)

    def decode(self, boxes: np.ndarray, mask_inputs: np.ndarray | None = None,
               multimask: bool = False) -> Decoded:
        assert self._labels is not None, "embed() first"
        height, width = self._hw
        scale = np.array([self.input_size / width, self.input_size / height] * 2)
        out = []
        for box in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
            model_box = (box + 0.5) * scale - 0.5
            rows, cols = _box_slices(model_box, self.input_size, self.input_size)
            counts = np.bincount(self._labels[rows, cols].ravel())
            counts[0] = 0
            label = int(np.argmax(counts)) if counts.size > 1 and counts.max() > 0 else 0
            mask = (self._labels == label) if label else np.zeros(self._labels.shape, dtype=bool)
            out.append(_to_grid(mask, (self.grid, self.grid)))
        logits = np.stack(out)[:, None]
        channels = 3 if multimask else 1
        return Decoded(np.repeat(logits, channels, axis=1), np.ones((len(out), channels), dtype=np.float32))


class ZeroCostPredictor:
    """Valid masks at (almost) no cost: the model's part of a job on a GPU, without a GPU.

    :meth:`embed` reduces the embedded region to the ``grid`` x ``grid`` logit grid (area
    averaging of its brightest band), thresholds and labels it once; :meth:`decode` gives each
    box the labelled object covering most of it, as logits ``(fraction - 0.5) * 2 * LOGIT`` (a
    ramp across the boundary, like a trained model's), ``-LOGIT`` elsewhere: one cached
    (grid, grid) map per object, copied per prompt. Like SAM2 it takes regions already shrunk to
    ``input_size`` (``region_hw``), so the engine prepares its input exactly as for SAM2.

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
        self.max_batch = max_batch
        self.embed_calls = self.decode_calls = self.prompts = 0
        self._hw = (0, 0)
        self._labels: np.ndarray | None = None  # (grid, grid) int32, 0 = background
        self._ramp: np.ndarray | None = None  # (grid, grid) float32 logits where an object is
        self._maps: dict[int, np.ndarray] = {}

    def embed(self, image: np.ndarray, region_hw: tuple[int, int] | None = None) -> None:
        pause = self.embed_seconds[self.embed_calls % len(self.embed_seconds)] if self.embed_seconds else 0.0
        self.embed_calls += 1
        if pause > 0:
            time.sleep(pause)
        self._hw = tuple(region_hw or image.shape[:2])
        bright = (np.asarray(image).max(axis=2) > self.threshold).astype(np.float32)
        fraction = cv2.resize(bright, (self.grid, self.grid), interpolation=cv2.INTER_AREA)
        _, self._labels = cv2.connectedComponents((fraction >= 0.5).astype(np.uint8), connectivity=4)
        self._ramp = ((fraction - 0.5) * (2.0 * LOGIT)).astype(np.float32)
        self._maps = {}

    def decode(self, boxes: np.ndarray, mask_inputs: np.ndarray | None = None,
               multimask: bool = False) -> Decoded:
        assert self._labels is not None and self._ramp is not None, "embed() first"
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        self.decode_calls += 1
        self.prompts += len(boxes)
        if self.decode_seconds_per_box > 0:
            time.sleep(self.decode_seconds_per_box * len(boxes))
        height, width = self._hw
        grid = self.grid
        channels = 3 if multimask else 1
        out = np.full((len(boxes), channels, grid, grid), -LOGIT, dtype=np.float32)
        scaled = boxes * np.array([grid / width, grid / height] * 2)
        for k, (x0, y0, x1, y1) in enumerate(scaled):
            c0, r0 = int(np.clip(np.floor(x0), 0, grid - 1)), int(np.clip(np.floor(y0), 0, grid - 1))
            c1, r1 = int(np.clip(np.ceil(x1), c0 + 1, grid)), int(np.clip(np.ceil(y1), r0 + 1, grid))
            counts = np.bincount(self._labels[r0:r1, c0:c1].ravel())
            counts[0] = 0
            if counts.max(initial=0) == 0:
                continue
            label = int(np.argmax(counts))
            if label not in self._maps:
                self._maps[label] = np.where(self._labels == label, self._ramp, -LOGIT).astype(np.float32)
            out[k, :] = self._maps[label]
        return Decoded(out, np.ones((len(boxes), channels), dtype=np.float32))
