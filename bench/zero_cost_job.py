"""Jobs of one speed-benchmark configuration with the zero-cost stand-in model, on chosen cores.

What a GPU host sees when the model costs next to nothing (:class:`ZeroCostPredictor`: valid
masks on SAM2's 256 x 256 grid, cut to the engine's windows as on CUDA): the job is the work
around the model, and the outline pool (:mod:`sam2_refine.engine.outline_pool`) spreads its
per-object part over the cores. ``bench_speed.py --zero-cost`` runs this script once per
setting in a child process whose CPU affinity (every thread: the job's, the in-process test
server's, the outline workers') is that setting's cores::

    .venv/bin/python bench/zero_cost_job.py --config 7 --cores 0 --workers 0 --out one.json

It builds the configuration's dataset on a local NimbusImage test server, then runs the job
(``job.run_compute`` over HTTP, as bench_speed's variant b) ``--repeats`` times, each creating
its own pool of ``--workers`` processes as a real job does: the first job also pays for
starting the pool's forkserver (once per process: what every job of the worker pays), the
others only for forking the workers. Then the engine alone (``refine_location`` on the
location's image in memory, the same pool) as many times. It writes the times, the counts and
a digest of the outlines (the created annotations' coordinates by original; the engine's
polygons as WKB), so that settings can be compared for identical outlines.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from speed_scenes import FULL, QUICK, build_dataset, job_parameters  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=int, required=True, help="index into bench_speed's configurations")
    parser.add_argument("--quick", action="store_true", help="index into the quick configurations")
    parser.add_argument("--cores", required=True, help="comma-separated CPU numbers this process runs on")
    parser.add_argument("--workers", type=int, required=True, help="outline worker processes (0: the job's thread)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})  # before any thread or process starts
    os.environ["SAM2_REFINE_OUTLINE_WORKERS"] = str(args.workers)

    import shapely

    from sam2_refine.job import compute as job
    from sam2_refine.engine.imaging import default_layers
    from sam2_refine.nimbus.client import NimbusClient
    from sam2_refine.engine.outline_pool import OutlinePool
    from sam2_refine.annotations import Refined
    from sam2_refine.engine.location import refine_location
    from sam2_refine.nimbus.progress import Reporter
    from sam2_refine.job.selection import to_original
    from sam2_refine.annotations import Location
    from sam2_refine.job.settings import parse_settings
    from sam2_refine.testing.checkpoints import write_layout_checkpoint
    from sam2_refine.testing.nimbus_server import NimbusTestServer
    from sam2_refine.testing.stand_in import ZeroCostPredictor

    cfg = (QUICK if args.quick else FULL)[args.config]
    token = "bench-token"
    out: dict = {"config": cfg.name, "cores": sorted(os.sched_getaffinity(0)), "workers": args.workers,
                 "jobs_s": [], "engine_s": []}
    with tempfile.TemporaryDirectory() as tmp, NimbusTestServer(token=token) as server:
        checkpoint_dir = Path(tmp)
        write_layout_checkpoint(checkpoint_dir / "sam2.1_hiera_tiny.pt")  # the settings check its layout only
        ds, _ = build_dataset(server, cfg)
        order = {a["_id"]: k for k, a in enumerate(server.annotations(ds.dataset_id))}
        settings = parse_settings(job_parameters(), ds.dataset_id, checkpoint_dir)
        for _ in range(args.repeats):
            with NimbusClient(server.api_url, token) as client:
                started = time.perf_counter()
                code = job.run_compute(settings, client, Reporter(stream=io.StringIO()),
                                       lambda path: (ZeroCostPredictor(), False))
                out["jobs_s"].append(time.perf_counter() - started)
                made = [a for a in server.annotations(ds.dataset_id) if a["tags"] == ["engine"]]
                if code != 0:
                    raise RuntimeError(f"the job exited {code}")
                outlines = sorted((order[a["sam2Refine"]["originalId"]], a["coordinates"]) for a in made)
                digest = hashlib.sha256(json.dumps(outlines).encode()).hexdigest()
                if out.setdefault("digest", digest) != digest:
                    raise RuntimeError("a repeat of the job made other outlines")
                out["created"] = len(made)
                client.delete_annotations([a["_id"] for a in made])  # so that the next job refines them again
        # the engine alone: the first location, its image in memory
        with NimbusClient(server.api_url, token) as client:
            info = client.get_dataset_info(ds.dataset_id)
            image = job.load_location_image(client, info, default_layers(info.num_channels), Location(0, 0, 0))
        originals = [to_original(a) for a in server.annotations(ds.dataset_id) if a["location"]["XY"] == 0]
        options = job.geometry_options(settings)
        with OutlinePool(args.workers) as pool:
            pool.start()
            for _ in range(args.repeats):
                started = time.perf_counter()
                outcomes = refine_location(ZeroCostPredictor(), image, originals, options, pool=pool)
                out["engine_s"].append(time.perf_counter() - started)
                wkb = [shapely.to_wkb(o.polygon).hex() if isinstance(o, Refined) else o.reason for o in outcomes]
                digest = hashlib.sha256(json.dumps(wkb).encode()).hexdigest()
                if out.setdefault("engine_digest", digest) != digest:
                    raise RuntimeError("a repeat of the engine made other outlines")
                out["engine_refined"] = sum(isinstance(o, Refined) for o in outcomes)
    args.out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
