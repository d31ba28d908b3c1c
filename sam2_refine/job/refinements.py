"""The refinements a dataset holds, grouped by the original they refine (pure; no I/O).

A refinement is an annotation carrying this worker's mark (:mod:`sam2_refine.job.markers`). Several
jobs refining the same original at the same time can each leave one; every job must then agree,
from what the server shows it and nothing else, on which one stays. The rule is the smallest
annotation id of the group: ids are totally ordered strings, every job reads the same ones, and
the smallest one of a group is never removed by anyone (nobody sees a smaller one). Nothing here
assumes that ids follow creation time (ObjectIds made by several server processes do not).

A refinement only counts for an original at the original's own location (this worker always
writes it there): a mark naming an annotation elsewhere is not trusted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sam2_refine.job.markers import Mark
from sam2_refine.annotations import Location


@dataclass(frozen=True)
class Refinement:
    """One refinement on the server.

    Attributes:
        id: The refinement's own annotation id.
        original_id: The original it refines.
        location: Where it is (None when its location is not whole numbers).
        delete_original: Made by a job that was deleting originals.
    """

    id: str
    original_id: str
    location: Location | None
    delete_original: bool


@dataclass(frozen=True)
class Unreadable:
    """An annotation with a ``sam2Refine`` mark this worker cannot use (never touched)."""

    id: str
    location: Location | None
    reason: str


@dataclass
class RefinementIndex:
    """Refinements by original, and the annotations whose mark is unreadable.

    Attributes:
        groups: original id -> its refinements, sorted by id (the survivor first).
        unreadable: Annotations with an unreadable mark.
    """

    groups: dict[str, list[Refinement]] = field(default_factory=dict)
    unreadable: list[Unreadable] = field(default_factory=list)

    def add(self, annotation_id: str, mark: Mark, location: Location | None) -> None:
        """Record a refinement (an id seen twice, as a listing may repeat one, counts once)."""
        group = self.groups.setdefault(mark.original_id, [])
        if any(r.id == annotation_id for r in group):
            return
        group.append(Refinement(annotation_id, mark.original_id, location, mark.delete_original))
        group.sort(key=lambda r: r.id)

    def survivor(self, original_id: str) -> str | None:
        """The refinement of ``original_id`` that stays (smallest id), or None."""
        group = self.groups.get(original_id)
        return group[0].id if group else None

    def survivors(self) -> dict[str, str]:
        """original id -> its surviving refinement's id."""
        return {o: g[0].id for o, g in self.groups.items() if g}

    def for_original(self, original_id: str, location: Location) -> list[Refinement]:
        """The refinements that count for an original at ``location`` (same place), survivor first."""
        return [r for r in self.groups.get(original_id, []) if r.location == location]

    def misplaced(self, locations: dict[str, Location]) -> list[Refinement]:
        """Refinements of known originals (``locations``: original id -> its location) that lie
        at another location than their original (not trusted, never removed)."""
        return [r for o, loc in locations.items() for r in self.groups.get(o, []) if r.location != loc]
