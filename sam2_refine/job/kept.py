"""Originals the job kept: told by position and reason, and tagged so that the app finds them.

NimbusImage shows no annotation ids, so the "Annotations kept" warning counts the kept
originals by position (numbered as the app numbers them: XY, Z, Time, 1-based; an axis the
dataset does not vary along is left out) and by reason; the ids are in the summary file only
(``SAM2_REFINE_SUMMARY``).

The "Tag kept annotations" field adds a tag to every original the job kept, so that the app's
tag filter shows the outlines left for the user to fix. The tag is a status this worker
keeps up to date: an original a later run refines (and does not delete) has the tag taken
away again, and a refined annotation never inherits it ("Keep original tags" copies every
other tag). Nothing else of an original changes: each original is read again just before its
tags are written (so that a tag a user added meanwhile stays), and the update names the
``tags`` field alone (``PUT upenn_annotation/multiple``, which keeps every other field of the
stored document). Running the job again changes nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sam2_refine.nimbus.errors import NimbusAPIError
from sam2_refine.nimbus.client import NimbusClient
from sam2_refine.annotations import Location

AXES = ("XY", "Z", "Time")
#: Positions the warning names one by one; the rest are counted together.
LISTED_POSITIONS = 20
#: Annotations per tag update request.
TAG_CHUNK = 500


def position_text(location: Location, sizes: tuple[int, int, int]) -> str:
    """A position as the app numbers it (1-based): ``"XY 2, Time 5"``. Axes along which the
    dataset has one position only are left out (``sizes``: the dataset's XY, Z, Time counts);
    a dataset of one position is ``""``."""
    values = (location.xy, location.z, location.time)
    return ", ".join(f"{axis} {value + 1}" for axis, value, size in zip(AXES, values, sizes, strict=True) if size > 1)


def kept_by_position(kept: Mapping[str, Sequence[str]], locations: Mapping[str, Location],
                     ) -> dict[Location, dict[str, list[str]]]:
    """reason -> ids, regrouped as location -> reason -> ids (locations in the app's order: XY,
    then Z, then Time; reasons by count, largest first; ids sorted)."""
    grouped: dict[Location, dict[str, list[str]]] = {}
    for reason, ids in kept.items():
        for ann_id in ids:
            location = locations.get(ann_id, Location(-1, -1, -1))
            grouped.setdefault(location, {}).setdefault(reason, []).append(ann_id)
    ordered = {}
    for location in sorted(grouped, key=lambda loc: (loc.xy, loc.z, loc.time)):
        reasons = grouped[location]
        ordered[location] = {r: sorted(reasons[r]) for r in sorted(reasons, key=lambda r: (-len(reasons[r]), r))}
    return ordered


def _reasons_text(reasons: Mapping[str, Sequence[str]]) -> str:
    return ", ".join(f"{len(ids)} {reason}" for reason, ids in reasons.items())


def kept_text(groups: Mapping[Location, Mapping[str, Sequence[str]]], sizes: tuple[int, int, int],
              listed: int = LISTED_POSITIONS) -> str:
    """``"XY 2, Time 5: 12 kept: 9 <reason>, 3 <reason>; XY 3, Time 1: ..."``: the first
    ``listed`` positions one by one, the others counted together."""
    parts = []
    for location, reasons in list(groups.items())[:listed]:
        count = sum(len(ids) for ids in reasons.values())
        where = position_text(location, sizes) if location.xy >= 0 else "no position (unreadable location)"
        parts.append((f"{where}: " if where else "") + f"{count} kept: {_reasons_text(reasons)}")
    rest = list(groups.values())[listed:]
    if rest:
        count = sum(len(ids) for reasons in rest for ids in reasons.values())
        parts.append(f"and {len(rest)} more position(s) with {count} kept")
    return "; ".join(parts)


def summary_by_position(groups: Mapping[Location, Mapping[str, Sequence[str]]]) -> dict[str, dict[str, list[str]]]:
    """The same groups for the summary file: ``"XY 2, Z 1, Time 5"`` -> reason -> ids."""
    return {(location.describe() if location.xy >= 0 else "unreadable location"):
            {reason: list(ids) for reason, ids in reasons.items()} for location, reasons in groups.items()}


# -- the tag ----------------------------------------------------------------------------------------


@dataclass
class TagReport:
    """What tagging did.

    Attributes:
        tag: The tag.
        added: Kept originals the tag was added to.
        already: Kept originals that carried it already.
        removed: Refined originals (still on the server) the tag was taken from.
        gone: Originals no longer on the server when they were read again.
        refused: The server's reason -> originals it would not update (their stored document
            breaks its schema, e.g. a coordinate that is not a number; or their tags are not a
            list of text, which a tag cannot be added to without changing them).
        error: The failure that stopped tagging (the rest untouched), or None.
    """

    tag: str
    added: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    refused: dict[str, list[str]] = field(default_factory=dict)
    error: NimbusAPIError | None = None

    @property
    def tagged(self) -> int:
        """Kept originals that carry the tag now."""
        return len(self.added) + len(self.already)

    def as_json(self) -> dict[str, Any]:
        return {"tag": self.tag, "added_ids": sorted(self.added), "already_tagged_ids": sorted(self.already),
                "removed_ids": sorted(self.removed), "gone_ids": sorted(self.gone),
                "refused_ids": {r: sorted(ids) for r, ids in self.refused.items()},
                "error": str(self.error) if self.error is not None else None}


def new_tags(doc: dict[str, Any], tag: str, keep: bool) -> list[str] | None:
    """The document's tags with ``tag`` added (``keep``) or taken away; None when its tags are
    not a list of text (then no tag list can be written without changing the others)."""
    tags = doc.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        return None
    if keep:
        return tags if tag in tags else [*tags, tag]
    return [t for t in tags if t != tag]


def update_tags(client: NimbusClient, tag: str, keep_ids: Sequence[str], untag_ids: Sequence[str],
                on_progress: Callable[[int, int], None] | None = None, chunk: int = TAG_CHUNK) -> TagReport:
    """Add ``tag`` to the originals ``keep_ids`` and take it from ``untag_ids``, each read again
    first (see the module docstring). A chunk the server refuses as a whole (400: a document it
    will not save) is sent again one annotation at a time, so that the others are tagged.

    Args:
        on_progress: Called with (done, total) as the originals are read and written.

    Returns:
        What was done; ``error`` set (and the rest untouched) when a request failed otherwise.
    """
    report = TagReport(tag)
    work = [(ann_id, True) for ann_id in keep_ids] + [(ann_id, False) for ann_id in untag_ids]
    total = len(work)
    for start in range(0, total, chunk):
        pending: list[tuple[str, list[str], bool]] = []
        try:
            for ann_id, keep in work[start:start + chunk]:
                doc = client.get_annotation(ann_id)
                if doc is None:
                    report.gone.append(ann_id)
                    continue
                tags = new_tags(doc, tag, keep)
                if tags is None:
                    report.refused.setdefault("its tags are not a list of text", []).append(ann_id)
                elif tags == doc.get("tags", []):
                    if keep:
                        report.already.append(ann_id)
                else:
                    pending.append((ann_id, tags, keep))
            _write(client, pending, report)
        except NimbusAPIError as exc:
            report.error = exc
            return report
        if on_progress is not None:
            on_progress(min(start + chunk, total), total)
    return report


def _write(client: NimbusClient, pending: list[tuple[str, list[str], bool]], report: TagReport) -> None:
    """Write one chunk; on a 400 for the whole chunk, one annotation at a time."""
    if not pending:
        return
    try:
        client.update_annotation_tags([(ann_id, tags) for ann_id, tags, _ in pending])
        done = pending
    except NimbusAPIError as exc:
        if exc.status != 400 or len(pending) == 1:
            if exc.status == 400:
                report.refused.setdefault(_refusal(exc), []).append(pending[0][0])
                return
            raise
        done = []
        for item in pending:
            try:
                client.update_annotation_tags([(item[0], item[1])])
                done.append(item)
            except NimbusAPIError as single:
                if single.status != 400:
                    raise
                report.refused.setdefault(_refusal(single), []).append(item[0])
    for ann_id, _, keep in done:
        (report.added if keep else report.removed).append(ann_id)


def _refusal(exc: NimbusAPIError) -> str:
    detail = exc.detail.strip().rstrip(".")
    return f"the server refuses its stored document ({detail})" if detail else "the server refuses its document"
