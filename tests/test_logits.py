"""upsample_window equals F.interpolate(bilinear, align_corners=False), cropped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sam2_refine.model.logits import upsample_window


def reference(grid: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    tensor = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))[None, None]
    return F.interpolate(tensor, size=out_hw, mode="bilinear", align_corners=False)[0, 0].numpy()


def grid_of(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Logit-like values: smooth structure plus noise, range about +-20.
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = 15 * np.sin(yy / 9.0) * np.cos(xx / 13.0)
    return (smooth + rng.normal(0, 3, size=(h, w))).astype(np.float32)


def windows(out_h: int, out_w: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    return [
        ((0, out_h), (0, out_w)),  # everything
        ((0, 1), (0, 1)),  # top-left pixel
        ((out_h - 1, out_h), (out_w - 1, out_w)),  # bottom-right pixel
        ((0, 7), (out_w - 13, out_w)),  # top-right corner, odd sizes
        ((out_h - 9, out_h), (0, 11)),  # bottom-left corner
        ((out_h // 3, out_h // 3 + 17), (out_w // 2 - 5, out_w // 2 + 26)),  # interior, odd
        ((1, out_h - 1), (3, 4)),  # a one-column strip
        ((out_h // 2, out_h // 2 + 1), (0, out_w)),  # a one-row strip
    ]


@pytest.mark.parametrize(
    ("grid_hw", "out_hw"),
    [
        ((256, 256), (1000, 1377)),  # upsampling, non-square output
        ((256, 256), (200, 150)),  # downsampling
        ((256, 256), (256, 256)),  # identity
        ((64, 64), (256, 256)),  # coarse grid
        ((37, 53), (101, 67)),  # odd sizes, up on one axis, down on the other
        ((256, 256), (1024, 1024)),
        ((1, 1), (5, 3)),
    ],
)
def test_matches_torch_interpolate(grid_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
    grid = grid_of(*grid_hw)
    full = reference(grid, out_hw)
    assert full.shape == out_hw
    for rows, cols in windows(*out_hw):
        if not (0 <= rows[0] < rows[1] <= out_hw[0] and 0 <= cols[0] < cols[1] <= out_hw[1]):
            continue
        got = upsample_window(grid, out_hw, rows, cols)
        assert got.dtype == np.float32
        expected = full[rows[0]:rows[1], cols[0]:cols[1]]
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0, err_msg=f"rows {rows} cols {cols}")


def test_identity_is_exact_copy() -> None:
    grid = grid_of(256, 256, seed=3)
    got = upsample_window(grid, (256, 256), (10, 50), (200, 256))
    np.testing.assert_allclose(got, grid[10:50, 200:256], atol=1e-5)


def test_random_windows_against_torch() -> None:
    rng = np.random.default_rng(7)
    grid = grid_of(256, 256, seed=7)
    out_hw = (613, 877)
    full = reference(grid, out_hw)
    for _ in range(30):
        r0 = int(rng.integers(0, out_hw[0]))
        r1 = int(rng.integers(r0 + 1, out_hw[0] + 1))
        c0 = int(rng.integers(0, out_hw[1]))
        c1 = int(rng.integers(c0 + 1, out_hw[1] + 1))
        got = upsample_window(grid, out_hw, (r0, r1), (c0, c1))
        np.testing.assert_allclose(got, full[r0:r1, c0:c1], atol=1e-3, rtol=0)


def test_float64_input_accepted() -> None:
    grid = grid_of(40, 30).astype(np.float64)
    got = upsample_window(grid, (80, 45), (0, 80), (0, 45))
    np.testing.assert_allclose(got, reference(grid, (80, 45)), atol=1e-3)


@pytest.mark.parametrize(
    ("rows", "cols"),
    [
        ((0, 101), (0, 10)),  # past the bottom
        ((0, 10), (0, 151)),  # past the right
        ((-1, 5), (0, 10)),  # before the top
        ((0, 5), (-3, 10)),  # before the left
        ((5, 5), (0, 10)),  # empty rows
        ((0, 5), (9, 9)),  # empty columns
        ((6, 5), (0, 10)),  # reversed
        ((100, 101), (0, 10)),  # entirely below
    ],
)
def test_windows_outside_raise(rows: tuple[int, int], cols: tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        upsample_window(grid_of(64, 64), (100, 150), rows, cols)


# -- windows of the grid ---------------------------------------------------------------------------

def test_grid_window_is_exactly_the_cells_read() -> None:
    """grid_window names the cells upsample_window reads: a patch of exactly those cells gives
    the same values, one cell less on any side is refused."""
    from sam2_refine.model.logits import GridPatch, grid_window

    rng = np.random.default_rng(9)
    grid = grid_of(256, 256, seed=9)
    for out_hw in ((1024, 1024), (613, 877), (200, 150), (256, 256)):
        full = reference(grid, out_hw)
        for _ in range(20):
            r0 = int(rng.integers(0, out_hw[0]))
            r1 = int(rng.integers(r0 + 1, out_hw[0] + 1))
            c0 = int(rng.integers(0, out_hw[1]))
            c1 = int(rng.integers(c0 + 1, out_hw[1] + 1))
            top, left, bottom, right = grid_window((256, 256), out_hw, (r0, r1), (c0, c1))
            assert 0 <= top < bottom <= 256 and 0 <= left < right <= 256
            patch = GridPatch(grid[top:bottom, left:right].copy(), top, left, (256, 256))
            got = upsample_window(patch, out_hw, (r0, r1), (c0, c1))
            np.testing.assert_allclose(got, full[r0:r1, c0:c1], atol=1e-3, rtol=0)
            for shrunk in ((1, 0, 0, 0), (0, 1, 0, 0), (0, 0, -1, 0), (0, 0, 0, -1)):
                t, lf, b, rt = top + shrunk[0], left + shrunk[1], bottom + shrunk[2], right + shrunk[3]
                if t >= b or lf >= rt:
                    continue
                smaller = GridPatch(grid[t:b, lf:rt].copy(), t, lf, (256, 256))
                assert not smaller.covers((top, left, bottom, right))
                with pytest.raises(ValueError, match="needs grid cells"):
                    upsample_window(smaller, out_hw, (r0, r1), (c0, c1))


def test_cells_for_windows_clips_to_the_region() -> None:
    from sam2_refine.model.logits import cells_for_windows, crop_to_cells, grid_window

    windows = np.array([[-10, -10, 20, 30], [990, 1000, 2000, 2000], [100, 200, 101, 201]])
    cells = cells_for_windows(windows, (256, 256), (1024, 1024))
    assert cells[0].tolist() == list(grid_window((256, 256), (1024, 1024), (0, 20), (0, 30)))
    assert cells[1].tolist() == list(grid_window((256, 256), (1024, 1024), (990, 1024), (1000, 1024)))
    assert cells[1, 2] == 256 and cells[1, 3] == 256
    logits = np.arange(3 * 2 * 256 * 256, dtype=np.float32).reshape(3, 2, 256, 256)
    crops = crop_to_cells(logits, cells)
    for k, (top, left, bottom, right) in enumerate(cells):
        np.testing.assert_array_equal(crops[k], logits[k, :, top:bottom, left:right])
        assert crops[k].base is None or crops[k].base.nbytes == crops[k].nbytes  # a copy, not a view
