"""Touching objects kept apart: every contested pixel goes to one object only. Pure functions.

Each object of a location *claims* pixels with a field over its own window of the frame: a
float32 array, positive where the object's mask (its chosen component, holes filled) is, and
negative elsewhere; its magnitude is the model's confidence there (``|logit|``). Two objects
compete where both fields are positive. For object ``a`` and each neighbour ``b`` (same group,
windows meeting), the competitor value is

    c_ab = f_b - tau * s_ab   where f_b > 0 (else nothing),

with ``s_ab`` in [-1, 1] the *nearer-original* term: ``clip(d_b - d_a, -1, 1)`` where ``d_a``,
``d_b`` are the pixel's distances (in pixels) to the objects' anchors (their original's centroid,
or the point). Then

    f'_a = f_a - max(0, max_b c_ab)        (= min(f_a, f_a - max_b c_ab)).

Where only ``a`` claims a pixel nothing changes. Where ``a`` and ``b`` both do, ``f'_a = f_a - f_b
+ tau s_ab`` and ``f'_b = -f'_a``: exactly one of them keeps the pixel, the one with the higher
logit, and on the sub-pixel line where the logits tie the traced outlines of both meet (marching
squares interpolates ``f'_a`` and ``f'_b = -f'_a`` to the same zero crossing). Where the logits
tie exactly (saturated logits, flat stand-in masks), ``tau s_ab`` decides: the nearer original
wins. With several competitors, the highest logit wins. ``tau`` (:data:`TIE`) is below the
magnitude floor of the tracing (1e-3), so it never overrides a real difference of logits.

Padding comes after tracing; with a positive Padding, :func:`keep_padded_apart` lets each
outline grow only into pixels that no neighbour's unpadded outline covers.

Cost: each object is compared only with the objects whose windows meet its own (a sweep over
the windows' columns), on the intersection of the two windows; no array larger than an
object's window is made. Coordinates: windows are :class:`~sam2_refine.engine.geometry.Window` in frame
pixels (rows = y, columns = x); anchors are (x, y).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from sam2_refine.engine.geometry import Window, largest_polygon, on_precision_grid

#: Weight of the nearer-original term: decides exact ties of the logits only.
TIE = 1e-4


@dataclass(frozen=True)
class Claim:
    """The pixels one object claims.

    Attributes:
        window: The frame pixels ``field`` covers.
        field: float32 (window.height, window.width): > 0 where the object is, < 0 elsewhere,
            ``|field|`` the model's confidence.
        anchor: (x, y) frame coordinates of the object's original (centroid, or the point).
        group: Only claims of the same group compete (objects with different tags may nest).
    """

    window: Window
    field: np.ndarray
    anchor: tuple[float, float]
    group: Hashable


def neighbour_pairs(claims: Sequence[Claim]) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of claims of the same group whose windows share a pixel.

    A sweep over the windows sorted by their left column: O(N log N + pairs) for objects
    spread over the frame.
    """
    order = sorted(range(len(claims)), key=lambda k: claims[k].window.left)
    active: list[int] = []
    pairs = []
    for k in order:
        win = claims[k].window
        active = [a for a in active if claims[a].window.right > win.left]
        for a in active:
            other = claims[a].window
            if (claims[a].group == claims[k].group and other.top < win.bottom and win.top < other.bottom):
                pairs.append((min(a, k), max(a, k)))
        active.append(k)
    return sorted(pairs)


def _distances(window: Window, anchor: tuple[float, float]) -> np.ndarray:
    rows = np.arange(window.top, window.bottom, dtype=np.float32)[:, None] - np.float32(anchor[1])
    cols = np.arange(window.left, window.right, dtype=np.float32)[None, :] - np.float32(anchor[0])
    return np.sqrt(rows * rows + cols * cols)


def _local(window: Window, part: Window) -> tuple[slice, slice]:
    return (slice(part.top - window.top, part.bottom - window.top),
            slice(part.left - window.left, part.right - window.left))


def separate(claims: Sequence[Claim], tie: float = TIE) -> list[np.ndarray]:
    """Each claim's field with the pixels its neighbours win taken away (module docstring).

    Returns:
        One float32 array per claim, of its window's shape; the claim's own ``field`` (the same
        object) where no neighbour competes for any of its pixels.
    """
    competitors: list[np.ndarray | None] = [None] * len(claims)
    for i, j in neighbour_pairs(claims):
        a, b = claims[i], claims[j]
        part = a.window.intersect(b.window)
        sa, sb = _local(a.window, part), _local(b.window, part)
        fa, fb = a.field[sa], b.field[sb]
        both = (fa > 0) & (fb > 0)
        if not both.any():
            continue
        nearer_a = np.clip(_distances(part, b.anchor) - _distances(part, a.anchor), -1.0, 1.0)
        for index, own, mine, theirs, sign in ((i, a, sa, fb, 1.0), (j, b, sb, fa, -1.0)):
            value = np.where(both, theirs - np.float32(tie * sign) * nearer_a, 0.0).astype(np.float32)
            if competitors[index] is None:
                competitors[index] = np.zeros(own.field.shape, dtype=np.float32)
            np.maximum(competitors[index][mine], value, out=competitors[index][mine])
    out = []
    for claim, competitor in zip(claims, competitors, strict=True):
        if competitor is None:
            out.append(claim.field)
        else:
            out.append((claim.field - np.maximum(competitor, 0.0)).astype(np.float32))
    return out


def keep_padded_apart(padded: Sequence[Polygon | None], cores: Sequence[Polygon | None],
                      groups: Sequence[Hashable]) -> list[Polygon | None]:
    """Padded outlines (positive Padding) that do not overlap: each grows only into pixels that
    no neighbour's unpadded outline (``cores``) covers, and where two grow into the same gap,
    the one listed first keeps it. Polygons in frame coordinates; None entries are skipped.

    Returns:
        One polygon per entry (the largest part left, its exterior), or None where nothing is left.
    """
    index = [k for k, p in enumerate(padded) if p is not None]
    if len(index) < 2:
        return list(padded)
    tree = shapely.STRtree([padded[k] for k in index])
    out: list[Polygon | None] = list(padded)
    for position, k in enumerate(index):
        shape: BaseGeometry = padded[k]
        for other in tree.query(padded[k]):
            j = index[int(other)]
            if j == k or groups[j] != groups[k]:
                continue
            core = cores[j]
            if core is not None and shape.intersects(core):
                shape = shape.difference(core)
            if int(other) < position and out[j] is not None and shape.intersects(out[j]):
                shape = shape.difference(out[j])
        if shape is not padded[k]:
            part = largest_polygon(on_precision_grid(shape)) if not shape.is_empty else None
            out[k] = Polygon(part.exterior) if part is not None else None
    return out
