"""The README's first command: the worker's main job, end to end, on a bundled example.

``python -m sam2_refine.demo`` (``make demo``):

1. starts the local NimbusImage server with the bundled example (``examples/nuclei``: a
   two-channel fluorescence field with rough nucleus annotations and the ground truth);
2. finds a SAM2 checkpoint: ``$SAM2_CHECKPOINT_DIR``, else ``checkpoints/`` in the repository,
   else it downloads ``sam2.1_hiera_tiny.pt`` there (sha256 checked). When none can be had
   (offline), it says so plainly and runs with an UNTRAINED model (random weights, made here)
   so that the pipeline can still be seen working; the overlay is titled accordingly;
3. runs the real ``entrypoint.py --request compute`` against the server, as NimbusImage would;
4. writes ``out/demo/overlay.png`` (before | after) and ``out/demo/summary.json`` (the worker's
   account of every annotation, plus IoU to the ground truth before and after), and prints
   where they are.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from sam2_refine.geometry import frame_window, mask_iou, polygon_from_ring, rasterize, ring_from_coordinates
from sam2_refine.imaging import merge_layers, parse_layers
from sam2_refine.interface import list_checkpoints
from sam2_refine.testing.nimbus_server import NimbusTestServer
from sam2_refine.worker_info import CHECKPOINT_DIR_ENV

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "nuclei"
DEMO_TOKEN = "demo-token"
PREFERRED = ("sam2.1_hiera_tiny.pt", "sam2.1_hiera_small.pt", "sam2.1_hiera_base_plus.pt", "sam2.1_hiera_large.pt")


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def _load_downloader() -> Any:
    spec = importlib.util.spec_from_file_location("download_checkpoints", REPO / "scripts" / "download_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def find_checkpoint(out: Path, allow_download: bool) -> tuple[Path, str, bool]:
    """(checkpoint directory, model name, untrained?) for the demo run."""
    candidates = []
    if os.environ.get(CHECKPOINT_DIR_ENV):
        candidates.append(Path(os.environ[CHECKPOINT_DIR_ENV]))
    candidates.append(REPO / "checkpoints")
    for directory in candidates:
        models = [m for m in PREFERRED if m in list_checkpoints(directory)]
        if models:
            _say(f"using checkpoint {directory / models[0]}")
            return directory, models[0], False
    if allow_download:
        downloader = _load_downloader()
        target = REPO / "checkpoints"
        _say(f"no checkpoint found; downloading sam2.1_hiera_tiny.pt (156 MB) into {target}")
        try:
            downloader.download("tiny", target, timeout=20.0, retries=1, log=_say)
            return target, "sam2.1_hiera_tiny.pt", False
        except downloader.DownloadError as exc:
            _say(f"download failed: {exc}")
    _say("NO SAM2 CHECKPOINT IS AVAILABLE (offline?). Running with an UNTRAINED model (random weights)")
    _say("so that the pipeline can be seen working. Its masks are MEANINGLESS: most annotations will be")
    _say(f"kept with a reason. Put a real checkpoint in {REPO / 'checkpoints'} or set {CHECKPOINT_DIR_ENV}.")
    from sam2_refine.testing.checkpoints import make_untrained_checkpoint

    directory = out / "untrained-checkpoints"
    make_untrained_checkpoint(directory / "sam2.1_hiera_tiny.pt")
    return directory, "sam2.1_hiera_tiny.pt", True


def load_example() -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]], list[dict[str, Any]]]:
    """(channels (C, H, W) uint16, truth labels (H, W), annotations, layers)."""
    channels = tifffile.imread(EXAMPLE / "image.tif")
    truth = cv2.imread(str(EXAMPLE / "truth.png"), cv2.IMREAD_UNCHANGED).astype(np.int32)
    annotations = json.loads((EXAMPLE / "annotations.json").read_text())
    layers = json.loads((EXAMPLE / "layers.json").read_text())
    return channels, truth, annotations, layers


def _mask(doc: dict[str, Any], width: int, height: int) -> np.ndarray:
    return rasterize(polygon_from_ring(ring_from_coordinates(doc["coordinates"])), frame_window(width, height))


def _best_iou(mask: np.ndarray, truth: np.ndarray) -> float:
    labels = truth[mask]
    labels = labels[labels > 0]
    if labels.size == 0:
        return 0.0
    return mask_iou(mask, truth == np.bincount(labels).argmax())


def _draw(image: np.ndarray, docs: list[dict[str, Any]], colour: tuple[int, int, int]) -> None:
    for doc in docs:
        pts = np.array([[p["x"], p["y"]] for p in doc["coordinates"]], dtype=np.float64)
        cv2.polylines(image, [np.round(pts * 4).astype(np.int32).reshape(-1, 1, 2)], True, colour, 1,
                      cv2.LINE_AA, shift=2)


def write_overlay(path: Path, rgb: np.ndarray, before: list[dict], refined: list[dict], kept: list[dict],
                  title: str, untrained: bool) -> None:
    """Before | after panels over the merged image; a title bar that says what ran."""
    base = cv2.cvtColor((np.clip(rgb, 0, 1) * 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
    left, right = base.copy(), base.copy()
    _draw(left, before, (0, 255, 255))
    _draw(right, kept, (0, 0, 255))
    _draw(right, refined, (255, 255, 0))
    height, width = base.shape[:2]
    bar = np.full((56, 2 * width + 8, 3), (0, 0, 160) if untrained else (40, 40, 40), dtype=np.uint8)
    cv2.putText(bar, title, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
    cv2.putText(bar, "left: rough originals (yellow)   right: refined (cyan), kept originals (red)", (8, 46),
                cv2.FONT_HERSHEY_SIMPLEX, 0.45, (220, 220, 220), 1, cv2.LINE_AA)
    gap = np.full((height, 8, 3), 255, dtype=np.uint8)
    cv2.imwrite(str(path), np.vstack([bar, np.hstack([left, gap, right])]))


def run(out: Path, allow_download: bool = True) -> dict[str, Any]:
    """Run the demo; returns the summary it writes."""
    out.mkdir(parents=True, exist_ok=True)
    channels, truth, annotations, layers = load_example()
    height, width = truth.shape
    checkpoint_dir, model, untrained = find_checkpoint(out, allow_download)
    params = {
        "type": "annotation", "name": "SAM2 Refiner", "image": "annotations/sam2_refine_worker:latest",
        "channel": 0, "tags": ["refined"], "tile": {"XY": 0, "Z": 0, "Time": 0},
        "assignment": {"XY": 0, "Z": 0, "Time": 0}, "connectTo": {"tags": [], "channel": None},
        "workerInterface": {"Batch XY": "", "Batch Z": "", "Batch Time": "", "Tag of objects to refine": ["nucleus"],
                            "Model": model, "Delete original annotations": True, "Padding": 0, "Smoothing": 0.7},
    }
    worker_summary = out / "worker-summary.json"
    with NimbusTestServer(token=DEMO_TOKEN) as server:
        dataset = server.add_dataset(channels[None, None, None], name="nuclei demo", layers=layers,
                                     channel_names=["DAPI", "Cytoplasm"])
        docs = [{"shape": "polygon", "tags": a["tags"], "channel": 0, "location": {"XY": 0, "Z": 0, "Time": 0},
                 "coordinates": a["coordinates"]} for a in annotations]
        originals = dict(zip(server.add_annotations(dataset.dataset_id, docs), docs, strict=True))
        _say(f"local NimbusImage server at {server.api_url}: {len(docs)} rough annotations on a "
             f"{width}x{height} two-channel image")
        env = dict(os.environ, **{CHECKPOINT_DIR_ENV: str(checkpoint_dir), "SAM2_REFINE_SUMMARY": str(worker_summary)})
        argv = [sys.executable, str(REPO / "entrypoint.py"), "--apiUrl", server.api_url, "--token", DEMO_TOKEN,
                "--request", "compute", "--parameters", json.dumps(params), "--datasetId", dataset.dataset_id]
        _say("running: entrypoint.py --request compute (the worker's JSON lines follow)")
        started = time.perf_counter()
        done = subprocess.run(argv, env=env, cwd=REPO, text=True, stdout=subprocess.PIPE)
        elapsed = time.perf_counter() - started
        for line in done.stdout.splitlines():
            print("    " + line)
        # The worker itself announces a checkpoint made with random weights: trust its word.
        untrained = untrained or '"title": "Untrained model"' in done.stdout
        after = server.annotations(dataset.dataset_id)
    account = json.loads(worker_summary.read_text()) if worker_summary.exists() else {}
    replacements = account.get("replacements", {})
    refined_docs = [a for a in after if a["_id"] not in originals]
    kept_docs = [a for a in after if a["_id"] in originals]
    before_iou = [_best_iou(_mask(d, width, height), truth) for d in originals.values()]
    after_iou = []
    by_id = {a["_id"]: a for a in after}
    for original_id, doc in originals.items():
        current = by_id.get(replacements.get(original_id, original_id), doc)
        after_iou.append(_best_iou(_mask(current, width, height), truth))
    rgb = merge_layers({c: channels[c] for c in range(channels.shape[0])}, parse_layers(layers, channels.shape[0]))
    title = (f"UNTRAINED MODEL (random weights) - pipeline check only, masks meaningless ({model})" if untrained
             else f"SAM2 Refine demo - {model}")
    overlay = out / "overlay.png"
    write_overlay(overlay, rgb, list(originals.values()), refined_docs, kept_docs, title, untrained)
    summary = {
        "model": model, "untrained_model": untrained, "worker_exit_code": done.returncode,
        "worker_seconds": round(elapsed, 2), "annotations": len(originals),
        "refined": account.get("refined"), "kept": account.get("kept"), "deleted": account.get("deleted"),
        "kept_reasons": {k: len(v) for k, v in account.get("kept_reasons", {}).items()},
        "mean_iou_to_truth_before": round(float(np.mean(before_iou)), 4),
        "mean_iou_to_truth_after": round(float(np.mean(after_iou)), 4),
        "overlay": str(overlay),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _say(f"worker exit code {done.returncode} after {elapsed:.1f} s: refined {summary['refined']}, "
         f"kept {summary['kept']}, deleted {summary['deleted']}")
    _say(f"mean IoU to ground truth: rough {summary['mean_iou_to_truth_before']:.3f} -> "
         f"after {summary['mean_iou_to_truth_after']:.3f}" + ("  (UNTRAINED model)" if untrained else ""))
    _say(f"overlay: {overlay}")
    _say(f"summary: {out / 'summary.json'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "out" / "demo")
    parser.add_argument("--no-download", action="store_true", help="never try to download a checkpoint")
    args = parser.parse_args(argv)
    summary = run(args.out, allow_download=not args.no_download)
    return 0 if summary["worker_exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
