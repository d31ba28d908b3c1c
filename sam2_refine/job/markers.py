"""The mark a refined annotation carries: which original it replaces.

Every annotation this worker creates holds ``"sam2Refine": {"originalId": "<id>", ...}`` in the
same document (so it is written atomically with the annotation; the server's schema allows extra
properties and keeps them). ``"deleteOriginal": true`` is added when the job that made it was
asked to delete the original: such a refinement is expected to outlive its original. A later
run, or another job running at the same time, finds these marks and:

- does not refine an original again when a refinement of it already exists (a crash after the
  upload, a dropped connection after the server created a chunk, running twice, or two jobs at
  once);
- may then delete that original (when asked), since its replacement exists on the server;
- never treats a refined annotation (or an annotation with an unreadable mark) as an original;
- keeps one refinement per original when several jobs made one each (see
  :mod:`sam2_refine.job.converge`).

Deleting the refined annotation removes the mark, so the original can be refined again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

MARKER_KEY = "sam2Refine"

_OBJECT_ID = re.compile(r"[0-9a-f]{24}")


def marker(original_id: str, delete_original: bool = False) -> dict[str, Any]:
    """The mark for a refinement of ``original_id`` (made by a job deleting originals or not)."""
    mark: dict[str, Any] = {"originalId": original_id}
    if delete_original:
        mark["deleteOriginal"] = True
    return mark


@dataclass(frozen=True)
class Mark:
    """A readable mark.

    Attributes:
        original_id: The id of the original the annotation refines (24 hex digits).
        delete_original: The job that made it was deleting originals.
    """

    original_id: str
    delete_original: bool = False


def read_mark(doc: dict[str, Any]) -> tuple[Mark | None, str | None]:
    """The document's mark, and the reason it cannot be used where it has an unreadable one.

    Returns:
        ``(None, None)``: no mark (an ordinary annotation); ``(Mark, None)``: a refinement made
        here; ``(None, reason)``: a ``sam2Refine`` entry this worker cannot trust (its original id
        missing, not a string, or not an annotation id): such an annotation is neither an original
        nor a refinement, and is never deleted.
    """
    if MARKER_KEY not in doc:
        return None, None
    mark = doc[MARKER_KEY]
    if not isinstance(mark, dict) or "originalId" not in mark:
        return None, "its sam2Refine mark names no original (it cannot be read)"
    original = mark["originalId"]
    if not isinstance(original, str):
        return None, f"its sam2Refine mark's original id is not a string ({type(original).__name__}: it cannot be read)"
    if not _OBJECT_ID.fullmatch(original):
        return None, "its sam2Refine mark's original id refers to nothing (not an annotation id)"
    return Mark(original, mark.get("deleteOriginal") is True), None


def original_of(doc: dict[str, Any]) -> str | None:
    """The original a document refines, or None when it is not a (readable) refinement made here."""
    mark, _ = read_mark(doc)
    return mark.original_id if mark is not None else None
