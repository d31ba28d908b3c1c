"""Check the worker against the real NimbusImage server's code (not run in CI).

    python scripts/check_real_server.py --nimbus PATH/NimbusImage --large-image PATH/large_image \
        [--mongo-uri URI] [--worker PATH/worker-tree] [--worker-python PYTHON] [--venv DIR]

Given local checkouts of NimbusImage and large_image (branch ``girder-5``), it installs Girder 5
with NimbusImage's annotation plugin and girder_large_image into its own cached virtual
environment, starts Girder on 127.0.0.1 (on MongoDB where ``--mongo-uri`` is given or ``mongod``
is on the PATH, else on an in-process substitute, said on every line), makes a dataset the way
the web app does (a 16-bit two-position, two-channel image, ``multi-source2.json`` transcoded,
a configuration with layers, a dataset view, rough nucleus outlines and connections), calls the
worker's own scoped reads (``list/ids``, ``hydrate``, the counts, connections by
``nodeAnnotationId``, ``BatchReader``) on a dataset made for them and compares every answer
with what the server holds, and runs the worker's ``entrypoint.py`` as NimbusImage does: the
interface request, a job on one position, two jobs at once with "Delete original annotations",
a re-run, and two jobs at once on one position of a larger dataset; every request of each job
is recorded and checked (location queries, nothing read from outside the batch, every read
answered). It prints PASS or FAIL per check and, last, ``N passed, M failed``; the exit status
is 1 when any check failed.

See docs/real-server-check.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(REPO))  # the synthetic image comes from this tree's sam2_refine.testing

from real_server import checks, reads, venv  # noqa: E402
from real_server.dataset import (TAG, Source, create_dataset, expected_pixels, extra_polygons,  # noqa: E402
                                 make_source)
from real_server.output import Output, database_label  # noqa: E402
from real_server.rest import Rest  # noqa: E402
from real_server.server import GirderServer, free_port  # noqa: E402
from real_server.worker import (STAND_IN, Run, Worker, compute_argv, default_python, interface_argv,  # noqa: E402
                                make_stand_in_checkpoint, tool_parameters, trained_models)

IMAGE = "annotations/sam2_refine_worker:latest"
PASSWORD = "check-password-1"
#: Polygons added at position 2 of the large dataset, and connections among them: with the
#: worker's cost model (sam2_refine/read_plan.py) a job on position 1 then reads its batch by a
#: location query, and the connections of the (at most about 20) annotations it concerns one
#: annotation at a time rather than by listing the dataset's 2,000.
EXTRA_POLYGONS = 600
EXTRA_CONNECTIONS = 2000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nimbus", type=Path, required=True, help="a NimbusImage checkout")
    parser.add_argument("--large-image", type=Path, required=True, help="a large_image checkout (branch girder-5)")
    parser.add_argument("--mongo-uri", default=None, help="a MongoDB to use (else mongod from the PATH, else the "
                        "in-process substitute)")
    parser.add_argument("--worker", type=Path, default=REPO, help="the worker tree to run (default: this one)")
    parser.add_argument("--worker-python", type=Path, default=None,
                        help="the worker's Python (default: WORKER/.venv/bin/python, else this Python)")
    parser.add_argument("--venv", type=Path, default=venv.default_location(), help="the check's own environment")
    parser.add_argument("--python", default=venv.default_python(), help="Python that makes the environment")
    parser.add_argument("--girder-version", default="5.0.21")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="a directory with trained SAM2 checkpoints (default: none: the stand-in segmenter)")
    parser.add_argument("--workdir", type=Path, default=None, help="where logs are kept (default: a new temp dir)")
    parser.add_argument("--no-observe", action="store_true", help="skip the observations of server behaviours")
    return parser.parse_args(argv)


def _substitute_version(python: Path) -> str:
    done = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('mongomock-ng'))"],
                          capture_output=True, text=True)
    return f"mongomock_ng {done.stdout.strip()}" if done.returncode == 0 else "mongomock_ng"


def _start_mongod(workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    data = workdir / "mongod"
    data.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(["mongod", "--dbpath", str(data), "--port", str(port), "--bind_ip", "127.0.0.1"],
                               stdout=(workdir / "mongod.log").open("w"), stderr=subprocess.STDOUT)
    time.sleep(3)
    return process, f"mongodb://127.0.0.1:{port}/girder_real_server_check"


def _users(api_url: str) -> str:
    """An admin (the first user), then the scientist whose token the worker gets; returns it."""
    rest = Rest(api_url)
    for login in ("admin", "scientist"):
        rest.json("POST", "user", data={"login": login, "email": f"{login}@example.org", "firstName": login,
                                        "lastName": "Check", "password": PASSWORD})
    answer = rest.call("GET", "user/authentication", auth=("scientist", PASSWORD))
    answer.raise_for_status()
    rest.close()
    return answer.json()["authToken"]["token"]


def _snapshot(rest: Rest, dataset_id: str) -> tuple[list[dict], list[dict]]:
    annotations = rest.json("GET", "upenn_annotation", params={"datasetId": dataset_id, "limit": 0})
    connections = rest.json("GET", "annotation_connection", params={"datasetId": dataset_id, "limit": 0})
    return annotations, connections


def _report_run(out: Output, run: Run) -> None:
    account = run.summary or {}
    reasons = {k: len(v) for k, v in (account.get("kept_reasons") or {}).items()}
    out.say(f"{run.name}: exit {run.returncode} after {run.seconds:.1f} s; its account: refined "
            f"{account.get('refined')}, kept {account.get('kept')}, deleted {account.get('deleted')}"
            + (f", kept because: {reasons}" if reasons else ""))
    for line in run.lines():
        if "error" in line or "warning" in line:
            kind = "error" if "error" in line else "warning"
            out.say(f"  {run.name} {kind}: {line.get(kind)} | {str(line.get('info', ''))[:300]}")
    if run.returncode != 0 and not any("error" in line for line in run.lines()):
        out.say(f"  {run.name} stderr: " + " | ".join(run.stderr.strip().splitlines()[-5:]))


def _state_checks(out: Output, stage: str, rest: Rest, dataset_id: str, originals: list[str],
                  before: list[tuple[str, str]]) -> list[dict]:
    annotations, connections = _snapshot(rest, dataset_id)
    for name, verdict in (
        ("one refinement per original", checks.one_refinement_per_original(originals, annotations)),
        ("nothing lost", checks.nothing_lost(originals, annotations)),
        ("no connection points at a deleted annotation", checks.no_dangling_connection(connections, annotations)),
        ("every connection still joins the same objects", checks.connections_kept(before, annotations, connections)),
    ):
        out.check(f"{name} ({stage})", verdict.passed, verdict.detail)
    return annotations


def _at_first_position(location: tuple[int, int, int]) -> bool:
    return location == (0, 0, 0)


def _scoped_checks(out: Output, run: Run, sizes: tuple[int, int, int], extras: set[str] | None = None) -> None:
    """A job on position 1 read it by location queries, and received no annotation from elsewhere."""
    verdict = reads.scoped_verdict(run.requests, _at_first_position, sizes)
    out.check(f"{run.name} read its batch by location queries (list/ids + hydrate)", verdict.passed, verdict.detail)
    received = reads.shipped(run.requests)
    outside = reads.shipped_outside(run.requests, _at_first_position)
    detail = (f"received {len(received)} annotation document(s), {len(outside)} from outside position 1"
              + (f" (e.g. {', '.join(outside[:2])})" if outside else "")
              + (f"; of the {len(extras)} polygons at position 2, {len(extras & set(received))} received"
                 if extras is not None else ""))
    out.check(f"{run.name} received only its batch's annotations", not outside, detail)


def _large_dataset_jobs(out: Output, rest: Rest, worker: Worker, job, parent_id: str, segmenter: str) -> None:
    """Jobs E and F at once on position 1 of a dataset whose position 2 holds many more polygons and
    connections: the worker's cost model reads the batch by location queries and the connections
    one annotation at a time; the job's own requests show it, and the state checks still pass."""
    source = make_source(count=4, seed=21)
    large = create_dataset(rest, parent_id, source, "large")
    ds = large.folder_id
    extra_docs = extra_polygons(ds, EXTRA_POLYGONS, source.pages.shape[3], source.pages.shape[2])
    extras = [d["_id"] for d in rest.json("POST", "upenn_annotation/multiple", json=extra_docs)]
    n = len(extras)  # each extra polygon to its next 1, 2, 3 ... neighbours: no pair twice
    links = [(extras[i % n], extras[(i % n + 1 + i // n) % n]) for i in range(EXTRA_CONNECTIONS)]
    rest.json("POST", "annotation_connection/multiple", json=[
        {"parentId": p, "childId": c, "datasetId": ds, "label": "check", "tags": ["check"]} for p, c in links])
    annotations, connections = _snapshot(rest, ds)
    before = large.connections + links
    at_first = sum(1 for d in annotations if (d["location"]["XY"], d["location"]["Z"], d["location"]["Time"])
                   == (0, 0, 0))
    out.say(f"large dataset: {len(large.originals)} rough nuclei and {len(large.spots)} spots on 2 positions, "
            f"and {len(extras)} more polygons tagged {TAG!r} at position 2: {len(annotations)} annotations "
            f"({at_first} at position 1), {len(connections)} connections ({len(links)} among the extra polygons)")
    out.say(f"jobs E and F at once: position 1 only, 'Delete original annotations' on ({segmenter})")
    runs = worker.run_many([job("job E", "1", True, ds), job("job F", "1", True, ds)])
    for run in runs:
        _report_run(out, run)
    out.check("jobs E and F: both exit 0", all(r.returncode == 0 for r in runs),
              ", ".join(f"{r.name} exit {r.returncode}" for r in runs))
    _frames_check(out, "jobs E and F", runs[0].frames + runs[1].frames, source, large.tiles)
    for run in runs:
        _scoped_checks(out, run, sizes=(source.xy_count, 1, 1), extras=set(extras))
        verdict = reads.connection_verdict(run.requests)
        out.check(f"{run.name} read connections per annotation or by one sorted listing, as its cost model chose",
                  verdict.passed,
                  verdict.detail)
    _state_checks(out, "after jobs E and F", rest, ds, large.originals + extras, before)


def _frames_check(out: Output, name: str, records: list[dict], source: Source, tiles: dict) -> None:
    verdict = checks.frames_exact(records, expected_pixels(source, tiles))
    out.check(f"frames exact ({name})", verdict.passed, verdict.detail)


def _reads_checks(out: Output, rest: Rest, worker: Worker, api_url: str, token: str, parent_id: str,
                  other_id: str) -> str:
    """The worker's own reads (``NimbusClient`` and ``BatchReader``) on a dataset made for them,
    each compared with what the server holds; then the endpoints' answers beside the local test
    server's. Returns the dataset's id."""
    source = make_source(count=6, seed=13)
    made = create_dataset(rest, parent_id, source, "reads")
    ds = made.folder_id
    extra = rest.json("POST", "upenn_annotation/multiple", json=reads.extra_docs(ds))
    refined = [d["_id"] for d in extra if "refined" in d["tags"] and d["location"]["XY"] == 0]
    rest.json("POST", "annotation_connection/multiple", json=[
        {"parentId": r, "childId": made.originals[0], "datasetId": ds, "label": "check", "tags": ["check"]}
        for r in refined])
    gone = rest.json("POST", "upenn_annotation/multiple", json=reads.extra_docs(ds)[:1])[0]["_id"]
    rest.json("DELETE", f"upenn_annotation/{gone}")
    annotations, connections = _snapshot(rest, ds)
    other = rest.json("GET", f"upenn_annotation/{other_id}")
    world = reads.World(ds, {d["_id"]: d for d in [*annotations, other]}, connections)
    out.say(f"reads dataset: {len(annotations)} annotations ({len(made.originals)} nuclei, {len(made.spots)} spots, "
            f"{len(extra)} more at other times, tags and shapes), {len(connections)} connections; the worker's "
            "NimbusClient and BatchReader read it (scripts/real_server/reads_probe.py)")
    spec = reads.probe_spec(ds, annotations, connections, other_id, gone)
    results = worker.probe_reads(api_url, token, spec)
    for call, result in zip(spec["calls"], results):
        if call.get("observe"):
            out.say(f"observed: the worker's {call['name']}: {reads.observation(result)}")
            continue
        verdict = reads.verdict(call, result, world)
        out.check(f"worker's reads: {call['name']}", verdict.passed, verdict.detail)
    if len(results) != len(spec["calls"]):
        out.check("worker's reads: every probe call answered", False,
                  f"{len(results)} of {len(spec['calls'])} calls came back")

    from real_server.observe import compare_reads, observe_reads

    # A dataset folder of its own (no image: the read endpoints need none), so that both servers
    # hold the same four annotations.
    folder = rest.json("POST", "folder", data={
        "parentType": "folder", "parentId": parent_id, "name": "observations", "reuseExisting": "false",
        "metadata": json.dumps({"subtype": "contrastDataset", "selectedLargeImageId": None})})
    real = observe_reads(rest, folder["_id"])
    for line in compare_reads(real, _observe_local_reads()):
        out.say(f"observed: {line}")
    return ds


def _observe_local_reads() -> list[tuple[str, str]]:
    """:func:`observe_reads` against this tree's local test server (for the comparison)."""
    import numpy as np

    from real_server.observe import observe_reads
    from sam2_refine.testing.nimbus_server import NimbusTestServer

    with NimbusTestServer(token="check-local") as local:
        dataset = local.add_dataset(np.zeros((1, 1, 1, 1, 8, 8), np.uint16))
        session = Rest(local.api_url, "check-local")
        try:
            return observe_reads(session, dataset.dataset_id)
        finally:
            session.close()


def run_check(args: argparse.Namespace, workdir: Path, out: Output, mongo_uri: str | None) -> None:
    worker_tree = args.worker.resolve()
    worker_python = args.worker_python or default_python(worker_tree)
    out.say(f"date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; logs in {workdir}")
    out.say(f"NimbusImage checkout {args.nimbus} at {venv.git_commit(args.nimbus)}")
    out.say(f"large_image checkout {args.large_image} at {venv.git_commit(args.large_image)}")
    out.say(f"worker tree {worker_tree} at {venv.git_commit(worker_tree)}, Python {worker_python}")
    python = venv.ensure(args.venv, args.nimbus.resolve(), args.large_image.resolve(), args.girder_version,
                         args.python, out.say)
    versions = venv.versions(python)
    out.say("installed: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    out.say("not installed (as NimbusImage's Dockerfile would): " + "; ".join(
        f"source {k}: {v}" for k, v in venv.SKIPPED.items()) + "; girder-claude-chat; the npm web clients")

    checkpoint_dir = args.checkpoints
    models = trained_models(worker_python, worker_tree, checkpoint_dir) if checkpoint_dir else []
    if models:
        mode, model = "sam2", models[0]
        out.say(f"segmenter: SAM2 checkpoint {checkpoint_dir / model}")
    else:
        mode = "stand-in"
        checkpoint_dir = workdir / "stand-in-checkpoint"
        model = make_stand_in_checkpoint(worker_python, worker_tree, checkpoint_dir)
        out.say(f"segmenter: {STAND_IN.upper()} (no trained SAM2 checkpoint given): it thresholds the DAPI band; "
                "every worker job below uses it")
    worker = Worker(worker_tree, worker_python, checkpoint_dir, mode, workdir)
    segmenter = STAND_IN if mode == "stand-in" else f"SAM2 {model}"

    with GirderServer(python, workdir, mongo_uri) as server:
        out.say(f"Girder {versions.get('girder')} at {server.api_url} (log: {server.log_path}); "
                f"its FUSE mount at {server.mount}")
        token = _users(server.api_url)
        rest = Rest(server.api_url, token)
        me = rest.json("GET", "user/me")
        private = rest.json("GET", "folder", params={"parentType": "user", "parentId": me["_id"], "name": "Private"})[0]
        source = make_source()
        started = time.monotonic()
        dataset = create_dataset(rest, private["_id"], source, "cells 16-bit")
        out.say(f"dataset made as the app makes it in {time.monotonic() - started:.1f} s: {len(dataset.originals)} "
                f"rough nuclei on {source.xy_count} positions x 2 channels, {source.pages.shape[3]} x "
                f"{source.pages.shape[2]} px uint16 (position 1: 0..{source.pages[0].max()}, position 2: "
                f"0..{source.pages[1].max()}), {len(dataset.spots)} spots, {len(dataset.connections)} connections; "
                f"tiles say dtype {dataset.tiles.get('dtype')!r}, {len(dataset.tiles.get('frames') or [])} frames")

        run = worker.run_many([("interface", interface_argv(server.api_url, token, IMAGE))])[0]
        posted = rest.call("GET", "worker_interface", params={"image": IMAGE})
        fields = posted.json() if posted.status_code == 200 and isinstance(posted.json(), dict) else {}
        out.check("interface request", run.returncode == 0 and "Tag of objects to refine" in fields,
                  f"exit {run.returncode}; the server holds {len(fields)} fields for {IMAGE}")

        frames = sorted(int(f["Frame"]) for f in dataset.tiles.get("frames") or [{"Frame": 0}])
        records = worker.probe_frames(server.api_url, token, dataset.item_id, frames)
        _frames_check(out, "every frame fetched by the worker's NimbusClient.get_frame", records, source, dataset.tiles)

        _reads_checks(out, rest, worker, server.api_url, token, private["_id"], dataset.originals[0])

        def job(name: str, batch_xy: str, delete: bool, dataset_id: str = dataset.folder_id) -> tuple[str, list[str]]:
            parameters = tool_parameters(batch_xy, delete, model)
            return name, compute_argv(server.api_url, token, dataset_id, parameters)

        out.say(f"job A: position 1 only, originals kept ({segmenter})")
        (first,) = worker.run_many([job("job A", "1", False)])
        _report_run(out, first)
        out.check("job A exit 0", first.returncode == 0, f"exit {first.returncode}")
        _frames_check(out, "job A", first.frames, source, dataset.tiles)
        _scoped_checks(out, first, sizes=(source.xy_count, 1, 1))
        _state_checks(out, "after job A", rest, dataset.folder_id, dataset.originals, dataset.connections)

        out.say(f"jobs B and C at once: all positions, 'Delete original annotations' on ({segmenter})")
        both = worker.run_many([job("job B", "all", True), job("job C", "all", True)])
        for run in both:
            _report_run(out, run)
        out.check("two jobs at once: both exit 0", all(r.returncode == 0 for r in both),
                  ", ".join(f"{r.name} exit {r.returncode}" for r in both))
        _frames_check(out, "jobs B and C", both[0].frames + both[1].frames, source, dataset.tiles)
        for run in both:
            verdict = reads.listing_verdict(run.requests)
            out.check(f"{run.name} read all positions with one listing", verdict.passed, verdict.detail)
        annotations = _state_checks(out, "after jobs B and C", rest, dataset.folder_id, dataset.originals,
                                    dataset.connections)

        out.say(f"job D: the same job again, a re-run ({segmenter})")
        before_ids = {a["_id"] for a in annotations}
        (again,) = worker.run_many([job("job D", "all", True)])
        _report_run(out, again)
        verdict = reads.listing_verdict(again.requests)
        out.check(f"{again.name} read all positions with one listing", verdict.passed, verdict.detail)
        after = _state_checks(out, "after the re-run", rest, dataset.folder_id, dataset.originals, dataset.connections)
        new = [a["_id"] for a in after if a["_id"] not in before_ids]
        out.check("re-run: exit 0 and no new annotation", again.returncode == 0 and not new,
                  f"exit {again.returncode}, {len(new)} new annotation(s)")

        _large_dataset_jobs(out, rest, worker, job, private["_id"], segmenter)

        if not args.no_observe:
            scratch_source = make_source(count=6, seed=11)
            scratch = create_dataset(rest, private["_id"], scratch_source, "scratch")
            from real_server.observe import observe

            observe(rest, scratch, scratch_source, out.say)
        if mongo_uri is None:
            from real_server.observe import substitute_noops

            ignored = substitute_noops(server.log_path.read_text(errors="replace"))
            out.say("observed: options the substitute database accepted and ignored (girder.log): "
                    + (", ".join(ignored) if ignored else "none"))
        rest.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for path, what in ((args.nimbus / "devops" / "girder" / "plugins" / "AnnotationPlugin", "NimbusImage"),
                       (args.large_image / "girder" / "girder_large_image", "large_image")):
        if not path.is_dir():
            print(f"not a {what} checkout: {path} is missing", file=sys.stderr)
            return 2
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="real-server-check-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    mongod = None
    mongo_uri = args.mongo_uri
    if mongo_uri is None and shutil.which("mongod"):
        mongod, mongo_uri = _start_mongod(workdir)
    substitute = "" if mongo_uri else _substitute_version(venv.python_in(args.venv)) if venv.python_in(
        args.venv).exists() else "mongomock_ng"
    out = Output(database_label(mongo_uri, substitute))
    if mongo_uri is None:
        out.say("no MongoDB given and no mongod on the PATH: Girder runs on an in-process substitute database "
                "(one process, no real MongoDB concurrency); see docs/real-server-check.md")
    try:
        run_check(args, workdir, out, mongo_uri)
    except Exception as exc:  # noqa: BLE001 - any failure of the set-up is one failed check, shown whole
        import traceback

        where = traceback.extract_tb(exc.__traceback__)[-1]
        out.check("the check ran to its end", False,
                  f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})")
    finally:
        if mongod is not None:
            mongod.terminate()
    return out.finish()


if __name__ == "__main__":
    sys.exit(main())
