"""What large_image (as NimbusImage's server runs it) answers for tile metadata and regions.

Pure functions used by :mod:`sam2_refine.testing.nimbus_server`; each follows a named file of
large_image's ``girder-5`` branch (github.com/girder/large_image):

- :func:`tile_metadata`: ``large_image/tilesource/base.py``, ``_addMetadataFrameInformation``
  (``Frame``, ``Index``, ``IndexRange``, ``IndexStride``, ``channels``) and the tile size of the
  sources NimbusImage uses (512 px tiles);
- :func:`encode_region`: ``girder/girder_large_image/rest/tiles.py`` (``getTilesRegion``,
  ``_pickleParams``, ``_pickleOutput``) and ``large_image/tilesource/utilities.py``
  (``_encodeImage``, ``_imageToPIL``, ``_imageToNumpy``, ``_vipsCast``, ``_vipsParameters``).
"""

from __future__ import annotations

import io
import math
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import tifffile

#: Tile size the metadata reports (large_image's tiff and multi sources as NimbusImage makes them).
TILE_SIZE = 512
#: Tile size of the TIFF that ``encoding=TILED`` writes (``utilities._vipsParameters``).
TILED_TILE = 256


class RegionError(Exception):
    """The server's answer to a region it cannot encode: an HTTP status and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def tile_metadata(width: int, height: int, dtype: np.dtype, frames: Sequence[tuple[dict[str, int], int]],
                  channel_names: Sequence[str]) -> dict[str, Any]:
    """``GET item/{id}/tiles`` for an image of ``width`` x ``height`` pixels.

    Args:
        frames: Per listed frame, its indices (``IndexXY``, ``IndexT``, ``IndexZ``, ``IndexC``; axes
            of size 1 left out, as large_image leaves them out) and its frame number. One frame:
            no ``frames`` key at all.
        channel_names: One name per channel.
    """
    meta: dict[str, Any] = {
        "sizeX": width, "sizeY": height, "tileWidth": TILE_SIZE, "tileHeight": TILE_SIZE,
        "levels": max(1, math.ceil(math.log2(max(width, height) / TILE_SIZE)) + 1),
        "magnification": None, "mm_x": None, "mm_y": None,
        "dtype": str(np.dtype(dtype)), "bandCount": 1,
    }
    if len(frames) <= 1:
        return meta
    listed = []
    index, previous = 0, None
    # base.py _addMetadataFrameInformation: ``Index`` counts changes of the non-channel indices
    # along the list (frames of one location, differing only in channel, share one Index), so it
    # is not the frame number; ``Frame`` is.
    for position, (indices, number) in enumerate(frames):
        non_channel = tuple(sorted((k, v) for k, v in indices.items() if k != "IndexC"))
        if position and non_channel != previous:
            index += 1
        previous = non_channel
        listed.append({**indices, "Frame": number, "Index": index})
    sizes: dict[str, int] = {}
    for frame in listed:
        for key, value in frame.items():
            if key.startswith("Index") and key != "Index":
                sizes[key] = max(sizes.get(key, 1), value + 1)
    meta["frames"] = listed
    meta["IndexRange"] = {k: v for k, v in sizes.items() if v > 1}
    meta["IndexStride"] = {k: next(i for i, f in enumerate(listed) if f.get(k) == 1) for k in meta["IndexRange"]}
    if len(channel_names) >= sizes.get("IndexC", 1):  # names for every channel: channels, channelmap, Channel
        names = list(channel_names)[:sizes.get("IndexC", 1)]
        meta["channels"] = names
        meta["channelmap"] = {name: c for c, name in enumerate(names)}
        for frame in listed:
            frame["Channel"] = names[frame.get("IndexC", 0)]
    return meta


def _pickle_protocol(encoding: str) -> int:
    """rest/tiles.py ``_pickleParams``: ``pickle:N`` -> N (0 and non-numbers -> 4)."""
    tail = encoding.split(":")[-1]
    return (int(tail) or 4) if tail.isdigit() else 4


def to_8_bits(region: np.ndarray) -> np.ndarray:
    """utilities.py ``_imageToPIL`` for a single-band array: what an ``encoding=TIFF`` region holds."""
    if region.dtype == np.uint8:
        return region
    if region.dtype == np.uint16:
        return np.floor_divide(region, 256).astype(np.uint8)
    if region.dtype == np.uint32:
        return np.floor_divide(region, 2 ** 24).astype(np.uint8)
    if region.dtype == np.int8:
        return (region.astype(float) + 128).astype(np.uint8)
    if region.dtype == np.int16:
        return np.floor_divide(region.astype(float) + 2 ** 15, 256).astype(np.uint8)
    if region.dtype == np.int32:
        return np.floor_divide(region.astype(float) + 2 ** 31, 2 ** 24).astype(np.uint8)
    return np.clip(np.nan_to_num(region, nan=0), 0, 255).astype(np.uint8)


def vips_cast(region: np.ndarray) -> np.ndarray:
    """utilities.py ``_vipsCast`` (not forced to 8 bits): what an ``encoding=TILED`` region holds.

    uint8 and uint16 are kept; floats become uint16 scaled by the region's maximum; other
    integers are offset and scaled into 16 (int8: 8) bits.
    """
    if region.dtype in (np.uint8, np.uint16):
        return region
    if region.dtype.kind == "f":
        top = float(np.nanmax(region)) if region.size else 0.0
        scale = 256.0 if 2 <= top < 2 ** 9 else 1.0 if 256 <= top < 2 ** 17 else 65535.0
        return np.clip((region.astype(np.float64) * scale), 0, 65535).astype(np.uint16)
    offsets = {np.dtype(np.int8): (np.uint8, 2 ** 7, 1.0), np.dtype(np.int16): (np.uint16, 2 ** 15, 1.0),
               np.dtype(np.int32): (np.uint16, 2 ** 31, 2.0 ** -16), np.dtype(np.uint32): (np.uint16, 0, 2.0 ** -16)}
    target, offset, scale = offsets[region.dtype]
    return np.clip((region.astype(np.float64) + offset) * scale, 0, np.iinfo(target).max).astype(target)


def _tiled_tiff(region: np.ndarray) -> bytes:
    """A tiled BigTIFF pyramid, full resolution first, then halvings (nearest: lossless modes use
    ``region_shrink=nearest``) until one tile holds the level (``_vipsParameters``: tile 256,
    pyramid, bigtiff)."""
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf, bigtiff=True) as tif:
        level = region
        while True:
            tif.write(level, tile=(TILED_TILE, TILED_TILE), compression=None, photometric="minisblack")
            if max(level.shape[:2]) <= TILED_TILE:
                break
            level = level[::2, ::2]
    return buf.getvalue()


def encode_region(region: np.ndarray, encoding: str, tiff_compression: str | None = None,
                  has_pyvips: bool = True) -> tuple[bytes, str]:
    """The body and content type of ``GET item/{id}/tiles/region`` for a (rows, columns) region.

    Raises:
        RegionError: an encoding this server cannot produce (as the real one answers it).
    """
    if encoding.startswith("pickle"):
        # _pickleParams asks for numpy output: _imageToNumpy always gives (rows, columns, bands).
        # getTilesRegion sets the Content-Type from the default encoding (JPEG) before pickling,
        # so the pickle arrives labelled image/jpeg (seen on the real server).
        array = np.ascontiguousarray(region[..., np.newaxis])
        return pickle.dumps(array, protocol=min(_pickle_protocol(encoding), pickle.HIGHEST_PROTOCOL)), \
            "image/jpeg"
    if encoding == "TIFF":
        buf = io.BytesIO()
        tifffile.imwrite(buf, to_8_bits(region), photometric="minisblack")
        return buf.getvalue(), "image/tiff"
    if encoding == "TILED":
        if not has_pyvips:
            # base.py _encodeTiledImage imports pyvips inside the request: an uncaught ImportError.
            raise RegionError(500, "No module named 'pyvips'")
        if tiff_compression != "none":
            # The real server compresses TILED with LZW by default, which tifffile cannot decode
            # without imagecodecs; this double refuses instead of pretending it worked.
            raise RegionError(400, "This test server writes TILED regions only with tiffCompression=none.")
        return _tiled_tiff(vips_cast(region)), "image/tiff"
    if encoding in ("JPEG", "PNG"):
        raise RegionError(400, f"This test server does not encode {encoding}.")
    # rest/tiles.py: mimeTypeFromEncoding raises ValueError -> RestException('Value Error: ...').
    raise RegionError(400, f'Value Error: Invalid encoding "{encoding}"')
