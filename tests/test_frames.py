"""Exact frames (issue 20, item 1): pickle:5 read by an allow-listed unpickler, else TILED, else
TIFF; every frame checked against the tile metadata; a degraded frame is refused, loudly."""

from __future__ import annotations

import io
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import TOKEN
from sam2_refine.job import compute as job
from sam2_refine.nimbus.frames import (
    FrameDecodeError,
    FrameSpec,
    as_plane,
    frame_mismatch,
    read_tiff_plane,
    unpickle_array,
)
from sam2_refine.nimbus.errors import DegradedFrameError, NimbusAPIError
from sam2_refine.nimbus.client import NimbusClient
from sam2_refine.nimbus.retry import RetryPolicy
from sam2_refine.nimbus.progress import Reporter
from sam2_refine.job.settings import parse_settings
from sam2_refine.testing.large_image_double import encode_region
from sam2_refine.testing.stand_in import KnownMaskPredictor
from test_cli_e2e import BIG, LAYERS, SMALL, ann, params, pixels

# -- the restricted unpickler ---------------------------------------------------------------------

ARRAYS = {
    "uint8": np.arange(60, dtype=np.uint8).reshape(6, 10),
    "uint16": (np.arange(60, dtype=np.uint16) * 1000).reshape(6, 10),
    "int16": (np.arange(60, dtype=np.int16) - 30).reshape(6, 10),
    "float32": np.linspace(-1, 7, 60, dtype=np.float32).reshape(6, 10),
    "float64_bands": np.linspace(0, 1, 60).reshape(6, 10, 1),
    "fortran": np.asfortranarray(np.arange(60, dtype=np.uint16).reshape(6, 10)),
    "strided": np.arange(120, dtype=np.uint16).reshape(6, 20)[:, ::2],
    "big_endian": np.arange(60, dtype=">u2").reshape(6, 10),
}


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_numpy_pickles_read_back_exactly(name, protocol):
    array = ARRAYS[name]
    out = unpickle_array(pickle.dumps(array, protocol=protocol))
    np.testing.assert_array_equal(out, array)
    assert out.dtype == array.dtype.newbyteorder("=") and out.dtype.isnative
    assert out.flags.writeable


def test_pickles_from_numpy_1_servers(monkeypatch):
    """numpy 1 names its rebuild functions numpy.core.*, numpy 2 numpy._core.*; a server may run
    either. A protocol-2 pickle renamed, and a protocol-5 one made through a stand-in module."""
    import types

    array = ARRAYS["uint16"]
    old_style = pickle.dumps(array, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in old_style
    np.testing.assert_array_equal(unpickle_array(old_style), array)

    fake = types.ModuleType("numpy.core.numeric")

    def _frombuffer(buf, dtype, shape, order):  # never called: only named in the pickle
        raise AssertionError

    _frombuffer.__module__, _frombuffer.__qualname__ = "numpy.core.numeric", "_frombuffer"
    fake._frombuffer = _frombuffer
    monkeypatch.setitem(sys.modules, "numpy.core.numeric", fake)
    protocol_5 = pickle.dumps(_Calls(_frombuffer, bytearray(array.tobytes()), array.dtype, array.shape, "C"),
                              protocol=5)
    assert b"numpy.core.numeric" in protocol_5
    np.testing.assert_array_equal(unpickle_array(protocol_5), array)


class _Calls:
    """Pickles a call of ``func(*args)``, as a hostile server would send it."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _touch_pickles(marker: Path) -> dict[str, bytes]:
    import os

    return {
        "os.system": pickle.dumps(_Calls(os.system, f"touch {marker}")),
        "pathlib.touch": pickle.dumps(_Calls(Path.touch, marker)),
        "builtins.exec": pickle.dumps(_Calls(exec, f"open({str(marker)!r}, 'w').close()")),
        "subprocess": pickle.dumps(_Calls(__import__("subprocess").call, ["touch", str(marker)])),
        "numpy.load": pickle.dumps(_Calls(np.load, str(marker))),
        "array_holding_a_call": pickle.dumps(np.array([_Calls(Path.touch, marker)], dtype=object)),
        "call_inside_a_list": pickle.dumps([np.zeros(2), _Calls(Path.touch, marker)]),
    }


@pytest.mark.parametrize("name", ["os.system", "pathlib.touch", "builtins.exec", "subprocess", "numpy.load",
                                  "array_holding_a_call", "call_inside_a_list"])
def test_pickles_that_would_run_code_are_refused_unrun(name, tmp_path):
    marker = tmp_path / "ran"
    data = _touch_pickles(marker)[name]
    with pytest.raises(FrameDecodeError, match="code|refused"):
        unpickle_array(data)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 5])
def test_object_arrays_are_refused_even_of_harmless_values(protocol):
    with pytest.raises(FrameDecodeError, match="Python objects|code"):
        unpickle_array(pickle.dumps(np.array([1, "x", None], dtype=object), protocol=protocol))
    structured = np.zeros(3, dtype=[("a", "u2"), ("b", object)])
    with pytest.raises(FrameDecodeError, match="Python objects|code"):
        unpickle_array(pickle.dumps(structured, protocol=protocol))


@pytest.mark.parametrize("data,message", [
    (pickle.dumps({"not": "an array"}), "dict, not of a numpy array"),
    (pickle.dumps([1, 2, 3]), "list, not of a numpy array"),
    (pickle.dumps(np.zeros((4, 4), np.uint16))[:-9], "not a readable pickle"),
    (b"<html>502 Bad Gateway</html>", "not a readable pickle"),
    (b"", "not a readable pickle"),
    (pickle.dumps(np.ma.masked_array([1, 2], mask=[0, 1])), "code"),
])
def test_not_an_array(data, message):
    with pytest.raises(FrameDecodeError, match=message):
        unpickle_array(data)


def test_a_lying_shape_is_refused():
    """A pickle whose shape promises more pixels than its bytes hold (a memory trap) fails cleanly."""
    data = pickle.dumps(np.zeros((2, 3), np.uint16), protocol=5)
    lying = data.replace(b"K\x02K\x03", b"J\x00\x00\x01\x00J\x00\x00\x01\x00")
    assert lying != data
    with pytest.raises(FrameDecodeError, match="malformed"):
        unpickle_array(lying)


# -- TIFF, planes, the check -------------------------------------------------------------------------

def test_tiled_pyramid_reads_its_full_resolution_page():
    region = (np.arange(700 * 530, dtype=np.uint32) % 65536).astype(np.uint16).reshape(530, 700)
    body, mime = encode_region(region, "TILED", "none")
    assert mime == "image/tiff"
    with tifffile.TiffFile(io.BytesIO(body)) as tif:
        assert len(tif.pages) >= 3 and tif.pages[0].is_tiled  # a pyramid of 256 px tiles
    np.testing.assert_array_equal(read_tiff_plane(body), region)


def test_as_plane():
    assert as_plane(np.zeros((4, 5, 1))).shape == (4, 5)
    assert as_plane(np.zeros((1, 4, 5))).shape == (4, 5)
    with pytest.raises(FrameDecodeError, match="2-D plane"):
        as_plane(np.zeros((4, 5, 3)))


def test_frame_mismatch():
    plane = np.zeros((4, 5), np.uint8)
    assert frame_mismatch(plane, FrameSpec("uint8", 5, 4)) is None
    assert frame_mismatch(plane, FrameSpec(None, 5, 4)) is None  # no dtype named: only the size
    assert frame_mismatch(plane, FrameSpec("uint16", 5, 4)) == (
        "arrived as uint8, 5 x 4; the dataset's metadata says uint16, 5 x 4")
    assert "metadata says uint8, 50 x 4" in frame_mismatch(plane, FrameSpec("uint8", 50, 4))
    assert frame_mismatch(plane, FrameSpec("not-a-dtype", 5, 4)) is None


# -- the client: encodings in order, checked ----------------------------------------------------------

def _dataset(server, dtype=np.uint16):
    values = np.random.default_rng(1).integers(0, 60000, size=(1, 1, 1, 2, 40, 30))
    return server.add_dataset(values.astype(dtype))


def _regions(server):
    return [r.params.get("encoding") for r in server.requests_to("GET", r"item/\w+/tiles/region")]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_exact_frames_through_pickle(server, client, dtype):
    ds = _dataset(server, dtype)
    info = client.get_dataset_info(ds.dataset_id)
    frame = client.get_frame(info.item_id, 1, expected=info.frame_spec())
    assert frame.dtype == dtype
    np.testing.assert_array_equal(frame, ds.pixels[0, 0, 0, 1])
    assert _regions(server) == ["pickle:5"]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_without_pickle_output_tiled_is_exact_and_remembered(server, client, dtype):
    server.serves_pickle = False
    ds = _dataset(server, dtype)
    info = client.get_dataset_info(ds.dataset_id)
    for channel in (0, 1, 0):
        np.testing.assert_array_equal(client.get_frame(info.item_id, channel, expected=info.frame_spec()),
                                      ds.pixels[0, 0, 0, channel])
    assert _regions(server) == ["pickle:5", "TILED", "TILED", "TILED"]  # pickle asked once
    tiled = server.requests_to("GET", r"item/\w+/tiles/region")[-1]
    assert tiled.params["tiffCompression"] == "none"
    assert _regions_after_clone(server, client, info) == ["TILED"]


def _regions_after_clone(server, client, info):
    before = len(_regions(server))
    with client.clone() as twin:  # the prefetcher's clients start where this one got to
        twin.get_frame(info.item_id, 0, expected=info.frame_spec())
    return _regions(server)[before:]


def test_tiled_of_a_float_frame_is_refused_as_degraded(server, client):
    """TILED casts floats to 16 bits (utilities._vipsCast) and TIFF squeezes them to 8 bits:
    without pickle output a float frame cannot arrive exactly, and says so."""
    server.serves_pickle = False
    ds = _dataset(server, np.float32)
    info = client.get_dataset_info(ds.dataset_id)
    with pytest.raises(DegradedFrameError) as caught:
        client.get_frame(info.item_id, 0, expected=info.frame_spec())
    assert "TILED: arrived as uint16, 30 x 40; the dataset's metadata says float32, 30 x 40" in str(caught.value)
    assert "TIFF: arrived as uint8, 30 x 40" in str(caught.value)
    assert _regions(server) == ["pickle:5", "TILED", "TIFF"]


def test_only_8_bit_tiffs_are_refused_for_16_bit_data_but_exact_for_8_bit(server, client):
    server.serves_pickle, server.has_pyvips = False, False
    ds16, ds8 = _dataset(server, np.uint16), _dataset(server, np.uint8)
    info16, info8 = client.get_dataset_info(ds16.dataset_id), client.get_dataset_info(ds8.dataset_id)
    with pytest.raises(DegradedFrameError) as caught:
        client.get_frame(info16.item_id, 0, expected=info16.frame_spec())
    assert caught.value.frame == 0
    assert caught.value.arrivals == [
        'pickle:5: HTTP 400 Value Error: Invalid encoding "pickle:5"', "TILED: HTTP 500 No module named 'pyvips'",
        "TIFF: arrived as uint8, 30 x 40; the dataset's metadata says uint16, 30 x 40"]
    np.testing.assert_array_equal(client.get_frame(info8.item_id, 0, expected=info8.frame_spec()),
                                  ds8.pixels[0, 0, 0, 0])


def test_without_an_expectation_the_first_readable_encoding_is_taken(server, client):
    server.serves_pickle, server.has_pyvips = False, False
    ds = _dataset(server, np.uint16)
    frame = client.get_frame(ds.item_id, 0)  # no metadata to compare with: 8 bits as the server sent
    assert frame.dtype == np.uint8
    np.testing.assert_array_equal(frame, (ds.pixels[0, 0, 0, 0] // 256).astype(np.uint8))


@pytest.mark.parametrize("status", [401, 403, 404])
def test_no_fallback_when_the_request_itself_is_refused(server, client, status):
    ds = _dataset(server)
    server.fail("GET", r"item/\w+/tiles/region", status=status)
    with pytest.raises(NimbusAPIError) as caught:
        client.get_frame(ds.item_id, 0)
    assert caught.value.status == status
    assert _regions(server) == ["pickle:5"]


def test_every_encoding_unreadable_lists_each(server, client):
    ds = _dataset(server)
    server.fail("GET", r"item/\w+/tiles/region", status=500)
    with pytest.raises(NimbusAPIError) as caught:
        client.get_frame(ds.item_id, 0)
    assert "could not be read in any encoding" in str(caught.value)
    for encoding in ("pickle:5", "TILED", "TIFF"):
        assert f"{encoding}: HTTP 500" in str(caught.value)


def test_windows_are_checked_against_their_own_size(server, client):
    ds = _dataset(server)
    info = client.get_dataset_info(ds.dataset_id)
    window = (5, 7, 31, 30)  # right beyond the 30 px frame: the server clips it
    frame = client.get_frame(info.item_id, 0, window, expected=info.frame_spec(window))
    np.testing.assert_array_equal(frame, ds.pixels[0, 0, 0, 0, 7:30, 5:30])


# -- a whole job ------------------------------------------------------------------------------------

def test_a_server_that_only_sends_8_bit_tiffs_refines_nothing_and_says_why(server, stub_ckpt, monkeypatch, tmp_path):
    """The run against the real server: every 16-bit frame arrived as 8 bits and the job said
    nothing. Now the location's originals are kept with the reason, an error line names the
    location, what arrived and what was expected, nothing is created or deleted, exit 1."""
    server.serves_pickle, server.has_pyvips = False, False
    monkeypatch.setenv(job.SUMMARY_ENV, str(tmp_path / "s.json"))
    ds = server.add_dataset(pixels(2, 1), layers=LAYERS)
    ids = server.add_annotations(ds.dataset_id, [ann(BIG, xy) for xy in range(2)] + [ann(SMALL, 1)])
    settings = parse_settings(params(**{"Batch XY": "all", "Delete original annotations": True}), ds.dataset_id,
                              stub_ckpt)
    stream = io.StringIO()
    with NimbusClient(server.api_url, TOKEN, retry=RetryPolicy(total=1, backoff_factor=0.01)) as client:
        code = job.run_compute(settings, client, Reporter(stream=stream, secrets=(TOKEN,)),
                               lambda path: (KnownMaskPredictor(), False))
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    errors = [m for m in lines if "error" in m]
    assert code == 1
    for xy in (1, 2):
        line = next(e for e in errors if f"The image at XY {xy}, Z 1, Time 1 arrived degraded" in e["error"])
        assert "arrived as uint8, 128 x 96; the dataset's metadata says uint16, 128 x 96" in line["info"]
    assert "2 location(s) could not be processed" in errors[-1]["error"]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["refined"] == 0 and summary["deleted"] == 0
    assert set(summary["kept_reasons"]) == {"its image arrived degraded (not the dataset's pixel type or size)"}
    assert {a["_id"] for a in server.annotations(ds.dataset_id)} == set(ids)
    assert server.requests_to("POST", "upenn_annotation/multiple") == []


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
