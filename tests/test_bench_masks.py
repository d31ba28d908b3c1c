"""The speed benchmark's mask oracle: realistic masks in place of random-weight noise.

The benchmark's fairness rests on it: every variant must get the object under its box, on the
grid of the region that was embedded, so that all of them trace real outlines.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from realistic_masks import GRID, MaskOracle, RealisticBoxPredictor  # noqa: E402

from sam2_refine.model.logits import upsample_window  # noqa: E402
from sam2_refine.model.predictor import Decoded  # noqa: E402


def two_disks(height: int = 600, width: int = 800) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) float image in [0, 1] with two bright disks, and their (H, W) int labels."""
    labels = np.zeros((height, width), dtype=np.uint8)
    cv2.circle(labels, (200, 150), 60, 1, -1)
    cv2.circle(labels, (600, 400), 90, 2, -1)
    image = np.repeat(np.where(labels > 0, 0.9, 0.05)[..., None], 3, axis=2).astype(np.float32)
    return image, labels


def full_mask(logits: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return upsample_window(logits, hw, (0, hw[0]), (0, hw[1])) > 0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return np.count_nonzero(a & b) / np.count_nonzero(a | b)


def test_each_box_gets_the_object_under_it_and_nothing_else() -> None:
    image, labels = two_disks()
    oracle = MaskOracle()
    oracle.prepare(image)
    boxes = np.array([[140, 90, 260, 210], [510, 310, 690, 490], [20, 500, 80, 580]], dtype=float)
    logits = oracle.logits(boxes)
    assert logits.shape == (3, 1, GRID, GRID) and logits.dtype == np.float32
    assert iou(full_mask(logits[0, 0], labels.shape), labels == 1) > 0.95
    assert iou(full_mask(logits[1, 0], labels.shape), labels == 2) > 0.95
    assert not full_mask(logits[2, 0], labels.shape).any()  # an empty box: an empty mask
    assert oracle.seconds > 0


def test_boxes_are_read_in_the_region_when_the_image_was_shrunk() -> None:
    image, labels = two_disks()
    small = cv2.resize(image, (400, 300), interpolation=cv2.INTER_AREA)
    oracle = MaskOracle()
    oracle.prepare(small, region_hw=(600, 800))  # boxes stay in the region's pixels
    logits = oracle.logits(np.array([[510, 310, 690, 490]], dtype=float))
    assert iou(full_mask(logits[0, 0], labels.shape), labels == 2) > 0.95


class CountingPredictor:
    """Records the model calls; answers with noise, as random weights do."""

    max_batch = 8

    def __init__(self) -> None:
        self.calls: list[str] = []

    def embed(self, image: np.ndarray, region_hw: tuple[int, int] | None = None) -> None:
        self.calls.append("embed")

    def decode(self, boxes: np.ndarray, mask_inputs: np.ndarray | None = None, multimask: bool = False) -> Decoded:
        self.calls.append("decode")
        channels = 3 if multimask else 1
        rng = np.random.default_rng(0)
        return Decoded(rng.normal(size=(len(boxes), channels, GRID, GRID)).astype(np.float32),
                       np.full((len(boxes), channels), 0.5, dtype=np.float32))


def test_the_model_still_runs_and_its_scores_are_kept() -> None:
    image, labels = two_disks()
    model = CountingPredictor()
    predictor = RealisticBoxPredictor(model, MaskOracle())
    predictor.embed(image)
    decoded = predictor.decode(np.array([[140, 90, 260, 210]], dtype=float), multimask=True)
    assert model.calls == ["embed", "decode"]
    assert predictor.max_batch == 8
    assert decoded.logits.shape == (1, 3, GRID, GRID) and decoded.scores.tolist() == [[0.5, 0.5, 0.5]]
    assert iou(full_mask(decoded.logits[0, 2], labels.shape), labels == 1) > 0.95


def test_point_prompts_get_the_object_under_the_point() -> None:
    image, labels = two_disks()

    class PointCounting(CountingPredictor):
        def decode(self, boxes, mask_inputs=None, multimask=False, *, points=None, point_labels=None):
            self.calls.append("decode points" if boxes is None else "decode")
            n = len(points) if boxes is None else len(boxes)
            channels = 3 if multimask else 1
            return Decoded(np.zeros((n, channels, GRID, GRID), np.float32), np.full((n, channels), 0.5, np.float32))

    model = PointCounting()
    predictor = RealisticBoxPredictor(model, MaskOracle())
    predictor.embed(image)
    decoded = predictor.decode(None, multimask=True, points=np.array([[[200.0, 150.0]]]), point_labels=np.ones((1, 1)))
    assert model.calls == ["embed", "decode points"]
    assert decoded.logits.shape == (1, 3, GRID, GRID)
    assert iou(full_mask(decoded.logits[0, 1], labels.shape), labels == 1) > 0.95
