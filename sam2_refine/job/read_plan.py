"""How to read a batch's annotations and connections in as few, cheap queries as it allows.

Pure functions: the choice between per-location queries and one listing of the dataset, from a
cost model whose constants are measured (``bench/bench_dataset_scale.py``; the figures and the
rule are in docs/performance.md, "Reads scoped to the batch").

Annotations. A NimbusImage server (mid-2026 on) answers ``POST upenn_annotation/list/ids`` with
the ids matching a location filter (any of XY, Z, Time; one left out matches every value), then
``POST upenn_annotation/hydrate`` with their documents. Each such query is an aggregation hinted
to the ``{datasetId, _id}`` index, so the server walks every entry of the dataset for it: a plan
of Q queries costs Q walks of the dataset, but ships only what matches. One cursor listing of the
dataset walks it once and ships all of it. The batch is a product of positions per axis; an axis
whose every position is in the batch is never fixed (a query leaving it out covers it); of the
others, fixing an axis multiplies the queries by its batch positions and divides what is shipped
by the share of the axis the batch holds. :func:`plan_annotation_reads` prices every choice of
axes to fix, and the listing, and takes the cheapest.

Connections have no location: those of given annotations are read one annotation at a time
(``nodeAnnotationId``; each such query walks all of the dataset's connections on the server, whose
``find`` is hinted to ``{datasetId, _id}``) or with one cursor listing of the dataset's
connections; :func:`read_connections_per_annotation` decides.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

#: Axis names in a location filter, in the order of a batch's positions.
AXES = ("XY", "Z", "Time")


@dataclass(frozen=True)
class ReadCosts:
    """Seconds per unit of work of a read, from ``bench/bench_dataset_scale.py``.

    Attributes:
        request: One request's fixed cost (round trip, routing, access checks).
        walk_per_annotation: The server walking one index entry of the dataset in a ``list/ids``
            query (it fetches each document to test its location).
        per_annotation: One annotation document shipped and read (server encoding, transfer, the
            worker's parsing and checks).
        per_connection: One connection document shipped and read.
        walk_per_connection: The server walking one of the dataset's connections (a query for one
            annotation's connections is hinted to ``{datasetId, _id}``: it walks them all).
        page: Documents per listing page; hydrate chunk.
    """

    request: float = 1e-3
    walk_per_annotation: float = 1.5e-6
    per_annotation: float = 75e-6
    per_connection: float = 10e-6
    walk_per_connection: float = 1.5e-6
    page: int = 5000


DEFAULT_COSTS = ReadCosts()


@dataclass(frozen=True)
class AnnotationReadPlan:
    """Per-location queries (``locations``: each a filter with some of XY, Z, Time), or one cursor
    listing of the dataset (``locations`` None). ``seconds``: the model's estimate."""

    locations: tuple[dict[str, int], ...] | None
    seconds: float

    @property
    def scoped(self) -> bool:
        return self.locations is not None


def plan_annotation_reads(batch: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]],
                          sizes: tuple[int, int, int], dataset_annotations: int,
                          costs: ReadCosts = DEFAULT_COSTS) -> AnnotationReadPlan:
    """The cheapest way to read every annotation at the batch's locations.

    Args:
        batch: The batch's 0-based positions per axis (XY, Z, Time).
        sizes: The dataset's number of positions per axis (XY, Z, Time).
        dataset_annotations: How many annotations the dataset holds (all shapes).
        costs: The cost model.
    """
    n = max(dataset_annotations, 0)
    listing = _listing_seconds(n, costs)
    best = AnnotationReadPlan(None, listing)
    partial = [i for i, (positions, size) in enumerate(zip(batch, sizes)) if len(set(positions)) < size]
    for count in range(len(partial) + 1):
        for fixed in itertools.combinations(partial, count):
            queries = math.prod(len(set(batch[i])) for i in fixed)
            share = math.prod(len(set(batch[i])) / max(sizes[i], 1) for i in fixed)
            shipped = share * n
            seconds = (queries * (costs.request + n * costs.walk_per_annotation)
                       + shipped * costs.per_annotation + math.ceil(shipped / costs.page) * costs.request)
            if seconds < best.seconds:
                filters = [dict(zip((AXES[i] for i in fixed), values))
                           for values in itertools.product(*(sorted(set(batch[i])) for i in fixed))]
                best = AnnotationReadPlan(tuple(filters), seconds)
    return best


def _listing_seconds(n: int, costs: ReadCosts) -> float:
    return n * costs.per_annotation + max(1, math.ceil(n / costs.page)) * costs.request


def read_connections_per_annotation(annotations: int, dataset_connections: int,
                                    costs: ReadCosts = DEFAULT_COSTS) -> bool:
    """Whether reading the connections of ``annotations`` annotations one at a time is cheaper
    than one listing of the dataset's ``dataset_connections`` connections. Each one-annotation
    query walks all of the dataset's connections on the server (NimbusImage's ``find`` is hinted
    to ``{datasetId, _id}``), so this holds only for a few annotations."""
    per_annotation = annotations * (costs.request + dataset_connections * costs.walk_per_connection)
    listing = (dataset_connections * costs.per_connection
               + max(1, math.ceil(dataset_connections / costs.page)) * costs.request)
    return per_annotation < listing
