"""Issue 23, item 1: kept annotations a user can find.

- the local server's ``PUT upenn_annotation/multiple`` does what NimbusImage's plugin does
  (``server/api/annotation.py`` and ``models/annotation.py``, ``updateMultiple``);
- the client's tag update, and :mod:`sam2_refine.job.kept` (positions, grouping, tagging);
- jobs in-process over real HTTP with the known-mask stand-in: the "Annotations kept" warning
  counts by position and reason (ids only in the summary file); "Tag kept annotations" tags every
  kept original and changes nothing else of it (the server's stored document compared), is
  idempotent, and a kept original a later run refines loses nothing.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
import pytest

from conftest import TOKEN
from sam2_refine.job import compute as job
from sam2_refine.job.kept import kept_by_position, kept_text, new_tags, position_text, update_tags
from sam2_refine.job.markers import original_of
from sam2_refine.nimbus.errors import NimbusAPIError
from sam2_refine.nimbus.client import NimbusClient
from sam2_refine.nimbus.retry import RetryPolicy
from sam2_refine.nimbus.progress import Reporter
from sam2_refine.annotations import Location
from sam2_refine.job.settings import parse_settings
from sam2_refine.testing.datasets import annotation_doc, cell_scene, rough_polygon
from sam2_refine.testing.stand_in import KnownMaskPredictor

H, W = 160, 224
KEPT = "sam2-kept"


# -- the local server: PUT upenn_annotation/multiple as the plugin does it ------------------------


def polygon(x: float = 10, y: float = 10, **extra: Any) -> dict[str, Any]:
    doc = {"shape": "polygon", "tags": ["cell"], "channel": 0, "location": {"XY": 0, "Z": 0, "Time": 0},
           "coordinates": [{"x": x, "y": y}, {"x": x + 9, "y": y}, {"x": x + 9, "y": y + 9}]}
    doc.update(extra)
    return doc


def put(server, body) -> tuple[int, Any]:
    import requests

    response = requests.put(f"{server.api_url}/upenn_annotation/multiple", json=body,
                            headers={"Girder-Token": TOKEN}, timeout=10)
    return response.status_code, response.json()


def test_server_put_replaces_only_the_named_fields(server):
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 8, 8), np.uint8))
    a, b = server.add_annotations(ds.dataset_id, [polygon(name="one", color="#ff0000", extra={"k": [1]}),
                                                  polygon(20, 20)])
    before = {d["_id"]: d for d in server.annotations(ds.dataset_id)}
    status, answer = put(server, [{"id": a, "tags": ["cell", "x"], "_modelType": "ignored", "creatorId": "no"},
                                  {"_id": b, "name": "two"}])
    assert (status, answer) == (200, None)  # the plugin's updateMultiple returns nothing
    after = {d["_id"]: d for d in server.annotations(ds.dataset_id)}
    assert after[a] == {**before[a], "tags": ["cell", "x"]}  # fields outside the schema ignored, others kept
    assert after[b] == {**before[b], "name": "two"}
    assert list(after[a]) == list(before[a])  # the stored document keeps its keys in place


def test_server_put_is_all_or_nothing(server):
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 8, 8), np.uint8))
    good, broken = server.add_annotations(ds.dataset_id, [polygon(), polygon(coordinates=[{"x": None, "y": 1}])])
    before = server.annotations(ds.dataset_id)
    # a stored document the schema refuses: 400 for the whole request, nothing saved
    status, answer = put(server, [{"id": good, "tags": ["x"]}, {"id": broken, "tags": ["x"]}])
    assert (status, answer) == (400, {"message": "data.coordinates[] must be objects with numeric x and y",
                                      "type": "validation"})
    # an id the server does not hold: 403 for the whole request, before anything is saved
    status, answer = put(server, [{"id": good, "tags": ["x"]}, {"id": "0" * 24, "tags": ["x"]}])
    assert (status, answer) == (403, {"message": "Write access was denied for one or more annotations.",
                                      "type": "access"})
    assert server.annotations(ds.dataset_id) == before


@pytest.mark.parametrize("body,message", [
    ({"id": "x"}, "Request body must be a JSON array."),
    (["x"], "Each annotation update must be a JSON object."),
    ([{"tags": []}], "Each annotation must have an 'id' or '_id' field."),
    ([{"id": "nope", "tags": []}], "Invalid annotation id: nope"),
    ([{"id": "6" * 24, "datasetId": "zz"}], "Invalid datasetId: zz"),
])
def test_server_put_refuses_malformed_bodies(server, body, message):
    assert put(server, body) == (400, {"message": message, "type": "rest"})


def test_server_put_of_an_empty_list_answers_an_empty_list(server):
    assert put(server, []) == (200, [])


# -- the client --------------------------------------------------------------------------------------


def test_client_sets_tags_in_chunks_with_the_apps_body(server, client):
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 8, 8), np.uint8))
    ids = server.add_annotations(ds.dataset_id, [polygon(i) for i in range(5)])
    assert client.update_annotation_tags([(i, ["cell", KEPT]) for i in ids], chunk_size=2) == 5
    puts = server.requests_to("PUT", "upenn_annotation/multiple")
    assert [len(r.body) for r in puts] == [2, 2, 1]
    assert puts[0].body[0] == {"id": ids[0], "tags": ["cell", KEPT]}  # as the app's updateAnnotations sends it
    assert all(d["tags"] == ["cell", KEPT] for d in server.annotations(ds.dataset_id))


def test_client_tag_update_is_retried_on_503_as_it_is_idempotent(server, client):
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 8, 8), np.uint8))
    ann_id, = server.add_annotations(ds.dataset_id, [polygon()])
    server.fail("PUT", "upenn_annotation/multiple", status=503, calls=[1])
    client.update_annotation_tags([(ann_id, ["a"])])
    assert len(server.requests_to("PUT", "upenn_annotation/multiple")) == 2
    assert server.annotations(ds.dataset_id)[0]["tags"] == ["a"]


def test_client_tag_update_failure_is_an_api_error(server, client):
    with pytest.raises(NimbusAPIError) as info:
        client.update_annotation_tags([("0" * 24, ["a"])])
    assert info.value.status == 403 and info.value.endpoint == "upenn_annotation/multiple"


# -- kept.py: positions, groups, tags -------------------------------------------------------------


def test_positions_are_numbered_as_the_app_numbers_them():
    assert position_text(Location(1, 0, 4), (3, 1, 9)) == "XY 2, Time 5"  # Z: one slice, left out
    assert position_text(Location(0, 2, 0), (1, 4, 1)) == "Z 3"
    assert position_text(Location(0, 0, 0), (1, 1, 1)) == ""


def test_kept_are_counted_by_position_and_reason():
    kept = {"mask far larger than the original": ["a", "b", "c", "d"], "empty mask": ["e", "f"]}
    where = {"a": Location(1, 0, 4), "b": Location(1, 0, 4), "c": Location(1, 0, 4), "e": Location(1, 0, 4),
             "d": Location(0, 0, 0), "f": Location(2, 0, 1)}
    groups = kept_by_position(kept, where)
    assert list(groups) == [Location(0, 0, 0), Location(1, 0, 4), Location(2, 0, 1)]
    assert kept_text(groups, (3, 1, 9)) == ("XY 1, Time 1: 1 kept: 1 mask far larger than the original; "
                                            "XY 2, Time 5: 4 kept: 3 mask far larger than the original, 1 empty mask; "
                                            "XY 3, Time 2: 1 kept: 1 empty mask")
    assert kept_text(groups, (3, 1, 9), listed=1).endswith("; and 2 more position(s) with 5 kept")


def test_new_tags_add_or_take_only_the_tag():
    assert new_tags({"tags": ["cell"]}, KEPT, True) == ["cell", KEPT]
    assert new_tags({"tags": ["cell", KEPT]}, KEPT, True) == ["cell", KEPT]
    assert new_tags({"tags": [KEPT, "cell", KEPT]}, KEPT, False) == ["cell"]
    assert new_tags({}, KEPT, True) == [KEPT]
    assert new_tags({"tags": "cell"}, KEPT, True) is None  # not a list: never replaced by one
    assert new_tags({"tags": ["cell", 3]}, KEPT, True) is None


def test_update_tags_rereads_each_original_and_sends_the_rest_when_one_is_refused(server, client):
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 8, 8), np.uint8))
    ok, tagged, broken, odd = server.add_annotations(ds.dataset_id, [
        polygon(), polygon(tags=["cell", KEPT]), polygon(coordinates=[{"x": "1", "y": 1}]), polygon(tags="cell")])
    server.state.annotations[ok]["tags"] = ["cell", "added meanwhile"]  # a user's edit during the job
    report = update_tags(client, KEPT, [ok, tagged, broken, odd, "0" * 24], [], chunk=10)
    assert report.error is None
    assert (report.added, report.already, report.gone) == ([ok], [tagged], ["0" * 24])
    assert report.refused == {"its tags are not a list of text": [odd],
                              "the server refuses its stored document (data.coordinates[] must be objects with "
                              "numeric x and y)": [broken]}
    stored = {d["_id"]: d for d in server.annotations(ds.dataset_id)}
    assert stored[ok]["tags"] == ["cell", "added meanwhile", KEPT]
    assert stored[broken]["tags"] == ["cell"] and stored[odd]["tags"] == "cell"


# -- jobs -----------------------------------------------------------------------------------------------


def scene_dataset(server, n_xy: int = 2, n_t: int = 2, count: int = 4):
    scene = cell_scene(H, W, count, radius=(10.0, 15.0), seed=2)
    pixels = np.broadcast_to(scene.channels, (n_xy, n_t, 1) + scene.channels.shape).copy()
    ds = server.add_dataset(pixels, layers=[{"channel": 0, "color": "#ffffff", "visible": True, "contrast": {
        "mode": "percentile", "blackPoint": 0.5, "whitePoint": 99.5}}])
    return ds, scene


def originals(server, ds, scene, n_xy: int = 2, n_t: int = 2) -> list[str]:
    """Rough outlines (dilated: their refinements overlap them less than 0.99), with fields a
    user or another tool may have set."""
    rng = np.random.default_rng(5)
    docs = []
    for xy in range(n_xy):
        for t in range(n_t):
            for k in range(1, scene.count + 1):
                doc = annotation_doc(rough_polygon(scene.labels == k, "dilated", rng), xy=xy, time=t,
                                     tags=["cell", f"batch-{k % 2}"])
                doc.update(name=f"cell {k}", color="#00ff00", properties={"area": k})
                docs.append(doc)
    return server.add_annotations(ds.dataset_id, docs)


def run_job(server, ds, ckpt, tmp_path, name: str, **fields) -> tuple[int, Reporter, dict[str, Any]]:
    values = {"Model": "sam2.1_hiera_tiny.pt", "Batch XY": "all", "Batch Z": "all", "Batch Time": "all",
              "Tag of objects to refine": ["cell"], "Delete original annotations": False}
    values.update(fields)
    params = {"workerInterface": values, "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 0, "tags": ["refined"]}
    settings = parse_settings(params, ds.dataset_id, ckpt)
    reporter = Reporter(stream=io.StringIO(), secrets=(TOKEN,))
    summary = tmp_path / f"{name}.json"
    os.environ[job.SUMMARY_ENV] = str(summary)
    try:
        with NimbusClient(server.api_url, TOKEN, retry=RetryPolicy(total=1, backoff_factor=0.01)) as client:
            code = job.run_compute(settings, client, reporter, lambda path: (KnownMaskPredictor(), False))
    finally:
        os.environ.pop(job.SUMMARY_ENV, None)
    return code, reporter, json.loads(summary.read_text())


def without_tags(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["_id"]: {k: v for k, v in d.items() if k != "tags"} for d in docs}


def test_kept_warning_counts_by_position_and_reason_ids_only_in_the_summary(server, ckpt, tmp_path):
    ds, scene = scene_dataset(server)
    ids = originals(server, ds, scene)
    code, reporter, summary = run_job(server, ds, ckpt, tmp_path, "one", **{"Minimum overlap with original": 0.99})
    assert code == 0 and summary["kept"] == len(ids) == 16
    warning, = [w for w in reporter.lines if w.get("title") == "Annotations kept"]
    assert warning["warning"] == "16 annotation(s) were kept unchanged at 4 position(s)."
    reason = "its overlap with the original is below the minimum (0.99)"
    for where in ("XY 1, Time 1", "XY 1, Time 2", "XY 2, Time 1", "XY 2, Time 2"):
        assert f"{where}: 4 kept: 4 {reason}" in warning["info"]
    assert 'Set "Tag kept annotations" to tag them' in warning["info"]
    assert not any(i in json.dumps(reporter.lines) for i in ids)  # no id reaches the app
    by_position = summary["kept_by_position"]
    assert set(by_position) == {"XY 1, Z 1, Time 1", "XY 1, Z 1, Time 2", "XY 2, Z 1, Time 1", "XY 2, Z 1, Time 2"}
    assert sorted(i for reasons in by_position.values() for i in reasons[reason]) == sorted(ids)
    assert summary["kept_tag"] is None and server.requests_to("PUT", ".*") == []


def test_kept_tag_changes_nothing_else_and_is_idempotent(server, ckpt, tmp_path):
    ds, scene = scene_dataset(server)
    ids = originals(server, ds, scene)
    before = {d["_id"]: d for d in server.annotations(ds.dataset_id)}
    fields = {"Minimum overlap with original": 0.99, "Tag kept annotations": KEPT}
    code, reporter, summary = run_job(server, ds, ckpt, tmp_path, "one", **fields)
    assert code == 0 and summary["kept"] == 16
    after = {d["_id"]: d for d in server.annotations(ds.dataset_id)}
    assert set(after) == set(before)  # nothing created (all kept), nothing deleted
    for ann_id in ids:  # the stored document: only the tag added, every other field as it was
        assert after[ann_id]["tags"] == [*before[ann_id]["tags"], KEPT]
    assert without_tags(list(after.values())) == without_tags(list(before.values()))
    assert sorted(summary["kept_tag"]["added_ids"]) == sorted(ids)
    warning, = [w for w in reporter.lines if w.get("title") == "Annotations kept"]
    assert f'They carry the tag "{KEPT}": the tag filter shows them.' in warning["info"]
    # the app's tag filter finds them: the server's own tag query
    assert {d["_id"] for d in server._find_annotations({"datasetId": ds.dataset_id, "shape": "polygon",
                                                        "tags": json.dumps([KEPT]), "limit": "0"})[0]} == set(ids)

    puts = len(server.requests_to("PUT", "upenn_annotation/multiple"))
    code, _, again = run_job(server, ds, ckpt, tmp_path, "two", **fields)
    assert code == 0 and again["kept"] == 16
    assert server.annotations(ds.dataset_id) == list(after.values())  # nothing changed at all
    assert len(server.requests_to("PUT", "upenn_annotation/multiple")) == puts  # nothing sent
    assert sorted(again["kept_tag"]["already_tagged_ids"]) == sorted(ids)


@pytest.mark.parametrize("delete", [False, True], ids=["originals_stay", "originals_deleted"])
def test_a_kept_original_refined_later_loses_nothing(server, ckpt, tmp_path, delete):
    """Run 1 keeps and tags; run 2 (no minimum overlap) refines them. The kept tag is a status:
    taken from originals that stay, never copied to a refinement; everything else is kept
    (with "Keep original tags" the refinement carries every other tag of its original)."""
    ds, scene = scene_dataset(server, n_xy=1, n_t=1)
    ids = originals(server, ds, scene, n_xy=1, n_t=1)
    before = {d["_id"]: d for d in server.annotations(ds.dataset_id)}
    server.add_connections([{"parentId": ids[0], "childId": ids[1], "datasetId": ds.dataset_id}])
    run_job(server, ds, ckpt, tmp_path, "one", **{"Minimum overlap with original": 0.99, "Tag kept annotations": KEPT})
    assert all(KEPT in d["tags"] for d in server.annotations(ds.dataset_id))

    code, _, second = run_job(server, ds, ckpt, tmp_path, "two", **{
        "Tag kept annotations": KEPT, "Keep original tags": True, "Delete original annotations": delete})
    assert code == 0 and second["refined"] == len(ids) and second["kept"] == 0
    stored = {d["_id"]: d for d in server.annotations(ds.dataset_id)}
    for ann_id in ids:
        refinement = stored[second["replacements"][ann_id]]
        assert original_of(refinement) == ann_id
        assert refinement["tags"] == ["refined", *before[ann_id]["tags"]]  # every tag but the status
        if delete:
            assert ann_id not in stored
        else:
            assert stored[ann_id] == before[ann_id]  # the status tag taken away, nothing else changed
    assert sorted(second["kept_tag"]["removed_ids"]) == ([] if delete else sorted(ids))
    if delete:  # the connection moved to the refinements
        link, = server.connections()
        assert (link["parentId"], link["childId"]) == (second["replacements"][ids[0]], second["replacements"][ids[1]])


def test_kept_tag_failure_is_an_error_and_a_rerun_finishes_it(server, ckpt, tmp_path):
    ds, scene = scene_dataset(server, n_xy=1, n_t=1)
    ids = originals(server, ds, scene, n_xy=1, n_t=1)
    server.fail("PUT", "upenn_annotation/multiple", status=500, calls=None)
    fields = {"Minimum overlap with original": 0.99, "Tag kept annotations": KEPT}
    code, reporter, summary = run_job(server, ds, ckpt, tmp_path, "one", **fields)
    assert code == 1
    error = [line for line in reporter.lines if "error" in line][-1]
    assert error["error"] == f'Could not tag the kept annotations with "{KEPT}".'
    assert error["info"].startswith("The server answered HTTP 500: injected failure 500. 0 of the kept annotations")
    assert "running the job again adds the missing tags" in error["info"]
    server.clear_faults()
    code, _, _ = run_job(server, ds, ckpt, tmp_path, "two", **fields)
    assert code == 0 and all(KEPT in d["tags"] for d in server.annotations(ds.dataset_id) if d["_id"] in ids)


def test_a_document_the_server_refuses_is_reported_and_the_others_tagged(server, ckpt, tmp_path):
    ds, scene = scene_dataset(server, n_xy=1, n_t=1)
    ids = originals(server, ds, scene, n_xy=1, n_t=1)
    broken, = server.add_annotations(ds.dataset_id, [{  # kept by the worker, refused by the server's schema
        "shape": "polygon", "tags": ["cell"], "channel": 0, "location": {"XY": 0, "Z": 0, "Time": 0},
        "coordinates": [{"x": "1", "y": 1}, {"x": 30, "y": 2}, {"x": 9, "y": 40}]}])
    code, reporter, summary = run_job(server, ds, ckpt, tmp_path, "one", **{"Minimum overlap with original": 0.99,
                                                                            "Tag kept annotations": KEPT})
    assert code == 0, reporter.lines
    stored = {d["_id"]: d for d in server.annotations(ds.dataset_id)}
    assert all(KEPT in stored[i]["tags"] for i in ids) and stored[broken]["tags"] == ["cell"]
    refused = [w for w in reporter.lines if w.get("warning", "").startswith("1 kept annotation(s) could not be tagged")]
    assert refused and "the server refuses its stored document" in refused[0]["info"]
    assert list(summary["kept_tag"]["refused_ids"].values()) == [[broken]]


def test_a_job_that_stops_before_tagging_says_so(server, ckpt, tmp_path):
    ds, scene = scene_dataset(server, n_xy=2, n_t=1)
    originals(server, ds, scene, n_xy=2, n_t=1)
    server.fail("POST", "upenn_annotation/multiple", status=500)
    code, reporter, summary = run_job(server, ds, ckpt, tmp_path, "one", **{"Tag kept annotations": KEPT,
                                                                            "Batch XY": "all"})
    assert code == 1 and server.requests_to("PUT", ".*") == []
    warning, = [w for w in reporter.lines if w.get("title") == "Annotations kept"]
    assert "not processed: the upload failed" in warning["info"] or "was not uploaded" in warning["info"]
    assert f'They were not tagged "{KEPT}": the job stopped before; running it again tags them.' in warning["info"]
