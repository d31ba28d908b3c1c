"""select(): tag filter, batch filter, grouping by location, duplicates, documents without id."""

from __future__ import annotations

from typing import Any

import pytest
from shapely.geometry import Point, Polygon

from sam2_refine.annotations import POINT, POLYGON, RECTANGLE, Original
from sam2_refine.job.selection import has_any_tag, select, to_original
from sam2_refine.annotations import Location

SQUARE = [{"x": 10.0, "y": 10.0}, {"x": 20.0, "y": 10.0}, {"x": 20.0, "y": 20.0}, {"x": 10.0, "y": 20.0}]
ALL = range(10)


def doc(ann_id: str | None, xy: Any = 0, z: Any = 0, time: Any = 0, tags: list[Any] | None = None,
        coordinates: Any = None, location: Any = "default") -> dict[str, Any]:
    out: dict[str, Any] = {
        "shape": "polygon",
        "tags": list(tags or []),
        "channel": 0,
        "location": {"XY": xy, "Z": z, "Time": time} if location == "default" else location,
        "coordinates": SQUARE if coordinates is None else coordinates,
    }
    if location is None:
        del out["location"]
    if ann_id is not None:
        out["_id"] = ann_id
    return out


def ids(selection: Any) -> dict[Location, list[str]]:
    return {loc: [o.id for o in originals] for loc, originals in selection.by_location.items()}


def all_ids(selection: Any) -> list[str]:
    return sorted(o.id for originals in selection.by_location.values() for o in originals)


def test_no_tags_selects_every_annotation() -> None:
    docs = [doc("a", tags=["x"]), doc("b"), doc("c", tags=["y", "z"])]
    selection = select(docs, [], ALL, ALL, ALL)
    assert all_ids(selection) == ["a", "b", "c"]
    assert selection.count == 3


def test_tag_filter_is_any_of() -> None:
    docs = [
        doc("a", tags=["nucleus"]),
        doc("b", tags=["cell"]),
        doc("c", tags=["nucleus", "cell"]),
        doc("d", tags=["other"]),
        doc("e"),
        doc("f", tags=["Nucleus"]),  # tags are case-sensitive
        doc("g", tags=[None, 3, "cell"]),  # non-string tags ignored
    ]
    selection = select(docs, ["nucleus", "cell"], ALL, ALL, ALL)
    assert all_ids(selection) == ["a", "b", "c", "g"]
    assert all_ids(select(docs, ["other"], ALL, ALL, ALL)) == ["d"]
    assert all_ids(select(docs, ["missing"], ALL, ALL, ALL)) == []


def test_has_any_tag() -> None:
    assert has_any_tag({"tags": ["a"]}, [])
    assert has_any_tag({}, [])
    assert has_any_tag({"tags": ["a", "b"]}, ["b"])
    assert not has_any_tag({"tags": ["a"]}, ["b"])
    assert not has_any_tag({"tags": "a"}, ["a"])  # tags not a list: no tags


def test_original_tags() -> None:
    selection = select([doc("a", tags=["t1", 5, "t2"])], [], ALL, ALL, ALL)
    (original,) = selection.by_location[Location(0, 0, 0)]
    assert original.tags == ("t1", "t2")


def test_batch_filter_on_every_axis() -> None:
    docs = [
        doc("in", xy=1, z=2, time=3),
        doc("xy-out", xy=0, z=2, time=3),
        doc("z-out", xy=1, z=0, time=3),
        doc("t-out", xy=1, z=2, time=0),
        doc("in2", xy=4, z=2, time=3),
    ]
    selection = select(docs, [], [1, 4], [2], [3])
    assert all_ids(selection) == ["in", "in2"]


def test_grouping_by_location_sorted() -> None:
    docs = [
        doc("t1", xy=1, z=0, time=1),
        doc("z1", xy=1, z=1, time=0),
        doc("xy0", xy=0, z=5, time=5),
        doc("t0", xy=1, z=0, time=0),
        doc("t0b", xy=1, z=0, time=0),
        doc("xy2", xy=2, z=0, time=0),
    ]
    selection = select(docs, [], ALL, ALL, ALL)
    assert list(selection.by_location) == [Location(0, 5, 5), Location(1, 0, 0), Location(1, 0, 1),
                                           Location(1, 1, 0), Location(2, 0, 0)]
    assert ids(selection)[Location(1, 0, 0)] == ["t0", "t0b"]  # order within a location kept
    assert selection.count == 6
    for loc, originals in selection.by_location.items():
        assert all(o.location == loc for o in originals)


def test_duplicate_ids_kept_once_and_reported() -> None:
    docs = [doc("a"), doc("b"), doc("a"), doc("c"), doc("a"), doc("b")]
    selection = select(docs, [], ALL, ALL, ALL)
    assert all_ids(selection) == ["a", "b", "c"]
    assert selection.duplicates == ("a", "a", "b")
    assert selection.count == 3


def test_no_duplicates_reported_when_none() -> None:
    assert select([doc("a"), doc("b")], [], ALL, ALL, ALL).duplicates == ()


def test_documents_without_id_counted() -> None:
    docs = [doc(None), doc("a"), doc(""), {**doc("x"), "_id": 17}, doc(None, tags=["skip"])]
    selection = select(docs, [], ALL, ALL, ALL)
    assert all_ids(selection) == ["a"]
    assert selection.without_id == 4
    # The tag filter comes first: an untagged document without id is not counted when filtering.
    assert select(docs, ["skip"], ALL, ALL, ALL).without_id == 1


def test_non_dict_documents_ignored() -> None:
    selection = select([None, "x", 3, doc("a")], [], ALL, ALL, ALL)  # type: ignore[list-item]
    assert all_ids(selection) == ["a"]
    assert selection.without_id == 0


@pytest.mark.parametrize("location", [{"XY": 1.5, "Z": 0, "Time": 0}, {"XY": "1", "Z": 0, "Time": 0},
                                      {"XY": 0, "Z": True, "Time": 0}, {"XY": 0, "Z": 0, "Time": None},
                                      "XY1", [0, 0, 0]])
def test_bad_location_gives_an_original_with_a_problem(location: Any) -> None:
    selection = select([doc("bad", location=location), doc("good")], [], ALL, ALL, ALL)
    assert all_ids(selection) == ["bad", "good"]
    bad = [o for originals in selection.by_location.values() for o in originals if o.id == "bad"][0]
    assert bad.problem is not None and "location" in bad.problem
    assert bad.shape is None
    good = selection.by_location[Location(0, 0, 0)]
    assert [o.id for o in good] == ["good"]
    assert good[0].problem is None


def test_float_whole_number_location_accepted() -> None:
    selection = select([doc("a", xy=2.0, z=1.0, time=0)], [], ALL, ALL, ALL)
    assert list(selection.by_location) == [Location(2, 1, 0)]


def test_missing_location_is_origin() -> None:
    selection = select([doc("a", location=None)], [], [0], [0], [0])
    assert ids(selection) == {Location(0, 0, 0): ["a"]}
    assert select([doc("a", location=None)], [], [1], [0], [0]).count == 0


def test_missing_location_keys_default_to_zero() -> None:
    selection = select([doc("a", location={"XY": 3})], [], ALL, ALL, ALL)
    assert ids(selection) == {Location(3, 0, 0): ["a"]}


def test_original_shape_and_doc() -> None:
    d = doc("a", xy=2, tags=["t"])
    original = to_original(d)
    assert isinstance(original, Original)
    assert original.id == "a"
    assert original.location == Location(2, 0, 0)
    assert original.problem is None
    assert isinstance(original.shape, Polygon)
    assert original.shape.area == pytest.approx(100.0)
    assert original.shape.bounds == (10.0, 10.0, 20.0, 20.0)
    assert original.doc is d


@pytest.mark.parametrize(
    ("coordinates", "reason"),
    [
        ([{"x": 0, "y": 0}, {"x": 1, "y": 1}], "fewer than 3"),
        ([{"x": 0, "y": 0}, {"x": 5, "y": 0}, {"x": 9, "y": 0}], "no area"),
        ([{"x": 0, "y": 0}, {"x": None, "y": 0}, {"x": 9, "y": 9}], "number"),
        ([{"x": 0, "y": 0}, {"x": float("nan"), "y": 0}, {"x": 9, "y": 9}], "non-finite"),
        ("not a list", "not a list"),
    ],
)
def test_unusable_coordinates_keep_the_annotation_with_a_problem(coordinates: Any, reason: str) -> None:
    selection = select([doc("a", coordinates=coordinates)], [], ALL, ALL, ALL)
    (original,) = selection.by_location[Location(0, 0, 0)]
    assert original.shape is None
    assert original.problem is not None and reason in original.problem


# -- points and rectangles (issue 13) -----------------------------------------------------------


def test_point_original() -> None:
    original = to_original({**doc("p", coordinates=[{"x": 12.5, "y": 7.0, "z": 0}]), "shape": "point"})
    assert original.kind == POINT and original.problem is None
    assert isinstance(original.shape, Point) and (original.shape.x, original.shape.y) == (12.5, 7.0)


def test_polygons_and_blobs_are_polygon_kind() -> None:
    assert to_original(doc("a")).kind == POLYGON
    assert to_original({**doc("b"), "shape": "blob"}).kind == POLYGON


@pytest.mark.parametrize(
    ("coordinates", "reason"),
    [
        ([{"x": 1, "y": 1}, {"x": 5, "y": 5}], "a point annotation with 2 different coordinates (one expected)"),
        ([], "the point has no coordinates"),
        ([{"x": None, "y": 1}], "not a number"),
        ("12,3", "not a list"),
    ],
)
def test_unusable_points_keep_a_reason(coordinates: Any, reason: str) -> None:
    original = to_original({**doc("p", coordinates=coordinates), "shape": "point"})
    assert original.kind == POINT and original.shape is None
    assert original.problem is not None and reason in original.problem


def test_a_point_repeated_is_one_point() -> None:
    original = to_original({**doc("p", coordinates=[{"x": 3, "y": 4}, {"x": 3, "y": 4}]), "shape": "point"})
    assert original.problem is None and (original.shape.x, original.shape.y) == (3.0, 4.0)


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [0, 2, 1, 3], [3, 1, 0, 2]])
def test_rectangle_corners_in_any_order(order: list[int]) -> None:
    corners = [SQUARE[i] for i in order]
    original = to_original({**doc("r", coordinates=corners), "shape": "rectangle"})
    assert original.kind == RECTANGLE and original.problem is None
    assert original.shape.area == pytest.approx(100.0) and original.shape.bounds == (10.0, 10.0, 20.0, 20.0)


def test_rotated_rectangle_is_its_hull() -> None:
    diamond = [{"x": 10, "y": 0}, {"x": 20, "y": 10}, {"x": 10, "y": 20}, {"x": 0, "y": 10}]
    original = to_original({**doc("r", coordinates=diamond), "shape": "rectangle"})
    assert original.shape.area == pytest.approx(200.0)  # the rotated square, not its 400 px box
    assert original.shape.bounds == (0.0, 0.0, 20.0, 20.0)


def test_two_corner_rectangle_is_an_upright_box() -> None:
    original = to_original({**doc("r", coordinates=[{"x": 20, "y": 5}, {"x": 10, "y": 15}]), "shape": "rectangle"})
    assert original.problem is None and original.shape.bounds == (10.0, 5.0, 20.0, 15.0)


@pytest.mark.parametrize("coordinates", [
    [{"x": 1, "y": 1}] * 4,
    [{"x": 0, "y": 0}, {"x": 5, "y": 0}, {"x": 9, "y": 0}, {"x": 2, "y": 0}],
    [{"x": 0, "y": 0}, {"x": 0, "y": 0}, {"x": 0, "y": 9}, {"x": 0, "y": 9}],
])
def test_zero_area_rectangle_keeps_a_reason(coordinates: Any) -> None:
    original = to_original({**doc("r", coordinates=coordinates), "shape": "rectangle"})
    assert original.kind == RECTANGLE and original.shape is None
    assert original.problem == "the rectangle encloses no area (its corners lie on a line)"
