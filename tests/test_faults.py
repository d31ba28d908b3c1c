"""Reliability under faults (issue 7): nothing is lost, nothing is silently missing.

Every case runs the real ``entrypoint.py`` as a subprocess against the local server and then
checks, whatever happened:

- no original is lost: each original is still on the server, or an annotation on the server
  carries ``sam2Refine.originalId`` == its id (:func:`assert_nothing_lost`);
- no refined annotation is silently missing: each refinement on the server is either reported
  in the job's summary (``replacements``), or found by a re-run, which then does not make a
  second one (:func:`check_rerun`);
- the messages say what happened (the error names the failing method and endpoint, or the
  signal), and the exit status is non-zero when the job did not finish.

Model cost: most cases swap the model for a stand-in (:data:`STANDIN_LAUNCHER` runs the real
``entrypoint.py`` with ``cli._load_sam2`` returning a :class:`KnownMaskPredictor`, and without
importing torch), because the faults are in the HTTP conversation, not in the model. The
SIGTERM case runs the real SAM2.1 tiny model (random weights), so the signal lands while torch
is working. Re-runs that only check accounting run in-process with the stand-in.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, TOKEN, WorkerRun
from sam2_refine.job import compute as job
from sam2_refine.job.markers import original_of
from sam2_refine.nimbus.client import NimbusClient
from sam2_refine.nimbus.retry import RetryPolicy
from sam2_refine.nimbus.progress import Reporter
from sam2_refine.job.settings import parse_settings
from sam2_refine.testing.nimbus_server import NimbusTestServer
from sam2_refine.testing.stand_in import KnownMaskPredictor
from test_cli_e2e import BIG, LAYERS, SMALL, ann, params, pixels

#: Runs the real entrypoint.py with the model replaced by a stand-in (no torch import): the
#: command line, settings, signal handling, HTTP client, engine, ledger and exit codes are real.
STANDIN_LAUNCHER = r"""
import runpy, sys, types

class CheckpointError(RuntimeError):
    pass

def _real(name):
    # Anything but CheckpointError: load the real module (torch) after all.
    if name.startswith("__"):
        raise AttributeError(name)
    sys.modules.pop("sam2_refine.model.sam2_model", None)
    import importlib
    return getattr(importlib.import_module("sam2_refine.model.sam2_model"), name)

fake = types.ModuleType("sam2_refine.model.sam2_model")
fake.CheckpointError = CheckpointError
fake.__getattr__ = _real
sys.modules["sam2_refine.model.sam2_model"] = fake

import sam2_refine.cli as cli
from sam2_refine.testing.stand_in import KnownMaskPredictor
cli._load_sam2 = lambda path: (KnownMaskPredictor(), False)
runpy.run_path("entrypoint.py", run_name="__main__")
"""

EMPTY_CKPT_NAME = "sam2.1_hiera_tiny.pt"


# -- helpers ------------------------------------------------------------------------------------


def job_params(delete: bool = True, **fields: Any) -> dict[str, Any]:
    return params(**{"Batch XY": "all", "Batch Time": "all", "Delete original annotations": delete, **fields})


#: dataset id -> {BIG original id: the SMALL original connected to it (parent -> child)}.
SEEDED_LINKS: dict[str, dict[str, str]] = {}


def two_location_dataset(server: NimbusTestServer) -> tuple[Any, list[str], list[str]]:
    """2 XY positions, each with BIG (refined) and SMALL (kept: its mask is far larger), and a
    connection SMALL -> BIG at each (the worker moves it to BIG's refinement before deleting BIG).

    Returns (dataset, all original ids, the BIG ids).
    """
    ds = server.add_dataset(pixels(2, 1), layers=LAYERS)
    SEEDED_LINKS[ds.dataset_id] = {}
    originals, big = [], []
    for xy in range(2):
        b, s = server.add_annotations(ds.dataset_id, [ann(BIG, xy), ann(SMALL, xy)])
        originals += [b, s]
        big.append(b)
        server.add_connections([{"parentId": s, "childId": b, "datasetId": ds.dataset_id, "label": "link"}])
        SEEDED_LINKS.setdefault(ds.dataset_id, {})[b] = s
    return ds, originals, big


def cli_argv(server: NimbusTestServer, request_params: dict, dataset_id: str, *, standin: bool,
             token: str = TOKEN) -> list[str]:
    head = [sys.executable, "-c", STANDIN_LAUNCHER] if standin else [sys.executable, str(REPO / "entrypoint.py")]
    return head + ["--apiUrl", server.api_url, "--token", token, "--request", "compute",
                   "--parameters", json.dumps(request_params), "--datasetId", dataset_id]


def cli_env(ckpt: Path, summary: Path | None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", SAM2_CHECKPOINT_DIR=str(ckpt),
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    env.pop("SAM2_REFINE_SUMMARY", None)
    if summary is not None:
        env["SAM2_REFINE_SUMMARY"] = str(summary)
    env.update(extra)
    return env


def run_cli(server: NimbusTestServer, request_params: dict, dataset_id: str, ckpt: Path, *,
            standin: bool = True, summary: Path | None = None, timeout: float = 120,
            **env: str) -> tuple[WorkerRun, float]:
    """Run the CLI to completion; returns (run, seconds)."""
    started = time.monotonic()
    done = subprocess.run(cli_argv(server, request_params, dataset_id, standin=standin), capture_output=True,
                          text=True, timeout=timeout, env=cli_env(ckpt, summary, **env), cwd=REPO)
    return WorkerRun(done.returncode, done.stdout, done.stderr), time.monotonic() - started


class LiveRun:
    """A CLI subprocess whose stdout is read line by line while it runs."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     cwd=REPO)
        self.lines: list[str] = []
        self.err: list[str] = []
        self._out = threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True)
        self._err = threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True)
        self._out.start()
        self._err.start()

    @staticmethod
    def _pump(stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)

    def wait_for(self, predicate, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError("the worker ended before the awaited moment:\n" + "".join(self.lines + self.err))
            time.sleep(0.01)
        self.proc.kill()
        raise AssertionError("timed out waiting:\n" + "".join(self.lines + self.err))

    def saw_progress(self, title: str) -> bool:
        return any(f'"title": "{title}"' in line for line in list(self.lines))

    def finish(self, timeout: float = 60) -> WorkerRun:
        code = self.proc.wait(timeout=timeout)
        self._out.join(5)
        self._err.join(5)
        return WorkerRun(code, "".join(self.lines), "".join(self.err))


def wait_until_answered(server: NimbusTestServer, method: str, path: str, timeout: float = 15) -> None:
    """Wait until the server has finished acting on the first such request (a delayed one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = server.requests_to(method, path)
        if hits and hits[0].status != 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"the server never answered {method} {path}")


def refinements_on_server(server: NimbusTestServer, dataset_id: str) -> dict[str, list[str]]:
    """original id -> ids of the annotations on the server that refine it."""
    out: dict[str, list[str]] = {}
    for doc in server.annotations(dataset_id):
        original = original_of(doc)
        if original is not None:
            out.setdefault(original, []).append(doc["_id"])
    return out


def assert_nothing_lost(server: NimbusTestServer, dataset_id: str, originals: list[str]) -> None:
    """Every original is on the server, or a refinement marked with its id is; none twice."""
    present = {d["_id"] for d in server.annotations(dataset_id)}
    refined = refinements_on_server(server, dataset_id)
    lost = [o for o in originals if o not in present and o not in refined]
    assert not lost, f"originals lost: {lost}"
    twice = {o: ids for o, ids in refined.items() if len(ids) > 1}
    assert not twice, f"originals refined more than once: {twice}"


def rerun_in_process(server: NimbusTestServer, dataset_id: str, ckpt: Path, summary: Path,
                     delete: bool = True) -> tuple[int, Reporter, dict[str, Any]]:
    """The same job again, in-process with the stand-in, faults cleared."""
    server.clear_faults()
    settings = parse_settings(job_params(delete=delete), dataset_id, ckpt)
    reporter = Reporter(stream=io.StringIO(), secrets=(TOKEN,))
    old = os.environ.get(job.SUMMARY_ENV)
    os.environ[job.SUMMARY_ENV] = str(summary)
    try:
        with NimbusClient(server.api_url, TOKEN, retry=RetryPolicy(total=1, backoff_factor=0.01)) as client:
            code = job.run_compute(settings, client, reporter, lambda path: (KnownMaskPredictor(), False))
    finally:
        if old is None:
            os.environ.pop(job.SUMMARY_ENV, None)
        else:
            os.environ[job.SUMMARY_ENV] = old
    return code, reporter, json.loads(summary.read_text())


def check_rerun(server: NimbusTestServer, dataset_id: str, ckpt: Path, originals: list[str],
                reported: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    """After a faulty run: every refinement on the server was reported or is found by a re-run,
    which makes no second one and (delete on) deletes each refined original exactly once."""
    before = refinements_on_server(server, dataset_id)
    unreported = {o for o, ids in before.items() if not set(ids) & set(reported.values())}
    posts_before = len(server.requests_to("POST", "upenn_annotation/multiple"))
    deletes_before = len(server.requests_to("DELETE", "upenn_annotation/multiple"))
    present_before = {d["_id"] for d in server.annotations(dataset_id)}
    code, reporter, summary = rerun_in_process(server, dataset_id, ckpt, tmp_path / "rerun-summary.json")
    assert code == 0, reporter.lines
    # Whatever the faulty run left on the server (reported or not) is found, not made again.
    assert {o for o in before if o in present_before} <= set(summary["replacements"])
    for original in unreported & present_before:
        assert summary["replacements"][original] in before[original]
    new_posts = server.requests_to("POST", "upenn_annotation/multiple")[posts_before:]
    remade = [original_of(d) for r in new_posts for d in r.body if original_of(d) in before]
    assert remade == [], f"the re-run refined again: {remade}"
    if any(o in present_before for o in before):
        assert any(line.get("title") == "Already refined" for line in reporter.lines)
    # Each original whose refinement exists is deleted exactly once, over both runs.
    deleted = Counter(i for r in server.requests_to("DELETE", "upenn_annotation/multiple")[deletes_before:]
                      for i in r.body)
    assert all(n == 1 for n in deleted.values()), deleted
    after = refinements_on_server(server, dataset_id)
    assert all(len(ids) == 1 for ids in after.values()), after
    present = {d["_id"] for d in server.annotations(dataset_id)}
    assert not set(after) & present, "an original whose refinement exists was not deleted by the re-run"
    assert_nothing_lost(server, dataset_id, originals)
    assert_links_moved(server, dataset_id)
    return summary


def assert_links_moved(server: NimbusTestServer, dataset_id: str) -> None:
    """Each seeded SMALL -> BIG connection exists once: to BIG while BIG is on the server, and
    to BIG's refinement once there is one (both while BIG is still there)."""
    seeded = SEEDED_LINKS.get(dataset_id, {})
    present = {d["_id"] for d in server.annotations(dataset_id)}
    refined = refinements_on_server(server, dataset_id)
    links = Counter((c["parentId"], c["childId"]) for c in server.connections() if c.get("datasetId") == dataset_id)
    assert set(links.values()) <= {1}, f"a connection was made twice: {links}"
    expected = Counter()
    for big, small in seeded.items():
        if big in present:
            expected[(small, big)] += 1
        for refinement in refined.get(big, []):
            expected[(small, refinement)] += 1
    assert set(links) <= set(expected), (links, expected)
    # Once BIG is deleted, the link must be on its refinement (it was moved before deleting).
    for big, small in seeded.items():
        if big not in present:
            assert any((small, r) in links for r in refined.get(big, [])), (big, links)


def error_text(run: WorkerRun) -> str:
    return " | ".join(f"{e['error']} {e.get('info', '')}" for e in run.errors())


# -- 500 and 503 at each endpoint -----------------------------------------------------------------

ENDPOINTS = {
    "annotations": ("GET", r"upenn_annotation", "GET upenn_annotation"),
    "frames": ("GET", r"item/\w+/tiles/region", "GET item/{item}/tiles/region"),
    "dataset_view": ("GET", r"dataset_view", "GET dataset_view"),
    "collection": ("GET", r"upenn_collection/\w+", "GET upenn_collection/{collection}"),
    "create": ("POST", r"upenn_annotation/multiple", "POST upenn_annotation/multiple"),
    "delete": ("DELETE", r"upenn_annotation/multiple", "DELETE upenn_annotation/multiple"),
    "links_list": ("GET", r"annotation_connection", "GET annotation_connection"),
    "links_create": ("POST", r"annotation_connection/multiple", "POST annotation_connection/multiple"),
}


@pytest.mark.slow
@pytest.mark.parametrize("status", [500, 503])
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_server_error_at_each_endpoint(server, stub_ckpt, tmp_path, monkeypatch, endpoint, status):
    monkeypatch.setenv("SAM2_REFINE_HTTP_RETRIES", "1")
    ds, originals, big = two_location_dataset(server)
    method, path, named = ENDPOINTS[endpoint]
    named = named.format(item=ds.item_id, collection=ds.collection_id)
    server.fail(method, path, status=status, calls=None)
    summary_path = tmp_path / "summary.json"
    run, elapsed = run_cli(server, job_params(), ds.dataset_id, stub_ckpt, summary=summary_path)
    print(f"\n{endpoint} {status}: exit {run.returncode} in {elapsed:.1f} s; {error_text(run)[:300]}")

    assert run.returncode == 1, run.stdout + run.stderr
    text = error_text(run)
    assert f"Request: {named} (HTTP {status})" in text or (
        endpoint == "frames" and f"the server answered HTTP {status}" in text and f"(request {named})" in text), text
    assert TOKEN not in run.stdout + run.stderr
    hits = server.requests_to(method, path)
    if method == "POST":
        assert len(hits) == 1  # a create is never retried
    elif status == 503:
        assert len(hits) >= 2 and len(hits) % 2 == 0  # each request retried once (RETRIES=1)
    else:
        assert len(hits) >= 1
    if method != "DELETE":
        assert server.requests_to("DELETE", "upenn_annotation/multiple") == []
        assert {a["_id"] for a in server.annotations(ds.dataset_id)} >= set(originals)
    assert_nothing_lost(server, ds.dataset_id, originals)

    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"replacements": {}}
    if endpoint == "delete":  # refined and confirmed, deletion failed: reported, originals remain
        assert set(summary["replacements"]) == set(big) and summary["deleted"] == 0
        assert set(summary["delete_failed_ids"]) == set(big)
        assert "Running the job again deletes them" in text
    if endpoint == "frames":
        assert "could not be processed" in text
        assert set(summary["kept_reasons"].get("its image could not be read", [])) == set(originals)
    if endpoint == "create":
        assert "no original annotation was deleted" in text and "Created 0 of 2" in text
    if endpoint.startswith("links"):  # refined and confirmed; links not moved, so nothing deleted
        assert "no original annotation was deleted" in text
        assert set(summary["replacements"]) == set(big) and summary["deleted"] == 0
    assert_links_moved(server, ds.dataset_id)
    check_rerun(server, ds.dataset_id, stub_ckpt, originals, summary["replacements"], tmp_path)


# -- a connection dropped in the middle of a create ---------------------------------------------

def test_create_answer_lost_then_rerun_does_not_duplicate_and_deletes(server, stub_ckpt, tmp_path):
    ds, originals, big = two_location_dataset(server)
    server.fail("POST", r"upenn_annotation/multiple", action="drop_after", calls=[1])
    run, _ = run_cli(server, job_params(), ds.dataset_id, stub_ckpt, summary=tmp_path / "s1.json")
    assert run.returncode == 1, run.stdout + run.stderr
    text = error_text(run)
    assert "Request: POST upenn_annotation/multiple." in text, text
    assert "the connection was closed before an answer came" in text and "HTTPConnectionPool" not in text
    assert "no original annotation was deleted" in text
    # The server did create them; the worker looked and found them (reported in the summary).
    assert "2 of the 2 unconfirmed ones were found on the server after all" in text
    summary = json.loads((tmp_path / "s1.json").read_text())
    assert set(summary["replacements"]) == set(big)
    assert server.requests_to("DELETE", "upenn_annotation/multiple") == []
    assert_nothing_lost(server, ds.dataset_id, originals)

    # The re-run through the CLI: no second refinement, deletion completed, exactly once.
    server.clear_faults()
    again, _ = run_cli(server, job_params(), ds.dataset_id, stub_ckpt, summary=tmp_path / "s2.json")
    assert again.returncode == 0, again.stdout + again.stderr
    assert any(w["title"] == "Already refined" for w in again.warnings())
    posts = server.requests_to("POST", "upenn_annotation/multiple")
    assert len(posts) == 1  # nothing new to create: the small ones are kept again
    deletes = [i for r in server.requests_to("DELETE", "upenn_annotation/multiple") for i in r.body]
    assert sorted(deletes) == sorted(big)
    second = json.loads((tmp_path / "s2.json").read_text())
    assert second["already_refined"] == 2 and second["refined"] == 0 and second["deleted"] == 2
    refined = refinements_on_server(server, ds.dataset_id)
    assert {o: len(ids) for o, ids in refined.items()} == {b: 1 for b in big}
    assert_nothing_lost(server, ds.dataset_id, originals)
    assert_links_moved(server, ds.dataset_id)


def test_links_answer_lost_then_rerun_does_not_duplicate_them(server, stub_ckpt, tmp_path):
    """The server created the moved connections but the answer was lost: nothing is deleted; the
    re-run finds the connections, makes none twice, and deletes."""
    ds, originals, big = two_location_dataset(server)
    server.fail("POST", r"annotation_connection/multiple", action="drop_after", calls=[1])
    run, _ = run_cli(server, job_params(), ds.dataset_id, stub_ckpt, summary=tmp_path / "s1.json")
    assert run.returncode == 1, run.stdout + run.stderr
    text = error_text(run)
    assert "Request: POST annotation_connection/multiple." in text
    assert "no original annotation was deleted" in text
    assert server.requests_to("DELETE", "upenn_annotation/multiple") == []
    assert len(server.connections()) == 4  # 2 seeded + 2 created, unconfirmed
    assert_nothing_lost(server, ds.dataset_id, originals)
    summary = json.loads((tmp_path / "s1.json").read_text())
    check_rerun(server, ds.dataset_id, stub_ckpt, originals, summary["replacements"], tmp_path)
    assert len(server.connections()) == 2  # the originals' went with them; one each on the refinements


# -- slow responses ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_slow_listing_times_out_in_bounded_time(server, stub_ckpt, tmp_path):
    ds, originals, _ = two_location_dataset(server)
    server.fail("GET", r"upenn_annotation", action="delay", delay=20, calls=None)
    run, elapsed = run_cli(server, job_params(), ds.dataset_id, stub_ckpt, summary=tmp_path / "s.json",
                           SAM2_REFINE_HTTP_TIMEOUT="1", SAM2_REFINE_HTTP_RETRIES="1")
    print(f"\nslow listing: exit {run.returncode} after {elapsed:.1f} s (timeout 1 s, 1 retry)")
    assert run.returncode == 1
    assert elapsed < 12, elapsed  # 2 reads of 1 s each, plus process start; not the 20 s delay
    text = error_text(run)
    assert "The NimbusImage server did not answer in time." in text and "Request: GET upenn_annotation." in text
    assert "While reading the annotations, no answer from 127.0.0.1:" in text, text
    assert "Read timed out" not in text and "HTTPConnectionPool" not in text  # no library text
    assert len(server.requests_to("GET", "upenn_annotation")) == 2  # the GET was retried once
    assert [r for r in server.requests if r.method != "GET"] == []
    assert_nothing_lost(server, ds.dataset_id, originals)


@pytest.mark.slow
def test_slow_create_times_out_and_a_rerun_finds_what_the_server_made_late(server, stub_ckpt, tmp_path):
    """The server creates after the worker gave up waiting: nothing is reported then, but a
    re-run finds the refinements and does not make them again."""
    ds, originals, big = two_location_dataset(server)
    server.fail("POST", r"upenn_annotation/multiple", action="delay", delay=2.5, calls=[1])
    run, elapsed = run_cli(server, job_params(), ds.dataset_id, stub_ckpt, summary=tmp_path / "s.json",
                           SAM2_REFINE_HTTP_TIMEOUT="1", SAM2_REFINE_HTTP_RETRIES="1")
    assert run.returncode == 1
    text = error_text(run)
    assert "Request: POST upenn_annotation/multiple." in text and "it did not answer in time" in text
    assert len(server.requests_to("POST", "upenn_annotation/multiple")) == 1  # never retried
    assert server.requests_to("DELETE", "upenn_annotation/multiple") == []
    deadline = time.monotonic() + 15  # the server finishes its delayed create
    while len(refinements_on_server(server, ds.dataset_id)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(refinements_on_server(server, ds.dataset_id)) == set(big)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert_nothing_lost(server, ds.dataset_id, originals)
    check_rerun(server, ds.dataset_id, stub_ckpt, originals, summary["replacements"], tmp_path)


# -- 401 in mid-job ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["POST", "DELETE"])
def test_unauthorized_mid_job(server, stub_ckpt, tmp_path, method):
    ds, originals, big = two_location_dataset(server)
    server.fail(method, r"upenn_annotation/multiple", status=401, calls=None)
    run, _ = run_cli(server, job_params(), ds.dataset_id, stub_ckpt, summary=tmp_path / "s.json")
    assert run.returncode == 1
    text = error_text(run)
    assert f"Request: {method} upenn_annotation/multiple (HTTP 401)" in text, text
    assert "The server did not accept the job's login" in text, text
    assert TOKEN not in run.stdout + run.stderr
    assert len(server.requests_to(method, r"upenn_annotation/multiple")) == 1  # 401 is not retried
    assert {a["_id"] for a in server.annotations(ds.dataset_id)} >= set(originals)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["deleted"] == 0
    assert_nothing_lost(server, ds.dataset_id, originals)
    check_rerun(server, ds.dataset_id, stub_ckpt, originals, summary["replacements"], tmp_path)


# -- signals --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_while_the_model_is_refining(server, checkpoint_dir, tmp_path, stub_ckpt):
    """The real model: SIGTERM lands while torch embeds the first location (or, on a fast
    machine, while the upload, held 3 s by the server, is waiting for its answer)."""
    ds, originals, _ = two_location_dataset(server)
    server.fail("POST", r"upenn_annotation/multiple", action="delay", delay=3, calls=[1])
    live = LiveRun(cli_argv(server, job_params(), ds.dataset_id, standin=False),
                   cli_env(checkpoint_dir, tmp_path / "s.json"))
    live.wait_for(lambda: live.saw_progress("Refining") or server.requests_to("POST", r"upenn_annotation/multiple"))
    live.proc.send_signal(signal.SIGTERM)
    run = live.finish()
    print(f"\nSIGTERM: exit {run.returncode}; {error_text(run)}")
    assert run.returncode == 143, run.stdout + run.stderr
    text = error_text(run)
    assert "The job was stopped (SIGTERM)" in text and "Running the job again" in text
    assert "Traceback" not in run.stderr and TOKEN not in run.stdout + run.stderr
    assert server.requests_to("DELETE", "upenn_annotation/multiple") == []
    assert {a["_id"] for a in server.annotations(ds.dataset_id)} >= set(originals)
    summary = json.loads((tmp_path / "s.json").read_text())  # written even when stopped
    assert summary["deleted"] == 0
    if server.requests_to("POST", r"upenn_annotation/multiple"):
        wait_until_answered(server, "POST", r"upenn_annotation/multiple")  # created after the stop
    assert_nothing_lost(server, ds.dataset_id, originals)
    check_rerun(server, ds.dataset_id, stub_ckpt, originals, summary["replacements"], tmp_path)


@pytest.mark.slow
def test_sigterm_while_deleting(server, stub_ckpt, tmp_path):
    """SIGTERM while the DELETE is on its way: the server may still delete; nothing is lost."""
    ds, originals, big = two_location_dataset(server)
    server.fail("DELETE", r"upenn_annotation/multiple", action="delay", delay=2, calls=[1])
    live = LiveRun(cli_argv(server, job_params(), ds.dataset_id, standin=True),
                   cli_env(stub_ckpt, tmp_path / "s.json"))
    live.wait_for(lambda: server.requests_to("DELETE", r"upenn_annotation/multiple"))
    live.proc.send_signal(signal.SIGTERM)
    run = live.finish()
    assert run.returncode == 143, run.stdout + run.stderr
    assert "The job was stopped (SIGTERM)" in error_text(run)
    wait_until_answered(server, "DELETE", r"upenn_annotation/multiple")  # the server deletes all the same
    assert_nothing_lost(server, ds.dataset_id, originals)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert set(summary["replacements"]) == set(big)  # the refinements are reported
    check_rerun(server, ds.dataset_id, stub_ckpt, originals, summary["replacements"], tmp_path)


def test_sigkill_while_a_delete_is_delayed(server, stub_ckpt, tmp_path):
    ds, originals, big = two_location_dataset(server)
    server.fail("DELETE", r"upenn_annotation/multiple", action="delay", delay=1.5, calls=[1])
    live = LiveRun(cli_argv(server, job_params(), ds.dataset_id, standin=True), cli_env(stub_ckpt, None))
    live.wait_for(lambda: server.requests_to("DELETE", r"upenn_annotation/multiple"))
    live.proc.send_signal(signal.SIGKILL)
    run = live.finish()
    assert run.returncode == -signal.SIGKILL
    wait_until_answered(server, "DELETE", r"upenn_annotation/multiple")  # the server deletes all the same
    assert_nothing_lost(server, ds.dataset_id, originals)
    # No summary (killed): the re-run finds every refinement and makes none again.
    check_rerun(server, ds.dataset_id, stub_ckpt, originals, {}, tmp_path)


def test_sigkill_right_after_the_first_create(server, stub_ckpt, tmp_path):
    """Killed after the server created the chunk and before the worker read the answer."""
    ds, originals, big = two_location_dataset(server)
    created, release = threading.Event(), threading.Event()
    original_handle = server.handle

    def hold_create_answer(method, path, params_, body, token):
        answer = original_handle(method, path, params_, body, token)
        if method == "POST" and path == "upenn_annotation/multiple" and not created.is_set():
            created.set()
            release.wait(10)
        return answer

    server.handle = hold_create_answer
    live = LiveRun(cli_argv(server, job_params(), ds.dataset_id, standin=True), cli_env(stub_ckpt, None))
    live.wait_for(created.is_set)
    live.proc.send_signal(signal.SIGKILL)
    run = live.finish()
    release.set()
    server.handle = original_handle
    assert run.returncode == -signal.SIGKILL
    assert set(refinements_on_server(server, ds.dataset_id)) == set(big)  # created, never confirmed
    assert server.requests_to("DELETE", "upenn_annotation/multiple") == []
    assert_nothing_lost(server, ds.dataset_id, originals)

    # Re-run through the CLI: finds both, creates nothing, deletes each original once.
    again, _ = run_cli(server, job_params(), ds.dataset_id, stub_ckpt, summary=tmp_path / "s2.json")
    assert again.returncode == 0, again.stdout + again.stderr
    assert any(w["title"] == "Already refined" for w in again.warnings())
    assert len(server.requests_to("POST", r"upenn_annotation/multiple")) == 1
    assert sorted(i for r in server.requests_to("DELETE", "upenn_annotation/multiple") for i in r.body) == sorted(big)
    assert {o: len(ids) for o, ids in refinements_on_server(server, ds.dataset_id).items()} == {b: 1 for b in big}
    assert_nothing_lost(server, ds.dataset_id, originals)
    assert_links_moved(server, ds.dataset_id)
