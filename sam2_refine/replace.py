"""Replace originals safely: upload the refined shapes, confirm them, only then delete.

One :class:`Ledger` maps every selected original id to its outcome and drives the upload, the
deletion and the summary, so an original can be deleted only if the server confirmed the
creation of its own replacement:

- a refined shape is uploaded as a new polygon annotation (the tool's channel and tags, the
  original's location and dataset) marked with the id of its original
  (:mod:`sam2_refine.markers`), so a later run can find it;
- an original that an earlier run already refined is not refined again: its existing
  refinement counts as its confirmed replacement;
- the server's answer must confirm each document of a chunk (one ``_id`` per document, in order);
- any upload failure stops the upload and deletes nothing at all;
- deletion (if asked) sends exactly the originals whose replacement was confirmed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sam2_refine.geometry import polygon_coordinates
from sam2_refine.markers import MARKER_KEY, marker
from sam2_refine.nimbus_client import MAX_CHUNK, NimbusAPIError, NimbusClient, PartialCreateError
from sam2_refine.refine import Kept, Outcome, Refined
from sam2_refine.settings import Location


@dataclass
class Ledger:
    """Every selected original and what became of it.

    Attributes:
        locations: original id -> its location.
        outcomes: original id -> :class:`Refined` or :class:`Kept`.
        created: original id -> id of its confirmed replacement.
        not_created: original ids whose refined shape was not (certainly) created.
        deleted: original ids deleted after their replacement was confirmed.
        delete_failed: original ids whose deletion was attempted and failed.
        previous: original ids whose refinement an earlier run had already created (they are
            in ``created`` with that refinement's id).
        delete_unknown: original ids whose deletion was sent but not answered (a lost answer,
            a timeout, the job stopped meanwhile): the server may or may not have deleted them.
        tags: original id -> the original's own tags (for "Keep original tags").
    """

    locations: dict[str, Location] = field(default_factory=dict)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    created: dict[str, str] = field(default_factory=dict)
    not_created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    delete_failed: list[str] = field(default_factory=list)
    previous: set[str] = field(default_factory=set)
    tags: dict[str, tuple[str, ...]] = field(default_factory=dict)
    delete_unknown: list[str] = field(default_factory=list)

    def deletion_text(self) -> str:
        """What happened to the originals, for messages: deleted, perhaps deleted, remaining."""
        if not self.delete_unknown:
            return f"{len(self.deleted)} original(s) deleted"
        return (f"{len(self.deleted)} original(s) certainly deleted and {len(self.delete_unknown)} possibly "
                "deleted (their deletion was sent without an answer; their refinements exist)")

    def already_refined(self, original_id: str, location: Location, refined_id: str) -> None:
        """An earlier run created ``refined_id`` for this original: it is its replacement."""
        self.locations[original_id] = location
        self.created[original_id] = refined_id
        self.previous.add(original_id)

    def record(self, location: Location, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            self.locations[outcome.original_id] = location
            self.outcomes[outcome.original_id] = outcome

    def keep(self, original_id: str, location: Location, reason: str) -> None:
        self.record(location, [Kept(original_id, reason)])

    @property
    def refined(self) -> list[Refined]:
        return [o for o in self.outcomes.values() if isinstance(o, Refined)]

    def kept_by_reason(self) -> dict[str, list[str]]:
        """reason -> original ids kept for it (upload failures included)."""
        reasons: dict[str, list[str]] = defaultdict(list)
        for outcome in self.outcomes.values():
            if isinstance(outcome, Kept):
                reasons[outcome.reason].append(outcome.original_id)
        for original_id in self.not_created:
            reasons["its refined shape was not uploaded"].append(original_id)
        return dict(reasons)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready account of every original."""
        kept = self.kept_by_reason()
        return {
            "selected": len(self.outcomes) + len(self.previous),
            "refined": len(self.created) - len(self.previous),
            "already_refined": len(self.previous),
            "kept": sum(len(v) for v in kept.values()),
            "deleted": len(self.deleted),
            "kept_reasons": kept,
            "replacements": dict(self.created),
            "deleted_ids": list(self.deleted),
            "delete_failed_ids": list(self.delete_failed),
            "delete_unknown_ids": list(self.delete_unknown),
        }


def new_annotation(refined: Refined, location: Location, dataset_id: str, channel: int,
                   tags: tuple[str, ...]) -> dict[str, Any]:
    """The annotation document for a refined shape (every field the server requires, and the
    mark naming its original)."""
    return {
        "datasetId": dataset_id,
        "shape": "polygon",
        "tags": list(tags),
        "channel": channel,
        "location": location.as_json(),
        "coordinates": polygon_coordinates(refined.polygon),
        MARKER_KEY: marker(refined.original_id),
    }


def output_tags(tool_tags: tuple[str, ...], original_tags: tuple[str, ...], keep_original: bool) -> tuple[str, ...]:
    """The tool's output tags, followed (if asked) by the original's own tags, without repeats."""
    if not keep_original:
        return tool_tags
    return tuple(dict.fromkeys((*tool_tags, *original_tags)))


@dataclass(frozen=True)
class UploadReport:
    """What an upload did. ``error`` is None when every refined shape was created."""

    created: int
    not_created: int
    error: NimbusAPIError | None


def upload(client: NimbusClient, ledger: Ledger, dataset_id: str, channel: int,
           tags: tuple[str, ...], keep_original_tags: bool = False, chunk_size: int = MAX_CHUNK) -> UploadReport:
    """Create the refined annotations not created (or failed) yet; record confirmed ones.

    Args:
        tags: The tool's output tags.
        keep_original_tags: Add each original's own tags to its refined annotation.
    """
    failed = set(ledger.not_created)
    pending = [r for r in ledger.refined if r.original_id not in ledger.created and r.original_id not in failed]
    docs = [new_annotation(r, ledger.locations[r.original_id], dataset_id, channel,
                           output_tags(tags, ledger.tags.get(r.original_id, ()), keep_original_tags))
            for r in pending]
    try:
        created = client.create_annotations(docs, chunk_size=chunk_size)
        error = None
    except PartialCreateError as exc:
        created, error = exc.created, exc
    for refined, doc in zip(pending, created, strict=False):  # created: a prefix of pending
        ledger.created[refined.original_id] = str(doc["_id"])
    missing = [r.original_id for r in pending[len(created):]]
    ledger.not_created.extend(missing)
    return UploadReport(len(created), len(missing), error)


def relink(client: NimbusClient, ledger: Ledger, dataset_id: str) -> tuple[int, NimbusAPIError | None]:
    """Re-create, on their refined annotations, the connections of the originals to be deleted.

    The server deletes an annotation's connections with it; so before deleting, every connection
    where a replaced original is the parent or the child is created again with the refined
    annotation in its place (both ends substituted when both are replaced), with the same label
    and tags. Connections that already exist (an earlier, interrupted run) are not made twice.

    Returns:
        (connections created, error or None). On an error nothing must be deleted.
    """
    replaced = {o: r for o, r in ledger.created.items() if o not in ledger.deleted}
    if not replaced:
        return 0, None
    try:
        existing = client.list_connections(dataset_id)
    except NimbusAPIError as exc:
        return 0, exc
    have = {(c.get("parentId"), c.get("childId"), c.get("label", "")) for c in existing}
    wanted = []
    for con in existing:
        parent, child = con.get("parentId"), con.get("childId")
        if parent not in replaced and child not in replaced:
            continue
        new = {"parentId": replaced.get(parent, parent), "childId": replaced.get(child, child),
               "datasetId": dataset_id, "label": con.get("label", ""), "tags": list(con.get("tags") or [])}
        key = (new["parentId"], new["childId"], new["label"])
        if key not in have:
            have.add(key)
            wanted.append(new)
    if not wanted:
        return 0, None
    try:
        created = client.create_connections(wanted)
    except PartialCreateError as exc:
        return len(exc.created), exc
    return len(created), None


def delete_replaced(client: NimbusClient, ledger: Ledger, chunk_size: int = MAX_CHUNK) -> NimbusAPIError | None:
    """Delete exactly the originals whose replacement was confirmed; record what happened.

    A chunk is first recorded as sent-without-answer (``delete_unknown``) and moved to ``deleted``
    once the server answers, so a lost answer, a timeout or the job being stopped meanwhile is
    reported as "may have been deleted", never as "not deleted". A refused chunk (an HTTP error
    status) and the chunks after it are ``delete_failed``.
    """
    doomed = [original_id for original_id in ledger.created if original_id not in ledger.deleted]
    for start in range(0, len(doomed), chunk_size):
        chunk = doomed[start:start + chunk_size]
        ledger.delete_unknown = list(chunk)
        try:
            client.delete_annotations(chunk, chunk_size=chunk_size)
        except NimbusAPIError as exc:
            if exc.status is not None:  # the server answered: it did not delete them
                ledger.delete_unknown = []
                ledger.delete_failed.extend(doomed[start:])
            else:
                ledger.delete_failed.extend(doomed[start + chunk_size:])
            return exc
        ledger.delete_unknown = []
        ledger.deleted.extend(chunk)
    return None
