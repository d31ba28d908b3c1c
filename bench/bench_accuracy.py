"""Accuracy: mean IoU to ground truth for rough input and for each resolution and prompt mode.

Run from the repository root (after ``make venv``)::

    .venv/bin/python bench/bench_accuracy.py                       # stand-in predictors (run anywhere)
    .venv/bin/python bench/bench_accuracy.py --checkpoint /code/sam2/checkpoints/sam2.1_hiera_small.pt

Scenes with ground-truth labels (the bundled ``examples/nuclei`` field, 512 px; a synthetic
4096 px field of small nuclei; a dense 512 px field of touching nuclei) are served by the local
NimbusImage test server. Rough annotations are made from the truth (dilated, eroded, jittered,
plain boxes; rectangles: each object's rotated minimum-area rectangle; points: a click within
2 px of each object's centre), and the worker refines them through ``job.run_compute``
exactly as a real job does, once per mode. Each original's result is its refinement, or the
original itself when the worker kept it (a kept point counts as IoU 0: it outlines nothing);
the tables report the mean IoU of those results to the truth, how many were refined, and
(second table) how much the refined outlines of the location overlap each other, as a share of
their total area.

Modes: every Resolution x Prompt for outlined inputs (points ignore the Prompt field, so they
run once per Resolution); then, with Resolution Auto, "Keep touching objects apart" off, and
three ablations of the point rule that no field offers (``job.geometry_options`` is wrapped):
the model's score alone; BIIGLE's second pass (the mask closest to the tag's expected area,
whatever its score); other points given as negative points instead of setting aside the masks
that hold them.

Without ``--checkpoint`` the predictors are stand-ins. On the first two scenes one that segments
like a model that sees only its 1024 px input (it thresholds the image after resizing it to the
model input; it ignores mask prompts and gives the same box mask three times): it shows what
resolution does, not what SAM2's prompts do. On the dense scene one that answers from the
truth but whose masks spill 4 px into touching neighbours, with weaker logits there (what a box
over one of two touching nuclei does). Both answer a point with three masks (a part of the
object, the object, the object with what it touches) and score the largest best for one object
in three (:mod:`sam2_refine.testing.stand_in`). With a checkpoint, the real SAM2 runs on every
scene (use a GPU for the 4096 px scene).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import shapely
import tifffile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sam2_refine.job import compute as job  # noqa: E402
from sam2_refine.engine.geometry import frame_window, mask_iou, polygon_from_ring, rasterize, ring_from_coordinates  # noqa: E402
from sam2_refine.nimbus.client import NimbusClient  # noqa: E402
from sam2_refine.engine.options import BY_AREA, BY_SCORE  # noqa: E402
from sam2_refine.nimbus.progress import Reporter  # noqa: E402
from sam2_refine.job.settings import parse_settings  # noqa: E402
from sam2_refine.testing.datasets import cell_scene, dense_scene, rough_polygon  # noqa: E402
from sam2_refine.testing.nimbus_server import NimbusTestServer  # noqa: E402
from sam2_refine.testing.checkpoints import write_layout_checkpoint  # noqa: E402
from sam2_refine.testing.stand_in import KnownMaskPredictor, ModelResolutionPredictor  # noqa: E402

TOKEN = "bench-token"
KINDS = ("dilated", "eroded", "jittered", "box", "rectangle", "point")
RESOLUTIONS = {"Whole frame": "whole", "Object crops": "crops", "Auto": "auto"}
PROMPTS = {"Box": "box", "Box + shape": "box+shape", "Best of three by overlap": "best3"}
#: Extra modes, Resolution Auto: (label, interface fields, engine options replaced, point kinds only).
EXTRA = [
    ("not apart", {"Keep touching objects apart": False}, {}, False),
    ("points by score", {}, {"point_choice": BY_SCORE}, True),
    ("points by closest area", {}, {"point_choice": BY_AREA}, True),
    ("points with negatives", {}, {"negative_points": True, "exclusive_points": False}, True),
]
LAYERS = [{"channel": 0, "color": "#ffffff", "visible": True,
           "contrast": {"mode": "percentile", "blackPoint": 0.5, "whitePoint": 99.8}}]


def scenes(quick: bool) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """name -> (channels (C, H, W) uint16, truth labels (H, W), stand-in: "resolution" or "spill")."""
    example = REPO / "examples" / "nuclei"
    out = {"examples/nuclei 512px": (tifffile.imread(example / "image.tif")[:1],
                                     cv2.imread(str(example / "truth.png"), cv2.IMREAD_UNCHANGED).astype(np.int32),
                                     "resolution")}
    dense = dense_scene(512, 512, 200, seed=3, spacing=1.2)
    out["dense 512px, touching nuclei"] = (dense.channels[:1], dense.labels, "spill")
    if not quick:
        big = cell_scene(4096, 4096, 150, radius=(8.0, 13.0), seed=11)
        out["synthetic 4096px, 16-26 px nuclei"] = (big.channels[:1], big.labels, "resolution")
    return out


def rough_doc(mask: np.ndarray, kind: str, rng: np.random.Generator) -> dict:
    """A rough annotation of one object: polygon, rotated rectangle or point."""
    base = {"tags": [kind], "channel": 0, "location": {"XY": 0, "Z": 0, "Time": 0}}
    if kind == "point":
        rows, cols = np.nonzero(mask)
        near = (rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2 <= 4.0
        options = np.flatnonzero(near) if near.any() else [int(np.argmin((rows - rows.mean()) ** 2
                                                                       + (cols - cols.mean()) ** 2))]
        k = int(rng.choice(options))
        return {**base, "shape": "point", "coordinates": [{"x": float(cols[k]), "y": float(rows[k])}]}
    if kind == "rectangle":
        rows, cols = np.nonzero(mask)
        (cx, cy), (w, h), angle = cv2.minAreaRect(np.stack([cols, rows], 1).astype(np.float32))
        corners = cv2.boxPoints(((cx, cy), (w + 2.0, h + 2.0), angle))
        return {**base, "shape": "rectangle", "coordinates": [{"x": float(x), "y": float(y)} for x, y in corners]}
    points = rough_polygon(mask, kind, rng, amount=3.0)
    return {**base, "shape": "polygon", "coordinates": [{"x": float(x), "y": float(y)} for x, y in points]}


def rough_iou(doc: dict, truth: np.ndarray, label: int) -> float:
    if doc["shape"] == "point":
        return 0.0
    if doc["shape"] == "rectangle":
        shape = shapely.MultiPoint([(p["x"], p["y"]) for p in doc["coordinates"]]).convex_hull
        h, w = truth.shape
        return mask_iou(rasterize(shape, frame_window(w, h)), truth == label)
    return iou_to_truth(doc["coordinates"], truth, label)


def iou_to_truth(coordinates: list[dict], truth: np.ndarray, label: int) -> float:
    h, w = truth.shape
    mask = rasterize(polygon_from_ring(ring_from_coordinates(coordinates)), frame_window(w, h))
    return mask_iou(mask, truth == label)


def overlap_share(coordinate_lists: list[list[dict]]) -> float:
    """Area shared by two or more outlines, as a share of the outlines' total area."""
    polygons = [polygon_from_ring(ring_from_coordinates(c)) for c in coordinate_lists]
    if len(polygons) < 2:
        return 0.0
    tree = shapely.STRtree(polygons)
    shared = sum(polygons[i].intersection(polygons[j]).area
                 for i, j in zip(*tree.query(polygons, predicate="intersects")) if i < j)
    return shared / sum(p.area for p in polygons)


def modes(kind: str) -> list[tuple[str, dict, dict]]:
    """(mode label, interface fields, engine options replaced) for one kind of rough input."""
    out = []
    for res_item, resolution in RESOLUTIONS.items():
        for prompt_item, prompt in PROMPTS.items():
            if kind == "point" and prompt != "box":
                continue  # points ignore the Prompt field
            out.append((f"{resolution} / {prompt}", {"Resolution": res_item, "Prompt": prompt_item}, {}))
    for label, fields, engine, points_only in EXTRA:
        if kind == "point" or not points_only:
            out.append((f"auto / {label}", {"Resolution": "Auto", **fields}, engine))
    return out


def run_scene(name: str, channels: np.ndarray, truth: np.ndarray, load, checkpoint_dir: Path, model: str) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    with NimbusTestServer(token=TOKEN) as server:
        ds = server.add_dataset(channels[None, None, None], layers=LAYERS)
        label_of: dict[str, int] = {}
        rough: dict[str, dict[str, float]] = {}
        labels = list(range(1, int(truth.max()) + 1))
        for kind in KINDS:
            docs = [rough_doc(truth == label, kind, rng) for label in labels]
            rough[kind] = {}
            for ann_id, label, doc in zip(server.add_annotations(ds.dataset_id, docs), labels, docs):
                label_of[ann_id] = label
                rough[kind][ann_id] = rough_iou(doc, truth, label)
        for kind in KINDS:
            rows.append({"scene": name, "rough": kind, "mode": "rough input", "mean_iou": float(np.mean(list(
                rough[kind].values()))), "refined": "-", "overlap": None, "seconds": 0.0})
            for mode, fields, engine in modes(kind):
                tag = f"{kind}/{mode}"
                params = {"workerInterface": {"Model": model, "Tag of objects to refine": [kind],
                                              "Batch XY": "all", "Batch Z": "all", "Batch Time": "all",
                                              "Refine point annotations": kind == "point",
                                              "Refine rectangle annotations": kind == "rectangle", **fields},
                          "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 0, "tags": [tag]}
                settings = parse_settings(params, ds.dataset_id, checkpoint_dir)
                started = time.perf_counter()
                plain = job.geometry_options
                job.geometry_options = lambda s, plain=plain, engine=engine: dataclasses.replace(plain(s), **engine)
                try:
                    with NimbusClient(server.api_url, TOKEN) as client:
                        code = job.run_compute(settings, client, Reporter(stream=io.StringIO()), load)
                finally:
                    job.geometry_options = plain
                seconds = time.perf_counter() - started
                if code != 0:
                    raise RuntimeError(f"{tag}: job exited {code}")
                results = dict(rough[kind])  # kept originals count as themselves
                refined, outlines, made = 0, [], []
                for doc in server.annotations(ds.dataset_id):
                    original = (doc.get("sam2Refine") or {}).get("originalId")
                    if tag in doc["tags"] and original in results:
                        results[original] = iou_to_truth(doc["coordinates"], truth, label_of[original])
                        outlines.append(doc["coordinates"])
                        made.append(doc["_id"])
                        refined += 1
                with NimbusClient(server.api_url, TOKEN) as client:  # so that the next mode refines them again
                    client.delete_annotations(made)
                rows.append({"scene": name, "rough": kind, "mode": mode,
                             "mean_iou": float(np.mean(list(results.values()))),
                             "refined": f"{refined}/{len(results)}", "overlap": overlap_share(outlines),
                             "seconds": round(seconds, 1)})
                print(f"  {name} | {kind} | {mode}: IoU {rows[-1]['mean_iou']:.3f} refined {rows[-1]['refined']} "
                      f"overlap {100 * rows[-1]['overlap']:.2f} % ({seconds:.1f} s)", flush=True)
    return rows


def table(rows: list[dict], modes_shown: list[str] | None = None, overlap: bool = False) -> str:
    """One row per scene and kind of rough input; one column per mode: mean IoU (refined count),
    and with ``overlap`` the outlines' overlap in % of their area."""
    modes_all = list(dict.fromkeys(r["mode"] for r in rows))
    shown = [m for m in (modes_shown or modes_all) if m in modes_all]
    lines = ["| scene | rough | " + " | ".join(shown) + " |", "|---|---|" + "---|" * len(shown)]
    for scene, kind in dict.fromkeys((r["scene"], r["rough"]) for r in rows):
        cells = {r["mode"]: r for r in rows if r["scene"] == scene and r["rough"] == kind}
        values = []
        for m in shown:
            cell = cells.get(m)
            if cell is None:
                values.append("-")
                continue
            text = f"{cell['mean_iou']:.3f}" + (f" ({cell['refined']})" if cell["refined"] != "-" else "")
            if overlap and cell["overlap"] is not None:
                text += f", {100 * cell['overlap']:.2f} %"
            values.append(text)
        lines.append(f"| {scene} | {kind} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a real SAM2.1 checkpoint (default: the stand-ins)")
    parser.add_argument("--quick", action="store_true", help="only the 512 px scenes")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "accuracy.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        if args.checkpoint:
            from sam2_refine.model.sam2_model import Sam2BoxPredictor

            real, untrained = Sam2BoxPredictor.load(args.checkpoint)
            checkpoint_dir, model = args.checkpoint.parent, args.checkpoint.name
            what = f"{model}{' (UNTRAINED)' if untrained else ''}, {real.description}"
        else:
            checkpoint_dir, model = Path(tmp), "sam2.1_hiera_tiny.pt"
            write_layout_checkpoint(checkpoint_dir / model)  # recognised by settings, never loaded
            what = ("stand-ins: thresholds at the model's 1024 px input resolution; on the dense scene, the truth "
                    "with masks spilling 4 px into touching neighbours")
        for name, (channels, truth, stand_in) in scenes(args.quick).items():
            print(f"{name}: {int(truth.max())} objects", flush=True)
            if args.checkpoint:
                predictor = real
            elif stand_in == "spill":
                predictor = KnownMaskPredictor(labels=truth, spill=4.0, grid=(256, 256))
            else:
                predictor = ModelResolutionPredictor(threshold=0.35)
            rows += run_scene(name, channels, truth, lambda path, p=predictor: (p, False), checkpoint_dir, model)
    print(f"\n{time.strftime('%Y-%m-%d')}, predictor: {what}")
    print(table(rows, ["rough input", "whole / box", "crops / box", "auto / box"]))
    print()
    print(table(rows, ["auto / box", "auto / not apart", "auto / points by score", "auto / points by closest area",
                       "auto / points with negatives"], overlap=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "predictor": what, "rows": rows}, indent=2))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
