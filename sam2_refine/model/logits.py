"""Mask logits from the model's low-resolution grid, upsampled only where they are needed.

SAM2 returns mask logits on a 256x256 grid that covers the embedded image (stretched to a
square). Its predictor upsamples every mask to the full frame with
``F.interpolate(logits, (H, W), mode="bilinear", align_corners=False)``: N x H x W floats, most
of them far from the object. :func:`upsample_window` computes exactly the same values, but only
for one rectangle of the frame, by separable linear interpolation: the cost is proportional to
the rectangle, not to the frame.

Coordinates: a window is given in the pixel rows/columns of the *region* the grid covers (the
whole frame, or a crop of it): row = y, column = x, pixel centres at integers.

A model may also return its logits only in a window of the grid (:class:`GridPatch`): the cells
:func:`grid_window` says a window of pixels needs.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def _source_index(in_size: int, out_size: int, d: int) -> int:
    """``i0`` of :func:`_axis_weights` for the one output position ``d``, in the same float32
    arithmetic (numpy scalars round as its arrays do), without building arrays."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = max((np.float32(d) + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0.0))
    return min(int(np.floor(src)), in_size - 1)


@dataclass(frozen=True)
class GridPatch:
    """Logits of one mask on a window of the model's low-resolution grid.

    Attributes:
        values: float32 (rows, cols): the logits of grid cells ``top..top+rows-1`` x
            ``left..left+cols-1``.
        top, left: Where ``values`` lie on the grid (cell row = y, cell column = x).
        grid_hw: (h, w) of the whole grid, which covers the whole embedded region.
    """

    values: np.ndarray
    top: int
    left: int
    grid_hw: tuple[int, int]

    @staticmethod
    def whole(grid: np.ndarray) -> GridPatch:
        return GridPatch(grid, 0, 0, (int(grid.shape[0]), int(grid.shape[1])))

    def covers(self, cells: tuple[int, int, int, int]) -> bool:
        """Whether the cells ``(top, left, bottom, right)`` (half-open) all lie in the patch."""
        top, left, bottom, right = cells
        rows, cols = self.values.shape
        return (self.top <= top and self.left <= left and bottom <= self.top + rows
                and right <= self.left + cols)


def grid_window(grid_hw: tuple[int, int], out_hw: tuple[int, int], rows: tuple[int, int],
                cols: tuple[int, int]) -> tuple[int, int, int, int]:
    """The grid cells :func:`upsample_window` reads for one window of the upsampled image.

    Args:
        grid_hw: (h, w) of the grid.
        out_hw: (H, W) of the full upsampled image (the region the grid covers).
        rows, cols: (first, stop) output rows and columns, as for :func:`upsample_window`.

    Returns:
        ``(top, left, bottom, right)`` cells, half-open.
    """
    out_h, out_w = out_hw
    if not (0 <= rows[0] < rows[1] <= out_h and 0 <= cols[0] < cols[1] <= out_w):
        raise ValueError(f"window rows {rows} cols {cols} outside {out_hw}")
    # the source indices grow with the output position: the ends of the window give the extremes
    return (_source_index(grid_hw[0], out_h, rows[0]), _source_index(grid_hw[1], out_w, cols[0]),
            min(_source_index(grid_hw[0], out_h, rows[1] - 1) + 1, grid_hw[0] - 1) + 1,
            min(_source_index(grid_hw[1], out_w, cols[1] - 1) + 1, grid_hw[1] - 1) + 1)


def upsample_window(
    grid: np.ndarray | GridPatch,
    out_hw: tuple[int, int],
    rows: tuple[int, int],
    cols: tuple[int, int],
) -> np.ndarray:
    """Bilinearly upsample ``grid`` to ``out_hw``, returning only one window of the result.

    Equal (to float32 rounding) to
    ``F.interpolate(grid[None, None], out_hw, mode="bilinear", align_corners=False)[0, 0,
    rows[0]:rows[1], cols[0]:cols[1]]``.

    Args:
        grid: Logits, shape (h, w), float; or a :class:`GridPatch` of the (h, w) grid that holds
            every cell the window needs (:func:`grid_window`).
        out_hw: (H, W) of the full upsampled image.
        rows: (first, stop) output rows, 0 <= first < stop <= H.
        cols: (first, stop) output columns, 0 <= first < stop <= W.

    Returns:
        float32 array of shape (rows[1] - rows[0], cols[1] - cols[0]).

    Raises:
        ValueError: a window outside ``out_hw``, or one that needs cells the patch lacks.
    """
    patch = grid if isinstance(grid, GridPatch) else GridPatch.whole(grid)
    h, w = patch.grid_hw
    out_h, out_w = out_hw
    if not (0 <= rows[0] < rows[1] <= out_h and 0 <= cols[0] < cols[1] <= out_w):
        raise ValueError(f"window rows {rows} cols {cols} outside {out_hw}")
    r0, r1, rw = _axis_weights(h, out_h, *rows)
    c0, c1, cw = _axis_weights(w, out_w, *cols)
    # Only the grid rows/columns the window touches take part.
    cells = (int(r0[0]), int(c0[0]), int(r1[-1]) + 1, int(c1[-1]) + 1)
    if not patch.covers(cells):
        raise ValueError(f"window rows {rows} cols {cols} needs grid cells {cells}, not all in the "
                         f"patch at ({patch.top}, {patch.left}) of shape {patch.values.shape}")
    used_rows = slice(cells[0] - patch.top, cells[2] - patch.top)
    used_cols = slice(cells[1] - patch.left, cells[3] - patch.left)
    sub = np.asarray(patch.values, dtype=np.float32)[used_rows, used_cols]
    r0, r1 = r0 - cells[0], r1 - cells[0]
    c0, c1 = c0 - cells[1], c1 - cells[1]
    by_rows = sub[r0] * (1 - rw)[:, None] + sub[r1] * rw[:, None]
    return by_rows[:, c0] * (1 - cw)[None, :] + by_rows[:, c1] * cw[None, :]


def cells_for_windows(windows: np.ndarray, grid_hw: tuple[int, int], region_hw: tuple[int, int]) -> np.ndarray:
    """The grid cells each of N windows of region pixels needs (:func:`grid_window`).

    Args:
        windows: int (N, 4) ``(top, left, bottom, right)`` region pixels, half-open; clipped to
            the region (a window entirely outside it keeps its nearest row/column).
        grid_hw: (h, w) of the grid over the region.
        region_hw: (H, W) of the region.

    Returns:
        int64 (N, 4) ``(top, left, bottom, right)`` cells.
    """
    height, width = region_hw
    boxes = np.asarray(windows, dtype=np.int64).reshape(-1, 4)
    cells = np.empty_like(boxes)
    for k, (top, left, bottom, right) in enumerate(boxes):
        top, left = min(max(int(top), 0), height - 1), min(max(int(left), 0), width - 1)
        bottom, right = max(min(int(bottom), height), top + 1), max(min(int(right), width), left + 1)
        cells[k] = grid_window(grid_hw, region_hw, (top, bottom), (left, right))
    return cells


def crop_to_cells(logits: np.ndarray, cells: np.ndarray) -> tuple[np.ndarray, ...]:
    """Whole-grid logits (N, C, h, w) cut to each prompt's cells (N, 4): N arrays (C, rows, cols),
    each a copy, so that no prompt keeps more than its window."""
    return tuple(logits[k, :, top:bottom, left:right].copy()
                 for k, (top, left, bottom, right) in enumerate(np.asarray(cells)))
