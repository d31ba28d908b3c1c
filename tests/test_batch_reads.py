"""A job reads what its batch holds (issue 21): list/ids + hydrate per location, one listing where
that is cheaper, older servers read as before; the cases these reads open, forced."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import numpy as np
import pytest
import requests

from conftest import TOKEN
from sam2_refine.job import compute as job
from sam2_refine.job.batch_reads import BatchReader
from sam2_refine.nimbus.client import NimbusClient
from sam2_refine.nimbus.retry import RetryPolicy
from sam2_refine.nimbus.errors import ServerLacksEndpoint
from sam2_refine.nimbus.progress import Reporter
from sam2_refine.annotations import Location
from sam2_refine.job.settings import parse_settings
from sam2_refine.testing.datasets import annotation_doc
from sam2_refine.testing.interleave import Interleaver
from sam2_refine.testing.nimbus_server import NimbusTestServer, RecordedRequest
from sam2_refine.testing.stand_in import KnownMaskPredictor
from test_concurrency import CREATE, Data, assert_converged, force_plan, make_data, refinements, run_in_thread
from test_faults import job_params

IDS = "upenn_annotation/list/ids"
HYDRATE = "upenn_annotation/hydrate"


def others(server: NimbusTestServer, data: Data, n: int, xy: int = 2) -> None:
    """``n`` polygons of the user's at another position (not in the jobs' batch)."""
    server.add_annotations(data.dataset_id, [dict(annotation_doc(np.array([[1, 1], [5, 1], [5, 5]]), xy=0,
                                                                 tags=["other"]),
                                                  location={"XY": xy, "Z": 0, "Time": 0}) for _ in range(n)])


def run(server: NimbusTestServer, data: Data, ckpt, *, delete: bool, batch_xy: str = "1") -> tuple[int, list[dict]]:
    settings = parse_settings(job_params(delete=delete, **{"Tag of objects to refine": ["nucleus"],
                                                           "Batch XY": batch_xy}), data.dataset_id, ckpt)
    stream = io.StringIO()
    with NimbusClient(server.api_url, TOKEN, retry=RetryPolicy(total=1, backoff_factor=0.01)) as client:
        code = job.run_compute(settings, client, Reporter(stream=stream, secrets=(TOKEN,)),
                               lambda path: (KnownMaskPredictor(), False))
    return code, [json.loads(line) for line in stream.getvalue().splitlines()]


# -- the double: list/ids, hydrate, counts, as the plugin answers them ---------------------------------

def post(server, path, body):
    return requests.post(f"{server.api_url}/{path}", json=body, headers={"Girder-Token": TOKEN}, timeout=10)


def test_list_ids_filters(server):
    data = make_data(server, count=3)
    at = {"XY": 1, "Z": 0, "Time": 0}
    ids = post(server, IDS, {"datasetId": data.dataset_id, "filters": {"location": at}}).json()
    assert ids == {"total": 4, "ids": sorted(data.by_xy[1] + [data.others[1]])}
    by_xy = post(server, IDS, {"datasetId": data.dataset_id, "filters": {"location": {"XY": 0}}}).json()
    assert set(by_xy["ids"]) == set(data.by_xy[0] + [data.others[0]])  # Z and Time left out: any
    tagged = post(server, IDS, {"datasetId": data.dataset_id,
                                "filters": {"tags": {"values": ["group", "x"], "exclusive": False}}}).json()
    assert tagged["ids"] == sorted(data.others)  # has any of the tags
    exact = post(server, IDS, {"datasetId": data.dataset_id,
                               "filters": {"tags": {"values": ["group", "x"], "exclusive": True}}}).json()
    assert exact["ids"] == []  # exactly these tags
    some = post(server, IDS, {"datasetId": data.dataset_id,
                              "filters": {"idConstraints": [[data.others[0], "f" * 24]], "shape": "polygon"}}).json()
    assert some["ids"] == [data.others[0]]
    assert post(server, IDS, {"datasetId": data.dataset_id, "filters": {"shape": "point"}}).json()["ids"] == []


@pytest.mark.parametrize("body,message", [
    ([], "Request body must be a JSON object"),
    ({}, "datasetId is required"),
    ({"datasetId": "nope"}, "datasetId is not a valid id"),
    ({"datasetId": "DS", "filters": "x"}, "filters must be an object"),
    ({"datasetId": "DS", "filters": {"tags": ["a"]}}, "filters.tags must be an object"),
    ({"datasetId": "DS", "filters": {"tags": {"values": "a"}}}, "filters.tags.values must be a list"),
    ({"datasetId": "DS", "filters": {"location": 3}}, "filters.location must be an object"),
    ({"datasetId": "DS", "filters": {"idConstraints": [[]]}}, "idConstraints must be a list of non-empty lists"),
    ({"datasetId": "DS", "filters": {"idConstraints": [["zz"]]}}, "idConstraints contains an invalid id"),
])
def test_list_ids_validation(server, body, message):
    """helpers/validation.py: malformed input is a clean 400."""
    data = make_data(server, count=1)
    if isinstance(body, dict) and body.get("datasetId") == "DS":
        body = {**body, "datasetId": data.dataset_id}
    answer = post(server, IDS, body)
    assert answer.status_code == 400 and message in answer.json()["message"]


def test_hydrate_and_counts(server):
    data = make_data(server, count=2)
    wanted = [data.others[0], data.by_xy[1][1], "a" * 24]
    docs = post(server, HYDRATE, wanted).json()
    assert [d["_id"] for d in docs] == sorted(wanted[:2])  # the missing id is simply absent
    assert post(server, HYDRATE, ["not-an-id"]).status_code == 400
    assert post(server, HYDRATE, {"ids": []}).status_code == 400
    count = requests.get(f"{server.api_url}/upenn_annotation/count", params={"datasetId": data.dataset_id},
                         headers={"Girder-Token": TOKEN}, timeout=10).json()
    assert count == {"count": 6}
    links = requests.get(f"{server.api_url}/annotation_connection/count", params={"datasetId": data.dataset_id},
                         headers={"Girder-Token": TOKEN}, timeout=10).json()
    assert links == {"count": len(data.links)}


def test_an_older_server_has_no_list_ids(server, client):
    server.has_list_ids = False
    data = make_data(server, count=1)
    for call in (lambda: client.list_annotation_ids(data.dataset_id), lambda: client.hydrate([data.others[0]])):
        with pytest.raises(ServerLacksEndpoint) as caught:
            call()
        assert caught.value.status == 404


def test_list_ids_walks_the_dataset_and_a_page_walks_what_it_holds(server):
    """The plugin's list/ids is hinted to {datasetId, _id}: every query walks all of the dataset.
    A cursor page walks the index from the cursor, only as far as it takes to fill the page."""
    data = make_data(server, n_xy=1, count=2)
    others(server, data, 500, xy=0)
    store = server.state.annotations
    seen: list[str] = []

    def keep(doc):
        seen.append(doc["_id"])
        return True

    store.scan(data.dataset_id, keep)
    assert len(seen) == 503
    seen.clear()
    ids = sorted(d["_id"] for d in server.annotations(data.dataset_id))
    page = store.page(data.dataset_id, "polygon", keep, after=ids[400], limit=10)
    assert [d["_id"] for d in page] == ids[401:411] and len(seen) == 10


# -- jobs: what they read ------------------------------------------------------------------------------

@pytest.mark.parametrize("delete", [False, True])
def test_a_job_reads_its_location_not_the_dataset(server, ckpt, delete):
    """XY 1 of a dataset whose XY 3 holds 2000 other polygons: no listing of the dataset, and every
    document the server sends is one of XY 1's (hydrated once or, for refinements, re-read)."""
    data = make_data(server, n_xy=2, count=4)
    others(server, data, 2000, xy=2)
    code, lines = run(server, data, ckpt, delete=delete)
    assert code == 0, lines
    assert server.requests_to("GET", "upenn_annotation") == []  # no listing
    queries = server.requests_to("POST", IDS)
    assert queries and all(r.body["filters"]["location"]["XY"] == 0 for r in queries)
    hydrated = [i for r in server.requests_to("POST", HYDRATE) for i in r.body]
    at_xy1 = set(data.by_xy[0]) | {data.others[0]}
    made = {i for ids in refinements(server, data.dataset_id).values() for i in ids}
    assert set(hydrated) <= at_xy1 | made | set(data.by_xy[1])  # connection ends (the track) are looked up too
    assert len(hydrated) < 60
    assert_converged(server, data, delete=delete, originals=data.by_xy[0])


def test_an_older_server_is_read_as_before_and_said_once(server, ckpt, caplog):
    server.has_list_ids = False
    data = make_data(server, n_xy=2, count=3)
    others(server, data, 300, xy=2)
    with caplog.at_level(logging.WARNING, logger="sam2_refine.job.batch_reads"):
        code, lines = run(server, data, ckpt, delete=True)
    assert code == 0, lines
    said = [r for r in caplog.records if "has no upenn_annotation" in r.getMessage()]
    assert len(said) == 1 and "costs what the dataset holds" in said[0].getMessage()
    assert server.requests_to("GET", "upenn_annotation")  # listed by cursor, as before
    assert_converged(server, data, delete=True, originals=data.by_xy[0])


@pytest.mark.parametrize("queries", [True, False])
def test_the_same_outcome_by_queries_or_by_listing(server, ckpt, monkeypatch, queries):
    force_plan(monkeypatch, queries)
    data = make_data(server, n_xy=2, count=4)
    code, lines = run(server, data, ckpt, delete=True, batch_xy="all")
    assert code == 0, lines
    assert_converged(server, data, delete=True)
    listed = server.requests_to("GET", "upenn_annotation")
    assert bool(listed) != queries


# -- the cases these reads open, forced ----------------------------------------------------------------

@pytest.mark.parametrize("change", ["deleted", "created"])
def test_an_annotation_changed_between_list_ids_and_hydrate(server, ckpt, monkeypatch, change):
    """Between the selection's list/ids and its hydrate, the user deletes one of the location's
    outlines, or draws a new one. A deleted one is not hydrated: never refined, nothing made for
    it. A new one was not in the reading: left for the next run, which refines it."""
    force_plan(monkeypatch, queries=True)
    data = make_data(server, n_xy=1, count=4)
    gone, new = data.originals[1], []

    def between(record: RecordedRequest) -> None:
        if record.method == "POST" and record.path == HYDRATE and not new and gone in record.body:
            if change == "deleted":
                server.state.annotations.pop(gone)
            new.extend(server.add_annotations(data.dataset_id, [
                annotation_doc(np.array([[40, 40], [60, 40], [60, 60], [40, 60]]), xy=0, tags=["nucleus"])])
                if change == "created" else ["-"])

    server.before_acting = between
    code, lines = run(server, data, ckpt, delete=True)
    assert code == 0, lines
    made = refinements(server, data.dataset_id)
    if change == "deleted":
        assert gone not in made
        assert set(made) == set(data.originals) - {gone}
    else:
        assert new[0] not in made and new[0] in {d["_id"] for d in server.annotations(data.dataset_id)}
        server.before_acting = None
        code, lines = run(server, data, ckpt, delete=True)  # the next run refines it
        assert code == 0, lines
        assert new[0] in refinements(server, data.dataset_id)


def test_a_refinement_made_by_another_job_between_two_locations_reads(server, ckpt, monkeypatch):
    """job a refines XY 1 then XY 2; after it read XY 1 (selection) and before its re-read of XY 2,
    job b (batch XY 2) uploads its refinements there. a's re-read of XY 2 finds them: a does not
    refine XY 2 again, and the dataset ends with one refinement per original."""
    force_plan(monkeypatch, queries=True)
    data = make_data(server, n_xy=2, count=3)
    lane = Interleaver(server)
    second_xy = {"XY": 1, "Z": 0, "Time": 0}
    lane.hold("a", "POST", IDS, nth=None, when=lambda r: r.body["filters"].get("location") == second_xy
              and "tags" in r.body["filters"], until=lambda: lane.answered("b", "POST", CREATE) >= 1)
    outcome: dict[str, Any] = {}
    first = run_in_thread(server, data, "a", ckpt, delete=True, outcome=outcome)
    # b starts once a has read both locations (its selection hydrates each)
    lane.hold("b", "GET", "folder/.*", until=lambda: lane.answered("a", "POST", HYDRATE) >= 2 or not first.is_alive())
    second = run_in_thread(server, data, "b", ckpt, delete=True, batch_xy="2", outcome=outcome)
    first.join(120)
    second.join(120)
    assert not lane.timed_out
    assert outcome["a"]["code"] == 0 and outcome["b"]["code"] == 0, (outcome["a"]["lines"], outcome["b"]["lines"])
    made_by_a = [d for r in server.requests_to("POST", CREATE, "a") for d in r.body]
    assert {d["location"]["XY"] for d in made_by_a} == {0}  # a made nothing at XY 2
    assert_converged(server, data, delete=True)


def test_reader_existing_and_connections(server, client):
    data = make_data(server, n_xy=2, count=2)
    reader = BatchReader(client, data.dataset_id, ((0,), (0,), (0,)), (2, 1, 1))
    assert reader.existing({data.originals[0], "b" * 24}) == {data.originals[0]}
    touching = reader.connections_touching({data.by_xy[0][0]})
    assert {(c["parentId"], c["childId"]) for c in touching} == {
        (p, c) for p, c, _ in data.links if data.by_xy[0][0] in (p, c)}
    assert reader.holds(Location(0, 0, 0)) and not reader.holds(Location(1, 0, 0)) and not reader.holds(None)
