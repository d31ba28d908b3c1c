"""Points and rectangles through the real command line (issue 13, item 2): the replacement rules
are those of polygons.

The real ``entrypoint.py`` runs as a subprocess against the local server with the model swapped
for the known-mask stand-in (``test_faults.STANDIN_LAUNCHER``: everything but the model is real),
which answers points with three candidate masks. Checked: an original point or rectangle is
deleted only after its outline is confirmed and only with "Delete original annotations" on; its
connections move to the outline; a re-run makes nothing twice; with the new fields off (the
default) points and rectangles are not even listed.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np

from sam2_refine.engine.geometry import frame_window, mask_iou, polygon_from_ring, rasterize, ring_from_coordinates
from sam2_refine.job.markers import original_of
from test_bad_inputs import DISKS, H, LAYER, W, disk_pixels, doc, octagon
from test_faults import run_cli
from test_cli_e2e import params


def disk_mask(k: int) -> np.ndarray:
    x, y, r = DISKS[k]
    yy, xx = np.mgrid[0:H, 0:W]
    return (xx - x) ** 2 + (yy - y) ** 2 <= r * r


def iou_with_disk(annotation: dict, k: int) -> float:
    shape = polygon_from_ring(ring_from_coordinates(annotation["coordinates"]))
    return mask_iou(rasterize(shape, frame_window(W, H)), disk_mask(k))


def request(**fields) -> dict:
    return params(**{"Batch XY": "all", "Batch Time": "all", "Tag of objects to refine": ["cell"], **fields})


def seeded(server):
    """Disk 0 marked by a point, disk 1 by a rotated rectangle (corners out of order), disk 2
    by a polygon, plus a line, a point with two coordinates and a point outside the frame;
    connections point -> polygon and rectangle -> point."""
    ds = server.add_dataset(disk_pixels(), layers=LAYER)
    x1, y1, r1 = DISKS[1]
    s = r1 * 1.25
    diamond = [[x1, y1 + s], [x1, y1 - s], [x1 + s, y1], [x1 - s, y1]]
    ids = server.add_annotations(ds.dataset_id, [
        doc([[DISKS[0][0] + 1, DISKS[0][1] - 1]], shape="point"),
        doc(diamond, shape="rectangle"),
        doc(octagon(*DISKS[2][:2], DISKS[2][2] * 1.2)),
        doc([[10, 10], [50, 50]], shape="line"),
        doc([[60, 50], [150, 90]], shape="point"),
        doc([[W + 5, 20]], shape="point"),
    ])
    point, rect, polygon, line, double, outside = ids
    server.add_connections([
        {"parentId": point, "childId": polygon, "datasetId": ds.dataset_id, "label": "contains", "tags": ["t"]},
        {"parentId": rect, "childId": point, "datasetId": ds.dataset_id, "label": "near"},
    ])
    return ds, dict(point=point, rect=rect, polygon=polygon, line=line, double=double, outside=outside)


def test_points_and_rectangles_replaced_like_polygons(server, ckpt, tmp_path):
    ds, a = seeded(server)
    on = {"Refine point annotations": True, "Refine rectangle annotations": True}
    run, _ = run_cli(server, request(**on), ds.dataset_id, ckpt, summary=tmp_path / "1.json")
    assert run.returncode == 0, run.stdout + run.stderr
    first = json.loads((tmp_path / "1.json").read_text())
    assert set(first["replacements"]) == {a["point"], a["rect"], a["polygon"]}
    assert first["deleted"] == 0 and server.requests_to("DELETE", "upenn_annotation/multiple") == []
    kept = {i: reason for reason, ids in first["kept_reasons"].items() for i in ids}
    assert kept == {a["double"]: "a point annotation with 2 different coordinates (one expected)",
                    a["outside"]: f"it lies outside the {W}x{H} frame"}
    stored = {d["_id"]: d for d in server.annotations(ds.dataset_id)}
    for name, disk in (("point", 0), ("rect", 1), ("polygon", 2)):
        outline = stored[first["replacements"][a[name]]]
        assert outline["shape"] == "polygon" and original_of(outline) == a[name]
        assert outline["tags"] == ["refined"] and outline["location"] == {"XY": 0, "Z": 0, "Time": 0}
        assert iou_with_disk(outline, disk) > 0.9, name
    assert set(a.values()) <= set(stored)  # nothing deleted without "Delete original annotations"
    listed = Counter(r.params.get("shape") for r in server.requests_to("GET", "upenn_annotation"))
    assert set(listed) == {"polygon", "rectangle", "point"}  # never "line", nor "blob" (the server has none)

    # Again, now deleting: nothing is made twice; the three replaced originals go, their links move.
    posts = len(server.requests_to("POST", "upenn_annotation/multiple"))
    run, _ = run_cli(server, request(**on, **{"Delete original annotations": True}), ds.dataset_id, ckpt,
                     summary=tmp_path / "2.json")
    assert run.returncode == 0, run.stdout + run.stderr
    second = json.loads((tmp_path / "2.json").read_text())
    assert second["already_refined"] == 3 and second["refined"] == 0
    assert len(server.requests_to("POST", "upenn_annotation/multiple")) == posts
    assert sorted(second["deleted_ids"]) == sorted([a["point"], a["rect"], a["polygon"]])
    remaining = {d["_id"] for d in server.annotations(ds.dataset_id)}
    assert {a["line"], a["double"], a["outside"]} <= remaining
    assert not {a["point"], a["rect"], a["polygon"]} & remaining
    new = first["replacements"]
    links = {(c["parentId"], c["childId"], c["label"]) for c in server.connections()}
    assert links == {(new[a["point"]], new[a["polygon"]], "contains"), (new[a["rect"]], new[a["point"]], "near")}
    assert [c["tags"] for c in server.connections() if c["label"] == "contains"] == [["t"]]

    # A third run finds the outlines (polygons) and nothing left to refine or delete.
    run, _ = run_cli(server, request(**on, **{"Delete original annotations": True}), ds.dataset_id, ckpt,
                     summary=tmp_path / "3.json")
    third = json.loads((tmp_path / "3.json").read_text())
    assert run.returncode == 0 and third["refined"] == 0 and third["deleted"] == 0
    assert Counter(original_of(d) for d in server.annotations(ds.dataset_id) if original_of(d)) == Counter(
        {a["point"]: 1, a["rect"]: 1, a["polygon"]: 1})


def test_points_and_rectangles_are_untouched_by_default(server, ckpt, tmp_path):
    ds, a = seeded(server)
    run, _ = run_cli(server, request(**{"Delete original annotations": True}), ds.dataset_id, ckpt,
                     summary=tmp_path / "s.json")
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["selected"] == 1 and set(summary["replacements"]) == {a["polygon"]}
    remaining = {d["_id"] for d in server.annotations(ds.dataset_id)}
    assert {a["point"], a["rect"], a["line"], a["double"], a["outside"]} <= remaining
    assert {r.params.get("shape") for r in server.requests_to("GET", "upenn_annotation")} == {"polygon"}
