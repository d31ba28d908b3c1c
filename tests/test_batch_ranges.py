"""Batch XY / Z / Time fields: parse_batch (syntax) and AxisSelection.resolve (against the dataset)."""

from __future__ import annotations

import pytest

from sam2_refine.job.batch_ranges import AxisSelection, BatchRangeError, parse_batch

FIELD = "Batch XY"


def positions(value: object, size: int = 20, current: int = 0) -> tuple[int, ...]:
    return parse_batch(FIELD, value).resolve(FIELD, size, current)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1-3, 5-8", (0, 1, 2, 4, 5, 6, 7)),
        ("1-3,5-8", (0, 1, 2, 4, 5, 6, 7)),
        ("1 - 3", (0, 1, 2)),
        ("  2  ,  4 ", (1, 3)),
        ("\t1-2 ,\n 7 ", (0, 1, 6)),
        ("1", (0,)),
        ("20", (19,)),
        ("4-4", (3,)),
        ("5-8, 1-3", (0, 1, 2, 4, 5, 6, 7)),  # sorted whatever the order given
        ("1-3, 2-4", (0, 1, 2, 3)),  # overlapping ranges merged
        ("3, 3, 3", (2,)),  # duplicates merged
        ("2, 1-3, 2", (0, 1, 2)),
    ],
)
def test_lists_are_one_based_inclusive_sorted_and_merged(text: str, expected: tuple[int, ...]) -> None:
    selection = parse_batch(FIELD, text)
    assert selection.kind == "list"
    assert selection.positions == expected
    assert selection.resolve(FIELD, 20, current=9) == expected


@pytest.mark.parametrize("text", ["all", "ALL", "All", "  all  "])
def test_all_is_every_position(text: str) -> None:
    selection = parse_batch(FIELD, text)
    assert selection.kind == "all"
    assert selection.resolve(FIELD, 5, current=3) == (0, 1, 2, 3, 4)
    assert selection.resolve(FIELD, 1, current=0) == (0,)


@pytest.mark.parametrize("value", [None, "", "   ", "\t\n"])
def test_blank_is_the_current_tile_position(value: object) -> None:
    selection = parse_batch(FIELD, value)
    assert selection.kind == "current"
    assert selection.resolve(FIELD, 10, current=4) == (4,)
    assert selection.resolve(FIELD, 10, current=0) == (0,)
    assert selection.resolve(FIELD, 10, current=9) == (9,)


def test_integer_value_is_one_based() -> None:
    selection = parse_batch(FIELD, 3)
    assert selection.kind == "list"
    assert selection.positions == (2,)
    assert selection.resolve(FIELD, 5, current=0) == (2,)
    assert positions(1) == (0,)


@pytest.mark.parametrize(
    "value",
    ["3-1", "x", "0", "-2", "1--3", "1,,2", "1-", ",", "1,", "1.5", "1-3-5", "0-2", "one", "a-b",
     "all, 1", True, False, [1], 1.0, {"a": 1}, 0, -3],
)
def test_malformed_values_raise_naming_the_field(value: object) -> None:
    with pytest.raises(BatchRangeError) as info:
        parse_batch("Batch Time", value)
    err = info.value
    assert err.field == "Batch Time"
    assert isinstance(err, ValueError)
    message = str(err)
    assert message.startswith("Batch Time: ")
    # The message says what is accepted.
    assert "all" in message
    assert "1-3, 5-8" in message
    assert "1-based" in message


def test_error_quotes_the_offending_item() -> None:
    with pytest.raises(BatchRangeError, match='"x"') as info:
        parse_batch("Batch Z", "1-2, x, 4")
    assert info.value.field == "Batch Z"
    with pytest.raises(BatchRangeError, match="ends before it starts"):
        parse_batch("Batch Z", "3-1")
    with pytest.raises(BatchRangeError, match="start at 1"):
        parse_batch("Batch Z", "0")


def test_absurdly_long_range_is_refused() -> None:
    with pytest.raises(BatchRangeError) as info:
        parse_batch(FIELD, "1-100000000")
    assert info.value.field == FIELD


def test_positions_beyond_the_size_raise_stating_the_size() -> None:
    selection = parse_batch(FIELD, "1-3, 7")
    assert selection.resolve(FIELD, 7, current=0) == (0, 1, 2, 6)
    with pytest.raises(BatchRangeError) as info:
        selection.resolve(FIELD, 6, current=0)
    err = info.value
    assert err.field == FIELD
    message = str(err)
    assert "6 positions" in message
    assert "1-6" in message
    assert "7" in message  # the 1-based position asked for


def test_beyond_size_one() -> None:
    with pytest.raises(BatchRangeError) as info:
        parse_batch("Batch Z", "2").resolve("Batch Z", 1, current=0)
    assert info.value.field == "Batch Z"
    assert "1 position " in str(info.value)


def test_blank_with_current_tile_beyond_size_raises() -> None:
    selection = parse_batch(FIELD, "")
    with pytest.raises(BatchRangeError) as info:
        selection.resolve(FIELD, 3, current=3)
    assert info.value.field == FIELD
    assert "current position" in str(info.value)
    assert "3 positions" in str(info.value)
    with pytest.raises(BatchRangeError):
        selection.resolve(FIELD, 3, current=-1)


def test_field_name_passed_to_resolve_is_used() -> None:
    with pytest.raises(BatchRangeError) as info:
        AxisSelection("list", (5,), "6").resolve("Batch Time", 2, current=0)
    assert info.value.field == "Batch Time"
    assert str(info.value).startswith("Batch Time: ")


def test_a_single_bad_item_is_quoted_once() -> None:
    """Issue 23: "first two" was reported as '"first two" in "first two" is not a position'."""
    with pytest.raises(BatchRangeError) as info:
        parse_batch("Batch XY", "first two")
    message = str(info.value)
    assert message.count('"first two"') == 1 and " in " not in message.split(";")[0]
    assert 'is not a position or a range; use comma-separated' in message
    with pytest.raises(BatchRangeError) as info:
        parse_batch("Batch XY", "1-2, x")
    assert '"x" (in "1-2, x") is not a position or a range' in str(info.value)


def test_a_value_of_another_type_is_described_in_words() -> None:
    with pytest.raises(BatchRangeError) as info:
        parse_batch("Batch Z", [1, 2])
    assert "expected text, got a list of 2 items" in str(info.value)
