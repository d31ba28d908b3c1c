"""Probes of the server behaviours the worker depends on, on a scratch dataset.

Each probe prints one ``observed:`` line with what the real server answered, so that the local
test server (``sam2_refine/testing/nimbus_server.py``) can be made to answer the same. They are
observations, not checks: they pass or fail nothing.
"""

from __future__ import annotations

import io
import re
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import tifffile

from real_server.dataset import Dataset, Source
from real_server.rest import Rest, message_of

UNKNOWN_ID = "0123456789abcdef01234567"


def _answer(response) -> str:
    body = response.text if len(response.text) < 160 else response.text[:160] + "..."
    return f"{response.status_code} {body}"


def _ids(rest: Rest, dataset_id: str) -> list[str]:
    return [d["_id"] for d in rest.json("GET", "upenn_annotation", params={"datasetId": dataset_id, "limit": 0})]


def _connections(rest: Rest, dataset_id: str) -> list[dict[str, Any]]:
    return rest.json("GET", "annotation_connection", params={"datasetId": dataset_id, "limit": 0})


def observe(rest: Rest, scratch: Dataset, source: Source, say: Callable[[str], None]) -> None:
    """Print what the server does; ``scratch`` is changed (annotations deleted)."""
    ds, item = scratch.folder_id, scratch.item_id
    tiles = scratch.tiles

    def note(text: str) -> None:
        say(f"observed: {text}")

    note(f"tiles: tileWidth {tiles.get('tileWidth')}, tileHeight {tiles.get('tileHeight')}, levels "
         f"{tiles.get('levels')}, dtype {tiles.get('dtype')!r}, sizeX {tiles.get('sizeX')}, "
         f"sizeY {tiles.get('sizeY')}, "
         f"IndexRange {tiles.get('IndexRange')}, IndexStride {tiles.get('IndexStride')}")
    differ = [f for f in tiles.get("frames") or [] if f.get("Index") != f.get("Frame")]
    note(f"frames[].Index differs from frames[].Frame in {len(differ)} of {len(tiles.get('frames') or [])} frames "
         f"(e.g. {json.dumps(differ[:2])})")
    meta = rest.json("GET", f"folder/{ds}").get("meta", {})
    note(f"dataset folder meta keys after the app's createDataset with selectedLargeImageId null: {sorted(meta)}")
    items = rest.json("GET", "item", params={"folderId": ds, "limit": 0})
    note("items in the dataset folder: " + ", ".join(
        f"{i['name']} (largeImage: {'yes' if 'largeImage' in i else 'no'})" for i in items))

    truth = source.pages[0, 0]
    for params in ({"encoding": "TIFF"}, {"encoding": "TILED", "tiffCompression": "none"}, {"encoding": "TILED"}):
        response = rest.call("GET", f"item/{item}/tiles/region", params={"frame": 0, **params})
        text = f"GET tiles/region frame 0 {params}: {response.status_code} {response.headers.get('Content-Type')}"
        if response.status_code == 200:
            try:
                with tifffile.TiffFile(io.BytesIO(response.content)) as tiff:
                    compression = tiff.pages[0].compression.name
                    pixels = tiff.asarray()
            except Exception as exc:  # noqa: BLE001 - a codec missing here is an observation too
                text += f", not readable here ({type(exc).__name__}: {str(exc)[:100]})"
            else:
                text += (f", {compression}, {pixels.dtype} {pixels.shape} values {pixels.min()}..{pixels.max()} "
                         f"(source uint16 {truth.min()}..{truth.max()}; equal: "
                         f"{pixels.dtype == truth.dtype and np.array_equal(pixels, truth)})")
        else:
            text += f": {message_of(response)}"
        note(text)
    response = rest.call("GET", f"item/{item}/tiles/region", params={"frame": 0, "encoding": "pickle:5"})
    note(f"GET tiles/region encoding=pickle:5: {response.status_code}, Content-Type "
         f"{response.headers.get('Content-Type')!r}, {len(response.content)} bytes (not unpickled here)")
    response = rest.call("GET", f"item/{item}/tiles/region",
                         params={"frame": 2, "encoding": "TILED", "tiffCompression": "none", "left": 100, "top": 50,
                                 "right": 300, "bottom": 120})
    if response.status_code == 200:
        crop = tifffile.imread(io.BytesIO(response.content))
        note(f"a region left 100 top 50 right 300 bottom 120 of frame 2 comes back {crop.shape} "
             f"(rows, columns); equal to the source crop: {np.array_equal(crop, source.pages[1, 0][50:120, 100:300])}")

    ids = _ids(rest, ds)
    page = rest.call("GET", "upenn_annotation", params={"datasetId": ds, "limit": 2, "sort": "_id"})
    after = rest.call("GET", "upenn_annotation", params={"datasetId": ds, "limit": 2, "sort": "_id",
                                                          "afterId": ids[1]})
    plain = rest.call("GET", "upenn_annotation", params={"datasetId": ds})
    note(f"Girder-Total-Count of {len(ids)} annotations: limit 2 -> {page.headers.get('Girder-Total-Count')}; limit 2 "
         f"afterId the 2nd -> {after.headers.get('Girder-Total-Count')}; no limit given -> "
         f"{plain.headers.get('Girder-Total-Count')} with {len(plain.json())} returned")
    offset = rest.call("GET", "upenn_annotation", params={"datasetId": ds, "limit": 2, "sort": "_id",
                                                           "afterId": ids[1], "offset": 1})
    note(f"afterId with offset 1 returns {[d['_id'] == i for d, i in zip(offset.json(), ids[2:4])]} "
         "(True where it is the item right after the cursor: offset ignored)")
    shapes = rest.call("GET", "upenn_annotation", params={"datasetId": ds, "shape": "blob"})
    note(f"shape=blob lists {len(shapes.json()) if shapes.status_code == 200 else _answer(shapes)}")

    doc = {"tags": ["probe"], "shape": "polygon", "channel": 0, "location": {"XY": 0, "Z": 0, "Time": 0},
           "datasetId": ds, "coordinates": [{"x": 1, "y": 1}, {"x": 9, "y": 1}, {"x": 9, "y": 9}],
           "sam2Refine": {"originalId": ids[0]}}
    created = rest.call("POST", "upenn_annotation/multiple", json=[doc])
    body = created.json()
    note(f"POST upenn_annotation/multiple answers {created.status_code} with a {type(body).__name__} of "
         f"{len(body)}; keys of an entry: {sorted(body[0]) if body and isinstance(body[0], dict) else body[:1]}")
    untagged = {k: v for k, v in doc.items() if k != "tags"}
    response = rest.call("POST", "upenn_annotation/multiple", json=[untagged])
    note(f"POST upenn_annotation/multiple without tags: {_answer(response)}")
    probe_id = body[0]["_id"]
    response = rest.call("PUT", f"upenn_annotation/{probe_id}", json={"tags": ["probe", "changed"]})
    now = rest.call("GET", f"upenn_annotation/{probe_id}")
    note(f"PUT upenn_annotation/{{id}} with only tags: {response.status_code}; afterwards the document "
         f"{'keeps' if now.status_code == 200 and 'coordinates' in now.json() else 'lost'} its coordinates, tags "
         f"{now.json().get('tags') if now.status_code == 200 else now.status_code}")
    for path in (f"upenn_annotation/{UNKNOWN_ID}", "upenn_annotation/not-an-id", f"folder/{UNKNOWN_ID}",
                 f"item/{UNKNOWN_ID}/tiles", f"upenn_collection/{UNKNOWN_ID}"):
        note(f"GET {path}: {_answer(rest.call('GET', path))}")
    response = rest.call("GET", "dataset_view", params={"datasetId": ds})
    views = response.json()
    note(f"GET dataset_view?datasetId: {len(views)} view(s), keys {sorted(views[0]) if views else []}")

    a, b, c, d = ids[0], ids[1], ids[2], ids[3]
    response = rest.call("POST", "annotation_connection/multiple", json=[
        {"parentId": a, "childId": b, "datasetId": ds, "label": "probe", "tags": []},
        {"parentId": UNKNOWN_ID, "childId": a, "datasetId": ds, "label": "probe", "tags": []}])
    made = [x for x in _connections(rest, ds) if x.get("label") == "probe"]
    note(f"POST annotation_connection/multiple with one missing parent: {_answer(response)}; "
         f"connections made: {len(made)}")
    response = rest.call("POST", "annotation_connection/multiple", json=[
        {"parentId": a, "childId": UNKNOWN_ID, "datasetId": ds, "label": "probe", "tags": []}])
    note(f"... with a missing child: {_answer(response)}")
    response = rest.call("POST", "annotation_connection/multiple", json=[
        {"parentId": a, "childId": b, "datasetId": ds, "label": "probe", "tags": []},
        {"parentId": c, "childId": d, "datasetId": ds, "label": "probe", "tags": []},
        {"parentId": b, "childId": c, "datasetId": ds, "label": "probe", "tags": []}])
    body = response.json()
    note(f"POST annotation_connection/multiple (3 valid): {response.status_code}, a {type(body).__name__}"
         + (f" of {len(body)}" if isinstance(body, list) else ""))
    made = [x for x in _connections(rest, ds) if x.get("label") == "probe"]
    order = rest.call("GET", "annotation_connection", params={"datasetId": ds, "limit": 0}).json()
    note(f"GET annotation_connection without sort: ids in increasing order: "
         f"{[x['_id'] for x in order] == sorted(x['_id'] for x in order)}")
    first = [x for x in made if x["parentId"] == c][0]
    response = rest.call("DELETE", "annotation_connection/multiple", json=[first["_id"]])
    note(f"DELETE annotation_connection/multiple: {_answer(response)}")
    response = rest.call("DELETE", "annotation_connection/multiple", json=[UNKNOWN_ID])
    note(f"DELETE annotation_connection/multiple of an unknown id: {_answer(response)}")

    response = rest.call("DELETE", "upenn_annotation/multiple", json=[a])
    left = [x for x in _connections(rest, ds) if a in (x["parentId"], x["childId"])]
    note(f"DELETE upenn_annotation/multiple [a]: {_answer(response)}; connections still naming a: {len(left)}")
    response = rest.call("DELETE", f"upenn_annotation/{c}")
    left = [x for x in _connections(rest, ds) if c in (x["parentId"], x["childId"])]
    note(f"DELETE upenn_annotation/{{c}}: {_answer(response)}; connections still naming c: {len(left)}")
    response = rest.call("DELETE", f"upenn_annotation/{c}")
    note(f"DELETE upenn_annotation/{{c}} again: {_answer(response)}")
    response = rest.call("DELETE", "upenn_annotation/multiple", json=[c, UNKNOWN_ID])
    note(f"DELETE upenn_annotation/multiple of deleted/unknown ids: {_answer(response)}")

    interface = {"Probe": {"type": "notes", "value": "x", "displayOrder": 0}}
    response = rest.call("POST", "worker_interface", params={"image": "probe/image:latest"}, json=interface)
    got = rest.call("GET", "worker_interface", params={"image": "probe/image:latest"})
    note(f"POST worker_interface: {response.status_code}; GET answers {got.status_code} "
         f"{got.text[:120]}")


# -- the read endpoints of issue 21 (list/ids, hydrate, counts, connections per annotation) --------

_HEX_ID = re.compile(r"\b[0-9a-f]{24}\b")


def normalise(text: str, names: dict[str, str]) -> str:
    """``text`` with the ids of ``names`` replaced by their names and any other id by ``<id>``,
    so that two servers' answers about different ids compare."""
    return _HEX_ID.sub(lambda m: names.get(m.group(0), "<id>"), text)


def _short(response) -> str:
    """Status, then the server's message or the body's shape."""
    try:
        body = response.json()
    except ValueError:
        return f"{response.status_code} {response.text[:120]!r}"
    if isinstance(body, dict) and "message" in body:
        return f"{response.status_code} {body['message']!r}"
    if isinstance(body, dict) and isinstance(body.get("ids"), list):
        return f"{response.status_code} {{total: {body.get('total')}, ids: {len(body['ids'])}}}"
    if isinstance(body, list):
        return f"{response.status_code} a list of {len(body)}"
    return f"{response.status_code} {json.dumps(body)[:120]}"


def observe_reads(rest: Rest, dataset_id: str) -> list[tuple[str, str]]:
    """What the server answers to the read endpoints the worker uses (issue 21), in words with ids
    normalised (:func:`normalise`): ``(what was asked, the answer)``. It adds four annotations and a
    connection to ``dataset_id`` and deletes them again."""
    ds = dataset_id
    base = {"channel": 0, "datasetId": ds, "coordinates": [{"x": 1, "y": 1}, {"x": 9, "y": 1}, {"x": 9, "y": 9}]}
    docs = [{**base, "tags": ["obs-a"], "shape": "polygon", "location": {"XY": 0, "Z": 0, "Time": 0}},
            {**base, "tags": ["obs-a", "obs-b"], "shape": "polygon", "location": {"XY": 0, "Z": 0, "Time": 0}},
            {**base, "tags": ["obs-b"], "shape": "point", "location": {"XY": 0, "Z": 0, "Time": 0},
             "coordinates": [{"x": 3, "y": 3}]},
            {**base, "tags": ["obs-a"], "shape": "polygon", "location": {"XY": 0}}]  # the schema allows it
    made = rest.json("POST", "upenn_annotation/multiple", json=docs)
    a, b, c, partial = (d["_id"] for d in made)
    names = {ds: "<dataset>", UNKNOWN_ID: "<unknown>", a: "<a>", b: "<b>", c: "<c>", partial: "<partial>"}
    rest.json("POST", "annotation_connection/multiple", json=[
        {"parentId": a, "childId": b, "datasetId": ds, "label": "obs", "tags": []},
        {"parentId": c, "childId": a, "datasetId": ds, "label": "obs", "tags": []}])
    out: list[tuple[str, str]] = []

    def ask(label: str, method: str, path: str, **kwargs: Any) -> Any:
        response = rest.call(method, path, **kwargs)
        out.append((label, normalise(_short(response), names)))
        try:
            return response.json()
        except ValueError:
            return None

    def ids_of(filters: dict[str, Any]) -> Any:
        return rest.call("POST", "upenn_annotation/list/ids", json={"datasetId": ds, "filters": filters}).json()

    every = ask("list/ids, no filter", "POST", "upenn_annotation/list/ids", json={"datasetId": ds})
    if isinstance(every, dict) and isinstance(every.get("ids"), list):
        ids = every["ids"]
        out.append(("list/ids: ids in increasing order, total equal to their number",
                    f"{ids == sorted(ids)}, {every.get('total') == len(ids)}"))
    response = rest.call("POST", "upenn_annotation/list/ids", json={"datasetId": ds, "filters": {}})
    out.append(("list/ids: Content-Type", str(response.headers.get("Content-Type"))))
    for label, filters in (
        ("tags obs-a or obs-b (exclusive false)", {"tags": {"values": ["obs-a", "obs-b"], "exclusive": False}}),
        ("tags exactly obs-a and obs-b (exclusive true)", {"tags": {"values": ["obs-b", "obs-a"], "exclusive": True}}),
        ("location {XY: 0, Time: 0}, tag obs-a: the annotation stored with location {XY: 0} only",
         {"location": {"XY": 0, "Time": 0}, "tags": {"values": ["obs-a"], "exclusive": False}}),
        ("location {XY: 0}, tag obs-a: the same", {"location": {"XY": 0}, "tags": {"values": ["obs-a"],
                                                                                     "exclusive": False}}),
        ("location {XY: '0'} (a string), tag obs-a", {"location": {"XY": "0"}, "tags": {"values": ["obs-a"],
                                                                                        "exclusive": False}}),
        ("location {C: 5} (not an axis), tag obs-a", {"location": {"C": 5}, "tags": {"values": ["obs-a"],
                                                                                     "exclusive": False}}),
        # idSubstring runs the plugin's $regexMatch stage (the worker never sends it).
        ("idSubstring: the last 6 characters of <b>", {"idSubstring": b[-6:]}),
    ):
        got = ids_of(filters)
        names_got = sorted(normalise(i, names) for i in got["ids"]) if isinstance(got, dict) and "ids" in got \
            else got
        out.append((f"list/ids, {label}", str(names_got)))
    for label, body in (
        ("body without datasetId", {"filters": {}}),
        ("datasetId not an id", {"datasetId": "not-an-id"}),
        ("datasetId of no folder", {"datasetId": UNKNOWN_ID}),
        ("body a list", []),
        ("filters a string", {"datasetId": ds, "filters": "x"}),
        ("filters.location a string", {"datasetId": ds, "filters": {"location": "x"}}),
        ("filters.tags a list", {"datasetId": ds, "filters": {"tags": ["obs-a"]}}),
        ("filters.tags.values a string", {"datasetId": ds, "filters": {"tags": {"values": "obs-a"}}}),
        ("idConstraints [[]]", {"datasetId": ds, "filters": {"idConstraints": [[]]}}),
        ("idConstraints [['zz']]", {"datasetId": ds, "filters": {"idConstraints": [["zz"]]}}),
        ("idConstraints [] (no constraint)", {"datasetId": ds, "filters": {"idConstraints": []}}),
    ):
        ask(f"list/ids, {label}", "POST", "upenn_annotation/list/ids", json=body)

    got = ask("hydrate [b, a, unknown, a]", "POST", "upenn_annotation/hydrate", json=[b, a, UNKNOWN_ID, a])
    if isinstance(got, list):
        out.append(("hydrate [b, a, unknown, a]: ids in the answer's order",
                    str([normalise(str(d.get("_id")), names) for d in got if isinstance(d, dict)])))
        keys = sorted(got[0]) if got and isinstance(got[0], dict) else []
        out.append(("hydrate: keys of a document", str(keys)))
    for label, body in (("[]", []), ("an object", {"ids": [a]}), ("['zz']", ["zz"]), ("[7]", [7])):
        ask(f"hydrate {label}", "POST", "upenn_annotation/hydrate", json=body)

    ask("GET upenn_annotation/count", "GET", "upenn_annotation/count", params={"datasetId": ds, "shape": "point"})
    ask("GET upenn_annotation/count without datasetId", "GET", "upenn_annotation/count")
    ask("GET upenn_annotation/count of no folder", "GET", "upenn_annotation/count", params={"datasetId": UNKNOWN_ID})
    ask("GET annotation_connection/count", "GET", "annotation_connection/count", params={"datasetId": ds})
    ask("GET annotation_connection/count without datasetId", "GET", "annotation_connection/count")
    page = ask("GET annotation_connection?nodeAnnotationId=a&sort=_id&limit=1", "GET", "annotation_connection",
               params={"datasetId": ds, "nodeAnnotationId": a, "sort": "_id", "sortdir": 1, "limit": 1})
    if isinstance(page, list) and page:
        ask("... the next page (afterId the first)", "GET", "annotation_connection",
            params={"datasetId": ds, "nodeAnnotationId": a, "sort": "_id", "sortdir": 1, "limit": 1,
                    "afterId": page[0]["_id"]})
        ask("... the page after (afterId the last)", "GET", "annotation_connection",
            params={"datasetId": ds, "nodeAnnotationId": a, "sort": "_id", "sortdir": 1, "limit": 1,
                    "afterId": max(c["_id"] for c in _connections(rest, ds) if a in (c["parentId"], c["childId"]))})
    ask("GET annotation_connection?nodeAnnotationId=not-an-id", "GET", "annotation_connection",
        params={"datasetId": ds, "nodeAnnotationId": "not-an-id", "sort": "_id"})
    ask("GET annotation_connection?nodeAnnotationId=unknown", "GET", "annotation_connection",
        params={"datasetId": ds, "nodeAnnotationId": UNKNOWN_ID, "sort": "_id"})

    for con in _connections(rest, ds):
        if con.get("label") == "obs":
            rest.call("DELETE", "annotation_connection/multiple", json=[con["_id"]])
    rest.call("DELETE", "upenn_annotation/multiple", json=[a, b, c, partial])
    return out


def compare_reads(real: list[tuple[str, str]], local: list[tuple[str, str]]) -> list[str]:
    """``observed:`` lines: the real server's answer to each question, and the local test server's
    where it differs (or that it is the same)."""
    theirs = dict(local)
    lines = []
    for label, answer in real:
        other = theirs.get(label)
        same = "the local test server answers the same" if other == answer else (
            f"THE LOCAL TEST SERVER ANSWERS {other}" if other is not None else "the local test server was not asked")
        lines.append(f"reads: {label}: {answer} ({same})")
    return lines


_NOOP = re.compile(r"UserWarning: '(\w+)' is accepted by (\w+) for pymongo compatibility but is a no-op")


def substitute_noops(log_text: str) -> list[str]:
    """The options the substitute database accepted and ignored, from Girder's log
    (``aggregate(hint)``, ...), each once, in order."""
    return sorted({f"{method}({option})" for option, method in _NOOP.findall(log_text)})
