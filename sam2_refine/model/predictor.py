"""What the engine needs from a segmentation model: embed an image, decode box and point prompts.

The real implementation is :class:`sam2_refine.model.sam2_model.Sam2BoxPredictor`; tests use stand-ins
(:mod:`sam2_refine.testing.stand_in`) that satisfy the same protocol. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from sam2_refine.model.logits import GridPatch, cells_for_windows, crop_to_cells


@dataclass(frozen=True)
class Decoded:
    """The model's answer to N prompts on the embedded image.

    Attributes:
        logits: float32 (N, C, h, w) mask logits on a grid that covers the whole embedded image
            (stretched: grid row i spans image rows [i*H/h, (i+1)*H/h)). Positive = object.
            Upsampling to the image is bilinear with ``align_corners=False``
            (:func:`sam2_refine.model.logits.upsample_window`). When ``windows`` is set: N arrays
            (C, rows_k, cols_k), prompt k's logits in its window of the grid only.
        scores: float32 (N, C) the model's own quality estimate of each mask.
        windows: None (the logits cover the whole grid), or int (N, 4) ``(top, left, bottom,
            right)`` grid cells (half-open) that prompt k's logits cover.
        grid_hw: (h, w) of the whole grid; None: ``logits.shape[-2:]`` (whole-grid logits).
        areas: None, or int (N, C): each mask's cells with logit > 0 over the whole grid (asked
            for with ``decode(..., areas=True)``; what windowed logits alone cannot tell).
    """

    logits: np.ndarray | tuple[np.ndarray, ...]
    scores: np.ndarray
    windows: np.ndarray | None = None
    grid_hw: tuple[int, int] | None = None
    areas: np.ndarray | None = None

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) of the whole logit grid."""
        if self.grid_hw is not None:
            return self.grid_hw
        shape = np.shape(self.logits)
        return int(shape[-2]), int(shape[-1])

    def mask(self, k: int, c: int) -> GridPatch:
        """Prompt ``k``'s mask ``c``: its logits and where they lie on the grid."""
        if self.windows is None:
            return GridPatch(self.logits[k][c], 0, 0, self.grid_size)
        top, left = (int(v) for v in self.windows[k][:2])
        return GridPatch(self.logits[k][c], top, left, self.grid_size)

    def positive_areas(self, k: int) -> np.ndarray:
        """int (C,): prompt ``k``'s masks' cells with logit > 0 over the whole grid."""
        if self.areas is not None:
            return np.asarray(self.areas[k])
        if self.windows is not None:
            raise ValueError("windowed logits without areas: decode with areas=True")
        return np.count_nonzero(np.asarray(self.logits[k]) > 0, axis=(1, 2))


class BoxPredictor(Protocol):
    """A promptable segmenter holding one embedded image at a time (not thread-safe)."""

    #: Short description for messages, e.g. ``"SAM2.1 tiny (cpu, float32)"``.
    description: str
    #: The most prompts :meth:`decode` should be given in one call (bounds memory).
    max_batch: int
    #: (h, w) of the mask logits :meth:`decode` accepts as ``mask_inputs`` (SAM2: 256 x 256).
    mask_input_size: tuple[int, int]

    #: Optional: (h, w) of the logit grid :meth:`decode` returns, when it does not depend on the
    #: image (SAM2: 256 x 256). Only predictors that have it are asked for ``windows``.
    #: logit_grid: tuple[int, int]

    #: Optional: ``"cuda"`` or ``"cpu"``, where the model runs (absent: the CPU). It decides how
    #: many processes the job gives the outline work by default (:mod:`sam2_refine.engine.outline_pool`).
    #: device: str

    #: Side of the square the model resizes every image to (SAM2: 1024), or None when the
    #: predictor needs the image at full resolution. With a size, the engine may hand over a
    #: region already shrunk to it (cheaper to merge), with the region's size in ``region_hw``.
    input_size: int | None

    def embed(self, image: np.ndarray, region_hw: tuple[int, int] | None = None) -> None:
        """Compute and keep the embedding of ``image``: (H, W, 3) float32 RGB in [0, 1].

        ``region_hw`` (only for predictors with an ``input_size``): the (H, W) of the frame region
        ``image`` shows, shrunk to ``input_size``; boxes passed to :meth:`decode` are in the
        region's pixels, and the logit grid covers the region."""

    def decode(self, boxes: np.ndarray | None, mask_inputs: np.ndarray | None = None,
               multimask: bool = False, *, points: np.ndarray | None = None,
               point_labels: np.ndarray | None = None, windows: np.ndarray | None = None,
               areas: bool = False) -> Decoded:
        """Masks for box and/or point prompts on the embedded image.

        Args:
            boxes: float (N, 4) boxes (x0, y0, x1, y1) in the embedded image's pixel coordinates
                (x = column, y = row, pixel centres at integers), or None for point prompts only.
            mask_inputs: Optional float32 (N, 1, h, w) mask logits (``mask_input_size``) over the
                embedded image, given as an extra prompt.
            multimask: Ask for three masks per prompt instead of one.
            points: Optional float (N, P, 2) points (x, y) in the same pixel coordinates as
                ``boxes``; every prompt of one call has P points (pad with label -1).
            point_labels: int (N, P) with ``points``: 1 = on the object (positive), 0 = not on
                it (negative), -1 = padding (ignored).
            windows: Optional int (N, 4) ``(top, left, bottom, right)`` pixels of the embedded
                image (half-open): the caller needs prompt k's logits only to upsample these
                pixels. The answer may then hold only the grid cells they need
                (:func:`sam2_refine.model.logits.cells_for_windows`; ``Decoded.windows``), and must
                not depend on the windows otherwise. Only given to predictors with ``logit_grid``.
            areas: Also give each mask's positive area over the whole grid (``Decoded.areas``).
        """


def from_whole_grid(logits: np.ndarray, scores: np.ndarray, region_hw: tuple[int, int], *,
                    windows: np.ndarray | None = None, areas: bool = False) -> Decoded:
    """The answer to :meth:`BoxPredictor.decode` from whole-grid logits (N, C, h, w): cut to the
    cells each window needs when ``windows`` are given, with whole-grid areas when asked."""
    counts = np.count_nonzero(logits > 0, axis=(2, 3)) if areas else None
    if windows is None:
        return Decoded(logits, scores, areas=counts)
    grid_hw = (int(logits.shape[2]), int(logits.shape[3]))
    cells = cells_for_windows(windows, grid_hw, region_hw)
    return Decoded(crop_to_cells(logits, cells), scores, cells, grid_hw, counts)
