"""The pure pieces of convergence (issue 11): reading marks, grouping refinements, the survivor
rule, and when the refinements are read again."""

from __future__ import annotations

import pytest

from sam2_refine.job.converge import RefinementWatch
from sam2_refine.job.markers import MARKER_KEY, Mark, marker, read_mark
from sam2_refine.job.refinements import RefinementIndex
from sam2_refine.annotations import Location

A, B, C = "a" * 24, "b" * 24, "c" * 24
HERE, THERE = Location(0, 0, 0), Location(1, 0, 0)


def test_a_mark_says_whether_its_job_deleted_originals() -> None:
    assert marker(A) == {"originalId": A}
    assert marker(A, delete_original=True) == {"originalId": A, "deleteOriginal": True}
    assert read_mark({MARKER_KEY: marker(A, True)}) == (Mark(A, True), None)
    assert read_mark({MARKER_KEY: {"originalId": A, "deleteOriginal": "yes"}}) == (Mark(A, False), None)


@pytest.mark.parametrize("mark, problem", [
    ({"originalId": 42}, "not a string"), ({"originalId": None}, "not a string"),
    ({}, "names no original"), ("x", "names no original"),
    ({"originalId": "not-an-id"}, "refers to nothing"), ({"originalId": A.upper()}, "refers to nothing"),
    ({"originalId": ""}, "refers to nothing"),
])
def test_unreadable_marks_are_neither_originals_nor_refinements(mark, problem) -> None:
    found, reason = read_mark({MARKER_KEY: mark})
    assert found is None and reason is not None and problem in reason


def test_no_mark_is_an_ordinary_annotation() -> None:
    assert read_mark({"shape": "polygon"}) == (None, None)


def test_the_smallest_id_survives_whatever_the_order_seen() -> None:
    for order in ([C, A, B], [B, C, A], [A, B, C]):
        index = RefinementIndex()
        for ref in order:
            index.add(ref, Mark("0" * 24), HERE)
        index.add(C, Mark("0" * 24), HERE)  # a listing may repeat an id: counted once
        assert index.survivor("0" * 24) == A
        assert [r.id for r in index.groups["0" * 24]] == [A, B, C]


def test_a_refinement_counts_only_at_its_originals_location() -> None:
    index = RefinementIndex()
    index.add(B, Mark(A), THERE)
    index.add(C, Mark(A), HERE)
    assert [r.id for r in index.for_original(A, HERE)] == [C]
    assert [r.id for r in index.misplaced({A: HERE})] == [B]
    assert index.for_original(B, HERE) == []


def test_rereads_stay_within_their_share_of_the_job() -> None:
    """Each location's re-read walks the dataset on the server: they are rationed to ``share`` of
    the job's time so far (plus a grace), and over a job each document is read once."""
    now = [0.0]
    hydrated: list[str] = []

    class Reader:
        scoped = True

        def at_location(self, location, tags, read_before):
            now[0] += 0.5  # a reading that takes 0.5 s
            doc = {"_id": B, MARKER_KEY: marker(A), "location": {"XY": 0, "Z": 0, "Time": 0}}
            fresh = [] if B in read_before else [doc]
            hydrated.extend(d["_id"] for d in fresh)
            return [B], fresh

    watch = RefinementWatch(Reader(), ("refined",), share=0.1, grace=0.0, clock=lambda: now[0])
    now[0] = 5.0  # 5 s into the job: 0.5 s of re-reads allowed
    assert watch.due()
    index = watch.read([HERE, THERE])  # the second location no longer fits: not read
    assert index is not None and index.survivor(A) == B and watch.spent == 0.5
    assert not watch.due()
    now[0] = 9.9
    assert not watch.due()
    now[0] = 10.1  # 1.0 s allowed: 0.5 spent + 0.5 for one more
    assert watch.due()
    again = watch.read([HERE])  # B is not read again, and still counts
    assert again is not None and again.survivor(A) == B
    assert hydrated == [B]
