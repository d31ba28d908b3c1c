"""Speed and memory of a refinement job: the engine against the per-box loop and the model floor.

Run from the repository root (after ``make venv``)::

    .venv/bin/python bench/bench_speed.py            # the full table (about 50 min on 2 cores)
    .venv/bin/python bench/bench_speed.py --quick    # a smoke run (about a minute)
    .venv/bin/python bench/bench_speed.py --cpu-precision   # b and c with the image encoder in
        # float32 against the precision a job chooses on this CPU (bfloat16 where it has the units),
        # SAM2.1 tiny, small and base+, configurations 0 and 1 (--models, --only)

One process, one SAM2.1 tiny model (random weights: the model's speed does not depend on their
values), the same synthetic datasets served by the local NimbusImage test server. Random weights
give noise for masks, which the engine would reject without tracing them, so in every variant the
decoder's low-resolution logits are replaced by those of the object under each box
(bench/realistic_masks.py; the model still runs in full, and the replacement's own time is taken
off every variant): all variants trace, simplify and upload realistic masks. For each
configuration (frame size, objects per location N, locations L) it measures, side by side:

  a  the original worker's per-box loop, re-implemented faithfully (bench/per_box_loop.py):
     ``predict()`` per box, every mask upsampled to the full frame, contours over the full frame;
  b  this project's engine through the same code path as a real job (``job.run_compute`` over
     HTTP: selection, frames, merge, embedding, decoding, polygons, upload), the model already
     loaded (model loading is the same fixed cost for every variant and is left out), with
     Resolution "Whole frame" so that it makes the same model passes as a and c. Where the
     default (Auto) would use object crops, that run is timed too (one encoder pass per crop:
     slower, more accurate on small objects);
  c  the floor: the encoder once per location plus the mask decoder for all N prompts (in the
     engine's batches and, with the windowed decoder, the engine's first windows), on images
     already in memory, and nothing else.

After one untimed warm-up call of the model, b and c run three times (twice for the
longest configuration), interleaved, and the fastest run of each is reported (identical model
calls vary by 10-30 % here). It also reports the time b spends outside the model's embed() and
decode() calls (I/O, merging, selection, polygons, upload) and its share of b's model time. It
prints a table (wall time, b/a, b/c, peak RSS of each variant, polygons per second of b) and
writes JSON to bench/results/speed.json. Peak RSS is the process's high-water mark, reset
before each variant through /proc/self/clear_refs (Linux).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from per_box_loop import run_per_box_loop  # noqa: E402
from realistic_masks import MaskOracle, RealisticBoxPredictor, RealisticImagePredictor  # noqa: E402
from speed_scenes import FULL, QUICK, Config, build_dataset, job_parameters  # noqa: E402

from sam2_refine.job import compute as job  # noqa: E402
from sam2_refine.engine.imaging import default_layers  # noqa: E402
from sam2_refine.nimbus.client import NimbusClient  # noqa: E402
from sam2_refine.engine.regions import choose_mode  # noqa: E402
from sam2_refine.nimbus.progress import Reporter  # noqa: E402
from sam2_refine.model.sam2_model import Sam2BoxPredictor  # noqa: E402
from sam2_refine.job.settings import parse_settings  # noqa: E402
from sam2_refine.testing.checkpoints import make_untrained_checkpoint  # noqa: E402
from sam2_refine.testing.nimbus_server import NimbusTestServer  # noqa: E402

TOKEN = "bench-token"


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def timed(fn, *args, **kwargs) -> tuple[float, float, object]:
    reset_peak()
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, rss_mb(), result


def run_engine(server, ds, checkpoint_dir: Path, predictor, resolution: str = "Whole frame",
               tag: str = "engine", model: str = "sam2.1_hiera_tiny.pt") -> int:
    settings = parse_settings(job_parameters(resolution, tag, model), ds.dataset_id, checkpoint_dir)
    with NimbusClient(server.api_url, TOKEN) as client:
        code = job.run_compute(settings, client, Reporter(stream=io.StringIO()), lambda path: (predictor, False))
    if code != 0:
        raise RuntimeError(f"engine exited {code}")
    return sum(1 for a in server.annotations(ds.dataset_id) if a["tags"] == [tag])


REPEATS = 3  # b and c each; 2 where one run of b takes over a minute
LONG_RUN_OBJECTS = 2000


class ModelClock:
    """The predictor, with the time spent inside embed() and decode() added up."""

    def __init__(self, predictor) -> None:
        self.predictor = predictor
        self.seconds = 0.0

    def __getattr__(self, name: str):
        return getattr(self.predictor, name)

    def embed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.predictor.embed(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started

    def decode(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.predictor.decode(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started


def remove_tagged(server: NimbusTestServer, dataset_id: str, tag: str) -> None:
    ids = [a["_id"] for a in server.annotations(dataset_id) if a["tags"] == [tag]]
    with NimbusClient(server.api_url, TOKEN) as client:
        client.delete_annotations(ids)


def first_windows(boxes: np.ndarray, height: int, width: int, grid_hw: tuple[int, int] | None) -> np.ndarray | None:
    """The windows (pixels) the engine asks the model for on its first pass over each box."""
    from sam2_refine.engine.geometry import Window
    from sam2_refine.engine.decoding import GROWTH_PAID
    from sam2_refine.engine.objects import first_margin

    if grid_hw is None:
        return None
    region = Window(0, 0, height, width)
    wins = [Window.around(box, GROWTH_PAID * first_margin(box, region, grid_hw), region) for box in boxes]
    return np.array([[w.top, w.left, w.bottom, w.right] for w in wins], dtype=np.int64)


def run_floor(images: list[np.ndarray], boxes: np.ndarray, predictor, points: np.ndarray | None = None) -> int:
    """The encoder once per image and the decoder for every prompt: boxes (with a windowed
    decoder, in the engine's first windows), or (with ``points``, (N, 2)) one positive point
    each asking for three masks, as the engine asks."""
    decoded = 0
    for image in images:
        predictor.embed(image)
        windows = first_windows(boxes, image.shape[0], image.shape[1], getattr(predictor, "logit_grid", None))
        for start in range(0, len(boxes), predictor.max_batch):
            stop = start + predictor.max_batch
            if points is not None:
                chunk = points[start:stop, None]
                predictor.decode(None, multimask=True, points=chunk, point_labels=np.ones(chunk.shape[:2], np.int64))
            elif windows is not None:
                predictor.decode(boxes[start:stop], windows=windows[start:stop])
            else:
                predictor.decode(boxes[start:stop])
            decoded += len(boxes[start:stop])
    return decoded


class StageClock:
    """Adds up the time spent in one function of a module (patched in place while in use)."""

    def __init__(self, module, name: str) -> None:
        self.module, self.name = module, name
        self.seconds = 0.0
        self._original = getattr(module, name)

    def __enter__(self) -> StageClock:
        def timed_stage(*args, **kwargs):
            started = time.perf_counter()
            try:
                return self._original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        setattr(self.module, self.name, timed_stage)
        return self

    def __exit__(self, *exc) -> None:
        setattr(self.module, self.name, self._original)


def timed_less_oracle(oracle: MaskOracle, fn, *args, **kwargs) -> tuple[float, float, object]:
    """:func:`timed`, less the time the mask oracle took inside it."""
    before = oracle.seconds
    seconds, peak, result = timed(fn, *args, **kwargs)
    return seconds - (oracle.seconds - before), peak, result


def scene_inputs(server, ds, scene, cfg: Config) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None]:
    """The floor's inputs: each location's merged frame, the prompt boxes of location 0, and (for
    ``cfg.points``) its clicks (N, 2)."""
    from sam2_refine.engine.geometry import polygon_from_ring, prompt_box

    rough = [a for a in server.annotations(ds.dataset_id) if a["location"]["XY"] == 0]
    clicks = None
    if cfg.points:
        clicks = np.array([[a["coordinates"][0]["x"], a["coordinates"][0]["y"]] for a in rough])
        boxes = np.concatenate([clicks - scene.radii[:, None], clicks + scene.radii[:, None]], axis=1)
    else:
        boxes = np.stack([prompt_box(polygon_from_ring(np.array([[p["x"], p["y"]] for p in a["coordinates"]])),
                                     cfg.size, cfg.size) for a in rough])
    with NimbusClient(server.api_url, TOKEN) as client:
        info = client.get_dataset_info(ds.dataset_id)
        layers = default_layers(info.num_channels)
        images = [job.load_location_image(client, info, layers, job.Location(xy, 0, 0)).window(
                  0, 0, info.height, info.width) for xy in range(cfg.locations)]
    return images, boxes, clicks


def measure(cfg: Config, predictor, checkpoint_dir: Path, include_per_box: bool) -> dict:
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from sam2_refine.engine import location as refine
    from sam2_refine.engine import prompts

    row: dict = {"config": cfg.name, "size": cfg.size, "objects": cfg.objects, "locations": cfg.locations}
    oracle = MaskOracle()
    realistic = RealisticBoxPredictor(predictor, oracle)
    with NimbusTestServer(token=TOKEN) as server:
        ds, scene = build_dataset(server, cfg)
        images, boxes, clicks = scene_inputs(server, ds, scene, cfg)
        # warm-up, untimed: the first calls at new shapes pay one-off kernel set-up costs
        predictor.embed(images[0])
        predictor.decode(boxes[:predictor.max_batch])
        if clicks is not None:
            warm = clicks[:predictor.max_batch, None]
            predictor.decode(None, multimask=True, points=warm, point_labels=np.ones(warm.shape[:2], np.int64))
        # c and b, interleaved; the fastest of each is kept (the model's own speed varies by
        # 10-30 % between identical calls on this shared 2-core machine).
        clock = ModelClock(realistic)
        runs_b, runs_c, model_b, separations = [], [], [], []
        repeats = REPEATS if cfg.objects * cfg.locations < LONG_RUN_OBJECTS else 2
        for _ in range(repeats):
            # c: the floor
            seconds, row["c_peak_mb"], _ = timed_less_oracle(oracle, run_floor, images, boxes, realistic, clicks)
            runs_c.append(seconds)
            # b: the engine, whole frame (the same model passes as a and c)
            clock.seconds, oracle_before = 0.0, oracle.seconds
            with StageClock(refine, "_separate") as separation:
                seconds, row["b_peak_mb"], created = timed_less_oracle(oracle, run_engine, server, ds, checkpoint_dir,
                                                                       clock)
            runs_b.append(seconds)
            model_b.append(clock.seconds - (oracle.seconds - oracle_before))
            separations.append(separation.seconds)
            remove_tagged(server, ds.dataset_id, "engine")  # so that the next run refines them again
        del images
        best = int(np.argmin(runs_b))
        row["c_s"], row["b_s"], row["b_created"] = min(runs_c), runs_b[best], created
        row["c_runs"], row["b_runs"] = runs_c, runs_b
        row["b_outside_model_s"] = runs_b[best] - model_b[best]
        row["b_separation_s"] = separations[best]
        # the default Resolution (Auto): object crops where objects are small, one encoder pass each
        mode_boxes = boxes if clicks is None else np.concatenate(  # the engine's view of a point (engine/prompts.py)
            [clicks - prompts.POINT_SIZE_FOR_AUTO / 2, clicks + prompts.POINT_SIZE_FOR_AUTO / 2], axis=1)
        row["auto_mode"] = choose_mode(mode_boxes, cfg.size, cfg.size, "auto")
        if row["auto_mode"] == "crops":
            row["b_auto_s"], _, row["b_auto_created"] = timed_less_oracle(
                oracle, run_engine, server, ds, checkpoint_dir, realistic, "Auto", "auto")
        # a: the per-box loop
        if include_per_box and cfg.per_box:
            sam2_predictor = RealisticImagePredictor(SAM2ImagePredictor(predictor.model), oracle)
            try:
                with NimbusClient(server.api_url, TOKEN) as client:
                    row["a_s"], row["a_peak_mb"], row["a_created"] = timed_less_oracle(
                        oracle, run_per_box_loop, client, ds.dataset_id, sam2_predictor, default_layers(1), "rough")
            finally:
                sam2_predictor.close()
    total = cfg.objects * cfg.locations
    row["selected"] = total
    row["oracle_s"] = oracle.seconds
    row["b_over_c"] = row["b_s"] / row["c_s"]
    row["outside_share"] = row["b_outside_model_s"] / (row["b_s"] - row["b_outside_model_s"])
    row["polygons_per_s"] = row["b_created"] / row["b_s"]
    if "a_s" in row:
        row["a_over_b"] = row["a_s"] / row["b_s"]
    return row


def table(rows: list[dict]) -> str:
    head = ("| configuration | a per-box loop (s) | b engine (s) | c floor (s) | a/b (speed-up) | b/c | "
            "b/c of medians | "
            "b outside the model | separation in b | peak RSS a / b / c (MB) | created a / b | polygons/s (b) | "
            "b with Auto = crops (s) |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        a = f"{r['a_s']:.1f}" if "a_s" in r else "not run"
        ab = f"{r['a_over_b']:.2f}x" if "a_over_b" in r else "-"
        peak_a = f"{r['a_peak_mb']:.0f}" if "a_peak_mb" in r else "-"
        separation = (f"{r['b_separation_s']:.2f} s ({100 * r['b_separation_s'] / r['b_s']:.1f} %)"
                      if "b_separation_s" in r else "-")
        lines.append(f"| {r['config']} | {a} | {r['b_s']:.1f} | {r['c_s']:.1f} | {ab} | {r['b_over_c']:.3f} | "
                     f"{statistics.median(r['b_runs']) / statistics.median(r['c_runs']):.3f} | "
                     f"{r['b_outside_model_s']:.2f} s ({100 * r['outside_share']:.1f} %) | {separation} | "
                     f"{peak_a} / {r['b_peak_mb']:.0f} / {r['c_peak_mb']:.0f} | {r.get('a_created', '-')} / "
                     f"{r['b_created']} of {r['selected']} | {r['polygons_per_s']:.1f} | "
                     + (f"{r['b_auto_s']:.1f} |" if "b_auto_s" in r else "(Auto = whole) |"))
    return "\n".join(lines)


def dense_separation(size: int = 2048, objects: int = 1000) -> dict:
    """The separation step on a dense field of touching nuclei whose masks spill 4 px into their
    neighbours (the known-mask stand-in on the truth: no model), at ``size`` x ``size`` with
    ``objects`` nuclei: the step's own time, and the rest of the engine's time around it."""
    from sam2_refine.engine import location as refine
    from sam2_refine.engine.options import GeometryOptions
    from sam2_refine.engine.location import refine_location
    from sam2_refine.job.selection import to_original
    from sam2_refine.testing.datasets import dense_scene
    from sam2_refine.testing.stand_in import KnownMaskPredictor

    scene = dense_scene(size, size, objects, radius=(16.0, 26.0), spacing=1.2, seed=1)
    originals = []
    for k in range(1, scene.count + 1):
        rows, cols = np.nonzero(scene.labels == k)
        x0, x1, y0, y1 = cols.min() - 2.5, cols.max() + 2.5, rows.min() - 2.5, rows.max() + 2.5
        doc = {"_id": f"a{k:05d}", "shape": "polygon", "tags": ["n"], "channel": 0,
               "location": {"XY": 0, "Z": 0, "Time": 0},
               "coordinates": [{"x": float(x), "y": float(y)} for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]}
        originals.append(to_original(doc))
    image = np.zeros((size, size, 3), np.float32)
    out = {"size": size, "objects": scene.count}
    for on in (False, True):
        predictor = KnownMaskPredictor(labels=scene.labels, spill=4.0, grid=(256, 256), max_batch=64)
        with StageClock(refine, "_separate") as clock:
            started = time.perf_counter()
            outcomes = refine_location(predictor, image, originals, GeometryOptions(separate=on, resolution="whole"))
            total = time.perf_counter() - started
        out["with" if on else "without"] = {"seconds": total, "separation_s": clock.seconds,
                                            "refined": sum(type(o).__name__ == "Refined" for o in outcomes)}
    print(f"dense {size}x{size}, {scene.count} touching nuclei (stand-in, no model): separation step "
          f"{out['with']['separation_s']:.2f} s; engine without the model {out['without']['seconds']:.1f} s "
          f"without separation, {out['with']['seconds']:.1f} s with", flush=True)
    return out


#: (label, cores, outline workers) of the zero-cost comparison: one core with the outline work
#: on the job's thread, two cores with two worker processes.
ZERO_COST_SETTINGS = [("1 core, on the job's thread", "0", 0), ("2 cores, 2 outline workers", "0,1", 2)]


def zero_cost(cfg_index: int, rounds: int = 2, repeats: int = 3) -> dict:
    """Outline work in parallel (issue 15): the job and the engine with the zero-cost stand-in
    model (what a GPU makes of the model), on one core against two.

    Each setting runs ``bench/zero_cost_job.py`` in a child process pinned to its cores (every
    thread and process of the job: the job's, the local server's, the outline workers'), the
    settings alternating ``rounds`` times, ``repeats`` jobs and engine runs each time; medians of
    all runs are reported, with the fastest. The outlines must be identical in every setting."""
    cfg = FULL[cfg_index]
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        raise SystemExit("--zero-cost compares one core with two: this machine offers fewer")
    results: dict[str, dict] = {label: {"jobs_s": [], "engine_s": []} for label, _, _ in ZERO_COST_SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for label, on, workers in ZERO_COST_SETTINGS:
                out = Path(tmp) / "run.json"
                subprocess.run([sys.executable, str(REPO / "bench" / "zero_cost_job.py"), "--config", str(cfg_index),
                                "--cores", on, "--workers", str(workers), "--repeats", str(repeats),
                                "--out", str(out)], check=True, cwd=REPO)
                run = json.loads(out.read_text())
                got = results[label]
                got["jobs_s"] += run["jobs_s"]
                got["engine_s"] += run["engine_s"]
                for key in ("created", "engine_refined", "digest", "engine_digest"):
                    got.setdefault(key, run[key])
                    if got[key] != run[key]:
                        raise RuntimeError(f"{label}: {key} differs between rounds")
    first = results[ZERO_COST_SETTINGS[0][0]]
    for label, got in results.items():
        if (got["digest"], got["engine_digest"]) != (first["digest"], first["engine_digest"]):
            raise RuntimeError(f"{label}: other outlines than {ZERO_COST_SETTINGS[0][0]}")
        got["job_polygons_per_s"] = got["created"] / statistics.median(got["jobs_s"])
        got["engine_polygons_per_s"] = got["engine_refined"] / statistics.median(got["engine_s"])
        got["engine_ratio"] = got["engine_polygons_per_s"] / first["engine_polygons_per_s"]
        got["job_ratio"] = got["job_polygons_per_s"] / first["job_polygons_per_s"]
        got["engine_ratio_fastest"] = min(first["engine_s"]) / min(got["engine_s"])
    return {"config": cfg.name, "rounds": rounds, "repeats": repeats, "settings": results}


def zero_cost_table(result: dict) -> str:
    lines = [f"zero-cost model, {result['config']} (medians of {result['rounds'] * result['repeats']} runs; "
             "identical outlines in every setting)",
             "| setting | engine (s) | engine polygons/s | vs 1 core (fastest runs) | job (s) | job polygons/s "
             "| vs 1 core |",
             "|---|---|---|---|---|---|---|"]
    for label, got in result["settings"].items():
        lines.append(f"| {label} | {statistics.median(got['engine_s']):.3f} | {got['engine_polygons_per_s']:.0f} | "
                     f"{got['engine_ratio']:.2f}x ({got['engine_ratio_fastest']:.2f}x) | "
                     f"{statistics.median(got['jobs_s']):.3f} | {got['job_polygons_per_s']:.0f} | "
                     f"{got['job_ratio']:.2f}x |")
    return "\n".join(lines)


def cpu_workers(cfg: Config, predictor, checkpoint_dir: Path, rounds: int = 2) -> dict:
    """The CPU job (the real model, its threads on every core) with the outline work on the job's
    thread (the CPU default) against two outline worker processes: what workers next to the
    model would cost it. Variant b's job, alternating, ``rounds`` times each."""
    oracle = MaskOracle()
    realistic = RealisticBoxPredictor(predictor, oracle)
    out: dict = {"config": cfg.name, "torch_threads": torch.get_num_threads()}
    with NimbusTestServer(token=TOKEN) as server:
        ds, _ = build_dataset(server, cfg)
        run_engine(server, ds, checkpoint_dir, realistic)  # warm-up
        remove_tagged(server, ds.dataset_id, "engine")
        for _ in range(rounds):
            for workers in ("0", "2"):
                os.environ["SAM2_REFINE_OUTLINE_WORKERS"] = workers
                try:
                    seconds, _, created = timed_less_oracle(oracle, run_engine, server, ds, checkpoint_dir, realistic)
                finally:
                    os.environ.pop("SAM2_REFINE_OUTLINE_WORKERS", None)
                out.setdefault(workers, []).append(seconds)
                out.setdefault(f"created_{workers}", created)
                remove_tagged(server, ds.dataset_id, "engine")
    print(f"CPU job {cfg.name}, real model on {out['torch_threads']} threads: outline work on the job's thread "
          f"{statistics.median(out['0']):.2f} s, on 2 worker processes {statistics.median(out['2']):.2f} s "
          f"(medians of {rounds})", flush=True)
    return out


#: --cpu-precision: model -> stock file name (random weights are made under that name).
MODELS = {"tiny": "sam2.1_hiera_tiny.pt", "small": "sam2.1_hiera_small.pt", "base_plus": "sam2.1_hiera_base_plus.pt"}


def measure_precisions(cfg: Config, predictors: dict, checkpoint_dir: Path, model_file: str,
                       repeats: int = REPEATS) -> dict:
    """b (the job) and c (the floor) of one configuration for each predictor (label -> predictor,
    the first the reference), interleaved: each round runs c and b of every predictor in turn.
    Realistic masks as in :func:`measure`; the oracle's time is taken off."""
    oracle = MaskOracle()
    realistic = {label: RealisticBoxPredictor(p, oracle) for label, p in predictors.items()}
    row: dict = {"config": cfg.name, "variants": {label: {"b_runs": [], "c_runs": [], "b_cpu": [], "c_cpu": []}
                                                  for label in predictors}}
    with NimbusTestServer(token=TOKEN) as server:
        ds, scene = build_dataset(server, cfg)
        images, boxes, clicks = scene_inputs(server, ds, scene, cfg)
        for predictor in realistic.values():  # warm-up, untimed
            predictor.embed(images[0])
            predictor.decode(boxes[:predictor.max_batch])
        for _ in range(repeats):
            for label, predictor in realistic.items():
                got = row["variants"][label]
                cpu = time.process_time()  # the process's CPU seconds (all threads, the test server's too)
                seconds, _, _ = timed_less_oracle(oracle, run_floor, images, boxes, predictor, clicks)
                got["c_runs"].append(seconds)
                got["c_cpu"].append(time.process_time() - cpu)
                cpu = time.process_time()
                seconds, _, created = timed_less_oracle(oracle, run_engine, server, ds, checkpoint_dir, predictor,
                                                        model=model_file)
                got["b_runs"].append(seconds)
                got["b_cpu"].append(time.process_time() - cpu)
                got["created"] = created
                remove_tagged(server, ds.dataset_id, "engine")
    return row


def precision_table(rows: list[dict]) -> str:
    """Wall seconds, medians (fastest in brackets); speed-ups of medians against the first
    variant; the process's CPU seconds of b (median) and their ratio."""
    lines = ["| model | configuration | variant | b job (s) | b speed-up | c floor (s) | c speed-up | b CPU (s) | "
             "b CPU ratio | created |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        first = next(iter(r["variants"].values()))
        for label, got in r["variants"].items():
            b, c = statistics.median(got["b_runs"]), statistics.median(got["c_runs"])
            sb = statistics.median(first["b_runs"]) / b
            sc = statistics.median(first["c_runs"]) / c
            b_cpu = statistics.median(got["b_cpu"])
            lines.append(f"| {r['model']} | {r['config']} | {label} | {b:.2f} ({min(got['b_runs']):.2f}) | "
                         f"{sb:.2f}x | {c:.2f} ({min(got['c_runs']):.2f}) | {sc:.2f}x | {b_cpu:.1f} | "
                         f"{statistics.median(first['b_cpu']) / b_cpu:.2f}x | {got['created']} |")
    return "\n".join(lines)


def cpu_precision(models: list[str], configs: list[Config], out: Path, repeats: int = REPEATS) -> int:
    """The CPU job with its image encoder in float32 against the precision a job chooses on this
    CPU (bfloat16 where it has the units), per model and configuration, interleaved."""
    from sam2_refine.model.sam2_model import DeviceChoice, build_model, choose_device

    chosen = choose_device("cpu")
    fp32 = DeviceChoice("cpu", bfloat16=False, tf32=False)
    print(f"chosen on this CPU: {chosen.describe()}", flush=True)
    caps = dict(torch.cpu.get_capabilities())
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {caps.get('cpu_name')}, "
            f"{os.cpu_count()} CPUs, torch {torch.__version__} threads {torch.get_num_threads()}",
            "bf16_flags": [k for k in ("avx512_bf16", "amx_bf16") if caps.get(k)], "chosen": chosen.describe(),
            "load_before": list(os.getloadavg()),
            "command": " ".join(["bench/bench_speed.py", *sys.argv[1:]])}
    rows = []
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint_dir = Path(tmp)
        for key in models:
            path = make_untrained_checkpoint(checkpoint_dir / MODELS[key], MODELS[key])
            model = build_model(path, fp32)
            predictors = {"fp32": Sam2BoxPredictor(model, fp32, name=path.name),
                          "chosen": Sam2BoxPredictor(model, chosen, name=path.name)}
            for cfg in configs:
                print(f"running {key} {cfg.name} ...", flush=True)
                row = measure_precisions(cfg, predictors, checkpoint_dir, path.name, repeats)
                row["model"] = key
                rows.append(row)
                print(precision_table([row]), flush=True)
                out.with_name("speed_cpu_precision.partial.json").write_text(json.dumps(rows, indent=2))
            del predictors, model
            path.unlink()
    meta["load_after"] = list(os.getloadavg())
    print(f"\n{meta['date']}, {meta['machine']}, bf16 flags {meta['bf16_flags']}; chosen: {meta['chosen']}; "
          f"load {meta['load_before']} -> {meta['load_after']}")
    print(precision_table(rows))
    target = out.with_name("speed_cpu_precision.json")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwritten {target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small configurations")
    parser.add_argument("--no-per-box", action="store_true", help="skip variant a")
    parser.add_argument("--sam2-decoder", action="store_true", help="use sam2's own mask decoder in b and c")
    parser.add_argument("--local-statistics", action="store_true",
                        help="count the dynamic-multimask rule near each box, not over the whole grid "
                             "(not sam2's rule; for measuring what the exact rule costs)")
    parser.add_argument("--only", help="comma-separated indices of configurations to run")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "speed.json")
    parser.add_argument("--table", type=Path, help="print the table of an earlier run's JSON and stop")
    parser.add_argument("--separation-dense", action="store_true",
                        help="also time the separation step on a dense 2048 px field of 1000 touching nuclei")
    parser.add_argument("--zero-cost", action="store_true",
                        help="only the outline work in parallel: the zero-cost model on 1 core against 2 "
                             "(configuration --only, default 7), and the CPU job with and without outline workers")
    parser.add_argument("--cpu-precision", action="store_true",
                        help="only the CPU image encoder in float32 against the precision a job chooses here "
                             "(bfloat16 where the CPU has the units): b and c, interleaved, for --models and the "
                             "configurations --only (default 0,1); JSON in speed_cpu_precision.json")
    parser.add_argument("--models", default="tiny,small,base_plus", help="with --cpu-precision: "
                        "comma-separated of " + ", ".join(MODELS))
    parser.add_argument("--repeats", type=int, default=REPEATS, help="with --cpu-precision: runs of b and c each")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core); one thread "
                        "gives steadier ratios on a machine other processes load")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_precision:
        return cpu_precision(args.models.split(","), [FULL[int(i)] for i in (args.only or "0,1").split(",")],
                             args.out, args.repeats)
    if args.zero_cost:
        index = int(args.only or 7)
        result = zero_cost(index)
        print(zero_cost_table(result), flush=True)
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint_dir = Path(tmp)
            make_untrained_checkpoint(checkpoint_dir / "sam2.1_hiera_tiny.pt")
            predictor, _ = Sam2BoxPredictor.load(checkpoint_dir / "sam2.1_hiera_tiny.pt")
            result["cpu_job"] = cpu_workers(FULL[index], predictor, checkpoint_dir)
        result["meta"] = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
        out = args.out.with_name("zero_cost.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"written {out}")
        return 0
    if args.table:
        saved = json.loads(args.table.read_text())
        meta = saved["meta"]
        print(f"{meta['date']}, {meta['machine']}, {meta['model']}, decoder: {meta['decoder']}")
        print(table(saved["rows"]))
        return 0
    configs = QUICK if args.quick else FULL
    if args.only:
        configs = [configs[int(i)] for i in args.only.split(",")]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint_dir = Path(tmp)
        make_untrained_checkpoint(checkpoint_dir / "sam2.1_hiera_tiny.pt")
        kwargs = {"fast_decoder": False} if args.sam2_decoder else {}
        if args.local_statistics:
            kwargs["local_statistics"] = True
        predictor, _ = Sam2BoxPredictor.load(checkpoint_dir / "sam2.1_hiera_tiny.pt", **kwargs)
        predictor.embed(np.zeros((1024, 1024, 3), np.float32))  # warm-up: first calls allocate
        predictor.decode(np.array([[10.0, 10.0, 60.0, 60.0]] * 4))
        rows = []
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for cfg in configs:
            print(f"running {cfg.name} ...", flush=True)
            rows.append(measure(cfg, predictor, checkpoint_dir, include_per_box=not args.no_per_box))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            args.out.with_suffix(".partial.json").write_text(json.dumps(rows, indent=2))
    dense = dense_separation() if args.separation_dense else None
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__} threads {torch.get_num_threads()}", "model": "SAM2.1 tiny, random weights, CPU",
            "decoder": getattr(predictor, "decoder_name", "sam2"),
            "command": " ".join(["bench/bench_speed.py", *(argv or sys.argv[1:])])}
    print()
    print(f"{meta['date']}, {meta['machine']}, {meta['model']}, decoder: {meta['decoder']}")
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "dense_separation": dense}, indent=2))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
