"""The CPU image encoder in bfloat16 against float32: speed, and agreement through the engine.

Run from the repository root (after ``make venv``)::

    .venv/bin/python bench/bench_encoder_precision.py                 # all three parts
    .venv/bin/python bench/bench_encoder_precision.py --part speed    # or agreement, or job

Three parts, each printing a table and writing JSON to ``bench/results/encoder_precision.json``:

- **speed**: ``Sam2BoxPredictor.embed`` of one 1024 x 1024 image (what a job pays per region:
  the resize, the image encoder, the decoder's high-resolution projections and the fast
  decoder's per-image work) for SAM2.1 tiny, small and base+ with the encoder in float32 (what
  a float32 job runs), float32 with a channels-last input, bfloat16 autocast, and bfloat16
  autocast with a channels-last input (what a job runs where the CPU has bfloat16 units). The
  variants share one model and alternate call by call after an untimed warm-up; the median and
  the fastest of ``--rounds`` calls are reported.
- **agreement** (a numerics check: random weights, so the masks are noise): the float32 and the
  bfloat16 encoder on the same frames, through the project's own decoder (``FastBoxDecoder``)
  and outline pipeline: the sign agreement of the 256 x 256 logits of every box, each box's
  mask IoU on that grid (the single mask a job asks for, and each of the three masks without
  sam2's choice among them), the outlines the engine's tracing makes of each box's mask
  (without its acceptance rules, which random masks fail) and how many differ in shape, and,
  from the engine itself (``refine.refine_location``), which originals change outcome (refined
  / kept). Frames: the bundled ``examples/nuclei`` (512 px, 28 nuclei: its 28 rough
  annotations and a box around each nucleus) and a synthetic dense 512 px field of 200
  touching nuclei (a box around each). Each with the model's decoder as initialised and
  sharpened (:data:`DECODERS`).
- **job**: the real job (``job.run_compute`` over HTTP against the local test server) on the speed
  benchmark's scenes with the stand-in's realistic masks (``bench/realistic_masks.py``): the
  model runs in full, its logits replaced by those of the object under each prompt. Three runs:
  float32; bfloat16 (the same masks by construction: what may change is what depends on the
  model's own scores); and bfloat16 with its error carried over, where each prompt's logits are
  the realistic ones plus the model's bfloat16-minus-float32 logit difference for that prompt,
  scaled by 8 / (standard deviation of its float32 logits), so that the difference is as large
  relative to the realistic logits (+-8) as it is relative to the model's own. The outlines of
  the bfloat16 runs are compared with the float32 run's.

Timings on a shared machine vary; the JSON records the load average before and after each part.
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
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from realistic_masks import MaskOracle, RealisticBoxPredictor  # noqa: E402
from speed_scenes import Config, build_dataset, job_parameters  # noqa: E402

from sam2_refine.model.cpu_precision import PRECISION_ENV  # noqa: E402
from sam2_refine.model.predictor import Decoded  # noqa: E402
from sam2_refine.model.sam2_model import DeviceChoice, Sam2BoxPredictor, build_model, choose_device  # noqa: E402
from sam2_refine.testing.checkpoints import make_untrained_checkpoint  # noqa: E402

MODELS = {"tiny": "sam2.1_hiera_tiny.pt", "small": "sam2.1_hiera_small.pt", "base_plus": "sam2.1_hiera_base_plus.pt"}
LABELS = {"tiny": "SAM2.1 tiny", "small": "SAM2.1 small", "base_plus": "SAM2.1 base+"}
TOKEN = "bench-token"

FP32 = DeviceChoice("cpu", bfloat16=False, tf32=False)
#: The speed part's variants (label -> choice); the last is what jobs run on a CPU with units.
VARIANTS = {
    "fp32": FP32,
    "fp32 channels_last": DeviceChoice("cpu", False, False, channels_last=True),
    "bf16 autocast": DeviceChoice("cpu", False, False, encoder_bfloat16=True),
    "bf16 autocast + channels_last": DeviceChoice("cpu", False, False, encoder_bfloat16=True, channels_last=True),
}


def chosen_bf16() -> DeviceChoice:
    """What a job runs with ``SAM2_REFINE_CPU_PRECISION=bf16``: the bfloat16 path as chosen."""
    return choose_device("cpu", environ={PRECISION_ENV: "bf16"})


def machine() -> dict[str, Any]:
    caps = dict(torch.cpu.get_capabilities())
    flags = [key for key in ("avx2", "avx512_f", "avx512_bf16", "amx_bf16", "amx_tile", "avx_ne_convert")
             if caps.get(key)]
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": str(caps.get("cpu_name", platform.processor())),
            "arch": platform.machine(), "cpus": os.cpu_count(), "bf16_flags": flags,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "job_choice": choose_device("cpu").describe()}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def model_for(key: str, directory: Path, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    path = directory / MODELS[key]
    if not path.exists():
        make_untrained_checkpoint(path, MODELS[key], seed=seed)
    return path, build_model(path, FP32)


# -- speed ------------------------------------------------------------------------------------

def speed(models: list[str], rounds: int, directory: Path) -> dict[str, Any]:
    image = np.random.default_rng(0).random((1024, 1024, 3), dtype=np.float32)
    out: dict[str, Any] = {"load_before": load_average(), "rounds": rounds, "models": {}}
    for key in models:
        _, model = model_for(key, directory)
        predictors = {label: Sam2BoxPredictor(model, choice) for label, choice in VARIANTS.items()}
        for predictor in predictors.values():  # warm-up, untimed
            predictor.embed(image)
        times: dict[str, list[float]] = {label: [] for label in predictors}
        cpu: dict[str, list[float]] = {label: [] for label in predictors}
        for _ in range(rounds):
            for label, predictor in predictors.items():
                started, started_cpu = time.perf_counter(), time.process_time()
                predictor.embed(image)
                times[label].append(time.perf_counter() - started)
                cpu[label].append(time.process_time() - started_cpu)
        out["models"][key] = times
        out.setdefault("cpu_seconds", {})[key] = cpu
        print(speed_table({"models": {key: times}, "cpu_seconds": {key: cpu}}), flush=True)
        del predictors, model
    out["load_after"] = load_average()
    return out


def speed_table(result: dict[str, Any]) -> str:
    """Wall seconds: median (speed-up of medians against fp32), fastest; then the process's CPU
    seconds (both threads; less sensitive to other processes on the machine), median."""
    labels = list(VARIANTS)
    lines = ["| model | " + " | ".join(f"{label} (s)" for label in labels) + " |",
             "|---|" + "---|" * len(labels)]
    for key, times in result["models"].items():
        base = statistics.median(times["fp32"])
        cpu = result.get("cpu_seconds", {}).get(key)
        cells = []
        for label in labels:
            median = statistics.median(times[label])
            speedup = "" if label == "fp32" else f" ({base / median:.2f}x)"
            cell = f"{median:.2f}{speedup}, fastest {min(times[label]):.2f}"
            if cpu:
                cpu_median = statistics.median(cpu[label])
                cell += f"; CPU {cpu_median:.2f}" + ("" if label == "fp32" else
                                                      f" ({statistics.median(cpu['fp32']) / cpu_median:.2f}x)")
            cells.append(cell)
        lines.append(f"| {LABELS[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- agreement (random weights: numerics) --------------------------------------------------------

def scenes() -> dict[str, tuple[np.ndarray, list[dict[str, Any]]]]:
    """name -> (float32 (H, W, 3) RGB in [0, 1], annotation documents)."""
    import tifffile

    from sam2_refine.engine.imaging import merge_layers, parse_layers
    from sam2_refine.testing.datasets import dense_scene

    example = REPO / "examples" / "nuclei"
    channels = tifffile.imread(example / "image.tif")
    layers = parse_layers(json.loads((example / "layers.json").read_text()), channels.shape[0])
    image = merge_layers({c: channels[c] for c in range(channels.shape[0])}, layers)
    truth = cv2.imread(str(example / "truth.png"), cv2.IMREAD_UNCHANGED).astype(np.int32)
    docs = []
    for k, ann in enumerate(json.loads((example / "annotations.json").read_text())):
        docs.append(_doc(f"r{k:03d}", "polygon", ann["coordinates"]))
    docs += _boxes_around(truth, "b")
    out = {"examples/nuclei 512 px (28 rough + 28 boxes)": (image, docs)}
    dense = dense_scene(512, 512, 200, seed=3, spacing=1.2)
    plane = dense.channels[0].astype(np.float32)
    plane = np.clip((plane - plane.min()) / max(float(np.ptp(plane)), 1.0), 0, 1)
    out[f"dense 512 px ({dense.count} touching nuclei, boxes)"] = (np.repeat(plane[..., None], 3, axis=2),
                                                                   _boxes_around(dense.labels, "d"))
    return out


def _doc(ann_id: str, shape: str, coordinates: list[dict[str, float]]) -> dict[str, Any]:
    return {"_id": ann_id, "shape": shape, "tags": ["n"], "channel": 0, "location": {"XY": 0, "Z": 0, "Time": 0},
            "coordinates": coordinates}


def _boxes_around(labels: np.ndarray, prefix: str, margin: float = 2.5) -> list[dict[str, Any]]:
    docs = []
    for k in range(1, int(labels.max()) + 1):
        rows, cols = np.nonzero(labels == k)
        if not len(rows):
            continue
        x0, x1, y0, y1 = cols.min() - margin, cols.max() + margin, rows.min() - margin, rows.max() + margin
        docs.append(_doc(f"{prefix}{k:04d}", "polygon", [{"x": float(x), "y": float(y)} for x, y in
                                                          ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]))
    return docs


def feature_difference(reference: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    """std(other - reference) / std(reference) of each feature map the decoder is handed."""
    pairs = {"image_embed": (reference["image_embed"], other["image_embed"])}
    pairs.update({f"high_res_feats[{i}]": pair for i, pair in
                  enumerate(zip(reference["high_res_feats"], other["high_res_feats"], strict=True))})
    return {name: float((b - a).std() / a.std()) for name, (a, b) in pairs.items()}


def grid_agreement(reference: np.ndarray, other: np.ndarray) -> dict[str, Any]:
    """Sign agreement of two (N, C, h, w) logit stacks and each prompt's mask IoU on the grid
    (two empty masks agree: IoU 1)."""
    ref, oth = reference > 0, other > 0
    inter = np.logical_and(ref, oth).sum(axis=(1, 2, 3))
    union = np.logical_or(ref, oth).sum(axis=(1, 2, 3))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    spread = reference.reshape(len(reference), -1).std(axis=1)
    return {"sign_agreement": float((ref == oth).mean()),
            "sign_agreement_min_prompt": float((ref == oth).reshape(len(ref), -1).mean(axis=1).min()),
            "iou_mean": float(iou.mean()), "iou_min": float(iou.min()), "iou": iou.tolist(),
            "max_abs_diff": float(np.abs(reference - other).max()),
            "max_abs_diff_over_spread": float((np.abs(reference - other).reshape(len(reference), -1).max(axis=1)
                                               / np.maximum(spread, 1e-12)).max())}


def outcome_agreement(reference: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Originals whose outcome (refined / kept) differs, and the refined outlines that differ:
    not the same coordinates, and by shape (IoU of the two polygons)."""
    from shapely.geometry import Polygon

    changed = sorted(k for k in reference if (reference[k] is None) != (other.get(k) is None))
    both = [k for k in reference if reference[k] is not None and other.get(k) is not None]
    differ, ious = [], []
    for k in both:
        a, b = reference[k], other[k]
        if a == b:
            ious.append(1.0)
            continue
        differ.append(k)
        pa, pb = Polygon(a).buffer(0), Polygon(b).buffer(0)
        union = pa.union(pb).area
        ious.append(pa.intersection(pb).area / union if union else 1.0)
    return {"originals": len(reference), "refined_reference": sum(v is not None for v in reference.values()),
            "outline_iou_mean": float(np.mean(ious)) if ious else 1.0,
            "refined_other": sum(v is not None for v in other.values()), "outcome_changed": changed,
            "both_refined": len(both), "outlines_differ": len(differ),
            "outlines_differ_share": len(differ) / len(both) if both else 0.0,
            "outline_iou_min": min(ious, default=1.0),
            "outlines_iou_below_0.99_ids": {k: round(iou, 4) for k, iou in zip(both, ious) if iou < 0.99},
            "outlines_iou_below_0.99": sum(iou < 0.99 for iou in ious)}


def engine_outlines(predictor: Any, image: np.ndarray, docs: list[dict[str, Any]]) -> dict[str, Any]:
    """original id -> its refined outline ((x, y) tuples) or None (kept), from the engine."""
    from sam2_refine.annotations import Refined
    from sam2_refine.engine.location import refine_location
    from sam2_refine.engine.options import GeometryOptions
    from sam2_refine.job.selection import to_original

    outcomes = refine_location(predictor, image, [to_original(d) for d in docs],
                               GeometryOptions(resolution="whole", separate=True))
    return {o.original_id: ([tuple(p) for p in np.asarray(o.polygon.exterior.coords)] if isinstance(o, Refined)
                            else None) for o in outcomes}


#: The decoders of the agreement part: the random-weight model's own (logits of order 0.1, masks
#: positive over most of the grid: most traced outlines are the whole frame), and the same with
#: :func:`sam2_refine.testing.checkpoints.sharpen_decoder` (logits of order 10, masks positive over
#: 65-85 % of the grid with outlines of hundreds of vertices: a harder case for the outlines).
#: A box whose single mask has an IoU below this with float32's got another mask: sam2's
#: dynamic-multimask rule (mask 0 unless its stability is below 0.98, then the best-scored of
#: the other three) decided differently, not a drift of the same mask.
CHOICE_CHANGED = 0.9
PLAIN, SHARPENED = "decoder as initialised", "decoder sharpened"
DECODERS = (PLAIN, SHARPENED)


def traced_outlines(logits: np.ndarray, boxes: np.ndarray, docs: list[dict[str, Any]], frame_hw: tuple[int, int],
                    ) -> dict[str, Any]:
    """original id -> the outline the engine's tracing makes of its box's mask (or None), without
    the engine's acceptance rules (random masks fail them all): the component that overlaps
    the original most, in a window grown until it holds it, traced at the zero crossing and
    finished with the default Smoothing."""
    from sam2_refine.engine.geometry import (AnnotationProblem, Window, polygon_from_ring, rasterize_rough,
                                      ring_from_coordinates, select_component)
    from sam2_refine.engine.objects import object_mask
    from sam2_refine.engine.options import GeometryOptions
    from sam2_refine.engine.outlines import trace

    height, width = frame_hw
    region = Window(0, 0, height, width)
    out: dict[str, Any] = {}
    for k, doc in enumerate(docs):
        shape = polygon_from_ring(ring_from_coordinates(doc["coordinates"]))

        def choose(mask: np.ndarray, window: Window, shape=shape) -> np.ndarray | None:
            return select_component(mask, rasterize_rough(shape, window))[0]

        try:
            mask = object_mask(logits[k][0], region, frame_hw, boxes[k], choose, float("inf"), "", "no match")
            polygon = trace(mask, GeometryOptions(), frame_hw)
            out[doc["_id"]] = [tuple(p) for p in np.asarray(polygon.exterior.coords)]
        except AnnotationProblem:
            out[doc["_id"]] = None
    return out


def agreement(models: list[str], directory: Path) -> dict[str, Any]:
    from sam2_refine.engine.geometry import polygon_from_ring, prompt_box, ring_from_coordinates
    from sam2_refine.testing.checkpoints import sharpen_decoder

    out: dict[str, Any] = {"load_before": load_average(), "models": {}}
    frames = scenes()
    for key in models:
        _, model = model_for(key, directory)
        rows = {}
        for decoder in DECODERS:
            if decoder == SHARPENED:
                sharpen_decoder(model)
            fp32, bf16 = Sam2BoxPredictor(model, FP32), Sam2BoxPredictor(model, chosen_bf16())
            for name, (image, docs) in frames.items():
                height, width = image.shape[:2]
                boxes = np.stack([prompt_box(polygon_from_ring(ring_from_coordinates(d["coordinates"])), width,
                                             height) for d in docs])
                logits, multi, features = [], [], []
                for predictor in (fp32, bf16):
                    predictor.embed(image)
                    features.append(predictor._predictor._features)
                    logits.append(np.concatenate([predictor.decode(boxes[s:s + 64]).logits
                                                  for s in range(0, len(boxes), 64)]))
                    multi.append(np.concatenate([predictor.decode(boxes[s:s + 64], multimask=True).logits
                                                 for s in range(0, len(boxes), 64)]).reshape(-1, 1, 256, 256))
                row = grid_agreement(*logits)
                row["boxes"] = len(boxes)
                row["features_relative_difference"] = feature_difference(*features)
                row["choice_changed"] = int(np.count_nonzero(np.array(row["iou"]) < CHOICE_CHANGED))
                row["multimask"] = {k: v for k, v in grid_agreement(*multi).items() if k != "iou"}
                row["positive_share"] = float((logits[0] > 0).mean())
                row["traced"] = outcome_agreement(*(traced_outlines(x, boxes, docs, (height, width)) for x in logits))
                row["traced_vertices_median"] = float(np.median(
                    [len(v) for v in traced_outlines(logits[0], boxes, docs, (height, width)).values() if v]))
                row["engine"] = outcome_agreement(engine_outlines(fp32, image, docs),
                                                  engine_outlines(bf16, image, docs))
                rows[f"{name}, {decoder}"] = row
                print(f"{LABELS[key]}, {name}, {decoder}: {agreement_line(row)}", flush=True)
            del fp32, bf16
        out["models"][key] = rows
        del model
    out["load_after"] = load_average()
    return out


def agreement_line(row: dict[str, Any]) -> str:
    engine, traced = row["engine"], row["traced"]
    return (f"{row['boxes']} boxes: sign agreement {row['sign_agreement']:.5f} (worst box "
            f"{row['sign_agreement_min_prompt']:.4f}), positive {row['positive_share']:.3f}, mask IoU mean "
            f"{row['iou_mean']:.4f} min {row['iou_min']:.4f}, other mask chosen {row['choice_changed']}; three masks: "
            f"sign agreement {row['multimask']['sign_agreement']:.5f}, IoU min {row['multimask']['iou_min']:.4f}; "
            f"traced outlines' median vertices "
            f"{row['traced_vertices_median']:.0f}; "
            f"traced: {traced['refined_reference']} / {traced['refined_other']}, outlines differ "
            f"{traced['outlines_differ']} of {traced['both_refined']} (min IoU {traced['outline_iou_min']:.4f}, "
            f"below 0.99: {traced['outlines_iou_below_0.99']}); engine: {engine['refined_reference']} / "
            f"{engine['refined_other']} of {engine['originals']} refined, outcome changed "
            f"{len(engine['outcome_changed'])}, outlines differ {engine['outlines_differ']} of "
            f"{engine['both_refined']}")


def agreement_table(result: dict[str, Any]) -> str:
    lines = ["| model | frame, decoder | boxes | logit sign agreement (worst box) | mask IoU on the grid mean / min | "
             "other mask chosen | three masks: sign agreement, IoU min | traced fp32 / bf16 | traced outlines "
             "differing (min IoU; IoU < 0.99) | engine: refined fp32 / bf16 | engine: outcomes changed | engine: "
             "outline IoU mean / min; IoU < 0.99 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, rows in result["models"].items():
        for name, row in rows.items():
            e, t, m = row["engine"], row["traced"], row["multimask"]
            lines.append(f"| {LABELS[key]} | {name} | {row['boxes']} | {row['sign_agreement']:.5f} "
                         f"({row['sign_agreement_min_prompt']:.4f}) | {row['iou_mean']:.4f} / {row['iou_min']:.4f} | "
                         f"{row['choice_changed']} | {m['sign_agreement']:.5f}, {m['iou_min']:.4f} | "
                         f"{t['refined_reference']} / {t['refined_other']} | {t['outlines_differ']} of "
                         f"{t['both_refined']} ({t['outline_iou_min']:.4f}; {t['outlines_iou_below_0.99']}) | "
                         f"{e['refined_reference']} / {e['refined_other']} of {e['originals']} | "
                         f"{len(e['outcome_changed'])} | " + (
                             f"{e['outline_iou_mean']:.4f} / {e['outline_iou_min']:.4f}; "
                             f"{e['outlines_iou_below_0.99']} of {e['both_refined']} |"
                             if e["both_refined"] else "- |"))
    return "\n".join(lines)


# -- the real job on realistic masks ---------------------------------------------------------------

class CarriedError:
    """A predictor (the engine's view) returning the realistic logits plus the bfloat16 encoder's
    logit error, scaled to them (see the module docstring). ``float32`` and ``bfloat16`` share
    the model; both run in full on every call."""

    def __init__(self, float32: Sam2BoxPredictor, bfloat16: Sam2BoxPredictor, oracle: MaskOracle,
                 scale_to: float = 8.0) -> None:
        self.float32, self.bfloat16 = float32, bfloat16
        self.realistic = RealisticBoxPredictor(bfloat16, oracle)
        self.scale_to = scale_to
        self.scales: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.bfloat16, name)

    def embed(self, image: np.ndarray, region_hw: tuple[int, int] | None = None) -> None:
        self.float32.embed(image, region_hw)
        self.realistic.embed(image, region_hw)

    def decode(self, boxes, mask_inputs=None, multimask=False, **kwargs) -> Decoded:
        ref = self.float32.decode(boxes, mask_inputs, multimask, **kwargs)
        low = self.bfloat16.decode(boxes, mask_inputs, multimask, **kwargs)
        real = self.realistic.decode(boxes, mask_inputs, multimask, **kwargs)
        carried, areas = [], None if real.areas is None else np.array(real.areas)
        for k in range(len(real.scores)):
            a, b, r = np.asarray(ref.logits[k]), np.asarray(low.logits[k]), np.asarray(real.logits[k])
            scale = self.scale_to / max(float(a.std()), 1e-6)
            self.scales.append(scale)
            carried.append((r + scale * (b - a)).astype(np.float32))
            if areas is not None:  # the error is carried inside the windows only
                areas[k] += np.count_nonzero(carried[-1] > 0, axis=(1, 2)) - np.count_nonzero(r > 0, axis=(1, 2))
        logits = tuple(carried) if real.windows is not None else np.stack(carried)
        return Decoded(logits, real.scores, real.windows, real.grid_hw, areas)


def run_job(server: Any, ds: Any, checkpoint_dir: Path, model_file: str, predictor: Any, tag: str) -> dict[str, Any]:
    from sam2_refine import job
    from sam2_refine.nimbus.client import NimbusClient
    from sam2_refine.nimbus.progress import Reporter
    from sam2_refine.job.settings import parse_settings

    settings = parse_settings(job_parameters("Whole frame", tag, model=model_file), ds.dataset_id, checkpoint_dir)
    with NimbusClient(server.api_url, TOKEN) as client:
        code = job.run_compute(settings, client, Reporter(stream=io.StringIO()), lambda path: (predictor, False))
    if code != 0:
        raise RuntimeError(f"job exited {code}")
    made = {a["sam2Refine"]["originalId"]: [(p["x"], p["y"]) for p in a["coordinates"]]
            for a in server.annotations(ds.dataset_id) if a["tags"] == [tag] and "sam2Refine" in a}
    originals = [a["_id"] for a in server.annotations(ds.dataset_id) if a["tags"] == ["rough"]]
    with NimbusClient(server.api_url, TOKEN) as client:  # so that the next run refines them again
        client.delete_annotations([a["_id"] for a in server.annotations(ds.dataset_id) if a["tags"] == [tag]])
    return {original: made.get(original) for original in originals}


JOB_SCENES = [Config(1024, 200, 1), Config(1024, 200, 1, per_box=False, points=True)]


def jobs(models: list[str], directory: Path) -> dict[str, Any]:
    from sam2_refine.testing.nimbus_server import NimbusTestServer

    out: dict[str, Any] = {"load_before": load_average(), "models": {}}
    for key in models:
        path, model = model_for(key, directory)
        fp32, bf16 = Sam2BoxPredictor(model, FP32), Sam2BoxPredictor(model, chosen_bf16())
        rows = {}
        for cfg in JOB_SCENES:
            with NimbusTestServer(token=TOKEN) as server:
                ds, _ = build_dataset(server, cfg)
                ref = run_job(server, ds, directory, path.name, RealisticBoxPredictor(fp32, MaskOracle()), "fp32")
                same = run_job(server, ds, directory, path.name, RealisticBoxPredictor(bf16, MaskOracle()), "bf16")
                carrier = CarriedError(fp32, bf16, MaskOracle())
                carried = run_job(server, ds, directory, path.name, carrier, "bf16 error carried")
            rows[cfg.name] = {"bf16": outcome_agreement(ref, same),
                              "bf16 error carried": outcome_agreement(ref, carried),
                              "scale_median": float(np.median(carrier.scales))}
            print(f"{LABELS[key]}, {cfg.name}: " + "; ".join(f"{label}: {job_line(row)}" for label, row in
                                                              rows[cfg.name].items() if label != "scale_median"),
                  flush=True)
        out["models"][key] = rows
        del fp32, bf16, model
    out["load_after"] = load_average()
    return out


def job_line(row: dict[str, Any]) -> str:
    return (f"{row['refined_reference']} / {row['refined_other']} of {row['originals']} refined, outcome changed "
            f"{len(row['outcome_changed'])}, outlines differ {row['outlines_differ']} of {row['both_refined']} "
            f"(min IoU {row['outline_iou_min']:.4f})")


def job_table(result: dict[str, Any]) -> str:
    lines = ["| model | scene | bf16 run | refined fp32 / bf16 | outcomes changed | outlines differing | outline IoU "
             "mean / min | outlines with IoU < 0.99 |", "|---|---|---|---|---|---|---|---|"]
    for key, rows in result["models"].items():
        for name, row in rows.items():
            for label in ("bf16", "bf16 error carried"):
                r = row[label]
                extra = f" (x{row['scale_median']:.0f})" if label != "bf16" else ""
                lines.append(f"| {LABELS[key]} | {name} | {label}{extra} | {r['refined_reference']} / "
                             f"{r['refined_other']} of {r['originals']} | {len(r['outcome_changed'])} | "
                             f"{r['outlines_differ']} of {r['both_refined']} | {r['outline_iou_mean']:.4f} / "
                             f"{r['outline_iou_min']:.4f} | {r['outlines_iou_below_0.99']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", action="append", choices=("speed", "agreement", "job"),
                        help="run only this part (repeatable; default all three)")
    parser.add_argument("--models", default=None,
                        help="comma-separated of tiny, small, base_plus (default: speed all three, agreement "
                             "and job tiny and small)")
    parser.add_argument("--rounds", type=int, default=7, help="timed calls per variant (speed)")
    parser.add_argument("--checkpoints", type=Path, help="keep the random-weight checkpoints here (default: a "
                                                         "temporary directory)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "encoder_precision.json")
    parser.add_argument("--table", type=Path, help="print the tables of an earlier run's JSON and stop")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core); one thread "
                        "gives steadier ratios on a machine other processes load")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.table:
        saved = json.loads(args.table.read_text())
        print(json.dumps(saved["meta"]))
        for part, render in (("speed", speed_table), ("agreement", agreement_table), ("job", job_table)):
            if part in saved:
                print(f"\n{part}: load {saved[part]['load_before']} -> {saved[part]['load_after']}")
                print(render(saved[part]))
        return 0
    parts = args.part or ["speed", "agreement", "job"]
    torch.manual_seed(0)
    result: dict[str, Any] = {"meta": {**machine(), "command": " ".join(["bench/bench_encoder_precision.py",
                                                                          *(argv or sys.argv[1:])])}}
    print(json.dumps(result["meta"]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.checkpoints or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        for part in parts:
            models = args.models.split(",") if args.models else (
                list(MODELS) if part == "speed" else ["tiny", "small"])
            if part == "speed":
                result["speed"] = speed(models, args.rounds, directory)
            elif part == "agreement":
                result["agreement"] = agreement(models, directory)
            else:
                result["job"] = jobs(models, directory)
    print()
    if "speed" in result:
        print(speed_table(result["speed"]), "\n")
    if "agreement" in result:
        print(agreement_table(result["agreement"]), "\n")
    if "job" in result:
        print(job_table(result["job"]), "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
