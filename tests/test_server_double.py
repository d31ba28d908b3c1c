"""The local test server is the real NimbusImage server's double: a test per behaviour it
imitates, each named after the upstream code it follows (see the comments in
sam2_refine/testing/nimbus_server.py and large_image_double.py)."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
import requests
import tifffile

from conftest import TOKEN
from sam2_refine.testing.large_image_double import encode_region, to_8_bits, vips_cast


def get(server, path, **params):
    return requests.get(f"{server.api_url}/{path}", params=params, headers={"Girder-Token": TOKEN}, timeout=10)


def send(server, method, path, body):
    return requests.request(method, f"{server.api_url}/{path}", json=body, headers={"Girder-Token": TOKEN},
                            timeout=10)


def dataset(server, dtype=np.uint16, shape=(2, 3, 1, 2, 20, 30), **kwargs):
    values = np.random.default_rng(5).integers(0, 65535, size=shape)
    if dtype == np.float32:
        return server.add_dataset(values.astype(np.float32) / 65535, **kwargs)
    return server.add_dataset(values.astype(dtype), **kwargs)


def polygon(ds, xy=0):
    return {"shape": "polygon", "tags": ["cell"], "channel": 0, "location": {"XY": xy, "Z": 0, "Time": 0},
            "datasetId": ds.dataset_id, "coordinates": [{"x": 1, "y": 1}, {"x": 5, "y": 1}, {"x": 5, "y": 5}]}


# -- large_image: tiles and regions -------------------------------------------------------------------

def test_tif_region_is_squeezed_to_8_bits(server):
    """large_image/tilesource/utilities.py _imageToPIL: uint16 -> value // 256 as uint8."""
    ds = dataset(server)
    body = get(server, f"item/{ds.item_id}/tiles/region", frame=3, encoding="TIFF").content
    plane = tifffile.imread(io.BytesIO(body))
    assert plane.dtype == np.uint8
    np.testing.assert_array_equal(plane, (ds.frame_pixels(3) // 256).astype(np.uint8))
    assert get(server, f"item/{ds.item_id}/tiles").json()["dtype"] == "uint16"  # the metadata still says so


@pytest.mark.parametrize("dtype,expected", [
    (np.uint8, lambda a: a), (np.uint16, lambda a: a // 256),
    (np.float32, lambda a: np.clip(a, 0, 255).astype(np.uint8)), (np.int16, lambda a: (a.astype(float) + 32768) // 256),
])
def test_8_bit_rules_per_dtype(dtype, expected):
    region = np.array([[0, 1, 200], [255, 300, 1000]]).astype(dtype)
    np.testing.assert_array_equal(to_8_bits(region), expected(region).astype(np.uint8))


def test_tiled_region_keeps_16_bits_and_needs_pyvips(server):
    """base.py _encodeTiledImageFromVips: a tiled pyramid of the frame's own uint8/uint16 values;
    without pyvips the import fails inside the request (500)."""
    ds = dataset(server)
    response = get(server, f"item/{ds.item_id}/tiles/region", frame=2, encoding="TILED", tiffCompression="none")
    with tifffile.TiffFile(io.BytesIO(response.content)) as tif:
        assert tif.pages[0].is_tiled and tif.pages[0].dtype == np.uint16
        np.testing.assert_array_equal(tif.pages[0].asarray(), ds.frame_pixels(2))
    server.has_pyvips = False
    response = get(server, f"item/{ds.item_id}/tiles/region", frame=2, encoding="TILED", tiffCompression="none")
    assert response.status_code == 500 and "pyvips" in response.json()["message"]


def test_tiled_casts_floats_to_16_bits():
    """utilities._vipsCast: floats become uint16, scaled by the region's maximum."""
    assert vips_cast(np.array([[0.0, 0.5, 1.0]], np.float32)).tolist() == [[0, 32767, 65535]]
    assert vips_cast(np.array([[0.0, 100.0, 400.0]], np.float32)).tolist() == [[0, 25600, 65535]]
    assert vips_cast(np.array([[0.0, 1000.0]], np.float32)).tolist() == [[0, 1000]]


def test_tiled_default_compression_is_refused_by_the_double():
    """The real default (LZW) needs a codec tifffile lacks; the double refuses rather than pretend."""
    with pytest.raises(Exception, match="tiffCompression=none"):
        encode_region(np.zeros((4, 4), np.uint16), "TILED")


@pytest.mark.parametrize("encoding,protocol", [("pickle:5", 5), ("pickle:4", 4), ("pickle", 4), ("pickle:0", 4)])
def test_pickle_region_is_the_exact_array_with_a_band_axis(server, encoding, protocol):
    """rest/tiles.py _pickleParams / _pickleOutput and utilities._imageToNumpy: the region as a
    (rows, columns, bands) array of its own dtype; 'pickle' and 'pickle:0' mean protocol 4."""
    ds = dataset(server, np.float32)
    response = get(server, f"item/{ds.item_id}/tiles/region", frame=1, encoding=encoding, left=3, right=13)
    assert response.headers["Content-Type"] == "image/jpeg"  # as the real server labels it
    assert response.content[1] == protocol
    array = pickle.loads(response.content)  # local, trusted test data
    assert array.shape == (20, 10, 1) and array.dtype == np.float32
    np.testing.assert_array_equal(array[..., 0], ds.frame_pixels(1)[:, 3:13])


def test_a_server_without_pickle_output_refuses_it(server):
    server.serves_pickle = False
    ds = dataset(server)
    response = get(server, f"item/{ds.item_id}/tiles/region", frame=0, encoding="pickle:5")
    assert response.status_code == 400 and "Invalid encoding" in response.json()["message"]


def test_tiles_are_512_px_and_index_is_not_the_frame_number(server):
    """base.py _addMetadataFrameInformation: Index counts changes of the non-channel indices, so
    the channels of one location share it; Frame is the frame number."""
    ds = dataset(server)  # XY 2, T 3, C 2
    meta = get(server, f"item/{ds.item_id}/tiles").json()
    assert (meta["tileWidth"], meta["tileHeight"]) == (512, 512)
    frames = meta["frames"]
    assert [f["Frame"] for f in frames] == list(range(12))
    assert [f["Index"] for f in frames] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert meta["IndexRange"] == {"IndexXY": 2, "IndexT": 3, "IndexC": 2}
    assert meta["IndexStride"] == {"IndexXY": 6, "IndexT": 2, "IndexC": 1}
    assert meta["channels"] == ["Channel 0", "Channel 1"]
    assert meta["channelmap"] == {"Channel 0": 0, "Channel 1": 1}
    assert [f["Channel"] for f in frames[:2]] == ["Channel 0", "Channel 1"]


def test_a_dataset_folder_has_no_selected_image_key(server):
    ds = dataset(server)
    assert "selectedLargeImageId" not in get(server, f"folder/{ds.dataset_id}").json()["meta"]


# -- the plugin: annotations and connections ------------------------------------------------------------

def test_total_count_after_a_cursor_counts_what_lies_after_it(server):
    """api/annotation.py find: afterId becomes part of the query the count is taken from."""
    ds = dataset(server)
    ids = server.add_annotations(ds.dataset_id, [polygon(ds) for _ in range(7)])
    page = get(server, "upenn_annotation", datasetId=ds.dataset_id, shape="polygon", limit=2)
    assert page.headers["Girder-Total-Count"] == "7"
    page = get(server, "upenn_annotation", datasetId=ds.dataset_id, shape="polygon", limit=2, afterId=ids[2])
    assert page.headers["Girder-Total-Count"] == "4" and [d["_id"] for d in page.json()] == ids[3:5]


def test_bulk_delete_leaves_connections_single_delete_removes_them(server):
    """models/connections.py annotationsRemovedEvent matches string ids against ObjectIds after
    a bulk delete (nothing), and the document's ObjectId after a single delete."""
    ds = dataset(server)
    a, b, c = server.add_annotations(ds.dataset_id, [polygon(ds), polygon(ds), polygon(ds)])
    server.add_connections([{"parentId": a, "childId": b, "datasetId": ds.dataset_id},
                            {"parentId": c, "childId": b, "datasetId": ds.dataset_id}])
    assert send(server, "DELETE", "upenn_annotation/multiple", [a]).status_code == 200
    assert len(server.connections()) == 2
    assert send(server, "DELETE", f"upenn_annotation/{c}", None).status_code == 200
    assert [(x["parentId"], x["childId"]) for x in server.connections()] == [(a, b)]
    assert send(server, "DELETE", f"upenn_annotation/{c}", None).status_code == 400  # loadmodel: gone


@pytest.mark.parametrize("missing,message", [("child", "A child annotation does not exist"),
                                             ("parent", "A parent annotation does not exist"),
                                             ("both", "A child annotation does not exist")])
def test_connections_with_a_missing_end_are_refused_whole(server, missing, message):
    """models/connections.py validateMultiple: every child, then every parent, must exist."""
    ds = dataset(server)
    a, b = server.add_annotations(ds.dataset_id, [polygon(ds), polygon(ds)])
    gone = "0" * 24
    bad = {"parentId": gone if missing in ("parent", "both") else a,
           "childId": gone if missing in ("child", "both") else b, "datasetId": ds.dataset_id, "tags": []}
    good = {"parentId": a, "childId": b, "datasetId": ds.dataset_id, "tags": []}
    response = send(server, "POST", "annotation_connection/multiple", [good, bad])
    assert response.status_code == 400 and response.json()["message"] == message
    assert server.connections() == []


def test_connection_schema_requires_tags_and_a_dataset(server):
    ds = dataset(server)
    a, b = server.add_annotations(ds.dataset_id, [polygon(ds), polygon(ds)])
    no_tags = {"parentId": a, "childId": b, "datasetId": ds.dataset_id}
    assert send(server, "POST", "annotation_connection/multiple", [no_tags]).status_code == 400
    other = {"parentId": a, "childId": b, "datasetId": "1" * 24, "tags": []}
    response = send(server, "POST", "annotation_connection/multiple", [other])
    assert response.status_code == 400 and response.json()["message"] == "Connection dataset ID is invalid"


def test_connection_listing_order_cursor_and_delete_answer(server):
    """api/connections.py: default sort is a field connections lack (stored order), afterId drops
    the offset; deleteMultiple answers pymongo's DeleteResult as text."""
    ds = dataset(server)
    a, b = server.add_annotations(ds.dataset_id, [polygon(ds), polygon(ds)])
    ids = server.add_connections([{"_id": f"{9 - k:024x}", "parentId": a, "childId": b, "datasetId": ds.dataset_id}
                                  for k in range(4)])
    stored = [c["_id"] for c in get(server, "annotation_connection", datasetId=ds.dataset_id).json()]
    assert stored == ids  # not sorted by _id
    by_id = get(server, "annotation_connection", datasetId=ds.dataset_id, sort="_id", limit=2,
                afterId=sorted(ids)[0], offset=3).json()
    assert [c["_id"] for c in by_id] == sorted(ids)[1:3]
    answer = send(server, "DELETE", "annotation_connection/multiple", ids[:2])
    assert json.loads(answer.content) == "DeleteResult({'n': 2, 'ok': 1.0}, acknowledged=True)"


def test_errors_as_girder_gives_them(server):
    """Seen on the real server (docs/real-server-check.md): a schema error and a malformed id are
    type "validation", a missing collection names its model."""
    ds = dataset(server)
    doc = {k: v for k, v in polygon(ds).items() if k != "tags"}
    answer = send(server, "POST", "upenn_annotation/multiple", [doc])
    assert answer.status_code == 400
    assert answer.json() == {"message": "data must contain ['tags'] properties", "type": "validation"}
    answer = get(server, "upenn_annotation/not-an-id")
    assert answer.status_code == 400
    assert answer.json() == {"message": "Invalid ObjectId: not-an-id", "type": "validation", "field": "id"}
    answer = get(server, "upenn_collection/" + "0" * 24)
    assert answer.json()["message"] == f"Invalid upenn_collection id ({'0' * 24})."
