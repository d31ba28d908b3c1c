"""A dataset's image and frame layout (:class:`DatasetInfo`), read from large_image's tile
metadata: which frame holds each channel at each (XY, Z, Time), and what a frame must arrive as.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sam2_refine.nimbus.frames import FrameSpec


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset's image and frame layout.

    Attributes:
        dataset_id: The dataset folder id.
        item_id: The large-image item holding the pixels.
        width: Frame width in pixels (``sizeX``: number of columns).
        height: Frame height in pixels (``sizeY``: number of rows).
        dtype: The pixel dtype the tile metadata names, or None if it names none.
        frames: Frame number for each (C, T, Z, XY) index, shape (C, T, Z, XY), int64;
            -1 where the dataset has no frame for that index.
        channel_names: Channel names from the metadata, possibly empty.
    """

    dataset_id: str
    item_id: str
    width: int
    height: int
    dtype: str | None
    frames: np.ndarray
    channel_names: tuple[str, ...] = ()

    @property
    def num_channels(self) -> int:
        return int(self.frames.shape[0])

    @property
    def num_time(self) -> int:
        return int(self.frames.shape[1])

    @property
    def num_z(self) -> int:
        return int(self.frames.shape[2])

    @property
    def num_xy(self) -> int:
        return int(self.frames.shape[3])

    def frame_spec(self, window: tuple[int, int, int, int] | None = None) -> FrameSpec:
        """What a frame (or the window (left, top, right, bottom) of one) must arrive as."""
        if window is None:
            return FrameSpec(self.dtype, self.width, self.height)
        left, top, right, bottom = window
        return FrameSpec(self.dtype, min(right, self.width) - max(left, 0), min(bottom, self.height) - max(top, 0))

    def frame_number(self, channel: int, xy: int, z: int, time: int) -> int:
        """The frame holding ``channel`` at location (XY, Z, Time); 0-based indices.

        Raises:
            KeyError: the dataset has no such frame.
        """
        c, t, zz, x = self.frames.shape
        if not (0 <= channel < c and 0 <= time < t and 0 <= z < zz and 0 <= xy < x):
            raise KeyError(f"no frame for channel {channel} at XY {xy}, Z {z}, Time {time}")
        frame = int(self.frames[channel, time, z, xy])
        if frame < 0:
            raise KeyError(f"no frame for channel {channel} at XY {xy}, Z {z}, Time {time}")
        return frame


def frame_map_from_tiles(tiles: dict[str, Any]) -> np.ndarray:
    """Build the (C, T, Z, XY) -> frame number table from large_image tile metadata.

    Axes missing from ``IndexRange`` and from the frames have size 1 (index 0). No ``frames``
    at all means a single frame 0.

    Returns:
        int64 array of shape (C, T, Z, XY); -1 where no frame exists.
    """
    frames = tiles.get("frames") or []
    index_range = tiles.get("IndexRange") or {}
    keys = ("IndexC", "IndexT", "IndexZ", "IndexXY")
    sizes = [max(1, int(index_range.get(k, 1) or 1)) for k in keys]
    for fr in frames:
        for i, k in enumerate(keys):
            sizes[i] = max(sizes[i], int(fr.get(k, 0) or 0) + 1)
    table = np.full(sizes, -1, dtype=np.int64)
    if not frames:
        table[0, 0, 0, 0] = 0
        return table
    for position, fr in enumerate(frames):
        idx = tuple(int(fr.get(k, 0) or 0) for k in keys)
        table[idx] = int(fr.get("Frame", position))
    return table
