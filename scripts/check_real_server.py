"""Check the worker against the real NimbusImage server's code (not run in CI).

    python scripts/check_real_server.py --nimbus PATH/NimbusImage --large-image PATH/large_image \
        [--mongo-uri URI] [--worker PATH/worker-tree] [--worker-python PYTHON] [--venv DIR]

Given local checkouts of NimbusImage and large_image (branch ``girder-5``), it installs Girder 5
with NimbusImage's annotation plugin and girder_large_image into its own cached virtual
environment, starts Girder on 127.0.0.1 (on MongoDB where ``--mongo-uri`` is given or ``mongod``
is on the PATH, else on an in-process substitute, said on every line), makes a dataset the way
the web app does (a 16-bit two-position, two-channel image, ``multi-source2.json`` transcoded,
a configuration with layers, a dataset view, rough nucleus outlines and connections), and runs
the worker's ``entrypoint.py`` as NimbusImage does: the interface request, a job on one
position, two jobs at once with "Delete original annotations", and a re-run. It prints PASS or
FAIL per check and, last, ``N passed, M failed``; the exit status is 1 when any check failed.

See docs/real-server-check.md.
"""

from __future__ import annotations

import argparse
import datetime
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

from real_server import checks, venv  # noqa: E402
from real_server.dataset import Source, create_dataset, expected_pixels, make_source  # noqa: E402
from real_server.output import Output, database_label  # noqa: E402
from real_server.rest import Rest  # noqa: E402
from real_server.server import GirderServer, free_port  # noqa: E402
from real_server.worker import (STAND_IN, Run, Worker, compute_argv, default_python, interface_argv,  # noqa: E402
                                make_stand_in_checkpoint, tool_parameters, trained_models)

IMAGE = "annotations/sam2_refine_worker:latest"
PASSWORD = "check-password-1"


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


def _frames_check(out: Output, name: str, records: list[dict], source: Source, tiles: dict) -> None:
    verdict = checks.frames_exact(records, expected_pixels(source, tiles))
    out.check(f"frames exact ({name})", verdict.passed, verdict.detail)


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

        def job(name: str, batch_xy: str, delete: bool) -> tuple[str, list[str]]:
            parameters = tool_parameters(batch_xy, delete, model)
            return name, compute_argv(server.api_url, token, dataset.folder_id, parameters)

        out.say(f"job A: position 1 only, originals kept ({segmenter})")
        (first,) = worker.run_many([job("job A", "1", False)])
        _report_run(out, first)
        out.check("job A exit 0", first.returncode == 0, f"exit {first.returncode}")
        _frames_check(out, "job A", first.frames, source, dataset.tiles)
        _state_checks(out, "after job A", rest, dataset.folder_id, dataset.originals, dataset.connections)

        out.say(f"jobs B and C at once: all positions, 'Delete original annotations' on ({segmenter})")
        both = worker.run_many([job("job B", "all", True), job("job C", "all", True)])
        for run in both:
            _report_run(out, run)
        out.check("two jobs at once: both exit 0", all(r.returncode == 0 for r in both),
                  ", ".join(f"{r.name} exit {r.returncode}" for r in both))
        _frames_check(out, "jobs B and C", both[0].frames + both[1].frames, source, dataset.tiles)
        annotations = _state_checks(out, "after jobs B and C", rest, dataset.folder_id, dataset.originals,
                                    dataset.connections)

        out.say(f"job D: the same job again, a re-run ({segmenter})")
        before_ids = {a["_id"] for a in annotations}
        (again,) = worker.run_many([job("job D", "all", True)])
        _report_run(out, again)
        after = _state_checks(out, "after the re-run", rest, dataset.folder_id, dataset.originals, dataset.connections)
        new = [a["_id"] for a in after if a["_id"] not in before_ids]
        out.check("re-run: exit 0 and no new annotation", again.returncode == 0 and not new,
                  f"exit {again.returncode}, {len(new)} new annotation(s)")

        if not args.no_observe:
            scratch_source = make_source(count=6, seed=11)
            scratch = create_dataset(rest, private["_id"], scratch_source, "scratch")
            from real_server.observe import observe

            observe(rest, scratch, scratch_source, out.say)
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
        out.check("the check ran to its end", False, f"{type(exc).__name__}: {exc}")
    finally:
        if mongod is not None:
            mongod.terminate()
    return out.finish()


if __name__ == "__main__":
    sys.exit(main())
