"""Mask logits from the model's low-resolution grid, upsampled only where they are needed.

SAM2 returns mask logits on a 256x256 grid that covers the embedded image (stretched to a
square). Its predictor upsamples every mask to the full frame with
``F.interpolate(logits, (H, W), mode="bilinear", align_corners=False)``: N x H x W floats, most
of them far from the object. :func:`upsample_window` computes exactly the same values, but only
for one rectangle of the frame, by separable linear interpolation: the cost is proportional to
the rectangle, not to the frame.

Coordinates: a window is given in the pixel rows/columns of the *region* the grid covers (the
whole frame, or a crop of it): row = y, column = x, pixel centres at integers.
"""

from __future__ import annotations

import numpy as np


def _axis_weights(in_size: int, out_size: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of bilinear resampling along one axis.

    Follows PyTorch's ``align_corners=False`` rule: source coordinate
    ``s = (d + 0.5) * in_size / out_size - 0.5``, clamped below at 0; neighbours
    ``floor(s)`` and ``min(floor(s) + 1, in_size - 1)``.

    Returns:
        (i0, i1, w1) for output positions ``start..stop-1``: the value is
        ``(1 - w1) * src[i0] + w1 * src[i1]``.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(start, stop, dtype=np.float32)
    src = np.maximum((dst + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, w1


def upsample_window(
    grid: np.ndarray,
    out_hw: tuple[int, int],
    rows: tuple[int, int],
    cols: tuple[int, int],
) -> np.ndarray:
    """Bilinearly upsample ``grid`` to ``out_hw``, returning only one window of the result.

    Equal (to float32 rounding) to
    ``F.interpolate(grid[None, None], out_hw, mode="bilinear", align_corners=False)[0, 0,
    rows[0]:rows[1], cols[0]:cols[1]]``.

    Args:
        grid: Logits, shape (h, w), float.
        out_hw: (H, W) of the full upsampled image.
        rows: (first, stop) output rows, 0 <= first < stop <= H.
        cols: (first, stop) output columns, 0 <= first < stop <= W.

    Returns:
        float32 array of shape (rows[1] - rows[0], cols[1] - cols[0]).
    """
    h, w = grid.shape
    out_h, out_w = out_hw
    if not (0 <= rows[0] < rows[1] <= out_h and 0 <= cols[0] < cols[1] <= out_w):
        raise ValueError(f"window rows {rows} cols {cols} outside {out_hw}")
    grid = np.asarray(grid, dtype=np.float32)
    r0, r1, rw = _axis_weights(h, out_h, *rows)
    c0, c1, cw = _axis_weights(w, out_w, *cols)
    # Only the grid rows/columns the window touches take part.
    used_rows = slice(int(r0.min()), int(r1.max()) + 1)
    used_cols = slice(int(c0.min()), int(c1.max()) + 1)
    sub = grid[used_rows, used_cols]
    r0, r1 = r0 - used_rows.start, r1 - used_rows.start
    c0, c1 = c0 - used_cols.start, c1 - used_cols.start
    by_rows = sub[r0] * (1 - rw)[:, None] + sub[r1] * rw[:, None]
    return by_rows[:, c0] * (1 - cw)[None, :] + by_rows[:, c1] * cw[None, :]
