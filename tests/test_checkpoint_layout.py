"""The torch-free layout reader (sam2_refine.model.checkpoint_layout) against files torch writes.

Every file here is written by torch itself (or is a torch file cut short or altered); the
reader's answer is compared with what ``torch.load(weights_only=True, mmap=True)`` makes of the
same file, so the reader cannot drift from torch unnoticed.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from sam2_refine.model.checkpoint_layout import LayoutError, TensorInfo, read_layout


def shapes_of(tree) -> dict:
    """name -> (shape, dtype) of a flat dict of tensors (from torch, or from the reader)."""
    out = {}
    for name, value in tree.items():
        if isinstance(value, TensorInfo):
            out[name] = (value.shape, value.dtype)
        else:
            out[name] = (tuple(value.shape), str(value.dtype).removeprefix("torch."))
    return out


def small_state_dict() -> dict:
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    return module.state_dict()  # an OrderedDict with _metadata, as every real state dict


def test_a_state_dict_is_read_as_torch_reads_it(tmp_path: Path) -> None:
    sd = small_state_dict()
    sd["half"] = torch.zeros(4, 5, dtype=torch.float16)
    sd["bf16"] = torch.zeros(3, dtype=torch.bfloat16)
    sd["view"] = torch.arange(24.0).reshape(4, 6)[1:, ::2]  # a view: offset and strides
    sd["scalar"] = torch.tensor(2.5)
    sd["broadcast"] = torch.zeros(()).expand(7, 9)  # stride 0: one element for 63
    sd["param"] = torch.nn.Parameter(torch.ones(2, 2))
    sd["empty"] = torch.zeros(0, 3)
    path = tmp_path / "sd.pt"
    torch.save({"model": sd, "epoch": 3, "note": "ok"}, path)
    layout = read_layout(path)
    loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    assert set(layout.root) == {"model", "epoch", "note"}
    assert layout.root["epoch"] == 3 and layout.root["note"] == "ok"
    assert shapes_of(layout.root["model"]) == shapes_of(loaded["model"])
    assert layout.root["model"]["view"] == TensorInfo((3, 3), "float32")
    assert layout.tensors == len(sd)


def test_sam2_training_checkpoint_layout_is_read(tmp_path: Path) -> None:
    """sam2's trainer saves model, optimizer, epoch, loss, steps, time_elapsed,
    best_meter_values and (with AMP) scaler (training/trainer.py: save_checkpoint)."""
    module = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    module(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    checkpoint = {
        "model": module.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 7,
        "loss": torch.nn.Module().state_dict(), "steps": {"train": 700, "val": 0}, "time_elapsed": 123.5,
        "best_meter_values": {}, "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 3},
    }
    path = tmp_path / "checkpoint.pt"
    torch.save(checkpoint, path)
    layout = read_layout(path)
    assert set(layout.root) == set(checkpoint)
    assert shapes_of(layout.root["model"]) == {"weight": ((3, 4), "float32"), "bias": ((3,), "float32")}
    state = layout.root["optimizer"]["state"][0]
    assert state["exp_avg"] == TensorInfo((3, 4), "float32")
    assert layout.root["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert layout.root["steps"] == {"train": 700, "val": 0}


def test_bytes_sets_and_nested_containers(tmp_path: Path) -> None:
    path = tmp_path / "misc.pt"
    torch.save({"b": b"\x00\xffbytes", "s": {1, 2}, "l": [1, (2.5, None), {"x": True}]}, path)
    root = read_layout(path).root
    assert root == {"b": b"\x00\xffbytes", "s": {1, 2}, "l": [1, (2.5, None), {"x": True}]}


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["top", "nested", "as_a_weight"])
def test_a_pickle_with_code_is_refused_and_never_run(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "ran"
    payload = _Payload(marker)
    obj = {"top": {"model": {"w": torch.zeros(2)}, "x": payload},
           "nested": {"model": {"w": torch.zeros(2)}, "opt": [{"deep": (1, payload)}]},
           "as_a_weight": {"model": {"w": payload}}}[where]
    path = tmp_path / "evil.pt"
    torch.save(obj, path)
    with pytest.raises(LayoutError, match=r"a pickle with code: it would call posix\.system \(refused, never run\)"):
        read_layout(path)
    assert not marker.exists()


def test_objects_that_are_not_weights_are_refused_like_torch_refuses_them(tmp_path: Path) -> None:
    """Old checkpoints often carry an argparse Namespace: torch's weights-only load refuses it
    too, so a file the reader accepts is one torch loads."""
    import argparse

    path = tmp_path / "args.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(LayoutError, match="argparse.Namespace"):
        read_layout(path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_truncated_files_at_any_point(tmp_path: Path) -> None:
    path = tmp_path / "full.pt"
    torch.save({"model": small_state_dict()}, path)
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) - 30, len(data) // 2, 200, 10):
        short = tmp_path / f"cut{cut}.pt"
        short.write_bytes(data[:cut])
        with pytest.raises(LayoutError, match="truncated or corrupt"):
            read_layout(short)


@pytest.mark.parametrize(("content", "reason"), [
    (b"", "an empty file"),
    (b"not a checkpoint" * 100, "not a PyTorch checkpoint"),
    (pickle.dumps({"model": {}}, protocol=4), "a plain pickle"),
    (len(b'{"w":{}}').to_bytes(8, "little") + b'{"w":{}}', "a safetensors file"),
], ids=["empty", "text", "plain_pickle", "safetensors"])
def test_files_that_are_not_torch_zip_archives(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(LayoutError, match=reason):
        read_layout(path)


def test_legacy_format_is_refused_with_the_fix(tmp_path: Path) -> None:
    """torch cannot memory-map a pre-1.6 (non-zip) file; the reason says how to re-save it."""
    path = tmp_path / "legacy.pt"
    torch.save({"model": small_state_dict()}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(LayoutError, match="legacy .* re-save it with torch.save"):
        read_layout(path)
    with pytest.raises(RuntimeError, match="mmap"):
        torch.load(path, weights_only=True, mmap=True)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, its files still exist
def test_torchscript_archive_is_named(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(LayoutError, match="TorchScript"):
        read_layout(path)


@pytest.mark.filterwarnings("ignore::UserWarning")  # quantized tensors are deprecated
def test_tensors_sam2_cannot_load_are_named(tmp_path: Path) -> None:
    path = tmp_path / "q.pt"
    torch.save({"model": {"w": torch.quantize_per_tensor(torch.zeros(4), 0.1, 0, torch.qint8)}}, path)
    with pytest.raises(LayoutError, match="quantized"):
        read_layout(path)
    path = tmp_path / "meta.pt"
    torch.save({"model": {"w": torch.empty(3, 3, device="meta")}}, path)
    with pytest.raises(LayoutError, match="meta"):
        read_layout(path)


def _rewrite(source: Path, target: Path, change) -> None:
    """Copy a torch zip archive, letting ``change(name, data)`` alter (or drop: None) records."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = change(info.filename, old.read(info))
            if data is not None:
                new.writestr(info.filename, data)


def test_storage_records_are_checked_against_their_tensors(tmp_path: Path) -> None:
    """A record shorter than its tensors: torch's memory-mapped load does not notice it (the
    tensor then reads the bytes after its record), its plain load does; the reader refuses it,
    and the worker reads the layout before every load."""
    path = tmp_path / "ok.pt"
    torch.save({"model": {"w": torch.zeros(4, 4)}}, path)
    assert read_layout(path).storages == 1
    short = tmp_path / "short.pt"
    _rewrite(path, short, lambda name, data: data[:-4] if name.endswith("data/0") else data)
    with pytest.raises(LayoutError, match="storage 0 holds 60 bytes, its tensors need 64"):
        read_layout(short)
    missing = tmp_path / "missing.pt"
    _rewrite(path, missing, lambda name, data: None if name.endswith("data/0") else data)
    with pytest.raises(LayoutError, match="record of storage 0 is missing"):
        read_layout(missing)
    assert torch.load(short, weights_only=True, mmap=True)["model"]["w"].shape == (4, 4)  # not noticed
    with pytest.raises(RuntimeError, match="record size"):
        torch.load(short, weights_only=True, mmap=False)
    with pytest.raises(RuntimeError):
        torch.load(missing, weights_only=True, mmap=True)


class _FakeStorage:
    pass


class _LyingTensor:
    """Pickles as torch's rebuild of a 4-element tensor over the storage it is given."""

    def __init__(self, storage: _FakeStorage, size: tuple) -> None:
        self.storage, self.size = storage, size

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, (self.storage, 0, self.size, (1,), False, OrderedDict()))


def _crafted_archive(path: Path, root, numel: int, record_bytes: int) -> Path:
    """A torch-style zip whose data.pkl is ``root``, pickled with storages of ``numel`` floats."""
    buffer = io.BytesIO()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if isinstance(obj, _FakeStorage) else None

    Pickler(buffer, protocol=2).dump(root)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/data/0", b"\0" * record_bytes)
        archive.writestr("archive/byteorder", "little")
    return path


def test_a_tensor_beyond_its_storage_is_refused(tmp_path: Path) -> None:
    storage = _FakeStorage()
    good = _crafted_archive(tmp_path / "good.pt", {"model": {"w": _LyingTensor(storage, (2,))}}, 2, 8)
    assert read_layout(good).root["model"]["w"] == TensorInfo((2,), "float32")
    bad = _crafted_archive(tmp_path / "bad.pt", {"model": {"w": _LyingTensor(storage, (4,))}}, 2, 8)
    with pytest.raises(LayoutError, match="reaches beyond its storage"):
        read_layout(bad)


def test_a_zip_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(LayoutError, match="no data.pkl"):
        read_layout(path)
