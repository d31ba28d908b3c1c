"""The checks of the worker's scoped reads against the real server (pure: no I/O).

Two kinds:

- **Probe calls** (:func:`probe_spec`, run by ``reads_probe.py`` through the worker's own
  ``NimbusClient`` and ``BatchReader``): each call's answer is compared with what the server
  holds, read independently by the check (``GET upenn_annotation?limit=0`` and
  ``GET annotation_connection?limit=0``): :func:`expected`, :func:`verdict`.
- **A job's requests** (recorded by :mod:`real_server.recorder` in the worker process):
  :func:`job_reads` sums them up; :func:`scoped_verdict` says whether the job read its batch by
  location queries (``list/ids`` + ``hydrate``), every one answered, no listing of the dataset,
  no ``shape=blob``; :func:`shipped_outside` names the annotations it received from outside its
  batch; :func:`connection_verdict` how it read connections.

Locations are ``(XY, Z, Time)``, 0-based, as the server stores them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from real_server.checks import Verdict

UNKNOWN_ID = "0123456789abcdef01234567"
#: The fields of an annotation compared between a hydrated document and the listing's.
COMPARED = ("location", "shape", "tags", "coordinates", "datasetId", "channel")

Location = tuple[int, int, int]


def location_of(doc: dict[str, Any]) -> Location | None:
    """The stored ``(XY, Z, Time)``; None where a key is missing or not a whole number."""
    where = doc.get("location")
    if not isinstance(where, dict):
        return None
    values = [where.get(k) for k in ("XY", "Z", "Time")]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return None
    return (values[0], values[1], values[2])


# -- the reads dataset --------------------------------------------------------------------------


def extra_docs(dataset_id: str) -> list[dict[str, Any]]:
    """Annotations added to the reads dataset beside its nuclei and spots (all at Z 0), so that
    every filter has something to leave out: polygons at Time 1 (the image has one time point;
    the server does not check locations against it), polygons tagged ``refined`` and
    ``refined`` + ``extra``, a point tagged ``extra``, a line at XY 1, Time 1."""
    def doc(shape: str, xy: int, time: int, tags: list[str], offset: float) -> dict[str, Any]:
        points = [(10 + offset, 10), (30 + offset, 10), (30 + offset, 30), (10 + offset, 30)]
        if shape == "point":
            points = points[:1]
        elif shape == "line":
            points = points[:2]
        return {"tags": tags, "shape": shape, "channel": 0, "location": {"XY": xy, "Z": 0, "Time": time},
                "datasetId": dataset_id, "coordinates": [{"x": x, "y": y, "z": 0} for x, y in points]}

    return ([doc("polygon", 0, 1, ["nucleus"], 40.0 * i) for i in range(3)]
            + [doc("polygon", 0, 0, ["refined"], 200.0 + 40 * i) for i in range(2)]
            + [doc("polygon", 0, 0, ["refined", "extra"], 300.0), doc("point", 0, 0, ["extra"], 350.0)]
            + [doc("polygon", 1, 0, ["refined"], 400.0 + 40 * i) for i in range(2)]
            + [doc("line", 1, 1, ["extra"], 500.0)])


def probe_spec(dataset_id: str, annotations: list[dict[str, Any]], connections: list[dict[str, Any]],
               other_id: str, deleted_id: str) -> dict[str, Any]:
    """The probe's calls on the reads dataset (see ``reads_probe.py`` for the operations).

    Args:
        annotations: The dataset's annotations as the server lists them.
        connections: Its connections.
        other_id: An annotation of another dataset the same user reads.
        deleted_id: An annotation that was deleted.
    """
    ids = sorted(d["_id"] for d in annotations)
    at_origin = sorted(d["_id"] for d in annotations if location_of(d) == (0, 0, 0))
    degree = Counter(end for c in connections for end in (c["parentId"], c["childId"]))
    node = max(sorted(degree), key=lambda k: degree[k])  # the annotation with the most connections
    pair = sorted(degree)[:2] + [node]
    mixed = at_origin[:3] + [deleted_id, UNKNOWN_ID, other_id]
    refined_here = sorted(d["_id"] for d in annotations if location_of(d) == (0, 0, 0)
                          and d.get("shape") == "polygon" and "refined" in (d.get("tags") or []))
    sizes = [2, 1, 2]  # XY 2 positions, Z 1, Time 2 (the extra polygons at Time 1)
    calls = [
        {"name": "list/ids, location XY only", "op": "list_ids", "location": {"XY": 0}},
        {"name": "list/ids, location XY and Time", "op": "list_ids", "location": {"XY": 0, "Time": 1}},
        {"name": "list/ids, location XY, Z, Time and shape polygon", "op": "list_ids",
         "location": {"XY": 1, "Z": 0, "Time": 0}, "shape": "polygon"},
        {"name": "list/ids, shape point, no location", "op": "list_ids", "shape": "point"},
        {"name": "list/ids, tags refined or extra (exclusive false)", "op": "list_ids", "tags": ["refined", "extra"]},
        {"name": "list/ids, idConstraints (existing, deleted, unknown and another dataset's ids)", "op": "list_ids",
         "ids": mixed},
        {"name": "list/ids, an empty id list", "op": "list_ids", "ids": []},
        {"name": "hydrate, existing, deleted, unknown and another dataset's ids", "op": "hydrate", "ids": mixed},
        {"name": "hydrate, every annotation of the dataset in chunks of 4", "op": "hydrate", "ids": ids, "chunk": 4},
        {"name": "upenn_annotation/count", "op": "count_annotations"},
        {"name": "annotation_connection/count", "op": "count_connections"},
        {"name": "connections of one annotation by nodeAnnotationId (sort _id, afterId cursor, pages of 1)",
         "op": "connections", "node_id": node, "page_size": 1},
        {"name": "connections of the dataset (sort _id, afterId cursor, pages of 3)", "op": "connections",
         "page_size": 3},
        {"name": "BatchReader.annotations, per-location plan, XY 1 Time 2, polygons", "op": "reader_annotations",
         "batch": [[0], [0], [1]], "sizes": sizes, "costs": "queries", "shapes": ["polygon"]},
        {"name": "BatchReader.annotations, per-location plan, XY 1 Time 1, polygons and points",
         "op": "reader_annotations", "batch": [[0], [0], [0]], "sizes": sizes, "costs": "queries",
         "shapes": ["polygon", "point"]},
        {"name": "BatchReader.annotations, per-location plan, XY 1 and 2 at Time 1, polygons",
         "op": "reader_annotations", "batch": [[0, 1], [0], [0]], "sizes": sizes, "costs": "queries",
         "shapes": ["polygon"]},
        {"name": "BatchReader.annotations, one listing, XY 1 Time 1, polygons and points",
         "op": "reader_annotations", "batch": [[0], [0], [0]], "sizes": sizes, "costs": "listing",
         "shapes": ["polygon", "point"]},
        {"name": "BatchReader.annotations, the worker's own cost model, XY 1 Time 1, polygons",
         "op": "reader_annotations", "batch": [[0], [0], [0]], "sizes": sizes, "costs": "default",
         "shapes": ["polygon"]},
        {"name": "BatchReader.existing", "op": "reader_existing", "ids": mixed},
        {"name": "BatchReader.connections_touching, one annotation at a time", "op": "reader_connections",
         "ids": pair, "costs": "per_annotation"},
        {"name": "BatchReader.connections_touching, one listing", "op": "reader_connections", "ids": pair,
         "costs": "listing"},
        {"name": "BatchReader.at_location (the re-read), XY 1 Time 1, tag refined, one read before",
         "op": "reader_at_location", "location": [0, 0, 0], "tags": ["refined"], "read_before": refined_here[:1]},
    ]
    for call in calls:
        call.setdefault("sizes", sizes)
    return {"dataset_id": dataset_id, "calls": calls}


# -- what the server holds ----------------------------------------------------------------------


@dataclass
class World:
    """What the server holds, read by the check itself.

    Attributes:
        dataset_id: The probed dataset.
        annotations: Every annotation the user can read that matters (the probed dataset's and
            the other dataset's), by id.
        connections: The probed dataset's connections.
    """

    dataset_id: str
    annotations: dict[str, dict[str, Any]]
    connections: list[dict[str, Any]] = field(default_factory=list)

    def of_dataset(self) -> list[dict[str, Any]]:
        return [d for d in self.annotations.values() if d.get("datasetId") == self.dataset_id]


def _matches(doc: dict[str, Any], location: dict[str, int] | None, shape: str | None,
             tags: list[str] | None, ids: list[str] | None) -> bool:
    where = doc.get("location") if isinstance(doc.get("location"), dict) else {}
    if location and any(where.get(k) != v for k, v in location.items()):
        return False
    if shape and doc.get("shape") != shape:
        return False
    if tags and not set(tags) & set(doc.get("tags") or []):
        return False
    return ids is None or doc["_id"] in ids


def _batch_holds(call: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    batch = [set(axis) for axis in call.get("batch", [[0], [0], [0]])]

    def holds(doc: dict[str, Any]) -> bool:
        where = location_of(doc)
        return where is not None and all(v in axis for v, axis in zip(where, batch))

    return holds


def expected(call: dict[str, Any], world: World) -> dict[str, Any]:
    """What a call must return, from what the server holds."""
    op = call["op"]
    docs = world.of_dataset()
    if op == "list_ids":
        return {"ids": sorted(d["_id"] for d in docs if _matches(d, call.get("location"), call.get("shape"),
                                                                 call.get("tags"), call.get("ids")))}
    if op in ("hydrate", "reader_existing"):
        return {"ids": sorted(i for i in set(call["ids"]) if i in world.annotations)}
    if op == "count_annotations":
        return {"count": len(docs)}
    if op == "count_connections":
        return {"count": len(world.connections)}
    if op in ("connections", "reader_connections"):
        ends = {call["node_id"]} if op == "connections" and call.get("node_id") else set(call.get("ids") or [])
        keep = [c for c in world.connections if not ends or {c["parentId"], c["childId"]} & ends]
        return {"ids": sorted(c["_id"] for c in keep)}
    if op == "reader_annotations":
        holds = _batch_holds(call)
        return {"ids": sorted(d["_id"] for d in docs if d.get("shape") in call["shapes"] and holds(d))}
    if op == "reader_at_location":
        where = dict(zip(("XY", "Z", "Time"), call["location"]))
        ids = sorted(d["_id"] for d in docs if _matches(d, where, "polygon", call["tags"] or None, None))
        return {"ids": ids, "docs": sorted(set(ids) - set(call.get("read_before", [])))}
    raise ValueError(f"unknown probe operation {op!r}")


def expected_plan(call: dict[str, Any]) -> list[dict[str, int]] | None:
    """The location filters a forced per-location plan must use (every axis the batch does not
    cover fixed), or None for a forced listing; the worker's own model is not predicted here."""
    if call.get("costs") == "listing":
        return None
    if call.get("costs") != "queries":
        raise ValueError("only a forced plan is predicted")
    axes = [(name, sorted(set(axis))) for name, axis, size in zip(("XY", "Z", "Time"), call["batch"], call["sizes"])
            if len(set(axis)) < size]
    filters: list[dict[str, int]] = [{}]
    for name, values in axes:
        filters = [{**f, name: v} for f in filters for v in values]
    return filters


# -- comparing ----------------------------------------------------------------------------------


def _difference(got: list[str], want: list[str]) -> str:
    extra = sorted(set(got) - set(want))
    missing = sorted(set(want) - set(got))
    twice = sorted(i for i, n in Counter(got).items() if n > 1)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:2])})")
    if extra:
        parts.append(f"{len(extra)} not expected (e.g. {', '.join(extra[:2])})")
    if twice:
        parts.append(f"{len(twice)} returned twice")
    return "; ".join(parts)


def endpoints(requests: Iterable[dict[str, Any]]) -> Counter[str]:
    """``METHOD endpoint`` -> how many requests (an annotation or connection listing named by its
    distinguishing parameter)."""
    out: Counter[str] = Counter()
    for r in requests:
        name = f"{r['method']} {r['endpoint']}"
        if r["endpoint"] == "annotation_connection" and r["params"].get("nodeAnnotationId"):
            name += "?nodeAnnotationId"
        out[name] += 1
    return out


def _requests_text(requests: list[dict[str, Any]]) -> str:
    counted = endpoints(requests)
    failed = [r for r in requests if not r.get("ok")]
    text = ", ".join(f"{k} x{n}" for k, n in sorted(counted.items()))
    if failed:
        text += "; failed: " + ", ".join(f"{r['endpoint']} {r.get('status')} {r.get('detail')}" for r in failed[:2])
    return text or "no request"


def _doc_mismatches(docs: list[dict[str, Any]], world: World) -> list[str]:
    out = []
    for doc in docs:
        stored = world.annotations.get(doc.get("_id"))
        if stored is None:
            continue
        differ = [k for k in COMPARED if doc.get(k) != stored.get(k)]
        if differ:
            out.append(f"{doc.get('_id')} differs from the listing in {', '.join(differ)}")
    return out


def verdict(call: dict[str, Any], result: dict[str, Any], world: World) -> Verdict:
    """Whether the probe's answer to ``call`` is what the server holds (and, for the reader with a
    forced plan, whether it read the way the plan says)."""
    requests = result.get("requests") or []
    sent = _requests_text(requests)
    if "error" in result:
        error = result["error"]
        return Verdict(False, f"raised {error.get('type')} (status {error.get('status')}): {error.get('detail')}; "
                              f"requests: {sent}")
    value, want = result["value"], expected(call, world)
    op = call["op"]
    problems: list[str] = []
    if op in ("count_annotations", "count_connections"):
        if value["count"] != want["count"]:
            problems.append(f"counted {value['count']}, the server holds {want['count']}")
        shown = f"{value['count']}"
    else:
        got = [d["_id"] for d in value["docs"]] if op in ("hydrate", "reader_annotations") else value["ids"]
        shown = f"{len(got)} id(s)"
        if _difference(got, want["ids"]):
            problems.append(_difference(got, want["ids"]))
        if "docs" in value:
            problems += _doc_mismatches(value["docs"], world)[:2]
        if op == "reader_at_location":
            fresh = [d["_id"] for d in value["docs"]]
            shown += f", {len(fresh)} document(s) fetched"
            if _difference(fresh, want["docs"]):
                problems.append("documents fetched: " + _difference(fresh, want["docs"]))
    problems += _read_path_problems(call, value, requests)
    detail = f"{shown}, as the server holds; requests: {sent}"
    if problems:
        return Verdict(False, "; ".join(problems) + f"; requests: {sent}")
    return Verdict(True, detail)


def _read_path_problems(call: dict[str, Any], value: dict[str, Any], requests: list[dict[str, Any]]) -> list[str]:
    """How the reader must have read: a forced plan its way, the connections their way."""
    counted = endpoints(requests)
    problems = []
    failed = [r for r in requests if not r.get("ok")]
    if failed:
        problems.append(f"{len(failed)} request(s) failed")
    costs = call.get("costs")
    if call["op"] == "reader_annotations" and costs in ("queries", "listing"):
        plan = expected_plan(call)
        if value.get("plan") != plan:
            problems.append(f"planned {value.get('plan')}, expected {plan}")
        listed = counted["GET upenn_annotation"]
        if costs == "queries" and (listed or not counted["POST upenn_annotation/list/ids"]):
            problems.append("a per-location plan must read with list/ids and hydrate only")
        if costs == "listing" and (counted["POST upenn_annotation/list/ids"] or not listed):
            problems.append("a listing plan must not send list/ids")
        filters = [r["body"]["filters"].get("location") for r in requests
                   if r["endpoint"] == "upenn_annotation/list/ids" and isinstance(r.get("body"), dict)]
        if costs == "queries" and sorted(map(str, filters)) != sorted(map(str, plan or [])):
            problems.append(f"list/ids sent with locations {filters}, the plan is {plan}")
    if call["op"] == "reader_connections" and costs in ("per_annotation", "listing"):
        per_node = counted["GET annotation_connection?nodeAnnotationId"]
        listed = counted["GET annotation_connection"]
        if costs == "per_annotation" and (listed or per_node < len(set(call["ids"]))):
            problems.append("connections must be read one annotation at a time")
        if costs == "listing" and (per_node or not listed):
            problems.append("connections must be read with one listing")
    if call["op"] == "connections":
        unsorted = [r for r in requests
                    if r["endpoint"] == "annotation_connection" and r["params"].get("sort") != "_id"]
        cursor = [r for r in requests if r["params"].get("afterId")]
        if unsorted:
            problems.append("a connection page was asked for without sort=_id")
        if len(requests) > 1 and not cursor:
            problems.append("later pages were not asked for with afterId")
    return problems


def observation(result: dict[str, Any]) -> str:
    """An ``observe`` call's outcome in words."""
    if "error" in result:
        error = result["error"]
        return f"raised {error.get('type')} (status {error.get('status')}): {error.get('detail')}"
    return f"returned {result.get('value')}"


# -- a job's requests ---------------------------------------------------------------------------


@dataclass
class JobReads:
    """A job's reads, from its recorded requests."""

    list_ids: list[dict[str, Any]]
    hydrate: list[dict[str, Any]]
    listings: list[dict[str, Any]]
    blob: list[dict[str, Any]]
    per_node: list[dict[str, Any]]
    connection_listings: list[dict[str, Any]]
    failed_reads: list[dict[str, Any]]
    counts: list[dict[str, Any]]


READ_ENDPOINTS = ("upenn_annotation", "upenn_annotation/list/ids", "upenn_annotation/hydrate",
                  "upenn_annotation/count", "annotation_connection", "annotation_connection/count")


def job_reads(records: list[dict[str, Any]]) -> JobReads:
    """Sort a job's recorded requests into its kinds of read."""
    def of(method: str, endpoint: str) -> list[dict[str, Any]]:
        return [r for r in records if r["method"] == method and r["endpoint"] == endpoint]

    connections = of("GET", "annotation_connection")
    return JobReads(
        list_ids=of("POST", "upenn_annotation/list/ids"),
        hydrate=of("POST", "upenn_annotation/hydrate"),
        listings=[r for r in of("GET", "upenn_annotation") if r["params"].get("datasetId")],
        blob=[r for r in records if r["params"].get("shape") == "blob"],
        per_node=[r for r in connections if r["params"].get("nodeAnnotationId")],
        connection_listings=[r for r in connections if not r["params"].get("nodeAnnotationId")],
        failed_reads=[r for r in records if not r.get("ok") and r["endpoint"] in READ_ENDPOINTS],
        counts=of("GET", "upenn_annotation/count") + of("GET", "annotation_connection/count"),
    )


def _filters_outside(list_ids: list[dict[str, Any]], holds: Callable[[Location], bool],
                     sizes: Location) -> list[str]:
    """``list/ids`` filters that name a location no batch location has (or name none)."""
    out = []
    for r in list_ids:
        filters = (r.get("body") or {}).get("filters") or {}
        where = filters.get("location") if isinstance(filters, dict) else None
        if not isinstance(where, dict) or not where:
            out.append("a list/ids request without a location filter")
            continue
        fixed = [(i, where.get(k)) for i, k in enumerate(("XY", "Z", "Time")) if where.get(k) is not None]
        # Some location of the dataset that the filter matches must be in the batch.
        grid = [range(n) for n in sizes]
        for i, value in fixed:
            grid[i] = range(value, value + 1)
        if not any(holds((x, z, t)) for x in grid[0] for z in grid[1] for t in grid[2]):
            out.append(f"list/ids at {where}")
    return out


def scoped_verdict(records: list[dict[str, Any]], holds: Callable[[Location], bool], sizes: Location) -> Verdict:
    """Passes when the job read annotations by location queries only: at least one ``list/ids``
    and one ``hydrate``, each filter at the batch's locations, every read answered, no listing
    of the dataset's annotations, no ``shape=blob``."""
    reads = job_reads(records)
    problems = []
    if not reads.list_ids:
        problems.append("no list/ids request")
    if not reads.hydrate:
        problems.append("no hydrate request")
    if reads.listings:
        problems.append(f"{len(reads.listings)} listing(s) of the dataset's annotations "
                        f"(shapes {sorted({str(r['params'].get('shape')) for r in reads.listings})})")
    if reads.blob:
        problems.append(f"{len(reads.blob)} shape=blob request(s)")
    if reads.failed_reads:
        first = reads.failed_reads[0]
        problems.append(f"{len(reads.failed_reads)} read(s) failed (e.g. {first['method']} {first['endpoint']} "
                        f"{first.get('status')}: {first.get('detail')})")
    outside = _filters_outside(reads.list_ids, holds, sizes)
    if outside:
        problems.append(f"{len(outside)} query(ies) outside the batch (e.g. {outside[0]})")
    filters = sorted({str((r.get('body') or {}).get('filters')) for r in reads.list_ids})
    detail = (f"{len(reads.list_ids)} list/ids (filters {', '.join(filters[:3])}"
              + (f" and {len(filters) - 3} more" if len(filters) > 3 else "")
              + f"), {len(reads.hydrate)} hydrate, {len(reads.counts)} count(s), {len(reads.listings)} listing(s)")
    if problems:
        return Verdict(False, "; ".join(problems) + f" ({detail})")
    return Verdict(True, detail + ", every one answered 200")


def listing_verdict(records: list[dict[str, Any]]) -> Verdict:
    """Passes when a job that reads by listing asked for every page in ``_id`` order, with no
    ``shape=blob`` and every read answered."""
    reads = job_reads(records)
    unsorted = [r for r in reads.listings + reads.connection_listings + reads.per_node
                if r["params"].get("sort") != "_id"]
    problems = []
    if not reads.listings:
        problems.append("no listing of the dataset's annotations")
    if unsorted:
        problems.append(f"{len(unsorted)} listing page(s) not asked for in _id order")
    if reads.blob:
        problems.append(f"{len(reads.blob)} shape=blob request(s)")
    if reads.failed_reads:
        problems.append(f"{len(reads.failed_reads)} read(s) failed")
    shapes = sorted({str(r["params"].get("shape")) for r in reads.listings})
    detail = (f"{len(reads.listings)} listing page(s) of shapes {', '.join(shapes)}, {len(reads.list_ids)} list/ids, "
              f"{len(reads.hydrate)} hydrate, {len(reads.connection_listings)} connection listing page(s), "
              f"{len(reads.per_node)} nodeAnnotationId request(s), {len(reads.blob)} shape=blob")
    if problems:
        return Verdict(False, "; ".join(problems) + f" ({detail})")
    return Verdict(True, detail + ", every one answered 200")


def shipped(records: list[dict[str, Any]]) -> dict[str, Location | None]:
    """Every annotation the job received (listings, ``hydrate``, creations' echoes left out):
    id -> its location."""
    out: dict[str, Location | None] = {}
    for r in records:
        if r["method"] != "GET" and r["endpoint"] != "upenn_annotation/hydrate":
            continue
        if not r["endpoint"].startswith("upenn_annotation") or not isinstance(r.get("result"), dict):
            continue
        for entry in r["result"].get("docs") or []:
            loc = tuple(entry[1:4])
            out[entry[0]] = loc if all(isinstance(v, int) for v in loc) else None  # type: ignore[assignment]
    return out


def shipped_outside(records: list[dict[str, Any]], holds: Callable[[Location], bool]) -> list[str]:
    """Ids of the annotations the job received from outside its batch."""
    return sorted(i for i, loc in shipped(records).items() if loc is None or not holds(loc))


def connection_verdict(records: list[dict[str, Any]]) -> Verdict:
    """Passes when the job read connections only in the two ways its cost model chooses between
    (``job/read_plan.py``: per annotation with ``nodeAnnotationId``, or one cursor listing of the
    dataset's connections, paged by ``afterId``), each in ``_id`` order, never by offset, every
    request answered. On the real plugin a ``nodeAnnotationId`` query walks the dataset's
    connections, so for more than a few annotations the listing is the cheaper read."""
    reads = job_reads(records)
    connection_reads = reads.per_node + reads.connection_listings
    unsorted = [r for r in connection_reads if r["params"].get("sort") != "_id"]
    failed = [r for r in connection_reads if not r.get("ok")]
    nodes = {r["params"]["nodeAnnotationId"] for r in reads.per_node}
    first_pages = [r for r in reads.connection_listings if not r["params"].get("afterId")]
    detail = (f"{len(reads.per_node)} nodeAnnotationId request(s) for {len(nodes)} annotation(s), "
              f"{len(reads.connection_listings)} listing page(s) of the dataset's connections "
              f"({len(first_pages)} listing(s))")
    problems = []
    if not connection_reads:
        problems.append("no connection read")
    if unsorted:
        problems.append(f"{len(unsorted)} not asked for in _id order")
    offset = [r for r in connection_reads if r["params"].get("offset")]
    if offset:
        problems.append(f"{len(offset)} paged by offset")
    if failed:
        problems.append(f"{len(failed)} failed ({failed[0].get('status')}: {failed[0].get('detail')})")
    if problems:
        return Verdict(False, "; ".join(problems) + f" ({detail})")
    return Verdict(True, detail + ", every one answered 200")
