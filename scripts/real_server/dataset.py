"""A dataset made through the REST API the way NimbusImage's web app makes one.

The app's calls (NimbusImage ``src/``): ``GirderAPI.createDataset`` (a folder with
``meta.subtype = "contrastDataset"`` and ``selectedLargeImageId: null``), the file upload, the
reads of ``MultiSourceConfiguration.vue`` (``item?folderId``, ``item/{id}/tiles``,
``tiles/internal_metadata``), ``store.addMultiSourceMetadata`` (``multi-source2.json`` uploaded as
``text/plain``, every item's large image removed when transcoding, then
``POST item/{json}/tiles?force=true&localJob=true`` and the job followed to its end),
``updateDatasetMetadata`` (``dimensionLabels``), ``createConfigurationFromDataset``
(``POST upenn_collection`` with the default layers of ``newLayer`` in ``store/model.ts``) and
``createDatasetView`` (``layerContrasts: {}``). Annotations and connections are then posted in
bulk, as the app's tools and the workers do.

The image: two XY positions of two channels (``DAPI`` nuclei, ``CY5`` cytoplasm), 16-bit, made
by :func:`sam2_refine.testing.datasets.cell_scene`; position 1 holds 12-bit camera values
(0..4095), position 2 dim values (0..235): what an 8-bit encoding squeezes to 16 grey levels
and to nothing. The rough outlines are the true nuclei grown by 3 px or jittered.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tifffile

from real_server.rest import Rest, RestError

CHANNELS = ("DAPI", "CY5")
#: The app's channel colours (``store/model.ts`` ``channelColors``): DAPI "#007FFF", CY5 red.
CHANNEL_COLOURS = {"DAPI": "#007FFF", "CY5": "#FF0000"}
#: Value ranges of the two positions: 12-bit camera data, and dim data below 256.
POSITION_MAXIMA = (4095, 235)
IMAGE_NAME = "cells.tif"
MULTI_SOURCE_NAME = "multi-source2.json"  # NimbusImage src/girder/index.ts DEFAULT_LARGE_IMAGE_SOURCE
TAG = "nucleus"


@dataclass
class Source:
    """The image uploaded: ``pages[xy, c]`` is a (H, W) uint16 plane."""

    pages: np.ndarray
    outlines: list[list[np.ndarray]]  # per XY: (K, 2) (x, y) rough outlines

    @property
    def xy_count(self) -> int:
        return self.pages.shape[0]

    def tiff_bytes(self) -> bytes:
        """A multi-page TIFF, pages in the order XY-major, channel-minor (as a microscope writes)."""
        buffer = io.BytesIO()
        flat = self.pages.reshape(-1, *self.pages.shape[2:])
        tifffile.imwrite(buffer, flat, photometric="minisblack")
        return buffer.getvalue()


def make_source(height: int = 768, width: int = 1024, count: int = 30, seed: int = 3) -> Source:
    """The synthetic 16-bit image and its rough nucleus outlines."""
    from sam2_refine.testing.datasets import cell_scene, rough_polygon

    rng = np.random.default_rng(seed)
    pages, outlines = [], []
    for xy, top in enumerate(POSITION_MAXIMA):
        scene = cell_scene(height, width, count, seed=seed + xy)
        pages.append(np.round(scene.channels.astype(np.float64) / 60000.0 * top).astype(np.uint16))
        rough = []
        for label in range(1, scene.count + 1):
            kind = "dilated" if label % 2 else "jittered"
            rough.append(rough_polygon(scene.labels == label, kind, rng, amount=3.0))
        outlines.append(rough)
    return Source(np.stack(pages), outlines)


def multi_source_config(xy_count: int) -> dict[str, Any]:
    """``multi-source2.json`` as ``MultiSourceConfiguration.vue`` writes it for one file whose
    frames hold XY (stride = channel count) and C (stride 1): a basic source with
    ``framesAsAxes`` and ``xyValues``/``cValues`` of 0."""
    return {
        "channels": list(CHANNELS),
        "sources": [{"path": IMAGE_NAME, "framesAsAxes": {"xy": len(CHANNELS), "c": 1},
                     "xyValues": [0], "cValues": [0]}],
        "uniformSources": True,
        "singleBand": False,
    }


def default_layers() -> list[dict[str, Any]]:
    """One layer per channel, as ``newLayer`` (NimbusImage ``src/store/model.ts``) guesses them."""
    return [{
        "id": str(uuid.uuid4()), "name": name, "visible": True, "channel": index,
        "time": {"type": "current", "value": None}, "xy": {"type": "current", "value": None},
        "z": {"type": "current", "value": None}, "color": CHANNEL_COLOURS[name],
        "contrast": {"mode": "percentile", "blackPoint": 0, "whitePoint": 100}, "layerGroup": None,
    } for index, name in enumerate(CHANNELS)]


def configuration_metadata(layers: list[dict[str, Any]], xy_count: int) -> dict[str, Any]:
    """The ``upenn_collection`` metadata of ``createConfigurationFromBase`` with
    ``defaultConfigurationBase`` (NimbusImage ``src/store/GirderAPI.ts``)."""
    return {
        "subtype": "contrastConfiguration",
        "compatibility": {"xyDimensions": "multiple" if xy_count > 1 else "one", "zDimensions": "one",
                          "tDimensions": "one", "channels": {str(i): n for i, n in enumerate(CHANNELS)}},
        "layers": layers, "tools": [], "propertyIds": [], "snapshots": [], "pipelines": [],
        "scales": {"pixelSize": {"value": 1, "unit": "m"}, "zStep": {"value": 1, "unit": "m"},
                   "tStep": {"value": 1, "unit": "s"}},
    }


def annotation_docs(source: Source, dataset_id: str) -> list[dict[str, Any]]:
    """The rough outlines as polygon annotations tagged ``nucleus`` on channel 0."""
    docs = []
    for xy, outlines in enumerate(source.outlines):
        for points in outlines:
            docs.append({"tags": [TAG], "shape": "polygon", "channel": 0,
                         "location": {"XY": xy, "Z": 0, "Time": 0}, "datasetId": dataset_id,
                         "coordinates": [{"x": float(x), "y": float(y), "z": 0} for x, y in points]})
    return docs


def spot_docs(source: Source, dataset_id: str, every: int = 5) -> list[dict[str, Any]]:
    """A point annotation (tag ``spot``, not refined) at the centre of every ``every``-th outline."""
    docs = []
    for xy, outlines in enumerate(source.outlines):
        for points in outlines[::every]:
            x, y = points.mean(axis=0)
            docs.append({"tags": ["spot"], "shape": "point", "channel": 1,
                         "location": {"XY": xy, "Z": 0, "Time": 0}, "datasetId": dataset_id,
                         "coordinates": [{"x": float(x), "y": float(y), "z": 0}]})
    return docs


def extra_polygons(dataset_id: str, count: int, width: int, height: int, xy: int = 1) -> list[dict[str, Any]]:
    """``count`` small square polygons tagged like the nuclei, on a grid over position ``xy``
    (0-based) of a ``width`` x ``height`` image, none overlapping."""
    columns = max(1, int((count * width / height) ** 0.5))
    rows = -(-count // columns)
    step_x, step_y = width / columns, height / rows
    side = max(1.0, min(step_x, step_y) - 2)
    docs = []
    for index in range(count):
        x, y = (index % columns) * step_x + 1, (index // columns) * step_y + 1
        corners = [(x, y), (x + side, y), (x + side, y + side), (x, y + side)]
        docs.append({"tags": [TAG], "shape": "polygon", "channel": 0, "location": {"XY": xy, "Z": 0, "Time": 0},
                     "datasetId": dataset_id, "coordinates": [{"x": px, "y": py, "z": 0} for px, py in corners]})
    return docs


def connection_pairs(nuclei: list[dict[str, Any]], spots: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(parent, child): each spot -> the nucleus it lies in; every 3rd nucleus -> the next one
    at the same position (so both ends of some connections are refined)."""
    pairs = []
    by_xy: dict[int, list[dict]] = {}
    for doc in nuclei:
        by_xy.setdefault(doc["location"]["XY"], []).append(doc)
    for spot in spots:
        x, y = spot["coordinates"][0]["x"], spot["coordinates"][0]["y"]
        same = by_xy[spot["location"]["XY"]]
        nearest = min(same, key=lambda d: (np.mean([p["x"] for p in d["coordinates"]]) - x) ** 2
                      + (np.mean([p["y"] for p in d["coordinates"]]) - y) ** 2)
        pairs.append((spot["_id"], nearest["_id"]))
    for docs in by_xy.values():
        for index in range(0, len(docs) - 1, 3):
            pairs.append((docs[index]["_id"], docs[index + 1]["_id"]))
    return pairs


@dataclass
class Dataset:
    folder_id: str
    item_id: str
    configuration_id: str
    view_id: str
    tiles: dict[str, Any]
    originals: list[str]
    spots: list[str]
    connections: list[tuple[str, str]]
    notes: list[str] = field(default_factory=list)


def _follow_job(rest: Rest, job_id: str, timeout: float = 600.0) -> dict[str, Any]:
    """Poll ``job/{id}`` until it ends (Girder job status 3 = success, 4 = error, 5 = cancelled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = rest.json("GET", f"job/{job_id}")
        if job.get("status") in (3, 4, 5):
            return job
        time.sleep(0.5)
    raise TimeoutError(f"the large-image job {job_id} did not end within {timeout:.0f} s")


def _tiles_with_retry(rest: Rest, item_id: str, tries: int = 40) -> dict[str, Any]:
    """``GET item/{id}/tiles``, retried as the app's ``pRetry`` does while the large image is made."""
    for attempt in range(tries):
        try:
            return rest.json("GET", f"item/{item_id}/tiles")
        except RestError:
            if attempt == tries - 1:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def create_dataset(rest: Rest, parent_folder_id: str, source: Source, name: str) -> Dataset:
    """Make the dataset, its image, configuration, view, annotations and connections."""
    notes: list[str] = []
    form = {"parentType": "folder", "parentId": parent_folder_id, "name": name, "description": "",
            "reuseExisting": "false",
            "metadata": json.dumps({"subtype": "contrastDataset", "selectedLargeImageId": None})}
    folder = rest.json("POST", "folder", data=form)
    folder_id = folder["_id"]

    tiff = rest.upload("folder", folder_id, IMAGE_NAME, source.tiff_bytes())
    items = rest.json("GET", "item", params={"folderId": folder_id})
    image_item = next(i for i in items if i["name"] == IMAGE_NAME)
    if tiff.get("itemId") != image_item["_id"]:
        notes.append("the uploaded file's itemId is not the item listed")
    _tiles_with_retry(rest, image_item["_id"])
    rest.json("GET", f"item/{image_item['_id']}/tiles/internal_metadata")

    config_file = rest.upload("folder", folder_id, MULTI_SOURCE_NAME,
                              json.dumps(multi_source_config(source.xy_count)).encode(), "text/plain")
    json_item_id = config_file["itemId"]
    for item in rest.json("GET", "item", params={"folderId": folder_id}):
        answer = rest.call("DELETE", f"item/{item['_id']}/tiles")  # the app: transcode removes all
        notes.append(f"DELETE item/{{{item['name']}}}/tiles answered {answer.status_code}")
    job = rest.json("POST", f"item/{json_item_id}/tiles", params={"force": "true", "localJob": "true"})
    job = _follow_job(rest, job["_id"])
    if job.get("status") != 3:
        log = "".join(job.get("log") or [])[-2000:]
        raise RuntimeError(f"the large-image job ended with status {job.get('status')}: {log}")
    tiles = _tiles_with_retry(rest, json_item_id)

    meta = rest.json("GET", f"folder/{folder_id}").get("meta", {})
    labels = {"xy": [str(i + 1) for i in range(source.xy_count)], "z": None, "t": None}
    rest.json("PUT", f"folder/{folder_id}/metadata", data={"id": folder_id,
                                                           "metadata": json.dumps({**meta, "dimensionLabels": labels})})

    layers = default_layers()
    configuration = rest.json("POST", "upenn_collection", data={
        "folderId": parent_folder_id, "name": f"{name} Collection", "description": "", "reuseExisting": "false",
        "metadata": json.dumps(configuration_metadata(layers, source.xy_count))})
    view = rest.json("POST", "dataset_view", json={
        "datasetId": folder_id, "configurationId": configuration["_id"], "layerContrasts": {}, "scales": {},
        "lastViewed": int(time.time() * 1000), "lastLocation": {"xy": 0, "z": 0, "time": 0}})

    nuclei = rest.json("POST", "upenn_annotation/multiple", json=annotation_docs(source, folder_id))
    spots = rest.json("POST", "upenn_annotation/multiple", json=spot_docs(source, folder_id))
    pairs = connection_pairs(nuclei, spots)
    rest.json("POST", "annotation_connection/multiple", json=[
        {"parentId": p, "childId": c, "datasetId": folder_id, "label": "check", "tags": ["check"]} for p, c in pairs])
    return Dataset(folder_id, json_item_id, configuration["_id"], view["_id"], tiles,
                   [d["_id"] for d in nuclei], [d["_id"] for d in spots], pairs, notes)


def expected_pixels(source: Source, tiles: dict[str, Any]):
    """(frame, window) -> the source's pixels, through the server's own frame table
    (``frames[i].Frame`` with its ``IndexXY`` and ``IndexC``)."""
    table = {int(f["Frame"]): (int(f.get("IndexXY", 0)), int(f.get("IndexC", 0))) for f in tiles.get("frames") or []}

    def expected(frame: int, window: tuple[int, int, int, int] | None) -> np.ndarray:
        xy, c = table.get(frame, (0, 0)) if table else (0, 0)
        plane = source.pages[xy, c]
        if window is None:
            return plane
        left, top, right, bottom = window
        return plane[max(top, 0):bottom, max(left, 0):right]

    return expected
