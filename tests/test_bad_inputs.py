"""The bad-input catalogue (issue 7): one test per row, ``test_catalogue_<short_name>``.

Each test states what the worker does with one kind of bad or odd input: refined, kept (with
which reason), not selected, or an error naming the field, with the exit status, and that
nothing is deleted that should not be. Jobs run in-process over real HTTP against the local
server with the known-mask stand-in (:class:`KnownMaskPredictor`); bad settings go through the
real command line (``cli.main``) in-process. The table in docs/bad-inputs.md lists the
rows.
"""

from __future__ import annotations

import io
import json
import os
import time
from typing import Any

import numpy as np
import pytest

from conftest import TOKEN
from sam2_refine import cli
from sam2_refine.job import compute as job
from sam2_refine import fields as ui
from sam2_refine.job.markers import original_of
from sam2_refine.nimbus.client import NimbusClient
from sam2_refine.nimbus.retry import RetryPolicy
from sam2_refine.nimbus.progress import Reporter
from sam2_refine.job.settings import parse_settings
from sam2_refine.testing.stand_in import KnownMaskPredictor

H, W = 128, 192
#: Disks of the test image: (x, y, radius). The last one is cut by the frame's left edge.
DISKS = [(60.0, 50.0, 14.0), (150.0, 90.0, 12.0), (110.0, 30.0, 10.0), (4.0, 100.0, 14.0)]
LAYER = [{"channel": 0, "color": "#ffffff", "visible": True,
          "contrast": {"mode": "percentile", "blackPoint": 1, "whitePoint": 99.5}}]


# -- helpers --------------------------------------------------------------------------------------


def disk_pixels(dtype=np.uint16, n_xy: int = 1) -> np.ndarray:
    """(XY, T, Z, C=1, H, W): bright disks on a dark, slightly noisy background."""
    yy, xx = np.mgrid[0:H, 0:W]
    inside = np.zeros((H, W), dtype=bool)
    for x, y, r in DISKS:
        inside |= (xx - x) ** 2 + (yy - y) ** 2 <= r * r
    rng = np.random.default_rng(0)
    low, high = {np.uint16: (1000, 30000), np.uint8: (10, 200), np.float32: (0.02, 0.8)}[dtype]
    plane = np.where(inside, high, low).astype(np.float64)
    plane += rng.normal(0, (high - low) * 0.01, size=plane.shape)
    plane = np.clip(plane, 0, None).astype(dtype)
    return np.broadcast_to(plane, (n_xy, 1, 1, 1, H, W)).copy()


def octagon(x: float, y: float, r: float) -> list[list[float]]:
    angles = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    return [[x + r * np.cos(a), y + r * np.sin(a)] for a in angles]


def doc(points, xy=0, tags=("cell",), shape="polygon", **extra) -> dict[str, Any]:
    out = {"shape": shape, "tags": list(tags), "channel": 0, "location": {"XY": xy, "Z": 0, "Time": 0},
           "coordinates": [{"x": float(x), "y": float(y)} for x, y in points]}
    out.update(extra)
    return out


def good(k: int = 0) -> dict[str, Any]:
    """A rough octagon around disk ``k``: refined by the stand-in."""
    x, y, r = DISKS[k]
    return doc(octagon(x, y, r * 1.2))


def dataset(server, dtype=np.uint16, layers=LAYER, n_xy: int = 1):
    return server.add_dataset(disk_pixels(dtype, n_xy), layers=layers)


def run(server, ds, ckpt, tmp_path, *, predictor=None, delete: bool = True, refine_tags=("cell",),
        **fields) -> tuple[int, Reporter, dict[str, Any]]:
    values = {"Model": "sam2.1_hiera_tiny.pt", "Batch XY": "all", "Batch Z": "all", "Batch Time": "all",
              "Delete original annotations": delete, "Tag of objects to refine": list(refine_tags)}
    values.update(fields)
    request = {"workerInterface": values, "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 0, "tags": ["refined"]}
    settings = parse_settings(request, ds.dataset_id, ckpt)
    reporter = Reporter(stream=io.StringIO(), secrets=(TOKEN,))
    summary_path = tmp_path / f"summary-{time.monotonic_ns()}.json"
    os.environ[job.SUMMARY_ENV] = str(summary_path)
    try:
        with NimbusClient(server.api_url, TOKEN, retry=RetryPolicy(total=1, backoff_factor=0.01)) as client:
            code = job.run_compute(settings, client, reporter, lambda path: (predictor or KnownMaskPredictor(), False))
    finally:
        os.environ.pop(job.SUMMARY_ENV, None)
    return code, reporter, json.loads(summary_path.read_text())


def reason_of(summary: dict[str, Any], ann_id: str) -> str | None:
    for reason, ids in summary["kept_reasons"].items():
        if ann_id in ids:
            return reason
    return None


def stored_ids(server, ds) -> set[str]:
    return {a["_id"] for a in server.annotations(ds.dataset_id)}


def assert_kept(server, ds, summary, ann_id: str, reason_part: str) -> None:
    reason = reason_of(summary, ann_id)
    assert reason is not None and reason_part in reason, (reason, summary["kept_reasons"])
    assert ann_id in stored_ids(server, ds)  # never deleted
    assert ann_id not in summary["replacements"]


def assert_refined(server, ds, summary, ann_id: str) -> dict[str, Any]:
    assert ann_id in summary["replacements"], summary["kept_reasons"]
    assert ann_id in summary["deleted_ids"] and ann_id not in stored_ids(server, ds)
    new = {a["_id"]: a for a in server.annotations(ds.dataset_id)}[summary["replacements"][ann_id]]
    assert original_of(new) == ann_id
    return new


def messages(reporter: Reporter, key: str) -> list[dict[str, Any]]:
    return [line for line in reporter.lines if key in line]


def wrap(server, change):
    """Replace the server's answers: ``change(method, path, params, answer) -> answer``."""
    original = server.handle

    def handle(method, path, params, body, token):
        return change(method, path, params, original(method, path, params, body, token))

    server.handle = handle


def with_good_neighbour(server, ds, bad: dict[str, Any]) -> tuple[str, str]:
    """Add the bad annotation and a good one at the same location; returns their ids."""
    return tuple(server.add_annotations(ds.dataset_id, [bad, good(1)]))  # type: ignore[return-value]


# -- geometry of the annotation -----------------------------------------------------------------

def test_catalogue_self_intersecting_polygon(server, ckpt, tmp_path):
    x, y, r = DISKS[0]
    bow_tie = [[x - r, y - r], [x + r, y + r], [x + r, y - r], [x - r, y + r]]  # crosses itself
    bad, ok = with_good_neighbour(server, ds := dataset(server), doc(bow_tie))
    code, _, summary = run(server, ds, ckpt, tmp_path)
    assert code == 0
    new = assert_refined(server, ds, summary, bad)
    xs = [p["x"] for p in new["coordinates"]]
    assert x - r - 1.5 < min(xs) and max(xs) < x + r + 1.5  # the disk, not the bow tie
    assert_refined(server, ds, summary, ok)


def test_catalogue_100k_vertex_polygon(server, ckpt, tmp_path):
    x, y, r = DISKS[0]
    angles = np.linspace(0, 2 * np.pi, 100_000, endpoint=False)
    ring = np.stack([x + 1.2 * r * np.cos(angles), y + 1.2 * r * np.sin(angles)], axis=1)
    bad, ok = with_good_neighbour(server, ds := dataset(server), doc(ring))
    started = time.perf_counter()
    code, _, summary = run(server, ds, ckpt, tmp_path)
    elapsed = time.perf_counter() - started
    print(f"\n100,000-vertex polygon: job {elapsed:.2f} s")
    assert code == 0 and elapsed < 10
    new = assert_refined(server, ds, summary, bad)
    assert len(new["coordinates"]) < 200  # the refinement is a compact polygon
    assert_refined(server, ds, summary, ok)


def test_catalogue_outside_the_frame(server, ckpt, tmp_path):
    bad, ok = with_good_neighbour(server, ds := dataset(server), doc(octagon(W + 100, H + 100, 10)))
    code, reporter, summary = run(server, ds, ckpt, tmp_path)
    assert code == 0
    assert_kept(server, ds, summary, bad, f"it lies outside the {W}x{H} frame")
    kept, = [w for w in messages(reporter, "warning") if w["title"] == "Annotations kept"]
    assert f"1 it lies outside the {W}x{H} frame" in kept["info"] and bad not in kept["info"]
    assert summary["kept_by_position"]["XY 1, Z 1, Time 1"] == {f"it lies outside the {W}x{H} frame": [bad]}
    assert_refined(server, ds, summary, ok)


def test_catalogue_a_sliver_inside_the_frame(server, ckpt, tmp_path):
    """Less than a pixel inside the frame counts as outside."""
    bad, _ = with_good_neighbour(server, ds := dataset(server), doc([[-30, 10], [-0.2, 10], [-0.2, 40], [-30, 40]]))
    code, _, summary = run(server, ds, ckpt, tmp_path)
    assert code == 0
    assert_kept(server, ds, summary, bad, "outside")


def test_catalogue_partly_outside_the_frame(server, ckpt, tmp_path):
    x, y, r = DISKS[3]  # a disk cut by the left edge
    bad, ok = with_good_neighbour(server, ds := dataset(server), doc(octagon(x, y, r * 1.3)))
    code, _, summary = run(server, ds, ckpt, tmp_path)
    assert code == 0
    new = assert_refined(server, ds, summary, bad)
    xs = [p["x"] for p in new["coordinates"]]
    ys = [p["y"] for p in new["coordinates"]]
    assert min(xs) >= -0.5 and max(xs) < x + r + 1.5 and min(ys) > y - r - 1.5  # clipped to the frame


def test_catalogue_two_point_polygon(server, ckpt, tmp_path):
    bad, ok = with_good_neighbour(server, ds := dataset(server), doc([[50, 40], [70, 60]]))
    code, _, summary = run(server, ds, ckpt, tmp_path)
    assert code == 0
    assert_kept(server, ds, summary, bad, "fewer than 3 points (2)")
    assert_refined(server, ds, summary, ok)


def test_catalogue_collinear_points(server, ckpt, tmp_path):
    bad, ok = with_good_neighbour(server, ds := dataset(server), doc([[50, 40], [60, 50], [70, 60]]))
    code, _, summary = run(server, ds, ckpt, tmp_path)
    assert code == 0
    assert_kept(server, ds, summary, bad, "encloses no area")


def test_catalogue_nan_and_inf_coordinates(server, ckpt, tmp_path):
    ds = dataset(server)
    nan, inf, ok = server.add_annotations(ds.dataset_id, [
        doc([[50, 40], [float("nan"), 50], [70, 60]]), doc([[50, 40], [float("inf"), 50], [70, 60]]), good(1)])
    served = {a["_id"]: a for a in server.annotations(ds.dataset_id)}
    code, _, summary = run(server, ds, ckpt, tmp_path)
    assert code == 0
    for ann_id in (nan, inf):  # the server serves them as null, as orjson does
        assert_kept(server, ds, summary, ann_id, "not a number (non-finite values arrive as null)")
    assert served[nan]["_id"] == nan
    assert_refined(server, ds, summary, ok)


def test_catalogue_string_coordinates(server, ckpt, tmp_path):
    bad_doc = doc([[0, 0]] * 3)
    bad_doc["coordinates"] = [{"x": "50", "y": "40"}, {"x": "70", "y": "40"}, {"x": "60", "y": "60"}]
    bad, ok = with_good_neighbour(server, ds := dataset(server), bad_doc)
    code, _, summary = run(server, ds, ckpt, tmp_path)
    assert code == 0
    assert_kept(server, ds, summary, bad, "a coordinate is missing or not a number")
    assert_refined(server, ds, summary, ok)


def test_catalogue_missing_coordinates(server, ckpt, tmp_path):
    ds = dataset(server)
    no_key = doc([])
    del no_key["coordinates"]
    not_list = doc([])
    not_list["coordinates"] = {"x": 1, "y": 2}
    no_y = doc([])
    no_y["coordinates"] = [{"x": 1}, {"x": 5, "y": 1}, {"x": 3, "y": 4}]
    a, b, c, ok = server.add_annotations(ds.dataset_id, [no_key, not_list, no_y, good(1)])
    code, _, summary = run(server, ds, ckpt, tmp_path)
    assert code == 0
    assert_kept(server, ds, summary, a, "coordinates are missing or not a list")
    assert_kept(server, ds, summary, b, "coordinates are missing or not a list")
    assert_kept(server, ds, summary, c, "a coordinate is missing or not a number")
    assert_refined(server, ds, summary, ok)


def test_catalogue_single_pixel_object(server, ckpt, tmp_path):
    """The model's mask is one pixel: refined to a tiny valid polygon around that pixel."""
    labels = np.zeros((H, W), dtype=np.int32)
    labels[50, 60] = 1
    bad, = server.add_annotations((ds := dataset(server)).dataset_id, [doc([[58, 48], [62, 48], [62, 52], [58, 52]])])
    code, _, summary = run(server, ds, ckpt, tmp_path, predictor=KnownMaskPredictor(labels=labels))
    assert code == 0
    new = assert_refined(server, ds, summary, bad)
    from sam2_refine.engine.geometry import polygon_from_ring, ring_from_coordinates
    shape = polygon_from_ring(ring_from_coordinates(new["coordinates"]))
    assert shape.is_valid and 0 < shape.area <= 2.0 and shape.contains(shape.centroid)
    assert abs(shape.centroid.x - 60) < 0.6 and abs(shape.centroid.y - 50) < 0.6


# -- what the server lists ---------------------------------------------------------------------

def test_catalogue_duplicate_ids_in_the_listing(server, ckpt, tmp_path):
    ds = dataset(server)
    first, second = server.add_annotations(ds.dataset_id, [good(0), good(1)])

    def duplicate_first(method, path, params, answer):
        status, body, ctype, headers = answer
        if method == "GET" and path == "upenn_annotation" and status == 200:
            docs = json.loads(body)
            docs += [d for d in docs if d["_id"] == first]
            body = json.dumps(docs).encode()
        return status, body, ctype, headers

    wrap(server, duplicate_first)
    code, reporter, summary = run(server, ds, ckpt, tmp_path)
    assert code == 0
    warning = [w for w in messages(reporter, "warning") if "more than once" in w["warning"]]
    assert warning and "1 annotation(s) more than once" in warning[0]["warning"] and first in warning[0]["info"]
    assert summary["selected"] == 2
    created = [original_of(d) for r in server.requests_to("POST", "upenn_annotation/multiple") for d in r.body]
    assert sorted(created) == sorted([first, second])  # refined once
    deleted = [i for r in server.requests_to("DELETE", "upenn_annotation/multiple") for i in r.body]
    assert sorted(deleted) == sorted([first, second])  # deleted once


def test_catalogue_annotation_without_id(server, ckpt, tmp_path):
    ds = dataset(server)
    ok, = server.add_annotations(ds.dataset_id, [good(1)])

    def strip_one(method, path, params, answer):
        status, body, ctype, headers = answer
        if method == "GET" and path == "upenn_annotation" and status == 200 and params.get("shape") == "polygon":
            docs = json.loads(body)
            docs.append({k: v for k, v in good(0).items()})  # a document without _id
            body = json.dumps(docs).encode()
        return status, body, ctype, headers

    wrap(server, strip_one)
    code, reporter, summary = run(server, ds, ckpt, tmp_path)
    assert code == 0
    assert any("without an id were skipped" in w["warning"] for w in messages(reporter, "warning"))
    assert summary["selected"] == 1
    assert_refined(server, ds, summary, ok)


def test_catalogue_empty_dataset(server, ckpt, tmp_path):
    ds = dataset(server)
    code, reporter, summary = run(server, ds, ckpt, tmp_path)
    assert code == 0
    last = messages(reporter, "progress")[-1]
    assert last["progress"] == 1.0 and "Nothing to refine" in last["info"]
    warning, = messages(reporter, "warning")
    assert warning["warning"] == "The chosen batch holds no polygon annotations."
    assert warning["title"] == "Nothing to refine"
    assert "the dataset holds no polygon annotations at all" in warning["info"]
    assert summary["selected"] == 0
    assert [r for r in server.requests if r.method != "GET"] == []


def test_catalogue_dataset_without_layer_settings(server, ckpt, tmp_path):
    ds = dataset(server, layers=None)
    ok, = server.add_annotations(ds.dataset_id, [good(0)])
    code, _, summary = run(server, ds, ckpt, tmp_path)
    assert code == 0
    assert_refined(server, ds, summary, ok)  # default contrast and colours


def test_catalogue_unknown_shapes(server, ckpt, tmp_path):
    """Lines, points and rectangles are not polygons: with the point and rectangle fields off
    (the default), never selected, never touched."""
    ds = dataset(server)
    x, y, r = DISKS[0]
    box = [[x - r, y - r], [x + r, y - r], [x + r, y + r], [x - r, y + r]]
    line, point, rect, odd, ok = server.add_annotations(ds.dataset_id, [
        doc([[10, 10], [50, 50]], shape="line"), doc([[60, 50]], shape="point"), doc(box, shape="rectangle"),
        doc(box, shape="ellipse"), good(1)])
    code, _, summary = run(server, ds, ckpt, tmp_path)
    assert code == 0
    assert summary["selected"] == 1
    assert_refined(server, ds, summary, ok)
    assert {line, point, rect, odd} <= stored_ids(server, ds)
    everything = {i for ids in summary["kept_reasons"].values() for i in ids} | set(summary["replacements"])
    assert not {line, point, rect, odd} & everything
    shapes = {r.params.get("shape") for r in server.requests_to("GET", "upenn_annotation")}
    assert shapes <= {"polygon", "blob"}


# -- points and rectangles (issue 13) ------------------------------------------------------------------

SHAPES_ON = {ui.REFINE_POINTS: True, ui.REFINE_RECTANGLES: True}


def point(x: float, y: float, **extra) -> dict[str, Any]:
    return doc([[x, y]], shape="point", **extra)


def test_catalogue_line_annotation_is_not_selected(server, ckpt, tmp_path):
    """Even with points and rectangles on, lines (and unknown shapes) are never listed (nor blobs:
    the server's schema has none)."""
    ds = dataset(server)
    line, odd, ok = server.add_annotations(ds.dataset_id, [
        doc([[10, 10], [50, 50], [90, 20]], shape="line"), doc(octagon(60, 50, 16), shape="ellipse"),
        point(*DISKS[1][:2])])
    code, _, summary = run(server, ds, ckpt, tmp_path, **SHAPES_ON)
    assert code == 0 and summary["selected"] == 1
    assert_refined(server, ds, summary, ok)
    assert {line, odd} <= stored_ids(server, ds)
    assert {r.params.get("shape") for r in server.requests_to("GET", "upenn_annotation")} == {
        "polygon", "rectangle", "point"}


def test_catalogue_point_outside_the_frame(server, ckpt, tmp_path):
    ds = dataset(server)
    left, far, ok = server.add_annotations(ds.dataset_id, [point(-3, 50), point(50, H + 40), point(*DISKS[0][:2])])
    code, _, summary = run(server, ds, ckpt, tmp_path, **SHAPES_ON)
    assert code == 0
    for bad in (left, far):
        assert_kept(server, ds, summary, bad, f"it lies outside the {W}x{H} frame")
    assert_refined(server, ds, summary, ok)


def test_catalogue_point_with_several_coordinates(server, ckpt, tmp_path):
    ds = dataset(server)
    several, repeated = server.add_annotations(ds.dataset_id, [
        doc([DISKS[0][:2], DISKS[1][:2], DISKS[2][:2]], shape="point"),
        doc([DISKS[1][:2], DISKS[1][:2]], shape="point")])
    code, _, summary = run(server, ds, ckpt, tmp_path, **SHAPES_ON)
    assert code == 0
    assert_kept(server, ds, summary, several, "a point annotation with 3 different coordinates (one expected)")
    assert_refined(server, ds, summary, repeated)  # the same position twice is one point


def test_catalogue_rectangle_with_zero_area(server, ckpt, tmp_path):
    ds = dataset(server)
    flat, dot = server.add_annotations(ds.dataset_id, [
        doc([[40, 50], [80, 50], [80, 50], [40, 50]], shape="rectangle"), doc([[40, 50]] * 4, shape="rectangle")])
    ok, = server.add_annotations(ds.dataset_id, [good(1)])
    code, _, summary = run(server, ds, ckpt, tmp_path, **SHAPES_ON)
    assert code == 0
    for bad in (flat, dot):
        assert_kept(server, ds, summary, bad, "the rectangle encloses no area (its corners lie on a line)")
    assert_refined(server, ds, summary, ok)


def test_catalogue_rectangle_corners_in_any_order_or_rotated(server, ckpt, tmp_path):
    """Upright corners shuffled, and a rotated square around a disk: both prompt with the
    bounding box of their corners and are refined to the disk."""
    ds = dataset(server)
    x0, y0, r0 = DISKS[0]
    shuffled = [[x0 + 1.2 * r0, y0 + 1.2 * r0], [x0 - 1.2 * r0, y0 - 1.2 * r0], [x0 - 1.2 * r0, y0 + 1.2 * r0],
                [x0 + 1.2 * r0, y0 - 1.2 * r0]]
    x1, y1, r1 = DISKS[1]
    rotated = [[x1 + 1.4 * r1 * np.cos(a), y1 + 1.4 * r1 * np.sin(a)] for a in np.radians([20, 110, 200, 290])]
    a, b = server.add_annotations(ds.dataset_id, [doc(shuffled, shape="rectangle"), doc(rotated, shape="rectangle")])
    code, _, summary = run(server, ds, ckpt, tmp_path, **SHAPES_ON)
    assert code == 0
    for ann_id, (x, y, r) in ((a, DISKS[0]), (b, DISKS[1])):
        new = assert_refined(server, ds, summary, ann_id)
        xs, ys = [p["x"] for p in new["coordinates"]], [p["y"] for p in new["coordinates"]]
        assert abs(min(xs) - (x - r)) < 1.5 and abs(max(ys) - (y + r)) < 1.5  # the disk


def test_catalogue_points_and_polygons_under_one_tag(server, ckpt, tmp_path):
    """Under the same tag, polygons prompt with their box and points with the point; each is
    refined; the points' typical area comes from points only."""
    ds = dataset(server)
    polygon_ids = server.add_annotations(ds.dataset_id, [good(0), good(1)])
    point_ids = server.add_annotations(ds.dataset_id, [point(*DISKS[2][:2]), point(DISKS[0][0] + 2, DISKS[0][1]),
                                                       point(DISKS[3][0] + 3, DISKS[3][1])])
    seen = []

    class Watching(KnownMaskPredictor):
        def decode(self, boxes, mask_inputs=None, multimask=False, **kw):
            seen.append(("points" if boxes is None else "boxes", len(kw.get("points") if boxes is None else boxes)))
            return super().decode(boxes, mask_inputs, multimask, **kw)

    code, _, summary = run(server, ds, ckpt, tmp_path, predictor=Watching(), **SHAPES_ON)
    assert code == 0
    assert seen == [("boxes", 2), ("points", 3)]
    for ann_id in polygon_ids + point_ids:
        assert_refined(server, ds, summary, ann_id)


def test_catalogue_point_on_the_background(server, ckpt, tmp_path):
    ds = dataset(server)
    bad, ok = server.add_annotations(ds.dataset_id, [point(180, 10), point(*DISKS[0][:2])])
    code, _, summary = run(server, ds, ckpt, tmp_path, **SHAPES_ON)
    assert code == 0
    reason = reason_of(summary, bad)
    assert reason in ("empty mask", "the mask does not reach the point"), reason
    assert bad in stored_ids(server, ds)
    assert_refined(server, ds, summary, ok)


def test_catalogue_point_mask_far_from_its_tags_typical_area(server, ckpt, tmp_path):
    """Four points mark disks of radius 5; a fifth, same tag, marks a disk of radius 19 (14
    times their area, under the 5 % bound) whose three masks all lie outside 0.25x to 3x the
    typical area: kept, the others refined. (An object whose part-mask falls in that range
    gets that part: the rule picks the mask nearest the typical size.)"""
    yy, xx = np.mgrid[0:H, 0:W]
    centres = [(20, 30, 5), (45, 30, 5), (70, 30, 5), (95, 30, 5), (150, 80, 19)]
    inside = np.zeros((H, W), bool)
    for x, y, r in centres:
        inside |= (xx - x) ** 2 + (yy - y) ** 2 <= r * r
    plane = np.where(inside, 30000, 1000).astype(np.uint16)
    ds = server.add_dataset(np.broadcast_to(plane, (1, 1, 1, 1, H, W)).copy(), layers=LAYER)
    *small, big = server.add_annotations(ds.dataset_id, [point(x, y) for x, y, _ in centres])
    code, _, summary = run(server, ds, ckpt, tmp_path, **SHAPES_ON)
    assert code == 0
    assert_kept(server, ds, summary, big, "far from the typical area of the objects its tags mark here")
    for ann_id in small:
        assert_refined(server, ds, summary, ann_id)


def test_catalogue_location_not_whole_numbers(server, ckpt, tmp_path):
    ds = dataset(server)
    half = good(0)
    half["location"] = {"XY": 0.5, "Z": 0, "Time": 0}
    text = good(0)
    text["location"] = {"XY": "0", "Z": 0, "Time": 0}
    not_obj = good(0)
    not_obj["location"] = [0, 0, 0]
    a, b, c, ok = server.add_annotations(ds.dataset_id, [half, text, not_obj, good(1)])
    code, reporter, summary = run(server, ds, ckpt, tmp_path)
    assert code == 0
    for ann_id in (a, b, c):
        assert_kept(server, ds, summary, ann_id, "its location is not whole numbers")
    assert_refined(server, ds, summary, ok)


def test_catalogue_location_beyond_the_dataset(server, ckpt, tmp_path):
    """An annotation at XY 5 of a 1-position dataset is outside every batch: not selected."""
    ds = dataset(server)
    far = good(0)
    far["location"] = {"XY": 4, "Z": 0, "Time": 0}
    a, ok = server.add_annotations(ds.dataset_id, [far, good(1)])
    code, _, summary = run(server, ds, ckpt, tmp_path)
    assert code == 0 and summary["selected"] == 1
    assert a in stored_ids(server, ds) and reason_of(summary, a) is None


def test_catalogue_missing_location_means_the_first_position(server, ckpt, tmp_path):
    ds = dataset(server)
    nowhere = good(0)
    del nowhere["location"]
    a, = server.add_annotations(ds.dataset_id, [nowhere])
    code, _, summary = run(server, ds, ckpt, tmp_path)
    assert code == 0
    new = assert_refined(server, ds, summary, a)
    assert new["location"] == {"XY": 0, "Z": 0, "Time": 0}


def test_catalogue_missing_tags_field(server, ckpt, tmp_path):
    """No tags field: not selected by a tag filter; refined when no refine tag is set."""
    ds = dataset(server)
    untagged = good(0)
    del untagged["tags"]
    a, = server.add_annotations(ds.dataset_id, [untagged])
    code, _, summary = run(server, ds, ckpt, tmp_path, refine_tags=("cell",))
    assert code == 0 and summary["selected"] == 0 and a in stored_ids(server, ds)
    code, _, summary = run(server, ds, ckpt, tmp_path, refine_tags=())
    assert code == 0
    new = assert_refined(server, ds, summary, a)
    assert new["tags"] == ["refined"]


def test_catalogue_tags_not_a_list(server, ckpt, tmp_path):
    """``tags: "cell"`` (a string): not taken as the tag "cell" (the server's filter may still
    list it); refined when no refine tag is set."""
    ds = dataset(server)
    odd = good(0)
    odd["tags"] = "cell"
    a, ok = server.add_annotations(ds.dataset_id, [odd, good(1)])
    code, _, summary = run(server, ds, ckpt, tmp_path, refine_tags=("cell",))
    assert code == 0 and summary["selected"] == 1 and a in stored_ids(server, ds)
    assert reason_of(summary, a) is None and a not in summary["replacements"]
    code, _, summary = run(server, ds, ckpt, tmp_path, refine_tags=())
    assert code == 0
    assert_refined(server, ds, summary, a)


# -- pixels ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.uint8], ids=["float32", "uint8"])
def test_catalogue_frame_dtypes(server, ckpt, tmp_path, dtype):
    ds = dataset(server, dtype=dtype)
    ids = server.add_annotations(ds.dataset_id, [good(0), good(1), good(2)])
    code, _, summary = run(server, ds, ckpt, tmp_path)
    assert code == 0
    for ann_id in ids:
        assert_refined(server, ds, summary, ann_id)


@pytest.mark.parametrize("garbage_body", [b"<html>502 Bad Gateway</html>", b"II*\x00garbage, not a TIFF" * 10],
                         ids=["html", "tiff_header_then_garbage"])
def test_catalogue_frame_that_is_not_a_tiff(server, ckpt, tmp_path, garbage_body):
    ds = dataset(server, n_xy=2)
    bad_frame = ds.frame_of[(1, 0, 0, 0)]
    first = server.add_annotations(ds.dataset_id, [good(0)])
    second = server.add_annotations(ds.dataset_id, [dict(good(0), location={"XY": 1, "Z": 0, "Time": 0})])

    def garbage(method, path, params, answer):
        if path.endswith("tiles/region") and params.get("frame") == str(bad_frame):
            return 200, garbage_body, "image/tiff", {}
        return answer

    wrap(server, garbage)
    code, reporter, summary = run(server, ds, ckpt, tmp_path)
    assert code == 1
    assert_kept(server, ds, summary, second[0], "its image could not be read")
    assert_refined(server, ds, summary, first[0])  # the other location is done
    error = messages(reporter, "error")[-1]
    assert "1 location(s) could not be processed" in error["error"]
    assert "XY 2" in error["info"] and f"(request GET item/{ds.item_id}/tiles/region)" in error["info"]
    assert "its image could not be read" in error["info"] and "Running the job again processes them" in error["info"]
    # A TIFF header over garbage decodes to an empty array, which is caught as not one 2-D plane.
    assert "not a readable TIFF" in error["info"] or "expected one 2-D plane" in error["info"]


def test_catalogue_frame_reported_as_20000x20000(server, ckpt, tmp_path):
    """The tile metadata says 20000x20000 but the frames are small: the size mismatch is
    caught per location (kept, "its image arrived degraded", exit 1); nothing is allocated at
    20000x20000 and nothing is deleted. (A real 20000x20000 job is out of the CI budget.)"""
    ds = dataset(server)
    a, b = server.add_annotations(ds.dataset_id, [good(0), good(1)])

    def huge(method, path, params, answer):
        status, body, ctype, headers = answer
        if method == "GET" and path == f"item/{ds.item_id}/tiles" and status == 200:
            meta = json.loads(body)
            meta.update(sizeX=20000, sizeY=20000, levels=8)
            body = json.dumps(meta).encode()
        return status, body, ctype, headers

    wrap(server, huge)
    started = time.perf_counter()
    code, reporter, summary = run(server, ds, ckpt, tmp_path)
    print(f"\n20000x20000 tile metadata on a {W}x{H} frame: exit {code} in {time.perf_counter() - started:.2f} s; "
          f"{messages(reporter, 'error')[-1]['info'][:200]}")
    assert code == 1
    for ann_id in (a, b):
        assert_kept(server, ds, summary, ann_id, "its image arrived degraded")
    assert "metadata says uint16, 20000 x 20000" in messages(reporter, "error")[-1]["info"]
    assert server.requests_to("DELETE", "upenn_annotation/multiple") == []
    assert server.requests_to("POST", "upenn_annotation/multiple") == []


# -- layer settings ------------------------------------------------------------------------------

@pytest.mark.parametrize("layer,message", [
    ({"channel": 3, "visible": True}, "shows channel 3"),
    ({"channel": 0, "visible": True, "color": "#zzzzzz"}, "layer"),
    ({"channel": 0, "visible": True, "contrast": {"mode": "gamma"}}, "contrast mode"),
    ({"channel": 0, "visible": True, "contrast": {"mode": "absolute", "blackPoint": None, "whitePoint": 9}},
     "numeric blackPoint"),
    ({"channel": 0, "visible": False}, "no layer is visible"),
], ids=["channel_out_of_range", "bad_colour", "unknown_contrast_mode", "null_black_point", "none_visible"])
def test_catalogue_bad_layer_settings(server, ckpt, tmp_path, layer, message):
    ds = dataset(server, layers=[layer])
    a, = server.add_annotations(ds.dataset_id, [good(0)])
    code, reporter, summary = run(server, ds, ckpt, tmp_path)
    assert code == 1
    error = messages(reporter, "error")[0]
    assert error["error"] == "The dataset's layer settings cannot be used." and message in error["info"]
    assert "Nothing was changed" in error["info"]
    assert [r for r in server.requests if r.method != "GET"] == [] and a in stored_ids(server, ds)


def test_catalogue_layer_contrast_not_an_object(server, ckpt, tmp_path):
    """``contrast: "high"``: the job stops before any change (exit 1, nothing deleted), with the
    layer-settings error naming the layer."""
    ds = dataset(server, layers=[{"name": "nuclei", "channel": 0, "visible": True, "contrast": "high"}])
    a, = server.add_annotations(ds.dataset_id, [good(0)])
    code, reporter, _ = run(server, ds, ckpt, tmp_path)
    assert code == 1
    error = messages(reporter, "error")[0]
    assert error["error"] == "The dataset's layer settings cannot be used." and "nuclei" in error["info"]
    assert [r for r in server.requests if r.method != "GET"] == [] and a in stored_ids(server, ds)


# -- bad settings: through the command line, in-process ----------------------------------------------

BAD_SETTINGS = {
    "model_unknown": ({"Model": "sam2.1_hiera_huge.pt"}, "Model"),
    "model_path": ({"Model": "../sam2.1_hiera_tiny.pt"}, "Model"),
    "model_not_text": ({"Model": 3}, "Model"),
    "padding_out_of_range": ({"Padding": 21}, "Padding"),
    "padding_not_a_number": ({"Padding": "wide"}, "Padding"),
    "padding_bool": ({"Padding": True}, "Padding"),
    "smoothing_nan_text": ({"Smoothing": "nan"}, "Smoothing"),
    "smoothing_negative": ({"Smoothing": -0.1}, "Smoothing"),
    "refine_tags_not_a_list": ({"Tag of objects to refine": {"a": 1}}, "Tag of objects to refine"),
    "refine_tags_numbers": ({"Tag of objects to refine": [1, 2]}, "Tag of objects to refine"),
    "delete_not_bool": ({"Delete original annotations": "yes"}, "Delete original annotations"),
    "batch_xy_words": ({"Batch XY": "first"}, "Batch XY"),
    "batch_z_zero": ({"Batch Z": "0"}, "Batch Z"),
    "batch_time_reversed": ({"Batch Time": "5-2"}, "Batch Time"),
    "batch_xy_float": ({"Batch XY": 1.5}, "Batch XY"),
    "batch_z_list": ({"Batch Z": [1, 2]}, "Batch Z"),
    "resolution_unknown": ({ui.RESOLUTION: "4K"}, ui.RESOLUTION),
    "prompt_unknown": ({ui.PROMPT: "points"}, ui.PROMPT),
    "min_overlap_above_one": ({ui.MIN_OVERLAP: 1.5}, ui.MIN_OVERLAP),
    "keep_tags_not_bool": ({ui.KEEP_TAGS: "yes"}, ui.KEEP_TAGS),
    "refine_points_not_bool": ({ui.REFINE_POINTS: "yes"}, ui.REFINE_POINTS),
    "refine_rectangles_not_bool": ({ui.REFINE_RECTANGLES: 1}, ui.REFINE_RECTANGLES),
    "separate_not_bool": ({ui.SEPARATE: "false"}, ui.SEPARATE),
}
BAD_PARAMETERS = {
    "channel_negative": ({"channel": -1}, "channel"),
    "channel_text": ({"channel": "1"}, "channel"),
    "channel_null": ({"channel": None}, "channel"),
    "output_tags_not_a_list": ({"tags": 5}, "tags"),
    "tile_not_an_object": ({"tile": "0,0,0"}, "tile"),
    "tile_negative": ({"tile": {"XY": -1, "Z": 0, "Time": 0}}, "tile.XY"),
    "worker_interface_not_an_object": ({"workerInterface": ["Model"]}, "workerInterface"),
}


def cli_compute(server, ds_id, request, capsys) -> tuple[int, list[dict[str, Any]]]:
    argv = ["--apiUrl", server.api_url, "--token", TOKEN, "--request", "compute", "--parameters", json.dumps(request)]
    if ds_id is not None:
        argv += ["--datasetId", ds_id]
    code = cli.main(argv)
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err
    return code, [json.loads(line) for line in out.out.splitlines() if line.startswith("{")]


def base_request(**fields) -> dict[str, Any]:
    values = {"Model": "sam2.1_hiera_tiny.pt", "Batch XY": "", "Batch Z": "", "Batch Time": "",
              "Delete original annotations": True, "Padding": 0, "Smoothing": 0.7, "Tag of objects to refine": []}
    values.update(fields)
    return {"workerInterface": values, "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 0, "tags": ["refined"],
            "assignment": {"XY": 0, "Z": 0, "Time": 0}}


@pytest.mark.parametrize("name", list(BAD_SETTINGS) + list(BAD_PARAMETERS))
def test_catalogue_bad_setting(server, ckpt, monkeypatch, capsys, name):
    monkeypatch.setenv("SAM2_CHECKPOINT_DIR", str(ckpt))
    ds = dataset(server)
    server.add_annotations(ds.dataset_id, [good(0)])
    if name in BAD_SETTINGS:
        fields, field = BAD_SETTINGS[name]
        request = base_request(**fields)
    else:
        fields, field = BAD_PARAMETERS[name]
        request = {**base_request(), **fields}
    code, lines = cli_compute(server, ds.dataset_id, request, capsys)
    errors = [line for line in lines if "error" in line]
    assert code == 2, lines
    assert errors and errors[0]["error"] == f"Invalid setting: {field}", errors
    assert "Nothing was changed" in errors[0]["info"]
    assert server.requests == []  # checked before the server is asked anything


def test_catalogue_several_bad_settings_at_once(server, ckpt, monkeypatch, capsys):
    """Every bad field is reported, each on its own error line, in one run."""
    monkeypatch.setenv("SAM2_CHECKPOINT_DIR", str(ckpt))
    ds = dataset(server)
    request = {**base_request(Padding=99, Smoothing="x", **{"Batch XY": "0"}), "channel": -3}
    code, lines = cli_compute(server, ds.dataset_id, request, capsys)
    assert code == 2
    named = {line["error"] for line in lines if "error" in line}
    assert named == {"Invalid setting: Padding", "Invalid setting: Smoothing", "Invalid setting: Batch XY",
                     "Invalid setting: channel"}
    assert server.requests == []


def test_catalogue_parameters_not_json_or_not_an_object(server, ckpt, monkeypatch, capsys):
    monkeypatch.setenv("SAM2_CHECKPOINT_DIR", str(ckpt))
    ds = dataset(server)
    argv = ["--apiUrl", server.api_url, "--token", TOKEN, "--request", "compute", "--datasetId", ds.dataset_id]
    assert cli.main(argv + ["--parameters", "{not json"]) == 2
    assert json.loads(capsys.readouterr().out.splitlines()[0])["error"] == "Invalid --parameters: not JSON."
    assert cli.main(argv + ["--parameters", "[1, 2]"]) == 2
    assert json.loads(capsys.readouterr().out.splitlines()[0])["error"] == "Invalid setting: parameters"
    assert server.requests == []


def test_catalogue_missing_dataset_id(server, ckpt, monkeypatch, capsys):
    monkeypatch.setenv("SAM2_CHECKPOINT_DIR", str(ckpt))
    code, lines = cli_compute(server, None, base_request(), capsys)
    assert code == 2 and lines[0]["error"] == "Invalid setting: datasetId"
    assert server.requests == []


def test_catalogue_unknown_dataset_id(server, ckpt, monkeypatch, capsys):
    monkeypatch.setenv("SAM2_CHECKPOINT_DIR", str(ckpt))
    code, lines = cli_compute(server, "0123456789abcdef01234567", base_request(), capsys)
    errors = [line for line in lines if "error" in line]
    assert code == 1 and errors[0]["error"] == "The dataset was not found on the NimbusImage server."
    assert "The server has no dataset with id 0123456789abcdef01234567" in errors[0]["info"]
    assert "Request: GET folder/0123456789abcdef01234567 (HTTP 400)" in errors[0]["info"]
    assert [r for r in server.requests if r.method != "GET"] == []


def test_catalogue_current_tile_beyond_the_dataset(server, ckpt, monkeypatch, capsys):
    monkeypatch.setenv("SAM2_CHECKPOINT_DIR", str(ckpt))
    ds = dataset(server)
    request = {**base_request(), "tile": {"XY": 3, "Z": 0, "Time": 0}}
    code, lines = cli_compute(server, ds.dataset_id, request, capsys)
    errors = [line for line in lines if "error" in line]
    assert code == 2 and errors[0]["error"] == "Invalid setting: Batch XY"
    assert "The current position asks for position 4, but the dataset has 1 position" in errors[0]["info"]
    assert "Nothing was changed." in errors[0]["info"]
    assert server.requests_to("GET", "upenn_annotation") == []
    assert [r for r in server.requests if r.method != "GET"] == []


# -- refinement marks (issue 11) ------------------------------------------------------------------


def planted(original_id: Any, xy: int = 0, k: int = 2, delete_original: bool = False, **mark: Any) -> dict[str, Any]:
    """An annotation carrying a sam2Refine mark (as if a refinement), tagged like an original."""
    entry = dict(mark) if mark else {"originalId": original_id}
    if delete_original:
        entry["deleteOriginal"] = True
    x, y, r = DISKS[k]
    return doc(octagon(x, y, r), xy=xy, tags=("cell", "refined"), sam2Refine=entry)


def not_trusted(reporter: Reporter) -> str:
    return " ".join(f"{m['warning']} {m.get('info', '')}" for m in reporter.lines
                    if m.get("title") == "Marks not trusted")


@pytest.mark.parametrize("mark", [{"originalId": 42}, {"originalId": None}, {"originalId": ["x"]}, {}],
                         ids=["number", "null", "list", "no_original_id"])
def test_catalogue_mark_with_an_original_id_that_is_not_a_string(server, ckpt, tmp_path, mark):
    ds = dataset(server)
    bad, ok = server.add_annotations(ds.dataset_id, [planted(None, **mark) if mark else
                                                     {**planted(None), "sam2Refine": {}}, good(0)])
    code, reporter, summary = run(server, ds, ckpt, tmp_path, delete=True)
    assert code == 0
    assert bad in stored_ids(server, ds) and bad not in summary["replacements"]  # not an original, not deleted
    assert bad in not_trusted(reporter) and "cannot be read" in not_trusted(reporter)
    assert bad in summary["not_trusted_ids"]
    assert_refined(server, ds, summary, ok)


def test_catalogue_mark_that_refers_to_nothing(server, ckpt, tmp_path):
    """An original id that is not an annotation id, alone; and two refinements sharing a
    well-formed id that no annotation has (and that no job deleting originals made): warned
    about, left alone, never counted as duplicates."""
    ds = dataset(server)
    nothing = "ffffffffffffffffffffffff"
    ids = server.add_annotations(ds.dataset_id, [planted("not-an-id"), planted(nothing, k=1), planted(nothing, k=2),
                                                 good(0)])
    code, reporter, summary = run(server, ds, ckpt, tmp_path, delete=True)
    assert code == 0
    assert set(ids[:3]) <= stored_ids(server, ds)
    text = not_trusted(reporter)
    assert ids[0] in text and "refers to nothing" in text
    assert ids[1] in text and ids[2] in text
    assert summary["duplicates_removed"] == 0 and set(ids[:3]) <= set(summary["not_trusted_ids"])
    assert_refined(server, ds, summary, ids[3])


def test_catalogue_mark_that_points_to_another_dataset(server, ckpt, tmp_path):
    ds, other = dataset(server), dataset(server)
    (foreign,) = server.add_annotations(other.dataset_id, [good(0)])
    ids = server.add_annotations(ds.dataset_id, [planted(foreign, k=1, delete_original=True),
                                                 planted(foreign, k=2, delete_original=True), good(0)])
    code, reporter, summary = run(server, ds, ckpt, tmp_path, delete=True)
    assert code == 0
    assert set(ids[:2]) <= stored_ids(server, ds) and foreign in stored_ids(server, other)
    text = not_trusted(reporter)
    assert "another dataset" in text and ids[0] in text and ids[1] in text
    assert summary["duplicates_removed"] == 0
    assert_refined(server, ds, summary, ids[2])


def test_catalogue_mark_naming_an_original_at_another_location(server, ckpt, tmp_path):
    """A mark at XY 2 naming an original at XY 1 does not make that original "already refined"."""
    ds = dataset(server, n_xy=2)
    (original,) = server.add_annotations(ds.dataset_id, [good(0)])
    (misplaced,) = server.add_annotations(ds.dataset_id, [planted(original, xy=1)])
    code, reporter, summary = run(server, ds, ckpt, tmp_path, delete=True)
    assert code == 0 and summary["already_refined"] == 0
    new = assert_refined(server, ds, summary, original)
    assert new["_id"] != misplaced and misplaced in stored_ids(server, ds)
    assert misplaced in not_trusted(reporter) and "another location" in not_trusted(reporter)


def test_catalogue_refinements_left_by_a_stopped_job_after_the_original_was_replaced(server, ckpt, tmp_path):
    """Two refinements of an original that a job deleting originals already deleted (its
    original is gone: a job was stopped after uploading a duplicate): one stays (the smaller
    id), silently; a lone one is the normal state after a replacement and is not reported."""
    ds = dataset(server)
    gone, alone = server.new_id(), server.new_id()
    pair = server.add_annotations(ds.dataset_id, [planted(gone, k=1, delete_original=True),
                                                  planted(gone, k=2, delete_original=True)])
    (lone,) = server.add_annotations(ds.dataset_id, [planted(alone, k=3, delete_original=True)])
    code, reporter, summary = run(server, ds, ckpt, tmp_path, delete=True)
    assert code == 0
    kept = stored_ids(server, ds)
    assert min(pair) in kept and max(pair) not in kept and lone in kept
    assert not not_trusted(reporter)
