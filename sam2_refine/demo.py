"""The README's first command (``make demo``): the worker's main job, end to end, on a bundled example.

``python -m sam2_refine.demo`` (``make demo``):

1. starts the local NimbusImage server with the bundled example (``examples/nuclei``: a
   two-channel fluorescence field with rough nucleus annotations and the ground truth);
2. finds a SAM2 checkpoint: ``$SAM2_CHECKPOINT_DIR``, else ``checkpoints/`` in the repository,
   else it downloads ``sam2.1_hiera_tiny.pt`` there (sha256 checked). Any usable SAM2 checkpoint
   counts (recognised from its weights, :mod:`sam2_refine.model.checkpoints`), the smallest first.
   When none can be had (offline), it says so plainly and runs with an UNTRAINED model (random
   weights, made here), which is an honest check of the pipeline: nearly every mask is rejected;
3. runs the real ``entrypoint.py --request compute`` against the server, as NimbusImage would;
4. offline only: runs the same job again on a fresh copy of the dataset through the same
   engine (``job.run_compute``, the local server, upload, confirmation, replacement) with the
   STAND-IN segmenter (:class:`~sam2_refine.testing.stand_in.ModelResolutionPredictor`, which
   thresholds the image; not SAM2), so that a newcomer sees refined outlines created,
   confirmed and replaced; its overlay and every line about it say "stand-in segmenter, not SAM2";
5. writes ``out/demo/overlay.png`` (before | after), ``out/demo/overlay-stand-in.png`` (offline)
   and ``out/demo/summary.json`` (the worker's account of every annotation, plus IoU to the
   ground truth before and after), and prints where they are.

``python -m sam2_refine.demo --serve 8765`` only starts the local server with the example on that
port, prints the ``--apiUrl``, ``--token`` and ``--datasetId`` arguments a worker needs, and
serves until Ctrl-C or SIGTERM: the README's "Try it by hand" runs ``entrypoint.py`` against it.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from sam2_refine.model.checkpoints import ModelEntry, scan_models
from sam2_refine.engine.geometry import frame_window, mask_iou, polygon_from_ring, rasterize, ring_from_coordinates
from sam2_refine.engine.imaging import merge_layers, parse_layers
from sam2_refine.testing.nimbus_server import NimbusTestServer
from sam2_refine.worker_info import CHECKPOINT_DIR_ENV

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "nuclei"
DEMO_TOKEN = "demo-token"
#: The smallest model first (the demo runs on a CPU), SAM 2.1 before 2.0.
SIZE_ORDER = ("tiny", "small", "base_plus", "large")
STAND_IN = "stand-in segmenter, not SAM2"


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def _load_downloader() -> Any:
    spec = importlib.util.spec_from_file_location("download_checkpoints", REPO / "scripts" / "download_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _usable(directory: Path) -> list[ModelEntry]:
    """The directory's trained SAM2 checkpoints, smallest first."""
    models = [m for m in scan_models(directory).models if not m.untrained]
    return sorted(models, key=lambda m: (SIZE_ORDER.index(m.architecture.size), m.architecture.version != "2.1"))


def find_checkpoint(out: Path, allow_download: bool) -> tuple[Path, str, bool]:
    """(checkpoint directory, model name, untrained?) for the demo run."""
    candidates = []
    if os.environ.get(CHECKPOINT_DIR_ENV):
        candidates.append(Path(os.environ[CHECKPOINT_DIR_ENV]))
    candidates.append(REPO / "checkpoints")
    for directory in candidates:
        models = _usable(directory)
        if models:
            _say(f"using checkpoint {directory / models[0].name} ({models[0].label})")
            return directory, models[0].name, False
        untrained = [m for m in scan_models(directory).models if m.untrained]
        if untrained:  # made by the tests or an earlier offline run: honest about it
            _say(f"only an UNTRAINED checkpoint is available: {directory / untrained[0].name}")
            return directory, untrained[0].name, True
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
    name = "untrained_sam2.1_tiny.pt"  # not Meta's file name: these are random weights
    make_untrained_checkpoint(directory / name, "sam2.1_hiera_tiny.pt")
    return directory, name, True


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


#: Outline colours (BGR) for fluorescence images (blue and magenta objects on black): each line is
#: drawn over a dark halo, so that it shows on bright objects and on the background alike.
ORIGINAL, REFINED, HALO = (0, 230, 255), (60, 255, 60), (0, 0, 0)  # yellow, green
#: Outline width and its halo's, in pixels of the 1:1 image.
LINE, HALO_LINE = 2, 4


def _points(doc: dict[str, Any]) -> np.ndarray:
    """The outline as int32 (N, 1, 2) in quarter pixels (drawn with ``shift=2``)."""
    pts = np.array([[p["x"], p["y"]] for p in doc["coordinates"]], dtype=np.float64)
    return np.round(pts * 4).astype(np.int32).reshape(-1, 1, 2)


def _draw(image: np.ndarray, docs: list[dict[str, Any]], colour: tuple[int, int, int], dashed: bool = False) -> None:
    """Closed outlines, ``LINE`` px wide over a ``HALO_LINE`` px dark halo; ``dashed``: 6 px on, 5 off."""
    for doc in docs:
        pts = _points(doc)
        for width, paint in ((HALO_LINE, HALO), (LINE, colour)):
            if not dashed:
                cv2.polylines(image, [pts], True, paint, width, cv2.LINE_AA, shift=2)
                continue
            for a, b in _dashes(pts.reshape(-1, 2).astype(np.float64) / 4, on=6.0, off=5.0):
                cv2.line(image, tuple(np.round(a * 4).astype(int)), tuple(np.round(b * 4).astype(int)), paint, width,
                         cv2.LINE_AA, shift=2)


def _dashes(ring: np.ndarray, on: float, off: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """The dashes along a closed ring (x, y float, (N, 2)): ``on`` pixels drawn, ``off`` skipped."""
    out = []
    drawing, left = True, on
    for a, b in zip(ring, np.roll(ring, -1, axis=0), strict=True):
        length = float(np.hypot(*(b - a)))
        at = 0.0
        while length - at > 1e-9:
            step = min(left, length - at)
            start, end = a + (b - a) * (at / length), a + (b - a) * ((at + step) / length)
            if drawing:
                out.append((start, end))
            at += step
            left -= step
            if left <= 1e-9:
                drawing = not drawing
                left = on if drawing else off
    return out


def _caption(width: int, lines: list[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    """A dark strip with one line of text per entry (text, BGR colour)."""
    strip = np.full((12 + 22 * len(lines), width, 3), 32, dtype=np.uint8)
    for k, (text, colour) in enumerate(lines):
        cv2.putText(strip, text, (8, 26 + 22 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 1, cv2.LINE_AA)
    return strip


def write_overlay(path: Path, rgb: np.ndarray, before: list[dict], refined: list[dict], kept: list[dict],
                  title: str, untrained: bool, stand_in: bool = False, counts: dict[str, Any] | None = None) -> None:
    """Before | after panels over the merged image at 1:1, each with its counts and mean IoU to the
    ground truth; a title bar that says what ran (red for an untrained model, orange for the
    stand-in segmenter). Originals yellow, refined outlines green, kept originals yellow and
    dashed (left as they were), each over a dark halo."""
    base = cv2.cvtColor((np.clip(rgb, 0, 1) * 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
    left, right = base.copy(), base.copy()
    _draw(left, before, ORIGINAL)
    _draw(right, kept, ORIGINAL, dashed=True)
    _draw(right, refined, REFINED)
    height, width = base.shape[:2]
    counts = counts or {}
    iou_before, iou_after = counts.get("mean_iou_to_truth_before"), counts.get("mean_iou_to_truth_after")
    left_caption = _caption(width, [
        (f"BEFORE: {len(before)} rough outlines (yellow)", ORIGINAL),
        (f"mean IoU to the ground truth {iou_before:.3f}" if iou_before is not None else "", (230, 230, 230))])
    right_caption = _caption(width, [
        (f"AFTER: {len(refined)} refined (green)", REFINED),
        (f"{len(kept)} kept unchanged (yellow, dashed)", ORIGINAL),
        (f"mean IoU to the ground truth {iou_after:.3f} (refined and kept)" if iou_after is not None else "",
         (230, 230, 230))])
    strip_height = max(left_caption.shape[0], right_caption.shape[0])
    left_caption, right_caption = (np.vstack([c, np.full((strip_height - c.shape[0], width, 3), 32, np.uint8)])
                                   for c in (left_caption, right_caption))
    colour = (0, 0, 160) if untrained else (0, 90, 200) if stand_in else (40, 40, 40)
    bar = np.full((34, 2 * width + 8, 3), colour, dtype=np.uint8)
    cv2.putText(bar, title, (8, 23), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
    gap = np.full((height + strip_height, 8, 3), 255, dtype=np.uint8)
    panels = np.hstack([np.vstack([left_caption, left]), gap, np.vstack([right_caption, right])])
    cv2.imwrite(str(path), np.vstack([bar, panels]))


def _params(model: str) -> dict[str, Any]:
    return {
        "type": "annotation", "name": "SAM2 Refiner", "image": "annotations/sam2_refine_worker:latest",
        "channel": 0, "tags": ["refined"], "tile": {"XY": 0, "Z": 0, "Time": 0},
        "assignment": {"XY": 0, "Z": 0, "Time": 0}, "connectTo": {"tags": [], "channel": None},
        "workerInterface": {"Batch XY": "", "Batch Z": "", "Batch Time": "", "Tag of objects to refine": ["nucleus"],
                            "Model": model, "Delete original annotations": True, "Padding": 0, "Smoothing": 0.7},
    }


def _add_example(server: NimbusTestServer, channels: np.ndarray, annotations: list[dict], layers: list[dict],
                 name: str) -> tuple[str, dict[str, dict]]:
    """A dataset holding the example on the local server: (dataset id, original id -> doc)."""
    dataset = server.add_dataset(channels[None, None, None], name=name, layers=layers,
                                 channel_names=["DAPI", "Cytoplasm"])
    docs = [{"shape": "polygon", "tags": a["tags"], "channel": 0, "location": {"XY": 0, "Z": 0, "Time": 0},
             "coordinates": a["coordinates"]} for a in annotations]
    return dataset.dataset_id, dict(zip(server.add_annotations(dataset.dataset_id, docs), docs, strict=True))


def _account(after: list[dict], originals: dict[str, dict], account: dict[str, Any], truth: np.ndarray,
             ) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(refined docs, kept docs, the summary's counts and IoU to the ground truth)."""
    height, width = truth.shape
    replacements = account.get("replacements", {})
    refined_docs = [a for a in after if a["_id"] not in originals]
    kept_docs = [a for a in after if a["_id"] in originals]
    before_iou = [_best_iou(_mask(d, width, height), truth) for d in originals.values()]
    by_id = {a["_id"]: a for a in after}
    after_iou = [_best_iou(_mask(by_id.get(replacements.get(oid, oid), doc), width, height), truth)
                 for oid, doc in originals.items()]
    counts = {
        "annotations": len(originals), "refined": account.get("refined"), "kept": account.get("kept"),
        "deleted": account.get("deleted"),
        "kept_reasons": {k: len(v) for k, v in account.get("kept_reasons", {}).items()},
        "mean_iou_to_truth_before": round(float(np.mean(before_iou)), 4),
        "mean_iou_to_truth_after": round(float(np.mean(after_iou)), 4),
    }
    return refined_docs, kept_docs, counts


def _run_stand_in(server: NimbusTestServer, checkpoint_dir: Path, model: str, example: tuple, rgb: np.ndarray,
                  out: Path) -> dict[str, Any]:
    """The same job through the same engine, with the stand-in segmenter instead of SAM2."""
    from sam2_refine.job import compute as job
    from sam2_refine.nimbus.client import NimbusClient
    from sam2_refine.nimbus.progress import Reporter
    from sam2_refine.job.settings import parse_settings
    from sam2_refine.testing.stand_in import ModelResolutionPredictor

    channels, truth, annotations, layers = example
    dataset_id, originals = _add_example(server, channels, annotations, layers, "nuclei demo (stand-in)")
    predictor = ModelResolutionPredictor(threshold=0.22, band=1)  # the green band: mostly DAPI, little halo
    predictor.description = f"{STAND_IN.upper()} (it thresholds the image's green band at 1024 px)"
    settings = parse_settings(_params(model), dataset_id, checkpoint_dir)
    summary_path = out / "stand-in-worker-summary.json"
    stream = io.StringIO()
    saved = os.environ.get(job.SUMMARY_ENV)
    os.environ[job.SUMMARY_ENV] = str(summary_path)
    _say(f"now the SAME job with the {STAND_IN.upper()}: job.run_compute against the local server "
         "(upload, confirmation, replacement of each original), the model swapped for a thresholding stand-in")
    started = time.perf_counter()
    try:
        with NimbusClient(server.api_url, DEMO_TOKEN) as client:
            code = job.run_compute(settings, client, Reporter(stream=stream), lambda path: (predictor, False))
    finally:
        if saved is None:
            os.environ.pop(job.SUMMARY_ENV, None)
        else:
            os.environ[job.SUMMARY_ENV] = saved
    elapsed = time.perf_counter() - started
    for line in stream.getvalue().splitlines():
        print(f"    [{STAND_IN}] {line}")
    account = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    refined, kept, counts = _account(server.annotations(dataset_id), originals, account, truth)
    overlay = out / "overlay-stand-in.png"
    write_overlay(overlay, rgb, list(originals.values()), refined, kept,
                  "STAND-IN SEGMENTER, NOT SAM2 - it thresholds the image; the pipeline around it is the worker's",
                  untrained=False, stand_in=True, counts=counts)
    _say(f"{STAND_IN.upper()}: exit code {code} after {elapsed:.1f} s: refined {counts['refined']}, "
         f"kept {counts['kept']}, deleted {counts['deleted']} (each original deleted only after its refinement "
         "was created and confirmed)")
    _say(f"{STAND_IN.upper()}: mean IoU to ground truth: rough {counts['mean_iou_to_truth_before']:.3f} -> after "
         f"{counts['mean_iou_to_truth_after']:.3f}")
    _say(f"overlay ({STAND_IN}): {overlay}")
    return {"segmenter": STAND_IN, "exit_code": code, "seconds": round(elapsed, 2), **counts, "overlay": str(overlay)}


def overlay_title(checkpoint_dir: Path, model: str, untrained: bool) -> str:
    """What ran, in words: the model's label (its architecture, from its weights), and for an
    untrained one that it holds random weights (never the name of the file Meta published)."""
    entry = next((m for m in scan_models(checkpoint_dir).models if m.name == model), None)
    architecture = entry.architecture.label if entry is not None else "SAM2"
    if untrained:
        return (f"UNTRAINED {architecture} (random weights, made for offline runs) - a pipeline check: "
                "its masks are meaningless")
    return f"SAM2 Refine demo - {entry.label if entry is not None else model} ({model})"


def run(out: Path, allow_download: bool = True) -> dict[str, Any]:
    """Run the demo; returns the summary it writes."""
    out.mkdir(parents=True, exist_ok=True)
    example = load_example()
    channels, truth, annotations, layers = example
    height, width = truth.shape
    checkpoint_dir, model, untrained = find_checkpoint(out, allow_download)
    rgb = merge_layers({c: channels[c] for c in range(channels.shape[0])}, parse_layers(layers, channels.shape[0]))
    worker_summary = out / "worker-summary.json"
    with NimbusTestServer(token=DEMO_TOKEN) as server:
        dataset_id, originals = _add_example(server, channels, annotations, layers, "nuclei demo")
        _say(f"local NimbusImage server at {server.api_url}: {len(originals)} rough annotations on a "
             f"{width}x{height} two-channel image")
        env = dict(os.environ, **{CHECKPOINT_DIR_ENV: str(checkpoint_dir), "SAM2_REFINE_SUMMARY": str(worker_summary)})
        argv = [sys.executable, str(REPO / "entrypoint.py"), "--apiUrl", server.api_url, "--token", DEMO_TOKEN,
                "--request", "compute", "--parameters", json.dumps(_params(model)), "--datasetId", dataset_id]
        _say("running: entrypoint.py --request compute (the worker's JSON lines follow)")
        started = time.perf_counter()
        done = subprocess.run(argv, env=env, cwd=REPO, text=True, stdout=subprocess.PIPE)
        elapsed = time.perf_counter() - started
        for line in done.stdout.splitlines():
            print("    " + line)
        # The worker itself announces a checkpoint made with random weights: trust its word.
        untrained = untrained or '"title": "Untrained model"' in done.stdout
        after = server.annotations(dataset_id)
        account = json.loads(worker_summary.read_text()) if worker_summary.exists() else {}
        refined_docs, kept_docs, counts = _account(after, originals, account, truth)
        overlay = out / "overlay.png"
        write_overlay(overlay, rgb, list(originals.values()), refined_docs, kept_docs,
                      overlay_title(checkpoint_dir, model, untrained), untrained, counts=counts)
        summary = {"model": model, "untrained_model": untrained, "worker_exit_code": done.returncode,
                   "worker_seconds": round(elapsed, 2), **counts, "overlay": str(overlay)}
        _say(f"worker exit code {done.returncode} after {elapsed:.1f} s: refined {summary['refined']} of "
             f"{summary['annotations']}, kept {summary['kept']}, deleted {summary['deleted']}"
             + ("  (UNTRAINED model: its masks are rightly rejected)" if untrained else ""))
        _say(f"mean IoU to ground truth: rough {summary['mean_iou_to_truth_before']:.3f} -> "
             f"after {summary['mean_iou_to_truth_after']:.3f}" + ("  (UNTRAINED model)" if untrained else ""))
        _say(f"overlay: {overlay}")
        if untrained:
            summary["stand_in"] = _run_stand_in(server, checkpoint_dir, model, example, rgb, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _say(f"summary: {out / 'summary.json'}")
    return summary


def serve(port: int) -> int:
    """Serve the example on ``port`` (127.0.0.1) until SIGINT or SIGTERM; prints the worker's
    connection arguments first, on one line."""
    channels, _, annotations, layers = load_example()
    stop = signal.SIGINT, signal.SIGTERM
    previous = {sig: signal.getsignal(sig) for sig in stop}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # delivered to sigwait below, not as an exception
    try:
        with NimbusTestServer(token=DEMO_TOKEN, port=port) as server:
            dataset_id, originals = _add_example(server, channels, annotations, layers, "nuclei")
            _say(f"local NimbusImage server with {len(originals)} rough annotations (tag 'nucleus'); "
                 "Ctrl-C stops it. A worker's arguments:")
            print(f"--apiUrl {server.api_url} --token {DEMO_TOKEN} --datasetId {dataset_id}", flush=True)
            signal.sigwait(stop)
            _say("stopped")
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "out" / "demo")
    parser.add_argument("--no-download", action="store_true", help="never try to download a checkpoint")
    parser.add_argument("--serve", type=int, metavar="PORT",
                        help="only serve the example on this port (0: any free port) until Ctrl-C")
    args = parser.parse_args(argv)
    if args.serve is not None:
        return serve(args.serve)
    summary = run(args.out, allow_download=not args.no_download)
    return 0 if summary["worker_exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
