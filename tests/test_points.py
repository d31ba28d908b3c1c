"""Points and rectangles as prompts (issue 13, items 1 and 4) in the engine, and the point rule.

The point rule (:mod:`sam2_refine.engine.point_choice`) is tested as pure functions; the engine with the
known-mask stand-in, which answers a point with three masks (a part, the object, the object with
what it touches) and whose own score prefers the wrong (largest) one for objects whose label is
a multiple of 3.
"""

from __future__ import annotations

import numpy as np
import pytest

from sam2_refine.engine import point_choice as pc
from sam2_refine.engine.geometry import frame_window, mask_iou, rasterize
from sam2_refine.engine.options import GeometryOptions
from sam2_refine.engine.location import refine_location
from sam2_refine.annotations import Kept, Refined
from sam2_refine.job.selection import to_original
from sam2_refine.testing.datasets import annotation_doc, cell_scene, dense_scene, rough_polygon
from sam2_refine.testing.stand_in import KnownMaskPredictor

# -- the rule, pure -----------------------------------------------------------------------------------


def test_first_choice_is_the_best_usable_score():
    assert pc.first_choice([10.0, 20.0, 30.0], [0.5, 0.9, 0.7]) == 1
    assert pc.first_choice([10.0, None, 30.0], [0.5, 0.9, 0.7]) == 2
    assert pc.first_choice([None, None, None], [0.5, 0.9, 0.7]) is None


def test_expected_area_is_the_median_of_groups_with_enough_points():
    firsts = [("a", 100.0), ("a", 120.0), ("a", 400.0), ("b", 50.0), ("b", 60.0)]
    assert pc.expected_areas(firsts) == {"a": 120.0}  # b has only 2 points
    assert pc.expected_areas(firsts, minimum=2) == {"a": 120.0, "b": 55.0}


def test_closest_choice_is_the_closest_ratio_then_the_score():
    """BIIGLE's second pass (measured against the rule)."""
    # expected 100: 50 and 200 are equally far (a factor of 2); 150 is nearer than 50
    assert pc.closest_choice([50.0, 150.0, 400.0], [0.9, 0.1, 0.5], 100.0) == 1
    assert pc.closest_choice([50.0, 200.0], [0.4, 0.6], 100.0) == 1
    assert pc.closest_choice([50.0, 200.0], [0.6, 0.4], 100.0) == 0
    assert pc.closest_choice([50.0, None, 400.0], [0.1, 0.9, 0.2], None) == 2  # no expected area: score
    assert pc.closest_choice([None, None], [0.1, 0.9], 100.0) is None


def test_second_choice_is_the_best_score_of_a_plausible_size():
    # expected 100: 50 and 150 are plausible (within a factor 2), 400 is not
    assert pc.second_choice([50.0, 150.0, 400.0], [0.9, 0.1, 0.95], 100.0) == 0
    assert pc.second_choice([50.0, 150.0, 400.0], [0.1, 0.9, 0.95], 100.0) == 1
    # none plausible: the closest ratio (300 is a factor 3 off, 20 a factor 5)
    assert pc.second_choice([20.0, 300.0, 900.0], [0.9, 0.1, 0.5], 100.0) == 1
    assert pc.second_choice([50.0, None, 400.0], [0.1, 0.9, 0.2], None) == 2  # no expected area: score
    assert pc.second_choice([None, None], [0.1, 0.9], 100.0) is None


def test_candidates_holding_another_click_are_set_aside_unless_all_do():
    assert pc.without_merges([10.0, 20.0, 30.0], [0, 0, 2]) == [10.0, 20.0, None]
    assert pc.without_merges([10.0, 20.0, 30.0], [1, 1, 2]) == [10.0, 20.0, 30.0]
    assert pc.without_merges([None, 20.0, 30.0], [0, 1, 1]) == [None, 20.0, 30.0]


def test_choose_all_two_passes():
    table = {  # (group, areas of part / object / merged, scores)
        "p1": ("n", [30.0, 100.0, 300.0], [0.8, 0.9, 0.85]),
        "p2": ("n", [40.0, 110.0, 280.0], [0.8, 0.9, 0.85]),
        "p3": ("n", [35.0, 90.0, 320.0], [0.8, 0.85, 0.9]),  # the score prefers the merged mask
        "q": ("other", [5.0, 9.0, 20.0], [0.9, 0.5, 0.1]),  # alone in its group: the score decides
    }
    chosen, expected = pc.choose_all(table)
    assert chosen == {"p1": 1, "p2": 1, "p3": 1, "q": 0}
    assert expected == {"n": 110.0}
    by_score, _ = pc.choose_all(table, rule="score")
    assert by_score == {"p1": 1, "p2": 1, "p3": 2, "q": 0}
    merged = {"p1": [0, 0, 1], "p2": [0, 0, 1], "p3": [0, 0, 2], "q": [0, 0, 0]}
    chosen, expected = pc.choose_all(table, others=merged)
    assert expected == {"n": 100.0} and chosen["p3"] == 1


def test_area_problems():
    frame = 1000.0 * 1000.0
    assert pc.area_problem(100.0, 100.0, frame) is None
    assert pc.area_problem(100.0, None, frame) is None
    assert "typical area" in pc.area_problem(301.0, 100.0, frame)
    assert "typical area" in pc.area_problem(24.0, 100.0, frame)
    assert "over 5% of the frame" in pc.area_problem(0.06 * frame, None, frame)


# -- the engine ---------------------------------------------------------------------------------------


def point_doc(x: float, y: float, ann_id: str, tags=("n",)) -> dict:
    return {"_id": ann_id, "shape": "point", "tags": list(tags), "channel": 0,
            "location": {"XY": 0, "Z": 0, "Time": 0}, "coordinates": [{"x": float(x), "y": float(y), "z": 0}]}


def centre_click(mask: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(mask)
    i = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
    return float(cols[i]), float(rows[i])


def scene_points(count: int = 12, seed: int = 4, size: int = 256, radius=(11.0, 13.0)):
    """Isolated objects of similar size (so that the area rule is unambiguous), a click near
    each centre."""
    scene = cell_scene(size, size, count, radius=radius, seed=seed, noise=False)
    originals = [to_original(point_doc(*centre_click(scene.labels == k), f"p{k:02d}"))
                 for k in range(1, scene.count + 1)]
    image = np.repeat((scene.labels > 0).astype(np.float32)[..., None], 3, axis=2)
    return scene, originals, image


def ious(outcomes, labels) -> list[float]:
    h, w = labels.shape
    return [mask_iou(rasterize(o.polygon, frame_window(w, h)), labels == k) if isinstance(o, Refined) else 0.0
            for k, o in enumerate(outcomes, start=1)]


class Recording(KnownMaskPredictor):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls: list[dict] = []

    def decode(self, boxes, mask_inputs=None, multimask=False, *, points=None, point_labels=None):
        self.calls.append({"boxes": None if boxes is None else np.array(boxes), "multimask": multimask,
                           "points": None if points is None else np.array(points),
                           "labels": None if point_labels is None else np.array(point_labels)})
        return super().decode(boxes, mask_inputs, multimask, points=points, point_labels=point_labels)


def test_points_become_outlines_of_the_objects_they_mark():
    scene, originals, image = scene_points()
    predictor = Recording(labels=scene.labels, wrong_scores=False)
    outcomes = refine_location(predictor, image, originals, GeometryOptions())
    assert all(isinstance(o, Refined) for o in outcomes), [o for o in outcomes if isinstance(o, Kept)]
    assert min(ious(outcomes, scene.labels)) > 0.95
    (call,) = predictor.calls  # one batch: every point, three masks each, no box
    assert call["boxes"] is None and call["multimask"] is True
    assert call["points"].shape == (scene.count, 1, 2) and (call["labels"] == 1).all()
    np.testing.assert_allclose(call["points"][:, 0], [o.shape.coords[0] for o in originals])


def test_the_rule_beats_the_score_where_the_score_is_wrong():
    """A dense field (touching nuclei): where the stand-in scores the largest mask best (every
    third object), the plausible-size rule mostly keeps the object; the score alone does not."""
    scene = dense_scene(320, 320, 90, seed=5, spacing=1.2)
    originals = [to_original(point_doc(*centre_click(scene.labels == k), f"p{k:03d}"))
                 for k in range(1, scene.count + 1)]
    image = np.zeros(scene.labels.shape + (3,), np.float32)
    results = {}
    for rule in ("both", "score"):
        outcomes = refine_location(KnownMaskPredictor(labels=scene.labels, grid=(256, 256)), image, originals,
                                   GeometryOptions(separate=True, point_choice=rule))
        results[rule] = ious(outcomes, scene.labels)
    wrong = [k - 1 for k in range(1, scene.count + 1) if k % 3 == 0]
    print(f"\nmean IoU: rule {np.mean(results['both']):.3f}, score {np.mean(results['score']):.3f}; where the "
          f"score is wrong: {np.mean([results['both'][k] for k in wrong]):.3f} vs "
          f"{np.mean([results['score'][k] for k in wrong]):.3f}")
    assert np.mean(results["both"]) > np.mean(results["score"]) + 0.01
    assert np.mean([results["both"][k] for k in wrong]) > np.mean([results["score"][k] for k in wrong]) + 0.04


def test_fewer_than_three_points_of_a_tag_follow_the_score():
    scene, originals, image = scene_points()
    three = [o for o in originals if int(o.id[1:]) % 3 == 0][:2]  # objects whose score is wrong
    outcomes = refine_location(KnownMaskPredictor(labels=scene.labels), image, three, GeometryOptions())
    labels = [int(o.id[1:]) for o in three]
    got = [mask_iou(rasterize(o.polygon, frame_window(256, 256)), scene.labels == k)
           for o, k in zip(outcomes, labels, strict=True)]
    assert all(isinstance(o, Refined) for o in outcomes) and max(got) < 0.8  # the (wrong) best score


def test_a_point_on_the_background_is_kept():
    scene, originals, image = scene_points()
    empty = np.argwhere(scene.labels == 0)[0]
    lost = to_original(point_doc(float(empty[1]), float(empty[0]), "bg"))
    outcomes = refine_location(KnownMaskPredictor(labels=scene.labels), image, originals + [lost], GeometryOptions())
    assert isinstance(outcomes[-1], Kept) and outcomes[-1].reason in ("empty mask", "the mask does not reach the point")
    assert all(isinstance(o, Refined) for o in outcomes[:-1])


def test_a_point_far_larger_than_its_tag_is_kept():
    """One point marks an object 16 times the area of the other points' objects (same tag)."""
    yy, xx = np.mgrid[0:300, 0:300]
    labels = np.zeros((300, 300), np.int32)
    centres = [(30 + 45 * (k % 6), 30 + 45 * (k // 6)) for k in range(12)]
    for k, (x, y) in enumerate(centres, start=1):
        labels[(xx - x) ** 2 + (yy - y) ** 2 <= 7 ** 2] = k
    labels[(xx - 200) ** 2 + (yy - 220) ** 2 <= 28 ** 2] = 13
    originals = [to_original(point_doc(x, y, f"p{k:02d}")) for k, (x, y) in enumerate(centres, start=1)]
    originals.append(to_original(point_doc(200, 220, "huge")))
    image = np.repeat((labels > 0).astype(np.float32)[..., None], 3, axis=2)
    outcomes = refine_location(KnownMaskPredictor(labels=labels), image, originals, GeometryOptions())
    assert isinstance(outcomes[-1], Kept) and "typical area" in outcomes[-1].reason
    assert sum(isinstance(o, Refined) for o in outcomes[:-1]) == 12


def test_masks_over_the_hard_bound_are_never_used():
    """A model that answers every point with most of the frame: nothing is refined."""

    class Everything(KnownMaskPredictor):
        def decode(self, boxes, mask_inputs=None, multimask=False, **kw):
            decoded = super().decode(boxes, mask_inputs, multimask, **kw)
            decoded.logits[:] = 8.0
            decoded.logits[:, :, :5, :5] = -8.0
            return decoded

    scene, originals, image = scene_points()
    outcomes = refine_location(Everything(labels=scene.labels), image, originals, GeometryOptions())
    assert all(isinstance(o, Kept) and "over 5% of the frame" in o.reason for o in outcomes)


def test_minimum_overlap_does_not_apply_to_points_but_to_rectangles():
    scene, originals, image = scene_points()
    mask = scene.labels == 1
    x0, y0, x1, y1 = rough_polygon(mask, "box", None)[[0, 2]].ravel()
    big = {"_id": "rect", "shape": "rectangle", "tags": ["n"], "channel": 0, "location": {"XY": 0, "Z": 0, "Time": 0},
           "coordinates": [{"x": x0 - 12, "y": y0 - 12}, {"x": x1 + 12, "y": y0 - 12}, {"x": x1 + 12, "y": y1 + 12},
                           {"x": x0 - 12, "y": y1 + 12}]}
    outcomes = refine_location(KnownMaskPredictor(labels=scene.labels), image, originals + [to_original(big)],
                               GeometryOptions(min_overlap=0.6))
    assert all(isinstance(o, Refined) for o in outcomes[:-1])  # points: no area to compare with
    assert isinstance(outcomes[-1], Kept) and "overlap with the original" in outcomes[-1].reason


def test_a_rotated_rectangle_prompts_with_its_bounding_box():
    scene, _, image = scene_points()
    mask = scene.labels == 2
    rows, cols = np.nonzero(mask)
    cx, cy, r = cols.mean(), rows.mean(), 0.5 * max(np.ptp(rows), np.ptp(cols)) + 4
    diamond = [(cx, cy - 1.3 * r), (cx + 1.3 * r, cy), (cx, cy + 1.3 * r), (cx - 1.3 * r, cy)]
    doc = {"_id": "rot", "shape": "rectangle", "tags": ["n"], "channel": 0, "location": {"XY": 0, "Z": 0, "Time": 0},
           "coordinates": [{"x": x, "y": y} for x, y in (diamond[2], diamond[0], diamond[3], diamond[1])]}
    predictor = Recording(labels=scene.labels)
    (outcome,) = refine_location(predictor, image, [to_original(doc)], GeometryOptions())
    np.testing.assert_allclose(predictor.calls[0]["boxes"][0],
                               [cx - 1.3 * r, cy - 1.3 * r, cx + 1.3 * r, cy + 1.3 * r])
    assert isinstance(outcome, Refined)
    assert mask_iou(rasterize(outcome.polygon, frame_window(256, 256)), mask) > 0.95


def test_points_and_polygons_under_one_tag_each_keep_their_own_rule():
    """Polygons prompt with their box; points with the point; the points' expected area comes
    from points only (the large polygon does not move it)."""
    scene, originals, image = scene_points()
    yy, xx = np.mgrid[0:256, 0:256]
    polygon_docs = [annotation_doc(rough_polygon(scene.labels == k, "dilated", None), tags=["n"])
                    for k in range(1, 4)]
    polygons = [to_original({**d, "_id": f"poly{k}"}) for k, d in enumerate(polygon_docs, start=1)]
    predictor = Recording(labels=scene.labels)
    outcomes = refine_location(predictor, image, polygons + originals[3:], GeometryOptions())
    assert all(isinstance(o, Refined) for o in outcomes)
    assert [c["boxes"] is None for c in predictor.calls] == [False, True]
    assert min(ious(outcomes, scene.labels)) > 0.95


def test_points_in_object_crops_on_a_large_frame():
    """Auto: points count as small objects, so a 2048 px frame is refined in crops."""
    scene = cell_scene(2048, 2048, 20, radius=(9.0, 12.0), seed=5, noise=False)
    originals = [to_original(point_doc(*centre_click(scene.labels == k), f"p{k:02d}"))
                 for k in range(1, scene.count + 1)]
    image = np.repeat((scene.labels > 0).astype(np.float32)[..., None], 3, axis=2)
    embedded = []

    class Watching(KnownMaskPredictor):
        def embed(self, window):
            embedded.append(window.shape)
            super().embed(window)

    outcomes = refine_location(Watching(threshold=0.5, wrong_scores=False), image, originals, GeometryOptions())
    assert embedded and all(h < 2048 and w < 2048 for h, w, _ in embedded)
    assert min(ious(outcomes, scene.labels)) > 0.9


def test_negative_points_option_decodes_merging_points_again():
    """Off by default (measured, docs/accuracy.md); on, a point whose candidates hold another
    point of its tags is decoded again with those points as negatives (label 0)."""
    labels = np.zeros((240, 320), np.int32)
    yy, xx = np.mgrid[0:240, 0:320]
    labels[(xx - 50) ** 2 + (yy - 60) ** 2 <= 15 ** 2] = 1
    labels[((xx - 78) ** 2 + (yy - 60) ** 2 <= 15 ** 2) & (labels == 0)] = 2  # touching the first
    labels[(xx - 130) ** 2 + (yy - 30) ** 2 <= 10 ** 2] = 4  # alone
    points = [to_original(point_doc(50, 60, "a")), to_original(point_doc(80, 60, "b")),
              to_original(point_doc(130, 30, "c"))]
    image = np.repeat((labels > 0).astype(np.float32)[..., None], 3, axis=2)
    off = Recording(labels=labels)
    refine_location(off, image, points, GeometryOptions())
    assert len(off.calls) == 1
    on = Recording(labels=labels)
    outcomes = refine_location(on, image, points, GeometryOptions(negative_points=True))
    assert len(on.calls) == 2
    again = on.calls[1]
    assert again["labels"].tolist() == [[1, 0], [1, 0]]  # a and b, each with the other as negative
    np.testing.assert_allclose(again["points"][:, 1], [[80, 60], [50, 60]])
    assert all(isinstance(o, Refined) for o in outcomes)


@pytest.mark.parametrize("where", [(-3.0, 50.0), (50.0, 130.5), (1e9, 5.0)])
def test_points_outside_the_frame_are_kept(where):
    scene, originals, image = scene_points(size=128, count=4)
    outside = to_original(point_doc(*where, "out"))
    (outcome,) = refine_location(KnownMaskPredictor(labels=scene.labels), image, [outside], GeometryOptions())
    assert outcome == Kept("out", "it lies outside the 128x128 frame")



def test_points_on_the_frame_edges_belong_to_the_edge_pixels():
    labels = np.zeros((64, 80), np.int32)
    labels[:12, :12] = 1
    labels[-12:, -12:] = 2
    labels[:12, -12:] = 3
    originals = [to_original(point_doc(-0.5, -0.5, "a")), to_original(point_doc(79.5, 63.5, "b")),
                 to_original(point_doc(79.5, 0, "c"))]
    image = np.repeat((labels > 0).astype(np.float32)[..., None], 3, axis=2)
    outcomes = refine_location(KnownMaskPredictor(labels=labels, wrong_scores=False), image, originals,
                               GeometryOptions())
    assert all(isinstance(o, Refined) for o in outcomes), outcomes
    for outcome, k in zip(outcomes, (1, 2, 3), strict=True):
        assert mask_iou(rasterize(outcome.polygon, frame_window(80, 64)), labels == k) > 0.9
