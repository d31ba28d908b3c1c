"""Touching objects kept apart (issue 13, item 3): the pure separation step and the engine with it.

Unit tests of :mod:`sam2_refine.engine.separation` (who wins a contested pixel, ties, groups, the cost
bound of the neighbour search), and the engine on a dense field whose masks spill into their
neighbours (the known-mask stand-in with ``spill``): overlap below 0.5 % of the outlines' area
with the option, mean IoU to the truth not lower than without it.
"""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from shapely.geometry import box

from sam2_refine.engine.geometry import Window, frame_window, mask_iou, rasterize
from sam2_refine.engine.options import GeometryOptions
from sam2_refine.engine.location import refine_location
from sam2_refine.annotations import Kept, Refined
from sam2_refine.job.selection import to_original
from sam2_refine.engine.separation import Claim, keep_padded_apart, neighbour_pairs, separate
from sam2_refine.testing.datasets import annotation_doc, dense_scene, rough_polygon
from sam2_refine.testing.stand_in import KnownMaskPredictor


def claim(top, left, field, anchor, group=("n",)) -> Claim:
    field = np.asarray(field, dtype=np.float32)
    return Claim(Window(top, left, top + field.shape[0], left + field.shape[1]), field, anchor, group)


# -- the rule ------------------------------------------------------------------------------------


def test_the_higher_logit_wins_a_contested_pixel_and_the_other_keeps_its_own():
    a = claim(0, 0, [[5.0, 5.0, 2.0, -1.0]], (0.0, 0.0))
    b = claim(0, 1, [[-1.0, 6.0, 4.0]], (3.0, 0.0))  # frame columns 1..3
    fa, fb = separate([a, b])
    # column 1: a 5 vs b -1 (b does not claim it); column 2: a 2 vs b 6; column 3: only b claims it
    assert (fa > 0).tolist() == [[True, True, False, False]]
    assert (fb > 0).tolist() == [[False, True, True]]
    assert fa[0, 2] == pytest.approx(-4.0, abs=1e-3) and fb[0, 1] == pytest.approx(4.0, abs=1e-3)
    assert not ((fa[:, 1:] > 0) & (fb > 0)).any()  # no pixel claimed twice


def test_exact_ties_go_to_the_nearer_original():
    flat = np.full((1, 10), 8.0, dtype=np.float32)
    a, b = claim(0, 0, flat, (0.0, 0.0)), claim(0, 0, flat, (9.0, 0.0))
    fa, fb = separate([a, b])
    assert (fa > 0).tolist() == [[True] * 5 + [False] * 5]
    assert (fb > 0).tolist() == [[False] * 5 + [True] * 5]


def test_the_zero_crossing_lies_where_the_logits_tie():
    """a falls from +6 to -6 across the row and b rises: both fields cross zero at the same place."""
    xs = np.arange(8, dtype=np.float32)
    a = claim(0, 0, [6.0 - 1.5 * xs + 3.0], (0.0, 0.0))
    b = claim(0, 0, [1.5 * xs - 4.0], (7.0, 0.0))
    fa, fb = separate([a, b])
    contested = (a.field > 0) & (b.field > 0)
    np.testing.assert_allclose(fa[contested], -fb[contested], atol=1e-3)
    # logits tie at 6 - 1.5x + 3 = 1.5x - 4, x = 13/3: a keeps x <= 4, b takes x >= 5
    assert (fa[0] > 0).tolist() == [x <= 4 for x in range(8)]
    assert (fb[0] > 0).tolist() == [x >= 5 for x in range(8)]


def test_several_competitors_the_highest_wins():
    a = claim(0, 0, [[4.0, 4.0]], (0.0, 0.0))
    b = claim(0, 0, [[5.0, 3.0]], (5.0, 0.0))
    c = claim(0, 0, [[3.0, 4.5]], (9.0, 0.0))
    fa, fb, fc = separate([a, b, c])
    assert [(fa[0, k] > 0, fb[0, k] > 0, fc[0, k] > 0) for k in range(2)] == [
        (False, True, False), (False, False, True)]


def test_other_groups_never_compete_and_untouched_fields_are_the_same_object():
    a = claim(0, 0, [[8.0, 8.0]], (0.0, 0.0), group=("nucleus",))
    b = claim(0, 0, [[9.0, 9.0]], (1.0, 0.0), group=("cell",))
    c = claim(5, 5, [[9.0]], (5.0, 5.0), group=("nucleus",))  # far away
    fa, fb, fc = separate([a, b, c])
    assert fa is a.field and fb is b.field and fc is c.field


def test_neighbour_pairs_are_exactly_the_windows_that_meet():
    rng = np.random.default_rng(0)
    claims = []
    for _ in range(300):
        top, left = rng.integers(0, 500, 2)
        h, w = rng.integers(1, 30, 2)
        claims.append(claim(int(top), int(left), np.ones((h, w)), (0.0, 0.0), group=(int(rng.integers(0, 2)),)))
    brute = sorted((i, j) for i in range(len(claims)) for j in range(i + 1, len(claims))
                   if claims[i].group == claims[j].group and claims[i].window.intersect(claims[j].window).area > 0
                   and claims[i].window.intersect(claims[j].window).height > 0
                   and claims[i].window.intersect(claims[j].window).width > 0)
    assert neighbour_pairs(claims) == brute


def test_padded_outlines_do_not_grow_into_each_other():
    cores = [box(0, 0, 10, 10), box(10, 0, 20, 10), box(50, 50, 60, 60)]
    padded = [c.buffer(2, join_style="mitre") for c in cores]
    out = keep_padded_apart(padded, cores, [("n",)] * 3)
    assert out[0].intersection(out[1]).area < 1e-6
    assert out[0].intersection(cores[1]).area < 1e-6 and out[1].intersection(cores[0]).area < 1e-6
    assert out[2] is padded[2]  # no neighbour: unchanged
    assert out[0].area > cores[0].area and out[1].area > cores[1].area  # still padded outwards
    other_group = keep_padded_apart(padded, cores, [("a",), ("b",), ("a",)])
    assert other_group[0] is padded[0] and other_group[1] is padded[1]


# -- the engine on a dense field -------------------------------------------------------------------


def dense_outcomes(separate_on: bool, kind: str = "box", spill: float = 4.0, padding: float = 0.0):
    scene = dense_scene(320, 320, 90, seed=3, spacing=1.2)
    rng = np.random.default_rng(0)
    originals = []
    for k in range(1, scene.count + 1):
        mask = scene.labels == k
        if kind == "point":
            rows, cols = np.nonzero(mask)
            i = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
            doc = {"shape": "point", "tags": ["n"], "channel": 0, "location": {"XY": 0, "Z": 0, "Time": 0},
                   "coordinates": [{"x": float(cols[i]), "y": float(rows[i])}]}
        else:
            doc = annotation_doc(rough_polygon(mask, kind, rng), tags=["n"])
        originals.append(to_original({**doc, "_id": f"a{k:03d}"}))
    image = np.repeat((scene.channels[0] / 60000.0).astype(np.float32)[..., None], 3, axis=2)
    predictor = KnownMaskPredictor(labels=scene.labels, spill=spill, grid=(256, 256))
    outcomes = refine_location(predictor, image, originals,
                               GeometryOptions(separate=separate_on, padding=padding, group_tags=("n",)))
    return scene, outcomes


def overlap_and_iou(scene, outcomes) -> tuple[float, float]:
    polygons = [o.polygon if isinstance(o, Refined) else None for o in outcomes]
    h, w = scene.labels.shape
    ious = [mask_iou(rasterize(p, frame_window(w, h)), scene.labels == k) if p is not None else 0.0
            for k, p in enumerate(polygons, start=1)]
    made = [p for p in polygons if p is not None]
    tree = shapely.STRtree(made)
    shared = sum(made[i].intersection(made[j]).area for i, j in zip(*tree.query(made, predicate="intersects"))
                 if i < j)
    return shared / sum(p.area for p in made), float(np.mean(ious))


@pytest.mark.parametrize("kind", ["box", "jittered", "point"])
def test_dense_spilling_scene_outlines_do_not_overlap(kind):
    scene, apart = dense_outcomes(True, kind)
    _, together = dense_outcomes(False, kind)
    overlap_on, iou_on = overlap_and_iou(scene, apart)
    overlap_off, iou_off = overlap_and_iou(scene, together)
    print(f"\n{kind}: overlap {100 * overlap_off:.2f} % -> {100 * overlap_on:.3f} %, IoU {iou_off:.3f} -> {iou_on:.3f}")
    assert overlap_off > 0.02  # the masks do spill into each other here
    assert overlap_on < 0.005  # the target: under 0.5 % of the outlines' area
    assert iou_on >= iou_off
    assert all(isinstance(o, Refined) for o in apart)


def test_positive_padding_with_separation_still_does_not_overlap():
    scene, outcomes = dense_outcomes(True, "box", padding=2.0)
    overlap_on, _ = overlap_and_iou(scene, outcomes)
    assert overlap_on < 1e-4


def test_nested_objects_with_other_tags_are_not_cut():
    """A nucleus inside its cell, tagged differently: separation leaves both whole."""
    yy, xx = np.mgrid[0:120, 0:120]
    cell = (xx - 60) ** 2 + (yy - 60) ** 2 <= 40 ** 2
    nucleus = (xx - 60) ** 2 + (yy - 60) ** 2 <= 15 ** 2
    labels = np.where(nucleus, 2, np.where(cell, 1, 0)).astype(np.int32)

    class Nested(KnownMaskPredictor):
        """The cell's box gets the whole cell, nucleus included."""

        def decode(self, boxes, mask_inputs=None, multimask=False, **kw):
            decoded = super().decode(boxes, mask_inputs, multimask, **kw)
            for k, b in enumerate(boxes):
                if b[2] - b[0] > 60:
                    decoded.logits[k] = np.where(cell, 8.0, -8.0)
            return decoded

    docs = [annotation_doc(rough_polygon(cell, "box", None), tags=["cell"]),
            annotation_doc(rough_polygon(nucleus, "box", None), tags=["nucleus"])]
    originals = [to_original({**d, "_id": f"o{k}"}) for k, d in enumerate(docs)]
    image = np.repeat(cell[..., None].astype(np.float32), 3, axis=2)
    outcomes = refine_location(Nested(labels=labels), image, originals,
                               GeometryOptions(separate=True, group_tags=("cell", "nucleus")))
    assert all(isinstance(o, Refined) for o in outcomes)
    assert mask_iou(rasterize(outcomes[0].polygon, frame_window(120, 120)), cell) > 0.97
    assert mask_iou(rasterize(outcomes[1].polygon, frame_window(120, 120)), nucleus) > 0.95


def test_an_object_whose_mask_its_neighbours_win_entirely_is_kept():
    """A prompt whose whole mask lies inside a neighbour's mask the model is surer of (same
    tags) loses every pixel: it is kept with a reason, and the neighbour is refined whole."""
    yy, xx = np.mgrid[0:80, 0:80]
    big = (xx - 40) ** 2 + (yy - 40) ** 2 <= 20 ** 2
    small = (xx - 40) ** 2 + (yy - 40) ** 2 <= 6 ** 2

    class Weak(KnownMaskPredictor):
        def decode(self, boxes, mask_inputs=None, multimask=False, **kw):
            decoded = super().decode(boxes, mask_inputs, multimask, **kw)
            for k, b in enumerate(boxes):
                inner = b[2] - b[0] < 20
                decoded.logits[k] = np.where(small if inner else big, 2.0 if inner else 8.0, -8.0)
            return decoded

    docs = [annotation_doc(rough_polygon(big, "box", None), tags=["n"]),
            annotation_doc(rough_polygon(small, "box", None), tags=["n"])]
    originals = [to_original({**d, "_id": f"o{k}"}) for k, d in enumerate(docs)]
    image = np.repeat(big[..., None].astype(np.float32), 3, axis=2)
    outer, inner = refine_location(Weak(labels=big.astype(np.int32)), image, originals, GeometryOptions(separate=True))
    assert isinstance(outer, Refined)
    assert isinstance(inner, Kept) and "Keep touching objects apart" in inner.reason
    assert mask_iou(rasterize(outer.polygon, frame_window(80, 80)), big) > 0.97
