"""The checks, over snapshots of what the server holds (pure: no I/O).

A refinement is an annotation whose ``sam2Refine.originalId`` names the original it replaces
(the worker's documented mark, ``sam2_refine/job/markers.py``; read here on its own so that the
check does not depend on the worker's code). Annotation and connection documents are the
server's JSON (``_id``, ``parentId``, ``childId``).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

MARKER_KEY = "sam2Refine"


def original_of(doc: dict[str, Any]) -> str | None:
    """The original id an annotation refines, or None (not a refinement)."""
    mark = doc.get(MARKER_KEY)
    if isinstance(mark, dict) and isinstance(mark.get("originalId"), str):
        return mark["originalId"]
    return None


def refinements_by_original(annotations: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    """original id -> ids of the annotations that refine it."""
    out: dict[str, list[str]] = defaultdict(list)
    for doc in annotations:
        original = original_of(doc)
        if original is not None:
            out[original].append(doc["_id"])
    return dict(out)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    detail: str


def _some(ids: Iterable[str], limit: int = 3) -> str:
    ids = list(ids)
    head = ", ".join(ids[:limit])
    return head + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def one_refinement_per_original(originals: Iterable[str], annotations: list[dict[str, Any]]) -> Verdict:
    """Passes when no original has more than one refinement on the server."""
    originals = list(originals)
    refined = refinements_by_original(annotations)
    twice = [o for o in originals if len(refined.get(o, [])) > 1]
    count = sum(1 for o in originals if refined.get(o))
    if twice:
        return Verdict(False, f"{len(twice)} original(s) have several refinements (e.g. {_some(twice)}); "
                              f"{count} of {len(originals)} refined")
    return Verdict(True, f"{count} of {len(originals)} originals refined, none twice")


def nothing_lost(originals: Iterable[str], annotations: list[dict[str, Any]]) -> Verdict:
    """Passes when every original is still on the server or replaced by exactly one refinement."""
    originals = list(originals)
    present = {doc["_id"] for doc in annotations}
    refined = refinements_by_original(annotations)
    kept = [o for o in originals if o in present]
    replaced = [o for o in originals if o not in present and len(refined.get(o, [])) == 1]
    lost = [o for o in originals if o not in present and len(refined.get(o, [])) != 1]
    detail = f"{len(kept)} kept, {len(replaced)} replaced by their refinement"
    if lost:
        return Verdict(False, f"{len(lost)} original(s) gone without exactly one refinement "
                              f"(e.g. {_some(lost)}); {detail}")
    return Verdict(True, detail)


def dangling_connections(connections: list[dict[str, Any]], annotations: list[dict[str, Any]]) -> list[dict]:
    """The connections whose parent or child is not on the server."""
    present = {doc["_id"] for doc in annotations}
    return [c for c in connections if c.get("parentId") not in present or c.get("childId") not in present]


def no_dangling_connection(connections: list[dict[str, Any]], annotations: list[dict[str, Any]]) -> Verdict:
    """Passes when every connection's two ends are annotations on the server."""
    dangling = dangling_connections(connections, annotations)
    if dangling:
        return Verdict(False, f"{len(dangling)} of {len(connections)} connection(s) point at a deleted "
                              f"annotation (e.g. {_some([c['_id'] for c in dangling])})")
    return Verdict(True, f"all {len(connections)} connections join annotations on the server")


def connections_kept(before: list[tuple[str, str]], annotations: list[dict[str, Any]],
                     connections: list[dict[str, Any]]) -> Verdict:
    """Passes when every connection made before the jobs still joins the same objects: each end
    is the original where it is still on the server, else its one refinement.

    Args:
        before: (parentId, childId) of the connections made before the jobs.
    """
    present = {doc["_id"] for doc in annotations}
    refined = refinements_by_original(annotations)
    now = {(c.get("parentId"), c.get("childId")) for c in connections}

    def end(annotation_id: str) -> str | None:
        if annotation_id in present:
            return annotation_id
        options = refined.get(annotation_id, [])
        return options[0] if len(options) == 1 else None

    missing = []
    for parent, child in before:
        mapped = (end(parent), end(child))
        if None in mapped or mapped not in now:
            missing.append(f"{parent}->{child}")
    if missing:
        return Verdict(False, f"{len(missing)} of {len(before)} connection(s) no longer join the same objects "
                              f"(e.g. {_some(missing)})")
    return Verdict(True, f"all {len(before)} connections join the same objects (moved to refinements where "
                         "an original was replaced)")


def digest(pixels: np.ndarray) -> str:
    """sha256 of the array's C-order bytes (little-endian), with its dtype and shape."""
    array = np.ascontiguousarray(pixels)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    head = f"{array.dtype.str}|{array.shape}|".encode()
    return hashlib.sha256(head + array.tobytes()).hexdigest()


def frame_mismatches(records: list[dict[str, Any]],
                     expected: Callable[[int, tuple[int, int, int, int] | None], np.ndarray]) -> list[str]:
    """The frames a worker received that are not the source's pixels.

    Args:
        records: What the worker's client returned, one dict per fetch: ``frame`` (int),
            ``window`` (None or [left, top, right, bottom]), ``dtype`` (str), ``shape`` (list),
            ``sha256`` (:func:`digest` of the returned array), or ``error`` (str) when the fetch raised.
        expected: (frame, window) -> the source's pixels for that frame and window.

    Returns:
        One line per mismatch: what arrived against what was expected.
    """
    out = []
    for record in records:
        window = tuple(record["window"]) if record.get("window") else None
        where = f"frame {record['frame']}" + (f" window {list(window)}" if window else "")
        if record.get("error"):
            out.append(f"{where}: the fetch raised {record['error']}")
            continue
        if int(record["frame"]) < 0:
            out.append("a fetch whose frame number the recorder could not read (update the check's recorder)")
            continue
        truth = expected(int(record["frame"]), window)
        if record["sha256"] != digest(truth):
            got = f"{record['dtype']} {tuple(record['shape'])}"
            if "min" in record:
                got += f" values {record['min']}..{record['max']}"
            out.append(f"{where}: got {got}, expected {truth.dtype} {truth.shape} values "
                       f"{int(truth.min())}..{int(truth.max())}")
    return out


def frames_exact(records: list[dict[str, Any]],
                 expected: Callable[[int, tuple[int, int, int, int] | None], np.ndarray]) -> Verdict:
    """Passes when at least one frame was received and every one is exactly the source's."""
    if not records:
        return Verdict(False, "no frame was received (nothing to compare)")
    bad = frame_mismatches(records, expected)
    if bad:
        shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        return Verdict(False, f"{len(bad)} of {len(records)} frame fetch(es) differ from the source: {shown}")
    return Verdict(True, f"{len(records)} frame fetch(es), each exactly the source's "
                         f"{records[0]['dtype']} pixels")
