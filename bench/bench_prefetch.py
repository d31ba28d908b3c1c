"""Frames ahead: a job's wall time against its I/O and its compute, with slow frames.

Run from the repository root (after ``make venv``)::

    .venv/bin/python bench/bench_prefetch.py           # the table (about 2 minutes)
    .venv/bin/python bench/bench_prefetch.py --quick   # a smoke run

What a GPU host sees: the model costs next to nothing (:class:`ZeroCostPredictor`, valid masks
on SAM2's 256 x 256 grid at almost no cost), so a job is frame I/O plus the work around the
model (merging, tracing, simplifying, uploading: "compute" here). The local NimbusImage test
server answers every frame request after a set delay (its ``delay`` fault, 200 ms by default),
as a slow or distant tile server would. For each configuration (frame size, channels, objects
per location, locations) it measures, in one process:

- **I/O, serial**: frame requests x delay, the time the frames take one after another;
- **compute**: the same job with no delay;
- for each prefetch policy, the job with the delay (**wall**) and, for reference, the time to
  fetch every location's frames through that policy's prefetcher and nothing else (**I/O
  alone**). Policies: one location ahead over one connection (what the worker did before the
  byte budget), the default budget over one connection (depth alone), and the defaults
  (:data:`sam2_refine.job.prefetch.DEFAULT_BUDGET_BYTES`, :data:`~sam2_refine.job.prefetch.DEFAULT_CONNECTIONS`).

Every job runs ``--repeats`` times (policies interleaved) and the fastest run is kept. It
prints wall / max(I/O serial, compute) (1.0: the job costs only its larger part) and
wall / (I/O serial + compute) (1.0: nothing overlaps), and writes JSON to
bench/results/prefetch.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sam2_refine.job import compute as job  # noqa: E402
from sam2_refine.job import prefetch  # noqa: E402
from sam2_refine.engine.imaging import default_layers  # noqa: E402
from sam2_refine.nimbus.client import NimbusClient  # noqa: E402
from sam2_refine.nimbus.progress import Reporter  # noqa: E402
from sam2_refine.annotations import Location  # noqa: E402
from sam2_refine.job.settings import parse_settings  # noqa: E402
from sam2_refine.testing.datasets import grid_scene, rough_octagons  # noqa: E402
from sam2_refine.testing.nimbus_server import NimbusTestServer  # noqa: E402
from sam2_refine.testing.stand_in import ZeroCostPredictor  # noqa: E402

TOKEN = "bench-token"
REGION = r"item/\w+/tiles/region"


@dataclass(frozen=True)
class Config:
    size: int
    channels: int
    objects: tuple[int, ...]  # per location, repeated cyclically over the locations
    locations: int

    @property
    def name(self) -> str:
        objects = "/".join(str(n) for n in self.objects)
        return f"{self.size}x{self.size} C={self.channels} N={objects} L={self.locations}"


POLICIES = {
    "one ahead, 1 connection (before)": prefetch.PrefetchPolicy(0, 1),
    "default budget, 1 connection": prefetch.PrefetchPolicy(prefetch.DEFAULT_BUDGET_BYTES, 1),
    "default (budget, connections)": prefetch.PrefetchPolicy(),
}
FULL = [
    Config(1024, 2, (20,), 16),  # frames dominate
    Config(2048, 2, (20,), 8),  # about as much compute as I/O
    Config(2048, 2, (150,), 8),  # compute dominates
    Config(1024, 1, (300, 5, 5, 5), 8),  # uneven: a busy location, then three quick ones
]
QUICK = [Config(1024, 1, (20,), 4)]


def build(server: NimbusTestServer, cfg: Config):
    scenes = {n: grid_scene(cfg.size, cfg.size, n, channels=cfg.channels, seed=n) for n in set(cfg.objects)}
    pixels = np.stack([scenes[cfg.objects[xy % len(cfg.objects)]].channels for xy in range(cfg.locations)])
    ds = server.add_dataset(pixels[:, None, None])  # (XY, T, Z, C, H, W); no layers: every channel shown
    rng = np.random.default_rng(0)
    for xy in range(cfg.locations):
        scene = scenes[cfg.objects[xy % len(cfg.objects)]]
        server.add_annotations(ds.dataset_id, [
            {"shape": "polygon", "tags": ["rough"], "channel": 0, "location": {"XY": xy, "Z": 0, "Time": 0},
             "coordinates": [{"x": float(x), "y": float(y)} for x, y in ring]}
            for ring in rough_octagons(scene.centres, scene.radii, rng)])
    return ds


def run_job(server: NimbusTestServer, ds, checkpoint_dir: Path, policy: prefetch.PrefetchPolicy) -> float:
    """The job's wall time (s) under ``policy``; its refinements are removed afterwards."""
    params = {"workerInterface": {"Model": "sam2.1_hiera_tiny.pt", "Tag of objects to refine": ["rough"],
                                  "Batch XY": "all", "Batch Z": "all", "Batch Time": "all",
                                  "Smoothing": 0.7, "Padding": 0, "Resolution": "Whole frame"},
              "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 0, "tags": ["refined"]}
    settings = parse_settings(params, ds.dataset_id, checkpoint_dir)
    os.environ[prefetch.BUDGET_ENV] = str(policy.budget_bytes)
    os.environ[prefetch.CONNECTIONS_ENV] = str(policy.connections)
    with NimbusClient(server.api_url, TOKEN) as client:
        started = time.perf_counter()
        code = job.run_compute(settings, client, Reporter(stream=io.StringIO()),
                               lambda path: (ZeroCostPredictor(), False))
        seconds = time.perf_counter() - started
        made = [a["_id"] for a in server.annotations(ds.dataset_id) if a["tags"] == ["refined"]]
        if code != 0 or not made:
            raise RuntimeError(f"job exited {code} with {len(made)} refinements")
        client.delete_annotations(made)  # so that the next run refines every original again
    return seconds


def fetch_alone(server: NimbusTestServer, ds, policy: prefetch.PrefetchPolicy, locations: int) -> float:
    """Seconds to take every location's frames through the prefetcher, with nothing else."""
    with NimbusClient(server.api_url, TOKEN) as client:
        info = client.get_dataset_info(ds.dataset_id)
        layers = default_layers(info.num_channels)
        wanted = [Location(xy, 0, 0) for xy in range(locations)]
        started = time.perf_counter()
        with prefetch.FramePrefetcher(client, wanted, lambda c, loc: job.load_location_image(c, info, layers, loc),
                                      prefetch.location_bytes(info, layers), policy) as frames:
            frames.start()
            for location in wanted:
                frames.take(location)
        return time.perf_counter() - started


def measure(cfg: Config, checkpoint_dir: Path, delay: float, repeats: int) -> dict:
    row: dict = {"config": cfg.name, "delay_s": delay, "requests": cfg.channels * cfg.locations}
    with NimbusTestServer(token=TOKEN) as server:
        ds = build(server, cfg)
        run_job(server, ds, checkpoint_dir, prefetch.PrefetchPolicy())  # warm-up, untimed
        row["compute_s"] = min(run_job(server, ds, checkpoint_dir, prefetch.PrefetchPolicy())
                               for _ in range(repeats))
        server.fail("GET", REGION, action="delay", delay=delay)
        row["io_serial_s"] = row["requests"] * delay
        row["policies"] = {}
        walls: dict[str, list[float]] = {name: [] for name in POLICIES}
        for _ in range(repeats):  # interleaved: the policies see the same machine load
            for name, policy in POLICIES.items():
                walls[name].append(run_job(server, ds, checkpoint_dir, policy))
        for name, policy in POLICIES.items():
            wall = min(walls[name])
            alone = fetch_alone(server, ds, policy, cfg.locations)
            larger = max(row["io_serial_s"], row["compute_s"])
            row["policies"][name] = {"budget_bytes": policy.budget_bytes, "connections": policy.connections,
                                     "wall_s": wall, "wall_runs_s": walls[name], "io_alone_s": alone,
                                     "wall_over_max": wall / larger,
                                     "wall_over_sum": wall / (row["io_serial_s"] + row["compute_s"])}
    return row


def table(rows: list[dict]) -> str:
    lines = ["| configuration | I/O serial (s) | compute (s) | prefetch policy | I/O alone (s) | wall (s) | "
             "wall / max | wall / sum |", "|" + "---|" * 8]
    for r in rows:
        for k, (name, p) in enumerate(r["policies"].items()):
            head = (f"| {r['config']} | {r['io_serial_s']:.1f} | {r['compute_s']:.2f} |" if k == 0
                    else "| | | |")
            lines.append(f"{head} {name} | {p['io_alone_s']:.2f} | {p['wall_s']:.2f} | {p['wall_over_max']:.2f} | "
                         f"{p['wall_over_sum']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small configuration")
    parser.add_argument("--delay", type=float, default=0.2, help="seconds before each frame is answered")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each job; the fastest is kept")
    parser.add_argument("--only", help="comma-separated indices of configurations to run")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "prefetch.json")
    args = parser.parse_args(argv)
    configs = QUICK if args.quick else FULL
    if args.only:
        configs = [configs[int(i)] for i in args.only.split(",")]
    saved = {k: os.environ.get(k) for k in (prefetch.BUDGET_ENV, prefetch.CONNECTIONS_ENV)}
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint_dir = Path(tmp)
            (checkpoint_dir / "sam2.1_hiera_tiny.pt").write_bytes(b"")  # settings check the name only
            for cfg in configs:
                print(f"running {cfg.name} ...", flush=True)
                rows.append(measure(cfg, checkpoint_dir, args.delay, max(1, args.repeats)))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "load_average": [round(x, 2) for x in os.getloadavg()], "model": "ZeroCostPredictor (stand-in)",
            "command": " ".join(["bench/bench_prefetch.py", *(argv or sys.argv[1:])])}
    print(f"\n{meta['date']}, {meta['machine']}, load {meta['load_average']}, {meta['model']}, "
          f"frame delay {args.delay * 1000:.0f} ms")
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
