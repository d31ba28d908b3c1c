"""The pure parts of scripts/check_real_server.py (the check itself needs NimbusImage and
large_image checkouts and is not run here; see docs/real-server-check.md), and its frame
recorder run through the worker's own client against the local test server."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from real_server import checks, venv  # noqa: E402
from real_server.dataset import default_layers, expected_pixels, multi_source_config  # noqa: E402
from real_server.output import Output, Result, database_label, exit_code, summary_line  # noqa: E402
from real_server.worker import Worker  # noqa: E402

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
