"""The layout of a PyTorch checkpoint file, read without torch and without reading any weight.

A file written by ``torch.save`` (PyTorch >= 1.6) is a zip archive::

    <prefix>/data.pkl        the saved object, pickled; each tensor's bytes are a persistent id
    <prefix>/data/<key>      one record per storage: the raw bytes of the tensors that view it
    <prefix>/byteorder, version, .format_version, ...

:func:`read_layout` opens the archive (its central directory sits at the end, so a file cut
short fails at once), unpickles ``data.pkl`` with an allow-listed unpickler, and returns the
saved object with every tensor replaced by a :class:`TensorInfo` (shape, dtype). The unpickler
builds nothing but plain containers and these records: any other global a pickle names (a
function, a class: the way a pickle runs code) is refused and never imported or called. No
storage record is read; each one's size in the zip directory is checked against the tensors
that view it, so the result describes a file ``torch.load(..., weights_only=True, mmap=True)``
can load.

No torch here: ``--request interface`` lists checkpoints without importing it (how fast:
docs/models.md, from ``bench/bench_layout.py``).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The largest ``data.pkl`` read (SAM2.1 large's is about 80 kB; a training checkpoint with
#: its optimizer state a few hundred kB).
MAX_PICKLE_BYTES = 64 * 1024 * 1024

#: The first bytes of a file saved in PyTorch's legacy (pre-1.6, non-zip) format: a pickled
#: magic number (0x1950a86a20f9469cfc6c, protocol 2).
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"

#: torch storage class name -> (dtype name, bytes per element).
STORAGE_DTYPES: dict[str, tuple[str, int]] = {
    "FloatStorage": ("float32", 4),
    "DoubleStorage": ("float64", 8),
    "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2),
    "LongStorage": ("int64", 8),
    "IntStorage": ("int32", 4),
    "ShortStorage": ("int16", 2),
    "CharStorage": ("int8", 1),
    "ByteStorage": ("uint8", 1),
    "BoolStorage": ("bool", 1),
    "ComplexFloatStorage": ("complex64", 8),
    "ComplexDoubleStorage": ("complex128", 16),
    "UntypedStorage": ("uint8", 1),
}
#: dtypes named by ``_rebuild_tensor_v3`` (tensors of the newer dtypes) -> bytes per element.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
    "int8": 1, "uint8": 1, "bool": 1, "uint16": 2, "uint32": 4, "uint64": 8,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
}
FLOAT_DTYPES = frozenset({"float32", "float64", "float16", "bfloat16"})

#: Globals torch itself allows in a weights-only load that describe tensors this worker does
#: not load (SAM2's weights are dense floating-point tensors): named in the reason.
_OTHER_TENSOR_KINDS = {
    "_rebuild_qtensor": "a quantized tensor",
    "_rebuild_sparse_tensor": "a sparse tensor",
    "_rebuild_nested_tensor": "a nested tensor",
    "_rebuild_meta_tensor_no_storage": "a meta tensor (a shape without data)",
    "_rebuild_wrapper_subclass": "a tensor subclass",
    "_rebuild_device_tensor_from_numpy": "a device tensor saved through numpy",
    "_rebuild_device_tensor_from_cpu_tensor": "a device tensor",
}


class LayoutError(ValueError):
    """The file is not a checkpoint this reader accepts; the message is the reason, for users."""


@dataclass(frozen=True)
class TensorInfo:
    """One saved tensor, described (its bytes are never read).

    Attributes:
        shape: The tensor's size, e.g. ``(256, 64, 3, 3)``.
        dtype: torch's dtype name without the ``torch.`` prefix, e.g. ``"float32"``.
    """

    __slots__ = ("shape", "dtype")
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class CheckpointLayout:
    """What :func:`read_layout` found.

    Attributes:
        root: The saved object: dicts, lists, tuples, numbers, strings and :class:`TensorInfo`.
        tensors: How many tensors it holds.
        storages: How many storage records the archive holds for them.
    """

    root: Any
    tensors: int
    storages: int


@dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: str
    itemsize: int


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: str
    itemsize: int
    numel: int
    location: str


class _TypeMarker:
    """``torch.Tensor`` / ``torch.nn.Parameter`` as a pickle names them; never instantiated."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise LayoutError(f"a pickle with code: it would call {self.name} (refused, never run)")


class _Dtype:
    def __init__(self, name: str) -> None:
        self.name = name


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise LayoutError(f"truncated or corrupt: a tensor's {what} is not a tuple of sizes")
    return value


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None = None) -> TensorInfo:
    """A tensor over ``storage``, checked to lie inside it."""
    if not isinstance(storage, _Storage):
        raise LayoutError("truncated or corrupt: a tensor without a storage record")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if type(offset) is not int or offset < 0 or len(size) != len(stride):
        raise LayoutError("truncated or corrupt: a tensor's offset or strides do not fit its size")
    dtype = dtype or storage.dtype
    itemsize = DTYPE_SIZES.get(dtype, storage.itemsize)
    elements = storage.numel * storage.itemsize // itemsize
    if 0 not in size:
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= elements:
            raise LayoutError("truncated or corrupt: a tensor reaches beyond its storage")
    return TensorInfo(tuple(size), dtype)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> TensorInfo:
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> TensorInfo:
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> TensorInfo:
    if not isinstance(dtype, _Dtype):
        raise LayoutError("truncated or corrupt: a tensor without a dtype")
    return _tensor(storage, offset, size, stride, dtype.name)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None,
                       state: Any = None) -> TensorInfo:
    if not isinstance(data, TensorInfo):
        raise LayoutError("truncated or corrupt: a parameter without a tensor")
    return data


_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> TensorInfo:
    """A tensor with Python state (torch's route for them); only plain tensors and parameters."""
    if func not in _REBUILDERS or not isinstance(new_type, _TypeMarker) or not isinstance(args, tuple):
        raise LayoutError("a pickle with code: a tensor rebuilt through an unknown type (refused, never run)")
    return func(*args)


def _encode(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode``, which protocol-2 pickles use for ``bytes``; text codecs only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise LayoutError("a pickle with code: _codecs.encode used for something else than bytes")
    return text.encode("latin1")


def _bytearray(data: Any = b"", encoding: Any = None) -> bytearray:
    """``bytearray`` from bytes or text only (never ``bytearray(n)``, which allocates n bytes)."""
    if isinstance(data, (bytes, bytearray)):
        return bytearray(data)
    if isinstance(data, str) and encoding in ("latin1", "latin-1"):
        return bytearray(data, "latin1")
    raise LayoutError("a pickle with code: bytearray used for something else than bytes")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch", "Tensor"): _TypeMarker("torch.Tensor"),
        ("torch.nn.parameter", "Parameter"): _TypeMarker("torch.nn.parameter.Parameter"),
        ("torch", "Size"): tuple,
        ("_codecs", "encode"): _encode,
        ("builtins", "set"): set,
        ("builtins", "bytearray"): _bytearray,
        ("builtins", "complex"): complex,
    }
    for name, (dtype, itemsize) in STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(name, dtype, itemsize)
    for dtype in DTYPE_SIZES:
        allowed[("torch", dtype)] = _Dtype(dtype)
    return allowed


_ALLOWED = _allowed_globals()


class _LayoutUnpickler(pickle.Unpickler):
    """Builds only what a state dict needs; see the module docstring."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module
        found = _ALLOWED.get((module, name))
        if found is not None:
            return found
        if module == "torch._utils" and name in _OTHER_TENSOR_KINDS:
            raise LayoutError(f"it holds {_OTHER_TENSOR_KINDS[name]} (torch._utils.{name}); "
                              "SAM2 weights are plain floating-point tensors")
        raise LayoutError(f"a pickle with code: it would call {module}.{name} (refused, never run)")

    def persistent_load(self, pid: Any) -> _Storage:
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)
                or not isinstance(pid[3], str) or type(pid[4]) is not int or pid[4] < 0):
            raise LayoutError("truncated or corrupt: a storage reference is malformed")
        _, kind, key, location, numel = pid
        if location == "meta":
            raise LayoutError("it holds meta tensors (shapes without data), not weights")
        storage = _Storage(key, kind.dtype, kind.itemsize, numel, location)
        known = self.storages.setdefault(key, storage)
        if (known.dtype, known.numel) != (storage.dtype, storage.numel):
            raise LayoutError("truncated or corrupt: one storage is described twice, differently")
        return known


def _sniff(head: bytes) -> str:
    """Why a file that is not a zip archive is not a checkpoint."""
    if not head:
        return "an empty file"
    if head.startswith(b"PK"):
        return "truncated or corrupt: an incomplete zip archive (was the copy or download cut short?)"
    if head.startswith(LEGACY_MAGIC):
        return ("a PyTorch file in the legacy (pre-1.6, non-zip) format, which cannot be memory-mapped; "
                "re-save it with torch.save in a current PyTorch")
    if len(head) >= 10 and head[8:10] == b'{"':
        return "a safetensors file; this worker reads PyTorch checkpoints (.pt) as sam2 saves them"
    if head[:1] == b"\x80":
        return "a plain pickle, not a PyTorch checkpoint (refused, never unpickled)"
    return "not a PyTorch checkpoint (corrupt, or another format)"


def _archive_prefix(names: list[str]) -> str:
    pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(pickles) != 1:
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            raise LayoutError("a TorchScript archive (torch.jit.save), not a checkpoint of weights")
        raise LayoutError("a zip archive that is not a PyTorch checkpoint (no data.pkl)")
    prefix = pickles[0][: -len("data.pkl")]
    if any(n.startswith(prefix + "code/") for n in names) or prefix + "constants.pkl" in names:
        raise LayoutError("a TorchScript archive (torch.jit.save), not a checkpoint of weights")
    return prefix


def read_layout(path: Path) -> CheckpointLayout:
    """The saved object of a ``torch.save`` file, tensors as :class:`TensorInfo`.

    Args:
        path: The checkpoint file.

    Returns:
        The layout; reads the zip directory and ``data.pkl`` only.

    Raises:
        LayoutError: the message says why the file cannot be used (empty, truncated or corrupt,
            legacy format, TorchScript, a pickle with code, tensors that are not plain weights).
        OSError: the file cannot be opened or read.
    """
    with open(path, "rb") as handle:
        head = handle.read(16)
        try:
            archive = zipfile.ZipFile(handle)
        except zipfile.BadZipFile:
            raise LayoutError(_sniff(head)) from None
        except (ValueError, EOFError):  # a central directory that makes no sense
            raise LayoutError("truncated or corrupt: its zip directory is damaged") from None
        with archive:
            infos = {info.filename: info for info in archive.infolist()}
            prefix = _archive_prefix(list(infos))
            pickle_info = infos[prefix + "data.pkl"]
            if pickle_info.file_size > MAX_PICKLE_BYTES:
                raise LayoutError(f"its data.pkl is {pickle_info.file_size:,} bytes, more than a checkpoint "
                                  f"of weights needs ({MAX_PICKLE_BYTES:,})")
            try:
                data = archive.read(pickle_info)
            except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as exc:
                raise LayoutError(f"truncated or corrupt: its data.pkl cannot be read ({exc})") from None
    unpickler = _LayoutUnpickler(data)
    try:
        root = unpickler.load()
    except LayoutError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RecursionError, MemoryError, OverflowError, UnicodeDecodeError) as exc:
        raise LayoutError(f"truncated or corrupt: its data.pkl does not unpickle ({type(exc).__name__})") from None
    for storage in unpickler.storages.values():
        record = infos.get(f"{prefix}data/{storage.key}")
        expected = storage.numel * storage.itemsize
        if record is None:
            raise LayoutError(f"truncated or corrupt: the record of storage {storage.key} is missing")
        if record.file_size != expected:
            raise LayoutError(f"truncated or corrupt: storage {storage.key} holds {record.file_size:,} bytes, "
                              f"its tensors need {expected:,}")
    return CheckpointLayout(root, _count_tensors(root), len(unpickler.storages))


def _count_tensors(root: Any) -> int:
    count, stack, seen = 0, [root], set()
    while stack:
        item = stack.pop()
        if isinstance(item, TensorInfo):
            count += 1
        elif isinstance(item, (dict, list, tuple)) and id(item) not in seen:
            seen.add(id(item))
            stack.extend(item.values() if isinstance(item, dict) else item)
    return count


def describe(value: Any) -> str:
    """A short name for what a checkpoint holds where a state dict was expected."""
    if isinstance(value, dict):
        return f"a dict of {len(value)} entries"
    if isinstance(value, TensorInfo):
        return f"a tensor of shape {value.shape}"
    return f"a {type(value).__name__}"
