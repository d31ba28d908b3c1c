"""Resolution (whole frame / object crops / auto), prompt modes, the quality gate, links and tags."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from conftest import TOKEN
from sam2_refine.job import compute as job
from sam2_refine.engine.geometry import Window, frame_window, mask_iou, rasterize
from sam2_refine.nimbus.client import NimbusClient
from sam2_refine.nimbus.retry import RetryPolicy
from sam2_refine.model.predictor import Decoded
from sam2_refine.engine.options import GeometryOptions
from sam2_refine.engine.location import refine_location
from sam2_refine.engine.prompts import shape_logits, shape_on_grid
from sam2_refine.annotations import Kept, Refined
from sam2_refine.engine.regions import CROPS, MIN_CROP, WHOLE, choose_mode, plan_regions
from sam2_refine.nimbus.progress import Reporter
from sam2_refine.job.selection import to_original
from sam2_refine.job.settings import parse_settings
from sam2_refine.testing.datasets import annotation_doc, cell_scene, rough_polygon
from sam2_refine.testing.stand_in import KnownMaskPredictor, ModelResolutionPredictor


def originals_for(labels: np.ndarray, kind: str = "jittered", seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(1, int(labels.max()) + 1):
        doc = annotation_doc(rough_polygon(labels == k, kind, rng, amount=2.0))
        doc["_id"] = f"a{k:04d}"
        out.append(to_original(doc))
    return out


def mean_iou(outcomes, labels) -> float:
    h, w = labels.shape
    values = []
    for k, outcome in enumerate(outcomes, start=1):
        if isinstance(outcome, Refined):
            values.append(mask_iou(rasterize(outcome.polygon, frame_window(w, h)), labels == k))
        else:
            values.append(0.0)
    return float(np.mean(values))


# -- regions ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_crops_recover_small_objects_that_the_whole_frame_loses():
    """A model that sees only its 1024 px input: 18-24 px nuclei in a 4096 px frame."""
    scene = cell_scene(4096, 4096, 24, radius=(9.0, 12.0), seed=5, noise=False)
    image = np.repeat((scene.labels > 0).astype(np.float32)[..., None], 3, axis=2)
    originals = originals_for(scene.labels)
    results = {}
    for mode in ("whole", "crops", "auto"):
        outcomes = refine_location(ModelResolutionPredictor(), image, originals, GeometryOptions(resolution=mode))
        results[mode] = mean_iou(outcomes, scene.labels)
    print(f"\nmean IoU to ground truth, 4096 px frame, ~20 px objects: {json.dumps(results)}")
    assert results["crops"] >= 0.85
    assert results["whole"] <= 0.6
    assert results["auto"] == results["crops"]  # auto picks crops here


def test_plan_regions_keeps_every_object_whole_and_once():
    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 4000, size=(300, 2))
    sizes = rng.uniform(10, 40, size=300)
    boxes = np.column_stack([centres - sizes[:, None] / 2, centres + sizes[:, None] / 2])
    boxes = np.clip(boxes, 0, 4095)[:, [0, 1, 2, 3]]
    regions = plan_regions(boxes, 4096, 4096, CROPS)
    members = sorted(i for r in regions for i in r.members)
    assert members == list(range(300))  # every object exactly once
    for region in regions:
        win = region.window
        assert win.height >= MIN_CROP and win.width >= MIN_CROP
        assert win.height == win.width  # square where the frame allows
        assert 0 <= win.top and 0 <= win.left and win.bottom <= 4096 and win.right <= 4096
        for i in region.members:
            x0, y0, x1, y1 = boxes[i]
            margin = max(16.0, 0.5 * max(x1 - x0, y1 - y0))
            need = Window.around(boxes[i], margin, Window(0, 0, 4096, 4096))
            assert win.contains(need)  # the object and its context are inside its window
    assert len(regions) <= 36  # neighbours share windows: at most one per 768 px tile


def test_auto_mode_decision():
    small = np.array([[100, 100, 120, 118], [500, 500, 522, 520]], dtype=float)
    big = np.array([[100, 100, 400, 380], [500, 500, 900, 880]], dtype=float)
    assert choose_mode(small, 1024, 1024, "auto") == WHOLE  # the frame fits the model input
    assert choose_mode(small, 4096, 4096, "auto") == CROPS
    assert choose_mode(big, 4096, 4096, "auto") == WHOLE
    assert plan_regions(small, 4096, 4096, "whole")[0].window == Window(0, 0, 4096, 4096)


def test_crop_windows_stay_inside_small_frames():
    boxes = np.array([[10.0, 10.0, 30.0, 30.0]])
    (region,) = plan_regions(boxes, 200, 300, CROPS)
    assert region.window == Window(0, 0, 200, 300) or region.window.bottom <= 200
    assert region.window.right <= 300 and region.window.height <= 200


# -- prompts ----------------------------------------------------------------------------------

class ThreeMasks:
    """Three candidate masks per box: a wrong object (best score), the right one, nothing."""

    description = "three-mask stand-in"
    max_batch = 8
    mask_input_size = (256, 256)

    def __init__(self, right: np.ndarray, wrong: np.ndarray):
        self.right, self.wrong = right, wrong
        self.calls: list[dict] = []

    def embed(self, image):
        pass

    def decode(self, boxes, mask_inputs=None, multimask=False):
        self.calls.append({"n": len(boxes), "mask_inputs": mask_inputs, "multimask": multimask})
        logit = lambda m: np.where(m, 8.0, -8.0).astype(np.float32)  # noqa: E731
        masks = [logit(self.wrong), logit(self.right), logit(np.zeros_like(self.right))]
        scores = [0.9, 0.5, 0.1]
        channels = 3 if multimask else 1
        logits = np.stack([np.stack(masks[:channels])] * len(boxes))
        return Decoded(logits, np.tile(np.array(scores[:channels], np.float32), (len(boxes), 1)))


def _two_objects():
    yy, xx = np.mgrid[0:120, 0:160]
    right = (xx - 50) ** 2 + (yy - 60) ** 2 < 20 ** 2
    wrong = (np.abs(xx - 50) < 45) & (np.abs(yy - 60) < 45) & ~right  # a ring around it, in the box
    doc = annotation_doc(np.array([[32, 42], [68, 42], [68, 78], [32, 78]], float))
    doc["_id"] = "orig"
    return right, wrong, to_original(doc)


def test_best_of_three_keeps_the_mask_that_agrees_with_the_original():
    right, wrong, original = _two_objects()
    image = np.zeros((120, 160, 3), np.float32)
    predictor = ThreeMasks(right, wrong)
    (best3,) = refine_location(predictor, image, [original], GeometryOptions(prompt="best3"))
    assert predictor.calls[-1]["multimask"] is True
    assert isinstance(best3, Refined)
    assert mask_iou(rasterize(best3.polygon, frame_window(160, 120)), right) > 0.95
    (box,) = refine_location(predictor, image, [original], GeometryOptions(prompt="box"))
    assert predictor.calls[-1]["multimask"] is False
    # With one mask, the box prompt gets the wrong object here: its overlap with the original is low.
    assert isinstance(box, Kept) or mask_iou(rasterize(box.polygon, frame_window(160, 120)), right) < 0.5


def test_box_and_shape_sends_the_outline_as_mask_logits():
    right, wrong, original = _two_objects()
    predictor = ThreeMasks(right, wrong)
    refine_location(predictor, np.zeros((120, 160, 3), np.float32), [original], GeometryOptions(prompt="box+shape"))
    inputs = predictor.calls[-1]["mask_inputs"]
    assert inputs.shape == (1, 1, 256, 256) and inputs.dtype == np.float32
    # The outline (x 32..68, y 42..78 in a 160x120 frame) maps to grid cols ~52..109, rows ~90..166.
    assert inputs[0, 0, 128, 80] > 7 and inputs[0, 0, 10, 10] < -7
    assert -8 <= inputs.min() and inputs.max() <= 8


def test_shape_on_grid_maps_frame_to_grid():
    doc = annotation_doc(np.array([[0, 0], [99, 0], [99, 49], [0, 49]], float))
    # A 100 x 200 region (rows x columns) on a 50 x 100 grid: one cell = 2 x 2 pixels.
    grid = shape_on_grid(to_original({**doc, "_id": "x"}).shape, Window(0, 0, 100, 200), (50, 100))
    expected = np.zeros((50, 100), bool)
    expected[:25, :50] = True  # x 0..99 = the left half, y 0..49 = the top half
    np.testing.assert_array_equal(grid, expected)
    logits = shape_logits(grid)
    assert logits[10, 20] > 7 and logits[40, 90] < -7


def test_quality_gate_rejects_shapes_far_from_their_original():
    yy, xx = np.mgrid[0:100, 0:100]
    obj = (xx - 50) ** 2 + (yy - 50) ** 2 < 15 ** 2
    image = np.repeat(obj.astype(np.float32)[..., None], 3, axis=2)
    loose = annotation_doc(np.array([[20, 20], [80, 20], [80, 80], [20, 80]], float))  # IoU ~0.2 with obj
    tight = annotation_doc(np.array([[36, 36], [64, 36], [64, 64], [36, 64]], float))  # IoU ~0.9 with obj
    originals = [to_original({**loose, "_id": "loose"}), to_original({**tight, "_id": "tight"})]
    outcomes = refine_location(KnownMaskPredictor(), image, originals, GeometryOptions(min_overlap=0.5))
    assert isinstance(outcomes[0], Kept) and "below the minimum (0.5)" in outcomes[0].reason
    assert isinstance(outcomes[1], Refined)
    outcomes = refine_location(KnownMaskPredictor(), image, originals, GeometryOptions(min_overlap=0))
    assert all(isinstance(o, Refined) for o in outcomes)


# -- through a job: gate warning, links, tags --------------------------------------------------

def run(server, ds, ckpt, predictor, **fields):
    values = {"Model": "sam2.1_hiera_tiny.pt", "Batch XY": "all", "Batch Z": "all", "Batch Time": "all"}
    values.update(fields)
    params = {"workerInterface": values, "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 0, "tags": ["refined"]}
    settings = parse_settings(params, ds.dataset_id, ckpt)
    reporter = Reporter(stream=io.StringIO())
    with NimbusClient(server.api_url, TOKEN, retry=RetryPolicy(total=1, backoff_factor=0.01)) as client:
        return job.run_compute(settings, client, reporter, lambda path: (predictor, False)), reporter


def scene_dataset(server, count=4):
    scene = cell_scene(128, 192, count, radius=(10.0, 14.0), seed=3)
    ds = server.add_dataset(scene.channels[None, None, None])
    rng = np.random.default_rng(2)
    docs = [annotation_doc(rough_polygon(scene.labels == k, "jittered", rng), tags=["cell", f"c{k}"])
            for k in range(1, scene.count + 1)]
    return ds, scene, server.add_annotations(ds.dataset_id, docs)


def test_gate_lists_rejected_originals_in_one_warning(server, ckpt):
    ds, scene, ids = scene_dataset(server)
    code, reporter = run(server, ds, ckpt, KnownMaskPredictor(labels=scene.labels),
                         **{"Minimum overlap with original": 0.99, "Delete original annotations": True})
    assert code == 0
    gate = [line for line in reporter.lines if "below the minimum (0.99)" in line.get("info", "")]
    assert len(gate) == 1 and gate[0]["title"] == "Annotations kept"
    assert f"{len(ids)} kept: {len(ids)} its overlap with the original is below the minimum (0.99)" in gate[0]["info"]
    assert {a["_id"] for a in server.annotations(ds.dataset_id)} == set(ids)  # none replaced, none deleted


def test_keep_original_tags(server, ckpt):
    ds, scene, ids = scene_dataset(server)
    code, _ = run(server, ds, ckpt, KnownMaskPredictor(labels=scene.labels), **{"Keep original tags": True})
    assert code == 0
    new = [a for a in server.annotations(ds.dataset_id) if a["_id"] not in ids]
    assert sorted(tuple(a["tags"]) for a in new) == [("refined", "cell", f"c{k}") for k in range(1, 5)]
    code, _ = run(server, ds, ckpt, KnownMaskPredictor(labels=scene.labels))  # off: tool tags only
    # (a re-run finds the earlier refinements and makes none)
    assert code == 0 and len(server.annotations(ds.dataset_id)) == 8


def test_links_are_moved_to_the_refined_annotations(server, ckpt):
    ds, scene, ids = scene_dataset(server)
    a, b, c, d = ids
    other = server.add_annotations(ds.dataset_id, [{"shape": "point", "tags": ["spot"], "channel": 0,
                                                    "location": {"XY": 0, "Z": 0, "Time": 0},
                                                    "coordinates": [{"x": 5, "y": 5}]}])[0]
    server.add_connections([
        {"parentId": a, "childId": b, "datasetId": ds.dataset_id, "label": "pair", "tags": ["t1"]},
        {"parentId": other, "childId": c, "datasetId": ds.dataset_id, "label": "spot-in-cell", "tags": []},
        {"parentId": d, "childId": other, "datasetId": ds.dataset_id, "label": "", "tags": ["t2"]},
    ])
    code, _ = run(server, ds, ckpt, KnownMaskPredictor(labels=scene.labels), **{"Delete original annotations": True})
    assert code == 0
    stored = {x["_id"]: x for x in server.annotations(ds.dataset_id)}
    assert not set(ids) & set(stored)
    refined_of = {x["sam2Refine"]["originalId"]: i for i, x in stored.items() if "sam2Refine" in x}
    links = {(con["parentId"], con["childId"], con["label"], tuple(con["tags"])) for con in server.connections()}
    assert links == {(refined_of[a], refined_of[b], "pair", ("t1",)),
                     (other, refined_of[c], "spot-in-cell", ()),
                     (refined_of[d], other, "", ("t2",))}


def test_link_failure_deletes_nothing(server, ckpt):
    ds, scene, ids = scene_dataset(server)
    server.add_connections([{"parentId": ids[0], "childId": ids[1], "datasetId": ds.dataset_id}])
    server.fail("POST", "annotation_connection/multiple", status=500)
    code, reporter = run(server, ds, ckpt, KnownMaskPredictor(labels=scene.labels),
                         **{"Delete original annotations": True})
    assert code == 1
    assert set(ids) <= {x["_id"] for x in server.annotations(ds.dataset_id)}
    assert server.requests_to("DELETE", "upenn_annotation/multiple") == []
    assert "no original annotation was deleted" in [x for x in reporter.lines if "error" in x][-1]["error"]
    # Once the server is healthy again, a re-run moves the link and deletes, without duplicates.
    server.clear_faults()
    code, _ = run(server, ds, ckpt, KnownMaskPredictor(labels=scene.labels), **{"Delete original annotations": True})
    assert code == 0
    assert len(server.annotations(ds.dataset_id)) == 4 and len(server.connections()) == 1


@pytest.mark.parametrize("field,value", [("Resolution", "Tiles"), ("Prompt", "Points"),
                                         ("Minimum overlap with original", 1.5), ("Keep original tags", "yes")])
def test_bad_new_settings_name_their_field(ckpt, field, value):
    params = {"workerInterface": {"Model": "sam2.1_hiera_tiny.pt", field: value}, "tile": {"XY": 0, "Z": 0, "Time": 0},
              "channel": 0, "tags": []}
    with pytest.raises(Exception) as caught:
        parse_settings(params, "ds", ckpt)
    assert [e.field for e in caught.value.errors] == [field]


def test_saved_tools_without_the_new_fields_keep_the_original_behaviour(ckpt):
    params = {"workerInterface": {"Model": "sam2.1_hiera_tiny.pt", "Resolution": None, "Prompt": ""},
              "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 0, "tags": []}
    settings = parse_settings(params, "ds", ckpt)
    assert (settings.resolution, settings.prompt, settings.min_overlap, settings.keep_original_tags) == \
        ("auto", "box", 0.0, False)


@pytest.mark.slow
def test_real_sam2_takes_shape_prompts_and_three_masks(checkpoint_dir):
    """The real model (random weights) through every prompt mode: shapes and flow, not quality."""
    from sam2_refine.model.sam2_model import Sam2BoxPredictor

    predictor, untrained = Sam2BoxPredictor.load(checkpoint_dir / "sam2.1_hiera_tiny.pt")
    assert untrained
    seen = []
    real_decode = predictor.decode

    def spy(boxes, mask_inputs=None, multimask=False, **kwargs):
        decoded = real_decode(boxes, mask_inputs, multimask, **kwargs)
        seen.append((None if mask_inputs is None else mask_inputs.shape, np.shape(decoded.logits[0]),
                     decoded.scores.shape))
        return decoded

    predictor.decode = spy
    image = np.random.default_rng(0).random((96, 128, 3)).astype(np.float32)
    doc = annotation_doc(np.array([[4, 4], [120, 6], [122, 90], [6, 88]], float))
    originals = [to_original({**doc, "_id": "big"}), to_original({**doc, "_id": "big2"})]
    for prompt in ("box", "box+shape", "best3"):
        outcomes = refine_location(predictor, image, originals, GeometryOptions(prompt=prompt))
        assert len(outcomes) == 2 and all(isinstance(o, (Refined, Kept)) for o in outcomes)
    # the engine asks for each prompt's window of the grid: here the whole frame (the box and
    # its margin cover all of it)
    assert seen == [(None, (1, 256, 256), (2, 1)),
                    ((2, 1, 256, 256), (1, 256, 256), (2, 1)),
                    (None, (3, 256, 256), (2, 3))]


def test_frames_too_large_for_a_whole_frame_copy_are_refined_in_crops(monkeypatch):
    """A 20000 x 20000 frame cannot be merged into one RGB float copy (4.8 GB): beyond the pixel
    budget the engine uses object crops whatever the Resolution field says, and merges only them."""
    from sam2_refine.engine import prompts
    from sam2_refine.engine.imaging import LocationImage, default_layers

    monkeypatch.setattr(prompts, "MAX_WHOLE_FRAME_PIXELS", 1000 * 1000)
    scene = cell_scene(1200, 1200, 12, radius=(9.0, 12.0), seed=8, noise=False)
    image = LocationImage({0: scene.channels[0]}, default_layers(1))
    embedded = []

    class Watching(KnownMaskPredictor):
        def embed(self, window):
            embedded.append(window.shape)
            super().embed(window)

    outcomes = refine_location(Watching(threshold=0.3), image, originals_for(scene.labels),
                               GeometryOptions(resolution="whole"))
    assert embedded and all(h * w < 1200 * 1200 for h, w, _ in embedded)
    assert mean_iou(outcomes, scene.labels) > 0.85


def test_regions_larger_than_the_model_input_are_merged_shrunk():
    """A model that squeezes its input to input_size gets the region already shrunk (cheaper to
    merge) and the region's size; a stand-in without input_size gets full resolution."""
    from sam2_refine.engine.imaging import LocationImage, default_layers

    scene = cell_scene(300, 300, 6, radius=(12.0, 16.0), seed=2, noise=False)
    image = LocationImage({0: scene.channels[0]}, default_layers(1))
    seen = []

    class Squeezing(ModelResolutionPredictor):
        def embed(self, window, region_hw=None):
            seen.append((window.shape, region_hw))
            super().embed(window, region_hw)

    outcomes = refine_location(Squeezing(input_size=64, grid=64, threshold=0.3), image,
                               originals_for(scene.labels), GeometryOptions(resolution="whole"))
    assert seen == [((64, 64, 3), (300, 300))]
    assert mean_iou(outcomes, scene.labels) > 0.6  # coarse (64 px model), but in the right place
    full = []

    class Full(KnownMaskPredictor):
        def embed(self, window):
            full.append(window.shape)
            super().embed(window)

    refine_location(Full(threshold=0.3), image, originals_for(scene.labels), GeometryOptions(resolution="whole"))
    assert full == [(300, 300, 3)]


@pytest.mark.slow
def test_real_sam2_shrunk_region_equals_full_region(checkpoint_dir):
    """Sam2BoxPredictor resizes to 1024 with area averaging itself: handing it the region already
    shrunk (with region_hw) must give the same masks for the same boxes."""
    from sam2_refine.engine.imaging import ArrayImage
    from sam2_refine.model.sam2_model import Sam2BoxPredictor

    predictor, _ = Sam2BoxPredictor.load(checkpoint_dir / "sam2.1_hiera_tiny.pt")
    rgb = np.random.default_rng(1).random((2500, 2100, 3)).astype(np.float32)
    boxes = np.array([[100.0, 200.0, 400.0, 380.0], [1500.0, 2000.0, 2050.0, 2450.0]])
    predictor.embed(rgb)
    full = predictor.decode(boxes)
    predictor.embed(ArrayImage(rgb).window_shrunk(0, 0, 2500, 2100, 1024), region_hw=(2500, 2100))
    shrunk = predictor.decode(boxes)
    np.testing.assert_allclose(shrunk.logits, full.logits, atol=1e-4)
