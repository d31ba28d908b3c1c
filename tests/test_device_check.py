"""bench/device_check.py: the one-command CUDA check.

No GPU here: the check's CUDA run cannot happen in this suite. What is held: without CUDA it
says so in one line and exits 0 within 30 s (torch import included); its CPU self-test runs
every step (model, the job through job.run_compute, capture and comparison of the decoder's
masks, timings, the JSON and Markdown report) on a tiny configuration; the mask comparison is
exact on known inputs; and sam2's decoder stays the CUDA path of the worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "device_check.py"
sys.path.insert(0, str(REPO / "bench"))

import device_check  # noqa: E402


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=30, env=_env(CUDA_VISIBLE_DEVICES=""), cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("No CUDA device") and "nothing was checked" in lines[0]
    assert elapsed < 30 and list(tmp_path.iterdir()) == []  # nothing written


def _calls(rng, prompts=(3, 2)):
    return [(rng.uniform(0, 100, size=(n, 4)).astype(np.float32),
             rng.normal(0, 1, size=(n, 1, 16, 16)).astype(np.float32)) for n in prompts]


def test_mask_comparison_counts_pixels_that_differ():
    rng = np.random.default_rng(0)
    reference = _calls(rng)
    same = device_check.compare_masks(reference, reference)
    assert same["agreement"] == 1.0 and same["worst_prompt_agreement"] == 1.0 and same["relative_l2"] == 0.0
    flipped = [(boxes, logits.copy()) for boxes, logits in reference]
    flipped[1][1][0, 0, :4, :] *= -1  # 64 of prompt 4's 256 pixels change sign
    result = device_check.compare_masks(flipped, reference)
    assert result["agreement"] == pytest.approx(1 - 64 / (5 * 256))
    assert result["worst_prompt_agreement"] == pytest.approx(1 - 64 / 256)
    assert result["prompts"] == 5 and result["finite"]
    assert same["nontrivial_prompts"] == 1.0
    empty = [(boxes, -np.abs(logits) - 1) for boxes, logits in reference]  # no mask at all: trivially equal
    assert device_check.compare_masks(empty, empty)["nontrivial_prompts"] == 0.0
    nan = [(boxes, np.full_like(logits, np.nan)) for boxes, logits in reference]
    assert not device_check.compare_masks(nan, reference)["finite"]


def test_mask_comparison_refuses_runs_that_decoded_other_prompts():
    rng = np.random.default_rng(1)
    reference = _calls(rng)
    with pytest.raises(ValueError, match="decode calls"):
        device_check.compare_masks(reference[:1], reference)
    moved = [(reference[0][0] + 5, reference[0][1]), reference[1]]
    with pytest.raises(ValueError, match="other boxes"):
        device_check.compare_masks(moved, reference)


def test_runs_that_cannot_be_matched_fail_the_check_instead_of_crashing():
    rng = np.random.default_rng(2)
    reference = _calls(rng)
    result = device_check.compare_runs(reference[:1], reference)
    assert result["agreement"] == 0.0 and result["prompts"] == 0 and "decode calls" in result["error"]


def test_a_stage_that_fails_on_the_device_is_recorded():
    def out_of_memory():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    row = device_check._stage(device_check.Device("cpu"), out_of_memory, device_check.SELF_TEST, 4, host=False,
                              masks=lambda: None, reference=None)
    assert row == {"error": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"}
    logits = np.random.default_rng(3).normal(size=(4, 1, 8, 8)).astype(np.float32)
    row = device_check._stage(device_check.Device("cpu"), lambda: None, device_check.SELF_TEST, 4, host=True,
                              masks=lambda: logits, reference=logits)
    assert row["agreement_with_cpu"] == 1.0 and row["repeats"] == device_check.SELF_TEST.repeats
    assert row["per_box_ms"] == pytest.approx(row["median_ms"] / 4)


def test_the_cpu_device_helpers_time_without_cuda_calls():
    device = device_check.Device("cpu")
    calls = []
    times = device.host_timed(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(times) == 3 and len(calls) == 5 and all(t >= 0 for t in times)
    assert len(device.device_timed(lambda: None, warmup=1, repeats=2)) == 2
    device.reset_peak()
    assert device.peak_mib() is None and device.describe()["device"] == "cpu"


@pytest.mark.slow
def test_sam2_decoder_stays_the_cuda_path(checkpoint_dir):
    """Until CUDA has been measured, a CUDA choice never uses FastBoxDecoder."""
    from sam2_refine.model.sam2_model import DeviceChoice, Sam2BoxPredictor, build_model

    model = build_model(checkpoint_dir / "sam2.1_hiera_tiny.pt", DeviceChoice("cpu", False, False))
    for choice in (DeviceChoice("cuda", True, True), DeviceChoice("cuda", False, False)):
        assert Sam2BoxPredictor(model, choice).decoder_name == "sam2's MaskDecoder"
    assert Sam2BoxPredictor(model, DeviceChoice("cpu", False, False)).decoder_name.startswith("FastBoxDecoder")


@pytest.mark.slow
def test_cpu_self_test_runs_every_step(checkpoint_dir, tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(tmp_path),
                           "--checkpoint", str(checkpoint_dir / "sam2.1_hiera_tiny.pt")],
                          capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "all checks passed" in done.stdout
    result = json.loads((tmp_path / "device_check_cpu.json").read_text())
    table = (tmp_path / "device_check_cpu.md").read_text()
    plan = device_check.SELF_TEST
    # the job ran through job.run_compute on both predictors, and every prompt was compared
    assert result["jobs"]["device"]["exit"] == 0 and result["jobs"]["cpu"]["exit"] == 0
    assert result["comparison"]["prompts"] == plan.locations * plan.objects
    assert result["comparison"]["agreement"] >= 0.99 and 0.01 < result["comparison"]["reference_mask_fraction"] < 0.99
    assert result["decoder_name"] == "sam2's MaskDecoder" and result["precision"]
    assert {d for d, _ in result["precision"]} == {"float32"}
    # timings at every batch, for each decoder, with the masks compared
    for stage in ("decode", "sam2_decoder", "fast_decoder"):
        assert sorted(int(b) for b in result["timing"][stage]) == sorted(plan.batches), stage
    assert result["timing"]["encoder"]["median_ms"] > 0
    assert all(row["agreement_with_cpu"] >= 0.99 for row in result["timing"]["sam2_decoder"].values())
    checks = {c["check"]: c["passed"] for c in result["checks"]}
    assert checks["bfloat16 autocast and TF32 (CUDA only)"] is None  # said, not faked
    assert all(v for k, v in checks.items() if v is not None)
    assert "| check | seen | result |" in table and "FastBoxDecoder" in table
