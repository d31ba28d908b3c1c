"""Property tests of the mask -> polygon path (hypothesis; modest example counts)."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from shapely.geometry import Point, Polygon, box as shapely_box

from sam2_refine.engine.geometry import (
    AnnotationProblem,
    frame_polygon,
    frame_window,
    mask_iou,
    polygon_from_ring,
    prompt_box,
    rasterize,
    simplify_keeping_area,
)
from sam2_refine.engine.options import GeometryOptions
from sam2_refine.engine.location import refine_location
from sam2_refine.annotations import Kept, Refined
from sam2_refine.job.selection import to_original
from sam2_refine.testing.datasets import annotation_doc, outline, rough_polygon
from sam2_refine.testing.stand_in import KnownMaskPredictor

SIZE = 96
FRAME = (SIZE, SIZE)
PROPS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def blobs(draw: st.DrawFn) -> np.ndarray:
    """A connected union of 1-4 rectangles / ellipses, each at least 6 px across, all covering one point.

    Each part is convex and contains the common point, so the union is connected and has no hole.
    """
    cx = draw(st.integers(30, SIZE - 31))
    cy = draw(st.integers(30, SIZE - 31))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    mask = np.zeros(FRAME, dtype=bool)
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            w = draw(st.integers(6, 28))
            h = draw(st.integers(6, 28))
            x0 = cx - draw(st.integers(1, w - 2))
            y0 = cy - draw(st.integers(1, h - 2))
            mask |= (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
        else:
            a = draw(st.floats(3.0, 14.0))
            b = draw(st.floats(3.0, 14.0))
            angle = math.radians(draw(st.floats(0, 180)))
            ox = draw(st.floats(-0.6, 0.6)) * a
            oy = draw(st.floats(-0.6, 0.6)) * b
            ex, ey = cx + ox * math.cos(angle) - oy * math.sin(angle), cy + ox * math.sin(angle) + oy * math.cos(angle)
            u = (xx - ex) * math.cos(angle) + (yy - ey) * math.sin(angle)
            v = -(xx - ex) * math.sin(angle) + (yy - ey) * math.cos(angle)
            mask |= (u / a) ** 2 + (v / b) ** 2 <= 1
    mask[cy, cx] = True
    return mask


def refine_one(mask: np.ndarray, smoothing: float, padding: float = 0.0) -> Refined | Kept:
    img = np.zeros(FRAME + (3,), np.float32)
    img[mask] = 1.0
    doc = annotation_doc(rough_polygon(mask, "box", None))
    doc["_id"] = "a"
    (outcome,) = refine_location(KnownMaskPredictor(), img, [to_original(doc)],
                                 GeometryOptions(smoothing=smoothing, padding=padding))
    return outcome


@PROPS
@given(blobs())
def test_mask_polygon_mask_round_trip(mask: np.ndarray) -> None:
    outcome = refine_one(mask, smoothing=0)
    assert isinstance(outcome, Refined), outcome
    polygon = outcome.polygon
    assert polygon.is_valid and len(polygon.interiors) == 0
    assert mask_iou(rasterize(polygon, frame_window(SIZE, SIZE)), mask) >= 0.9


@PROPS
@given(blobs(), st.lists(st.integers(-20, 20), min_size=2, max_size=4, unique=True))
def test_padding_is_monotone_in_area(mask: np.ndarray, paddings: list[int]) -> None:
    areas = []
    for padding in sorted(paddings):
        outcome = refine_one(mask, smoothing=0.7, padding=padding)
        if isinstance(outcome, Kept):
            assert padding < 0 and "padding" in outcome.reason, outcome
            areas.append(0.0)
        else:
            assert outcome.polygon.is_valid and len(outcome.polygon.interiors) == 0
            areas.append(outcome.polygon.area)
    for smaller, larger in zip(areas, areas[1:]):
        assert smaller <= larger + 0.05, areas


@st.composite
def star_polygons(draw: st.DrawFn) -> np.ndarray:
    """A simple star-shaped ring (angles sorted) of 3-12 points, anywhere near a 120 x 80 frame."""
    n = draw(st.integers(3, 12))
    cx = draw(st.floats(-30, 150))
    cy = draw(st.floats(-30, 110))
    angles = sorted(draw(st.lists(st.floats(0, 2 * math.pi, exclude_max=True), min_size=n, max_size=n,
                                  unique=True)))
    radii = draw(st.lists(st.floats(1.0, 40.0), min_size=n, max_size=n))
    return np.array([(cx + r * math.cos(t), cy + r * math.sin(t)) for t, r in zip(angles, radii)])


@PROPS
@given(star_polygons())
def test_prompt_box_contains_the_polygon(ring: np.ndarray) -> None:
    width, height = 120, 80
    try:
        shape = polygon_from_ring(ring)
    except AnnotationProblem:
        assume(False)
        return
    try:
        x0, y0, x1, y1 = prompt_box(shape, width, height)
    except AnnotationProblem as exc:
        # Only refused when (almost) nothing of it is in the frame.
        inside = shape.intersection(frame_polygon(width, height))
        bx0, by0, bx1, by1 = inside.bounds if not inside.is_empty else (0, 0, 0, 0)
        assert inside.is_empty or bx1 - bx0 < 1.0 + 1e-9 or by1 - by0 < 1.0 + 1e-9, exc.reason
        return
    assert -0.5 <= x0 < x1 <= width - 0.5 and -0.5 <= y0 < y1 <= height - 0.5
    prompt = shapely_box(x0, y0, x1, y1)
    in_frame = shape.intersection(frame_polygon(width, height))
    # (The box is the shape's bounds clipped to the frame, so it may be looser than the in-frame part.)
    assert in_frame.is_empty or prompt.buffer(1e-9).contains(in_frame)
    if frame_polygon(width, height).contains(shape):
        assert (x0, y0, x1, y1) == shape.bounds  # tight: nothing clipped, nothing added


@PROPS
@given(blobs(), st.floats(0.02, 0.15))
def test_simplify_keeping_area(mask: np.ndarray, relative: float) -> None:
    """Area within 2 % and every vertex within the tolerance, for tolerances up to 0.15 x sqrt(area).

    (Much larger tolerances on tiny shapes, e.g. 3 px on a 6 px blob, can change the area by
    15-20 % and put a vertex slightly more than the tolerance away.)
    """
    original = Polygon(outline(mask))
    assume(original.is_valid)
    tolerance = min(3.0, max(0.3, relative * math.sqrt(original.area)))
    assume(tolerance <= 0.15 * math.sqrt(original.area))
    simplified = simplify_keeping_area(original, tolerance)
    assert isinstance(simplified, Polygon) and simplified.is_valid
    assert len(simplified.exterior.coords) <= len(original.exterior.coords)
    assert abs(simplified.area - original.area) <= 0.02 * original.area
    boundary = original.exterior
    worst = max(boundary.distance(Point(p)) for p in simplified.exterior.coords)
    assert worst <= tolerance + 1e-6, (worst, tolerance)
    # Simplification does simplify (outlines of >= 6 px blobs have many collinear staircase points).
    assert len(simplified.exterior.coords) < len(original.exterior.coords)


@PROPS
@given(blobs(), st.floats(0.3, 3.0))
def test_simplify_keeping_area_stays_near_the_outline_at_any_tolerance(mask: np.ndarray, tolerance: float) -> None:
    original = Polygon(outline(mask))
    assume(original.is_valid)
    simplified = simplify_keeping_area(original, tolerance)
    assert simplified.is_valid and not simplified.is_empty
    # Hausdorff distance: nothing strays far from the outline, whatever the shape's size.
    assert simplified.exterior.hausdorff_distance(original.exterior) <= 1.5 * tolerance + 1e-6
