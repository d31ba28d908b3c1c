"""Polygons, boxes and masks: pure functions, no I/O, no model.

Coordinates follow the NimbusImage annotation convention used by its other workers: full-frame
pixel coordinates, ``x`` = column, ``y`` = row, the centre of pixel (row r, column c) at
(x=c, y=r). A frame of W x H pixels therefore spans x in [-0.5, W - 0.5] and y in
[-0.5, H - 0.5]. Point arrays are (K, 2) float64 in (x, y) order; masks and logit arrays are
(rows, columns).

A rough annotation becomes a refined polygon in four steps (see :mod:`sam2_refine.engine.location`):
:func:`ring_from_coordinates` and :func:`polygon_from_ring` check and clean the original,
:func:`prompt_box` gives the box prompt, and after the model has spoken,
:func:`select_component`, :func:`outline_from_logits` and :func:`finish_polygon` turn its mask
into one clean polygon.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import cv2
import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, box as shapely_box
from shapely.geometry.base import BaseGeometry
from skimage.draw import polygon as draw_polygon
from skimage.measure import find_contours


class AnnotationProblem(ValueError):
    """Why an annotation cannot be refined (it is then kept unchanged). ``reason`` is for users."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Window:
    """A rectangle of whole pixels: rows ``top..bottom-1``, columns ``left..right-1``."""

    top: int
    left: int
    bottom: int
    right: int

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def area(self) -> int:
        return self.height * self.width

    def intersect(self, other: Window) -> Window:
        return Window(max(self.top, other.top), max(self.left, other.left),
                      min(self.bottom, other.bottom), min(self.right, other.right))

    def contains(self, other: Window) -> bool:
        return (self.top <= other.top and self.left <= other.left
                and other.bottom <= self.bottom and other.right <= self.right)

    @staticmethod
    def around(box: Sequence[float], margin: float, bounds: Window) -> Window:
        """The pixels whose centres lie within ``margin`` of ``box`` (x0, y0, x1, y1), clipped to ``bounds``."""
        x0, y0, x1, y1 = box
        win = Window(int(math.floor(y0 - margin + 0.5)), int(math.floor(x0 - margin + 0.5)),
                     int(math.floor(y1 + margin + 0.5)) + 1, int(math.floor(x1 + margin + 0.5)) + 1)
        return win.intersect(bounds)


def frame_window(width: int, height: int) -> Window:
    return Window(0, 0, height, width)


@lru_cache(maxsize=8)
def frame_polygon(width: int, height: int) -> Polygon:
    """The area a W x H frame covers, in annotation coordinates (shared: shapely geometries
    are immutable, and every object of a frame asks for it)."""
    return shapely_box(-0.5, -0.5, width - 0.5, height - 0.5)


# -- the original annotation ------------------------------------------------------------------

def coordinate_points(coordinates: Any) -> np.ndarray:
    """An annotation's ``coordinates`` as a (K, 2) float64 array of (x, y), every value checked.

    Raises:
        AnnotationProblem: not a list of points with finite numeric x and y.
    """
    if not isinstance(coordinates, list):
        raise AnnotationProblem("coordinates are missing or not a list")
    points = []
    for point in coordinates:
        if not isinstance(point, dict):
            raise AnnotationProblem("a coordinate is not an {x, y} object")
        x, y = point.get("x"), point.get("y")
        if isinstance(x, bool) or isinstance(y, bool) or not isinstance(x, (int, float)) \
                or not isinstance(y, (int, float)):
            raise AnnotationProblem("a coordinate is missing or not a number (non-finite values arrive as null)")
        if not (math.isfinite(x) and math.isfinite(y)):
            raise AnnotationProblem("non-finite coordinates")
        points.append((float(x), float(y)))
    return np.asarray(points, dtype=np.float64).reshape(-1, 2)


def ring_from_coordinates(coordinates: Any) -> np.ndarray:
    """An annotation's ``coordinates`` as a (K, 2) float64 array of (x, y), K >= 3.

    A closing point equal to the first is dropped, as are consecutive repeats.

    Raises:
        AnnotationProblem: not a list of points with finite numeric x and y, or fewer than
            3 distinct points.
    """
    ring = coordinate_points(coordinates)
    if len(ring) > 1:
        keep = np.ones(len(ring), dtype=bool)
        keep[1:] = np.any(ring[1:] != ring[:-1], axis=1)
        ring = ring[keep]
    if len(ring) > 1 and np.array_equal(ring[0], ring[-1]):
        ring = ring[:-1]
    if len(ring) < 3:
        raise AnnotationProblem(f"fewer than 3 points ({len(ring)})")
    return ring


def point_from_coordinates(coordinates: Any) -> np.ndarray:
    """A point annotation's position: float64 (2,) (x, y).

    Repeats of the same position count once.

    Raises:
        AnnotationProblem: bad coordinates, none, or several different positions (which one
            the user meant is unknown).
    """
    points = np.unique(coordinate_points(coordinates), axis=0)
    if len(points) == 0:
        raise AnnotationProblem("the point has no coordinates")
    if len(points) > 1:
        raise AnnotationProblem(f"a point annotation with {len(points)} different coordinates (one expected)")
    return points[0]


def rectangle_from_coordinates(coordinates: Any) -> Polygon:
    """The area a rectangle annotation covers: the convex hull of its corners.

    Corners may come in any order (the hull does not depend on it) and the rectangle may be
    rotated (the hull is the rotated rectangle; its box prompt is then the hull's bounding box,
    see :func:`prompt_box`). Two different corners are taken as opposite corners of an upright box.

    Raises:
        AnnotationProblem: bad coordinates, or no area (all corners on a line).
    """
    corners = np.unique(coordinate_points(coordinates), axis=0)
    if len(corners) == 2:
        (x0, y0), (x1, y1) = corners.min(axis=0), corners.max(axis=0)
        hull: BaseGeometry = shapely_box(x0, y0, x1, y1)
    else:
        hull = shapely.MultiPoint(corners).convex_hull if len(corners) else Polygon()
    if not isinstance(hull, Polygon) or hull.area <= 0:
        raise AnnotationProblem("the rectangle encloses no area (its corners lie on a line)")
    return hull


def point_in_frame(point: np.ndarray, width: int, height: int) -> None:
    """Check that a point lies on the frame (x in [-0.5, W - 0.5], y in [-0.5, H - 0.5]).

    Raises:
        AnnotationProblem: it does not.
    """
    x, y = float(point[0]), float(point[1])
    if not (-0.5 <= x <= width - 0.5 and -0.5 <= y <= height - 0.5):
        raise AnnotationProblem(f"it lies outside the {width}x{height} frame")


def largest_polygon(geometry: BaseGeometry) -> Polygon | None:
    """The largest-area polygon in ``geometry`` (None if it has none with positive area)."""
    parts = [g for g in getattr(geometry, "geoms", [geometry]) if isinstance(g, (Polygon, MultiPolygon))]
    polygons = [p for g in parts for p in getattr(g, "geoms", [g]) if isinstance(p, Polygon) and p.area > 0]
    if not polygons:
        return None
    return max(polygons, key=lambda p: p.area)


def polygon_from_ring(ring: np.ndarray) -> BaseGeometry:
    """The area an original annotation outlines, made valid.

    A self-intersecting ring (a bow tie, a loop) is repaired with ``shapely.make_valid``; all its
    polygonal parts are kept (they are all what the user drew).

    Raises:
        AnnotationProblem: the ring encloses no area (e.g. all points on a line), or cannot be
            made valid.
    """
    polygon = Polygon(ring)
    if not polygon.is_valid:
        try:
            polygon = shapely.make_valid(polygon)
        except shapely.errors.GEOSException:  # pragma: no cover - GEOS rarely refuses
            raise AnnotationProblem("the outline cannot be made a valid polygon") from None
        parts = [p for p in getattr(polygon, "geoms", [polygon]) if isinstance(p, (Polygon, MultiPolygon))]
        polygon = shapely.union_all(parts) if parts else Polygon()
    if polygon.is_empty or polygon.area <= 0:
        raise AnnotationProblem("the outline encloses no area (all points on a line)")
    return polygon


def prompt_box(shape: BaseGeometry, width: int, height: int) -> np.ndarray:
    """The box prompt of an original: the bounds of its part inside the frame.

    Returns:
        float64 array (x0, y0, x1, y1) in frame coordinates.

    Raises:
        AnnotationProblem: the box has no area, or the shape lies outside the frame.
    """
    x0, y0, x1, y1 = shape.bounds
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        raise AnnotationProblem("its box has zero area")
    within = x0 >= -0.5 and y0 >= -0.5 and x1 <= width - 0.5 and y1 <= height - 0.5
    inside = shape if within else shape.intersection(frame_polygon(width, height))
    if inside.is_empty or inside.area <= 0:
        raise AnnotationProblem(f"it lies outside the {width}x{height} frame")
    cx0, cy0, cx1, cy1 = inside.bounds
    if cx1 - cx0 < 1.0 or cy1 - cy0 < 1.0:
        raise AnnotationProblem(f"it lies outside the {width}x{height} frame (less than a pixel inside)")
    return np.array([cx0, cy0, cx1, cy1], dtype=np.float64)


def rasterize(shape: BaseGeometry, window: Window) -> np.ndarray:
    """Pixels of ``window`` whose centres ``shape`` covers (outer boundaries; holes ignored).

    Returns:
        bool array of shape (window.height, window.width).
    """
    mask = np.zeros((window.height, window.width), dtype=bool)
    for polygon in getattr(shape, "geoms", [shape]):
        if not isinstance(polygon, Polygon) or polygon.is_empty:
            continue
        xy = np.asarray(polygon.exterior.coords, dtype=np.float64)
        rows, cols = draw_polygon(xy[:, 1] - window.top, xy[:, 0] - window.left, mask.shape)
        mask[rows, cols] = True
    return mask


def rasterize_rough(shape: BaseGeometry, window: Window) -> np.ndarray:
    """Like :func:`rasterize`, an order of magnitude faster on large shapes, but generous at the
    boundary: OpenCV's scan conversion also takes pixels the outline merely touches. For
    choosing among mask components, not for measuring.

    Returns:
        bool array of shape (window.height, window.width).
    """
    mask = np.zeros((window.height, window.width), dtype=np.uint8)
    rings = []
    for polygon in getattr(shape, "geoms", [shape]):
        if isinstance(polygon, Polygon) and not polygon.is_empty:
            xy = np.asarray(polygon.exterior.coords, dtype=np.float64) - (window.left, window.top)
            rings.append(np.round(np.clip(xy, -1e6, 1e6) * 16).astype(np.int32).reshape(-1, 1, 2))
    if rings:
        cv2.fillPoly(mask, rings, 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


# -- the model's mask -------------------------------------------------------------------------

def select_component(mask: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray | None, int]:
    """The 8-connected component of ``mask`` that overlaps ``reference`` most.

    Ties go to the larger component. A mask that does not touch the reference at all gives None:
    the model found something else than the object the user outlined.

    Args:
        mask: bool (rows, columns), the model's mask.
        reference: bool (rows, columns), the original annotation rasterised on the same pixels.

    Returns:
        (component as a bool array of the same shape or None, its overlap in pixels).
    """
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return None, 0
    overlap = np.bincount(labels[reference], minlength=count)
    overlap[0] = 0
    best_overlap = int(overlap.max())
    if best_overlap == 0:
        return None, 0
    candidates = np.flatnonzero(overlap == best_overlap)
    best = int(candidates[np.argmax(stats[candidates, cv2.CC_STAT_AREA])])
    return labels == best, best_overlap


def point_component(mask: np.ndarray, row: int, col: int, reach: int = 2) -> np.ndarray | None:
    """The 8-connected component of ``mask`` that holds pixel (row, col), else the one nearest
    to it within ``reach`` pixels (the nearest pixel by Euclidean distance; None if none).

    Args:
        mask: bool (rows, columns).
        row, col: The point's pixel (may lie outside the array).

    Returns:
        bool array of the same shape, or None.
    """
    height, width = mask.shape
    r0, r1 = max(row - reach, 0), min(row + reach + 1, height)
    c0, c1 = max(col - reach, 0), min(col + reach + 1, width)
    if r0 >= r1 or c0 >= c1 or not mask[r0:r1, c0:c1].any():
        return None
    _, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    near = labels[r0:r1, c0:c1]
    rows, cols = np.nonzero(near)
    nearest = int(np.argmin((rows + r0 - row) ** 2 + (cols + c0 - col) ** 2))
    return labels == near[rows[nearest], cols[nearest]]


def fill_holes(component: np.ndarray) -> np.ndarray:
    """``component`` with every hole filled (bool, same shape)."""
    contours, _ = cv2.findContours(component.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros(component.shape, dtype=np.uint8)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled.astype(bool) | component


def touches_edges(component: np.ndarray) -> tuple[bool, bool, bool, bool]:
    """Whether ``component`` reaches the (top, left, bottom, right) edge of its array."""
    return (bool(component[0].any()), bool(component[:, 0].any()),
            bool(component[-1].any()), bool(component[:, -1].any()))


def outline_from_logits(logits: np.ndarray, component: np.ndarray) -> np.ndarray:
    """The outer boundary of one mask component, at the sub-pixel zero crossing of its logits.

    Marching squares (``skimage.measure.find_contours`` at level 0) on the logits, with pixels of
    other components pushed below zero and the component's holes pushed above it, so exactly one
    outline comes back and it follows the logits where the component meets the background.
    Diagonal-only contacts count as connected, as in :func:`select_component`.

    Args:
        logits: float (rows, columns), positive inside the mask.
        component: bool (rows, columns), one component of ``logits > 0``.

    Returns:
        float64 (K, 2) outline in (x, y) = (column, row) of the arrays, not closed; K >= 3 unless
        the component is degenerate (then fewer points come back).
    """
    # Only the component's bounding box (and one cell around it) is traced: outside it the
    # field below is negative everywhere, so the outline is the same.
    rows = np.flatnonzero(component.any(axis=1))
    cols = np.flatnonzero(component.any(axis=0))
    if rows.size == 0:
        return np.zeros((0, 2))
    top, left = max(int(rows[0]) - 1, 0), max(int(cols[0]) - 1, 0)
    bottom, right = int(rows[-1]) + 2, int(cols[-1]) + 2
    filled = fill_holes(component[top:bottom, left:right])
    magnitude = np.maximum(np.abs(logits[top:bottom, left:right].astype(np.float32)), np.float32(1e-3))
    field = np.full((filled.shape[0] + 2, filled.shape[1] + 2), -1.0, dtype=np.float32)  # a border of -1
    field[1:-1, 1:-1] = np.where(filled, magnitude, -magnitude)
    contours = find_contours(field, 0.0, fully_connected="high")
    if not contours:
        return np.zeros((0, 2))
    best = contours[0] if len(contours) == 1 else max(contours, key=lambda c: abs(_ring_area(c)))
    # (row, col) of the padded crop -> (x, y) of the window
    xy = best[:, ::-1] - 1.0 + (left, top)
    if len(xy) > 1 and _same_point(xy[0], xy[-1]):
        xy = xy[:-1]
    return xy


def _same_point(a: np.ndarray, b: np.ndarray) -> bool:
    """``np.allclose(a, b)`` for two finite (x, y) points, without its per-call cost."""
    return all(abs(u - v) <= 1e-8 + 1e-5 * abs(v) for u, v in zip(a.tolist(), b.tolist(), strict=True))


def _ring_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def finish_polygon(outline: np.ndarray, smoothing: float, padding: float, frame: Polygon) -> Polygon:
    """One clean polygon from a mask outline: simplified, padded, without holes, in the frame.

    Args:
        outline: (K, 2) (x, y) in frame coordinates.
        smoothing: Simplification tolerance in pixels (Douglas-Peucker, topology kept); 0 = none.
        padding: Buffer distance in pixels; negative shrinks.
        frame: The frame's area (:func:`frame_polygon`); the result is clipped to it.

    Raises:
        AnnotationProblem: nothing valid with area and 3 vertices is left.
    """
    if len(outline) < 3:
        raise AnnotationProblem("empty mask")
    polygon: BaseGeometry = Polygon(outline)
    if not polygon.is_valid:
        polygon = shapely.make_valid(polygon)
    polygon = largest_polygon(polygon)
    if polygon is None:
        raise AnnotationProblem("the mask outline cannot be made a valid polygon")
    polygon = Polygon(polygon.exterior)
    if smoothing > 0:
        polygon = simplify_keeping_area(polygon, smoothing)
    if padding != 0:
        polygon = polygon.buffer(padding)
    if not frame.contains(polygon):  # clip only what crosses the frame's edge
        polygon = polygon.intersection(frame)
    polygon = largest_polygon(on_precision_grid(polygon))
    if polygon is None:
        reason = f"padding {padding:g} leaves no shape" if padding < 0 else "the refined shape has no area"
        raise AnnotationProblem(reason)
    polygon = Polygon(polygon.exterior)
    if len(polygon.exterior.coords) - 1 < 3 or not polygon.is_valid:
        raise AnnotationProblem("the refined shape cannot be made a valid polygon")
    return polygon


#: How much a simplified outline may differ from the outline, per pixel of tolerance: it must
#: overlap it with IoU >= 1 - SHAPE_CHANGE_PER_PIXEL * tolerance (0.985 at the default 0.7 px,
#: 0.936 at the maximum 3 px).
SHAPE_CHANGE_PER_PIXEL = 0.0215


def simplify_keeping_area(polygon: Polygon, tolerance: float) -> Polygon:
    """Douglas-Peucker simplification (topology kept) without its inward bias, scaled to the object.

    Plain Douglas-Peucker keeps vertices on the outline and replaces the arcs between them by
    chords, so a convex object loses area (a 15 px disk about 5 %). The simplified polygon is
    therefore offset (mitre joins: no new vertices) by the area it lost divided by its
    perimeter, at most ``tolerance``.

    ``tolerance`` (the Smoothing field) is the largest tolerance used. On a small object it can
    change the shape far more than on a large one (a 16 px disk at 0.7 px becomes an octagon,
    IoU 0.94 with its mask), so the tolerance is halved until the simplified polygon overlaps
    the outline with IoU >= ``1 - SHAPE_CHANGE_PER_PIXEL * tolerance`` (at most 6 times; the
    outline itself is returned if none does). Large objects get the full tolerance; a larger
    Smoothing still simplifies more.
    """
    min_iou = 1.0 - SHAPE_CHANGE_PER_PIXEL * tolerance
    attempt = tolerance
    for _ in range(6):
        candidate = _simplify_once(polygon, attempt)
        if candidate.is_valid and not candidate.is_empty:
            # IoU from one overlay: |A ^ B| = |A| + |B| - 2 |A & B|.
            total = candidate.area + polygon.area
            apart = candidate.symmetric_difference(polygon).area
            if total > apart and (total - apart) / (total + apart) >= min_iou:
                return candidate
        attempt /= 2.0
    return polygon


def douglas_peucker(polygon: Polygon, tolerance: float) -> Polygon:
    """Douglas-Peucker simplification of a polygon without holes, its topology kept.

    The exterior ring is simplified by plain Douglas-Peucker; only where that ring crosses
    itself or collapses does GEOS's topology-preserving simplifier run, which keeps the
    vertices that prevent it. The plain ring costs a fraction of the topology-preserving one and
    gives the same shape (the ring may start at another vertex) at the usual tolerances; at
    larger ones it may differ where the topology-preserving simplifier keeps a vertex because
    the shortcut passes near another part of the outline (both results valid; the caller's shape
    check, :func:`simplify_keeping_area`, bounds what either may change). The figures:
    docs/performance.md, "Finishing outlines". A
    polygon with holes goes to the topology-preserving simplifier.
    """
    if not polygon.interiors:
        ring = polygon.exterior.simplify(tolerance, preserve_topology=False)
        if len(ring.coords) >= 4:
            simplified = Polygon(ring)
            if simplified.is_valid:
                return simplified
    return polygon.simplify(tolerance, preserve_topology=True)


#: Coordinates are kept to this grid (pixels): annotations are uploaded with two decimals.
PRECISION_GRID = 0.01


def on_precision_grid(geometry: BaseGeometry) -> BaseGeometry:
    """``geometry`` with its coordinates rounded to :data:`PRECISION_GRID`, valid.

    Each coordinate is rounded and the vertices that then repeat are dropped, at an eighth of the
    cost of GEOS's precision-aware overlay (``shapely.set_precision``: 5 us against 42 us per
    outline here); only a geometry that rounding leaves invalid (an edge made to touch another)
    goes through the overlay. Where the rounded geometry is valid the two give the same shape,
    but that the overlay also drops a vertex lying within a grid step of an edge: on 2400
    irregular outlines 1 % differed, by at most 4e-5 px^2 per pixel of outline.
    """
    rounded = shapely.set_precision(geometry, PRECISION_GRID, mode="pointwise")
    if rounded.is_valid:
        return shapely.remove_repeated_points(rounded)
    return shapely.set_precision(geometry, PRECISION_GRID)


def _simplify_once(polygon: Polygon, tolerance: float) -> Polygon:
    simplified = douglas_peucker(polygon, tolerance)
    if simplified.is_empty or simplified.length == 0:
        return simplified
    offset = (polygon.area - simplified.area) / simplified.length
    offset = max(-tolerance, min(tolerance, offset))
    if abs(offset) < 1e-9:
        return simplified
    adjusted = simplified.buffer(offset, join_style="mitre", mitre_limit=2.0)
    return adjusted if isinstance(adjusted, Polygon) and not adjusted.is_empty else simplified


def polygon_coordinates(polygon: Polygon) -> list[dict[str, float]]:
    """Annotation ``coordinates`` of a polygon: its exterior ring, without the closing point."""
    xy = np.asarray(polygon.exterior.coords)[:-1]
    return [{"x": round(float(x), 2), "y": round(float(y), 2)} for x, y in xy]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks of the same shape (0 when both are empty)."""
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b)) / union if union else 0.0
