"""One refinement per original, whatever other jobs do at the same time.

Several compute jobs may refine the same originals at once (a double click, two people, a large
dataset split into overlapping runs). They never talk to each other; each reaches the same
decision from what the server shows it, and each step below is safe to interrupt at any
request (a killed job leaves nothing that a later run does not finish):

1. **Survivor.** Of the refinements of one original (:mod:`sam2_refine.refinements`), the one
   with the smallest id stays. Every job computes the same one from any listing that holds it,
   and no job ever removes it (none sees a smaller one). Ids need not follow creation time.
2. **Duplicates.** Every other refinement of the group is removed, after its connections have
   been re-created on the survivor (:func:`move_connections`). Only annotations carrying this
   worker's mark with the same original id are ever removed: never an original, never an
   annotation the worker did not make, never one whose mark is unreadable.
3. **Originals** (only when asked to delete them): the original's connections are re-created
   on its survivor, then the refinements are listed again, and the original is deleted only if
   that survivor still exists and is still the smallest. Ordering argument: a job that removes
   a refinement R as a duplicate of a smaller S lists R's connections only after it has seen S;
   if the job deleting the original re-listed after S was created, it saw S and does not delete
   (the original keeps its connections; the next round moves them to S); if it re-listed
   before, then its copies on R were made before S existed, so the remover's listing holds
   them and moves them to S. Either way no connection is lost.
   The connections of every original and duplicate deleted are removed by the worker itself,
   just before the deletion (they were copied) and just after it (any made meanwhile):
   NimbusImage's bulk delete leaves them on the server.
4. **Repeat** until a listing shows nothing left to do (one refinement per original, no
   replaced original left), a bounded number of rounds.

Connections that end up identical (the same parent, child, label and tags: two jobs copying
the same one at once) are reduced to the one with the smallest id, by the same rule.

Groups whose original no longer exists and was not selected by this job (left by a job that was
stopped) are merged only when their refinements are at one location of the batch and either
some refinement was made by a job deleting originals (the normal way an original disappears) or
the original is found elsewhere in this dataset. A group whose original id refers to nothing,
or to an annotation of another dataset, is reported and left alone.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sam2_refine.markers import read_mark
from sam2_refine.nimbus_client import MAX_CHUNK, NimbusAPIError, NimbusClient, PartialCreateError
from sam2_refine.refinements import Refinement, RefinementIndex, Unreadable
from sam2_refine.replace import Ledger
from sam2_refine.selection import annotation_location
from sam2_refine.settings import Location

log = logging.getLogger(__name__)

#: Rounds of "list, act" before giving up (other jobs still creating refinements of the same
#: originals by then is not expected; the job then reports it and exits 1).
MAX_ROUNDS = 6
#: Fixed-point passes of "list connections, copy what is missing" per move.
MAX_COPY_PASSES = 4
#: Ends of connections up to this many are looked up one by one rather than by listing a shape.
LOOKUPS = 100
#: The shapes an annotation can have (the server's schema).
ANNOTATION_SHAPES = ("point", "line", "polygon", "rectangle")


@dataclass(frozen=True)
class ServerView:
    """One reading of the dataset's annotations.

    Attributes:
        index: Refinements by original, and unreadable marks.
        others: id -> location of every listed annotation that is not a refinement (originals).
    """

    index: RefinementIndex
    others: dict[str, Location | None]


def read_view(client: NimbusClient, dataset_id: str, shapes: Iterable[str]) -> ServerView:
    """List the dataset's annotations of ``shapes`` (refinements are polygons: always listed)."""
    index = RefinementIndex()
    others: dict[str, Location | None] = {}
    for shape in dict.fromkeys(("polygon", *shapes)):
        try:
            pages = list(client.iter_annotation_pages(dataset_id, shape))
        except NimbusAPIError:
            if shape == "blob":  # not every server knows blobs (as in job.fetch_annotations)
                continue
            raise
        for page in pages:
            for doc in page:
                if not isinstance(doc, dict) or not isinstance(doc.get("_id"), str) or not doc["_id"]:
                    continue
                mark, problem = read_mark(doc)
                if mark is not None:
                    index.add(doc["_id"], mark, annotation_location(doc))
                elif problem is not None:
                    index.unreadable.append(Unreadable(doc["_id"], annotation_location(doc), problem))
                else:
                    others[doc["_id"]] = annotation_location(doc)
    return ServerView(index, others)


class RefinementWatch:
    """Reads the refinements again while the job runs, to narrow the window in which two jobs
    refine the same original (what still overlaps is settled by :func:`converge`).

    A re-read lists the polygons carrying the job's output tags (every refinement a job with
    the same tool makes carries them; all polygons when the tool has none). :meth:`due` keeps
    the re-reads to about ``share`` of the job's time: after a listing that took t seconds, the
    next one is due t / share seconds later.
    """

    def __init__(self, client: NimbusClient, dataset_id: str, tags: Iterable[str], share: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client, self.dataset_id, self.tags = client, dataset_id, tuple(tags)
        self.share, self.clock = share, clock
        self._last = -math.inf
        self._cost = 0.0

    def due(self) -> bool:
        return self.clock() - self._last >= self._cost / self.share

    def read(self) -> RefinementIndex | None:
        """The refinements now on the server, or None when the listing failed (only logged: this
        is an optimisation, the job goes on)."""
        started = self.clock()
        index = RefinementIndex()
        try:
            for page in self.client.iter_annotation_pages(self.dataset_id, "polygon", tags=self.tags or None):
                for doc in page:
                    if isinstance(doc, dict) and isinstance(doc.get("_id"), str):
                        mark, _ = read_mark(doc)
                        if mark is not None:
                            index.add(doc["_id"], mark, annotation_location(doc))
        except NimbusAPIError as exc:
            log.info("could not re-read the refinements: %s", exc)
            return None
        finally:
            self._last = self.clock()
            self._cost = self._last - started
        return index


# -- connections --------------------------------------------------------------------------------
#
# How NimbusImage's plugin treats connections (server/models/connections.py): deleting annotations
# in bulk (DELETE upenn_annotation/multiple) leaves their connections behind, and creating
# connections (POST annotation_connection/multiple) answers 400 for the whole body when any
# parent or child does not exist. So the worker never sends a copy whose end it knows is gone,
# reads again and sends the rest when a batch is refused that way (another job removed an end
# meanwhile), and removes the connections of every annotation it deletes itself.


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

    def __init__(self, client: NimbusClient, dataset_id: str, present: Iterable[str] = (),
                 listed: tuple[str, ...] = ()) -> None:
        self.client, self.dataset_id = client, dataset_id
        self.present, self.listed = set(present), listed

    def missing(self, ids: set[str], fresh: bool = False) -> set[str]:
        """Which of ``ids`` do not exist; ``fresh``: looked up now, whatever the reading said."""
        unknown = set(ids) if fresh else set(ids) - self.present
        if not unknown:
            return set()
        found = _existing(self.client, self.dataset_id, unknown, listed=() if fresh else self.listed)
        self.present |= found
        return unknown - found


@dataclass
class MoveReport:
    """What :func:`move_connections` did.

    Attributes:
        created: The connections it created: connection id -> its two ends (parent, child ids).
        deduplicated: How many identical connections it deleted.
        skipped: Copies not made because an end no longer exists.
        listing: The dataset's connections as last listed (after the copies).
    """

    created: dict[str, set[str]] = field(default_factory=dict)
    deduplicated: int = 0
    skipped: int = 0
    listing: list[dict[str, Any]] = field(default_factory=list)


def move_connections(client: NimbusClient, dataset_id: str, mapping: dict[str, str],
                     ends: Ends | None = None) -> MoveReport:
    """Re-create on ``mapping[x]`` every connection that has ``x`` as parent or child.

    Both ends are substituted when both are in ``mapping``. A copy that already exists (same
    parent, child, label and tags) is not made again, nor one with an end that no longer exists
    (``ends``). The listing is repeated until it shows nothing missing (another job may be adding
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
    ends = ends or Ends(client, dataset_id)
    connections = client.list_connections(dataset_id)
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
        connections = client.list_connections(dataset_id)
    report.listing = connections
    report.deduplicated = remove_identical_connections(client, dataset_id, set(mapping.values()), connections)
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
    gone = ends.missing(_all_ends(pending))
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
            gone = ends.missing(_all_ends(pending), fresh=True) if exc.status == 400 else set()
            if not gone:
                raise
            log.info("%d connection copies refused: %d of their ends no longer exist; sending the rest",
                     len(pending), len(gone))
    raise NimbusAPIError("POST", "annotation_connection/multiple", None,
                         "connection copies kept being refused while other jobs deleted their ends")


def _all_ends(connections: list[dict[str, Any]]) -> set[str]:
    return {end for con in connections for end in _ends(con)}


def remove_connections_of(client: NimbusClient, dataset_id: str, ids: set[str],
                          connections: list[dict[str, Any]] | None = None) -> int:
    """Delete every connection with an end in ``ids`` (annotations deleted, or about to be, after
    their connections were copied). Harmless where the server already removed them.

    Args:
        connections: The dataset's connections, if just listed (else they are listed here).

    Returns:
        How many were deleted.
    """
    if not ids:
        return 0
    if connections is None:
        connections = client.list_connections(dataset_id)
    doomed = [c["_id"] for c in connections if isinstance(c.get("_id"), str) and _ends(c) & ids]
    if doomed:
        client.delete_connections(doomed)
    return len(doomed)


def remove_identical_connections(client: NimbusClient, dataset_id: str, targets: set[str],
                                 connections: list[dict[str, Any]] | None = None) -> int:
    """Of connections touching ``targets`` that are identical (same parent, child, label and
    tags: two jobs copied the same one at once), keep the one with the smallest id.

    Args:
        connections: The dataset's connections, if just listed (else they are listed here).

    Returns:
        How many were deleted.
    """
    if not targets:
        return 0
    if connections is None:
        connections = client.list_connections(dataset_id)
    same: dict[tuple[Any, ...], list[str]] = defaultdict(list)
    for con in connections:
        if (con.get("parentId") in targets or con.get("childId") in targets) and isinstance(con.get("_id"), str):
            same[_key(con)].append(con["_id"])
    extra = [i for ids in same.values() if len(ids) > 1 for i in sorted(ids)[1:]]
    if extra:
        client.delete_connections(extra)
    return len(extra)


# -- the rounds ---------------------------------------------------------------------------------


@dataclass
class ConvergeReport:
    """What :func:`converge` found and did.

    Attributes:
        concurrent: Originals of this job that another job refined at the same time (their
            refinements coexisted with this job's, or replaced its upload).
        removed: original id -> refinements this job removed as duplicates.
        moved: Connections re-created on survivors (from duplicates and from originals).
        withdrawn: Connections this job had made whose target another job removed meanwhile
            (deleted again: they would point to nothing).
        unlinked: Connections removed because an annotation at one end was deleted (by this
            job, after copying them; or, found in a later run, by a job that was stopped).
        left_alone: Groups of refinements whose original refers to nothing or to another
            dataset: (original id, reason, refinement ids). Never touched.
        unreadable: Annotations of the batch with an unreadable mark.
        misplaced: Refinements of this job's originals at another location than the original.
        error: The failure that stopped convergence (then the dataset may not be consistent yet).
        stage: What was being done when it failed: ``"read"`` (listing), ``"links"``
            (re-creating connections), ``"duplicates"`` (removing duplicates), ``"delete"``
            (deleting originals).
        stable: The last listing showed nothing left to do.
    """

    concurrent: set[str] = field(default_factory=set)
    removed: dict[str, list[str]] = field(default_factory=dict)
    moved: int = 0
    withdrawn: int = 0
    unlinked: int = 0
    left_alone: list[tuple[str, str, list[str]]] = field(default_factory=list)
    unreadable: list[Unreadable] = field(default_factory=list)
    misplaced: list[Refinement] = field(default_factory=list)
    error: NimbusAPIError | None = None
    stage: str = ""
    stable: bool = False


#: Is this location in the job's batch?
InBatch = Callable[[Location], bool]


class _Orphans:
    """Decides, once per original id, whether a group without a visible original may be merged."""

    def __init__(self, client: NimbusClient, dataset_id: str) -> None:
        self.client, self.dataset_id = client, dataset_id
        self.verdicts: dict[str, str | None] = {}  # original id -> None (merge) or the reason not to

    def verdict(self, original_id: str, group: list[Refinement]) -> str | None:
        if original_id not in self.verdicts:
            self.verdicts[original_id] = self._decide(original_id, group)
        return self.verdicts[original_id]

    def _decide(self, original_id: str, group: list[Refinement]) -> str | None:
        try:
            doc = self.client.get_annotation(original_id)
        except NimbusAPIError as exc:
            if exc.status == 403:
                return "their original id refers to an annotation of another dataset"
            return f"their original could not be looked up ({exc})"
        if doc is not None:
            if doc.get("datasetId") != self.dataset_id:
                return "their original id refers to an annotation of another dataset"
            return None  # the original exists in this dataset (a shape this job does not list)
        if any(r.delete_original for r in group):
            return None  # replaced and deleted by the job that made them: the usual case
        return "their original id refers to nothing (no such annotation, and no job deleted it)"


def converge(client: NimbusClient, dataset_id: str, ledger: Ledger, *, delete: bool, shapes: Iterable[str],
             in_batch: InBatch, on_step: Callable[[str, str], None] | None = None) -> ConvergeReport:
    """Bring this job's originals to one confirmed refinement each (and delete them if asked).

    Args:
        ledger: The job's ledger: its originals (``ledger.locations``) and what it created;
            updated with each original's survivor, the duplicates removed, the deletions.
        delete: Delete the originals whose survivor is confirmed.
        shapes: Shapes of this job's originals (so that their existence can be read).
        in_batch: Whether a location is in the job's batch (for groups left by stopped jobs).
        on_step: Called as ``on_step(title, info)`` before each step that changes the server
            (progress lines).
    """
    report = ConvergeReport()
    orphans = _Orphans(client, dataset_id)
    shapes = tuple(shapes)
    mine = ledger.locations
    made: dict[str, set[str]] = {}  # connections made here, not yet checked -> their ends

    def withdraw(view: ServerView) -> None:
        """Check the connections made here against a reading taken after they were made: one
        with an end that no longer exists was created after that end was deleted (another job
        removed a survivor as a duplicate, or deleted an original at the other end meanwhile),
        and would point to nothing: it is deleted. One whose ends all exist is safe from then
        on (deleting an end later deletes it with the end) and is not checked again."""
        if not made:
            return
        present = _present(view)
        unknown = {end for ends in made.values() for end in ends} - present
        if unknown:  # an end of a shape this job does not list (a point, a line): look it up
            present |= _existing(client, dataset_id, unknown, listed=("polygon", *shapes))
        dangling = [c for c, ends in made.items() if not ends <= present]
        made.clear()
        if dangling:
            report.stage = "links"
            client.delete_connections(dangling)
            report.withdrawn += len(dangling)

    def step(title: str, info: str) -> None:
        if on_step is not None:
            on_step(title, info)

    def move(mapping: dict[str, str], ends: Ends) -> list[dict[str, Any]]:
        """Copy the connections of ``mapping``'s keys onto its values; the listing after it."""
        report.stage = "links"
        moved = move_connections(client, dataset_id, mapping, ends)
        made.update(moved.created)
        report.moved += len(moved.created)
        return moved.listing

    def delete_with_links(ids: list[str], listing: list[dict[str, Any]],
                          delete: Callable[[list[str], list[str]], NimbusAPIError | None]) -> NimbusAPIError | None:
        """Remove the connections of ``ids`` (copied already), delete them, then remove any
        connection made meanwhile to those that were (or may have been) deleted: the server's
        bulk delete leaves connections behind. ``delete(ids, deleted)`` appends to ``deleted``."""
        report.stage = "links"
        report.unlinked += remove_connections_of(client, dataset_id, set(ids), listing)
        deleted: list[str] = []
        try:
            error = delete(ids, deleted)
        finally:
            if deleted:
                report.stage = "links"
                report.unlinked += remove_connections_of(client, dataset_id, set(deleted))
        return error

    def delete_duplicates(ids: list[str], deleted: list[str]) -> None:
        report.stage = "duplicates"
        for start in range(0, len(ids), MAX_CHUNK):
            chunk = ids[start:start + MAX_CHUNK]
            deleted.extend(chunk)  # possibly deleted from here on, even if no answer comes
            client.delete_annotations(chunk)

    def delete_confirmed(ids: list[str], deleted: list[str]) -> NimbusAPIError | None:
        report.stage = "delete"
        error = delete_originals(client, ledger, ids)
        gone = set(ledger.deleted) | set(ledger.delete_unknown)
        deleted.extend(o for o in ids if o in gone)
        return error

    try:
        for _ in range(MAX_ROUNDS):
            report.stage = "read"
            view = read_view(client, dataset_id, shapes)
            withdraw(view)
            ends = Ends(client, dataset_id, _present(view), listed=("polygon", *shapes))
            groups = _groups_in_scope(view, ledger, orphans, in_batch, report)
            for original_id, group in groups.items():
                if original_id in mine:
                    ledger.replaced_by(original_id, group[0].id)
                    if len(group) > 1 or original_id in ledger.by_another:
                        report.concurrent.add(original_id)
            duplicates = {r.id: group[0].id for group in groups.values() for r in group[1:]}
            doomed = {o: g[0].id for o, g in groups.items()
                      if delete and o in mine and o in view.others and o not in ledger.deleted}
            if not duplicates and not doomed:
                # A job stopped between copying connections and checking its copies may have left
                # identical ones (another job copied the same at once): one each stays.
                report.stage = "links"
                listing = client.list_connections(dataset_id)
                in_scope = {r.id for group in view.index.groups.values() for r in group
                            if r.location is not None and in_batch(r.location)}
                remove_identical_connections(client, dataset_id, in_scope, listing)
                report.unlinked += _remove_left_links(client, dataset_id, view, in_batch, ends, listing)
                report.stable = True
                break
            if duplicates:
                step("Removing duplicates", f"{len(duplicates)} refinement(s) made twice by jobs running at once")
                delete_with_links(list(duplicates), move(duplicates, ends), delete_duplicates)
                for group in groups.values():
                    if len(group) > 1:
                        report.removed.setdefault(group[0].original_id, []).extend(r.id for r in group[1:])
            if doomed:
                step("Keeping links", "Re-creating the originals' connections on their refinements")
                listing = move(doomed, ends)
                report.stage = "read"
                check = read_view(client, dataset_id, shapes)
                withdraw(check)
                confirmed = [o for o, survivor in doomed.items()
                             if o in check.others and _survivor(check.index, o, mine[o]) == survivor]
                gone = [o for o in doomed if o not in check.others]
                ledger.already_deleted.update(gone)
                step("Deleting originals", f"Deleting {len(confirmed)} replaced original(s)")
                error = delete_with_links(confirmed, listing, delete_confirmed)
                if error is not None:
                    report.stage = "delete"
                    report.error = error
                    return report
        report.stage = ""
    except NimbusAPIError as exc:
        report.error = exc
    return report


def _present(view: ServerView) -> set[str]:
    """Every annotation id a reading listed: originals and other annotations, and refinements."""
    return set(view.others) | {r.id for group in view.index.groups.values() for r in group}


def _remove_left_links(client: NimbusClient, dataset_id: str, view: ServerView, in_batch: InBatch, ends: Ends,
                       listing: list[dict[str, Any]]) -> int:
    """Remove connections to originals that were replaced in the batch and no longer exist: left
    by a job stopped between deleting them and removing their connections, or by a worker
    that trusted the server's bulk delete to remove them."""
    replaced = {original_id for original_id, group in view.index.groups.items()
                if original_id not in view.others
                and any(r.location is not None and in_batch(r.location) for r in group)}
    touching = _all_ends(listing) & replaced
    if not touching:
        return 0
    return remove_connections_of(client, dataset_id, ends.missing(touching, fresh=True), listing)


def _existing(client: NimbusClient, dataset_id: str, ids: set[str], listed: tuple[str, ...]) -> set[str]:
    """Which of ``ids`` are annotations of the dataset: looked up one by one when they are few
    (at most :data:`LOOKUPS`), else the shapes not listed yet are listed once first."""
    found: set[str] = set()
    for shape in ANNOTATION_SHAPES:
        if shape in listed or len(ids - found) <= LOOKUPS:
            continue
        for page in client.iter_annotation_pages(dataset_id, shape):
            found |= {d["_id"] for d in page if isinstance(d, dict) and d.get("_id") in ids}
    for annotation_id in sorted(ids - found):
        if client.get_annotation(annotation_id) is not None:
            found.add(annotation_id)
    return found


def _survivor(index: RefinementIndex, original_id: str, location: Location) -> str | None:
    group = index.for_original(original_id, location)
    return group[0].id if group else None


def _groups_in_scope(view: ServerView, ledger: Ledger, orphans: _Orphans, in_batch: InBatch,
                     report: ConvergeReport) -> dict[str, list[Refinement]]:
    """original id -> refinements (survivor first) this job looks after: those of its own
    originals (at the original's location), and groups left without their original in the batch."""
    groups: dict[str, list[Refinement]] = {}
    for original_id, location in ledger.locations.items():
        group = view.index.for_original(original_id, location)
        if group:
            groups[original_id] = group
    report.misplaced = view.index.misplaced(ledger.locations)
    report.unreadable = [u for u in view.index.unreadable if u.location is not None and in_batch(u.location)]
    left_alone = []
    for original_id, group in view.index.groups.items():
        if original_id in ledger.locations or original_id in view.others or len(group) < 2:
            continue
        by_place: dict[Location | None, list[Refinement]] = defaultdict(list)
        for r in group:
            by_place[r.location].append(r)
        for place, members in by_place.items():
            if place is None or not in_batch(place) or len(members) < 2:
                continue
            reason = orphans.verdict(original_id, members)
            if reason is None:
                groups[original_id] = members  # sorted: the group is
            else:
                left_alone.append((original_id, reason, [r.id for r in members]))
    report.left_alone = left_alone
    return groups


def delete_originals(client: NimbusClient, ledger: Ledger, originals: list[str],
                     chunk_size: int = MAX_CHUNK) -> NimbusAPIError | None:
    """Delete originals whose survivor was just confirmed; record what happened in ``ledger``.

    A chunk is first recorded as sent-without-answer (``delete_unknown``) and moved to
    ``deleted`` once the server answers, so a lost answer, a timeout or the job being stopped
    meanwhile is reported as "may have been deleted", never as "not deleted". A refused chunk (an
    HTTP error status) and the chunks after it are ``delete_failed``.
    """
    for start in range(0, len(originals), chunk_size):
        chunk = originals[start:start + chunk_size]
        ledger.delete_unknown = list(chunk)
        try:
            client.delete_annotations(chunk, chunk_size=chunk_size)
        except NimbusAPIError as exc:
            if exc.status is not None:  # the server answered: it did not delete them
                ledger.delete_unknown = []
                ledger.delete_failed.extend(originals[start:])
            else:
                ledger.delete_failed.extend(originals[start + chunk_size:])
            return exc
        ledger.delete_unknown = []
        ledger.deleted.extend(chunk)
    return None
