"""What the engine needs from a segmentation model: embed an image, decode box and point prompts.

The real implementation is :class:`sam2_refine.sam2_model.Sam2BoxPredictor`; tests use stand-ins
(:mod:`sam2_refine.testing.stand_in`) that satisfy the same protocol. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Decoded:
    """The model's answer to N prompts on the embedded image.

    Attributes:
        logits: float32 (N, C, h, w) mask logits on a grid that covers the whole embedded image
            (stretched: grid row i spans image rows [i*H/h, (i+1)*H/h)). Positive = object.
            Upsampling to the image is bilinear with ``align_corners=False``
            (:func:`sam2_refine.logits.upsample_window`).
        scores: float32 (N, C) the model's own quality estimate of each mask.
    """

    logits: np.ndarray
    scores: np.ndarray


class BoxPredictor(Protocol):
    """A promptable segmenter holding one embedded image at a time (not thread-safe)."""

    #: Short description for messages, e.g. ``"SAM2.1 tiny (cpu, float32)"``.
    description: str
    #: The most prompts :meth:`decode` should be given in one call (bounds memory).
    max_batch: int
    #: (h, w) of the mask logits :meth:`decode` accepts as ``mask_inputs`` (SAM2: 256 x 256).
    mask_input_size: tuple[int, int]

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
               point_labels: np.ndarray | None = None) -> Decoded:
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
        """
