"""A request recorder for the worker's own HTTP client (runs INSIDE the worker's Python).

:func:`install` wraps ``sam2_refine.nimbus.client.NimbusClient._request`` (the one method every
request of the worker's client goes through) so that each request is written down, then
answered or raised unchanged: the method, the endpoint, the query parameters that choose what is
read (never a header: the token is not recorded), a summary of the JSON body, and what came
back (a status and the server's message for a failure; the ids, counts and annotation locations
of an answer). The check reads these records to see which reads a job made on the real server
(``list/ids``, ``hydrate``, listings, connection reads) and whether they succeeded, where the
worker itself only logs a failed re-read.

Imports only the standard library here; the worker's module is imported by :func:`install`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

#: Query parameters recorded (those that decide what a read returns).
KEPT_PARAMS = ("datasetId", "shape", "tags", "limit", "offset", "afterId", "sort", "sortdir", "nodeAnnotationId",
               "parentId", "childId", "frame", "encoding")


def _location(doc: dict[str, Any]) -> list[Any] | None:
    where = doc.get("location")
    if not isinstance(where, dict):
        return None
    return [where.get("XY"), where.get("Z"), where.get("Time")]


def summarise_body(endpoint: str, body: Any) -> Any:
    """What was sent: a ``list/ids`` body's filters (an id constraint as its sizes), a list's
    length (and, for ``hydrate``, the ids), or None."""
    if body is None:
        return None
    if endpoint == "upenn_annotation/list/ids" and isinstance(body, dict):
        filters = dict(body.get("filters") or {}) if isinstance(body.get("filters"), dict) else body.get("filters")
        if isinstance(filters, dict) and isinstance(filters.get("idConstraints"), list):
            filters["idConstraints"] = [len(c) if isinstance(c, list) else c for c in filters["idConstraints"]]
        return {"datasetId": body.get("datasetId"), "filters": filters}
    if isinstance(body, list):
        out: dict[str, Any] = {"items": len(body)}
        if endpoint == "upenn_annotation/hydrate":
            out["ids"] = [str(i) for i in body]
        return out
    return {"type": type(body).__name__}


def summarise_result(endpoint: str, result: Any) -> Any:
    """What came back: ``{total, ids}`` of ``list/ids``; ``{count}``; for a list of annotations
    their ``[id, XY, Z, Time]``; for connections their ids; else the type."""
    if isinstance(result, dict) and isinstance(result.get("ids"), list):
        return {"total": result.get("total"), "ids": [str(i) for i in result["ids"]]}
    if isinstance(result, dict) and set(result) == {"count"}:
        return {"count": result["count"]}
    if isinstance(result, list):
        out: dict[str, Any] = {"count": len(result)}
        docs = [d for d in result if isinstance(d, dict)]
        if endpoint.startswith("upenn_annotation"):
            out["docs"] = [[str(d.get("_id")), *(_location(d) or [None, None, None])] for d in docs]
        elif endpoint.startswith("annotation_connection"):
            out["ids"] = [str(d.get("_id")) for d in docs]
        return out
    return {"type": type(result).__name__}


def record_of(method: str, endpoint: str, params: dict[str, Any] | None, body: Any) -> dict[str, Any]:
    """The request part of a record."""
    kept = {k: params[k] for k in KEPT_PARAMS if params and k in params}
    return {"method": method, "endpoint": endpoint, "params": kept, "body": summarise_body(endpoint, body)}


def install(sink: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
    """Wrap the worker's ``NimbusClient._request``; each request's record goes to ``sink`` (called
    under a lock). Returns a function that takes the wrapper out again."""
    from sam2_refine.nimbus import client as nimbus_client

    original = nimbus_client.NimbusClient._request
    lock = threading.Lock()

    def _request(self, method, endpoint, *args, **kwargs):
        entry = record_of(method, endpoint, kwargs.get("params"), kwargs.get("json_body"))
        try:
            result = original(self, method, endpoint, *args, **kwargs)
        except BaseException as exc:
            entry.update(ok=False, status=getattr(exc, "status", None),
                         detail=str(getattr(exc, "detail", exc))[:300], error=type(exc).__name__)
            with lock:
                sink(entry)
            raise
        entry.update(ok=True, result=summarise_result(endpoint, result) if not kwargs.get("raw") else "raw")
        with lock:
            sink(entry)
        return result

    nimbus_client.NimbusClient._request = _request

    def uninstall() -> None:
        nimbus_client.NimbusClient._request = original

    return uninstall
