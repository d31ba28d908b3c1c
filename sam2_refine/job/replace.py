"""Replace originals safely: upload the refined shapes, confirm them, only then delete.

One :class:`Ledger` maps every selected original id to its outcome and drives the upload, the
deletion and the summary, so an original can be deleted only if the server confirmed the
creation of a replacement:

- a refined shape is uploaded as a new polygon annotation (the tool's channel and tags, the
  original's location and dataset) marked with the id of its original
  (:mod:`sam2_refine.job.markers`), so a later run, or another job running at the same time, can
  find it;
- an original that an earlier run (or another running job) already refined is not refined
  again: its existing refinement counts as its replacement;
- the server's answer must confirm each document of a chunk (one ``_id`` per document, in order);
- any upload failure stops the upload and deletes nothing at all;
- which refinement of an original stays when several jobs made one, and the deletion of the
  originals, are :mod:`sam2_refine.job.converge`'s.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sam2_refine.engine.geometry import polygon_coordinates
from sam2_refine.job.kept import kept_by_position, summary_by_position
from sam2_refine.job.markers import MARKER_KEY, marker
from sam2_refine.nimbus.client import MAX_CHUNK, NimbusClient
from sam2_refine.nimbus.errors import NimbusAPIError, PartialCreateError
from sam2_refine.annotations import Kept, Outcome, Refined
from sam2_refine.annotations import Location


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
        mine: original id -> the refinement this job created for it (confirmed).
        by_another: original ids whose replacement is another job's refinement, made while
            this job ran (found before this job uploaded its own, or kept instead of it).
        already_deleted: original ids another job had deleted when this job went to delete them.
        concurrent: original ids that another job refined at the same time as this one.
        duplicates_removed: original id -> refinements of it this job removed as duplicates.
        not_trusted: annotations with a sam2Refine mark this worker does not trust (left alone).
        kept_tag_before: originals that carried the job's kept tag when listed (see
            :mod:`sam2_refine.job.kept`).
        kept_tagging: what tagging the kept originals did (``TagReport.as_json``), or None.
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
    mine: dict[str, str] = field(default_factory=dict)
    by_another: set[str] = field(default_factory=set)
    already_deleted: set[str] = field(default_factory=set)
    concurrent: list[str] = field(default_factory=list)
    duplicates_removed: dict[str, list[str]] = field(default_factory=dict)
    not_trusted: list[str] = field(default_factory=list)
    kept_tag_before: set[str] = field(default_factory=set)
    kept_tagging: dict[str, Any] | None = None

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

    def refined_by_another(self, original_id: str, location: Location, refined_id: str) -> None:
        """Another job running now created ``refined_id`` for this original: its replacement."""
        self.locations[original_id] = location
        self.created[original_id] = refined_id
        self.by_another.add(original_id)

    def replaced_by(self, original_id: str, refined_id: str) -> None:
        """The server shows ``refined_id`` as the refinement of this original that stays."""
        self.created[original_id] = refined_id
        if original_id not in self.previous and self.mine.get(original_id) != refined_id:
            self.by_another.add(original_id)

    def created_here(self) -> int:
        """Refinements this job created (confirmed), whether or not they stayed."""
        return len(self.mine)

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
            if isinstance(outcome, Kept) and outcome.original_id not in self.created:
                reasons[outcome.reason].append(outcome.original_id)
        for original_id in self.not_created:
            reasons["its refined shape was not uploaded"].append(original_id)
        return dict(reasons)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready account of every original."""
        kept = self.kept_by_reason()
        return {
            "selected": len(self.locations),
            "refined": sum(1 for o, r in self.mine.items() if self.created.get(o) == r),
            "already_refined": len(self.previous),
            "refined_by_another_job": len(self.by_another),
            "kept": sum(len(v) for v in kept.values()),
            "deleted": len(self.deleted),
            "already_deleted_by_another_job": len(self.already_deleted),
            "refined_at_the_same_time": len(self.concurrent),
            "duplicates_removed": sum(len(v) for v in self.duplicates_removed.values()),
            "kept_reasons": kept,
            "replacements": dict(self.created),
            "deleted_ids": list(self.deleted),
            "delete_failed_ids": list(self.delete_failed),
            "delete_unknown_ids": list(self.delete_unknown),
            "refined_at_the_same_time_ids": list(self.concurrent),
            "duplicates_removed_ids": {o: list(v) for o, v in self.duplicates_removed.items()},
            "not_trusted_ids": list(self.not_trusted),
            "kept_by_position": summary_by_position(kept_by_position(kept, self.locations)),
            "kept_tag": self.kept_tagging,
        }


def new_annotation(refined: Refined, location: Location, dataset_id: str, channel: int,
                   tags: tuple[str, ...], delete_original: bool = False) -> dict[str, Any]:
    """The annotation document for a refined shape (every field the server requires, and the
    mark naming its original and whether the job deletes originals)."""
    return {
        "datasetId": dataset_id,
        "shape": "polygon",
        "tags": list(tags),
        "channel": channel,
        "location": location.as_json(),
        "coordinates": polygon_coordinates(refined.polygon),
        MARKER_KEY: marker(refined.original_id, delete_original),
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


def pending_upload(ledger: Ledger) -> list[Refined]:
    """Refined shapes with no replacement yet that have not failed to upload."""
    failed = set(ledger.not_created)
    return [r for r in ledger.refined if r.original_id not in ledger.created and r.original_id not in failed]


def upload(client: NimbusClient, ledger: Ledger, dataset_id: str, channel: int,
           tags: tuple[str, ...], keep_original_tags: bool = False, chunk_size: int = MAX_CHUNK,
           delete_original: bool = False, limit: int | None = None) -> UploadReport:
    """Create the refined annotations not created (or failed) yet; record confirmed ones.

    Args:
        tags: The tool's output tags.
        keep_original_tags: Add each original's own tags to its refined annotation.
        delete_original: The job deletes originals (written into each mark).
        limit: Upload only the first ``limit`` pending shapes.
    """
    pending = pending_upload(ledger)[:limit]
    docs = [new_annotation(r, ledger.locations[r.original_id], dataset_id, channel,
                           output_tags(tags, ledger.tags.get(r.original_id, ()), keep_original_tags),
                           delete_original)
            for r in pending]
    try:
        created = client.create_annotations(docs, chunk_size=chunk_size)
        error = None
    except PartialCreateError as exc:
        created, error = exc.created, exc
    for refined, doc in zip(pending, created, strict=False):  # created: a prefix of pending
        ledger.created[refined.original_id] = ledger.mine[refined.original_id] = str(doc["_id"])
    missing = [r.original_id for r in pending[len(created):]]
    ledger.not_created.extend(missing)
    return UploadReport(len(created), len(missing), error)
