"""Which annotations a job refines: kept by tag and batch range, grouped by location.

Annotations arrive as the server's JSON documents. Each one is turned into an
:class:`Original` once; a document that cannot be refined (bad coordinates, no area) is still an
``Original``, carrying its ``problem``, so that the job accounts for it and never deletes it.

Three kinds of original (:attr:`Original.kind`), by the document's ``shape``: polygons (and
blobs) outline an area; rectangles too (the convex hull of their corners: any order, possibly
rotated); points mark an object without outlining it (their ``shape`` is a shapely ``Point``).
Which shapes a job lists at all is the job's choice (:func:`sam2_refine.job.compute.fetch_annotations`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shapely.geometry.base import BaseGeometry
from shapely.geometry import Point

from sam2_refine.engine.geometry import (
    AnnotationProblem,
    point_from_coordinates,
    polygon_from_ring,
    rectangle_from_coordinates,
    ring_from_coordinates,
)
from sam2_refine.job.markers import read_mark
from sam2_refine.job.refinements import RefinementIndex, Unreadable
from sam2_refine.annotations import POINT, POLYGON, RECTANGLE, Location, Original


def annotation_location(doc: dict[str, Any]) -> Location | None:
    """The document's (XY, Z, Time), 0-based; no ``location`` means the first position; None when
    the location is not whole numbers."""
    loc = doc.get("location")
    if loc is None:
        return Location(0, 0, 0)
    if not isinstance(loc, dict):
        return None
    values = []
    for key in ("XY", "Z", "Time"):
        value = loc.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
            return None
        values.append(int(value))
    return Location(*values)


def annotation_tags(doc: dict[str, Any]) -> tuple[str, ...]:
    tags = doc.get("tags")
    if not isinstance(tags, list):
        return ()
    return tuple(t for t in tags if isinstance(t, str))


def has_any_tag(doc: dict[str, Any], tags: Sequence[str]) -> bool:
    """True when ``tags`` is empty or the annotation carries at least one of them."""
    return not tags or bool(set(annotation_tags(doc)) & set(tags))


def kind_of(doc: dict[str, Any]) -> str:
    """The kind of original a document is (:data:`POINT`, :data:`RECTANGLE`, else :data:`POLYGON`)."""
    shape = doc.get("shape")
    return shape if shape in (POINT, RECTANGLE) else POLYGON


def _shape(doc: dict[str, Any], kind: str) -> BaseGeometry:
    coordinates = doc.get("coordinates")
    if kind == POINT:
        return Point(point_from_coordinates(coordinates))
    if kind == RECTANGLE:
        return rectangle_from_coordinates(coordinates)
    return polygon_from_ring(ring_from_coordinates(coordinates))


def to_original(doc: dict[str, Any]) -> Original:
    """Check one annotation document and prepare its shape (see :class:`Original`)."""
    ann_id = str(doc.get("_id", ""))
    location = annotation_location(doc) or Location(-1, -1, -1)
    tags = annotation_tags(doc)
    kind = kind_of(doc)
    if location.xy < 0:
        return Original(ann_id, location, tags, None, "its location is not whole numbers", doc, kind)
    try:
        shape = _shape(doc, kind)
    except AnnotationProblem as exc:
        return Original(ann_id, location, tags, None, exc.reason, doc, kind)
    return Original(ann_id, location, tags, shape, None, doc, kind)


@dataclass(frozen=True)
class Selection:
    """The annotations of one job.

    Attributes:
        by_location: Location -> originals there, locations sorted (XY, then Z, then Time).
        duplicates: Ids listed more than once by the server (refined once).
        without_id: How many documents had no ``_id`` (they cannot be refined or deleted).
        index: Every refinement on the server (made by an earlier or a concurrent job; see
            :mod:`sam2_refine.job.markers`) and every annotation with an unreadable mark. Neither
            is ever an original.
        batch_tags: Tag -> how many listed annotations inside the batch carry it, whatever the
            refine tags (refinements and marked annotations not counted): what a user can choose
            from when the refine tags match nothing.
        batch_untagged: Listed annotations inside the batch without any tag.
        outside_batch: Listed annotations (of any tag) outside the batch (none when the reading
            was scoped to the batch: the job counts them on the server instead).
    """

    by_location: dict[Location, list[Original]]
    duplicates: tuple[str, ...] = ()
    without_id: int = 0
    index: RefinementIndex = field(default_factory=RefinementIndex)
    batch_tags: dict[str, int] = field(default_factory=dict)
    batch_untagged: int = 0
    outside_batch: int = 0

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.by_location.values())

    @property
    def refinements(self) -> dict[str, str]:
        """original id -> the id of its surviving refinement on the server."""
        return self.index.survivors()


def select(
    docs: Iterable[dict[str, Any]],
    refine_tags: Sequence[str],
    xy: Iterable[int],
    z: Iterable[int],
    time: Iterable[int],
) -> Selection:
    """Keep annotations with any of ``refine_tags`` (all if empty) inside the batch ranges.

    Args:
        docs: Annotation documents (may repeat an id; each id is kept once).
        refine_tags: Tags of objects to refine.
        xy, z, time: 0-based positions of the batch, per axis.
    """
    xy_set, z_set, t_set = set(xy), set(z), set(time)
    grouped: dict[Location, list[Original]] = defaultdict(list)
    seen: set[str] = set()
    duplicates: list[str] = []
    index = RefinementIndex()
    without_id = 0
    batch_tags: Counter[str] = Counter()
    untagged = outside = 0
    counted: set[str] = set()
    for doc in docs:
        if not isinstance(doc, dict):
            continue
        mark, unreadable = read_mark(doc)
        if mark is not None or unreadable is not None:  # a refinement, or a mark not to trust
            if isinstance(doc.get("_id"), str) and doc["_id"]:
                if mark is not None:
                    index.add(doc["_id"], mark, annotation_location(doc))
                else:
                    index.unreadable.append(Unreadable(doc["_id"], annotation_location(doc), str(unreadable)))
            continue
        location = annotation_location(doc)
        in_batch = location is None or (location.xy in xy_set and location.z in z_set and location.time in t_set)
        key = doc.get("_id") if isinstance(doc.get("_id"), str) else None
        if key is None or key not in counted:  # what the batch holds, for a filter that matches nothing
            if key is not None:
                counted.add(key)
            if not in_batch:
                outside += 1
            elif annotation_tags(doc):
                batch_tags.update(set(annotation_tags(doc)))
            else:
                untagged += 1
        if not has_any_tag(doc, refine_tags):
            continue
        ann_id = doc.get("_id")
        if not isinstance(ann_id, str) or not ann_id:
            without_id += 1
            continue
        if ann_id in seen:
            duplicates.append(ann_id)
            continue
        seen.add(ann_id)
        if not in_batch:
            continue
        original = to_original(doc)
        grouped[original.location].append(original)
    ordered = {loc: grouped[loc] for loc in sorted(grouped, key=lambda loc: (loc.xy, loc.z, loc.time))}
    return Selection(ordered, tuple(duplicates), without_id, index, dict(batch_tags), untagged, outside)
