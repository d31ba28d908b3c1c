"""Issue 23, item 6: the demo's pictures tell the story (counts and mean IoU on each panel,
outlines visible at 1:1, kept ones told apart from refined ones, an untrained run labelled by what
it is). Fast: the drawing alone, on a synthetic image; the whole demo runs in test_cli_e2e."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from sam2_refine import demo
from sam2_refine.testing.checkpoints import write_layout_checkpoint


def square(x: float, y: float, side: float = 40) -> dict:
    return {"coordinates": [{"x": x, "y": y}, {"x": x + side, "y": y}, {"x": x + side, "y": y + side},
                            {"x": x, "y": y + side}]}


def draw(tmp_path: Path) -> np.ndarray:
    rgb = np.zeros((200, 240, 3), np.float32)
    rgb[..., 0] = rgb[..., 2] = 0.8  # bright magenta, like the example's nuclei
    before = [square(20, 20), square(120, 100)]
    path = tmp_path / "overlay.png"
    demo.write_overlay(path, rgb, before, refined=[square(20, 20)], kept=[square(120, 100)], title="a title",
                       untrained=False, counts={"mean_iou_to_truth_before": 0.714, "mean_iou_to_truth_after": 0.988})
    image = cv2.imread(str(path))
    assert image is not None
    return image


def test_panels_carry_captions_and_are_1_to_1(tmp_path):
    image = draw(tmp_path)
    bar, caption = 34, 12 + 22 * 3
    assert image.shape == (bar + caption + 200, 2 * 240 + 8, 3)  # the image itself at 1:1, unscaled
    strip = image[bar:bar + caption, :240]
    assert (strip == 32).mean() > 0.8 and (strip != 32).any()  # a caption strip with text on it
    right_strip = image[bar:bar + caption, 248:]
    for colour in (demo.REFINED, demo.ORIGINAL):  # the counts' lines, in the outlines' own colours
        assert (np.abs(right_strip.astype(int) - colour).sum(axis=2) < 60).any()


def test_outlines_are_wide_with_a_halo_and_kept_ones_dashed(tmp_path):
    image = draw(tmp_path)
    top = 34 + 12 + 22 * 3
    left, right = image[top:, :240], image[top:, 248:]

    def along(panel: np.ndarray, y: int, x0: int, x1: int, colour) -> np.ndarray:
        """Whether each pixel of row y (between x0 and x1) is the colour."""
        return np.abs(panel[y, x0:x1].astype(int) - colour).sum(axis=1) < 60

    # the top edge of the first square (y = 20): 2 px of colour over a dark halo, solid
    band = [along(left, y, 25, 55, demo.ORIGINAL).mean() for y in range(17, 24)]
    assert sum(b > 0.9 for b in band) >= 2
    column = left[14:20, 30].astype(int).sum(axis=1)  # from the magenta outside to the line: a dark rim
    assert column[0] > 350 and column.min() < 150
    assert along(right, 20, 25, 55, demo.REFINED).mean() > 0.9  # refined: green, solid
    # the kept square's top edge (y = 100): yellow, dashed (gaps of the background between)
    hits = np.max([along(right, y, 125, 155, demo.ORIGINAL) for y in range(98, 103)], axis=0)
    assert 0.3 < hits.mean() < 0.9


def test_an_untrained_run_is_labelled_by_what_it_is(tmp_path):
    directory = tmp_path / "ckpt"
    write_layout_checkpoint(directory / "sam2.1_hiera_tiny.pt")
    title = demo.overlay_title(directory, "sam2.1_hiera_tiny.pt", untrained=True)
    assert title.startswith("UNTRAINED SAM2.1 tiny (random weights") and "meaningless" in title
    assert "sam2.1_hiera_tiny.pt" not in title  # Meta's file name is not what ran
    trained = demo.overlay_title(directory, "sam2.1_hiera_tiny.pt", untrained=False)
    assert "SAM2.1 tiny" in trained and "sam2.1_hiera_tiny.pt" in trained


def test_dashes_follow_the_ring():
    ring = np.array([[0.0, 0.0], [20.0, 0.0], [20.0, 20.0], [0.0, 20.0]])
    dashes = demo._dashes(ring, on=6.0, off=4.0)
    drawn = sum(float(np.hypot(*(b - a))) for a, b in dashes)
    assert abs(drawn - 80 * 0.6) < 6.1  # 6 of every 10 pixels of the 80 px ring
    assert all(float(np.hypot(*(b - a))) <= 6.0 + 1e-9 for a, b in dashes)
