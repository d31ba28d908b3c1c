"""Scale-out by Batch XY: one job, four jobs on quarter batches, four jobs on the same batch.

Run from the repository root (after ``make venv``)::

    .venv/bin/python bench/bench_scaleout.py            # 4 XY x 1024 px x 50 objects (about 3 min)
    .venv/bin/python bench/bench_scaleout.py --quick    # 4 XY x 512 px x 10 objects

Each job is the real ``entrypoint.py`` in its own process (as NimbusImage's job queue starts
one container per tool run), with the real SAM2.1 tiny model (random weights: its speed does
not depend on them) whose low-resolution logits are replaced by those of the object under each
box (bench/realistic_masks.py), so that every job traces and uploads real outlines. All jobs of a
scenario start at once against one local test server. It reports each job's wall time and the
scenario's (first start to last exit), checks that the three scenarios leave the same outlines
and counts, and writes bench/results/scaleout.json. The CPU time of all jobs (user + system, each
job's own) shows whether the work was split or repeated.

On a machine with fewer cores than jobs the jobs share the cores (each job gets
``OMP_NUM_THREADS`` = cores // jobs, as containers sharing a host would be given): the point of
several jobs is several worker hosts (docs/deployment.md), which one machine cannot show.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sam2_refine.job.markers import original_of  # noqa: E402
from sam2_refine.testing.datasets import grid_scene, rough_octagons  # noqa: E402
from sam2_refine.testing.nimbus_server import NimbusTestServer  # noqa: E402

TOKEN = "bench-scaleout-token"

#: The real entrypoint.py with SAM2's masks replaced by realistic ones (bench/realistic_masks.py).
LAUNCHER = r"""
import atexit, resource, runpy, sys
sys.path.insert(0, "bench")

def _cpu():
    used = resource.getrusage(resource.RUSAGE_SELF)
    sys.stderr.write(f"\nCPU_SECONDS={used.ru_utime + used.ru_stime:.3f}\n")

atexit.register(_cpu)
import sam2_refine.cli as cli
from realistic_masks import MaskOracle, RealisticBoxPredictor

def load(path):
    from sam2_refine.model.sam2_model import Sam2BoxPredictor
    predictor, untrained = Sam2BoxPredictor.load(path)
    return RealisticBoxPredictor(predictor, MaskOracle()), untrained

cli._load_sam2 = load
runpy.run_path("entrypoint.py", run_name="__main__")
"""


def build(server: NimbusTestServer, size: int, objects: int, positions: int) -> tuple[str, list[str]]:
    scene = grid_scene(size, size, objects, channels=1, seed=0)
    pixels = np.broadcast_to(scene.channels, (positions, 1, 1) + scene.channels.shape).copy()
    ds = server.add_dataset(pixels)
    rng = np.random.default_rng(0)
    originals = []
    for xy in range(positions):
        originals += server.add_annotations(ds.dataset_id, [
            {"shape": "polygon", "tags": ["rough"], "channel": 0, "location": {"XY": xy, "Z": 0, "Time": 0},
             "coordinates": [{"x": float(x), "y": float(y)} for x, y in ring]}
            for ring in rough_octagons(scene.centres, scene.radii, rng)])
    return ds.dataset_id, originals


def start(server: NimbusTestServer, dataset_id: str, name: str, batch_xy: str, ckpt: Path,
          threads: int) -> subprocess.Popen:
    token = f"{TOKEN}-{name}"
    server.add_token(token, name)
    params = {"workerInterface": {"Model": "sam2.1_hiera_tiny.pt", "Tag of objects to refine": ["rough"],
                                  "Batch XY": batch_xy, "Batch Z": "all", "Batch Time": "all",
                                  "Delete original annotations": True, "Resolution": "Whole frame"},
              "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 0, "tags": ["refined"]}
    env = dict(os.environ, SAM2_CHECKPOINT_DIR=str(ckpt), OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    argv = [sys.executable, "-c", LAUNCHER, "--apiUrl", server.api_url, "--token", token, "--request", "compute",
            "--parameters", json.dumps(params), "--datasetId", dataset_id]
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def scenario(batches: dict[str, str], size: int, objects: int, positions: int, ckpt: Path) -> dict:
    with NimbusTestServer(token=TOKEN) as server:
        dataset_id, originals = build(server, size, objects, positions)
        began = time.perf_counter()
        threads = max(1, (os.cpu_count() or 1) // len(batches))  # as one host would share its cores
        procs = {name: (start(server, dataset_id, name, batch, ckpt, threads), time.perf_counter())
                 for name, batch in batches.items()}
        walls, cpu = {}, {}
        for name, (proc, t0) in procs.items():
            out, err = proc.communicate(timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"{name} exited {proc.returncode}: {out[-2000:]} {err[-2000:]}")
            walls[name] = time.perf_counter() - t0
            cpu[name] = float(err.rsplit("CPU_SECONDS=", 1)[1].split()[0])
        total = time.perf_counter() - began
        docs = server.annotations(dataset_id)
        made = {original_of(d): [(p["x"], p["y"]) for p in d["coordinates"]] for d in docs if original_of(d)}
        counts = {"refinements": len(made), "originals left": sum(1 for d in docs if d["_id"] in set(originals)),
                  "refinement docs": sum(1 for d in docs if original_of(d))}
    return {"jobs": walls, "cpu": cpu, "wall": total, "counts": counts, "outlines": made}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    size, objects, positions = (512, 10, 4) if args.quick else (1024, 50, 4)
    from sam2_refine.testing.checkpoints import make_untrained_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp)
        make_untrained_checkpoint(ckpt / "sam2.1_hiera_tiny.pt")
        plans = {"one job, XY all": {"solo": "all"},
                 "4 jobs, XY 1 / 2 / 3 / 4": {f"q{k}": str(k) for k in range(1, positions + 1)},
                 "4 jobs, each XY all": {f"a{k}": "all" for k in range(1, 5)}}
        results = {label: scenario(batches, size, objects, positions, ckpt) for label, batches in plans.items()}
    reference = results["one job, XY all"]
    same = {label: r["outlines"] == reference["outlines"] and r["counts"] == reference["counts"]
            for label, r in results.items()}
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs"
    print(f"\n{time.strftime('%Y-%m-%d')}, {machine}, SAM2.1 tiny (random weights, realistic masks), "
          f"{positions} XY x {size}x{size} px x {objects} objects, delete originals on\n")
    print("| scenario | wall time of each job (s) | first start to last exit (s) | CPU time of all jobs (s) "
          "| refinements | originals left | same outlines and counts as one job |")
    print("|---|---|---|---|---|---|---|")
    for label, r in results.items():
        jobs = " / ".join(f"{w:.1f}" for w in r["jobs"].values())
        print(f"| {label} | {jobs} | {r['wall']:.1f} | {sum(r['cpu'].values()):.1f} | {r['counts']['refinements']} | "
              f"{r['counts']['originals left']} | {'yes' if same[label] else 'NO'} |")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaleout.json").write_text(json.dumps(
        {"machine": machine, "size": size, "objects": objects, "positions": positions,
         "scenarios": {k: {kk: vv for kk, vv in v.items() if kk != "outlines"} | {"same_as_one_job": same[k]}
                       for k, v in results.items()}}, indent=2))
    if not all(same.values()):
        raise SystemExit("the scenarios did not leave the same result")


if __name__ == "__main__":
    main()
