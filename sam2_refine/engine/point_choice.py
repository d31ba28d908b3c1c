"""Which of a point's three masks becomes its outline: the two-pass rule, pure functions.

A point prompt carries no size: SAM2 answers it with three masks of different extents (for a
nucleus, typically a part of it, the nucleus, and the nucleus with whatever it touches). The
rule, after BIIGLE's Point-to-Polygon job (written afresh here):

1. **First pass.** Each point's *first choice* is its mask with the model's best score. The
   *expected area* of a group of points (the same tags, at one location) is the median area of
   their first choices, when at least :data:`MIN_GROUP` points of the group have one.
2. **Second pass.** Each point of such a group keeps, among its masks of a plausible size
   (within a factor :data:`PLAUSIBLE` of the expected area), the one with the best score; if
   none is plausible, the one whose area is closest to the expected area, measured as a ratio
   (``|log(area / expected)|``: twice too big and half too small are equally far). Without an
   expected area (fewer than :data:`MIN_GROUP` points in the group) the model's score decides.

BIIGLE's second pass keeps the mask closest to the expected area outright (:func:`closest_choice`,
``rule="area"``); measured here (docs/accuracy.md), that gives small objects of a group with
sizes spread over a factor of two the larger of two plausible masks, and the score alone gives
the largest mask wherever the model prefers it; the combination was the best, or within 0.002
of it, on every scene.
Repeating the second pass with the expected area taken from the masks it chose was measured
too: no better, so not done.

In both passes, a candidate that holds another point of the group is set aside unless every
candidate does (:func:`without_merges`): one click marks one object, so a mask around two
clicks covers two objects. (Those other points could instead be given to the model as negative
points in a second decoding; measured on touching objects, that did worse and decoded half the
points a second time: docs/accuracy.md.)

The quality checks that replace the original-shape gate of outlined annotations (a point has no
outline to compare with): a mask must contain the point (:mod:`sam2_refine.engine.location`), must not
cover more than :data:`MAX_FRAME_FRACTION` of the frame, and, where the group has an expected
area, must lie within ``[MIN_RATIO, MAX_RATIO]`` times it (:func:`area_problem`).

Areas are in frame pixels. Groups are any hashable key (the refine tags a point carries).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np

#: Points of one group needed for an expected area (the median of fewer is not a typical size).
MIN_GROUP = 3
#: A mask is of a plausible size within this factor of the expected area (either way).
PLAUSIBLE = 2.0
#: A mask may cover at most this share of the frame (a point marks one object among several).
MAX_FRAME_FRACTION = 0.05
#: Accepted range of a mask's area relative to its group's expected area.
MIN_RATIO, MAX_RATIO = 0.25, 3.0


def first_choice(areas: Sequence[float | None], scores: Sequence[float]) -> int | None:
    """The candidate with the best score among those with an area (None: no candidate).

    Args:
        areas: Area of each candidate in pixels, None where the candidate is unusable.
        scores: The model's score of each candidate.
    """
    usable = [k for k, area in enumerate(areas) if area is not None]
    if not usable:
        return None
    return max(usable, key=lambda k: (scores[k], -k))


def expected_areas(first_areas: Iterable[tuple[Hashable, float]], minimum: int = MIN_GROUP,
                   ) -> dict[Hashable, float]:
    """group -> median of its points' first-choice areas, for groups with >= ``minimum`` points.

    Args:
        first_areas: (group, area of that point's first choice) for every point that has one.
    """
    by_group: dict[Hashable, list[float]] = {}
    for group, area in first_areas:
        by_group.setdefault(group, []).append(float(area))
    return {group: float(np.median(values)) for group, values in by_group.items() if len(values) >= minimum}


def closest_choice(areas: Sequence[float | None], scores: Sequence[float], expected: float | None) -> int | None:
    """The candidate whose area is closest (as a ratio) to ``expected``; ties: the better score.
    Without ``expected``: :func:`first_choice`. (BIIGLE's second pass.)"""
    if expected is None or expected <= 0:
        return first_choice(areas, scores)
    usable = [k for k, area in enumerate(areas) if area is not None and area > 0]
    if not usable:
        return None
    return min(usable, key=lambda k: (abs(math.log(areas[k] / expected)), -scores[k], k))


def second_choice(areas: Sequence[float | None], scores: Sequence[float], expected: float | None) -> int | None:
    """The best-scored candidate of a plausible size (within :data:`PLAUSIBLE` of ``expected``);
    where none is, :func:`closest_choice`. Without ``expected``: :func:`first_choice`."""
    if expected is None or expected <= 0:
        return first_choice(areas, scores)
    plausible = [area if area is not None and expected / PLAUSIBLE <= area <= expected * PLAUSIBLE else None
                 for area in areas]
    if any(area is not None for area in plausible):
        return first_choice(plausible, scores)
    return closest_choice(areas, scores, expected)


def area_problem(area: float, expected: float | None, frame_area: float) -> str | None:
    """Why a point's chosen mask of ``area`` pixels is not used, or None when it passes."""
    if area > MAX_FRAME_FRACTION * frame_area:
        return f"the mask is far larger than an object marked by a point (over {MAX_FRAME_FRACTION:.0%} of the frame)"
    if expected is not None and not MIN_RATIO * expected <= area <= MAX_RATIO * expected:
        return (f"its mask's area is far from the typical area of the objects its tags mark here "
                f"(outside {MIN_RATIO:g}x to {MAX_RATIO:g}x the median)")
    return None


def without_merges(areas: Sequence[float | None], others: Sequence[int]) -> list[float | None]:
    """The areas of the candidates that hold no other point of the group (a mask around two
    clicks covers two objects); all of them where every usable candidate holds one."""
    alone = [area if count == 0 else None for area, count in zip(areas, others, strict=True)]
    return alone if any(area is not None for area in alone) else list(areas)


def choose_all(
    candidates: Mapping[str, tuple[Hashable, Sequence[float | None], Sequence[float]]],
    rule: str = "both",
    others: Mapping[str, Sequence[int]] | None = None,
) -> tuple[dict[str, int | None], dict[Hashable, float]]:
    """Both passes over the points of one location.

    Args:
        candidates: point id -> (group, candidate areas (None = unusable), candidate scores).
        rule: ``"both"`` (:func:`second_choice`), ``"area"`` (BIIGLE's :func:`closest_choice`)
            or ``"score"`` (every first choice kept: the model's score alone); the last two
            for measuring the rule against them. The expected areas are computed all the same.
        others: point id -> how many other points of its group each candidate holds; when
            given, candidates holding one are set aside (:func:`without_merges`) in both passes.

    Returns:
        (point id -> chosen candidate index or None, group -> expected area).
    """
    if others is not None:
        candidates = {pid: (group, without_merges(areas, others[pid]), scores)
                      for pid, (group, areas, scores) in candidates.items()}
    firsts = {pid: first_choice(areas, scores) for pid, (_, areas, scores) in candidates.items()}
    expected = expected_areas((candidates[pid][0], candidates[pid][1][k])
                              for pid, k in firsts.items() if k is not None)
    if rule == "score":
        return firsts, expected
    pick = closest_choice if rule == "area" else second_choice
    chosen = {pid: pick(areas, scores, expected.get(group))
              for pid, (group, areas, scores) in candidates.items()}
    return chosen, expected
