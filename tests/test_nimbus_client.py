"""Contract tests: the NimbusImage client against the local test server, over real HTTP."""

from __future__ import annotations

import io
import json
import logging
import pickle
import time

import numpy as np
import pytest
import requests

from conftest import TOKEN
from sam2_refine.nimbus.client import MAX_CHUNK, NimbusClient
from sam2_refine.nimbus.errors import NimbusAPIError, PartialCreateError
from sam2_refine.nimbus.retry import RetryPolicy, Timeouts
from sam2_refine.nimbus.dataset import frame_map_from_tiles
from sam2_refine.nimbus.progress import Reporter
from sam2_refine.testing.nimbus_server import NimbusTestServer


def polygon(x: float = 10, y: float = 10, tags: list[str] | None = None, xy: int = 0) -> dict:
    return {"shape": "polygon", "tags": tags if tags is not None else ["cell"], "channel": 0,
            "location": {"XY": xy, "Z": 0, "Time": 0},
            "coordinates": [{"x": x, "y": y}, {"x": x + 5, "y": y}, {"x": x + 5, "y": y + 5}]}


def multi_dimensional_pixels() -> np.ndarray:
    """3 channels x 2 Z x 2 Time x 2 XY, uint16, every frame different: (XY, T, Z, C, H, W)."""
    rng = np.random.default_rng(7)
    return rng.integers(0, 65535, size=(2, 2, 2, 3, 37, 53), dtype=np.uint16)


# -- dataset, frames, pixels ------------------------------------------------------------------

def test_multi_dimensional_dataset_reads_back_pixel_exact(server, client):
    pixels = multi_dimensional_pixels()
    ds = server.add_dataset(pixels, shuffle_frames=True)
    info = client.get_dataset_info(ds.dataset_id)
    assert (info.width, info.height, info.dtype) == (53, 37, "uint16")
    assert (info.num_channels, info.num_z, info.num_time, info.num_xy) == (3, 2, 2, 2)
    for xy in range(2):
        for t in range(2):
            for z in range(2):
                for c in range(3):
                    frame = client.get_frame(info.item_id, info.frame_number(c, xy, z, t))
                    assert frame.dtype == np.uint16
                    np.testing.assert_array_equal(frame, pixels[xy, t, z, c])


def test_frame_window_is_exact(server, client):
    pixels = multi_dimensional_pixels()
    ds = server.add_dataset(pixels)
    info = client.get_dataset_info(ds.dataset_id)
    frame = info.frame_number(2, 1, 1, 0)
    window = client.get_frame(info.item_id, frame, window=(5, 7, 31, 30))  # left, top, right, bottom
    np.testing.assert_array_equal(window, pixels[1, 0, 1, 2, 7:30, 5:31])
    request = server.requests_to("GET", r"item/\w+/tiles/region")[-1]
    assert request.params["encoding"] == "pickle:5"
    assert (request.params["left"], request.params["top"]) == ("5", "7")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_dtypes_kept(server, client, dtype):
    pixels = (np.arange(2 * 20 * 30).reshape(1, 1, 1, 2, 20, 30) * 3).astype(dtype)
    ds = server.add_dataset(pixels)
    info = client.get_dataset_info(ds.dataset_id)
    frame = client.get_frame(info.item_id, info.frame_number(1, 0, 0, 0))
    assert frame.dtype == dtype
    np.testing.assert_array_equal(frame, pixels[0, 0, 0, 1])


def test_single_frame_dataset_has_no_frames_list(server, client):
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 8, 9), np.uint8))
    tiles = client.get_tiles(ds.item_id)
    assert "frames" not in tiles
    info = client.get_dataset_info(ds.dataset_id)
    assert info.frames.shape == (1, 1, 1, 1) and info.frame_number(0, 0, 0, 0) == 0
    with pytest.raises(KeyError):
        info.frame_number(1, 0, 0, 0)


def test_size_one_axes_absent_from_index_range(server, client):
    ds = server.add_dataset(np.zeros((1, 3, 1, 2, 4, 4), np.uint16))  # Time 3, C 2
    tiles = client.get_tiles(ds.item_id)
    assert tiles["IndexRange"] == {"IndexT": 3, "IndexC": 2}
    assert all("IndexZ" not in f and "IndexXY" not in f for f in tiles["frames"])
    info = client.get_dataset_info(ds.dataset_id)
    assert (info.num_channels, info.num_time, info.num_z, info.num_xy) == (2, 3, 1, 1)


def test_frame_map_uses_frame_numbers_not_positions():
    tiles = {"frames": [{"Frame": 1, "IndexC": 1}, {"Frame": 0, "IndexC": 0}], "IndexRange": {"IndexC": 2}}
    table = frame_map_from_tiles(tiles)
    assert table[0, 0, 0, 0] == 0 and table[1, 0, 0, 0] == 1


def test_image_item_selection(server, client):
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8), select_image=False, extra_items=2)
    assert client.find_image_item(ds.dataset_id)["_id"] == ds.item_id  # first with largeImage
    ds2 = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8), select_image=True)
    assert client.find_image_item(ds2.dataset_id)["_id"] == ds2.item_id
    assert client.get_folder(ds2.dataset_id)["meta"]["selectedLargeImageId"] == ds2.item_id
    assert client.get_internal_metadata(ds2.item_id)["dtype"] == "uint8"


def test_network_pickles_go_only_through_the_restricted_unpickler(server, client, monkeypatch):
    """Frames arrive as pickles (pickle:5), read by frame_decoding's allow-listed unpickler:
    pickle.loads / pickle.load (which would run any global) are never called."""
    ds = server.add_dataset(multi_dimensional_pixels())
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    frame = client.get_frame(ds.item_id, 0)
    assert frame.shape == (37, 53)
    assert all(r.params.get("encoding") == "pickle:5" for r in server.requests_to("GET", r"item/\w+/tiles/region"))


def test_layer_settings(server, client):
    layers = [{"id": "a", "channel": 1, "color": "#ff0000", "visible": True,
               "contrast": {"mode": "percentile", "blackPoint": 1, "whitePoint": 99}}]
    ds = server.add_dataset(np.zeros((1, 1, 1, 2, 4, 4), np.uint8), layers=layers)
    assert client.get_layers(ds.dataset_id).layers == layers
    bare = server.add_dataset(np.zeros((1, 1, 1, 2, 4, 4), np.uint8))
    assert client.get_layers(bare.dataset_id).layers is None


# -- annotations ------------------------------------------------------------------------------

def test_annotation_paging_and_chunking_with_20000(server, client):
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8))
    docs = [dict(polygon(i % 100, i // 100), datasetId=ds.dataset_id) for i in range(20_000)]
    started = time.perf_counter()
    created = client.create_annotations(docs)
    create_s = time.perf_counter() - started
    posts = server.requests_to("POST", "upenn_annotation/multiple")
    assert len(posts) == 4 and max(len(r.body) for r in posts) <= MAX_CHUNK
    assert len(created) == 20_000
    assert [c["coordinates"][0] for c in created[:3]] == [d["coordinates"][0] for d in docs[:3]]  # input order
    assert [c["coordinates"][0] for c in created[-3:]] == [d["coordinates"][0] for d in docs[-3:]]

    started = time.perf_counter()
    pages = list(client.iter_annotation_pages(ds.dataset_id, "polygon", page_size=3000))
    list_s = time.perf_counter() - started
    listed = [a for page in pages for a in page]
    assert len(listed) == 20_000 and len({a["_id"] for a in listed}) == 20_000
    assert max(len(p) for p in pages) == 3000
    gets = server.requests_to("GET", "upenn_annotation")
    assert len(gets) == 7 and all(r.params["limit"] == "3000" for r in gets)
    assert "afterId" not in gets[0].params and all("afterId" in r.params for r in gets[1:])

    started = time.perf_counter()
    client.delete_annotations([c["_id"] for c in created])
    delete_s = time.perf_counter() - started
    assert len(server.requests_to("DELETE", "upenn_annotation/multiple")) == 4
    assert server.annotations(ds.dataset_id) == []
    print(f"\n20,000 annotations: create {create_s:.2f} s, list {list_s:.2f} s, delete {delete_s:.2f} s")


def test_paging_falls_back_to_offsets_when_cursor_is_ignored(server, client):
    server.cursor_paging = False
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8))
    server.add_annotations(ds.dataset_id, [polygon(i) for i in range(25)])
    assert not client.pages_by_offset
    listed = client.list_annotations(ds.dataset_id, "polygon", page_size=10)
    assert len(listed) == 25 and len({a["_id"] for a in listed}) == 25
    assert client.pages_by_offset  # the job warns that overlapping jobs are not safe then


def test_tag_filter_and_blob_query(server, client):
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8))
    server.add_annotations(ds.dataset_id, [polygon(tags=["a", "b"]), polygon(tags=["a"]), polygon(tags=[])])
    assert len(client.list_annotations(ds.dataset_id, "polygon", tags=["a"])) == 2
    assert len(client.list_annotations(ds.dataset_id, "polygon", tags=["a", "b"])) == 1  # has all
    assert client.list_annotations(ds.dataset_id, "blob") == []
    request = server.requests_to("GET", "upenn_annotation")[0]
    assert json.loads(request.params["tags"]) == ["a"]


def test_list_ids_of_no_id_is_empty_without_a_request(server, client):
    """The plugin answers ``idConstraints: [[]]`` with 400 (helpers/validation.py; seen on the real
    server by scripts/check_real_server.py): no id given matches nothing, and nothing is sent."""
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8))
    kept = server.add_annotations(ds.dataset_id, [polygon(), polygon()])
    assert client.list_annotation_ids(ds.dataset_id, ids=[]) == []
    assert server.requests_to("POST", "upenn_annotation/list/ids") == []
    assert client.list_annotation_ids(ds.dataset_id, ids=kept[:1] + ["f" * 24]) == kept[:1]


def test_validation_failure_is_all_or_nothing(server, client):
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8))
    good = dict(polygon(), datasetId=ds.dataset_id)
    no_tags = {k: v for k, v in good.items() if k != "tags"}
    with pytest.raises(PartialCreateError) as caught:
        client.create_annotations([good, no_tags])
    assert caught.value.status == 400 and "tags" in caught.value.detail
    assert caught.value.created == [] and caught.value.not_created == 2
    assert server.annotations(ds.dataset_id) == []
    for bad in ({**good, "shape": "blob"}, {**good, "channel": "0"}, {**good, "coordinates": []},
                {**good, "datasetId": "000000000000000000000000"}, {**good, "location": {"XY": 0.5}}):
        with pytest.raises(PartialCreateError) as caught:
            client.create_annotations([bad])
        assert caught.value.status == 400


def test_chunk_failure_reports_what_was_created(server, client):
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8))
    docs = [dict(polygon(i), datasetId=ds.dataset_id) for i in range(25)]
    server.fail("POST", "upenn_annotation/multiple", status=500, calls=[2])
    with pytest.raises(PartialCreateError) as caught:
        client.create_annotations(docs, chunk_size=10)
    assert len(caught.value.created) == 10 and caught.value.not_created == 15
    assert len(server.requests_to("POST", "upenn_annotation/multiple")) == 2  # stopped at the failure
    assert len(server.annotations(ds.dataset_id)) == 10


def test_connections(server, client):
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8))
    a, b, c = server.add_annotations(ds.dataset_id, [polygon(), polygon(20), polygon(30)])
    made = client.create_connections([
        {"parentId": a, "childId": b, "datasetId": ds.dataset_id, "label": "x", "tags": ["t"]},
        {"parentId": c, "childId": a, "datasetId": ds.dataset_id, "label": "", "tags": []}])
    assert [m["parentId"] for m in made] == [a, c] and all(m["_id"] for m in made)
    assert len(client.list_connections(ds.dataset_id)) == 2
    assert [m["childId"] for m in client.list_connections(ds.dataset_id, parent_id=a)] == [b]
    assert [m["parentId"] for m in client.list_connections(ds.dataset_id, child_id=a)] == [c]
    before = len(server.requests_to("GET", "annotation_connection"))
    paged = client.list_connections(ds.dataset_id, page_size=1)
    assert [m["_id"] for m in paged] == sorted(m["_id"] for m in made)  # paged with a cursor, in _id order
    pages = server.requests_to("GET", "annotation_connection")[before:]
    assert [r.params.get("afterId") for r in pages] == [None, paged[0]["_id"], paged[1]["_id"]]
    assert all(r.params["sort"] == "_id" for r in pages)
    assert [m["parentId"] for m in client.list_connections(ds.dataset_id, node_id=b)] == [a]
    client.delete_annotations([a])  # NimbusImage's bulk delete leaves the connections behind
    assert len(client.list_connections(ds.dataset_id)) == 2
    client.delete_connections([m["_id"] for m in client.list_connections(ds.dataset_id)])
    with pytest.raises(PartialCreateError) as caught:  # an end that does not exist: 400 for the whole body
        client.create_connections([{"parentId": b, "childId": c, "datasetId": ds.dataset_id, "tags": []},
                                   {"parentId": b, "childId": a, "datasetId": ds.dataset_id, "tags": []}])
    assert caught.value.status == 400 and "child annotation does not exist" in caught.value.detail
    d = client.create_connections([{"parentId": b, "childId": c, "datasetId": ds.dataset_id, "tags": []}])[0]
    client.delete_connections([d["_id"]])
    assert client.list_connections(ds.dataset_id) == []


def test_interface_post(server, client):
    image = "annotations/sam2_refine_worker:latest"
    client.post_interface(image, {"Padding": {"type": "number"}})
    assert server.interface(image) == {"Padding": {"type": "number"}}
    request = server.requests_to("POST", "worker_interface")[0]
    assert request.params["image"] == image


# -- failures, retries, secrets ---------------------------------------------------------------

def test_auth_failure(server):
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8))
    with NimbusClient(server.api_url, "wrong-token") as bad:
        with pytest.raises(NimbusAPIError) as caught:
            bad.get_dataset_info(ds.dataset_id)
    assert caught.value.status == 401
    assert caught.value.method == "GET" and caught.value.endpoint == f"folder/{ds.dataset_id}"


def test_retry_on_503_then_success(server, client):
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8))
    server.fail("GET", r"item/\w+/tiles", status=503, calls=[1, 2])
    info = client.get_dataset_info(ds.dataset_id)
    assert info.width == 4
    statuses = [r.status for r in server.requests_to("GET", r"item/\w+/tiles")]
    assert statuses == [503, 503, 200]


def test_retries_are_bounded(server):
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8))
    server.fail("GET", r"folder/\w+", status=502)
    with NimbusClient(server.api_url, TOKEN, retry=RetryPolicy(total=3, backoff_factor=0.01)) as c:
        with pytest.raises(NimbusAPIError) as caught:
            c.get_folder(ds.dataset_id)
    assert caught.value.status == 502
    assert len(server.requests_to("GET", r"folder/\w+")) == 4  # the first try + 3 retries


def test_500_surfaced_with_method_endpoint_status(server, client):
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8))
    server.fail("DELETE", "upenn_annotation/multiple", status=500)
    with pytest.raises(NimbusAPIError) as caught:
        client.delete_annotations(["650000000000000000000099"])
    error = caught.value
    assert (error.method, error.endpoint, error.status) == ("DELETE", "upenn_annotation/multiple", 500)
    assert "DELETE upenn_annotation/multiple" in str(error) and "500" in str(error)
    assert len(server.requests_to("DELETE", "upenn_annotation/multiple")) == 1  # 500 is not transient
    assert ds.dataset_id


@pytest.mark.parametrize("action,status", [("status", 503), ("status", 502), ("drop_before", 0), ("drop_after", 0)])
def test_create_is_never_blindly_retried(server, client, action, status):
    """A POST that may have reached the server is not sent again: no duplicate annotations."""
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8))
    server.fail("POST", "upenn_annotation/multiple", status=status or 500, calls=[1], action=action)
    with pytest.raises(PartialCreateError) as caught:
        client.create_annotations([dict(polygon(), datasetId=ds.dataset_id)])
    assert len(server.requests_to("POST", "upenn_annotation/multiple")) == 1
    assert caught.value.created == []
    expected_stored = 1 if action == "drop_after" else 0  # the server acted, the answer was lost
    assert len(server.annotations(ds.dataset_id)) == expected_stored


def test_dropped_connection_on_get_is_retried(server, client):
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8))
    server.fail("GET", "upenn_annotation", calls=[1], action="drop_before")
    assert client.list_annotations(ds.dataset_id, "polygon") == []
    assert len(server.requests_to("GET", "upenn_annotation")) == 2


def test_connection_refused_is_an_api_error():
    with NimbusClient("http://127.0.0.1:9/api/v1", TOKEN, retry=RetryPolicy(total=1, backoff_factor=0.01),
                      timeouts=Timeouts(connect=1, read=1)) as c:
        with pytest.raises(NimbusAPIError) as caught:
            c.get_folder("abc")
    assert caught.value.status is None and caught.value.endpoint == "folder/abc"


def test_read_timeout_is_honoured(server):
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8))
    server.fail("GET", r"folder/\w+", action="delay", delay=1.5)
    with NimbusClient(server.api_url, TOKEN, retry=RetryPolicy(total=0),
                      timeouts=Timeouts(connect=2, read=0.3)) as c:
        started = time.perf_counter()
        with pytest.raises(NimbusAPIError) as caught:
            c.get_folder(ds.dataset_id)
        assert time.perf_counter() - started < 1.4
    assert caught.value.status is None and "Timeout" in caught.value.detail


def test_token_absent_from_errors_and_logs(server, caplog):
    """Every error text and log record is free of the token, even when the server echoes it."""
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8))
    caplog.set_level(logging.DEBUG)
    texts = []
    with NimbusClient(server.api_url, TOKEN, retry=RetryPolicy(total=1, backoff_factor=0.01)) as c:
        server.fail("GET", r"folder/\w+", status=500)
        original_handle = server.handle

        def echoing(method, path, params, body, token):  # a server that puts the token in its message
            status, payload, ctype, headers = original_handle(method, path, params, body, token)
            if status >= 400:
                payload = json.dumps({"message": f"bad token {token}"}).encode()
            return status, payload, ctype, headers

        server.handle = echoing
        for call in (lambda: c.get_folder(ds.dataset_id), lambda: c.create_annotations([{"x": 1}]),
                     lambda: c.delete_annotations(["x"])):
            try:
                call()
            except NimbusAPIError as exc:
                texts += [str(exc), repr(exc), exc.detail, str(exc.args)]
    with NimbusClient("http://127.0.0.1:9/api/v1", TOKEN, retry=RetryPolicy(total=0)) as c:
        try:
            c.get_folder(ds.dataset_id)
        except NimbusAPIError as exc:
            texts += [str(exc), repr(exc)]
    assert len(texts) >= 10
    assert "bad token ***" in " ".join(texts)  # the echo arrived, scrubbed
    joined = " ".join(texts) + " ".join(r.getMessage() for r in caplog.records)
    assert TOKEN not in joined


def test_token_sent_only_as_header(server, client):
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8))
    client.get_dataset_info(ds.dataset_id)
    assert all(r.authorized for r in server.requests)
    assert all(TOKEN not in json.dumps(r.params) for r in server.requests)


# -- progress protocol ------------------------------------------------------------------------

class _CountingStream(io.StringIO):
    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_progress_lines_exactly_as_contract():
    stream = _CountingStream()
    reporter = Reporter(stream=stream, secrets=(TOKEN,))
    reporter.progress(0.42, "Refining", "Location 3/7")
    reporter.warning("msg", "details")
    reporter.error(f"failed with {TOKEN}", "details")
    reporter.progress(1.7, "Done")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0] == {"progress": 0.42, "title": "Refining", "info": "Location 3/7"}
    assert lines[1] == {"warning": "msg", "title": "Warning", "info": "details", "type": "warning"}
    assert lines[2] == {"error": "failed with ***", "title": "Error", "info": "details", "type": "error"}
    assert lines[3]["progress"] == 1.0
    assert stream.flushes == 4  # each line flushed at once


def test_server_records_and_rejects_unknown_routes(server):
    response = requests.get(f"{server.api_url}/nope", headers={"Girder-Token": TOKEN}, timeout=5)
    assert response.status_code == 404
    unauth = requests.get(f"{server.api_url}/item", params={"folderId": "x"}, timeout=5)
    assert unauth.status_code == 401
    assert [r.authorized for r in server.requests] == [True, False]


def test_two_servers_use_free_ports():
    with NimbusTestServer() as a, NimbusTestServer() as b:
        assert a.port != b.port and a.api_url.startswith("http://127.0.0.1:")


def test_keep_alive_requests_do_not_wait_for_delayed_acks(server, client):
    """The test server sets TCP_NODELAY: with Nagle's algorithm each keep-alive request waited
    ~40 ms for the client's delayed ACK, which made every HTTP call of a benchmarked job cost
    40 ms that a real Girder server does not."""
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 8, 8), dtype=np.uint16))
    client.get_layers(ds.dataset_id)  # the connection is open from here on
    seconds = []
    for _ in range(9):
        started = time.perf_counter()
        client.get_layers(ds.dataset_id)
        seconds.append(time.perf_counter() - started)
    assert sorted(seconds)[4] < 0.02, seconds
