"""One refinement per original, whatever other jobs do at the same time.

Several compute jobs may refine the same originals at once (a double click, two people, a large
dataset split into overlapping runs). They never talk to each other; each reaches the same
decision from what the server shows it, and each step below is safe to interrupt at any
request (a killed job leaves nothing that a later run does not finish):

1. **Survivor.** Of the refinements of one original (:mod:`sam2_refine.job.refinements`), the one
   with the smallest id stays. Every job computes the same one from any listing that holds it,
   and no job ever removes it (none sees a smaller one). Ids need not follow creation time.
2. **Duplicates.** Every other refinement of the group is removed, after its connections have
   been re-created on the survivor (:func:`~sam2_refine.job.links.move_connections`). Only annotations carrying this
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
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sam2_refine.job.batch_reads import BatchReader
from sam2_refine.job.links import Ends, all_ends, move_connections, remove_connections_of, remove_identical_connections
from sam2_refine.job.markers import Mark, read_mark
from sam2_refine.nimbus.client import MAX_CHUNK, NimbusClient
from sam2_refine.nimbus.errors import NimbusAPIError
from sam2_refine.job.refinements import Refinement, RefinementIndex, Unreadable
from sam2_refine.job.replace import Ledger
from sam2_refine.job.selection import annotation_location
from sam2_refine.annotations import Location

log = logging.getLogger(__name__)

#: Rounds of "list, act" before giving up (other jobs still creating refinements of the same
#: originals by then is not expected; the job then reports it and exits 1).
MAX_ROUNDS = 6


@dataclass(frozen=True)
class ServerView:
    """One reading of the dataset's annotations.

    Attributes:
        index: Refinements by original, and unreadable marks.
        others: id -> location of every listed annotation that is not a refinement (originals).
    """

    index: RefinementIndex
    others: dict[str, Location | None]


class ViewBuilder:
    """A :class:`ServerView` made from documents as they go by (a reading made for something
    else, e.g. the selection's)."""

    def __init__(self) -> None:
        self._index = RefinementIndex()
        self._others: dict[str, Location | None] = {}
        #: Documents seen.
        self.count = 0

    def add(self, doc: dict[str, Any]) -> None:
        self.count += 1
        if not isinstance(doc, dict) or not isinstance(doc.get("_id"), str) or not doc["_id"]:
            return
        mark, problem = read_mark(doc)
        if mark is not None:
            self._index.add(doc["_id"], mark, annotation_location(doc))
        elif problem is not None:
            self._index.unreadable.append(Unreadable(doc["_id"], annotation_location(doc), problem))
        else:
            self._others[doc["_id"]] = annotation_location(doc)

    def watching(self, docs: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """``docs``, each one added on its way."""
        for doc in docs:
            self.add(doc)
            yield doc

    def view(self) -> ServerView:
        return ServerView(self._index, self._others)


def read_view(reader: BatchReader, shapes: Iterable[str]) -> ServerView:
    """Read the annotations of ``shapes`` at the batch's locations (refinements are polygons:
    always read)."""
    seen = ViewBuilder()
    for doc in reader.annotations(tuple(dict.fromkeys(("polygon", *shapes)))):
        seen.add(doc)
    return seen.view()


class RefinementWatch:
    """Reads the refinements at some locations again while the job runs, to narrow the window in
    which two jobs refine the same original (what still overlaps is settled by :func:`converge`).

    A re-read of a location asks for the ids of the polygons there carrying any of the job's
    output tags (every refinement a job with the same tool makes carries them; all polygons when
    the tool has none) and reads only the documents it has not read before: over a job each
    document is read once, so the re-reads cost what the batch holds, not the square of what the
    job makes. On the server each such query walks the dataset's entries, so the re-reads are
    rationed: a location is re-read only while the time spent re-reading, with one more, stays
    within ``share`` of the time the job has run (plus ``grace`` seconds, so that the cheap
    re-reads of a short job are never skipped).
    """

    def __init__(self, reader: BatchReader, tags: Iterable[str], share: float = 0.04, grace: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.reader, self.tags = reader, tuple(tags)
        self.share, self.grace, self.clock = share, grace, clock
        self._started = clock()
        self._spent = 0.0
        self._typical = 0.0  # what the last reading of one location took (none yet: the first is free)
        #: id -> (mark, location) of every polygon read so far; None for one that is no refinement.
        self._marks: dict[str, tuple[Mark, Location | None] | None] = {}

    @property
    def spent(self) -> float:
        """Seconds spent re-reading so far."""
        return self._spent

    def due(self) -> bool:
        """Whether one more location's re-read fits in the share of the job's time."""
        return self._spent + self._typical <= self.share * (self.clock() - self._started) + self.grace

    def read(self, locations: Iterable[Location]) -> RefinementIndex | None:
        """The refinements now at ``locations`` (those the share allows, in order), or None when
        the reading failed (only logged: this is an optimisation, the job goes on)."""
        index = RefinementIndex()
        try:
            for location in dict.fromkeys(locations):
                if not self.due():
                    break
                started = self.clock()
                try:
                    ids, docs = self.reader.at_location(location, self.tags, self._marks)
                finally:
                    self._typical = self.clock() - started
                    self._spent += self._typical
                for doc in docs:
                    mark, _ = read_mark(doc)
                    self._marks[str(doc.get("_id"))] = None if mark is None else (mark, annotation_location(doc))
                for annotation_id in ids:
                    found = self._marks.get(annotation_id)
                    if found is not None:
                        index.add(annotation_id, *found)
        except NimbusAPIError as exc:
            log.info("could not re-read the refinements: %s", exc)
            return None
        return index


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


#: Is this location in the job's batch? (None: an unreadable location, never.)
InBatch = Callable[[Location | None], bool]


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


def converge(reader: BatchReader, ledger: Ledger, *, delete: bool, shapes: Iterable[str],
             first_view: ServerView | None = None,
             on_step: Callable[[str, str], None] | None = None) -> ConvergeReport:
    """Bring this job's originals to one confirmed refinement each (and delete them if asked).

    Args:
        ledger: The job's ledger: its originals (``ledger.locations``) and what it created;
            updated with each original's survivor, the duplicates removed, the deletions.
        delete: Delete the originals whose survivor is confirmed.
        reader: Reads the job's batch (every reading here is of the batch's locations, and of
            the connections of the annotations concerned).
        shapes: Shapes of this job's originals (so that their existence can be read).
        first_view: A reading of the batch (of polygons and ``shapes``) taken since this job last
            changed anything, to start from instead of reading again.
        on_step: Called as ``on_step(title, info)`` before each step that changes the server
            (progress lines).
    """
    report = ConvergeReport()
    client, dataset_id, in_batch = reader.client, reader.dataset_id, reader.holds
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
            present |= reader.existing(unknown, listed=("polygon", *shapes))
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
        moved = move_connections(reader, mapping, ends)
        made.update(moved.created)
        report.moved += len(moved.created)
        return moved.listing

    def delete_with_links(ids: list[str], listing: list[dict[str, Any]],
                          delete: Callable[[list[str], list[str]], NimbusAPIError | None]) -> NimbusAPIError | None:
        """Remove the connections of ``ids`` (copied already), delete them, then remove any
        connection made meanwhile to those that were (or may have been) deleted: the server's
        bulk delete leaves connections behind. ``delete(ids, deleted)`` appends to ``deleted``."""
        report.stage = "links"
        report.unlinked += remove_connections_of(reader, set(ids), listing)
        deleted: list[str] = []
        try:
            error = delete(ids, deleted)
        finally:
            if deleted:
                report.stage = "links"
                report.unlinked += remove_connections_of(reader, set(deleted))
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

    checked = first_view  # a reading to start the next round from (else the batch is read again)
    try:
        for _ in range(MAX_ROUNDS):
            report.stage = "read"
            if checked is None:
                view = read_view(reader, shapes)
                withdraw(view)
            else:
                view, checked = checked, None
            ends = Ends(reader, _present(view), listed=("polygon", *shapes))
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
                in_scope = {r.id for group in view.index.groups.values() for r in group if in_batch(r.location)}
                replaced = _replaced_originals(view, in_batch)
                listing = reader.connections_touching(in_scope | replaced)
                remove_identical_connections(reader, in_scope, listing)
                report.unlinked += _remove_left_links(reader, replaced, ends, listing)
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
                check = read_view(reader, shapes)
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
                # The check was read after this round's moves and removals: the next round starts
                # from it (the originals deleted since are in ledger.deleted, their connections
                # removed) rather than from one more reading of the batch.
                checked = check
        report.stage = ""
    except NimbusAPIError as exc:
        report.error = exc
    return report


def _present(view: ServerView) -> set[str]:
    """Every annotation id a reading listed: originals and other annotations, and refinements."""
    return set(view.others) | {r.id for group in view.index.groups.values() for r in group}


def _replaced_originals(view: ServerView, in_batch: InBatch) -> set[str]:
    """Ids of originals with a refinement in the batch that the reading does not show."""
    return {original_id for original_id, group in view.index.groups.items()
            if original_id not in view.others and any(in_batch(r.location) for r in group)}


def _remove_left_links(reader: BatchReader, replaced: set[str], ends: Ends, listing: list[dict[str, Any]]) -> int:
    """Remove connections to originals that were replaced in the batch and no longer exist: left
    by a job stopped between deleting them and removing their connections, or by a worker
    that trusted the server's bulk delete to remove them."""
    touching = all_ends(listing) & replaced
    if not touching:
        return 0
    return remove_connections_of(reader, ends.missing(touching, fresh=True), listing)


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
