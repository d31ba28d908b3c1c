"""The pure parts of scripts/check_real_server.py (the check itself needs NimbusImage and
large_image checkouts and is not run here; see docs/real-server-check.md), and its frame
recorder, request recorder and reads probe run through the worker's own client against the
local test server."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from real_server import checks, reads, recorder, venv  # noqa: E402
from real_server.dataset import default_layers, expected_pixels, extra_polygons, multi_source_config  # noqa: E402
from real_server.observe import compare_reads, normalise, observe_reads, substitute_noops  # noqa: E402
from real_server.output import Output, Result, database_label, exit_code, summary_line  # noqa: E402
from real_server.rest import Rest  # noqa: E402
from real_server.worker import Worker, interface_argv  # noqa: E402

A, B, C, D = ("a" * 24, "b" * 24, "c" * 24, "d" * 24)


def refinement(doc_id: str, original: str) -> dict:
    return {"_id": doc_id, "sam2Refine": {"originalId": original}}


# -- output ------------------------------------------------------------------------------------


def test_summary_line_counts_passes_and_failures():
    results = [Result("x", True), Result("y", False), Result("z", True)]
    assert summary_line(results) == "2 passed, 1 failed"
    assert exit_code(results) == 1
    assert exit_code([Result("x", True)]) == 0
    assert exit_code([]) == 1  # a check that checked nothing has not passed


def test_every_line_names_the_database_but_the_last_is_the_bare_count():
    stream = io.StringIO()
    out = Output(database_label(None, "mongomock_ng 7.11.1"), stream)
    out.say("two\nlines")
    out.check("frames exact", False, "got uint8")
    out.check("nothing lost", True)
    code = out.finish()
    lines = stream.getvalue().splitlines()
    assert code == 1
    assert lines[-1] == "1 passed, 1 failed"
    assert all(line.startswith("[substitute DB: mongomock_ng 7.11.1, not MongoDB] ") for line in lines[:-1])
    assert "FAIL frames exact: got uint8" in lines[2] and "PASS nothing lost" in lines[3]
    assert database_label("mongodb://127.0.0.1:1/x", "") == "[MongoDB]"


# -- checks ------------------------------------------------------------------------------------


def test_one_refinement_per_original():
    docs = [{"_id": A}, refinement(C, A), refinement(D, B)]
    assert checks.one_refinement_per_original([A, B], docs).passed
    twice = docs + [refinement("e" * 24, A)]
    verdict = checks.one_refinement_per_original([A, B], twice)
    assert not verdict.passed and A in verdict.detail


def test_nothing_lost_needs_the_original_or_exactly_one_refinement():
    assert checks.nothing_lost([A, B], [{"_id": A}, refinement(C, B)]).passed
    gone = checks.nothing_lost([A, B], [{"_id": A}])
    assert not gone.passed and B in gone.detail
    doubled = checks.nothing_lost([B], [refinement(C, B), refinement(D, B)])
    assert not doubled.passed


def test_a_connection_to_a_deleted_annotation_fails():
    annotations = [{"_id": A}, {"_id": C}]
    assert checks.no_dangling_connection([{"_id": "k", "parentId": A, "childId": C}], annotations).passed
    verdict = checks.no_dangling_connection([{"_id": "k", "parentId": A, "childId": B}], annotations)
    assert not verdict.passed and "k" in verdict.detail


def test_connections_kept_follow_the_refinement_of_a_replaced_end():
    annotations = [{"_id": A}, refinement(C, B)]  # B replaced by C
    moved = [{"_id": "k", "parentId": A, "childId": C}]
    assert checks.connections_kept([(A, B)], annotations, moved).passed
    assert not checks.connections_kept([(A, B)], annotations, []).passed
    # an end that is still on the server must keep its own connection
    assert not checks.connections_kept([(A, B)], [{"_id": A}, {"_id": B}, refinement(C, B)], moved).passed


def _record(pixels: np.ndarray, frame: int = 0, window=None) -> dict:
    return {"frame": frame, "window": window, "dtype": str(pixels.dtype), "shape": list(pixels.shape),
            "sha256": checks.digest(pixels), "min": int(pixels.min()), "max": int(pixels.max())}


def test_frames_exact_against_an_eight_bit_squeeze():
    source = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 7 % 4096).astype(np.uint16)
    expected = lambda frame, window: source if window is None else source[window[1]:window[3], window[0]:window[2]]  # noqa: E731
    assert checks.frames_exact([_record(source), _record(source[5:9, 2:30], window=[2, 5, 30, 9])], expected).passed
    squeezed = (source // 256).astype(np.uint8)  # large_image's encoding=TIFF of a uint16 frame
    verdict = checks.frames_exact([_record(squeezed)], expected)
    assert not verdict.passed and "got uint8" in verdict.detail and "expected uint16" in verdict.detail
    assert not checks.frames_exact([], expected).passed
    assert not checks.frames_exact([{"frame": 0, "window": None, "error": "NimbusAPIError: x"}], expected).passed
    unreadable = checks.frames_exact([{**_record(source), "frame": -1}], expected)  # the recorder lost the number
    assert not unreadable.passed and "could not read" in unreadable.detail


def test_digest_is_the_same_for_either_byte_order():
    pixels = np.arange(12, dtype=np.uint16).reshape(3, 4)
    assert checks.digest(pixels) == checks.digest(pixels.astype(">u2"))
    assert checks.digest(pixels) != checks.digest(pixels.astype(np.uint8))


# -- the dataset as the app writes it -------------------------------------------------------------


def test_multi_source_and_layers_as_the_app_writes_them():
    config = multi_source_config(2)
    assert config["sources"][0]["framesAsAxes"] == {"xy": 2, "c": 1}
    assert config["channels"] == ["DAPI", "CY5"] and config["uniformSources"] is True
    layers = default_layers()
    assert [layer["channel"] for layer in layers] == [0, 1]
    assert layers[0]["color"] == "#007FFF" and layers[0]["contrast"]["mode"] == "percentile"


def test_expected_pixels_follow_the_servers_frame_numbers():
    class Source:
        pages = np.arange(2 * 2 * 4 * 5, dtype=np.uint16).reshape(2, 2, 4, 5)

    tiles = {"frames": [{"Frame": 0, "Index": 0, "IndexXY": 0, "IndexC": 0},
                        {"Frame": 1, "Index": 0, "IndexXY": 0, "IndexC": 1},
                        {"Frame": 2, "Index": 1, "IndexXY": 1, "IndexC": 0},
                        {"Frame": 3, "Index": 1, "IndexXY": 1, "IndexC": 1}]}
    expected = expected_pixels(Source(), tiles)
    assert np.array_equal(expected(2, None), Source.pages[1, 0])
    assert np.array_equal(expected(1, (1, 2, 4, 4)), Source.pages[0, 1][2:4, 1:4])


# -- the environment ---------------------------------------------------------------------------


def test_install_plan_takes_the_sources_the_checkout_names(tmp_path):
    large = tmp_path / "large_image"
    large.mkdir()
    (large / "requirements-dev.txt").write_text("-e sources/tiff\n-e sources/gdal\n-e sources/multi[all]\n")
    plan = venv.install_plan(tmp_path / "NimbusImage", large, "5.0.21", have_libvips=False)
    flat = [arg for step in plan for arg in step]
    assert "girder==5.0.21" in flat and str(large / "sources" / "tiff") in flat
    assert str(large / "sources" / "multi") in flat and str(large / "sources" / "gdal") not in flat
    assert "pyvips-binary" in flat and venv.SUBSTITUTE_PACKAGE in flat
    assert "pyvips-binary" not in [a for s in venv.install_plan(tmp_path, large, "5.0.21", True) for a in s]


def test_the_worker_package_never_imports_the_check():
    for path in (REPO / "sam2_refine").rglob("*.py"):
        text = path.read_text()
        assert "real_server" not in text and "check_real_server" not in text, path


def test_the_command_refuses_paths_that_are_not_checkouts(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    import check_real_server

    code = check_real_server.main(["--nimbus", str(tmp_path), "--large-image", str(tmp_path),
                                   "--workdir", str(tmp_path / "w")])
    assert code == 2
    assert "not a NimbusImage checkout" in capsys.readouterr().err


# -- the frame recorder, through the worker's own client ------------------------------------------


def test_the_frame_recorder_sees_what_the_workers_client_returns(tmp_path):
    from sam2_refine.testing.nimbus_server import NimbusTestServer

    pixels = (np.arange(2 * 40 * 56, dtype=np.uint32).reshape(2, 40, 56) * 37 % 4096).astype(np.uint16)
    with NimbusTestServer(token="tok") as server:
        dataset = server.add_dataset(pixels[None, None, None])  # one position, two channels: frames 0, 1
        worker = Worker(REPO, Path(sys.executable), tmp_path, "stand-in", tmp_path)
        records = worker.probe_frames(server.api_url, "tok", dataset.item_id, [0, 1])
    assert [r["frame"] for r in records] == [0, 1], (tmp_path / "probe.stderr.txt").read_text()
    by_frame = {0: pixels[0], 1: pixels[1]}
    verdict = checks.frames_exact(records, lambda frame, window: by_frame[frame])
    assert verdict.passed, verdict.detail
    squeezed = checks.frames_exact(records, lambda frame, window: (by_frame[frame] // 256).astype(np.uint8))
    assert not squeezed.passed  # the recorder's digests tell the source from an 8-bit copy


# -- the reads of issue 21: recorder, probe, verdicts -----------------------------------------------

XY0 = {"XY": 0, "Z": 0, "Time": 0}


def _request(endpoint: str, method: str = "POST", ok: bool = True, params: dict | None = None, body=None,
             result=None, **extra) -> dict:
    return {"method": method, "endpoint": endpoint, "params": params or {}, "body": body, "ok": ok,
            "result": result, **extra}


def test_the_recorder_summarises_bodies_and_answers_without_headers():
    body = {"datasetId": "d", "filters": {"location": {"XY": 0}, "idConstraints": [["a", "b"], ["c"]]}}
    assert recorder.summarise_body("upenn_annotation/list/ids", body) == {
        "datasetId": "d", "filters": {"location": {"XY": 0}, "idConstraints": [2, 1]}}
    assert recorder.summarise_body("upenn_annotation/hydrate", ["a", "b"]) == {"items": 2, "ids": ["a", "b"]}
    assert recorder.summarise_result("upenn_annotation/list/ids", {"total": 1, "ids": ["a"]}) == {
        "total": 1, "ids": ["a"]}
    docs = [{"_id": "a", "location": {"XY": 1, "Z": 0, "Time": 2}}, {"_id": "b"}]
    assert recorder.summarise_result("upenn_annotation/hydrate", docs) == {
        "count": 2, "docs": [["a", 1, 0, 2], ["b", None, None, None]]}
    assert recorder.summarise_result("annotation_connection", [{"_id": "k"}]) == {"count": 1, "ids": ["k"]}
    assert recorder.summarise_result("upenn_annotation/count", {"count": 3}) == {"count": 3}
    record = recorder.record_of("GET", "upenn_annotation", {"datasetId": "d", "limit": 5, "token": "x"}, None)
    assert record["params"] == {"datasetId": "d", "limit": 5}  # only the parameters that choose a read


def test_the_recorder_wraps_the_workers_client_and_takes_itself_out(server, client):
    from sam2_refine.nimbus.client import NimbusClient
    from sam2_refine.nimbus.errors import NimbusAPIError

    before = NimbusClient._request
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8))
    seen: list[dict] = []
    uninstall = recorder.install(seen.append)
    try:
        client.count_annotations(ds.dataset_id)
        with pytest.raises(NimbusAPIError):
            client.count_annotations("f" * 24)
    finally:
        uninstall()
    assert NimbusClient._request is before
    assert [(r["endpoint"], r["ok"]) for r in seen] == [("upenn_annotation/count", True),
                                                        ("upenn_annotation/count", False)]
    assert seen[0]["result"] == {"count": 0} and seen[1]["status"] == 400
    assert "SECRET" not in json.dumps(seen)


def _reads_dataset(server) -> tuple[str, list[dict], list[dict], str, str]:
    """A dataset like the check's reads dataset, on the local test server: nuclei and spots at two
    positions, the extra annotations, connections; another dataset's annotation; a deleted id."""
    ds = server.add_dataset(np.zeros((2, 1, 1, 1, 8, 8), np.uint8)).dataset_id
    square = [{"x": 1, "y": 1}, {"x": 5, "y": 1}, {"x": 5, "y": 5}]
    nuclei = server.add_annotations(ds, [{"shape": "polygon", "tags": ["nucleus"], "channel": 0, "coordinates": square,
                                          "location": {"XY": xy, "Z": 0, "Time": 0}} for xy in (0, 0, 0, 1, 1)])
    spots = server.add_annotations(ds, [{"shape": "point", "tags": ["spot"], "channel": 1, "coordinates": square[:1],
                                         "location": {"XY": xy, "Z": 0, "Time": 0}} for xy in (0, 1)])
    extra = server.add_annotations(ds, reads.extra_docs(ds))
    server.add_connections([{"parentId": p, "childId": c, "datasetId": ds}
                            for p, c in [(spots[0], nuclei[0]), (nuclei[0], nuclei[1]), (extra[3], nuclei[0]),
                                         (spots[1], nuclei[3])]])
    other_ds = server.add_dataset(np.zeros((1, 1, 1, 1, 8, 8), np.uint8)).dataset_id
    other = server.add_annotations(other_ds, [{"shape": "polygon", "tags": ["x"], "channel": 0,
                                               "coordinates": square, "location": XY0}])[0]
    gone = server.add_annotations(ds, [{"shape": "polygon", "tags": [], "channel": 0, "coordinates": square,
                                        "location": XY0}])[0]
    server.state.annotations.pop(gone)
    annotations = server.annotations(ds)
    connections = [c for c in server.state.connections.of_dataset(ds, sort_by_id=True)]
    return ds, annotations, connections, other, gone


def test_the_reads_probe_through_the_workers_client_passes_on_a_server_that_answers_right(tmp_path):
    """reads_probe.py run in a subprocess with the worker's tree, against the local test server:
    every verdict passes, and each forced plan read the way it says."""
    from sam2_refine.testing.nimbus_server import NimbusTestServer

    with NimbusTestServer(token="tok") as server:
        ds, annotations, connections, other, gone = _reads_dataset(server)
        world = reads.World(ds, {d["_id"]: d for d in server.annotations()}, connections)
        spec = reads.probe_spec(ds, annotations, connections, other, gone)
        worker = Worker(REPO, Path(sys.executable), tmp_path, "stand-in", tmp_path)
        results = worker.probe_reads(server.api_url, "tok", spec)
    assert [r["name"] for r in results] == [c["name"] for c in spec["calls"]]
    for call, result in zip(spec["calls"], results):
        verdict = reads.verdict(call, result, world)
        assert verdict.passed, (call["name"], verdict.detail)
    by_name = {r["name"]: r for r in results}
    plan = by_name["BatchReader.annotations, per-location plan, XY 1 Time 2, polygons"]["value"]["plan"]
    assert plan == [{"XY": 0, "Time": 1}]
    # Each verdict can fail: a server that hid one annotation from list/ids is caught.
    call = spec["calls"][0]
    short = {**by_name[call["name"]], "value": {"ids": by_name[call["name"]]["value"]["ids"][1:]}}
    assert not reads.verdict(call, short, world).passed


def test_a_forced_plan_that_read_the_other_way_fails():
    call = {"name": "x", "op": "reader_annotations", "batch": [[0], [0], [1]], "sizes": [2, 1, 2],
            "costs": "queries", "shapes": ["polygon"]}
    world = reads.World("ds", {"a": {"_id": "a", "datasetId": "ds", "shape": "polygon",
                                     "location": {"XY": 0, "Z": 0, "Time": 1}}})
    doc = {"_id": "a", "datasetId": "ds", "shape": "polygon", "location": {"XY": 0, "Z": 0, "Time": 1}}
    queried = [_request("upenn_annotation/list/ids", body={"filters": {"location": {"XY": 0, "Time": 1}}}),
               _request("upenn_annotation/hydrate")]
    good = {"value": {"docs": [doc], "plan": [{"XY": 0, "Time": 1}]}, "requests": queried}
    assert reads.verdict(call, good, world).passed
    listed = {**good, "requests": [_request("upenn_annotation", "GET", params={"datasetId": "ds"})]}
    assert not reads.verdict(call, listed, world).passed
    failed = {**good, "requests": queried + [_request("upenn_annotation/list/ids", ok=False, status=500)]}
    assert not reads.verdict(call, failed, world).passed
    assert not reads.verdict(call, {"error": {"type": "NimbusAPIError", "status": 400, "detail": "x"}}, world).passed
    assert reads.expected_plan({**call, "batch": [[0, 1], [0], [0]]}) == [{"Time": 0}]


def _job_records(filters: list[dict], shipped: list[list], per_node: int = 0, listed: int = 0,
                 connection_pages: list[dict] | None = None) -> list[dict]:
    records = [_request("upenn_annotation/count", "GET", params={"datasetId": "d"}, result={"count": 9})]
    records += [_request("upenn_annotation/list/ids", body={"datasetId": "d", "filters": f}) for f in filters]
    records.append(_request("upenn_annotation/hydrate", body={"items": len(shipped)},
                            result={"count": len(shipped), "docs": shipped}))
    records += [_request("annotation_connection", "GET", params={"datasetId": "d", "nodeAnnotationId": f"n{i}",
                                                                 "sort": "_id"}) for i in range(per_node)]
    records += [_request("upenn_annotation", "GET", params={"datasetId": "d", "shape": "polygon", "sort": "_id"},
                         result={"count": 1, "docs": [["z", 1, 0, 0]]}) for _ in range(listed)]
    records += [_request("annotation_connection", "GET", params={"datasetId": "d", **page})
                for page in connection_pages or []]
    return records


def _first(location):
    return location == (0, 0, 0)


def test_a_job_that_read_by_location_queries_passes_and_one_that_listed_fails():
    good = _job_records([{"location": {"XY": 0}, "shape": "polygon"}, {"location": XY0, "tags": {"values": ["r"]}}],
                        [["a", 0, 0, 0]], per_node=2)
    assert reads.scoped_verdict(good, _first, (2, 1, 1)).passed
    assert reads.shipped_outside(good, _first) == []
    assert reads.connection_verdict(good).passed
    listed = _job_records([{"location": {"XY": 0}}], [["a", 0, 0, 0]], listed=1)
    verdict = reads.scoped_verdict(listed, _first, (2, 1, 1))
    assert not verdict.passed and "listing" in verdict.detail
    assert reads.shipped_outside(listed, _first) == ["z"]
    assert not reads.connection_verdict(listed).passed  # no connection read at all
    # the cost model's other choice: one listing of the dataset's connections, sorted, by cursor
    by_listing = _job_records([{"location": {"XY": 0}}], [["a", 0, 0, 0]], per_node=1,
                              connection_pages=[{"sort": "_id"}, {"sort": "_id", "afterId": "c9"}])
    verdict = reads.connection_verdict(by_listing)
    assert verdict.passed and "2 listing page(s)" in verdict.detail, verdict.detail
    unsorted_pages = _job_records([{"location": {"XY": 0}}], [["a", 0, 0, 0]], connection_pages=[{}])
    assert not reads.connection_verdict(unsorted_pages).passed
    by_offset = _job_records([{"location": {"XY": 0}}], [["a", 0, 0, 0]],
                             connection_pages=[{"sort": "_id"}, {"sort": "_id", "offset": "1000"}])
    assert not reads.connection_verdict(by_offset).passed
    elsewhere = _job_records([{"location": {"XY": 1}}], [["a", 0, 0, 0]])
    assert not reads.scoped_verdict(elsewhere, _first, (2, 1, 1)).passed
    unfiltered = _job_records([{"shape": "polygon"}], [["a", 0, 0, 0]])
    assert not reads.scoped_verdict(unfiltered, _first, (2, 1, 1)).passed
    failed = good + [_request("upenn_annotation/list/ids", ok=False, status=500, detail="boom")]
    verdict = reads.scoped_verdict(failed, _first, (2, 1, 1))
    assert not verdict.passed and "boom" in verdict.detail  # a re-read the worker only logs is a FAIL here
    blob = good + [_request("upenn_annotation", "GET", params={"shape": "blob"})]
    assert not reads.scoped_verdict(blob, _first, (2, 1, 1)).passed
    assert reads.listing_verdict(_job_records([], [], listed=2)).passed
    unsorted = _job_records([], [], listed=1) + [_request("annotation_connection", "GET",
                                                          params={"datasetId": "d"})]
    assert not reads.listing_verdict(unsorted).passed


def test_extra_polygons_lie_in_the_image_and_do_not_overlap():
    docs = extra_polygons("d", 600, 1024, 768)
    assert len(docs) == 600 and all(d["location"] == {"XY": 1, "Z": 0, "Time": 0} for d in docs)
    boxes = []
    for doc in docs:
        xs = [p["x"] for p in doc["coordinates"]]
        ys = [p["y"] for p in doc["coordinates"]]
        assert 0 <= min(xs) and max(xs) <= 1024 and 0 <= min(ys) and max(ys) <= 768
        boxes.append((min(xs), min(ys), max(xs), max(ys)))
    for i, a in enumerate(boxes[:50]):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_observations_compare_two_servers_by_normalised_answers():
    assert normalise("400 'No such folder: 0123456789abcdef01234567' 6b1122641ee00c7744ac42eb",
                     {"0123456789abcdef01234567": "<unknown>"}) == "400 'No such folder: <unknown>' <id>"
    lines = compare_reads([("a", "200 x"), ("b", "400 y")], [("a", "200 x"), ("b", "400 z")])
    assert "the local test server answers the same" in lines[0]
    assert "THE LOCAL TEST SERVER ANSWERS 400 z" in lines[1]


def test_the_substitutes_ignored_options_are_read_from_girders_log():
    log = ("x.py:134: UserWarning: 'hint' is accepted by aggregate for pymongo compatibility but is a no-op in "
           "mongomock-ng (in-memory mock, no disk/network).\n"
           "y.py:9: UserWarning: 'maxTimeMS' is accepted by aggregate for pymongo compatibility but is a no-op\n"
           "z.py:1: UserWarning: 'hint' is accepted by aggregate for pymongo compatibility but is a no-op\n")
    assert substitute_noops(log) == ["aggregate(hint)", "aggregate(maxTimeMS)"]
    assert substitute_noops("nothing") == []


def test_observe_reads_runs_against_the_local_test_server_and_cleans_up():
    from sam2_refine.testing.nimbus_server import NimbusTestServer

    with NimbusTestServer(token="tok") as server:
        ds = server.add_dataset(np.zeros((1, 1, 1, 1, 8, 8), np.uint8)).dataset_id
        rest = Rest(server.api_url, "tok")
        answers = dict(observe_reads(rest, ds))
        rest.close()
        assert server.annotations(ds) == [] and server.state.connections.of_dataset(ds, sort_by_id=True) == []
    assert answers["list/ids, tags exactly obs-a and obs-b (exclusive true)"] == "['<b>']"
    assert answers["list/ids, idConstraints [[]]"].startswith("400")


def test_the_launcher_records_the_workers_requests(tmp_path):
    """A worker run through the check's launcher (the interface request) leaves its requests."""
    from sam2_refine.testing.nimbus_server import NimbusTestServer

    with NimbusTestServer(token="tok") as server:
        worker = Worker(REPO, Path(sys.executable), tmp_path, "stand-in", tmp_path)
        (run,) = worker.run_many([("interface", interface_argv(server.api_url, "tok", "img:latest"))])
    assert run.returncode == 0, run.stderr[-2000:]
    assert [(r["method"], r["endpoint"], r["ok"]) for r in run.requests] == [("POST", "worker_interface", True)]
