"""The mark a refined annotation carries: which original it replaces.

Every annotation this worker creates holds ``"sam2Refine": {"originalId": "<id>"}`` in the same
document (so it is written atomically with the annotation; the server's schema allows extra
properties and keeps them). A later run of the same job finds these marks and:

- does not refine an original again when a refinement of it already exists (a crash after the
  upload, a dropped connection after the server created a chunk, or simply running twice);
- may then delete that original (when asked), since its replacement exists on the server;
- never treats a refined annotation as an original to refine.

Deleting the refined annotation removes the mark, so the original can be refined again.
"""

from __future__ import annotations

from typing import Any

MARKER_KEY = "sam2Refine"


def marker(original_id: str) -> dict[str, Any]:
    """The mark for a refinement of ``original_id``."""
    return {"originalId": original_id}


def original_of(doc: dict[str, Any]) -> str | None:
    """The original a document refines, or None when it is not a refinement made here."""
    mark = doc.get(MARKER_KEY)
    if isinstance(mark, dict) and isinstance(mark.get("originalId"), str) and mark["originalId"]:
        return mark["originalId"]
    return None
