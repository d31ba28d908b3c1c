"""A job costs what its batch holds, not what the dataset holds: jobs against growing datasets.

Runs the real ``entrypoint.py`` as a subprocess with the zero-cost stand-in model (no torch: the
model costs nothing, so what is measured is reading, refining around the model, uploading and
converging) against the local test server, which indexes annotations as the real server's
MongoDB collection does (a cursor page costs what it holds; every ``list/ids`` query walks all of
the dataset's entries, as the plugin's aggregation hinted to ``{datasetId, _id}`` does:
sam2_refine/testing/annotation_store.py). Scenarios::

    python bench/bench_dataset_scale.py one-location [--others 0,100000,1000000]
    python bench/bench_dataset_scale.py refine-all [--locations 500 --per-location 100]
    python bench/bench_dataset_scale.py time-all [--times 1000 --others 0,100000,1000000]
    python bench/bench_dataset_scale.py one-location --old-server   # no list/ids or hydrate
    python bench/bench_dataset_scale.py costs      # read_plan.ReadCosts, measured

- ``one-location``: one location (XY 1, Z 1, Time 1) holding 100 rough nucleus outlines, in
  datasets also holding N other polygons at the other 99 time points; the job with "Delete
  original annotations" off, on, and a re-run with nothing left to do.
- ``refine-all``: every location of a dataset of ``locations`` time points x ``per-location``
  objects; the share of the job spent re-reading the refinements (``RefinementWatch.read``,
  timed inside the job).
- ``time-all``: Batch Time "all" at XY 1 over ``times`` time points (a few objects each), while
  N other polygons sit at XY 2: requests per location as the dataset grows.

Each row: the job's wall time, its peak RSS (the job's process), the bytes the server sent it,
its requests, and the server's ``list/ids`` walks. Run on an otherwise idle machine; the CPU is
printed with the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine_info import cpu_name  # noqa: E402
from sam2_refine.testing.checkpoints import write_layout_checkpoint  # noqa: E402
from sam2_refine.testing.datasets import annotation_doc, cell_scene, rough_polygon  # noqa: E402
from sam2_refine.testing.nimbus_server import NimbusTestServer  # noqa: E402

TOKEN = "bench-token"
SIZE = 256
#: Runs entrypoint.py with the zero-cost stand-in, and times RefinementWatch.read inside the job.
LAUNCHER = r"""
import atexit, json, os, runpy, sys, time, types

class CheckpointError(RuntimeError):
    pass

fake = types.ModuleType("sam2_refine.model.sam2_model")
fake.CheckpointError = CheckpointError
sys.modules["sam2_refine.model.sam2_model"] = fake

import sam2_refine.cli as cli
from sam2_refine.job import converge
from sam2_refine.testing.stand_in import ZeroCostPredictor
cli._load_sam2 = lambda path: (ZeroCostPredictor(), False)
spent = {"rereads_s": 0.0, "rereads": 0}
read = converge.RefinementWatch.read
def timed(self, *args, **kwargs):
    started = time.perf_counter()
    try:
        return read(self, *args, **kwargs)
    finally:
        spent["rereads_s"] += time.perf_counter() - started
        spent["rereads"] += 1
converge.RefinementWatch.read = timed
def peak():  # VmHWM: this process's own peak (ru_maxrss would count the parent's pages at fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
atexit.register(lambda: open(os.environ["BENCH_SPENT"], "w").write(json.dumps({**spent, "peak_mb": peak()})))
runpy.run_path("entrypoint.py", run_name="__main__")
"""


def params(batch_xy: str, batch_time: str, delete: bool) -> dict[str, Any]:
    interface = {"Model": "sam2.1_hiera_tiny.pt", "Delete original annotations": delete, "Padding": 0,
                 "Smoothing": 0.7, "Tag of objects to refine": ["nucleus"], "Batch XY": batch_xy, "Batch Z": "",
                 "Batch Time": batch_time}
    return {"type": "annotation", "name": "SAM2 Refiner", "image": "annotations/sam2_refine_worker:latest",
            "channel": 0, "tags": ["refined"], "tile": {"XY": 0, "Z": 0, "Time": 0},
            "assignment": {"XY": 0, "Z": 0, "Time": 0}, "connectTo": {"tags": [], "channel": None},
            "workerInterface": interface}


def scene(count: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """A (1, SIZE, SIZE) uint16 frame with ``count`` nuclei and a rough outline of each."""
    made = cell_scene(SIZE, SIZE, count, radius=(6.0, 9.0), seed=seed)
    rng = np.random.default_rng(seed + 1)
    outlines = [rough_polygon(made.labels == k, "jittered", rng) for k in range(1, made.count + 1)]
    return (made.channels[:1] * 60000).astype(np.uint16), outlines


def other_polygon(rng: np.random.Generator, xy: int, time_point: int) -> dict[str, Any]:
    x, y = rng.uniform(10, SIZE - 10, 2)
    return {"shape": "polygon", "tags": ["other"], "channel": 0, "location": {"XY": xy, "Z": 0, "Time": time_point},
            "coordinates": [{"x": float(x), "y": float(y)}, {"x": float(x) + 4, "y": float(y)},
                            {"x": float(x) + 4, "y": float(y) + 4}, {"x": float(x), "y": float(y) + 4}]}


def add_others(server: NimbusTestServer, dataset_id: str, n: int, places: list[tuple[int, int]], seed: int = 9) -> None:
    rng = np.random.default_rng(seed)
    chunk = 50_000
    for start in range(0, n, chunk):
        picks = rng.integers(0, len(places), min(chunk, n - start))
        server.add_annotations(dataset_id, (other_polygon(rng, *places[p]) for p in picks))


def run_job(server: NimbusTestServer, dataset_id: str, request: dict[str, Any], ckpt: Path,
            work: Path) -> dict[str, Any]:
    """The job as a subprocess; its wall time, peak RSS, the bytes and requests it cost."""
    # The server's million seeded documents out of the garbage collector's way: a full
    # collection walks them all, an artifact of an in-process server that MongoDB does not have.
    gc.collect()
    gc.freeze()
    before = len(server.requests)
    env = {**os.environ, "SAM2_CHECKPOINT_DIR": str(ckpt), "SAM2_REFINE_SUMMARY": str(work / "summary.json"),
           "BENCH_SPENT": str(work / "spent.json"), "SAM2_REFINE_OUTLINE_WORKERS": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-c", LAUNCHER, "--apiUrl", server.api_url, "--token", TOKEN, "--request", "compute",
            "--parameters", json.dumps(request), "--datasetId", dataset_id]
    scans = server.scans
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    requests = server.requests[before:]
    spent = json.loads((work / "spent.json").read_text()) if (work / "spent.json").exists() else {}
    return {"code": code, "wall_s": wall, "rss_mb": spent.get("peak_mb", usage.ru_maxrss / 1024),
            "received_mb": sum(r.response_bytes for r in requests) / 2**20, "requests": len(requests),
            "by_route": Counter(f"{r.method} {r.path.split('/')[0]}" for r in requests),
            "walks": server.scans - scans, "last": lines[-1] if lines else {},
            "rereads_s": spent.get("rereads_s", 0.0), "rereads": spent.get("rereads", 0)}


def one_location(args: argparse.Namespace, ckpt: Path, work: Path) -> None:
    frame, outlines = scene(100)
    rows = []
    for n in args.others:
        with NimbusTestServer(token=TOKEN) as server:
            server.has_list_ids = not args.old_server
            times = 100
            ds = server.add_dataset(np.broadcast_to(frame, (1, times, 1, 1, SIZE, SIZE)))
            add_others(server, ds.dataset_id, n, [(0, t) for t in range(1, times)])
            for mode, delete in (("delete off", False), ("delete on", True), ("re-run", True)):
                if mode != "re-run":
                    _reset_location(server, ds.dataset_id, outlines)
                result = run_job(server, ds.dataset_id, params("1", "1", delete), ckpt, work)
                rows.append((n, mode, result))
                print(_row(n, mode, result), flush=True)
    print(_table(rows, "other polygons"))


def _reset_location(server: NimbusTestServer, dataset_id: str, outlines: list[np.ndarray]) -> None:
    """The location as a user left it: its 100 rough outlines, no refinement."""
    with server._lock:
        for doc in [d for d in server.state.annotations.values()
                    if d.get("datasetId") == dataset_id and d.get("location", {}).get("Time") == 0]:
            server.state.annotations.pop(doc["_id"])
    server.add_annotations(dataset_id, [annotation_doc(o, xy=0, tags=["nucleus"]) for o in outlines])


def refine_all(args: argparse.Namespace, ckpt: Path, work: Path) -> None:
    frame, outlines = scene(args.per_location)
    with NimbusTestServer(token=TOKEN) as server:
        server.has_list_ids = not args.old_server
        ds = server.add_dataset(np.broadcast_to(frame, (1, args.locations, 1, 1, SIZE, SIZE)))
        for t in range(args.locations):
            server.add_annotations(ds.dataset_id, [dict(annotation_doc(o, xy=0, tags=["nucleus"]),
                                                        location={"XY": 0, "Z": 0, "Time": t}) for o in outlines])
        result = run_job(server, ds.dataset_id, params("1", "all", False), ckpt, work)
    share = result["rereads_s"] / result["wall_s"]
    print(_row(args.locations * args.per_location, "refine all", result))
    print(f"re-reads: {result['rereads']} taking {result['rereads_s']:.2f} s, {100 * share:.1f} % of the job")


def time_all(args: argparse.Namespace, ckpt: Path, work: Path) -> None:
    frame, outlines = scene(args.per_location)
    rows = []
    for n in args.others:
        with NimbusTestServer(token=TOKEN) as server:
            server.has_list_ids = not args.old_server
            ds = server.add_dataset(np.broadcast_to(frame, (2, args.times, 1, 1, SIZE, SIZE)))
            for t in range(args.times):
                server.add_annotations(ds.dataset_id, [dict(annotation_doc(o, xy=0, tags=["nucleus"]),
                                                            location={"XY": 0, "Z": 0, "Time": t}) for o in outlines])
            add_others(server, ds.dataset_id, n, [(1, t) for t in range(args.times)])
            result = run_job(server, ds.dataset_id, params("1", "all", False), ckpt, work)
        rows.append((n, "Time all", result))
        print(_row(n, "Time all", result) + f", {result['requests'] / args.times:.2f} requests per location",
              flush=True)
    print(_table(rows, "other polygons"))


def costs(args: argparse.Namespace, ckpt: Path, work: Path) -> None:
    """The constants of read_plan.ReadCosts, measured against the test server: one request, a
    list/ids walk per annotation, an annotation and a connection shipped and read."""
    from sam2_refine.nimbus.client import NimbusClient

    n = 200_000
    frame, outlines = scene(100)
    with NimbusTestServer(token=TOKEN) as server:
        ds = server.add_dataset(np.broadcast_to(frame, (1, 100, 1, 1, SIZE, SIZE)))
        for t in range(100):
            server.add_annotations(ds.dataset_id, [dict(annotation_doc(o, xy=0, tags=["nucleus"]),
                                                        location={"XY": 0, "Z": 0, "Time": t}) for o in outlines[:20]])
        add_others(server, ds.dataset_id, n, [(0, t) for t in range(100, 101)])
        ids = [d["_id"] for d in server.annotations(ds.dataset_id)[:2000]]
        server.add_connections({"parentId": a, "childId": b, "datasetId": ds.dataset_id}
                               for a, b in zip(ids, ids[1:]))
        gc.collect()
        gc.freeze()
        with NimbusClient(server.api_url, TOKEN) as client:
            def best(call, repeats: int = 5) -> float:
                times = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - started)
                return min(times)

            request = best(lambda: client.count_connections(ds.dataset_id), 50)
            walk = best(lambda: client.list_annotation_ids(ds.dataset_id, location={"Time": 7}))
            total = n + 2000
            listed = best(lambda: [p for p in client.iter_annotation_pages(ds.dataset_id, "polygon")], 2)
            per_annotation_listed = (listed - (total / 5000) * request) / total
            hydrated = best(lambda: client.hydrate(ids), 5)
            per_annotation = (hydrated - request) / len(ids)
            conns = best(lambda: client.list_connections(ds.dataset_id), 5)
            per_connection = (conns - request) / 1999
    print(f"request {request * 1e3:.2f} ms; list/ids walk {(walk - request) / total * 1e6:.2f} us per annotation "
          f"of the dataset; an annotation shipped and read {per_annotation * 1e6:.1f} us (hydrate), "
          f"{per_annotation_listed * 1e6:.1f} us (cursor listing); a connection {per_connection * 1e6:.1f} us")


def _row(n: int, mode: str, r: dict[str, Any]) -> str:
    return (f"N={n:,} {mode}: exit {r['code']}, {r['wall_s']:.1f} s, {r['rss_mb']:.0f} MB, "
            f"{r['received_mb']:.1f} MB received, {r['requests']} requests, {r['walks']} walks, "
            f"re-reads {r['rereads_s']:.2f} s; {r['last'].get('info', '')}")


def _table(rows: list[tuple[int, str, dict[str, Any]]], what: str) -> str:
    out = [f"| {what} | job | wall | peak RSS | received | requests | list/ids walks |",
           "|---|---|---|---|---|---|---|"]
    for n, mode, r in rows:
        out.append(f"| {n:,} | {mode} | {r['wall_s']:.1f} s | {r['rss_mb']:,.0f} MB | {r['received_mb']:.1f} MB | "
                   f"{r['requests']} | {r['walks']} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=("one-location", "refine-all", "time-all", "costs"))
    parser.add_argument("--others", default="0,100000,1000000",
                        type=lambda s: [int(v) for v in s.split(",")], help="other polygons in the dataset")
    parser.add_argument("--locations", type=int, default=500)
    parser.add_argument("--per-location", type=int, default=100)
    parser.add_argument("--times", type=int, default=1000)
    parser.add_argument("--old-server", action="store_true", help="a server without list/ids and hydrate")
    args = parser.parse_args()
    if args.scenario == "time-all" and args.per_location == 100:
        args.per_location = 5
    print(f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"{'older server (no list/ids, hydrate)' if args.old_server else 'server with list/ids and hydrate'}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = work / "ckpt"
        write_layout_checkpoint(ckpt / "sam2.1_hiera_tiny.pt")
        {"one-location": one_location, "refine-all": refine_all, "time-all": time_all,
         "costs": costs}[args.scenario](args, ckpt, work)


if __name__ == "__main__":
    main()
