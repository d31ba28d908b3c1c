"""Every read a job makes of annotations and connections, scoped to its batch.

A job refines the annotations at its batch's locations, and a refinement only counts at its
original's location, so every reading a job needs (selection, the re-reads while it runs,
convergence with other jobs) is about those locations: :class:`BatchReader` reads them with
``list/ids`` + ``hydrate`` per location filter, or with one cursor listing where that is cheaper
(:mod:`sam2_refine.job.read_plan`), and never keeps a listing of the whole dataset.

Older servers (no ``upenn_annotation/list/ids`` or ``hydrate``: 404 or 405) are read as they
always were: the dataset's annotations of each shape with the ``afterId`` cursor, filtered to the
batch here. The reader says so once in the log.

What convergence rests on (see :mod:`sam2_refine.job.converge`): a reading shows every annotation
that existed at the batch's locations for the whole time it was being read. ``list/ids`` is one
aggregation over the ``{datasetId, _id}`` index: an annotation present throughout it is in its
answer; ``hydrate`` then returns those still present. An annotation deleted between the two is
absent (it is gone: correct), one created between them is not in this reading (it did not exist
for the whole reading: the next reading has it). The cursor listing has the same property.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Iterable, Iterator, Sequence
from typing import Any

from sam2_refine.nimbus.errors import NimbusAPIError, ServerLacksEndpoint
from sam2_refine.nimbus.client import NimbusClient
from sam2_refine.job.read_plan import (
    DEFAULT_COSTS,
    AnnotationReadPlan,
    ReadCosts,
    plan_annotation_reads,
    read_connections_per_annotation,
)
from sam2_refine.job.selection import annotation_location
from sam2_refine.annotations import Location

log = logging.getLogger(__name__)

#: Ids looked up one by one (``GET upenn_annotation/{id}``) on a server without ``hydrate``,
#: at most; more are found by listing their shapes.
LOOKUPS = 100
#: The shapes an annotation can have (the server's schema).
ANNOTATION_SHAPES = ("point", "line", "polygon", "rectangle")

Positions = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


class BatchReader:
    """Reads a job's batch (see the module docstring).

    Args:
        batch: The batch's 0-based positions per axis (XY, Z, Time).
        sizes: The dataset's positions per axis (XY, Z, Time).
        costs: The cost model for choosing between queries and listings.
    """

    def __init__(self, client: NimbusClient, dataset_id: str, batch: Positions, sizes: tuple[int, int, int],
                 costs: ReadCosts = DEFAULT_COSTS) -> None:
        self.client, self.dataset_id = client, dataset_id
        self.batch = tuple(frozenset(axis) for axis in batch)
        self._positions, self._sizes, self.costs = batch, sizes, costs
        self._plan: AnnotationReadPlan | None = None
        #: False once the server turned out to have no list/ids or hydrate (then it stays so).
        self.scoped = True
        self._connections: int | None = None  # the dataset's connections, once counted (-1: unknown)

    # -- where ------------------------------------------------------------------------------------

    def holds(self, location: Location | None) -> bool:
        """Whether ``location`` is one of the batch's."""
        return (location is not None and location.xy in self.batch[0] and location.z in self.batch[1]
                and location.time in self.batch[2])

    @property
    def plan(self) -> AnnotationReadPlan:
        """How the batch's annotations are read (decided once per job, on first use)."""
        if self._plan is None:
            self._plan = AnnotationReadPlan(None, 0.0)
            if self.scoped:
                try:
                    count = self.client.count_annotations(self.dataset_id)
                except NimbusAPIError as exc:
                    log.info("could not count the dataset's annotations (%s); reading by location", exc)
                    count = 10 ** 6
                self._plan = plan_annotation_reads(self._positions, self._sizes, count, self.costs)
                log.info("annotations are read %s", f"with {len(self._plan.locations)} location queries"
                         if self._plan.scoped else "with one listing of the dataset")
        return self._plan

    # -- annotations --------------------------------------------------------------------------------

    def annotations(self, shapes: Sequence[str]) -> Iterator[dict[str, Any]]:
        """Every annotation of ``shapes`` at the batch's locations (documents, as the server sends
        them; no other annotation is kept)."""
        wanted = tuple(dict.fromkeys(shapes))
        if self.scoped and self.plan.scoped:
            try:
                yield from self._queried(wanted, self.plan.locations or ())
                return
            except ServerLacksEndpoint as exc:
                self._lacks(exc)
        yield from self._listed(wanted)

    def _queried(self, shapes: tuple[str, ...], filters: Iterable[dict[str, int]]) -> Iterator[dict[str, Any]]:
        shape = shapes[0] if len(shapes) == 1 else None  # several shapes: one walk, filtered here
        for where in filters:
            ids = self.client.list_annotation_ids(self.dataset_id, location=where, shape=shape)
            for doc in self.client.hydrate(ids, self.costs.page):
                if doc.get("shape") in shapes and self.holds(annotation_location(doc)):
                    yield doc

    def _listed(self, shapes: tuple[str, ...]) -> Iterator[dict[str, Any]]:
        for shape in shapes:
            for page in self.client.iter_annotation_pages(self.dataset_id, shape):
                for doc in page:
                    # The shape is checked too: a server that ignored the filter would list
                    # every polygon again under each shape.
                    if isinstance(doc, dict) and doc.get("shape") == shape and self._placed_here(doc):
                        yield doc

    def _placed_here(self, doc: dict[str, Any]) -> bool:
        """At one of the batch's locations, or at none that can be read (not whole numbers: the
        job keeps it with that reason; the server's schema does not let one in, but a listing
        shows whatever is stored)."""
        location = annotation_location(doc)
        return location is None or self.holds(location)

    def at_location(self, location: Location, tags: Sequence[str],
                    read_before: Container[str]) -> tuple[list[str], list[dict[str, Any]]]:
        """The polygons at ``location`` with any of ``tags`` (all polygons without tags): their
        ids now, and the documents of those not in ``read_before``. On a server without
        ``list/ids``, the dataset's polygons with ALL of ``tags`` are listed instead (every
        document at the location is returned, read before or not)."""
        if self.scoped:
            try:
                ids = self.client.list_annotation_ids(self.dataset_id, location=location.as_json(),
                                                      shape="polygon", tags=tags or None)
                fresh = [i for i in ids if i not in read_before]
                return ids, (self.client.hydrate(fresh, self.costs.page) if fresh else [])
            except ServerLacksEndpoint as exc:
                self._lacks(exc)
        docs = []
        for page in self.client.iter_annotation_pages(self.dataset_id, "polygon", tags=tags or None):
            docs.extend(d for d in page if isinstance(d, dict) and annotation_location(d) == location)
        return [str(d.get("_id")) for d in docs], docs

    def existing(self, ids: set[str], listed: Sequence[str] = ()) -> set[str]:
        """Which of ``ids`` are annotations (of any dataset this token reads): hydrated, or on an
        older server looked up one by one (at most :data:`LOOKUPS`; before that, the shapes not in
        ``listed`` are listed once)."""
        if not ids:
            return set()
        if self.scoped:
            try:
                return {str(d.get("_id")) for d in self.client.hydrate(sorted(ids), self.costs.page)} & ids
            except ServerLacksEndpoint as exc:
                self._lacks(exc)
        found: set[str] = set()
        for shape in ANNOTATION_SHAPES:
            if shape in listed or len(ids - found) <= LOOKUPS:
                continue
            for page in self.client.iter_annotation_pages(self.dataset_id, shape):
                found |= {d["_id"] for d in page if isinstance(d, dict) and d.get("_id") in ids}
        for annotation_id in sorted(ids - found):
            if self.client.get_annotation(annotation_id) is not None:
                found.add(annotation_id)
        return found

    def _lacks(self, exc: ServerLacksEndpoint) -> None:
        if self.scoped:
            log.warning("this server has no %s (an older NimbusImage): the job lists the dataset's annotations "
                        "instead, which costs what the dataset holds, not what the batch holds", exc.endpoint)
        self.scoped = False

    # -- connections ----------------------------------------------------------------------------

    def connections_touching(self, ids: set[str]) -> list[dict[str, Any]]:
        """Every connection of the dataset with an end in ``ids``: read per annotation, or with one
        cursor listing of the dataset's connections (keeping only those), whichever costs less."""
        if not ids:
            return []
        if self._connections is None:  # counted once per job: its own copies change it little
            try:
                self._connections = self.client.count_connections(self.dataset_id)
            except NimbusAPIError as exc:
                log.info("could not count the dataset's connections (%s)", exc)
                self._connections = -1
        total = self._connections if self._connections >= 0 else None
        if total is not None and not read_connections_per_annotation(len(ids), total, self.costs):
            return [c for page in self.client.iter_connection_pages(self.dataset_id) for c in page
                    if c.get("parentId") in ids or c.get("childId") in ids]
        seen: dict[str, dict[str, Any]] = {}
        for annotation_id in sorted(ids):
            for con in self.client.list_connections(self.dataset_id, node_id=annotation_id):
                if isinstance(con.get("_id"), str):
                    seen[con["_id"]] = con
        return [seen[k] for k in sorted(seen)]
