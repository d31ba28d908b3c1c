"""Issue 23, item 2: a progress bar that moves.

- the reporter with an injected clock: minor lines (steps within a location) at most every
  ``min_gap`` seconds, the latest one winning; the heartbeat writes the current line again, with
  the seconds its step has taken, when no progress line came for a while; nothing after 1.0;
- the heartbeat's thread, for real;
- a job whose engine steps advance an injected clock (decoding 1 s a chunk, tracing, a 5 s
  embedding during which the heartbeat looks every 0.25 s): never more than 2 s of work
  without a line, and the bar never goes backwards;
- the model loading told step by step (importing PyTorch, importing SAM2, ...), torch kept out
  of the interface request;
- a recorded job's stdout, through the real ``entrypoint.py`` and SAM2: never backwards.
"""

from __future__ import annotations

import io
import json
import threading
from typing import Any

import numpy as np
import pytest

from conftest import TOKEN, run_worker
from sam2_refine import cli
from sam2_refine.job import compute as job
from sam2_refine.nimbus.client import NimbusClient
from sam2_refine.nimbus.retry import RetryPolicy
from sam2_refine.nimbus.progress import Heartbeat, Reporter
from sam2_refine.job.settings import parse_settings
from sam2_refine.testing.datasets import annotation_doc, cell_scene, rough_polygon
from sam2_refine.testing.stand_in import KnownMaskPredictor


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class StampedStream(io.StringIO):
    """Remembers the clock's time of every line written."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.stamps: list[tuple[float, dict[str, Any]]] = []

    def write(self, text: str) -> int:
        for line in text.splitlines():
            self.stamps.append((self.clock(), json.loads(line)))
        return super().write(text)


def progress_lines(reporter: Reporter) -> list[dict[str, Any]]:
    return [line for line in reporter.lines if "progress" in line]


# -- the reporter and the heartbeat ---------------------------------------------------------------


def test_minor_lines_are_held_back_and_the_latest_one_wins():
    clock = FakeClock()
    reporter = Reporter(stream=io.StringIO(), clock=clock, min_gap=0.5)
    reporter.progress(0.1, "Refining", "Location 1/1")
    clock.now += 0.1
    reporter.progress(0.2, "Refining", "8/40 objects decoded", minor=True)   # held back
    clock.now += 0.1
    reporter.progress(0.3, "Refining", "16/40 objects decoded", minor=True)  # held back, the latest
    assert [p["progress"] for p in progress_lines(reporter)] == [0.1]
    assert reporter.beat(quiet=1.5) is False  # 0.2 s after the last line: not yet
    clock.now += 0.4
    assert reporter.beat(quiet=1.5) is True  # min_gap passed: the held line, as it is
    assert progress_lines(reporter)[-1] == {"progress": 0.3, "title": "Refining", "info": "16/40 objects decoded"}
    clock.now += 0.6
    reporter.progress(0.4, "Refining", "24/40 objects decoded", minor=True)  # min_gap passed: written
    assert progress_lines(reporter)[-1]["progress"] == 0.4


def test_the_heartbeat_repeats_a_long_step_with_its_seconds_and_stops_at_the_end():
    clock = FakeClock()
    reporter = Reporter(stream=io.StringIO(), clock=clock)
    assert reporter.beat(quiet=1.5) is False  # nothing to repeat yet
    reporter.progress(0.08, "Loading model", "tiny: importing PyTorch")
    clock.now += 1.4
    assert reporter.beat(quiet=1.5) is False
    clock.now += 0.2
    assert reporter.beat(quiet=1.5) is True
    assert progress_lines(reporter)[-1] == {"progress": 0.08, "title": "Loading model",
                                            "info": "tiny: importing PyTorch (2 s)"}
    clock.now += 1.6
    reporter.beat(quiet=1.5)
    assert progress_lines(reporter)[-1]["info"] == "tiny: importing PyTorch (3 s)"  # since the step began
    reporter.progress(1.0, "Complete", "Refined 3 of 3")
    clock.now += 10
    assert reporter.beat(quiet=1.5) is False  # the bar is full: no line after the last


def test_a_long_step_moves_the_bar_towards_the_next_one_without_reaching_it():
    clock = FakeClock()
    reporter = Reporter(stream=io.StringIO(), clock=clock)
    reporter.progress(0.1, "Refining", "Location 1/2: computing the image embedding", until=0.2)
    seen = []
    for _ in range(40):  # 40 s of embedding, the heartbeat looking every 0.25 s
        for _ in range(4):
            clock.now += 0.25
            reporter.beat(quiet=1.5)
        seen.append(progress_lines(reporter)[-1]["progress"])
    assert seen == sorted(seen) and seen[-1] < 0.2
    assert abs(progress_lines(reporter)[1]["progress"] - (0.1 + 0.1 * (1 - 0.5 ** (1.5 / 5)))) < 1e-4
    assert seen[19] >= 0.1 + 0.1 * 0.9  # 20 s: more than 90 % of the way (half of it every 5 s)
    reporter.progress(0.2, "Refining", "Location 1/2: 8/40 objects decoded", minor=True)
    assert progress_lines(reporter)[-1]["progress"] == 0.2  # the next step: on from there


def test_the_heartbeat_thread_writes_while_the_job_is_busy():
    reporter = Reporter(stream=io.StringIO())
    written = threading.Event()
    original = reporter._emit

    def emit(obj):
        original(obj)
        if "(" in obj.get("info", ""):
            written.set()

    reporter._emit = emit
    reporter.progress(0.5, "Refining", "computing the image embedding")
    with Heartbeat(reporter, quiet=0.2, poll=0.05):
        assert written.wait(timeout=30)  # the main thread is busy (waits here); the heartbeat speaks
    assert progress_lines(reporter)[-1]["info"].startswith("computing the image embedding (")


# -- a job's progress within a location -----------------------------------------------------------------


class TimedPredictor(KnownMaskPredictor):
    """Known masks; each call advances the clock as the work would take: embedding ``embed_s``
    seconds (with the heartbeat looking every 0.25 s meanwhile, as its thread does), each
    decode ``decode_s``."""

    def __init__(self, clock: FakeClock, reporter: Reporter, embed_s: float, decode_s: float, **kw):
        super().__init__(**kw)
        self.clock, self.reporter, self.embed_s, self.decode_s = clock, reporter, embed_s, decode_s

    def embed(self, image):
        for _ in range(int(self.embed_s / 0.25)):
            self.clock.now += 0.25
            self.reporter.beat(quiet=1.5)
        super().embed(image)

    def decode(self, *args, **kw):
        self.clock.now += self.decode_s
        return super().decode(*args, **kw)


H, W = 160, 224


def test_a_location_moves_the_bar_as_objects_are_decoded_and_traced(server, ckpt):
    scene = cell_scene(H, W, 12, radius=(8.0, 12.0), seed=3)
    ds = server.add_dataset(np.broadcast_to(scene.channels, (2, 1, 1) + scene.channels.shape).copy(), layers=[
        {"channel": 0, "color": "#ffffff", "visible": True,
         "contrast": {"mode": "percentile", "blackPoint": 0.5, "whitePoint": 99.5}}])
    rng = np.random.default_rng(0)
    for xy in range(2):
        server.add_annotations(ds.dataset_id, [annotation_doc(rough_polygon(scene.labels == k, "dilated", rng), xy=xy)
                                               for k in range(1, scene.count + 1)])
    clock = FakeClock()
    stream = StampedStream(clock)
    reporter = Reporter(stream=stream, secrets=(TOKEN,), clock=clock, min_gap=0.5)
    predictor = TimedPredictor(clock, reporter, embed_s=5.0, decode_s=1.0, max_batch=3)
    values = {"Model": "sam2.1_hiera_tiny.pt", "Batch XY": "all", "Batch Z": "all", "Batch Time": "all"}
    settings = parse_settings({"workerInterface": values, "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 0,
                               "tags": ["refined"]}, ds.dataset_id, ckpt)
    with NimbusClient(server.api_url, TOKEN, retry=RetryPolicy(total=1, backoff_factor=0.01)) as client:
        assert job.run_compute(settings, client, reporter, lambda path: (predictor, False)) == 0

    stamped = [(t, line) for t, line in stream.stamps if "progress" in line]
    fractions = [line["progress"] for _, line in stamped]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0  # never backwards
    refining = [(t, line) for t, line in stamped if line["title"] == "Refining"]
    infos = [line["info"] for _, line in refining]
    # within each location: the embedding, objects decoded (4 chunks of 3), outlines traced
    for where in ("Location 1/2 (XY 1, Z 1, Time 1)", "Location 2/2 (XY 2, Z 1, Time 1)"):
        assert f"{where}: computing the image embedding" in infos
        embedding = [line["progress"] for _, line in refining
                     if line["info"].startswith(f"{where}: computing the image embedding")]
        assert len(embedding) >= 3 and embedding == sorted(set(embedding))  # the heartbeat moves the bar
        decoded = [i for i in infos if i.startswith(f"{where}: ") and "objects decoded" in i]
        assert len(decoded) >= 3 and decoded[-1].endswith("12/12 objects decoded")
    # never more than 2 s of (injected) work between two progress lines
    times = [t for t, _ in stamped]
    gaps = np.diff(times)
    assert gaps.max() <= 2.0, list(zip(times, infos))
    assert clock.now - 100.0 >= 2 * (5.0 + 4 * 1.0)  # the work did take that long


# -- the model loading, told step by step -----------------------------------------------------------


@pytest.mark.slow
def test_the_real_loader_tells_each_step(checkpoint_dir):
    steps: list[str] = []
    predictor, untrained = cli._load_sam2(checkpoint_dir / "sam2.1_hiera_tiny.pt", on_step=steps.append)
    assert untrained and predictor is not None
    assert steps == ["importing PyTorch", "importing SAM2", "choosing the device", "reading the weights",
                     "building the network", "loading the weights into it", "preparing the mask decoder"]


def test_model_loading_is_a_line_per_step(server, ckpt):
    """The job gives the loader its ``on_step`` when it takes one: a progress line per step, each
    a little further (0.08 .. 0.098), then 'Model ready' at 0.1."""
    scene = cell_scene(H, W, 3, seed=1)
    ds = server.add_dataset(scene.channels[None, None, None], layers=None)
    server.add_annotations(ds.dataset_id, [annotation_doc(rough_polygon(scene.labels == 1, "box", None))])

    def loader(path, on_step):
        for text in ("importing PyTorch", "importing SAM2", "building the network"):
            on_step(text)
        return KnownMaskPredictor(), False

    reporter = Reporter(stream=io.StringIO())
    settings = parse_settings({"workerInterface": {"Model": "sam2.1_hiera_tiny.pt"}, "tile": {"XY": 0, "Z": 0,
                                                                                               "Time": 0}},
                              ds.dataset_id, ckpt)
    with NimbusClient(server.api_url, TOKEN) as client:
        assert job.run_compute(settings, client, reporter, loader) == 0
    loading = [line for line in progress_lines(reporter) if line["title"] == "Loading model"]
    assert [line["info"] for line in loading[1:4]] == ["sam2.1_hiera_tiny.pt: importing PyTorch",
                                                        "sam2.1_hiera_tiny.pt: importing SAM2",
                                                        "sam2.1_hiera_tiny.pt: building the network"]
    assert [line["progress"] for line in loading[:4]] == sorted({line["progress"] for line in loading[:4]})
    ready = next(line for line in progress_lines(reporter) if line["title"] == "Model ready")
    assert loading[-1]["progress"] < ready["progress"] == 0.1


# -- a recorded job, through the real entrypoint and SAM2 -------------------------------------------


@pytest.mark.slow
def test_a_recorded_jobs_progress_never_goes_backwards(server, checkpoint_dir, tmp_path):
    scene = cell_scene(96, 128, 6, radius=(8.0, 12.0), seed=5)
    ds = server.add_dataset(np.broadcast_to(scene.channels, (3, 1, 1) + scene.channels.shape).copy(), layers=None)
    rng = np.random.default_rng(1)
    for xy in range(3):
        server.add_annotations(ds.dataset_id, [annotation_doc(rough_polygon(scene.labels == k, "jittered", rng),
                                                              xy=xy) for k in range(1, scene.count + 1)])
    params = {"workerInterface": {"Model": "", "Batch XY": "all", "Tag kept annotations": "sam2-kept"},
              "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 0, "tags": ["refined"]}
    run = run_worker(server, "compute", params, dataset_id=ds.dataset_id, checkpoint_dir=checkpoint_dir,
                     summary=tmp_path / "s.json")
    assert run.returncode == 0, run.stdout + run.stderr
    (tmp_path / "stdout.jsonl").write_text(run.stdout)
    progress = run.progress()
    fractions = [p["progress"] for p in progress]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    loading = [p["info"] for p in progress if p["title"] == "Loading model"]
    steps = ["importing PyTorch", "importing SAM2", "choosing the device", "reading the weights",
             "building the network", "loading the weights into it", "preparing the mask decoder"]
    told = [s for s in steps if any(info.startswith(f"sam2.1_hiera_tiny.pt: {s}") for info in loading)]
    assert told == steps
    print(f"\n{len(progress)} progress lines; heartbeat lines: {sum('s)' in p['info'] for p in progress)}")
