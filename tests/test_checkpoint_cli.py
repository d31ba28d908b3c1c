"""A lab's checkpoint directory through the real ``entrypoint.py``: the interface offers exactly
the usable SAM2 checkpoints and names every other file in one warning; compute refuses each
unusable one before it asks the server anything, and runs a renamed SAM 2.0 checkpoint with the
real model."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TOKEN, WorkerRun, run_worker
from sam2_refine.testing.checkpoints import layout_weights, make_untrained_checkpoint, save_checkpoint
from sam2_refine.testing.checkpoints import write_layout_checkpoint
from test_architectures import FOREIGN
from test_cli_e2e import BIG, LAYERS, SMALL, ann, params, pixels
from test_faults import STANDIN_LAUNCHER
from test_security import _malicious_checkpoint

#: file -> the reason the interface warning gives for it.
UNUSABLE = {
    "sam_vit_h_4b8939.pth": "a SAM (segment-anything, SAM 1) checkpoint (ViT-H image encoder",
    "sam_hq_vit_l.pth": "an HQ-SAM checkpoint",
    "mobile_sam.pt": "a MobileSAM checkpoint (TinyViT",
    "random_weights.pt": "not a SAM2 checkpoint: none of its 3 weights are SAM2's",
    "odd_shapes.pt": "an architecture sam2 cannot build",
    "cut_short.pt": "truncated or corrupt",
    "evil.pt": "a pickle with code: it would call io.open (refused, never run)",
    "bad_config.pt": "its sidecar bad_config.json: \"config\" must be a config name, not a path "
                     "('configs/sam2.1/sam2.1_hiera_t.yaml')",
    "sam2.1_hiera_large.pt": "named like the stock SAM2.1 large checkpoint, but its weights are SAM2.1 tiny",
}
USABLE = {
    "lab_nuclei_ft.pt": "Nuclei, lab fine-tune, SAM2.1 small (lab_nuclei_ft.pt)",
    "legacy_tiny.pt": "SAM2.0 tiny (legacy_tiny.pt)",
    "sam2.1_hiera_small.pt": "SAM2.1 small (sam2.1_hiera_small.pt)",
    "wrong_digest.pt": "SAM2.1 tiny (wrong_digest.pt)",  # offered: the interface does not hash
}


@pytest.fixture(scope="module")
def lab_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("lab-checkpoints")
    lab = write_layout_checkpoint(directory / "lab_nuclei_ft.pt", "sam2.1_hiera_s", untrained=False)
    (directory / "lab_nuclei_ft.json").write_text(json.dumps({
        "label": "Nuclei, lab fine-tune", "sha256": hashlib.sha256(lab.read_bytes()).hexdigest(),
        "defaults": {"Prompt": "Box + shape", "Smoothing": 0.5}}))
    write_layout_checkpoint(directory / "legacy_tiny.pt", "sam2_hiera_t", untrained=False)
    write_layout_checkpoint(directory / "sam2.1_hiera_small.pt", "sam2.1_hiera_small.pt", untrained=False)
    (directory / "sam2.1_hiera_small.json").write_text(json.dumps({"defaults": {"Padding": 1}}))
    write_layout_checkpoint(directory / "wrong_digest.pt", "sam2.1_hiera_t", untrained=False)
    (directory / "wrong_digest.json").write_text(json.dumps({"sha256": "ab" * 32}))
    for name, case in (("sam_vit_h_4b8939.pth", "sam1_vit_h"), ("sam_hq_vit_l.pth", "hq_sam"),
                       ("mobile_sam.pt", "mobile_sam"), ("random_weights.pt", "random_state_dict"),
                       ("odd_shapes.pt", "sam2_other_shape")):
        save_checkpoint(directory / name, layout_weights("", shapes=FOREIGN[case][0]), untrained=False)
    torch.save({"model": {"w": torch.zeros(1000)}}, directory / "full.tmp")
    (directory / "cut_short.pt").write_bytes((directory / "full.tmp").read_bytes()[:3000])
    (directory / "full.tmp").unlink()
    _malicious_checkpoint(directory / "evil.pt", directory / "payload-ran")
    write_layout_checkpoint(directory / "bad_config.pt", "sam2.1_hiera_t")
    (directory / "bad_config.json").write_text(json.dumps({"config": "configs/sam2.1/sam2.1_hiera_t.yaml"}))
    write_layout_checkpoint(directory / "sam2.1_hiera_large.pt", "sam2.1_hiera_t")
    return directory


def test_interface_offers_exactly_the_usable_checkpoints(server, lab_directory: Path) -> None:
    started = time.perf_counter()
    run = run_worker(server, "interface", {"image": "img:latest"}, checkpoint_dir=lab_directory)
    elapsed = time.perf_counter() - started
    assert run.returncode == 0, run.stdout + run.stderr
    spec = server.interface("img:latest")
    assert spec["Model"]["items"] == list(USABLE.values())
    assert spec["Model"]["default"] == USABLE["sam2.1_hiera_small.pt"]
    assert spec["Padding"]["default"] == 1  # the default model's tuned value
    assert spec["Smoothing"]["default"] == 0.7  # another model's tuned value is not the form's default
    (warning,) = run.warnings()  # ONE warning for every unusable file
    assert warning["title"] == "Unusable checkpoints"
    assert warning["warning"].startswith(f"{len(UNUSABLE)} file(s) in the checkpoint directory cannot be used")
    lines = dict(line.split(": ", 1) for line in warning["info"].splitlines())
    assert set(lines) == set(UNUSABLE)
    for name, reason in UNUSABLE.items():
        assert reason in lines[name], (name, lines[name])
    assert [(r.method, r.path) for r in server.requests] == [("POST", "worker_interface")]
    assert not (lab_directory / "payload-ran").exists()
    print(f"\ninterface with {len(USABLE) + len(UNUSABLE)} checkpoints: {elapsed:.2f} s (process start included)")
    assert elapsed < 10


@pytest.mark.slow
@pytest.mark.parametrize("model", [*UNUSABLE, "wrong_digest.pt", "not_there.pt"])
def test_compute_refuses_an_unusable_model_before_touching_the_server(server, lab_directory: Path,
                                                                      model: str) -> None:
    ds = server.add_dataset(pixels(1, 1), layers=LAYERS)
    originals = server.add_annotations(ds.dataset_id, [ann(BIG)])
    server.requests.clear()
    run = run_worker(server, "compute", params(Model=model, **{"Delete original annotations": True}),
                     dataset_id=ds.dataset_id, checkpoint_dir=lab_directory)
    assert run.returncode == 2, run.stdout + run.stderr
    (error,) = run.errors()
    assert error["error"] == "Invalid setting: Model"
    expected = {"wrong_digest.pt": "its SHA-256 is", "not_there.pt": "is not in the checkpoint directory"}
    assert expected.get(model, UNUSABLE.get(model)) in error["info"]
    assert server.requests == []
    assert [a["_id"] for a in server.annotations(ds.dataset_id)] == originals
    assert TOKEN not in run.stdout + run.stderr
    assert not (lab_directory / "payload-ran").exists()


def _standin(server, request: dict, dataset_id: str, directory: Path, summary: Path) -> WorkerRun:
    argv = [sys.executable, "-c", STANDIN_LAUNCHER, "--apiUrl", server.api_url, "--token", TOKEN, "--request",
            "compute", "--parameters", json.dumps(request), "--datasetId", dataset_id]
    env = {**os.environ, "SAM2_CHECKPOINT_DIR": str(directory), "SAM2_REFINE_SUMMARY": str(summary),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    return WorkerRun(done.returncode, done.stdout, done.stderr)


@pytest.mark.parametrize("model", [USABLE["lab_nuclei_ft.pt"], "lab_nuclei_ft.pt", "legacy_tiny.pt"])
def test_compute_accepts_a_usable_model_by_item_or_file_name(server, lab_directory: Path, tmp_path: Path,
                                                             model: str) -> None:
    """The real command line and settings (sha256 checked), the model swapped for a stand-in."""
    ds = server.add_dataset(pixels(1, 1), layers=LAYERS)
    server.add_annotations(ds.dataset_id, [ann(BIG)])
    run = _standin(server, params(Model=model), ds.dataset_id, lab_directory, tmp_path / "s.json")
    assert run.returncode == 0, run.stdout + run.stderr
    loading = [p for p in run.progress() if p["title"] == "Loading model"]
    assert loading and loading[0]["info"].startswith(model.rsplit("(", 1)[-1].rstrip(")"))
    assert json.loads((tmp_path / "s.json").read_text())["refined"] == 1


@pytest.mark.slow
def test_a_renamed_sam2_0_tiny_runs_with_the_real_model(server, tmp_path: Path) -> None:
    """SAM 2.0 tiny under a lab's name: sam2 builds configs/sam2/sam2_hiera_t.yaml and loads the
    weights strictly; the job runs end to end (random weights, announced as untrained)."""
    directory = tmp_path / "ckpts"
    make_untrained_checkpoint(directory / "legacy_tiny.pt", "sam2_hiera_t", seed=1)
    ds = server.add_dataset(pixels(1, 1), layers=LAYERS)
    server.add_annotations(ds.dataset_id, [ann(BIG), ann(SMALL)])
    interface = run_worker(server, "interface", {"image": "img:latest"}, checkpoint_dir=directory)
    item = "SAM2.0 tiny, UNTRAINED test weights (legacy_tiny.pt)"
    assert server.interface("img:latest")["Model"]["items"] == [item] and interface.warnings() == []
    run = run_worker(server, "compute", params(Model=item), dataset_id=ds.dataset_id, checkpoint_dir=directory,
                     summary=tmp_path / "s.json")
    assert run.returncode == 0, run.stdout + run.stderr
    ready = [p["info"] for p in run.progress() if p["title"] == "Model ready"]
    assert ready and ready[0].startswith("legacy_tiny.pt, SAM2.0 tiny")
    assert any("UNTRAINED" in w["warning"] for w in run.warnings())
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["selected"] == 2 and summary["refined"] + summary["kept"] == 2
