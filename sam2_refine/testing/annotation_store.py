"""The test server's annotations and connections, indexed as NimbusImage's MongoDB collections are.

The plugin (``devops/girder/plugins/AnnotationPlugin/upenncontrast_annotation/server/``) keeps
annotations in a collection with a compound index ``{datasetId, _id}`` (``models/annotation.py``)
and connections with ``{datasetId, _id}``, ``parentId`` and ``childId`` indices
(``models/connections.py``). What each query costs on the server follows from those indices, and
this store keeps the same shape of cost, so that a benchmark against the test server shows it:

- a cursor page (``GET upenn_annotation?afterId=...&limit=L``, ``_id`` order) walks the index
  from the cursor: time proportional to the page (here: per dataset and shape, a sorted list of
  ids, found by bisection), not to the dataset;
- ``POST upenn_annotation/list/ids`` is an aggregation hinted to ``{datasetId, _id}``
  (``models/annotation.py``, ``_aggregate`` / ``listIds``): it scans every entry of the dataset,
  whatever the filter, and so does this store (:meth:`AnnotationStore.scan`);
- ``POST upenn_annotation/hydrate`` finds documents by ``_id``: a lookup per id;
- connections of one annotation (``parentId`` / ``childId`` / ``nodeAnnotationId``): the plugin's
  ``find`` hints ``{datasetId, _id}`` whatever the filter (``server/api/connections.py``), so such a
  query walks all of the dataset's connections, as the server answers it here too (the end
  indices serve deleting one annotation's connections).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from sortedcontainers import SortedList


class AnnotationStore:
    """Annotation documents by id, with a per-dataset and a per-(dataset, shape) ``_id`` index.

    Not thread-safe by itself: the server calls it under its lock.
    """

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}
        self._by_dataset: dict[Any, SortedList] = defaultdict(SortedList)
        self._by_shape: dict[tuple[Any, Any], SortedList] = defaultdict(SortedList)

    def __contains__(self, annotation_id: object) -> bool:
        return annotation_id in self.docs

    def __len__(self) -> int:
        return len(self.docs)

    def __iter__(self) -> Iterator[str]:
        return iter(self.docs)

    def __getitem__(self, annotation_id: str) -> dict[str, Any]:
        return self.docs[annotation_id]

    def get(self, annotation_id: str) -> dict[str, Any] | None:
        return self.docs.get(annotation_id)

    def update(self, docs: dict[str, dict[str, Any]]) -> None:
        """Store each of ``docs`` (id -> document) in place of the one with that id."""
        for annotation_id, doc in docs.items():
            self.put({**doc, "_id": annotation_id})

    def values(self) -> Iterable[dict[str, Any]]:
        return self.docs.values()

    def put(self, doc: dict[str, Any]) -> None:
        """Store (or replace) ``doc``, which has an ``_id``."""
        self.pop(doc["_id"])
        self.docs[doc["_id"]] = doc
        self._by_dataset[doc.get("datasetId")].add(doc["_id"])
        self._by_shape[(doc.get("datasetId"), _hashable(doc.get("shape")))].add(doc["_id"])

    def pop(self, annotation_id: str) -> dict[str, Any] | None:
        doc = self.docs.pop(annotation_id, None)
        if doc is not None:
            self._by_dataset[doc.get("datasetId")].discard(annotation_id)
            self._by_shape[(doc.get("datasetId"), _hashable(doc.get("shape")))].discard(annotation_id)
        return doc

    def count(self, dataset_id: str, shape: str | None = None, after: str | None = None) -> int:
        """How many of the dataset's annotations (of ``shape``) have an id above ``after``."""
        index = self._index(dataset_id, shape)
        return len(index) - (index.bisect_right(after) if after else 0)

    def page(self, dataset_id: str, shape: str | None, keep: Callable[[dict[str, Any]], bool], *,
             after: str | None = None, offset: int = 0, limit: int = 0, descending: bool = False,
             ) -> list[dict[str, Any]]:
        """One page in ``_id`` order, from the cursor (or skipping ``offset`` matches): the index
        is walked from the cursor until the page is full (0 = no limit)."""
        index = self._index(dataset_id, shape)
        if descending:
            ids: Iterator[str] = reversed(index[:index.bisect_left(after)] if after else index)
        else:
            ids = index.irange(minimum=after, inclusive=(False, True)) if after else iter(index)
        out: list[dict[str, Any]] = []
        for annotation_id in ids:
            doc = self.docs[annotation_id]
            if not keep(doc):
                continue
            if offset:
                offset -= 1
                continue
            out.append(doc)
            if limit and len(out) >= limit:
                break
        return out

    def scan(self, dataset_id: str, keep: Callable[[dict[str, Any]], bool]) -> list[str]:
        """Every id of the dataset whose document ``keep`` accepts, in ``_id`` order: a full walk
        of the dataset's index entries, as the plugin's hinted aggregation does."""
        docs = self.docs
        return [i for i in self._by_dataset.get(dataset_id, ()) if keep(docs[i])]

    def _index(self, dataset_id: str, shape: str | None) -> SortedList:
        if shape is None:
            return self._by_dataset.get(dataset_id) or SortedList()
        return self._by_shape.get((dataset_id, shape)) or SortedList()


class ConnectionStore:
    """Connection documents by id, with a per-dataset ``_id`` index and an index of each end."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}
        self._by_dataset: dict[Any, SortedList] = defaultdict(SortedList)
        self._by_end: dict[Any, set[str]] = defaultdict(set)

    def __len__(self) -> int:
        return len(self.docs)

    def values(self) -> Iterable[dict[str, Any]]:
        return self.docs.values()

    def put(self, doc: dict[str, Any]) -> None:
        self.pop(doc["_id"])
        self.docs[doc["_id"]] = doc
        self._by_dataset[doc.get("datasetId")].add(doc["_id"])
        for end in _ends(doc):
            self._by_end[end].add(doc["_id"])

    def pop(self, connection_id: str) -> dict[str, Any] | None:
        doc = self.docs.pop(connection_id, None)
        if doc is not None:
            self._by_dataset[doc.get("datasetId")].discard(connection_id)
            for end in _ends(doc):
                self._by_end[end].discard(connection_id)
        return doc

    def touching(self, annotation_id: str) -> list[dict[str, Any]]:
        """Connections with ``annotation_id`` at either end (through the end indices)."""
        return [self.docs[i] for i in sorted(self._by_end.get(annotation_id, ()))]

    def of_dataset(self, dataset_id: str, sort_by_id: bool) -> list[dict[str, Any]]:
        """The dataset's connections: in ``_id`` order, or in stored (insertion) order."""
        if sort_by_id:
            return [self.docs[i] for i in self._by_dataset.get(dataset_id, ())]
        return [c for c in self.docs.values() if c.get("datasetId") == dataset_id]

    def count(self, dataset_id: str) -> int:
        return len(self._by_dataset.get(dataset_id, ()))


def _ends(doc: dict[str, Any]) -> set[Any]:
    return {_hashable(doc.get("parentId")), _hashable(doc.get("childId"))}


def _hashable(value: Any) -> Any:
    """Odd documents a test seeds (a list as a shape) still get an index key."""
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value
