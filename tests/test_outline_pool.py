"""Outline work in parallel (issue 15, item 2): the outline pool and the engine on it.

The pool (:mod:`sam2_refine.engine.outline_pool`) runs the engine's per-object work in worker
processes. What must hold, whatever the number of workers: the outlines, reasons and scores are
exactly those the engine makes on its own thread (compared as WKB, on scenes that take every
path: separation with early and late outlines, padding kept apart, the quality gate, points,
windows that grow and are decoded again); at most ``max_in_flight`` tasks wait; a task's
exception or a dead worker fails the job instead of losing objects; the default keeps the CPU
job on its thread and gives a GPU job one worker per core; a job stopped by SIGTERM or killed
leaves no worker process behind. The speed (polygons/s with 2 cores against 1) is measured in
``bench/bench_speed.py --zero-cost``, not here.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import shapely

from sam2_refine.engine import objects
from sam2_refine.engine.outline_pool import (
    MAX_WORKERS,
    WORKERS_ENV,
    OutlinePool,
    cpu_quota,
    default_workers,
    usable_cores,
    workers_from_env,
)
from sam2_refine.engine.options import GeometryOptions
from sam2_refine.engine.location import refine_location
from sam2_refine.annotations import Kept, Refined
from sam2_refine.job.selection import to_original
from sam2_refine.testing.datasets import annotation_doc, dense_scene, grid_scene, rough_octagons, rough_polygon
from sam2_refine.testing.nimbus_server import NimbusTestServer
from sam2_refine.testing.stand_in import KnownMaskPredictor

from conftest import REPO, TOKEN, WorkerRun
from test_faults import LiveRun, cli_argv, cli_env, error_text, job_params

# -- how many workers ---------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "device", "expected"), [
    (None, "cpu", 0), (None, "cuda", 6), ("", "cuda", 6), ("auto", "cpu", 0), ("AUTO", "cuda", 6),
    ("0", "cuda", 0), ("3", "cpu", 3), (" 2 ", "cpu", 2), (str(MAX_WORKERS), "cpu", MAX_WORKERS),
])
def test_workers_follow_the_environment_else_the_device(monkeypatch, value, device, expected):
    monkeypatch.setattr("sam2_refine.engine.outline_pool.usable_cores", lambda: 6)
    environ = {} if value is None else {WORKERS_ENV: value}
    assert workers_from_env(device, environ) == expected


@pytest.mark.parametrize("value", ["-1", "two", "1.5", str(MAX_WORKERS + 1)])
def test_a_malformed_worker_count_is_logged_and_the_default_used(monkeypatch, caplog, value):
    monkeypatch.setattr("sam2_refine.engine.outline_pool.usable_cores", lambda: 4)
    assert workers_from_env("cuda", {WORKERS_ENV: value}) == 4
    assert workers_from_env("cpu", {WORKERS_ENV: value}) == 0
    assert WORKERS_ENV in caplog.text and repr(value) in caplog.text


def test_the_cpu_keeps_its_cores_for_the_model_and_a_gpu_gives_them_to_outlines():
    assert default_workers("cpu", cores=16) == 0
    assert default_workers("cuda", cores=16) == 16
    assert default_workers("cuda", cores=500) == MAX_WORKERS


@pytest.mark.parametrize(("cpu_max", "v1", "expected"), [
    ("max 100000\n", None, None), ("400000 100000\n", None, 4), ("150000 100000", None, 2),
    ("50000 100000", None, 1), ("garbage", None, None), (None, ("-1", "100000"), None),
    (None, ("300000", "100000"), 3), (None, None, None),
])
def test_a_containers_cpu_quota_bounds_the_cores(cpu_max, v1, expected):
    assert cpu_quota(cpu_max, *(v1 or (None, None))) == expected


def test_usable_cores_are_within_affinity_and_quota(monkeypatch):
    monkeypatch.setattr("sam2_refine.engine.outline_pool._read",
                        lambda path: "200000 100000" if path.endswith("cpu.max") else None)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    assert usable_cores() == 2
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert usable_cores() == 1


# -- the pool -----------------------------------------------------------------------------------


def test_inline_pool_runs_at_once_and_hands_a_task_exception_to_result():
    pool = OutlinePool(0)
    assert pool.inline
    assert pool.submit(math.hypot, 3.0, 4.0).result() == 5.0
    failed = pool.submit(math.sqrt, -1.0)  # ValueError: math domain error
    assert failed.done()
    with pytest.raises(ValueError):
        failed.result()


def test_workers_that_cannot_start_leave_the_work_on_the_callers_thread(monkeypatch, caplog):
    import multiprocessing.forkserver

    def refuse(self: Any) -> None:
        raise PermissionError(13, "Permission denied: no writable temporary directory")

    monkeypatch.setattr(multiprocessing.forkserver.ForkServer, "ensure_running", refuse)
    with OutlinePool(2) as stranded:
        stranded.start()
        assert stranded.inline and stranded.workers == 0
        assert stranded.submit(os.getpid).result() == os.getpid()
    assert "could not start 2 worker process(es)" in caplog.text


@pytest.fixture(scope="module")
def pool() -> Any:
    with OutlinePool(2) as workers:
        workers.start()
        yield workers


def test_worker_processes_run_tasks_and_raise_their_exceptions_on_the_caller(pool):
    assert not pool.inline and pool.workers == 2
    pids = {pool.submit(os.getpid).result() for _ in range(8)}
    assert os.getpid() not in pids
    with pytest.raises(ValueError):
        pool.submit(math.sqrt, -1.0).result()
    assert pool.submit(math.hypot, 6.0, 8.0).result() == 10.0  # the pool goes on after a failed task


def test_at_most_max_in_flight_tasks_wait_for_the_workers():
    with OutlinePool(2, max_in_flight=3) as bounded:
        started = time.perf_counter()
        futures = [bounded.submit(time.sleep, 0.05) for _ in range(12)]
        assert [f.result() for f in futures] == [None] * 12
        elapsed = time.perf_counter() - started
    assert bounded.peak_in_flight == 3 and bounded.submitted == 12
    assert elapsed >= 12 * 0.05 / 2 * 0.9  # two at a time, never more


def test_a_worker_that_dies_fails_what_was_given_to_it():
    with OutlinePool(1) as doomed:
        with pytest.raises(BrokenProcessPool):
            doomed.submit(os._exit, 3).result()
        with pytest.raises(BrokenProcessPool):
            doomed.submit(os.getpid).result()


# -- the engine on the pool: the same outlines --------------------------------------------------


def _originals(scene, kind: str, rng: np.random.Generator, tags=("n",)) -> list:
    out = []
    for k in range(1, scene.count + 1):
        mask = scene.labels == k
        if kind == "point":
            rows, cols = np.nonzero(mask)
            doc = {"shape": "point", "tags": list(tags), "channel": 0, "location": {"XY": 0, "Z": 0, "Time": 0},
                   "coordinates": [{"x": float(cols.mean()), "y": float(rows.mean())}]}
        else:
            doc = annotation_doc(rough_polygon(mask, kind, rng), tags=list(tags))
        out.append(to_original({**doc, "_id": f"a{k:04d}"}))
    return out


def _image(scene) -> np.ndarray:
    return np.repeat((scene.channels[0] / 60000.0).astype(np.float32)[..., None], 3, axis=2)


def _digest(outcomes) -> list[tuple]:
    """Each outcome exactly: the outline as WKB (every coordinate's bits), the score, or the reason."""
    return [(o.original_id, shapely.to_wkb(o.polygon), o.score) if isinstance(o, Refined)
            else (o.original_id, o.reason) for o in outcomes]


SCENES = {
    # a dense field whose masks spill into their neighbours: separation changes masks, so some
    # early outlines are used and some traced again after it
    "dense boxes, apart": ("dense", "box", GeometryOptions(separate=True, group_tags=("n",))),
    "dense jittered, apart, padded": ("dense", "jittered", GeometryOptions(separate=True, padding=2.0,
                                                                            group_tags=("n",))),
    "dense boxes, together, gated": ("dense", "box", GeometryOptions(separate=False, min_overlap=0.6)),
    "dense points, apart": ("dense", "point", GeometryOptions(separate=True, group_tags=("n",))),
    # rough outlines smaller than their objects: the first windows are outgrown
    "grown windows": ("small", "box", GeometryOptions(separate=True, padding=-1.0, smoothing=1.5)),
}


def _scene(name: str):
    which, kind, options = SCENES[name]
    rng = np.random.default_rng(7)
    if which == "dense":
        scene = dense_scene(320, 320, 90, seed=3, spacing=1.2)
        return scene, _originals(scene, kind, rng), options, dict(spill=4.0)
    return _rods(), None, options, {}


def _rods() -> Any:
    """Rods of 100 x 12 pixels, each outlined roughly at one end only (30 px of it): the mask
    reaches far past the first window, which grows beyond the logits decoded for it."""
    labels = np.zeros((384, 384), dtype=np.int32)
    for k in range(8):
        top, left = 20 + 45 * k, 30 + 25 * (k % 4)
        labels[top:top + 12, left:left + 100] = k + 1
    channels = np.where(labels > 0, 30000, 2000).astype(np.uint16)[None]
    return SimpleNamespace(labels=labels, channels=channels, count=8)


def _rod_originals(scene: Any) -> list:
    out = []
    for k in range(1, scene.count + 1):
        rows, cols = np.nonzero(scene.labels == k)
        x0, y0 = cols.min() - 1.0, rows.min() - 1.0
        ring = np.array([[x0, y0], [x0 + 30, y0], [x0 + 30, y0 + 13], [x0, y0 + 13]])
        out.append(to_original({**annotation_doc(ring, tags=["n"]), "_id": f"r{k:02d}"}))
    return out


@pytest.mark.parametrize("name", list(SCENES))
def test_the_engine_makes_the_same_outlines_on_worker_processes(pool, name, monkeypatch):
    scene, originals, options, extra = _scene(name)
    originals = originals if originals is not None else _rod_originals(scene)
    image = _image(scene)
    grown = []  # windows outgrown on this thread (the inline run), each answered by a larger decoding
    real_object_mask = objects.object_mask

    def counting(*args: Any, **kwargs: Any) -> Any:
        found = real_object_mask(*args, **kwargs)
        grown.append(isinstance(found, objects.LargerWindow))
        return found

    monkeypatch.setattr(objects, "object_mask", counting)

    def run(on: OutlinePool) -> tuple[list, KnownMaskPredictor]:
        predictor = KnownMaskPredictor(labels=scene.labels, grid=(256, 256), **extra)
        return refine_location(predictor, image, originals, options, pool=on), predictor

    alone, alone_model = run(OutlinePool(0))
    monkeypatch.undo()
    before = pool.submitted
    parallel, parallel_model = run(pool)
    assert pool.submitted - before >= 2  # the work did go to the workers
    assert _digest(parallel) == _digest(alone)
    assert (parallel_model.decode_calls, parallel_model.prompts) == (alone_model.decode_calls, alone_model.prompts)
    refined = sum(isinstance(o, Refined) for o in alone)
    assert refined >= 0.8 * len(originals), [o.reason for o in alone if isinstance(o, Kept)][:5]
    print(f"\n{name}: {refined}/{len(originals)} refined, {sum(grown)} window(s) outgrown, "
          f"{alone_model.prompts} prompts decoded")
    if name == "grown windows":
        assert any(grown) and alone_model.prompts > len(originals)


def test_a_bug_in_the_outline_work_fails_the_location_instead_of_losing_objects(monkeypatch):
    """A task that raises (not an object's problem) reaches the caller: the engine does not
    turn it into a kept object or a missing one."""
    scene, originals, options, extra = _scene("dense boxes, apart")
    predictor = KnownMaskPredictor(labels=scene.labels, grid=(256, 256), **extra)

    def broken(*args: Any) -> list:
        raise RuntimeError("a bug in tracing")

    monkeypatch.setattr("sam2_refine.engine.outlines.trace_objects", broken)
    with pytest.raises(RuntimeError, match="a bug in tracing"):
        refine_location(predictor, _image(scene), originals, options, pool=OutlinePool(0))


# -- the job: real entrypoint.py, environment variable, signals ---------------------------------


def _grid_dataset(server: NimbusTestServer) -> tuple[str, list[str]]:
    scene = grid_scene(512, 512, 64, seed=2)
    rng = np.random.default_rng(1)
    ds = server.add_dataset(scene.channels[None, None, None])
    docs = [annotation_doc(ring, tags=["cell"]) for ring in rough_octagons(scene.centres, scene.radii, rng)]
    return ds.dataset_id, server.add_annotations(ds.dataset_id, docs)


def _outlines(server: NimbusTestServer, dataset_id: str) -> dict[str, Any]:
    return {a["sam2Refine"]["originalId"]: a["coordinates"] for a in server.annotations(dataset_id)
            if "sam2Refine" in a}


def _session_processes(session: int) -> list[int]:
    """Pids of live processes in ``session`` (the job's and every process it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _wait_for_no_process(session: int, timeout: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _session_processes(session)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def test_a_job_with_outline_workers_uploads_what_a_job_without_them_uploads(stub_ckpt, tmp_path):
    results = {}
    for workers in ("0", "2"):
        with NimbusTestServer(token=TOKEN) as server:
            dataset_id, originals = _grid_dataset(server)
            argv = cli_argv(server, job_params(delete=False, **{"Tag of objects to refine": ["cell"]}), dataset_id,
                            standin=True)
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO,
                                  env=cli_env(stub_ckpt, tmp_path / f"{workers}.json", **{WORKERS_ENV: workers}))
            run = WorkerRun(done.returncode, done.stdout, done.stderr)
            assert run.returncode == 0, run.stdout + run.stderr
            outlines = _outlines(server, dataset_id)
            assert len(outlines) == len(originals) == 64
            order = {original: k for k, original in enumerate(originals)}
            results[workers] = sorted((order[o], c) for o, c in outlines.items())
            ready = [m for m in run.progress() if m.get("title") == "Model ready"]
            named = "outlines on 2 worker process(es)" in json.dumps(ready)
            assert named == (workers == "2"), ready
    assert results["2"] == results["0"]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_stopped_job_leaves_no_worker_process_and_no_lost_original(stub_ckpt, tmp_path, how):
    with NimbusTestServer(token=TOKEN) as server:
        scene = grid_scene(256, 256, 9, seed=4)
        pixels = np.broadcast_to(scene.channels, (3, 1, 1) + scene.channels.shape).copy()
        ds = server.add_dataset(pixels)
        rng = np.random.default_rng(0)
        originals = []
        for xy in range(3):
            docs = [annotation_doc(ring, xy=xy, tags=["cell"]) for ring in rough_octagons(scene.centres, scene.radii,
                                                                                          rng)]
            originals += server.add_annotations(ds.dataset_id, docs)
        # the second location's frames arrive late: the job is inside its refining loop, pool started
        server.fail("GET", r"item/\w+/tiles/region", action="delay", delay=4, calls=[2])
        env = cli_env(stub_ckpt, tmp_path / "s.json", **{WORKERS_ENV: "2", "SAM2_REFINE_PREFETCH_BYTES": "0"})
        argv = cli_argv(server, job_params(delete=True, **{"Tag of objects to refine": ["cell"]}), ds.dataset_id,
                        standin=True)
        live = LiveRun(["setsid"] + argv, env)  # its own session: the job and every process it starts
        session = live.proc.pid
        frames = r"item/\w+/tiles/region"
        live.wait_for(lambda: live.saw_progress("Model ready") and len(server.requests_to("GET", frames)) >= 2)
        time.sleep(0.3)
        workers = [p for p in _session_processes(session) if p not in (live.proc.pid, os.getpid())]
        live.proc.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGKILL)
        run = live.finish()
        if how == "SIGTERM":
            assert run.returncode == 143, run.stdout + run.stderr
            assert "The job was stopped (SIGTERM)" in error_text(run)
            assert "Traceback" not in run.stderr
        else:
            assert run.returncode == -signal.SIGKILL
        left = [p for p in _wait_for_no_process(session) if p in workers]
        assert left == [], f"worker processes left after {how}: {left}"
        assert server.requests_to("DELETE", r"upenn_annotation/multiple") == []
        assert {a["_id"] for a in server.annotations(ds.dataset_id)} >= set(originals)


def test_a_job_whose_outline_workers_die_fails_and_deletes_nothing(tmp_path):
    """Workers that cannot run (here each exits as it starts) fail the job with a report and
    exit status 1; every original stays, none is deleted."""
    import io

    from sam2_refine.job import compute as job
    from sam2_refine.nimbus.client import NimbusClient
    from sam2_refine.nimbus.progress import Reporter
    from sam2_refine.job.settings import parse_settings

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    from sam2_refine.testing.checkpoints import write_layout_checkpoint

    write_layout_checkpoint(ckpt / "sam2.1_hiera_tiny.pt")
    with NimbusTestServer(token=TOKEN) as server:
        dataset_id, originals = _grid_dataset(server)
        settings = parse_settings(job_params(delete=True, **{"Tag of objects to refine": ["cell"]}), dataset_id, ckpt)
        out = io.StringIO()
        with NimbusClient(server.api_url, TOKEN) as client, OutlinePool(1, initializer=sys.exit) as dying:
            code = job.run_compute(settings, client, Reporter(stream=out), lambda path: (KnownMaskPredictor(), False),
                                   outline_pool=dying)
        assert code == 1, out.getvalue()
        errors = [json.loads(line) for line in out.getvalue().splitlines() if '"error"' in line]
        assert errors and "no original annotation was deleted" in errors[-1]["error"], errors
        assert "BrokenProcessPool" in errors[-1]["info"]
        assert server.requests_to("DELETE", r"upenn_annotation/multiple") == []
        assert {a["_id"] for a in server.annotations(dataset_id)} >= set(originals)
