"""Frames ahead (sam2_refine.job.prefetch): depth by a byte budget, several locations in flight,
order, each location taken once, failures per location, one HTTP session per thread.

The unit tests drive :class:`FramePrefetcher` with a fake client and fetch function; the job
tests run ``job.run_compute`` over real HTTP against the local server, with its delay fault
standing in for a slow tile server and :class:`ZeroCostPredictor` for a GPU's model. The
property "wall time near max(I/O, compute), not their sum" is held with sleeps (I/O and
simulated model time both sleep), so it does not depend on this machine's speed.
"""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest

from conftest import TOKEN
from sam2_refine.job import compute as job
from sam2_refine.job import prefetch
from sam2_refine.nimbus.errors import NimbusAPIError
from sam2_refine.nimbus.client import NimbusClient
from sam2_refine.nimbus.retry import RetryPolicy
from sam2_refine.job.prefetch import FramePrefetcher, PrefetchPolicy, location_bytes, parse_bytes
from sam2_refine.nimbus.progress import Reporter
from sam2_refine.annotations import Location
from sam2_refine.job.settings import parse_settings
from sam2_refine.testing.datasets import annotation_doc, cell_scene, rough_polygon
from sam2_refine.testing.stand_in import ZeroCostPredictor

LOCATIONS = [Location(xy, 0, 0) for xy in range(8)]


# -- the policy ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [("0", 0), ("1073741824", 1 << 30), ("512M", 512 << 20),
                                            ("2G", 2 << 30), ("1.5g", 3 << 29), ("64KiB", 64 << 10),
                                            (" 8 MB ", 8 << 20)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "-1", "lots", "1T", "1e9", "G"])
def test_parse_bytes_refuses(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_policy_from_environment():
    default = PrefetchPolicy.from_env({})
    assert default == PrefetchPolicy(prefetch.DEFAULT_BUDGET_BYTES, prefetch.DEFAULT_CONNECTIONS)
    assert default.budget_bytes == 1 << 30 and default.connections == 4
    set_ = PrefetchPolicy.from_env({prefetch.BUDGET_ENV: "256M", prefetch.CONNECTIONS_ENV: "2"})
    assert set_ == PrefetchPolicy(256 << 20, 2)
    assert PrefetchPolicy.from_env({prefetch.BUDGET_ENV: "0"}).budget_bytes == 0


@pytest.mark.parametrize("env", [{prefetch.BUDGET_ENV: "much"}, {prefetch.CONNECTIONS_ENV: "0"},
                                 {prefetch.CONNECTIONS_ENV: "17"}, {prefetch.CONNECTIONS_ENV: "two"}])
def test_malformed_policy_values_fall_back_to_the_defaults(env, caplog):
    assert PrefetchPolicy.from_env(env) == PrefetchPolicy()
    assert "ignoring SAM2_REFINE_PREFETCH" in caplog.text


def test_location_bytes_follow_the_metadata_dtype():
    from sam2_refine.engine.imaging import Layer
    from sam2_refine.nimbus.dataset import DatasetInfo

    frames = np.zeros((3, 1, 1, 1), dtype=np.int64)
    layers = [Layer(c, (1.0, 1.0, 1.0), "percentile", 0, 100) for c in (0, 2, 2)]  # channels 0 and 2
    info = DatasetInfo("d", "i", width=300, height=200, dtype="uint16", frames=frames)
    assert location_bytes(info, layers) == 2 * 300 * 200 * 2
    unknown = DatasetInfo("d", "i", width=300, height=200, dtype=None, frames=frames)
    assert location_bytes(unknown, layers) == 2 * 300 * 200 * prefetch.UNKNOWN_DTYPE_BYTES


# -- the prefetcher with a fake client --------------------------------------------------------

class FakeClient:
    """Stands in for NimbusClient: records clones, the threads that use each, and closing."""

    def __init__(self, root: FakeClient | None = None) -> None:
        self.root = root or self
        self.clones: list[FakeClient] = []
        self.threads: set[int] = set()
        self.closed = False

    def clone(self) -> FakeClient:
        twin = FakeClient(self.root)
        self.root.clones.append(twin)
        return twin

    def close(self) -> None:
        self.closed = True


class Fetcher:
    """A fetch function: sleeps ``seconds``, counts fetches in flight, fails where told."""

    def __init__(self, seconds: float = 0.0, fail: tuple[Location, ...] = ()) -> None:
        self.seconds, self.fail = seconds, fail
        self.lock = threading.Lock()
        self.calls: list[Location] = []
        self.running = self.peak = 0

    def __call__(self, client: FakeClient, location: Location) -> str:
        client.threads.add(threading.get_ident())
        with self.lock:
            self.calls.append(location)
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            time.sleep(self.seconds)
            if location in self.fail:
                raise NimbusAPIError("GET", "item/x/tiles/region", 500, f"no frame at {location.describe()}")
            return f"frames of {location.describe()}"
        finally:
            with self.lock:
                self.running -= 1


def test_one_location_ahead_when_each_exceeds_the_budget():
    fetch = Fetcher()
    with FramePrefetcher(FakeClient(), LOCATIONS, fetch, nbytes=1000, policy=PrefetchPolicy(250, 4)) as frames:
        frames.start()
        assert frames.requested == LOCATIONS[:1]
        for k, location in enumerate(LOCATIONS):
            assert frames.take(location) == f"frames of {location.describe()}"
            assert frames.requested == LOCATIONS[:k + 2]  # the next one travels meanwhile
            assert frames.bytes_ahead <= 1000
        assert frames.peak_bytes_ahead == 1000
    assert fetch.calls == LOCATIONS


def test_depth_follows_the_byte_budget():
    fetch = Fetcher()
    with FramePrefetcher(FakeClient(), LOCATIONS, fetch, nbytes=100, policy=PrefetchPolicy(350, 4)) as frames:
        frames.start()
        assert frames.requested == LOCATIONS[:3]  # 300 bytes fit, 400 would not
        frames.take(LOCATIONS[0])
        assert frames.requested == LOCATIONS[:4]  # three ahead again while the first is refined
        for location in LOCATIONS[1:]:
            frames.take(location)
            assert frames.bytes_ahead <= 350
        assert frames.peak_bytes_ahead == 300
    assert sorted(fetch.calls, key=LOCATIONS.index) == LOCATIONS and len(fetch.calls) == len(LOCATIONS)


def test_several_locations_in_flight_over_their_own_clients():
    client = FakeClient()
    fetch = Fetcher(seconds=0.25)
    started = time.monotonic()
    with FramePrefetcher(client, LOCATIONS, fetch, nbytes=100, policy=PrefetchPolicy(1 << 20, 4)) as frames:
        frames.start()
        results = [frames.take(location) for location in LOCATIONS]
        assert frames.peak_in_flight == 4 and fetch.peak == 4
    elapsed = time.monotonic() - started
    assert results == [f"frames of {loc.describe()}" for loc in LOCATIONS]
    assert elapsed < 1.5  # 8 fetches of 0.25 s, 4 at a time: 0.5 s (serially: 2 s)
    # one client per worker thread, used by that thread only, all closed; the job's own is not
    assert 1 <= len(client.clones) <= 4 and not client.closed
    assert all(c.closed and len(c.threads) == 1 for c in client.clones)
    assert len({t for c in client.clones for t in c.threads}) == len(client.clones)


def test_one_connection_fetches_one_location_at_a_time():
    fetch = Fetcher(seconds=0.05)
    with FramePrefetcher(FakeClient(), LOCATIONS, fetch, nbytes=100, policy=PrefetchPolicy(1 << 20, 1)) as frames:
        frames.start()
        for location in LOCATIONS:
            frames.take(location)
        assert frames.peak_in_flight == 1
    assert fetch.calls == LOCATIONS  # in order


def test_a_failed_fetch_is_raised_for_its_location_only():
    fetch = Fetcher(fail=(LOCATIONS[2],))
    with FramePrefetcher(FakeClient(), LOCATIONS[:5], fetch, nbytes=100, policy=PrefetchPolicy(1000, 3)) as frames:
        frames.start()
        assert frames.take(LOCATIONS[0]) and frames.take(LOCATIONS[1])
        with pytest.raises(NimbusAPIError, match="XY 3"):
            frames.take(LOCATIONS[2])
        assert frames.take(LOCATIONS[3]) == f"frames of {LOCATIONS[3].describe()}"
        assert frames.take(LOCATIONS[4])
    assert len(fetch.calls) == 5


def test_each_location_is_taken_once_and_skipped_ones_are_dropped():
    fetch = Fetcher()
    with FramePrefetcher(FakeClient(), LOCATIONS, fetch, nbytes=100, policy=PrefetchPolicy(0, 2)) as frames:
        frames.take(LOCATIONS[0])
        with pytest.raises(KeyError):
            frames.take(LOCATIONS[0])  # taken already: never fetched twice
        frames.take(LOCATIONS[3])  # 1 and 2 skipped
        with pytest.raises(KeyError):
            frames.take(LOCATIONS[1])
        with pytest.raises(KeyError):
            frames.take(Location(99, 0, 0))
        assert frames.bytes_ahead == 100  # only location 4 is ahead
    assert LOCATIONS[2] not in fetch.calls and fetch.calls.count(LOCATIONS[0]) == 1


def test_closing_waits_for_running_fetches_and_cancels_the_rest():
    client = FakeClient()
    fetch = Fetcher(seconds=0.5)
    frames = FramePrefetcher(client, LOCATIONS, fetch, nbytes=1, policy=PrefetchPolicy(1 << 20, 2))
    frames.start()
    time.sleep(0.05)
    frames.close()
    assert fetch.running == 0 and len(fetch.calls) == 2  # the two running finished, six never ran
    assert all(c.closed for c in client.clones)


# -- through the job, over HTTP ---------------------------------------------------------------

H, W = 96, 128


def dataset(server, n_xy: int, count: int = 3):
    scene = cell_scene(H, W, count, radius=(8.0, 12.0), seed=3)
    pixels = np.broadcast_to(scene.channels, (n_xy, 1, 1) + scene.channels.shape).copy()
    ds = server.add_dataset(pixels, layers=[{"channel": 0, "color": "#ffffff", "visible": True,
                                            "contrast": {"mode": "percentile", "blackPoint": 0.5,
                                                         "whitePoint": 99.5}}])
    rng = np.random.default_rng(0)
    for xy in range(n_xy):
        server.add_annotations(ds.dataset_id, [annotation_doc(rough_polygon(scene.labels == k, "jittered", rng),
                                                              xy=xy, tags=["cell"])
                                               for k in range(1, count + 1)])
    return ds, scene, pixels[0, 0, 0, 0].nbytes  # bytes of one location's frames (the one channel shown)


def run_job(server, ds, ckpt, predictor):
    values = {"Model": "sam2.1_hiera_tiny.pt", "Batch XY": "all", "Batch Time": "all", "Batch Z": "all",
              "Resolution": "Whole frame"}
    settings = parse_settings({"workerInterface": values, "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 0,
                               "tags": ["refined"]}, ds.dataset_id, ckpt)
    reporter = Reporter(stream=io.StringIO(), secrets=(TOKEN,))
    with NimbusClient(server.api_url, TOKEN, retry=RetryPolicy(total=1, backoff_factor=0.01)) as client:
        code = job.run_compute(settings, client, reporter, lambda path: (predictor, False))
    return code, reporter


class RegionsInFlight:
    """Wraps the server's handler: most frame requests being answered at the same time."""

    def __init__(self, server) -> None:
        self.lock = threading.Lock()
        self.running = self.peak = 0
        self._handle = server.handle
        server.handle = self

    def __call__(self, method, path, params, body, token):
        if not path.endswith("tiles/region"):
            return self._handle(method, path, params, body, token)
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            return self._handle(method, path, params, body, token)
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture
def prefetchers(monkeypatch):
    """Every FramePrefetcher the job makes, kept for its statistics."""
    made: list[FramePrefetcher] = []

    class Kept(FramePrefetcher):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(job, "FramePrefetcher", Kept)
    return made


def test_zero_cost_stand_in_gives_masks_the_job_accepts(server, ckpt):
    ds, scene, _ = dataset(server, n_xy=2, count=5)
    predictor = ZeroCostPredictor()
    code, _ = run_job(server, ds, ckpt, predictor)
    assert code == 0 and predictor.prompts == 10
    assert len([a for a in server.annotations(ds.dataset_id) if a["tags"] == ["refined"]]) == 10


@pytest.mark.slow
@pytest.mark.parametrize("budget_locations, connections, expected_peak", [(0, 4, 2), (2.5, 4, 3), (20, 4, 4),
                                                                          (20, 2, 2)])
def test_the_job_keeps_frames_in_flight_within_budget_and_connections(server, ckpt, monkeypatch, prefetchers,
                                                                      budget_locations, connections,
                                                                      expected_peak):
    """8 locations, each frame request answered after 0.3 s. The most frame requests in flight
    at the server: the location taken plus those ahead within the budget, at most
    ``connections``; every frame requested exactly once; bytes ahead within the budget."""
    ds, _, one = dataset(server, n_xy=8)
    budget = int(budget_locations * one)
    monkeypatch.setenv(prefetch.BUDGET_ENV, str(budget))
    monkeypatch.setenv(prefetch.CONNECTIONS_ENV, str(connections))
    server.fail("GET", r"item/\w+/tiles/region", action="delay", delay=0.3)
    in_flight = RegionsInFlight(server)
    code, _ = run_job(server, ds, ckpt, ZeroCostPredictor())
    assert code == 0
    frames = [r.params["frame"] for r in server.requests_to("GET", r"item/\w+/tiles/region")]
    assert sorted(frames) == sorted({str(ds.frame_of[(xy, 0, 0, 0)]) for xy in range(8)})  # once each
    assert in_flight.peak == expected_peak
    (used,) = prefetchers
    assert used.peak_bytes_ahead <= max(budget, one) and used.peak_in_flight == expected_peak


def test_a_frame_that_fails_keeps_only_its_location(server, ckpt, monkeypatch):
    """With several locations in flight, a failed frame is reported for its location, as before."""
    ds, _, _ = dataset(server, n_xy=5)
    monkeypatch.setenv(prefetch.CONNECTIONS_ENV, "4")
    server.fail("GET", r"item/\w+/tiles/region", action="delay", delay=0.1)
    original = server.handle
    bad = str(ds.frame_of[(2, 0, 0, 0)])

    def failing(method, path, params, body, token):
        if path.endswith("tiles/region") and params.get("frame") == bad:
            return 500, b'{"message": "tile source error"}', "application/json", {}
        return original(method, path, params, body, token)

    server.handle = failing
    code, reporter = run_job(server, ds, ckpt, ZeroCostPredictor())
    assert code == 1
    refined = {a["location"]["XY"] for a in server.annotations(ds.dataset_id) if a["tags"] == ["refined"]}
    assert refined == {0, 1, 3, 4}
    kept = [line for line in reporter.lines if line.get("title") == "Annotations kept"]
    assert any("XY 3:" in line["info"] and "its image could not be read" in line["info"] for line in kept)
    error = [line for line in reporter.lines if "error" in line][-1]
    assert "1 location(s) could not be processed" in error["error"] and "XY 3" in error["info"]
    assert "tiles/region" in error["info"]


@pytest.mark.slow
@pytest.mark.parametrize("policy, fast", [("0:1", False), ("1G:4", True)])
def test_wall_time_approaches_max_of_io_and_compute(server, ckpt, monkeypatch, policy, fast):
    """8 locations, one frame each answered after 0.2 s (I/O: 1.6 s one after another); the
    model (a stand-in that sleeps, as a busy GPU lets the CPU be) takes 1.2 s on the first
    location and nothing on the others (compute: 1.2 s). Frames one location ahead over one
    connection (what the worker did before) take about the sum less one location's overlap
    (~2.6 s); the default budget and connections come near the larger of the two."""
    ds, _, _ = dataset(server, n_xy=8, count=2)
    budget, connections = policy.split(":")
    monkeypatch.setenv(prefetch.BUDGET_ENV, budget)
    monkeypatch.setenv(prefetch.CONNECTIONS_ENV, connections)
    server.fail("GET", r"item/\w+/tiles/region", action="delay", delay=0.2)
    io_s, compute_s = 8 * 0.2, 1.2
    started = time.monotonic()
    code, _ = run_job(server, ds, ckpt, ZeroCostPredictor(embed_seconds=[1.2] + [0.0] * 7))
    wall = time.monotonic() - started
    assert code == 0
    print(f"\nprefetch {policy}: wall {wall:.2f} s; I/O {io_s:.1f} s, compute {compute_s:.1f} s")
    if fast:
        assert wall < max(io_s, compute_s) + 0.4
    else:  # the test can tell: the old depth does not get there
        assert wall > max(io_s, compute_s) + 0.6
