"""The Batch XY / Batch Z / Batch Time fields: which positions of an axis a job processes.

The UI takes comma-separated 1-based numbers and ranges (``"1-3, 5-8"``), or ``"all"``; blank
means the position of the tile the user launched the tool from. Inside the worker every
position is 0-based.

Parsing is split in two so that settings can be checked before the dataset is read:
:func:`parse_batch` checks the syntax; :meth:`AxisSelection.resolve` checks the positions
against the dataset's size for that axis. :class:`Batch` holds the three axes' positions, resolved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sam2_refine.annotations import Location
from sam2_refine.fields import describe_value

_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")
#: No axis of a dataset comes near this many positions; larger values are typing mistakes.
MAX_POSITION = 1_000_000

ACCEPTED = ('comma-separated 1-based positions and ranges such as "1-3, 5-8", or "all", '
            "or blank for the current position")


class BatchRangeError(ValueError):
    """A batch field that cannot be parsed or does not fit the dataset.

    Attributes:
        field: The interface field name, e.g. ``"Batch XY"``.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class AxisSelection:
    """What a batch field asks for.

    Attributes:
        kind: ``"all"``, ``"current"`` (blank field) or ``"list"``.
        positions: For ``"list"``: the 0-based positions, sorted, without repeats.
        text: The field's text as given (for messages).
    """

    kind: str
    positions: tuple[int, ...] = ()
    text: str = ""

    def resolve(self, field: str, size: int, current: int) -> tuple[int, ...]:
        """The 0-based positions to process on an axis of ``size`` positions.

        Args:
            field: Field name, for messages.
            size: Number of positions the dataset has on this axis (>= 1).
            current: 0-based position of the launching tile (used for a blank field).

        Raises:
            BatchRangeError: a position is beyond the axis (the message states the size).
        """
        if self.kind == "all":
            return tuple(range(size))
        wanted = (current,) if self.kind == "current" else self.positions
        beyond = [p for p in wanted if not 0 <= p < size]
        if beyond:
            shown = ", ".join(str(p + 1) for p in beyond[:5])
            what = "the current position" if self.kind == "current" else f'"{self.text}"'
            raise BatchRangeError(
                field, f"{what} asks for position {shown}, but the dataset has {size} "
                       f"position{'s' if size != 1 else ''} on this axis (1-{size})")
        return wanted


def parse_batch(field: str, value: object) -> AxisSelection:
    """Parse one batch field's value.

    Args:
        field: The field name, for messages.
        value: The field's value from ``workerInterface``: a string, None, or a whole number
            (a saved tool may hold one).

    Returns:
        The selection; list positions are 0-based.

    Raises:
        BatchRangeError: the value is not of the accepted form; the message says what is.
    """
    if value is None:
        return AxisSelection("current")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BatchRangeError(field, f"expected text, got {describe_value(value)}; use {ACCEPTED}")
    text = str(value).strip()
    if not text:
        return AxisSelection("current", text=text)
    if text.lower() == "all":
        return AxisSelection("all", text=text)
    positions: set[int] = set()
    shown = text if len(text) <= 60 else text[:57] + "..."
    for item in text.split(","):
        match = _ITEM.match(item)
        piece = item.strip() if len(item.strip()) <= 30 else item.strip()[:27] + "..."
        if not match:
            where = f' (in "{shown}")' if item.strip() != text else ""
            raise BatchRangeError(field, f'"{piece}"{where} is not a position or a range; use {ACCEPTED}')
        if any(len(g) > 7 for g in match.groups() if g is not None):
            raise BatchRangeError(field, f'"{piece}": positions go up to {MAX_POSITION:,}')
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) is not None else start
        if start < 1 or end < 1:
            raise BatchRangeError(field, f'"{piece}": positions start at 1; use {ACCEPTED}')
        if end < start:
            raise BatchRangeError(field, f'"{piece}": the range ends before it starts; use {ACCEPTED}')
        if end > MAX_POSITION:
            raise BatchRangeError(field, f'"{piece}": positions go up to {MAX_POSITION:,}')
        positions.update(range(start - 1, end))
        if len(positions) > MAX_POSITION:
            raise BatchRangeError(field, f'"{shown}" asks for more than {MAX_POSITION:,} positions')
    return AxisSelection("list", tuple(sorted(positions)), text)


def describe_positions(positions: tuple[int, ...] | list[int]) -> str:
    """0-based positions as the app numbers them, runs joined: ``(0, 1, 2, 4)`` -> ``"1-3, 5"``."""
    ordered = sorted(set(positions))
    runs: list[str] = []
    start = previous = None
    for position in [*ordered, None]:
        if position is not None and previous is not None and position == previous + 1:
            previous = position
            continue
        if start is not None:
            runs.append(f"{start + 1}" if start == previous else f"{start + 1}-{previous + 1}")
        start = previous = position
    return ", ".join(runs)


@dataclass(frozen=True)
class Batch:
    """The positions the job processes on each axis (0-based)."""

    xy: tuple[int, ...]
    z: tuple[int, ...]
    time: tuple[int, ...]
    #: How many positions the dataset has on each axis (XY, Z, Time).
    sizes: tuple[int, int, int] = (1, 1, 1)

    def holds(self, location: Location) -> bool:
        """Whether ``location`` is one of the batch's positions."""
        return location.xy in self.xy and location.z in self.z and location.time in self.time
