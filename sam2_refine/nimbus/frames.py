"""Turning a frame's bytes from the server into its exact pixels, and checking them.

Pure functions (no HTTP): :mod:`sam2_refine.nimbus.client` fetches the bytes and calls these.

The encodings a NimbusImage server (girder_large_image's ``item/{id}/tiles/region``) offers,
and what each keeps of a frame (read in large_image's ``girder-5`` branch):

- ``pickle:5``: the region as a numpy array of the frame's own dtype, shape (rows, columns,
  bands), pickled (``girder/girder_large_image/rest/tiles.py``, ``_pickleParams`` and
  ``_pickleOutput``). Exact for every dtype. Unpickling network data unrestricted runs
  arbitrary code, so :func:`unpickle_array` accepts only numpy's own array-reconstruction
  globals and refuses every other global and every dtype that holds Python objects.
- ``TILED``: a tiled, pyramidal TIFF written by pyvips (``large_image/tilesource/base.py``,
  ``_encodeTiledImageFromVips``). uint8 and uint16 frames keep their values; other dtypes are
  cast to 16 bits with an offset and a scale (``utilities._vipsCast``). Needs pyvips on the
  server. ``tiffCompression=none`` keeps the tiles uncompressed (LZW, the default, needs a
  codec that is not installed here).
- ``TIFF``: encoded through PIL (``utilities._encodeImage`` -> ``_imageToPIL``): uint16 arrives
  as ``value // 256`` in 8 bits, and every other dtype but uint8 is squeezed to 8 bits too,
  while the tile metadata still names the source dtype. Exact only for uint8 frames.

Whatever the encoding, :func:`frame_mismatch` compares what arrived with what the tile
metadata promises (dtype, shape), so that a degraded frame is refused, never refined.
"""

from __future__ import annotations

import codecs
import io
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import tifffile


class FrameDecodeError(ValueError):
    """The bytes are not a frame this worker can read (the message says why, in words)."""


# -- pickle, restricted ----------------------------------------------------------------------------


class _NdarrayMarker:
    """Stands for ``numpy.ndarray`` as the first argument of ``_reconstruct`` (never called)."""


_NDARRAY = _NdarrayMarker()


def _plain_dtype(dtype: Any) -> np.dtype:
    if not isinstance(dtype, np.dtype):
        raise FrameDecodeError("a pickle with code: an array built with something else than a numpy dtype")
    if dtype.hasobject:
        raise FrameDecodeError(f"a pickled array of Python objects ({dtype}), not pixels (refused, never built)")
    return dtype


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any = "C") -> np.ndarray:
    """numpy's protocol-5 array rebuild (``numpy._core.numeric._frombuffer``), for plain dtypes only."""
    dtype = _plain_dtype(dtype)
    if not isinstance(buffer, (bytes, bytearray)) or not isinstance(shape, tuple) or order not in ("C", "F"):
        raise FrameDecodeError("a malformed pickled array")
    try:
        return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)
    except ValueError as exc:
        raise FrameDecodeError(f"a malformed pickled array ({exc})") from None


class _ArrayUnderConstruction:
    """What ``_reconstruct`` returns here: the array is made only when its state (dtype, shape,
    raw bytes) has been checked in :meth:`__setstate__` (pickle's BUILD step)."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise FrameDecodeError("a malformed pickled array")
        _version, shape, dtype, is_fortran, raw = state
        dtype = _plain_dtype(dtype)
        if not isinstance(raw, (bytes, bytearray)) or not isinstance(shape, tuple):
            raise FrameDecodeError("a malformed pickled array")
        try:
            flat = np.frombuffer(raw, dtype=dtype)
            self.array = flat.reshape(shape, order="F" if is_fortran else "C")
        except ValueError as exc:
            raise FrameDecodeError(f"a malformed pickled array ({exc})") from None


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArrayUnderConstruction:
    """numpy's protocol-2/4 array rebuild (``numpy._core.multiarray._reconstruct``)."""
    if cls is not _NDARRAY:
        raise FrameDecodeError("a pickle with code: it rebuilds something else than a numpy array")
    return _ArrayUnderConstruction()


def _encode(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode``, which protocol-2 pickles use for raw bytes; latin-1 text only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise FrameDecodeError("a pickle with code: _codecs.encode used for something else than bytes")
    return codecs.encode(text, "latin1")


# numpy moved its internals from numpy.core to numpy._core in 2.0: a server may run either.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _encode,
}
for _module in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_module}.multiarray", "_reconstruct")] = _reconstruct
    _ALLOWED[(f"{_module}.numeric", "_frombuffer")] = _frombuffer


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise FrameDecodeError(f"a pickle with code: it would call {module}.{name} (refused, never run)")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise FrameDecodeError("a pickle with external references (refused)")


def unpickle_array(data: bytes) -> np.ndarray:
    """A numpy array from a pickle, allowing only numpy's array-rebuilding globals.

    Every other global (``os.system``, ``builtins.eval``, ...) is refused before it is looked
    up, and so is any dtype that holds Python objects; the result must be one array.

    Raises:
        FrameDecodeError: anything else than a pickled numpy array of plain values.
    """
    try:
        result = _ArrayUnpickler(io.BytesIO(data)).load()
    except FrameDecodeError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError, OverflowError) as exc:
        raise FrameDecodeError(f"not a readable pickle ({type(exc).__name__})") from None
    if isinstance(result, _ArrayUnderConstruction):
        result = result.array
    if not isinstance(result, np.ndarray):
        raise FrameDecodeError(f"a pickle of {type(result).__name__}, not of a numpy array")
    _plain_dtype(result.dtype)
    if not result.dtype.isnative:  # same values, this machine's byte order
        result = result.astype(result.dtype.newbyteorder("="))
    return result if result.flags.writeable else result.copy()


# -- TIFF -----------------------------------------------------------------------------------------


def read_tiff_plane(data: bytes) -> np.ndarray:
    """The full-resolution image of a TIFF (the first page of a pyramid, as TILED sends it).

    Raises:
        FrameDecodeError: not a readable TIFF.
    """
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            return np.asarray(tif.pages[0].asarray())
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for a malformed body
        raise FrameDecodeError(f"not a readable TIFF ({type(exc).__name__})") from None


# -- the plane and its check ------------------------------------------------------------------------


def as_plane(pixels: np.ndarray) -> np.ndarray:
    """A single-band image as one 2-D plane of shape (rows, columns) = (height, width).

    large_image sends regions as (rows, columns, bands); TIFF readers may give (1, rows, columns).

    Raises:
        FrameDecodeError: several bands, or not an image.
    """
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    elif pixels.ndim == 3 and pixels.shape[0] == 1:
        pixels = pixels[0]
    if pixels.ndim != 2:
        raise FrameDecodeError(f"expected one 2-D plane, got an array of shape {pixels.shape}")
    return pixels


@dataclass(frozen=True)
class FrameSpec:
    """What the tile metadata promises for a frame (or a window of it).

    Attributes:
        dtype: The pixel dtype's name (``"uint16"``), or None when the metadata names none.
        width: Columns.
        height: Rows.
    """

    dtype: str | None
    width: int
    height: int

    def describe(self) -> str:
        return f"{self.dtype or 'pixels of an unnamed type'}, {self.width} x {self.height}"


def describe_pixels(pixels: np.ndarray) -> str:
    """``"uint8, 512 x 384"`` (dtype, width x height) for a 2-D plane."""
    height, width = pixels.shape[:2]
    return f"{pixels.dtype}, {width} x {height}"


def frame_mismatch(pixels: np.ndarray, spec: FrameSpec) -> str | None:
    """How ``pixels`` (a 2-D plane) differs from what the metadata promises, or None.

    The dtype is compared only when the metadata names one it knows; the shape always.
    """
    problems = []
    if spec.dtype is not None:
        try:
            expected = np.dtype(spec.dtype)
        except TypeError:
            expected = None
        if expected is not None and pixels.dtype != expected:
            problems.append("type")
    if pixels.shape[:2] != (spec.height, spec.width):
        problems.append("size")
    if not problems:
        return None
    return f"arrived as {describe_pixels(pixels)}; the dataset's metadata says {spec.describe()}"
