"""Real model cost, realistic masks: what the speed benchmark's variants decode with.

With random weights SAM2's masks are noise: the engine rejects nearly all of them (empty, far too
large, not touching the original) and so never traces, simplifies or uploads them, while the
per-box loop traces whatever comes back. Timing that would flatter the engine. Here every
variant still runs the real model (its full cost: encoder, decoder, SAM2's own upsampling in
the per-box loop), but the low-resolution logits the decoder returns are replaced by those of
the bright object under each box, as a trained model would give them on these synthetic
scenes (bright disks on a dark background).

:class:`MaskOracle` computes them from the image that was embedded: the image is thresholded,
reduced to the decoder's 256 x 256 logit grid by area averaging (so the grid covers the
embedded region, whole frame or crop, exactly as SAM2's does) and labelled once per embedding;
each box then gets the labelled object covering most of it as logits ``(fraction - 0.5) * 2 *
LOGIT`` (a smooth ramp across the boundary). The time this takes is added up in
``MaskOracle.seconds`` so that the benchmark can take it off every variant's time.
"""

from __future__ import annotations

import time
from typing import Any

import cv2
import numpy as np

from sam2_refine.model.predictor import from_whole_grid

LOGIT = 8.0
GRID = 256


class MaskOracle:
    """Low-resolution logits of the bright object under a box, for the last embedded image."""

    def __init__(self, threshold: float = 0.5, grid: int = GRID) -> None:
        self.threshold = threshold
        self.grid = grid
        self.seconds = 0.0
        self._fraction: np.ndarray | None = None  # (grid, grid) float32: object share of each cell
        self._labels: np.ndarray | None = None  # (grid, grid) int32: connected objects, 0 = none
        self._hw = (0, 0)

    @property
    def region_hw(self) -> tuple[int, int]:
        """(H, W) of the region the last embedded image shows."""
        return self._hw

    def prepare(self, image: np.ndarray, region_hw: tuple[int, int] | None = None) -> None:
        """Take the embedded (H, W, 3) float image in [0, 1]; ``region_hw``: the size of the
        region it shows when it was shrunk (boxes are then in the region's pixels)."""
        started = time.perf_counter()
        self._hw = tuple(region_hw or image.shape[:2])
        bright = (image.mean(axis=2) > self.threshold).astype(np.float32)
        self._fraction = cv2.resize(bright, (self.grid, self.grid), interpolation=cv2.INTER_AREA)
        _, self._labels = cv2.connectedComponents((self._fraction >= 0.5).astype(np.uint8), connectivity=4)
        self.seconds += time.perf_counter() - started

    def logits(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 1, grid, grid) float32 logits for (N, 4) boxes (x0, y0, x1, y1 in region pixels)."""
        assert self._fraction is not None and self._labels is not None, "prepare() first"
        started = time.perf_counter()
        height, width = self._hw
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scaled = boxes * np.array([self.grid / width, self.grid / height] * 2)
        out = np.empty((len(boxes), 1, self.grid, self.grid), dtype=np.float32)
        ramp = (self._fraction - 0.5) * (2.0 * LOGIT)
        for k, (x0, y0, x1, y1) in enumerate(scaled):
            c0, r0 = int(np.clip(np.floor(x0), 0, self.grid - 1)), int(np.clip(np.floor(y0), 0, self.grid - 1))
            c1, r1 = int(np.clip(np.ceil(x1), c0 + 1, self.grid)), int(np.clip(np.ceil(y1), r0 + 1, self.grid))
            counts = np.bincount(self._labels[r0:r1, c0:c1].ravel())
            counts[0] = 0
            if counts.max(initial=0) == 0:
                out[k, 0] = -LOGIT
                continue
            out[k, 0] = np.where(self._labels == int(np.argmax(counts)), ramp, -LOGIT)
        self.seconds += time.perf_counter() - started
        return out


class RealisticBoxPredictor:
    """A :class:`~sam2_refine.model.predictor.BoxPredictor` (variants b and c) that runs the real model
    and returns the oracle's logits in place of the model's."""

    def __init__(self, predictor: Any, oracle: MaskOracle) -> None:
        self.predictor = predictor
        self.oracle = oracle

    def __getattr__(self, name: str) -> Any:
        return getattr(self.predictor, name)

    def embed(self, image: np.ndarray, region_hw: tuple[int, int] | None = None) -> None:
        self.predictor.embed(image, region_hw)
        self.oracle.prepare(image, region_hw)

    def decode(self, boxes: np.ndarray | None, mask_inputs: np.ndarray | None = None, multimask: bool = False, *,
               points: np.ndarray | None = None, point_labels: np.ndarray | None = None,
               windows: np.ndarray | None = None, areas: bool = False):
        """The real model's decoding of the prompts (windowed when asked, so that it pays for
        what the engine asks); the logits of the object under each box (or under each prompt's
        first point: a one-pixel box there) in place of the model's."""
        kwargs = {key: value for key, value in (("windows", windows), ("areas", areas)) if value is not None
                  and value is not False}
        if boxes is None:
            decoded = self.predictor.decode(None, mask_inputs, multimask, points=points, point_labels=point_labels,
                                            **kwargs)
            first = np.asarray(points, dtype=np.float64)[:, 0]
            logits = self.oracle.logits(np.concatenate([first - 0.5, first + 0.5], axis=1))
        else:
            decoded = self.predictor.decode(boxes, mask_inputs, multimask, **kwargs)
            logits = self.oracle.logits(boxes)
        channels = decoded.scores.shape[1]
        logits = np.repeat(logits, channels, axis=1) if channels > 1 else logits
        return from_whole_grid(logits, decoded.scores, self.oracle.region_hw, windows=windows, areas=areas)


class RealisticImagePredictor:
    """sam2's ``SAM2ImagePredictor`` for the per-box loop (variant a), whose mask decoder's
    low-resolution output is replaced by the oracle's before sam2 upsamples it to the full frame.

    Only ``set_image`` and ``predict(box=...)`` are offered: what the per-box loop calls.
    """

    def __init__(self, image_predictor: Any, oracle: MaskOracle) -> None:
        self.image_predictor = image_predictor
        self.oracle = oracle
        self._box: np.ndarray | None = None
        decoder = image_predictor.model.sam_mask_decoder
        self._hook = decoder.register_forward_hook(self._replace_masks)

    def close(self) -> None:
        """Remove the hook from the model's mask decoder (the model is shared with b and c)."""
        self._hook.remove()

    def set_image(self, image: np.ndarray) -> None:
        self.image_predictor.set_image(image)
        self.oracle.prepare(image)

    def predict(self, *, box: np.ndarray, **kwargs: Any):
        self._box = np.asarray(box, dtype=np.float64).reshape(1, 4)
        try:
            return self.image_predictor.predict(box=box, **kwargs)
        finally:
            self._box = None

    def _replace_masks(self, module: Any, args: Any, output: Any) -> Any:
        if self._box is None:
            return output
        import torch

        masks = output[0]
        truth = torch.from_numpy(self.oracle.logits(self._box)).to(device=masks.device, dtype=masks.dtype)
        return (truth.expand_as(masks).contiguous(), *output[1:])
