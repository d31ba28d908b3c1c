"""Calls the worker's own reads against a server and writes down what they returned (runs INSIDE
the worker's Python, with the worker tree first on the path).

    python reads_probe.py API_URL SPEC.json OUT.json      (the token in the environment: CHECK_TOKEN)

``SPEC.json``: ``{"dataset_id": ..., "calls": [{"name": ..., "op": ..., ...}, ...]}``, made by
:func:`real_server.reads.probe_spec`. Each call goes through ``sam2_refine.nimbus.client.NimbusClient``
or ``sam2_refine.job.batch_reads.BatchReader`` exactly as the worker makes it; ``OUT.json`` holds, per
call, what it returned (ids, documents, counts) or the exception it raised (type, HTTP status,
the server's message), and the requests it sent (:mod:`real_server.recorder`). The check compares
them with what the server holds (:mod:`real_server.reads`).

Operations (``op``):

- ``list_ids``: ``NimbusClient.list_annotation_ids(dataset, location, shape, tags, ids)``;
- ``hydrate``: ``NimbusClient.hydrate(ids, chunk)``;
- ``count_annotations``, ``count_connections``;
- ``connections``: ``NimbusClient.list_connections(dataset, node_id=..., page_size=...)``;
- ``reader_annotations``: ``BatchReader(batch, sizes, costs).annotations(shapes)`` (and its plan);
- ``reader_existing``: ``BatchReader.existing(ids)``;
- ``reader_connections``: ``BatchReader.connections_touching(ids)``;
- ``reader_at_location``: ``BatchReader.at_location(location, tags, read_before)``.

``costs`` names a cost model that forces the reader's choice: ``queries`` (one query per batch
location), ``listing`` (one cursor listing), ``per_annotation`` (connections by
``nodeAnnotationId``), or ``default`` (the worker's own).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

# The scripts folder, not this one, is on the path (this folder's module names, such as
# ``venv`` or ``server``, must not shadow any other module).
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from real_server import recorder  # noqa: E402


def _costs(name: str):
    from sam2_refine.job.read_plan import DEFAULT_COSTS, ReadCosts

    presets = {
        "default": DEFAULT_COSTS,
        # Requests free, shipping dear: every axis the batch does not cover is fixed; the small
        # page makes the reader hydrate in several chunks.
        "queries": ReadCosts(request=1e-9, walk_per_annotation=0.0, per_annotation=1.0, per_connection=1.0, page=3),
        # Requests dear, shipping free: one listing (annotations and connections).
        "listing": ReadCosts(request=1.0, walk_per_annotation=1.0, per_annotation=1e-9, per_connection=1e-9),
        # Connections one annotation at a time.
        "per_annotation": ReadCosts(request=1e-9, per_connection=1.0),
    }
    return presets[name]


def _doc(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: doc.get(k) for k in ("_id", "location", "shape", "tags", "coordinates", "datasetId", "channel")}


def _reader(client, dataset_id: str, call: dict[str, Any]):
    from sam2_refine.job.batch_reads import BatchReader

    batch = tuple(tuple(int(v) for v in axis) for axis in call.get("batch", [[0], [0], [0]]))
    sizes = tuple(int(v) for v in call.get("sizes", [1, 1, 1]))
    return BatchReader(client, dataset_id, batch, sizes, _costs(call.get("costs", "default")))


def run_call(client, dataset_id: str, call: dict[str, Any]) -> dict[str, Any]:
    """One call's value (JSON-able)."""
    op = call["op"]
    if op == "list_ids":
        return {"ids": client.list_annotation_ids(dataset_id, location=call.get("location"), shape=call.get("shape"),
                                                  tags=call.get("tags"), ids=call.get("ids"))}
    if op == "hydrate":
        docs = client.hydrate(call["ids"], call.get("chunk", 5000))
        return {"docs": [_doc(d) for d in docs]}
    if op == "count_annotations":
        return {"count": client.count_annotations(dataset_id)}
    if op == "count_connections":
        return {"count": client.count_connections(dataset_id)}
    if op == "connections":
        found = client.list_connections(dataset_id, page_size=call.get("page_size", 5000), node_id=call.get("node_id"))
        return {"ids": [str(c.get("_id")) for c in found],
                "ends": [[str(c.get("parentId")), str(c.get("childId"))] for c in found]}
    if op == "reader_annotations":
        reader = _reader(client, dataset_id, call)
        docs = list(reader.annotations(call["shapes"]))
        plan = reader.plan
        return {"docs": [_doc(d) for d in docs], "plan": list(plan.locations) if plan.scoped else None,
                "scoped": reader.scoped}
    if op == "reader_existing":
        return {"ids": sorted(_reader(client, dataset_id, call).existing(set(call["ids"])))}
    if op == "reader_connections":
        found = _reader(client, dataset_id, call).connections_touching(set(call["ids"]))
        return {"ids": [str(c.get("_id")) for c in found]}
    if op == "reader_at_location":
        from sam2_refine.job.settings import Location

        ids, docs = _reader(client, dataset_id, call).at_location(Location(*call["location"]), call["tags"],
                                                                   set(call.get("read_before", [])))
        return {"ids": list(ids), "docs": [_doc(d) for d in docs]}
    raise ValueError(f"unknown probe operation {op!r}")


def run(api_url: str, token: str, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every call of ``spec``, each with its value or error and the requests it sent."""
    from sam2_refine.nimbus.client import NimbusClient

    sent: list[dict[str, Any]] = []
    uninstall = recorder.install(sent.append)
    out = []
    try:
        with NimbusClient(api_url, token) as client:
            for call in spec["calls"]:
                sent.clear()
                entry: dict[str, Any] = {"name": call["name"], "op": call["op"]}
                try:
                    entry["value"] = run_call(client, spec["dataset_id"], call)
                except Exception as exc:  # noqa: BLE001 - what the worker's call raised is the observation
                    entry["error"] = {"type": type(exc).__name__, "status": getattr(exc, "status", None),
                                      "detail": str(getattr(exc, "detail", exc))[:300]}
                entry["requests"] = list(sent)
                out.append(entry)
    finally:
        uninstall()
    return out


def main(argv: list[str]) -> int:
    api_url, spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    Path(out_path).write_text(json.dumps(run(api_url, os.environ["CHECK_TOKEN"], spec), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
