"""Accuracy: mean IoU to ground truth for rough input and for each resolution and prompt mode.

Run from the repository root (after ``make venv``)::

    .venv/bin/python bench/bench_accuracy.py                       # stand-in predictor (runs anywhere)
    .venv/bin/python bench/bench_accuracy.py --checkpoint /code/sam2/checkpoints/sam2.1_hiera_small.pt

Scenes with ground-truth labels (the bundled ``examples/nuclei`` field, 512 px, and a synthetic
4096 px field of small nuclei) are served by the local NimbusImage test server. Rough
annotations are made from the truth (dilated, eroded, jittered, plain boxes), and the worker
refines them through ``job.run_compute`` exactly as a real job does, once per (resolution,
prompt) mode. Each original's result is its refinement, or the original itself when the worker
kept it; the table reports the mean IoU of those results to the truth, and how many were refined.

Without ``--checkpoint`` the predictor is a stand-in that segments like a model that sees only
its 1024 px input (it thresholds the image after resizing it to the model input; it ignores
mask prompts and gives the same mask three times): it shows what resolution does, not what
SAM2's prompts do. With a checkpoint, the real SAM2 runs (use a GPU for the 4096 px scene).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sam2_refine import job  # noqa: E402
from sam2_refine.geometry import frame_window, mask_iou, polygon_from_ring, rasterize, ring_from_coordinates  # noqa: E402
from sam2_refine.nimbus_client import NimbusClient  # noqa: E402
from sam2_refine.report import Reporter  # noqa: E402
from sam2_refine.settings import parse_settings  # noqa: E402
from sam2_refine.testing.datasets import cell_scene, rough_polygon  # noqa: E402
from sam2_refine.testing.nimbus_server import NimbusTestServer  # noqa: E402
from sam2_refine.testing.checkpoints import write_layout_checkpoint  # noqa: E402
from sam2_refine.testing.stand_in import ModelResolutionPredictor  # noqa: E402

TOKEN = "bench-token"
KINDS = ("dilated", "eroded", "jittered", "box")
RESOLUTIONS = {"Whole frame": "whole", "Object crops": "crops", "Auto": "auto"}
PROMPTS = {"Box": "box", "Box + shape": "box+shape", "Best of three by overlap": "best3"}
LAYERS = [{"channel": 0, "color": "#ffffff", "visible": True,
           "contrast": {"mode": "percentile", "blackPoint": 0.5, "whitePoint": 99.8}}]


def scenes(quick: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (channels (C, H, W) uint16, truth labels (H, W))."""
    example = REPO / "examples" / "nuclei"
    out = {"examples/nuclei 512px": (tifffile.imread(example / "image.tif")[:1],
                                     cv2.imread(str(example / "truth.png"), cv2.IMREAD_UNCHANGED).astype(np.int32))}
    if not quick:
        big = cell_scene(4096, 4096, 150, radius=(8.0, 13.0), seed=11)
        out["synthetic 4096px, 16-26 px nuclei"] = (big.channels[:1], big.labels)
    return out


def iou_to_truth(coordinates: list[dict], truth: np.ndarray, label: int) -> float:
    h, w = truth.shape
    mask = rasterize(polygon_from_ring(ring_from_coordinates(coordinates)), frame_window(w, h))
    return mask_iou(mask, truth == label)


def run_scene(name: str, channels: np.ndarray, truth: np.ndarray, load, checkpoint_dir: Path, model: str) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    with NimbusTestServer(token=TOKEN) as server:
        ds = server.add_dataset(channels[None, None, None], layers=LAYERS)
        label_of: dict[str, int] = {}
        rough_iou: dict[str, dict[str, float]] = {}
        for kind in KINDS:
            rough_iou[kind] = {}
            docs = []
            labels = list(range(1, int(truth.max()) + 1))
            for label in labels:
                points = rough_polygon(truth == label, kind, rng, amount=3.0)
                docs.append({"shape": "polygon", "tags": [kind], "channel": 0,
                             "location": {"XY": 0, "Z": 0, "Time": 0},
                             "coordinates": [{"x": float(x), "y": float(y)} for x, y in points]})
            for ann_id, label, doc in zip(server.add_annotations(ds.dataset_id, docs), labels, docs):
                label_of[ann_id] = label
                rough_iou[kind][ann_id] = iou_to_truth(doc["coordinates"], truth, label)
        for kind in KINDS:
            rows.append({"scene": name, "rough": kind, "mode": "rough input", "mean_iou": float(np.mean(list(
                rough_iou[kind].values()))), "refined": "-", "seconds": 0.0})
            for res_item, resolution in RESOLUTIONS.items():
                for prompt_item, prompt in PROMPTS.items():
                    tag = f"{kind}/{resolution}/{prompt}"
                    params = {"workerInterface": {"Model": model, "Tag of objects to refine": [kind],
                                                  "Batch XY": "all", "Batch Z": "all", "Batch Time": "all",
                                                  "Resolution": res_item, "Prompt": prompt_item},
                              "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 0, "tags": [tag]}
                    settings = parse_settings(params, ds.dataset_id, checkpoint_dir)
                    started = time.perf_counter()
                    with NimbusClient(server.api_url, TOKEN) as client:
                        code = job.run_compute(settings, client, Reporter(stream=io.StringIO()), load)
                    seconds = time.perf_counter() - started
                    if code != 0:
                        raise RuntimeError(f"{tag}: job exited {code}")
                    results = dict(rough_iou[kind])  # kept originals count as themselves
                    refined = 0
                    for doc in server.annotations(ds.dataset_id):
                        original = (doc.get("sam2Refine") or {}).get("originalId")
                        if tag in doc["tags"] and original in results:
                            results[original] = iou_to_truth(doc["coordinates"], truth, label_of[original])
                            refined += 1
                    rows.append({"scene": name, "rough": kind, "mode": f"{resolution} / {prompt}",
                                 "mean_iou": float(np.mean(list(results.values()))),
                                 "refined": f"{refined}/{len(results)}", "seconds": round(seconds, 1)})
                    print(f"  {name} | {kind} | {resolution} / {prompt}: IoU {rows[-1]['mean_iou']:.3f} "
                          f"refined {rows[-1]['refined']} ({seconds:.1f} s)", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """One row per scene and kind of rough input; one column per mode: mean IoU (refined count)."""
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    lines = ["| scene | rough | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
    for scene, kind in dict.fromkeys((r["scene"], r["rough"]) for r in rows):
        cells = {r["mode"]: r for r in rows if r["scene"] == scene and r["rough"] == kind}
        values = [f"{cells[m]['mean_iou']:.3f}" + (f" ({cells[m]['refined']})" if cells[m]["refined"] != "-" else "")
                  for m in modes]
        lines.append(f"| {scene} | {kind} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a real SAM2.1 checkpoint (default: the stand-in)")
    parser.add_argument("--quick", action="store_true", help="only the 512 px example")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "accuracy.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            from sam2_refine.sam2_model import Sam2BoxPredictor

            predictor, untrained = Sam2BoxPredictor.load(args.checkpoint)
            checkpoint_dir, model = args.checkpoint.parent, args.checkpoint.name
            what = f"{model}{' (UNTRAINED)' if untrained else ''}, {predictor.description}"
        else:
            predictor = ModelResolutionPredictor(threshold=0.35)
            checkpoint_dir, model = Path(tmp), "sam2.1_hiera_tiny.pt"
            write_layout_checkpoint(checkpoint_dir / model)  # recognised by settings, never loaded
            what = "stand-in: thresholds at the model's 1024 px input resolution"
        rows = []
        for name, (channels, truth) in scenes(args.quick).items():
            print(f"{name}: {int(truth.max())} objects", flush=True)
            rows += run_scene(name, channels, truth, lambda path: (predictor, False), checkpoint_dir, model)
    print(f"\n{time.strftime('%Y-%m-%d')}, predictor: {what}")
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "predictor": what, "rows": rows}, indent=2))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
