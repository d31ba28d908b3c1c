"""Property tests of the Batch XY / Z / Time fields (sam2_refine.job.batch_ranges).

- any list of 1-based positions and ranges, rendered as text the way a user types it, parses
  back to exactly those 0-based positions;
- any text either parses or raises BatchRangeError, never another exception;
- "all" (any case, any surrounding blanks) and blank / None have their documented meaning;
- resolve() never returns a position outside the axis.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sam2_refine.job.batch_ranges import AxisSelection, BatchRangeError, parse_batch

FIELD = "Batch XY"
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

position = st.integers(min_value=1, max_value=5000)
item = st.one_of(
    position.map(lambda p: (p, p)),
    st.tuples(position, st.integers(min_value=0, max_value=300)).map(lambda t: (t[0], t[0] + t[1])),
)
blank = st.sampled_from(["", " ", "  ", "\t"])


def render(items: list[tuple[int, int]], spaces: list[tuple[str, str, str]]) -> str:
    parts = []
    for (start, end), (before, mid, after) in zip(items, spaces):
        body = str(start) if start == end and not mid else f"{start}{mid}-{mid}{end}"
        parts.append(f"{before}{body}{after}")
    return ",".join(parts)


@FAST
@given(st.lists(item, min_size=1, max_size=12).flatmap(
    lambda items: st.tuples(st.just(items), st.lists(st.tuples(blank, blank, blank), min_size=len(items),
                                                     max_size=len(items)))))
def test_rendered_positions_parse_back_exactly(case):
    items, spaces = case
    text = render(items, spaces)
    parsed = parse_batch(FIELD, text)
    expected = sorted({p - 1 for start, end in items for p in range(start, end + 1)})
    assert parsed.kind == "list"
    assert list(parsed.positions) == expected
    assert parsed.text == text.strip()


@FAST
@given(st.lists(position, min_size=1, max_size=20, unique=True))
def test_shuffled_single_positions(positions):
    parsed = parse_batch(FIELD, ", ".join(map(str, positions)))
    assert parsed.positions == tuple(sorted(p - 1 for p in positions))


ALPHABET = string.digits + " ,-\t" + "aAlL" + "+.–_/"


@FAST
@given(st.one_of(st.text(alphabet=ALPHABET, max_size=40), st.text(max_size=40)))
@example("1--3")
@example("-1")
@example("0")
@example(",")
@example("1,,2")
@example("3-1")
@example("1-3-5")
@example("1.5")
@example("ALL ")
@example("all, 1")
@example("\u0661-\u0663")  # Arabic-Indic digits: \d matches them and int() reads them
@example("1" * 5000)  # int() refuses over 4300 digits: must still be a BatchRangeError
@example(",".join(f"{k * 999_999 + 1}-{(k + 1) * 999_999}" for k in range(3)))
def test_any_text_parses_or_raises_batch_range_error(text):
    try:
        parsed = parse_batch(FIELD, text)
    except BatchRangeError as exc:
        assert exc.field == FIELD and str(exc).startswith(f"{FIELD}: ")
        return
    assert parsed.kind in ("all", "current", "list")
    if parsed.kind == "list":
        assert parsed.positions and all(p >= 0 for p in parsed.positions)
        assert list(parsed.positions) == sorted(set(parsed.positions))


@FAST
@given(st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
def test_any_json_value_parses_or_raises_batch_range_error(value):
    try:
        parsed = parse_batch(FIELD, value)
    except BatchRangeError:
        return
    assert isinstance(value, int) and not isinstance(value, bool) and value >= 1 or value is None
    if value is None:
        assert parsed.kind == "current"
    else:
        assert parsed.positions == (value - 1,)


@FAST
@given(blank, blank, st.sampled_from(["all", "ALL", "All", "aLl"]))
def test_all_in_any_case_and_blanks(before, after, word):
    assert parse_batch(FIELD, f"{before}{word}{after}").kind == "all"


@FAST
@given(st.one_of(st.none(), blank, st.text(alphabet=" \t\n", max_size=5)))
def test_blank_means_the_current_position(value):
    parsed = parse_batch(FIELD, value)
    assert parsed.kind == "current"
    assert parsed.resolve(FIELD, size=4, current=2) == (2,)


@FAST
@given(st.text(alphabet=ALPHABET, max_size=30), st.integers(1, 60), st.integers(0, 80))
def test_resolve_never_returns_positions_outside_the_axis(text, size, current):
    try:
        parsed = parse_batch(FIELD, text)
    except BatchRangeError:
        return
    try:
        resolved = parsed.resolve(FIELD, size, current)
    except BatchRangeError as exc:
        assert f"{size} position" in str(exc)  # the message states the axis size
        assert parsed.kind != "all"
        return
    assert resolved and all(0 <= p < size for p in resolved)
    if parsed.kind == "all":
        assert resolved == tuple(range(size))
    elif parsed.kind == "current":
        assert resolved == (current,)
    else:
        assert resolved == parsed.positions


@FAST
@given(st.integers(1, 50), st.integers(0, 49))
def test_all_resolves_to_every_position_and_current_only_if_it_exists(size, current):
    assert AxisSelection("all").resolve(FIELD, size, current) == tuple(range(size))
    current_sel = AxisSelection("current")
    if current < size:
        assert current_sel.resolve(FIELD, size, current) == (current,)
    else:
        with pytest.raises(BatchRangeError):
            current_sel.resolve(FIELD, size, current)
