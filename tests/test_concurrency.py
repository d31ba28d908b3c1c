"""Jobs that run at the same time converge (issue 11): one refinement per original, nothing lost,
connections intact, whatever the interleaving.

Every scenario ends with :func:`assert_converged`: each original has at most one refinement (and
exactly one when every job succeeded), an original is gone only if its one refinement exists
(and with delete on, every refined original is gone), every annotation the user made that is
not an original is untouched, and the connections are exactly the seeded ones with each end
replaced by its survivor where that end was deleted, each exactly once.

Interleavings are forced, not hoped for: several jobs share one local server, each with its own
token, and :class:`~sam2_refine.testing.interleave.Interleaver` holds a job's request until
another job has reached a given step, delays every request by a seeded random time (many
seeds), or kills a job at its n-th request. The jobs are the real ``entrypoint.py`` (with the
known-mask stand-in as the model, ``test_faults.STANDIN_LAUNCHER``) except the sweeps that repeat
a scenario many times, which run ``job.run_compute`` in threads (same engine, same HTTP).
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from conftest import REPO, TOKEN, WorkerRun
from sam2_refine.job import compute as job
from sam2_refine.job.markers import MARKER_KEY, original_of
from sam2_refine.nimbus.client import NimbusClient
from sam2_refine.nimbus.retry import RetryPolicy
from sam2_refine.nimbus.progress import Reporter
from sam2_refine.job.settings import parse_settings
from sam2_refine.testing.datasets import annotation_doc, cell_scene, rough_polygon
from sam2_refine.testing.interleave import Interleaver
from sam2_refine.testing.nimbus_server import NimbusTestServer, RecordedRequest
from sam2_refine.testing.stand_in import KnownMaskPredictor
from test_faults import cli_argv, cli_env, job_params
from test_faults import refinements_on_server as refinements

H, W = 128, 160
LAYERS = [{"channel": 0, "color": "#ffffff", "visible": True,
           "contrast": {"mode": "percentile", "blackPoint": 0.5, "whitePoint": 99.5}}]
CREATE = r"upenn_annotation/multiple"
LIST = r"upenn_annotation"
LINKS = r"annotation_connection/multiple"
IDS = r"upenn_annotation/list/ids"


# -- the dataset and the invariant --------------------------------------------------------------


@dataclass
class Data:
    dataset_id: str
    originals: list[str]                      # the nuclei (tag "nucleus"): refined
    others: list[str]                         # the user's other annotations (tag "group"): never touched
    links: list[tuple[str, str, str]]         # seeded connections (parent, child, label)
    by_xy: dict[int, list[str]] = field(default_factory=dict)


def make_data(server: NimbusTestServer, n_xy: int = 2, count: int = 4, seed: int = 0) -> Data:
    """``n_xy`` positions of one synthetic scene: a rough outline per nucleus (refined), a
    group outline around all of them (not refined), and connections: group -> each nucleus,
    nucleus k -> nucleus k+1 (both ends replaced), and XY 1's first nucleus -> XY 2's (a track
    across positions)."""
    scene = cell_scene(H, W, count, radius=(9.0, 14.0), seed=seed)
    pixels = np.broadcast_to(scene.channels, (n_xy, 1, 1) + scene.channels.shape).copy()
    ds = server.add_dataset(pixels, layers=LAYERS)
    rng = np.random.default_rng(seed + 1)
    data = Data(ds.dataset_id, [], [], [])
    for xy in range(n_xy):
        nuclei = server.add_annotations(ds.dataset_id, [
            annotation_doc(rough_polygon(scene.labels == k, "jittered", rng), xy=xy, tags=["nucleus"])
            for k in range(1, scene.count + 1)])
        (group,) = server.add_annotations(ds.dataset_id, [
            annotation_doc(np.array([[1, 1], [W - 2, 1], [W - 2, H - 2], [1, H - 2]]), xy=xy, tags=["group"])])
        data.originals += nuclei
        data.others.append(group)
        data.by_xy[xy] = nuclei
        data.links += [(group, n, "contains") for n in nuclei]
        data.links += [(a, b, "next") for a, b in zip(nuclei, nuclei[1:])]
    if n_xy > 1:
        data.links.append((data.by_xy[0][0], data.by_xy[1][0], "track"))
    server.add_connections([{"parentId": p, "childId": c, "datasetId": ds.dataset_id, "label": label}
                            for p, c, label in data.links])
    return data


def assert_converged(server: NimbusTestServer, data: Data, *, delete: bool, complete: bool = True,
                     originals: list[str] | None = None) -> None:
    """The invariant of the module docstring. ``complete``: every job succeeded, so every
    original (of ``originals``, default all) must be refined (and deleted when ``delete``), and
    every connection must be there exactly once. Without ``complete`` (a job was killed and not
    re-run yet) nothing may be lost: every seeded connection is there (on the original, or on
    its refinement where the original is gone), and every connection is a seeded one with its
    ends possibly replaced by their refinements (a killed job may have left copies). In both,
    no connection points at an annotation that no longer exists."""
    docs = {d["_id"]: d for d in server.annotations(data.dataset_id)}
    made = refinements(server, data.dataset_id)
    twice = {o: ids for o, ids in made.items() if len(ids) > 1}
    assert not twice, f"originals refined more than once: {twice}"
    for other in data.others:
        assert other in docs and MARKER_KEY not in docs[other], f"the user's annotation {other} was touched"
    expected_done = set(originals if originals is not None else data.originals)
    for o in data.originals:
        refined = o in made
        if o not in docs:
            assert refined, f"original {o} is gone without a refinement"
        if complete and o in expected_done:
            assert refined, f"original {o} was not refined"
            assert (o in docs) == (not delete), f"original {o}: delete={delete} but present={o in docs}"
        if refined:
            assert docs[made[o][0]]["location"] == (docs.get(o) or docs[made[o][0]])["location"]

    def rep(a: str) -> str:
        return a if a in docs else made[a][0]

    expected = Counter((rep(p), rep(c), label) for p, c, label in data.links)
    actual = Counter((c["parentId"], c["childId"], c.get("label", "")) for c in server.connections()
                     if c.get("datasetId") == data.dataset_id)
    # NimbusImage's bulk delete leaves connections behind: the worker removes them itself.
    dangling = [k for k in actual if k[0] not in docs or k[1] not in docs]
    assert not dangling, f"connections pointing at deleted annotations: {dangling}"
    if complete:
        assert actual == expected, f"connections differ: missing {expected - actual}, extra {actual - expected}"
        return
    assert not set(expected) - set(actual), f"connections lost: {set(expected) - set(actual)}"
    origin = {r: o for o, ids in made.items() for r in ids}
    foreign = [k for k in actual if (origin.get(k[0], k[0]), origin.get(k[1], k[1]), k[2]) not in set(data.links)]
    assert not foreign, f"connections that are not (copies of) seeded ones: {foreign}"


# -- running jobs -------------------------------------------------------------------------------


@dataclass
class Job:
    name: str
    proc: subprocess.Popen
    summary: Path

    def finish(self, timeout: float = 120) -> WorkerRun:
        out, err = self.proc.communicate(timeout=timeout)
        return WorkerRun(self.proc.returncode, out, err)

    def result(self) -> dict[str, Any]:
        return json.loads(self.summary.read_text())


def start_job(server: NimbusTestServer, data: Data, name: str, ckpt: Path, tmp_path: Path, *,
              delete: bool, batch_xy: str = "all") -> Job:
    """The real entrypoint.py (stand-in model) as job ``name``, with its own token."""
    token = f"tok-{name}-SECRET"
    server.add_token(token, name)
    request = job_params(delete=delete, **{"Tag of objects to refine": ["nucleus"], "Batch XY": batch_xy})
    summary = tmp_path / f"{name}.json"
    proc = subprocess.Popen(cli_argv(server, request, data.dataset_id, standin=True, token=token),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(ckpt, summary), cwd=REPO)
    return Job(name, proc, summary)


def messages(run: WorkerRun, title: str) -> list[dict[str, Any]]:
    return [m for m in run.messages if m.get("title") == title]


def run_together(server, data, ckpt, tmp_path, names: list[str], *, delete: bool,
                 batches: dict[str, str] | None = None) -> dict[str, WorkerRun]:
    jobs = [start_job(server, data, n, ckpt, tmp_path, delete=delete, batch_xy=(batches or {}).get(n, "all"))
            for n in names]
    return {j.name: j.finish() for j in jobs}


class _Killed(BaseException):
    """A job ended between two requests (as by SIGKILL: no handler runs, nothing more is sent)."""


class _KillableClient(NimbusClient):
    """A client whose job dies at its ``kill_at``-th request (before sending it)."""

    def __init__(self, *args: Any, kill_at: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kill_at = kill_at
        self.sent = 0

    def _request(self, *args: Any, **kwargs: Any) -> Any:
        self.sent += 1
        if self.kill_at is not None and self.sent >= self.kill_at:
            raise _Killed()
        return super()._request(*args, **kwargs)


def run_in_thread(server, data, name: str, ckpt: Path, *, delete: bool, kill_at: int | None = None,
                  batch_xy: str = "all", outcome: dict[str, Any] | None = None) -> threading.Thread:
    """``job.run_compute`` in a thread as job ``name`` (stand-in model); its exit code (or
    "killed") and its client's request count land in ``outcome[name]``."""
    token = f"tok-{name}-SECRET"
    server.add_token(token, name)
    request = job_params(delete=delete, **{"Tag of objects to refine": ["nucleus"], "Batch XY": batch_xy})
    settings = parse_settings(request, data.dataset_id, ckpt)
    results = outcome if outcome is not None else {}

    def body() -> None:
        reporter = Reporter(stream=io.StringIO(), secrets=(token,))
        with _KillableClient(server.api_url, token, retry=RetryPolicy(total=1, backoff_factor=0.01),
                             kill_at=kill_at) as client:
            try:
                code: Any = job.run_compute(settings, client, reporter, lambda path: (KnownMaskPredictor(), False))
            except _Killed:
                code = "killed"
            results[name] = {"code": code, "sent": client.sent, "lines": reporter.lines}

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    return thread


# -- the CLI: 2 and 4 jobs on one batch, overlapping batches, a late start, a kill --------------


@pytest.mark.slow
@pytest.mark.parametrize("delete", [False, True])
def test_two_jobs_that_both_upload_before_either_checks(server, ckpt, tmp_path, delete):
    """The worst case for the old marker: both jobs list, refine and upload before either sees
    the other's refinements (each job's upload is held until the other's was sent too)."""
    data = make_data(server)
    lane = Interleaver(server)
    for me, other in (("job1", "job2"), ("job2", "job1")):
        lane.hold(me, "POST", CREATE, until=lambda o=other: lane.count(o, "POST", CREATE) >= 1)
    runs = run_together(server, data, ckpt, tmp_path, ["job1", "job2"], delete=delete)
    assert not lane.timed_out
    assert [r.returncode for r in runs.values()] == [0, 0], {n: r.errors() for n, r in runs.items()}
    assert len(server.requests_to("POST", CREATE)) == 2  # both uploaded a refinement of everything
    assert_converged(server, data, delete=delete)
    warned = [m for r in runs.values() for m in messages(r, "Refined by another job")]
    assert warned and "were refined at the same time by another job; one refinement each was kept" \
        in warned[0]["warning"]
    summaries = [json.loads((tmp_path / f"{n}.json").read_text()) for n in runs]
    removed = {i for s in summaries for ids in s["duplicates_removed_ids"].values() for i in ids}
    assert len(removed) == len(data.originals)  # one duplicate per original (both jobs may send it)
    assert not removed & {d["_id"] for d in server.annotations(data.dataset_id)}
    # what each job found: together they name every original (the job whose refinements stayed
    # may never see the other's, if the other removed them first)
    assert set().union(*(s["refined_at_the_same_time_ids"] for s in summaries)) == set(data.originals)
    # each original is refined by exactly one of the two, and both say which
    assert sum(s["refined"] for s in summaries) == len(data.originals)
    assert all(s["refined"] + s["refined_by_another_job"] == len(data.originals) for s in summaries)
    if delete:
        assert sum(s["deleted"] for s in summaries) >= len(data.originals)


@pytest.mark.slow
@pytest.mark.parametrize("delete", [False, True])
def test_four_jobs_on_one_batch_with_random_interleavings(server, ckpt, tmp_path, delete):
    data = make_data(server)
    lane = Interleaver(server)
    names = ["job1", "job2", "job3", "job4"]
    lane.random_delays(names, seed=11 + delete, max_delay=0.03)
    for name in names:  # every upload waits until all four jobs have listed the dataset
        lane.hold(name, "POST", CREATE, until=lambda: all(lane.count(n, "GET", LIST) >= 1 for n in names))
    runs = run_together(server, data, ckpt, tmp_path, names, delete=delete)
    assert not lane.timed_out
    assert all(r.returncode == 0 for r in runs.values()), {n: r.errors() for n, r in runs.items()}
    assert_converged(server, data, delete=delete)


def test_jobs_on_overlapping_but_different_batches(server, ckpt, tmp_path):
    """XY 1-2 and XY 2-3: both refine XY 2 (and the track from XY 1 to XY 2 has both ends
    replaced by different jobs); every original once, every connection once."""
    data = make_data(server, n_xy=3)
    data.links.append((data.by_xy[1][1], data.by_xy[2][1], "track"))
    server.add_connections([{"parentId": data.by_xy[1][1], "childId": data.by_xy[2][1],
                             "datasetId": data.dataset_id, "label": "track"}])
    lane = Interleaver(server)
    lane.random_delays(["a", "b"], seed=5, max_delay=0.03)
    for me, other in (("a", "b"), ("b", "a")):
        lane.hold(me, "POST", CREATE, until=lambda o=other: lane.count(o, "GET", LIST) >= 1)
    runs = run_together(server, data, ckpt, tmp_path, ["a", "b"], delete=True, batches={"a": "1-2", "b": "2-3"})
    assert not lane.timed_out
    assert all(r.returncode == 0 for r in runs.values()), {n: r.errors() for n, r in runs.items()}
    assert_converged(server, data, delete=True)


@pytest.mark.slow
@pytest.mark.parametrize("lands", ["before job2 uploads", "after job2 uploads"])
def test_a_job_started_while_another_is_mid_upload(server, ckpt, tmp_path, lands):
    """job2 starts while job1's upload is on its way (the server delays it 0.5 s before acting).
    If it lands before job2's own upload, job2 finds job1's refinements when it reads them again
    and uploads nothing; if after, both upload and the duplicates are removed."""
    data = make_data(server)
    server.fail("POST", CREATE, action="delay", delay=0.5, client="job1")
    first = start_job(server, data, "job1", ckpt, tmp_path, delete=True)
    lane = Interleaver(server)
    lane.hold("job2", "GET", LIST, until=lambda: lane.count("job1", "POST", CREATE) >= 1)
    if lands == "before job2 uploads":  # job2's re-reads (they filter by its output tags) wait for it
        lane.hold("job2", "POST", IDS, nth=None, when=lambda r: "tags" in r.body["filters"],
                  until=lambda: lane.answered("job1", "POST", CREATE) >= 1)
    else:
        lane.hold("job1", "POST", CREATE, until=lambda: lane.answered("job2", "POST", CREATE) >= 1)
    second = start_job(server, data, "job2", ckpt, tmp_path, delete=True)
    runs = {"job1": first.finish(), "job2": second.finish()}
    assert not lane.timed_out
    assert all(r.returncode == 0 for r in runs.values()), {n: r.errors() for n, r in runs.items()}
    assert_converged(server, data, delete=True)
    made_by_job2 = sum(len(r.body) for r in server.requests_to("POST", CREATE, "job2"))
    if lands == "before job2 uploads":
        assert made_by_job2 == 0  # job2 saw job1's refinements before uploading
        assert second.result()["refined_by_another_job"] == len(data.originals)
    else:
        assert made_by_job2 == len(data.originals)
        assert set(first.result()["refined_at_the_same_time_ids"]) | set(
            second.result()["refined_at_the_same_time_ids"]) == set(data.originals)


@pytest.mark.slow
@pytest.mark.parametrize("kill_step", ["after its upload", "after moving connections", "before deleting",
                                       "after deleting"])
def test_a_job_killed_while_another_runs_then_a_rerun(server, ckpt, tmp_path, kill_step):
    """job1 is SIGKILLed at a step of its convergence while job2 runs; a re-run after both
    leaves the dataset consistent (and nothing is lost in between)."""
    data = make_data(server)
    lane = Interleaver(server)
    first = start_job(server, data, "job1", ckpt, tmp_path, delete=True)

    def kill() -> None:
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(30)

    def dead() -> bool:
        return first.proc.poll() is not None

    # job2 must not finish job1's step for it first (under load job2 can overtake job1, and then
    # job1 has nothing to upload, copy or delete and is never killed): its own step waits.
    if kill_step == "after its upload":  # the request after its upload's answer
        lane.kill_when("job1", lambda r: lane.answered("job1", "POST", CREATE) >= 1, kill)
        lane.hold("job1", "POST", CREATE, until=lambda: lane.count("job2", "GET", LIST) >= 1)
        lane.hold("job2", "POST", CREATE, until=lambda: lane.answered("job1", "POST", CREATE) >= 1 or dead())
    elif kill_step == "after moving connections":  # the request after its first connection copies
        lane.kill_when("job1", lambda r: lane.answered("job1", "POST", LINKS) >= 1, kill)
        lane.hold("job1", "POST", LINKS, until=lambda: lane.count("job2", "GET", "annotation_connection") >= 1)
        lane.hold("job2", "POST", CREATE, until=lambda: lane.answered("job1", "POST", CREATE) >= 1 or dead())
        # job2 neither copies the originals' connections before job1 does, nor deletes anything
        job1_copied = lambda: lane.answered("job1", "POST", LINKS) >= 1 or dead()  # noqa: E731
        lane.hold("job2", "POST", LINKS, nth=None, until=job1_copied)
        lane.hold("job2", "DELETE", ".*", nth=None, until=job1_copied)
    elif kill_step == "before deleting":
        lane.kill_when("job1", lambda r: r.method == "DELETE" and r.path == CREATE, kill)
        lane.hold("job1", "POST", CREATE, until=lambda: lane.count("job2", "POST", CREATE) >= 1)
        lane.hold("job2", "DELETE", CREATE, nth=None, until=lambda: lane.count("job1", "DELETE", CREATE) >= 1 or dead())
    else:  # after its first deletion was answered, before it removes connections made meanwhile
        lane.kill_when("job1", lambda r: lane.answered("job1", "DELETE", CREATE) >= 1, kill)
        lane.hold("job1", "POST", CREATE, until=lambda: lane.count("job2", "POST", CREATE) >= 1)
        lane.hold("job2", "DELETE", CREATE, nth=None, until=lambda: lane.count("job1", "DELETE", CREATE) >= 1 or dead())
    second = start_job(server, data, "job2", ckpt, tmp_path, delete=True)
    lane.random_delays(["job2"], seed=3, max_delay=0.02)
    run2 = second.finish()
    first.finish()
    assert not lane.timed_out
    assert first.proc.returncode == -signal.SIGKILL
    assert run2.returncode == 0, run2.errors()
    assert_converged(server, data, delete=True, complete=False)
    server.before_acting = None
    rerun = start_job(server, data, "job3", ckpt, tmp_path, delete=True).finish()
    assert rerun.returncode == 0, rerun.errors()
    assert_converged(server, data, delete=True)


def job2_ids_smaller() -> Callable[[str | None], str]:
    """Annotation ids for the test server: every id job2 gets is smaller than any of job1's."""
    counters = {"job1": iter(range(1, 10**6)), "job2": iter(range(1, 10**6))}
    prefix = {"job1": "f", "job2": "0"}
    return lambda client: f"{prefix[str(client)]}{next(counters[str(client)]):023x}"


# -- hazards, forced --------------------------------------------------------------------------


def test_connections_moved_to_a_refinement_that_loses(ckpt, tmp_path):
    """job1 refines, moves the originals' connections onto its refinements and deletes the
    originals; only then does job2 (which listed before job1 uploaded) upload refinements with
    SMALLER ids (ids are not ordered by creation time). job2's wins; the connections end on it,
    once, and none on job1's removed duplicates."""
    with NimbusTestServer(token=TOKEN, ordered_ids=False, id_seed=7) as server:
        server.annotation_ids = job2_ids_smaller()
        data = make_data(server)
        lane = Interleaver(server)
        first = start_job(server, data, "job1", ckpt, tmp_path, delete=True)
        # job2's re-reads all come before job1's upload (job2's upload is sent, and held until job1 is done)
        lane.hold("job1", "POST", CREATE, until=lambda: lane.count("job2", "POST", CREATE) >= 1)
        lane.hold("job2", "POST", CREATE, until=lambda: first.proc.poll() is not None)
        second = start_job(server, data, "job2", ckpt, tmp_path, delete=True)
        run1, run2 = first.finish(), second.finish()
        assert not lane.timed_out
        assert (run1.returncode, run2.returncode) == (0, 0), (run1.errors(), run2.errors())
        assert_converged(server, data, delete=True)
        survivors = {ids[0] for ids in refinements(server, data.dataset_id).values()}
        assert all(s.startswith("0") for s in survivors)  # job2's (smaller) refinements stayed
        assert json.loads((tmp_path / "job2.json").read_text())["duplicates_removed"] == len(data.originals)


@pytest.mark.slow
@pytest.mark.parametrize("copies_land", ["before the duplicates go", "after the duplicates went"])
def test_a_survivor_that_loses_while_its_originals_are_being_replaced(ckpt, tmp_path, copies_land):
    """The race the re-check before deleting an original exists for. job1 sees only its own
    refinements, so it starts moving the originals' connections onto them; meanwhile job2's
    refinements, with smaller ids, appear, and job2 removes job1's as duplicates after listing
    their (not yet copied) connections. job1 must see job2's before deleting the originals, or
    the originals' connections are lost with them:

    job2 uploads -> job1 lists (only its own) -> job2 lists connections -> job1 copies the
    originals' connections onto its refinements -> job2 deletes job1's refinements -> job1
    checks again (and must not delete) -> ... -> job2 moves the originals' connections.

    When job1's copies land after its refinements were deleted, they point to nothing: job1
    must withdraw them (and must not make them again)."""
    with NimbusTestServer(token=TOKEN, ordered_ids=False, id_seed=3) as server:
        server.annotation_ids = job2_ids_smaller()
        data = make_data(server)
        lane = Interleaver(server)
        def after(client: str, method: str, path: str) -> Callable[[RecordedRequest], bool]:
            """Requests made after ``client``'s first such request was answered."""
            def test(record: RecordedRequest) -> bool:
                earlier = server.requests[:server.requests.index(record)]
                return any(r.client == client and r.method == method and r.path == path and r.done_at
                           for r in earlier)
            return test

        def answered(client: str, method: str, path: str, when: Callable[[RecordedRequest], bool]) -> bool:
            return any(r.done_at and when(r) for r in server.requests_to(method, path, client))

        own_listing = after("job1", "POST", CREATE)  # job1's listings after its upload (not re-reads)
        checking = after("job1", "POST", LINKS)      # ... and after it copied connections
        # job2's upload is sent (its re-reads saw nothing), then job1's lands, job1 lists (its own
        # only), then job2's lands
        lane.hold("job1", "POST", CREATE, until=lambda: lane.count("job2", "POST", CREATE) >= 1)
        lane.hold("job2", "POST", CREATE, until=lambda: answered("job1", "GET", LIST, own_listing))
        if copies_land == "before the duplicates go":
            lane.hold("job1", "POST", LINKS,
                      until=lambda: lane.answered("job2", "GET", "annotation_connection") >= 1)
            lane.hold("job2", "DELETE", CREATE, until=lambda: lane.answered("job1", "POST", LINKS) >= 1)
        else:
            lane.hold("job1", "POST", LINKS, until=lambda: lane.answered("job2", "DELETE", CREATE) >= 1)
        lane.hold("job1", "GET", LIST, when=checking, until=lambda: lane.answered("job2", "DELETE", CREATE) >= 1)
        first = start_job(server, data, "job1", ckpt, tmp_path, delete=True)
        second = start_job(server, data, "job2", ckpt, tmp_path, delete=True)
        lane.hold("job2", "GET", "annotation_connection", nth=2, until=lambda: first.proc.poll() is not None)
        run1, run2 = first.finish(), second.finish()
        assert not lane.timed_out
        assert (run1.returncode, run2.returncode) == (0, 0), (run1.errors(), run2.errors())
        assert_converged(server, data, delete=True)
        assert all(ids[0].startswith("0") for ids in refinements(server, data.dataset_id).values())
        if copies_land == "after the duplicates went":
            # NimbusImage refuses the whole batch (its targets are gone: 400); job1 read again and
            # had nothing left to send, and did not fail.
            assert [r.status for r in server.requests_to("POST", LINKS, "job1")][0] == 400


def test_a_connection_whose_other_end_another_job_replaces_meanwhile(server, ckpt, tmp_path):
    """A track from XY 1 to XY 2, each end replaced by a different job (disjoint batches).
    job a lists the track while its child still exists, job b then replaces and deletes the
    child, and only then does job a's copy land: it points to the deleted child and must be
    withdrawn; the track ends once between the two refinements."""
    data = make_data(server)  # the track: XY 1's first nucleus -> XY 2's first nucleus
    lane = Interleaver(server)
    # a has read the track, checked its ends and sent its copies (the child still existed) before
    # b removes the child's connections and deletes it
    lane.hold("b", "DELETE", ".*", nth=None, until=lambda: lane.count("a", "POST", LINKS) >= 1)
    lane.hold("a", "POST", LINKS, until=lambda: lane.answered("b", "DELETE", CREATE) >= 1)
    runs = run_together(server, data, ckpt, tmp_path, ["a", "b"], delete=True, batches={"a": "1", "b": "2"})
    assert not lane.timed_out
    assert all(r.returncode == 0 for r in runs.values()), {n: r.errors() for n, r in runs.items()}
    assert_converged(server, data, delete=True)
    # The batch holding the track's copy was refused whole (its child was gone: 400); job a read
    # the ends again and sent the other copies without it.
    posts = server.requests_to("POST", LINKS, "a")
    assert [r.status for r in posts[:2]] == [400, 200]
    assert len(posts[1].body) == len(posts[0].body) - 1
    assert not any(data.by_xy[1][0] in (c["parentId"], c["childId"]) for c in posts[1].body)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_unordered_ids_two_jobs_forced_to_overlap(ckpt, tmp_path, seed):
    """Ids drawn at random (several server processes): which job's refinement is smaller is
    chance; the result is the same."""
    with NimbusTestServer(token=TOKEN, ordered_ids=False, id_seed=seed) as server:
        data = make_data(server, seed=seed)
        lane = Interleaver(server)
        lane.random_delays(["job1", "job2"], seed=seed, max_delay=0.02)
        for me, other in (("job1", "job2"), ("job2", "job1")):
            lane.hold(me, "POST", CREATE, until=lambda o=other: lane.count(o, "POST", CREATE) >= 1)
        runs = run_together(server, data, ckpt, tmp_path, ["job1", "job2"], delete=bool(seed % 2))
        assert not lane.timed_out
        assert all(r.returncode == 0 for r in runs.values()), {n: r.errors() for n, r in runs.items()}
        assert_converged(server, data, delete=bool(seed % 2))


# -- many repetitions, in-process ---------------------------------------------------------------


def force_plan(monkeypatch, queries: bool) -> None:
    """Every job in this process reads its batch by location queries (list/ids + hydrate), or by
    one listing of the dataset, whatever read_plan's cost model would choose."""
    from sam2_refine.job import batch_reads
    from sam2_refine.job.read_plan import AnnotationReadPlan

    def plan(batch, sizes, count, costs):
        if not queries:
            return AnnotationReadPlan(None, 0.0)
        return AnnotationReadPlan(tuple({"XY": xy, "Z": z, "Time": t}
                                        for xy in batch[0] for z in batch[1] for t in batch[2]), 0.0)

    monkeypatch.setattr(batch_reads, "plan_annotation_reads", plan)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(12))
def test_random_interleavings_of_three_jobs(ckpt, seed, monkeypatch):
    """Three jobs (delete on for some, overlapping batches for some), every request delayed by a
    seeded random time, ids unordered for half the seeds, the batch read by location queries for
    half of them and by one listing for the others: always consistent."""
    force_plan(monkeypatch, queries=seed >= 6)
    rng = np.random.default_rng(seed)
    with NimbusTestServer(token=TOKEN, ordered_ids=bool(seed % 2), id_seed=seed) as server:
        data = make_data(server, n_xy=3, count=3, seed=seed)
        lane = Interleaver(server)
        names = ["j1", "j2", "j3"]
        lane.random_delays(names, seed=seed, max_delay=0.01)
        delete = bool(rng.integers(2))
        batches = {"j1": "all", "j2": ["all", "1-2", "2-3"][int(rng.integers(3))], "j3": "all"}
        outcome: dict[str, Any] = {}
        threads = [run_in_thread(server, data, n, ckpt, delete=delete, batch_xy=batches[n], outcome=outcome)
                   for n in names]
        for t in threads:
            t.join(120)
        assert all(outcome[n]["code"] == 0 for n in names), outcome
        assert_converged(server, data, delete=delete)


def _requests_of_a_lone_job(ckpt, delete: bool) -> int:
    with NimbusTestServer(token=TOKEN) as server:
        data = make_data(server)
        outcome: dict[str, Any] = {}
        run_in_thread(server, data, "solo", ckpt, delete=delete, outcome=outcome).join(60)
        assert outcome["solo"]["code"] == 0
        return outcome["solo"]["sent"]


@pytest.mark.slow
@pytest.mark.parametrize("delete,queries", [(False, False), (True, False), (True, True)],
                         ids=["delete off", "delete on", "delete on, location queries"])
def test_a_job_killed_between_any_two_requests(ckpt, delete, queries, monkeypatch):
    """For every n: job1 dies just before its n-th request while job2 runs alongside (random
    delays); then a re-run. In between nothing is lost and nothing is refined twice...
    after the re-run the dataset is complete and consistent."""
    force_plan(monkeypatch, queries)
    total = _requests_of_a_lone_job(ckpt, delete)
    assert total > 10
    for n in range(1, total + 1):
        with NimbusTestServer(token=TOKEN) as server:
            data = make_data(server)
            lane = Interleaver(server)
            lane.random_delays(["job2"], seed=n, max_delay=0.01)
            outcome: dict[str, Any] = {}
            threads = [run_in_thread(server, data, "job1", ckpt, delete=delete, kill_at=n, outcome=outcome),
                       run_in_thread(server, data, "job2", ckpt, delete=delete, outcome=outcome)]
            for t in threads:
                t.join(120)
            # job1 makes about ``total`` requests; fewer when it finds job2's work done
            assert outcome["job1"]["code"] == "killed" or (outcome["job1"]["code"] == 0
                                                          and outcome["job1"]["sent"] < n), (n, outcome["job1"])
            assert outcome["job2"]["code"] == 0, (n, outcome["job2"]["lines"][-3:])
            assert_converged(server, data, delete=delete, complete=False)
            server.before_acting = None
            run_in_thread(server, data, "rerun", ckpt, delete=delete, outcome=outcome).join(120)
            assert outcome["rerun"]["code"] == 0, (n, outcome["rerun"]["lines"][-3:])
            assert_converged(server, data, delete=delete)


# -- scale-out: a dataset split by Batch XY over several jobs -------------------------------------


def outcome_of(server: NimbusTestServer, data: Data) -> dict[str, Any]:
    """What the jobs left, in terms that do not depend on which job made what: each original's
    refined outline (exact coordinates), which originals remain, and the connections with each
    refinement named by its original."""
    docs = server.annotations(data.dataset_id)
    made = {original_of(d): d for d in docs if original_of(d)}
    name = {d["_id"]: f"refinement of {o}" for o, d in made.items()}
    return {
        "outlines": {o: [(p["x"], p["y"]) for p in d["coordinates"]] for o, d in made.items()},
        "refinements": len(made),
        "originals left": sorted(d["_id"] for d in docs if d["_id"] in set(data.originals)),
        "connections": Counter((name.get(c["parentId"], c["parentId"]), name.get(c["childId"], c["childId"]),
                                c.get("label", "")) for c in server.connections()),
    }


@pytest.mark.slow
@pytest.mark.parametrize("delete", [False, True])
def test_quarter_batches_and_a_shared_batch_give_what_one_job_gives(ckpt, tmp_path, delete):
    """docs/deployment.md's scale-out: 4 jobs on disjoint quarter batches (XY 1, 2, 3, 4) at once
    make exactly what one job makes over all of it (same outlines, counts, connections); 4 jobs
    at once on the same full batch converge to that too."""
    results = {}
    for scenario, batches in [("one job", {"solo": "all"}),
                              ("quarters", {f"q{k}": str(k) for k in range(1, 5)}),
                              ("four on all", {f"a{k}": "all" for k in range(1, 5)})]:
        with NimbusTestServer(token=TOKEN) as server:
            data = make_data(server, n_xy=4, count=3)
            lane = Interleaver(server)
            lane.random_delays(list(batches), seed=len(scenario), max_delay=0.01)
            folder = tmp_path / scenario.replace(" ", "-")
            folder.mkdir()
            runs = run_together(server, data, ckpt, folder, list(batches), delete=delete, batches=batches)
            assert all(r.returncode == 0 for r in runs.values()), {n: r.errors() for n, r in runs.items()}
            assert_converged(server, data, delete=delete)
            results[scenario] = outcome_of(server, data)
    assert results["quarters"] == results["one job"]
    assert results["four on all"] == results["one job"]
    assert results["one job"]["refinements"] == 12


def test_a_server_paging_by_offset_is_reported(server, ckpt, monkeypatch):
    """Convergence rests on listings that show whatever existed throughout them (the afterId
    cursor); a server that pages by offset is named in a warning (here: pages of 2 annotations)."""
    from sam2_refine.nimbus.client import NimbusClient as Client

    server.cursor_paging = False
    data = make_data(server, n_xy=1, count=3)
    pages = Client.iter_annotation_pages
    monkeypatch.setattr(Client, "iter_annotation_pages",
                        lambda self, d, shape, tags=None, page_size=0: pages(self, d, shape, tags, 2))
    outcome: dict[str, Any] = {}
    run_in_thread(server, data, "solo", ckpt, delete=True, outcome=outcome).join(60)
    assert outcome["solo"]["code"] == 0
    warned = [m for m in outcome["solo"]["lines"] if m.get("title") == "Server pages by offset"]
    assert warned and "afterId" in warned[0]["warning"]
    assert_converged(server, data, delete=True)


# -- connections as NimbusImage treats them --------------------------------------------------------


def test_a_rerun_removes_connections_a_worker_left_on_deleted_originals(server, ckpt, tmp_path, monkeypatch):
    """A worker that trusted the server's bulk delete to remove the originals' connections (this
    one before, or one stopped between deleting and removing them) left them pointing at deleted
    originals; the next run over the batch removes them, and only them."""
    from sam2_refine.job import converge

    data = make_data(server)
    with monkeypatch.context() as patch:
        patch.setattr(converge, "remove_connections_of", lambda *a, **k: 0)
        outcome: dict[str, Any] = {}
        run_in_thread(server, data, "old", ckpt, delete=True, outcome=outcome).join(120)
    assert outcome["old"]["code"] == 0, outcome["old"]["lines"]
    present = {d["_id"] for d in server.annotations(data.dataset_id)}
    left = [c for c in server.connections() if c["parentId"] not in present or c["childId"] not in present]
    assert len(left) == len(data.links)  # every seeded connection still names a deleted original
    outcome = {}
    run_in_thread(server, data, "again", ckpt, delete=True, outcome=outcome).join(120)
    assert outcome["again"]["code"] == 0, outcome["again"]["lines"]
    assert_converged(server, data, delete=True)
    assert server.requests_to("POST", CREATE, "again") == []  # nothing refined twice

