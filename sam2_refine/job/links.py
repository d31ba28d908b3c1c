"""The originals' connections: re-created on their replacements, removed with what is deleted.

How NimbusImage's plugin treats connections (server/models/connections.py): deleting annotations
in bulk (DELETE upenn_annotation/multiple) leaves their connections behind, and creating
connections (POST annotation_connection/multiple) answers 400 for the whole body when any
parent or child does not exist. So the worker never sends a copy whose end it knows is gone,
reads again and sends the rest when a batch is refused that way (another job removed an end
meanwhile), and removes the connections of every annotation it deletes itself.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sam2_refine.job.batch_reads import BatchReader
from sam2_refine.nimbus.errors import NimbusAPIError, PartialCreateError
from sam2_refine.nimbus.client import NimbusClient

log = logging.getLogger(__name__)

#: Fixed-point passes of "list connections, copy what is missing" per move.
MAX_COPY_PASSES = 4


def _key(con: dict[str, Any]) -> tuple[Any, ...]:
    tags = con.get("tags") or []
    return (con.get("parentId"), con.get("childId"), con.get("label", "") or "",
            tuple(sorted(str(t) for t in tags)) if isinstance(tags, list) else ())


def _ends(con: dict[str, Any]) -> set[str]:
    return {str(con.get("parentId")), str(con.get("childId"))}


class Ends:
    """Which annotations exist, from the latest reading, with lookups for the others.

    Args:
        present: Ids the latest reading listed.
        listed: Shapes that reading listed in full (an id of those shapes not in ``present`` is gone).
    """

    def __init__(self, reader: BatchReader, present: Iterable[str] = (), listed: tuple[str, ...] = ()) -> None:
        self.reader = reader
        self.present, self.listed = set(present), listed

    def missing(self, ids: set[str], fresh: bool = False) -> set[str]:
        """Which of ``ids`` do not exist; ``fresh``: looked up now, whatever the reading said."""
        unknown = set(ids) if fresh else set(ids) - self.present
        if not unknown:
            return set()
        found = self.reader.existing(unknown, listed=() if fresh else self.listed)
        self.present |= found
        return unknown - found


@dataclass
class MoveReport:
    """What :func:`move_connections` did.

    Attributes:
        created: The connections it created: connection id -> its two ends (parent, child ids).
        deduplicated: How many identical connections it deleted.
        skipped: Copies not made because an end no longer exists.
        listing: The connections of the sources and targets as last read (after the copies).
    """

    created: dict[str, set[str]] = field(default_factory=dict)
    deduplicated: int = 0
    skipped: int = 0
    listing: list[dict[str, Any]] = field(default_factory=list)


def move_connections(reader: BatchReader, mapping: dict[str, str], ends: Ends | None = None) -> MoveReport:
    """Re-create on ``mapping[x]`` every connection that has ``x`` as parent or child.

    Both ends are substituted when both are in ``mapping``. A copy that already exists (same
    parent, child, label and tags) is not made again, nor one with an end that no longer exists
    (``ends``). Only the connections of the sources and targets are read, and the reading is
    repeated until it shows nothing missing (another job may be adding
    connections to the same sources meanwhile); a copy made here and gone from a later listing is
    not made again (its target was deleted by another job: the caller's next reading shows that).
    Identical connections touching a target are then reduced to the one with the smallest id.
    The sources keep their connections (the caller removes them with the sources).

    Raises:
        NimbusAPIError: listing, creating or deleting connections failed (nothing may be
            deleted by the caller then).
    """
    report = MoveReport()
    if not mapping:
        return report
    client, dataset_id = reader.client, reader.dataset_id
    ends = ends or Ends(reader)
    concerned = set(mapping) | set(mapping.values())
    connections = reader.connections_touching(concerned)
    made: set[tuple[Any, ...]] = set()
    for _ in range(MAX_COPY_PASSES):
        have = {_key(c) for c in connections} | made
        wanted = []
        for con in connections:
            parent, child = con.get("parentId"), con.get("childId")
            if parent not in mapping and child not in mapping:
                continue
            new = {"parentId": mapping.get(parent, parent), "childId": mapping.get(child, child),
                   "datasetId": dataset_id, "label": con.get("label", "") or "",
                   "tags": list(con.get("tags") or [])}
            if new["parentId"] == new["childId"] or _key(new) in have:
                continue
            have.add(_key(new))
            wanted.append(new)
        if not wanted:
            break
        for doc in _send_copies(client, wanted, ends, report):
            made.add(_key(doc))
            report.created[str(doc["_id"])] = _ends(doc)
        connections = reader.connections_touching(concerned)
    report.listing = connections
    report.deduplicated = remove_identical_connections(reader, set(mapping.values()), connections)
    return report


def _send_copies(client: NimbusClient, copies: list[dict[str, Any]], ends: Ends,
                 report: MoveReport) -> list[dict[str, Any]]:
    """Create those of ``copies`` whose ends all exist; returns the created connections.

    A batch refused because an end does not exist (HTTP 400: another job removed it since the
    reading) is followed by a fresh look-up of the ends and the copies that can still be made.
    A refusal with every end present is raised (it is not about ends).
    """
    created: list[dict[str, Any]] = []
    pending = copies
    gone = ends.missing(all_ends(pending))
    for _ in range(MAX_COPY_PASSES):
        sendable = [c for c in pending if not _ends(c) & gone]
        report.skipped += len(pending) - len(sendable)
        if not sendable:
            return created
        try:
            created.extend(client.create_connections(sendable))
            return created
        except PartialCreateError as exc:
            created.extend(exc.created)
            pending = sendable[len(exc.created):]
            gone = ends.missing(all_ends(pending), fresh=True) if exc.status == 400 else set()
            if not gone:
                raise
            log.info("%d connection copies refused: %d of their ends no longer exist; sending the rest",
                     len(pending), len(gone))
    raise NimbusAPIError("POST", "annotation_connection/multiple", None,
                         "connection copies kept being refused while other jobs deleted their ends")


def all_ends(connections: list[dict[str, Any]]) -> set[str]:
    return {end for con in connections for end in _ends(con)}


def remove_connections_of(reader: BatchReader, ids: set[str], connections: list[dict[str, Any]] | None = None) -> int:
    """Delete every connection with an end in ``ids`` (annotations deleted, or about to be, after
    their connections were copied). Harmless where the server already removed them.

    Args:
        connections: Connections including those of ``ids``, if just read (else they are read here).

    Returns:
        How many were deleted.
    """
    if not ids:
        return 0
    if connections is None:
        connections = reader.connections_touching(ids)
    doomed = [c["_id"] for c in connections if isinstance(c.get("_id"), str) and _ends(c) & ids]
    if doomed:
        reader.client.delete_connections(doomed)
    return len(doomed)


def remove_identical_connections(reader: BatchReader, targets: set[str],
                                 connections: list[dict[str, Any]] | None = None) -> int:
    """Of connections touching ``targets`` that are identical (same parent, child, label and
    tags: two jobs copied the same one at once), keep the one with the smallest id.

    Args:
        connections: Connections including those of ``targets``, if just read (else they are read here).

    Returns:
        How many were deleted.
    """
    if not targets:
        return 0
    if connections is None:
        connections = reader.connections_touching(targets)
    same: dict[tuple[Any, ...], list[str]] = defaultdict(list)
    for con in connections:
        if (con.get("parentId") in targets or con.get("childId") in targets) and isinstance(con.get("_id"), str):
            same[_key(con)].append(con["_id"])
    extra = [i for ids in same.values() if len(ids) > 1 for i in sorted(ids)[1:]]
    if extra:
        reader.client.delete_connections(extra)
    return len(extra)
