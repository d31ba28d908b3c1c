"""A compute job in-process, over real HTTP to the local server, with stand-in predictors.

These tests pin down the pipeline (selection, I/O, accounting, data safety, accuracy with
known masks) without the model's cost; the real CLI and model are exercised in test_cli_e2e.
"""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np

from conftest import TOKEN
from sam2_refine.job import compute as job
from sam2_refine.engine.geometry import frame_window, mask_iou, polygon_from_ring, rasterize, ring_from_coordinates
from sam2_refine.nimbus.client import NimbusClient
from sam2_refine.nimbus.retry import RetryPolicy
from sam2_refine.model.predictor import Decoded
from sam2_refine.nimbus.progress import Reporter
from sam2_refine.job.settings import parse_settings
from sam2_refine.testing.datasets import annotation_doc, cell_scene, rough_polygon
from sam2_refine.testing.stand_in import KnownMaskPredictor

H, W = 160, 224


def scene_dataset(server, n_xy: int = 1, n_t: int = 1, count: int = 8, seed: int = 0, layers=None):
    scene = cell_scene(H, W, count, radius=(9.0, 15.0), seed=seed)
    pixels = np.broadcast_to(scene.channels, (n_xy, n_t, 1) + scene.channels.shape).copy()
    ds = server.add_dataset(pixels, layers=layers if layers is not None else [
        {"channel": 0, "color": "#ffffff", "visible": True, "contrast": {"mode": "percentile", "blackPoint": 0.5,
                                                                         "whitePoint": 99.5}}])
    return ds, scene


def rough_docs(scene, kinds=("jittered", "dilated", "eroded", "box"), xy=0, t=0, tags=("cell",)):
    rng = np.random.default_rng(1)
    return [annotation_doc(rough_polygon(scene.labels == k, kinds[k % len(kinds)], rng), xy=xy, time=t,
                           tags=list(tags)) for k in range(1, scene.count + 1)]


def run_job(server, ds, ckpt, predictor, stream=None, **fields):
    values = {"Model": "sam2.1_hiera_tiny.pt", "Smoothing": 0.7, "Padding": 0, "Batch XY": "all", "Batch Time": "all",
              "Batch Z": "all", "Delete original annotations": False}
    values.update(fields)
    params = {"workerInterface": values, "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 2, "tags": ["refined"]}
    settings = parse_settings(params, ds.dataset_id, ckpt)
    reporter = Reporter(stream=stream or io.StringIO(), secrets=(TOKEN,))
    with NimbusClient(server.api_url, TOKEN, retry=RetryPolicy(total=2, backoff_factor=0.01)) as client:
        code = job.run_compute(settings, client, reporter, lambda path: (predictor, False))
    return code, reporter


def iou_to_truth(doc, truth) -> float:
    mask = rasterize(polygon_from_ring(ring_from_coordinates(doc["coordinates"])), frame_window(W, H))
    labels = truth[mask]
    labels = labels[labels > 0]
    return mask_iou(mask, truth == np.bincount(labels).argmax()) if labels.size else 0.0


def test_known_masks_refine_rough_outlines(server, ckpt):
    ds, scene = scene_dataset(server)
    originals = server.add_annotations(ds.dataset_id, rough_docs(scene))
    code, reporter = run_job(server, ds, ckpt, KnownMaskPredictor(labels=scene.labels),
                             **{"Delete original annotations": True})
    assert code == 0
    stored = server.annotations(ds.dataset_id)
    assert not {a["_id"] for a in stored} & set(originals) and len(stored) == scene.count
    before = [iou_to_truth(d, scene.labels) for d in rough_docs(scene)]
    after = [iou_to_truth(d, scene.labels) for d in stored]
    print(f"\nmean IoU to truth: rough {np.mean(before):.3f} -> refined {np.mean(after):.3f}")
    assert min(after) >= 0.95 and np.mean(after) > np.mean(before) + 0.2
    assert all(d["channel"] == 2 and d["tags"] == ["refined"] and d["shape"] == "polygon" for d in stored)


class _Recorder(KnownMaskPredictor):
    """Known masks; remembers, at each embed, which frames the server had been asked for."""

    def __init__(self, server, **kw):
        super().__init__(**kw)
        self.server = server
        self.frames_seen_at_embed: list[set[str]] = []

    def embed(self, image):
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # give the prefetch thread a moment to ask
            frames = {r.params["frame"] for r in self.server.requests_to("GET", r"item/\w+/tiles/region")}
            if len(frames) > len(self.frames_seen_at_embed) + 1 or len(self.frames_seen_at_embed) == 3:
                break
            time.sleep(0.02)
        self.frames_seen_at_embed.append(frames)
        super().embed(image)


def test_next_location_is_fetched_while_the_current_one_is_refined(server, ckpt, monkeypatch):
    # A budget smaller than one location: one location ahead (deeper: tests/test_prefetch.py).
    monkeypatch.setenv("SAM2_REFINE_PREFETCH_BYTES", "0")
    ds, scene = scene_dataset(server, n_xy=2, n_t=2)
    for xy in range(2):
        for t in range(2):
            server.add_annotations(ds.dataset_id, rough_docs(scene, xy=xy, t=t))
    predictor = _Recorder(server)
    code, _ = run_job(server, ds, ckpt, predictor)
    assert code == 0
    # While location k was being embedded, location k+1's frame had already been requested.
    assert [len(s) for s in predictor.frames_seen_at_embed] == [2, 3, 4, 4]
    regions = server.requests_to("GET", r"item/\w+/tiles/region")
    assert len(regions) == 4  # each location's frame fetched exactly once


def test_uploads_during_the_job_and_stops_at_the_first_failure(server, ckpt, monkeypatch):
    monkeypatch.setattr(job, "UPLOAD_CHUNK", 3)
    ds, scene = scene_dataset(server, n_xy=3, count=4)
    for xy in range(3):
        server.add_annotations(ds.dataset_id, rough_docs(scene, xy=xy))
    originals = {a["_id"] for a in server.annotations(ds.dataset_id)}
    server.fail("POST", "upenn_annotation/multiple", status=500, calls=[2])
    stream = io.StringIO()
    code, reporter = run_job(server, ds, ckpt, KnownMaskPredictor(), stream=stream,
                             **{"Delete original annotations": True})
    assert code == 1
    posts = server.requests_to("POST", "upenn_annotation/multiple")
    assert [len(p.body) for p in posts] == [4, 4]  # one upload per location, the second failed
    assert server.requests_to("DELETE", "upenn_annotation/multiple") == []
    assert originals <= {a["_id"] for a in server.annotations(ds.dataset_id)}
    error = [line for line in reporter.lines if "error" in line][-1]
    assert "Created 4 of 8" in error["info"] and "no original annotation was deleted" in error["error"]
    # The third location was not refined (its frame may have been prefetched): originals kept.
    third = {a["_id"] for a in server.annotations(ds.dataset_id) if a["location"]["XY"] == 2}
    kept = [line for line in reporter.lines if line.get("title") == "Annotations kept"]
    assert len(third) == 4 and len(kept) == 1
    # counted by position (the app's numbering) and reason; ids only in the summary file
    assert "XY 3: 4 kept: 4 not processed: the upload failed" in kept[0]["info"]
    assert not any(i in kept[0]["info"] for i in third)


def test_a_location_whose_image_fails_is_kept_and_the_job_fails(server, ckpt):
    ds, scene = scene_dataset(server, n_xy=2)
    first = server.add_annotations(ds.dataset_id, rough_docs(scene, xy=0))
    second = server.add_annotations(ds.dataset_id, rough_docs(scene, xy=1))
    bad_frame = ds.frame_of[(1, 0, 0, 0)]
    original_handle = server.handle

    def failing(method, path, params, body, token):
        if path.endswith("tiles/region") and params.get("frame") == str(bad_frame):
            return 500, b'{"message": "tile source error"}', "application/json", {}
        return original_handle(method, path, params, body, token)

    server.handle = failing
    code, reporter = run_job(server, ds, ckpt, KnownMaskPredictor(), **{"Delete original annotations": True})
    assert code == 1
    stored = {a["_id"] for a in server.annotations(ds.dataset_id)}
    assert set(second) <= stored and not set(first) & stored  # only confirmed replacements deleted
    errors = [line for line in reporter.lines if "error" in line]
    assert "1 location(s) could not be processed" in errors[-1]["error"] and "XY 2" in errors[-1]["info"]


class _Picky(KnownMaskPredictor):
    """Known masks, but an empty mask for boxes whose left edge is beyond ``empty_after``."""

    def __init__(self, empty_after: float):
        super().__init__()
        self.empty_after = empty_after

    def decode(self, boxes, mask_inputs=None, multimask=False):
        decoded = super().decode(boxes, mask_inputs, multimask)
        logits = decoded.logits.copy()
        logits[np.asarray(boxes)[:, 0] > self.empty_after] = -8.0
        return Decoded(logits, decoded.scores)


def test_empty_masks_keep_their_originals(server, ckpt):
    ds, scene = scene_dataset(server)
    docs = rough_docs(scene)
    ids = server.add_annotations(ds.dataset_id, docs)
    code, reporter = run_job(server, ds, ckpt, _Picky(empty_after=W / 2), **{"Delete original annotations": True})
    assert code == 0
    lefts = {i: min(p["x"] for p in d["coordinates"]) for i, d in zip(ids, docs)}
    stored = {a["_id"] for a in server.annotations(ds.dataset_id)}
    for ann_id, left in lefts.items():
        assert (ann_id in stored) == (left > W / 2), ann_id
    kept, = [line for line in reporter.lines if line.get("title") == "Annotations kept"]
    assert kept["info"].startswith("2 kept: 2 empty mask.")  # one position: none named


def test_no_visible_layer_fails_before_anything_changes(server, ckpt):
    ds, scene = scene_dataset(server, layers=[{"channel": 0, "visible": False, "color": "#ffffff"}])
    server.add_annotations(ds.dataset_id, rough_docs(scene))
    code, reporter = run_job(server, ds, ckpt, KnownMaskPredictor())
    assert code == 1
    assert "no layer is visible" in [line for line in reporter.lines if "error" in line][0]["info"]
    assert [r for r in server.requests if r.method != "GET"] == []


def test_dataset_without_layer_settings_still_works(server, ckpt):
    scene = cell_scene(H, W, 5, radius=(9.0, 14.0), seed=4)
    ds = server.add_dataset(scene.channels[None, None, None])  # no view, no layers
    server.add_annotations(ds.dataset_id, rough_docs(scene))
    seen = []

    class Looking(KnownMaskPredictor):
        def embed(self, image):
            seen.append(image)
            super().embed(image)

    code, _ = run_job(server, ds, ckpt, Looking(labels=scene.labels))
    assert code == 0
    new = [a for a in server.annotations(ds.dataset_id) if a["tags"] == ["refined"]]
    assert len(new) == 5
    image = seen[0]  # default contrast and colours: every channel visible, nuclei stand out
    assert image.shape == (H, W, 3) and image.dtype == np.float32 and 0 <= image.min() and image.max() <= 1
    brightness = image.max(axis=2)
    assert brightness[scene.labels > 0].mean() > brightness[scene.labels == 0].mean() + 0.4


def test_no_blob_query_is_sent(server, ckpt):
    """The server's schema has no blob shape (the app's blob tool makes polygons): a shape=blob
    listing answers nothing, so none is sent."""
    ds, scene = scene_dataset(server)
    server.add_annotations(ds.dataset_id, rough_docs(scene))
    code, _ = run_job(server, ds, ckpt, KnownMaskPredictor())
    assert code == 0 and len(server.annotations(ds.dataset_id)) == 2 * scene.count
    assert not [r for r in server.requests if r.params.get("shape") == "blob"
                or (isinstance(r.body, dict) and (r.body.get("filters") or {}).get("shape") == "blob")]


def test_unexpected_failure_reports_and_deletes_nothing(server, ckpt):
    ds, scene = scene_dataset(server, n_xy=2)
    server.add_annotations(ds.dataset_id, rough_docs(scene, xy=0) + rough_docs(scene, xy=1))
    originals = {a["_id"] for a in server.annotations(ds.dataset_id)}

    class Exploding(KnownMaskPredictor):
        calls = 0

        def embed(self, image):
            Exploding.calls += 1
            if Exploding.calls == 2:
                raise MemoryError("out of memory in the encoder")
            super().embed(image)

    code, reporter = run_job(server, ds, ckpt, Exploding(), **{"Delete original annotations": True})
    assert code == 1
    error = [line for line in reporter.lines if "error" in line][-1]
    assert "no original annotation was deleted" in error["error"] and "MemoryError" in error["info"]
    assert originals <= {a["_id"] for a in server.annotations(ds.dataset_id)}
    assert server.requests_to("DELETE", "upenn_annotation/multiple") == []


def test_summary_file_accounts_for_every_original(server, ckpt, tmp_path, monkeypatch):
    ds, scene = scene_dataset(server)
    docs = rough_docs(scene) + [annotation_doc(np.array([[1.0, 1.0], [2.0, 2.0]]), tags=["cell"])]
    ids = server.add_annotations(ds.dataset_id, docs)
    summary_path = tmp_path / "summary.json"
    monkeypatch.setenv(job.SUMMARY_ENV, str(summary_path))
    code, _ = run_job(server, ds, ckpt, KnownMaskPredictor())
    assert code == 0
    summary = json.loads(summary_path.read_text())
    accounted = set(summary["replacements"]) | {i for v in summary["kept_reasons"].values() for i in v}
    assert accounted == set(ids) and summary["selected"] == len(ids)


def test_progress_is_monotonic_and_ends_at_one(server, ckpt):
    ds, scene = scene_dataset(server, n_xy=2)
    server.add_annotations(ds.dataset_id, rough_docs(scene, xy=0) + rough_docs(scene, xy=1))
    code, reporter = run_job(server, ds, ckpt, KnownMaskPredictor(max_batch=3))
    assert code == 0
    fractions = [line["progress"] for line in reporter.lines if "progress" in line]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) > 8
    assert threading.active_count() < 10  # the prefetch thread is gone
