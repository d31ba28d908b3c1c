"""douglas_peucker and on_precision_grid: the faster steps of finishing an outline give what the
GEOS operations they stand in for give (the same shapes), and hand over to them where they must."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shapely.geometry import Polygon

from sam2_refine.engine.geometry import douglas_peucker, on_precision_grid, outline_from_logits

PROPS = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# A star-shaped ring whose plain Douglas-Peucker ring crosses itself at this tolerance (found by search).
CROSSING = Polygon([(-1.830116500416638, 9.326025466429867), (-2.270512017436066, 5.036681884793928),
                    (-2.4607959464129125, 4.635948649105158), (-1.323898237838277, -0.0808330960355228),
                    (-9.530481852028824, -1.5073742648551647), (-8.844301098801074, -1.625125129167015),
                    (-2.324993625345445, -7.51824983144503), (-0.2478901844084975, -1.5577143109802527),
                    (0.370323666410469, -9.631086098195427), (0.4229524705321676, -5.5739316869018865),
                    (1.071327362758412, -5.6306811423554475), (1.4419002467702977, -5.989400699941321),
                    (1.4447725313695265, -2.6860021287574614), (1.8970865402699177, -0.2211844911733229)])
CROSSING_TOLERANCE = 2.96971896648495
# A tiny polygon that rounding each coordinate to 0.01 leaves invalid (found by search).
ROUNDS_INVALID = Polygon([(0.0084060496877813, 0.0117816722021891), (0.0429712132285384, 0.0113656631225313),
                          (0.0491080716375374, 0.031712274822171), (0.031320869715531, 0.0380980507876516),
                          (0.0366449163666904, 0.0401720986707247), (0.0302412271858821, 0.0405195149492708)])


def traced(seed: int, size: int = 40, sigma: float = 3.0) -> Polygon:
    """An outline traced as the engine traces one: smooth random logits, largest component."""
    from scipy import ndimage

    from sam2_refine.engine.geometry import select_component

    rng = np.random.default_rng(seed)
    logits = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma) * 50 + 0.3
    component, _ = select_component(logits > 0, logits > 0)
    assert component is not None
    return Polygon(outline_from_logits(logits, component))


def clean(polygon: Polygon) -> Polygon:
    if not polygon.is_valid:
        polygon = max(getattr(shapely.make_valid(polygon), "geoms", [polygon]), key=lambda g: g.area)
    return Polygon(polygon.exterior)


@PROPS
@given(st.integers(0, 10_000), st.sampled_from([0.35, 0.7, 1.5, 3.0]))
def test_douglas_peucker_is_a_valid_simplification_of_the_outline(seed, tolerance):
    polygon = clean(traced(seed))
    got = douglas_peucker(polygon, tolerance)
    assert isinstance(got, Polygon) and got.is_valid and got.area > 0
    kept = {tuple(xy) for xy in np.asarray(got.exterior.coords)}
    assert kept <= {tuple(xy) for xy in np.asarray(polygon.exterior.coords)}  # only the outline's vertices
    assert len(kept) >= 3


@pytest.mark.parametrize("tolerance", [0.35, 0.5, 0.7])
def test_douglas_peucker_gives_the_topology_preserving_shape_at_usual_smoothing(tolerance):
    """At the default and tuned Smoothing values, on 300 irregular traced outlines (fixed seeds),
    the shape is the one GEOS's topology-preserving simplifier gives (its ring may start at
    another vertex). At larger tolerances that simplifier sometimes keeps a vertex where the
    plain shortcut passes near another part of the outline (1 % of such outlines at 3 px)."""
    for seed in range(300):
        polygon = clean(traced(seed))
        assert douglas_peucker(polygon, tolerance).equals(polygon.simplify(tolerance, preserve_topology=True)), seed


def test_douglas_peucker_keeps_topology_where_the_plain_ring_would_cross_itself():
    plain = Polygon(CROSSING.exterior.simplify(CROSSING_TOLERANCE, preserve_topology=False))
    assert not plain.is_valid  # the case this test is about
    got = douglas_peucker(CROSSING, CROSSING_TOLERANCE)
    assert got.is_valid
    assert got.equals_exact(CROSSING.simplify(CROSSING_TOLERANCE, preserve_topology=True), 0)


def test_douglas_peucker_leaves_polygons_with_holes_to_the_topology_preserving_simplifier():
    holed = Polygon([(0, 0), (20, 0), (20, 20), (0, 20)], [[(5, 5), (15, 5), (15, 15), (5, 15)]])
    got = douglas_peucker(holed, 1.0)
    assert len(got.interiors) == 1
    assert got.equals_exact(holed.simplify(1.0, preserve_topology=True), 0)


@PROPS
@given(st.integers(0, 10_000), st.floats(-2.0, 2.0))
def test_on_precision_grid_is_the_precision_overlay_shape_to_the_grid_step(seed, padding):
    polygon = traced(seed).buffer(padding, join_style="mitre", mitre_limit=2.0)
    if polygon.is_empty:
        return
    got = on_precision_grid(polygon)
    want = shapely.set_precision(polygon, 0.01)
    assert got.is_valid
    # the same shape but for what snapping moves: vertices by at most half a grid step, and a
    # vertex the overlay may drop where it lies within a step of an edge
    assert got.symmetric_difference(want).area <= 0.01 * want.length
    coords = shapely.get_coordinates(got)
    np.testing.assert_allclose(coords, np.round(coords, 2), atol=1e-9)  # on the 0.01 grid
    for part in getattr(got, "geoms", [got]):
        for ring in [part.exterior, *part.interiors]:
            xy = np.asarray(ring.coords)
            assert not (np.diff(xy, axis=0) == 0).all(axis=1).any()  # no repeated vertex


def test_on_precision_grid_hands_an_invalid_rounding_to_the_overlay():
    assert not shapely.set_precision(ROUNDS_INVALID, 0.01, mode="pointwise").is_valid  # the case
    got = on_precision_grid(ROUNDS_INVALID)
    assert got.is_valid
    assert got.equals_exact(shapely.set_precision(ROUNDS_INVALID, 0.01), 0)


@pytest.mark.parametrize("tolerance", [0.7, 3.0])
def test_douglas_peucker_of_a_ring_collapsing_to_a_line_is_what_geos_gives(tolerance):
    sliver = Polygon([(0, 0), (10, 0.1), (20, 0), (10, 0.2)])
    got = douglas_peucker(sliver, tolerance)
    assert got.equals_exact(sliver.simplify(tolerance, preserve_topology=True), 0)
