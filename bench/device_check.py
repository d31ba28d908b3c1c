"""One-command CUDA check: the worker's model path on this machine's GPU, checked and timed.

Run from the repository root (after ``make venv``), or inside the worker's Docker image
(docs/performance.md, "GPU hosts")::

    .venv/bin/python bench/device_check.py               # CUDA; about a minute, at most 5
    .venv/bin/python bench/device_check.py --device cpu  # self-test of this script on the CPU
    .venv/bin/python bench/device_check.py --checkpoint /code/sam2/checkpoints/sam2.1_hiera_tiny.pt

Without CUDA (``--device cuda``, the default) it prints one line saying so and exits 0.

With CUDA it:

1. builds SAM2.1 tiny with random weights (:mod:`sam2_refine.testing.checkpoints`; or loads
   ``--checkpoint``) twice from the same file: once on the GPU as the worker chooses
   (:func:`sam2_refine.model.sam2_model.choose_device`: bfloat16 autocast and TF32 on compute
   capability >= 8), once on the CPU in float32;
2. runs the same compute job of the local NimbusImage test server (synthetic cells, default
   fields) through the real job path, ``job.run_compute`` over HTTP, on each: the GPU run, a
   GPU float32 control run, and the CPU float32 reference. Random weights give arbitrary but
   deterministic masks, which the engine mostly rejects, so the comparison is of what the
   decoder gave the engine: every ``decode()`` call is captured (boxes and the 256 x 256
   low-resolution logits), the calls are matched one to one (same boxes, in the same order),
   and the masks (logit > 0) are compared pixel by pixel. It checks: pixel agreement of the
   GPU run with the CPU reference >= 0.99 and mean mask IoU >= 0.95 (the float32 control shows how much of any
   difference is bfloat16/TF32 precision rather than the GPU path); no NaN; the decoder ran
   under bfloat16 autocast with TF32 allowed during inference, and TF32 was restored
   afterwards; sam2's own decoder is the GPU path (the CPU's FastBoxDecoder is not used there);
3. times, on the GPU with the worker's precision: the encoder per frame (``embed()`` of a
   1024 x 1024 image, host resize included), and the decoder at batches 1, 16, 64 and 256 (the
   whole ``decode()`` as the job calls it; sam2's mask decoder alone; FastBoxDecoder alone if it
   runs on CUDA, with its masks compared with sam2's), after warm-up calls, as medians of
   repeats (``torch.cuda.synchronize`` around host-timed calls, CUDA events around
   device-only calls), with the peak GPU memory (``torch.cuda.max_memory_allocated``) of
   each stage;
4. writes ``device_check_<device>.json`` and ``.md`` (a Markdown table) to ``--out``
   (bench/results/), prints the table and exits 1 if a check failed.

``--device cpu`` runs every step above on the CPU on a tiny configuration (the "GPU" run is
then a CPU float32 run through sam2's decoder, the GPU path's decoder; the control run and the
CUDA-only readings are skipped): it checks this script, not a device. The test suite runs it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOKEN = "device-check-token"
AGREEMENT_MIN = 0.99
IOU_MIN = 0.95  # masks of trained weights cover little of the grid: agreement alone would hide a bad mask
TIME_LIMIT_S = 300


@dataclass(frozen=True)
class Plan:
    """What is run and timed."""

    frame: int  # frame side in pixels (square, one channel, uint16)
    locations: int
    objects: int  # per location
    batches: tuple[int, ...]
    warmup: int
    repeats: int


FULL = Plan(frame=1024, locations=2, objects=48, batches=(1, 16, 64, 256), warmup=3, repeats=20)
SELF_TEST = Plan(frame=256, locations=1, objects=6, batches=(1, 4), warmup=1, repeats=1)


# -- the device: every CUDA-only call is here, behind ``cuda`` -------------------------------

class Device:
    """Synchronisation, timing and memory readings for ``"cuda"`` or ``"cpu"``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.cuda = name == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float | None:
        """Peak memory allocated on the GPU since :meth:`reset_peak` (None on the CPU)."""
        return torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None

    def host_timed(self, fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
        """Milliseconds per call of ``fn`` (host and device work), synchronised around each."""
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(repeats):
            self.sync()
            started = time.perf_counter()
            fn()
            self.sync()
            out.append((time.perf_counter() - started) * 1000)
        return out

    def device_timed(self, fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
        """Milliseconds per call of ``fn``, device work only: CUDA events on the GPU."""
        if not self.cuda:
            return self.host_timed(fn, warmup, repeats)
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        out = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        return out

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"device": self.name, "torch": torch.__version__, "torch_cuda": torch.version.cuda}
        if self.cuda:
            props = torch.cuda.get_device_properties(0)
            info.update(name=props.name, capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                        memory_gib=round(props.total_memory / 2**30, 1))
        else:
            info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
        return info


# -- capturing what the decoder gave the engine ------------------------------------------------

class Capture:
    """A BoxPredictor that records every decode call of the predictor it wraps.

    ``calls``: (boxes (N, 4) float32, logits (N, C, 256, 256) float32) per call, in order.
    ``precision``: per decoder forward, (output dtype, TF32 allowed then), read by a hook.
    """

    def __init__(self, predictor: Any, untrained: bool) -> None:
        self.predictor = predictor
        self.untrained = untrained
        self.calls: list[tuple[Any, Any]] = []
        self.precision: list[tuple[str, bool]] = []
        # whole 256 x 256 logits are compared between runs: the engine is not offered windows
        self.logit_grid = None
        self._hook = predictor.model.sam_mask_decoder.register_forward_hook(self._record_precision)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.predictor, name)

    def close(self) -> None:
        self._hook.remove()

    def _record_precision(self, module: Any, args: Any, output: Any) -> None:
        self.precision.append((str(output[0].dtype).replace("torch.", ""),
                               bool(torch.backends.cuda.matmul.allow_tf32)))

    def embed(self, image: Any, region_hw: tuple[int, int] | None = None) -> None:
        self.predictor.embed(image, region_hw)

    def decode(self, boxes: Any, mask_inputs: Any = None, multimask: bool = False) -> Any:
        decoded = self.predictor.decode(boxes, mask_inputs, multimask)
        self.calls.append((np.asarray(boxes, dtype=np.float32).copy(), decoded.logits.copy()))
        return decoded


def compare_masks(run: list[tuple[Any, Any]], reference: list[tuple[Any, Any]]) -> dict[str, Any]:
    """Pixel agreement of two runs' masks (logit > 0), call by call and prompt by prompt.

    Raises:
        ValueError: the runs did not decode the same prompts in the same order.
    """
    if len(run) != len(reference):
        raise ValueError(f"{len(run)} decode calls against {len(reference)} in the reference")
    for k, ((boxes, _), (ref_boxes, _)) in enumerate(zip(run, reference, strict=True)):
        if boxes.shape != ref_boxes.shape or not np.allclose(boxes, ref_boxes, atol=1e-3):
            raise ValueError(f"decode call {k} had other boxes than the reference's")
    logits = np.concatenate([c[1] for c in run]) if run else np.zeros((0, 1, 1, 1), np.float32)
    ref = np.concatenate([c[1] for c in reference]) if reference else np.zeros((0, 1, 1, 1), np.float32)
    if logits.shape != ref.shape:
        raise ValueError(f"logits {logits.shape} against {ref.shape} in the reference")
    masks, ref_masks = logits > 0, ref > 0
    per_prompt = (masks == ref_masks).reshape(len(ref), -1).mean(axis=1)
    union = (masks | ref_masks).reshape(len(ref), -1).sum(axis=1)
    inter = (masks & ref_masks).reshape(len(ref), -1).sum(axis=1)
    scale = float(np.sqrt(np.mean(ref.astype(np.float64) ** 2))) or 1.0
    pixels = ref_masks.reshape(len(ref), -1).sum(axis=1)
    grid = ref_masks[0].size if len(ref) else 1
    decided = np.abs(ref) >= 0.01 * scale  # pixels whose reference logit is not within 1 % RMS of 0
    return {
        "prompts": int(len(ref)),
        "agreement": float((masks == ref_masks).mean()) if ref.size else 1.0,
        "worst_prompt_agreement": float(per_prompt.min()) if len(ref) else 1.0,
        "mask_iou_mean": float(np.mean(inter[union > 0] / union[union > 0])) if (union > 0).any() else 1.0,
        "reference_mask_fraction": float(ref_masks.mean()) if ref.size else 0.0,
        "nontrivial_prompts": float(np.mean((pixels > 0) & (pixels < grid))) if len(ref) else 0.0,
        "agreement_away_from_zero": float((masks == ref_masks)[decided].mean()) if decided.any() else 1.0,
        "relative_l2": float(np.linalg.norm((logits - ref).ravel()) / (np.linalg.norm(ref.ravel()) or 1.0)),
        "max_abs_difference": float(np.abs(logits - ref).max()) if ref.size else 0.0,
        "finite": bool(np.isfinite(logits).all()),
    }


def compare_runs(run: list[tuple[Any, Any]], reference: list[tuple[Any, Any]]) -> dict[str, Any]:
    """:func:`compare_masks`, with runs that cannot be matched reported (agreement 0), not raised."""
    try:
        return compare_masks(run, reference)
    except ValueError as exc:
        return {"prompts": 0, "agreement": 0.0, "worst_prompt_agreement": 0.0, "mask_iou_mean": 0.0,
                "reference_mask_fraction": 0.0, "nontrivial_prompts": 0.0,
                "agreement_away_from_zero": 0.0, "relative_l2": float("nan"),
                "max_abs_difference": float("nan"), "finite": False, "error": str(exc)}


# -- the job -----------------------------------------------------------------------------------

def build_dataset(server: Any, plan: Plan) -> Any:
    from sam2_refine.testing.datasets import grid_scene, rough_octagons

    scene = grid_scene(plan.frame, plan.frame, plan.objects, channels=1, seed=0)
    pixels = np.broadcast_to(scene.channels, (plan.locations, 1, 1) + scene.channels.shape).copy()
    ds = server.add_dataset(pixels)
    rng = np.random.default_rng(0)
    for xy in range(plan.locations):
        server.add_annotations(ds.dataset_id, [
            {"shape": "polygon", "tags": ["rough"], "channel": 0, "location": {"XY": xy, "Z": 0, "Time": 0},
             "coordinates": [{"x": float(x), "y": float(y)} for x, y in ring]}
            for ring in rough_octagons(scene.centres, scene.radii, rng)])
    return ds


def run_job(server: Any, ds: Any, checkpoint: Path, predictor: Any, device: Device) -> dict[str, Any]:
    """``job.run_compute`` with default fields; returns its outcome, time and peak memory.
    Its refinements are removed afterwards, so that the next run refines the same originals."""
    from sam2_refine.job import compute as job
    from sam2_refine.nimbus.client import NimbusClient
    from sam2_refine.nimbus.progress import Reporter
    from sam2_refine.job.settings import parse_settings

    params = {"workerInterface": {"Model": checkpoint.name, "Tag of objects to refine": ["rough"],
                                  "Batch XY": "all", "Batch Z": "all", "Batch Time": "all"},
              "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 0, "tags": ["device-check"]}
    settings = parse_settings(params, ds.dataset_id, checkpoint.parent)
    reporter = Reporter(stream=io.StringIO(), secrets=(TOKEN,))
    with NimbusClient(server.api_url, TOKEN) as client:
        device.reset_peak()
        started = time.perf_counter()
        code = job.run_compute(settings, client, reporter, lambda path: (predictor, predictor.untrained))
        device.sync()
        seconds = time.perf_counter() - started
        made = [a["_id"] for a in server.annotations(ds.dataset_id) if a["tags"] == ["device-check"]]
        if made:
            client.delete_annotations(made)
    finals = [line for line in reporter.lines if "progress" in line]
    errors = [line for line in reporter.lines if "error" in line]
    return {"exit": code, "seconds": seconds, "peak_gpu_mib": device.peak_mib(),
            "summary": finals[-1].get("info", "") if finals else "", "errors": errors}


# -- timings -----------------------------------------------------------------------------------

def summarise(times_ms: list[float], per: int = 1) -> dict[str, float]:
    return {"median_ms": statistics.median(times_ms), "min_ms": min(times_ms),
            "per_box_ms": statistics.median(times_ms) / per, "repeats": len(times_ms)}


def time_model(predictor: Any, reference: Any, image: Any, plan: Plan, device: Device) -> dict[str, Any]:
    """Encoder per frame and decoder per box at each batch size, on ``predictor``'s device.

    ``reference`` (the CPU float32 predictor) embeds the same image once, so that the
    decoders' masks on the device can be compared with the reference's for the same prompts.
    """
    from sam2_refine.model.sam2_model import inference_mode

    out: dict[str, Any] = {"encoder": {}, "decode": {}, "sam2_decoder": {}, "fast_decoder": {}}
    device.reset_peak()
    out["encoder"] = summarise(device.host_timed(lambda: predictor.embed(image), plan.warmup, plan.repeats))
    out["encoder"]["peak_gpu_mib"] = device.peak_mib()
    predictor.embed(image)
    reference.embed(image)
    rng = np.random.default_rng(0)
    side = image.shape[0]
    centres = rng.uniform(0.1 * side, 0.9 * side, size=(max(plan.batches), 2))
    half = rng.uniform(0.02 * side, 0.08 * side, size=(max(plan.batches), 2))
    all_boxes = np.concatenate([centres - half, centres + half], axis=1).astype(np.float32)

    model, choice = predictor.model, predictor.choice
    features = predictor._predictor._features  # what Sam2BoxPredictor.decode gives sam2's decoder
    fast = None
    try:
        from sam2_refine.model.fast_decoder import FastBoxDecoder

        fast = FastBoxDecoder(model)
        with inference_mode(choice):
            fast.set_image_features(features["image_embed"], list(features["high_res_feats"]))
    except Exception as exc:  # noqa: BLE001 - any failure on this device is the finding
        out["fast_decoder"] = {"ran": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        fast = None

    for batch in plan.batches:
        boxes = all_boxes[:batch]
        reference_logits = reference.decode(boxes).logits
        out["decode"][batch] = _stage(device, lambda b=boxes: predictor.decode(b), plan, batch, host=True,
                                      masks=lambda b=boxes: predictor.decode(b).logits, reference=reference_logits)
        with inference_mode(choice):
            scale = np.array([side, side, side, side], dtype=np.float32)
            coords = torch.as_tensor((boxes + 0.5) / scale * predictor.input_size,
                                     device=choice.device).reshape(-1, 2, 2)
            labels = torch.tensor([[2, 3]], dtype=torch.int, device=choice.device).repeat(batch, 1)
            sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)

            def sam2_decoder(sparse=sparse, dense=dense, batch=batch):
                return model.sam_mask_decoder(
                    image_embeddings=features["image_embed"], image_pe=model.sam_prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
                    repeat_image=batch > 1, high_res_features=list(features["high_res_feats"]))[0]

            out["sam2_decoder"][batch] = _stage(device, sam2_decoder, plan, batch, host=False,
                                                masks=lambda f=sam2_decoder: _logits(f()), reference=reference_logits)
            if fast is not None:
                out["fast_decoder"][batch] = _stage(device, lambda s=sparse, f=fast: f(s, False), plan, batch,
                                                    host=False, masks=lambda s=sparse, f=fast: _logits(f(s, False)[0]),
                                                    reference=reference_logits)
    return out


def _logits(tensor: Any) -> Any:
    """Device logits -> float32 numpy, clamped as Sam2BoxPredictor.decode clamps them."""
    return torch.clamp(tensor.float(), -32.0, 32.0).cpu().numpy()


def _stage(device: Device, fn: Callable[[], Any], plan: Plan, batch: int, host: bool,
           masks: Callable[[], Any], reference: Any) -> dict[str, Any]:
    """Time ``fn`` (a decoder call on ``batch`` prompts), read its peak GPU memory, and compare
    the masks ``masks()`` gives with ``reference`` (N, 1, 256, 256). A failure on the device (out
    of memory, an unsupported kernel) is recorded as this stage's finding, not raised."""
    try:
        device.reset_peak()
        timer = device.host_timed if host else device.device_timed
        row = summarise(timer(fn, plan.warmup, plan.repeats), batch)
        row["peak_gpu_mib"] = device.peak_mib()
        row["agreement_with_cpu"] = compare_masks([(np.zeros((batch, 4), np.float32), masks())],
                                                  [(np.zeros((batch, 4), np.float32), reference)])["agreement"]
        return row
    except (RuntimeError, ValueError) as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


# -- the report --------------------------------------------------------------------------------

def checks(result: dict[str, Any], device: Device) -> list[dict[str, Any]]:
    """Each check: name, what was seen, passed (None: not applicable here)."""
    main, control = result["comparison"], result.get("control_comparison")
    precision = result["precision"]
    choice = result["choice"]
    out = [
        {"check": f"mask pixel agreement with the CPU float32 run >= {AGREEMENT_MIN}",
         "seen": f"runs not comparable: {main['error']}" if "error" in main else
                 f"{main['agreement']:.5f} over {main['prompts']} prompts (worst prompt "
                 f"{main['worst_prompt_agreement']:.4f}; away from zero {main['agreement_away_from_zero']:.5f}; "
                 f"mask IoU {main['mask_iou_mean']:.4f}; relative L2 {main['relative_l2']:.2e})",
         "passed": main["agreement"] >= AGREEMENT_MIN and main["prompts"] > 0},
        {"check": f"mean mask IoU with the CPU's >= {IOU_MIN}", "seen": f"{main['mask_iou_mean']:.4f}",
         "passed": main["mask_iou_mean"] >= IOU_MIN},
        {"check": "masks are not trivial (most prompts' reference mask neither empty nor the whole grid)",
         "seen": f"{100 * main['nontrivial_prompts']:.0f} % of prompts; masks cover "
                 f"{100 * main['reference_mask_fraction']:.1f} % of the grid",
         "passed": main["nontrivial_prompts"] >= 0.5},
        {"check": "no NaN or infinite logits", "seen": str(main["finite"]), "passed": main["finite"]},
        {"check": "both jobs finished (exit 0)",
         "seen": f"{result['jobs']['device']['exit']} / {result['jobs']['cpu']['exit']}",
         "passed": result["jobs"]["device"]["exit"] == 0 and result["jobs"]["cpu"]["exit"] == 0},
        {"check": "sam2's decoder is the GPU path", "seen": result["decoder_name"],
         "passed": result["decoder_name"] == "sam2's MaskDecoder"},
    ]
    dtypes = sorted({d for d, _ in precision})
    tf32_inside = sorted({t for _, t in precision})
    if device.cuda:
        out.append({"check": "float32 control run agrees with the CPU (>= 0.999)",
                    "seen": f"{control['agreement']:.5f} (relative L2 {control['relative_l2']:.2e})",
                    "passed": control["agreement"] >= 0.999})
        out.append({"check": "decoder ran under bfloat16 autocast" if choice["bfloat16"] else
                    "decoder ran in float32 (compute capability < 8: no bfloat16)",
                    "seen": ", ".join(dtypes),
                    "passed": dtypes == (["bfloat16"] if choice["bfloat16"] else ["float32"])})
        out.append({"check": "TF32 allowed during inference" if choice["tf32"] else "TF32 not used",
                    "seen": ", ".join(map(str, tf32_inside)), "passed": tf32_inside == [choice["tf32"]]})
    else:
        out.append({"check": "bfloat16 autocast and TF32 (CUDA only)", "seen": f"{', '.join(dtypes)}; TF32 "
                    f"{', '.join(map(str, tf32_inside))}", "passed": None})
    out.append({"check": "TF32 setting restored after the job", "seen": str(result["tf32_after"]),
                "passed": result["tf32_after"] == result["tf32_before"]})
    return out


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [f"# Device check, {result['date']}: {env['name']} ({env['device']})", "",
             f"torch {env['torch']} (CUDA build {env['torch_cuda']})"
             + (f", compute capability {env['capability']}, {env['memory_gib']} GiB" if env["device"] == "cuda" else "")
             + f"; model: {result['model']}; precision: {result['choice']['describe']}; "
             f"decoder: {result['decoder_name']}; total {result['seconds']:.0f} s.", "",
             "| check | seen | result |", "|---|---|---|"]
    for c in result["checks"]:
        verdict = "n/a" if c["passed"] is None else ("pass" if c["passed"] else "**FAIL**")
        lines.append(f"| {c['check']} | {c['seen']} | {verdict} |")
    jobs = result["jobs"]
    lines += ["", "| job (" + f"{result['plan']['locations']} x {result['plan']['frame']} px, "
              f"{result['plan']['objects']} objects each) | seconds | peak GPU MiB | outcome |", "|---|---|---|---|"]
    for name, run in jobs.items():
        peak = "-" if run["peak_gpu_mib"] is None else f"{run['peak_gpu_mib']:.0f}"
        lines.append(f"| {name} | {run['seconds']:.2f} | {peak} | {run['summary']} |")
    t = result["timing"]
    lines += ["", "| stage | batch | median ms | per box ms | min ms | peak GPU MiB | masks agree with CPU |",
              "|---|---|---|---|---|---|---|"]

    def peak(row: dict[str, Any]) -> str:
        return "-" if row.get("peak_gpu_mib") is None else f"{row['peak_gpu_mib']:.0f}"

    enc = t["encoder"]
    lines.append(f"| encoder (embed, per frame) | 1 | {enc['median_ms']:.2f} | - | {enc['min_ms']:.2f} | "
                 f"{peak(enc)} | - |")
    for stage, label in (("decode", "decode() as the job calls it"), ("sam2_decoder", "sam2's mask decoder"),
                         ("fast_decoder", "FastBoxDecoder")):
        rows = t[stage]
        if rows.get("ran") is False:
            lines.append(f"| {label} | - | did not run: {rows['error']} | | | | |")
            continue
        for batch, row in rows.items():
            if "error" in row:
                lines.append(f"| {label} | {batch} | failed: {row['error']} | | | | |")
                continue
            agree = f"{row['agreement_with_cpu']:.4f}" if "agreement_with_cpu" in row else "-"
            lines.append(f"| {label} | {batch} | {row['median_ms']:.3f} | {row['per_box_ms']:.4f} | "
                         f"{row['min_ms']:.3f} | {peak(row)} | {agree} |")
    return "\n".join(lines) + "\n"


# -- main --------------------------------------------------------------------------------------

def check(device: Device, plan: Plan, checkpoint: Path | None, out_dir: Path) -> dict[str, Any]:
    from sam2_refine.engine.imaging import default_layers
    from sam2_refine.job.compute import load_location_image
    from sam2_refine.nimbus.client import NimbusClient
    from sam2_refine.model.sam2_model import DeviceChoice, Sam2BoxPredictor, choose_device
    from sam2_refine.annotations import Location
    from sam2_refine.testing.checkpoints import make_untrained_checkpoint
    from sam2_refine.testing.nimbus_server import NimbusTestServer

    started = time.perf_counter()
    cpu = DeviceChoice("cpu", bfloat16=False, tf32=False)
    choice = choose_device() if device.cuda else cpu
    with tempfile.TemporaryDirectory() as tmp:
        if checkpoint is None:
            checkpoint = make_untrained_checkpoint(Path(tmp) / "sam2.1_hiera_tiny.pt", seed=0)
            model_name = "SAM2.1 tiny, random weights (seed 0)"
        else:
            model_name = checkpoint.name
        # On CUDA, loaded exactly as the worker loads it; on the CPU self-test with the decoder
        # the GPU path uses (sam2's), not the CPU's FastBoxDecoder.
        loaded, untrained = Sam2BoxPredictor.load(checkpoint, choice, **({} if device.cuda else
                                                                          {"fast_decoder": False}))
        on_device = Capture(loaded, untrained)
        reference = Capture(*Sam2BoxPredictor.load(checkpoint, cpu))  # the CPU path in float32
        result: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M"), "environment": device.describe(), "model": model_name,
            "plan": asdict(plan), "choice": {**asdict(choice), "describe": choice.describe()},
            "decoder_name": on_device.decoder_name if device.cuda
            else Sam2BoxPredictor(on_device.model, DeviceChoice("cuda", True, True)).decoder_name,
            "tf32_before": bool(torch.backends.cuda.matmul.allow_tf32), "jobs": {}}
        with NimbusTestServer(token=TOKEN) as server:
            ds = build_dataset(server, plan)
            result["jobs"]["device"] = run_job(server, ds, checkpoint, on_device, device)
            result["tf32_after"] = bool(torch.backends.cuda.matmul.allow_tf32)
            result["precision"] = list(on_device.precision)
            if device.cuda:  # float32 on the GPU: how much of a difference is precision
                control = Capture(Sam2BoxPredictor(on_device.model, DeviceChoice("cuda", False, False),
                                                   fast_decoder=False), untrained)
                result["jobs"]["device float32 (control)"] = run_job(server, ds, checkpoint, control, device)
                control.close()
            result["jobs"]["cpu"] = run_job(server, ds, checkpoint, reference, Device("cpu"))
            result["comparison"] = compare_runs(on_device.calls, reference.calls)
            if device.cuda:
                result["control_comparison"] = compare_runs(control.calls, reference.calls)
            with NimbusClient(server.api_url, TOKEN) as client:
                info = client.get_dataset_info(ds.dataset_id)
                frame = load_location_image(client, info, default_layers(1), Location(0, 0, 0))
        on_device.close()
        reference.close()
        image = frame.window(0, 0, frame.height, frame.width)
        result["timing"] = time_model(on_device.predictor, reference.predictor, image, plan, device)
    result["seconds"] = time.perf_counter() - started
    result["checks"] = checks(result, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"device_check_{device.name}.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / f"device_check_{device.name}.md").write_text(markdown(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default), or cpu: a self-test of this script on a tiny configuration")
    parser.add_argument("--checkpoint", type=Path, help="a SAM2.1 checkpoint file (default: random weights)")
    parser.add_argument("--full", action="store_true", help="with --device cpu: the CUDA configuration")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"No CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}) sees no GPU "
              "here; nothing was checked.")
        return 0
    device = Device(args.device)
    plan = FULL if device.cuda or args.full else SELF_TEST
    torch.manual_seed(0)
    result = check(device, plan, args.checkpoint, args.out)
    print(markdown(result))
    print(f"written {args.out / f'device_check_{device.name}.json'} and .md")
    failed = [c["check"] for c in result["checks"] if c["passed"] is False]
    if result["seconds"] > TIME_LIMIT_S:
        print(f"note: the check took {result['seconds']:.0f} s, over its {TIME_LIMIT_S} s target")
    if failed:
        print("FAILED: " + "; ".join(failed))
        return 1
    print("all checks passed" + ("" if device.cuda else " (CPU self-test: the CUDA-only checks were not run)"))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
