"""The nouns every layer shares: where an annotation is, the original to refine, and its outcome.

A :class:`Location` is a position of the dataset; an :class:`Original` is one annotation to
refine (its shape, or the problem that keeps it from being refined); its :class:`Outcome` is
either :class:`Refined` (the new outline) or :class:`Kept` (with the reason; a kept original is
never deleted). The engine makes outcomes from originals; the job reads originals from the server
and writes outcomes back.

Plain data, imports nothing of the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry


@dataclass(frozen=True)
class Location:
    """A position in the dataset, 0-based: XY position, Z slice, Time point."""

    xy: int
    z: int
    time: int

    def as_json(self) -> dict[str, int]:
        return {"XY": self.xy, "Z": self.z, "Time": self.time}

    def describe(self) -> str:
        """1-based, as the UI shows positions."""
        return f"XY {self.xy + 1}, Z {self.z + 1}, Time {self.time + 1}"


#: Original kinds: what the annotation gives the model as a prompt.
POLYGON, RECTANGLE, POINT = "polygon", "rectangle", "point"


@dataclass(frozen=True)
class Original:
    """One annotation to refine.

    Attributes:
        id: The annotation's ``_id``.
        location: Its (XY, Z, Time), 0-based.
        tags: Its own tags.
        shape: The area it outlines, made valid (a polygon or rectangle), or its ``Point``
            (a point); None when ``problem`` is set.
        problem: Why it cannot be refined, or None.
        doc: The server's document, as fetched.
        kind: :data:`POLYGON` (also blobs), :data:`RECTANGLE` or :data:`POINT`.
    """

    id: str
    location: Location
    tags: tuple[str, ...]
    shape: BaseGeometry | None
    problem: str | None
    doc: dict[str, Any]
    kind: str = POLYGON


@dataclass(frozen=True)
class Refined:
    """A refined shape for one original.

    Attributes:
        original_id: The original annotation's id.
        polygon: The new outline, frame coordinates (x = column, y = row).
        score: The model's quality estimate of the mask.
    """

    original_id: str
    polygon: Polygon
    score: float


@dataclass(frozen=True)
class Kept:
    """An original that is not refined (and must never be deleted), with the reason."""

    original_id: str
    reason: str


Outcome = Refined | Kept
