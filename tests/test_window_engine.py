"""The engine with windowed decoding: a job's outlines and counts are those it makes without it.

The model is the real SAM2.1 tiny (random weights) through Sam2BoxPredictor: sam2's own mask
decoder over the whole grid, against the windowed fast decoder. Random weights alone give noise
masks the engine rejects, so their logits (times 16) are added to those of the object under each
box (bench/realistic_masks.py, the speed benchmark's oracle): masks are realistic and accepted,
and every outline still depends on the real decoder's values (and on its choice of mask by
sam2's dynamic-multimask rule), in the window or over the whole grid. Rough outlines much
smaller than their objects make windows grow, which re-decodes.
"""

from __future__ import annotations

import io
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from shapely.geometry import Polygon

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from realistic_masks import MaskOracle  # noqa: E402

from sam2_refine.job import compute as job  # noqa: E402
from sam2_refine.engine.geometry import Window, frame_window  # noqa: E402
from sam2_refine.model.logits import GridPatch  # noqa: E402
from sam2_refine.nimbus.client import NimbusClient  # noqa: E402
from sam2_refine.model.predictor import Decoded, from_whole_grid  # noqa: E402
from sam2_refine.engine.options import BEST_OF_THREE, GeometryOptions  # noqa: E402
from sam2_refine.engine.objects import LargerWindow, ObjectMask, _box_object  # noqa: E402
from sam2_refine.engine.prompts import Prompt  # noqa: E402
from sam2_refine.engine.location import refine_location  # noqa: E402
from sam2_refine.annotations import Refined  # noqa: E402
from sam2_refine.nimbus.progress import Reporter  # noqa: E402
from sam2_refine.model.sam2_model import Sam2BoxPredictor  # noqa: E402
from sam2_refine.annotations import Original  # noqa: E402
from sam2_refine.job.settings import parse_settings  # noqa: E402
from sam2_refine.testing.datasets import annotation_doc, grid_scene, rough_octagons  # noqa: E402
from sam2_refine.testing.stand_in import KnownMaskPredictor  # noqa: E402

from conftest import TOKEN  # noqa: E402


class ModelPlusObject:
    """The real predictor's logits (windowed when the engine asks) plus the oracle's logits of
    the object under each box; records every decode call."""

    def __init__(self, predictor: Sam2BoxPredictor, weight: float, windows: bool) -> None:
        self.predictor = predictor
        self.oracle = MaskOracle()
        self.weight = weight
        self.description = predictor.description
        self.max_batch = predictor.max_batch
        self.mask_input_size = predictor.mask_input_size
        self.input_size = predictor.input_size
        if windows:
            self.logit_grid = predictor.logit_grid
        self.calls: list[tuple[int, int, bool]] = []  # (thread, prompts, windowed)

    def embed(self, image: np.ndarray, region_hw: tuple[int, int] | None = None) -> None:
        self.predictor.embed(image, region_hw)
        self.oracle.prepare(image, region_hw)

    def decode(self, boxes: np.ndarray, mask_inputs: np.ndarray | None = None, multimask: bool = False, *,
               windows: np.ndarray | None = None, areas: bool = False) -> Decoded:
        self.calls.append((threading.get_ident(), len(boxes), windows is not None))
        assert not areas  # box prompts: the dynamic-multimask rule chooses inside the decoder
        real = self.predictor.decode(boxes, mask_inputs, multimask,
                                     **({} if windows is None else {"windows": windows}))
        truth = self.oracle.logits(boxes)
        truth = from_whole_grid(np.repeat(truth, real.scores.shape[1], axis=1), real.scores,
                                self.oracle.region_hw, windows=windows)
        if windows is None:
            return Decoded(truth.logits + self.weight * real.logits, real.scores)
        np.testing.assert_array_equal(truth.windows, real.windows)
        combined = tuple(t + self.weight * r for t, r in zip(truth.logits, real.logits, strict=True))
        return Decoded(combined, real.scores, real.windows, real.grid_hw)


#: Rods (x, top, bottom) right of the disks, each outlined by a short box at its middle: its
#: mask runs far beyond the first window, beyond what is decoded at first (GROWTH_PAID)
RODS = [(560, 60, 220), (620, 200, 380), (670, 300, 470)]


def _dataset(server: Any) -> tuple[str, list[str]]:
    scene = grid_scene(512, 512, 30, seed=2)
    rng = np.random.default_rng(3)
    rings = rough_octagons(scene.centres, scene.radii, rng)
    # every third outline half its object's size: its mask overflows the first window, which grows
    small = rough_octagons(scene.centres, scene.radii * 0.5, rng, jitter=0.05)
    rings = [small[k] if k % 3 == 0 else ring for k, ring in enumerate(rings)]
    pixels = np.full((1, 512, 720), 2000, np.uint16)
    pixels[:, :, :512] = scene.channels
    for x, top, bottom in RODS:
        pixels[0, top:bottom, x - 4:x + 4] = 30000
        middle = (top + bottom) / 2
        rings.append(np.array([[x - 10, middle - 15], [x + 10, middle - 15], [x + 10, middle + 15],
                               [x - 10, middle + 15]], float))
    ds = server.add_dataset(pixels[None, None, None])
    docs = [annotation_doc(ring, tags=["rough"]) for ring in rings]
    ids = server.add_annotations(ds.dataset_id, docs)
    return ds.dataset_id, ids


def _run(server: Any, dataset_id: str, checkpoint_dir: Path, predictor: Any) -> int:
    params = {"workerInterface": {"Model": "sam2.1_hiera_tiny.pt", "Tag of objects to refine": ["rough"],
                                  "Batch XY": "all", "Batch Z": "all", "Batch Time": "all", "Smoothing": 0.7,
                                  "Padding": 0, "Delete original annotations": False, "Resolution": "Whole frame"},
              "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 0, "tags": ["refined"]}
    settings = parse_settings(params, dataset_id, checkpoint_dir)
    with NimbusClient(server.api_url, TOKEN) as client:
        return job.run_compute(settings, client, Reporter(stream=io.StringIO()), lambda path: (predictor, False))


def _refinements(server: Any, dataset_id: str, originals: list[str]) -> dict[int, Polygon]:
    index = {oid: k for k, oid in enumerate(originals)}
    out = {}
    for doc in server.annotations(dataset_id):
        if "refined" in doc["tags"]:
            ring = [(p["x"], p["y"]) for p in doc["coordinates"]]
            out[index[doc["sam2Refine"]["originalId"]]] = Polygon(ring)
    return out


@pytest.mark.slow
def test_job_outlines_and_counts_do_not_change_with_windows(server: Any, checkpoint_dir: Path) -> None:
    # without windows: sam2's own decoder over the whole grid; with: the windowed fast decoder
    fast, _ = Sam2BoxPredictor.load(checkpoint_dir / "sam2.1_hiera_tiny.pt", max_batch=8)
    slow = Sam2BoxPredictor(fast.model, fast.choice, max_batch=8, fast_decoder=False)
    assert fast._fast is not None and slow._fast is None
    results, calls = [], []
    for windows, predictor in ((False, slow), (True, fast)):
        dataset_id, originals = _dataset(server)
        model = ModelPlusObject(predictor, weight=16.0, windows=windows)
        assert _run(server, dataset_id, checkpoint_dir, model) == 0
        results.append(_refinements(server, dataset_id, originals))
        calls.append(model.calls)
    whole, windowed = results
    assert len(whole) >= 28  # realistic masks: (nearly) all accepted
    assert all(k in whole for k in range(30, 33))  # the rods, whole
    assert sorted(whole) == sorted(windowed)  # the same originals refined, the same kept
    for k, polygon in whole.items():
        other = windowed[k]
        assert polygon.hausdorff_distance(other) < 1e-3, k
        assert len(polygon.exterior.coords) == len(other.exterior.coords), k
    # the model ran on the job's thread; the windowed run decoded windows and re-decoded the
    # prompts whose masks outgrew theirs (the half-size outlines), the other run neither
    main = threading.get_ident()
    assert {t for t, _, _ in calls[0] + calls[1]} == {main}
    assert not any(w for _, _, w in calls[0]) and all(w for _, _, w in calls[1])
    first_pass = sum(n for _, n, _ in calls[0])
    assert first_pass == 33
    assert sum(n for _, n, _ in calls[1]) >= first_pass + 3  # growth re-decoded the rods


def _original(shape: Polygon, oid: str = "a") -> Original:
    return Original(oid, (0, 0, 0), (), shape, None, {})


def test_tracing_asks_for_a_larger_window_and_the_engine_re_decodes() -> None:
    """A mask that outgrows the logits it was given: object_mask (pure) answers LargerWindow;
    refine_location decodes that prompt again for it and ends with the whole-grid outline."""
    frame = np.zeros((256, 256, 3), np.float32)
    frame[124:132, 50:206] = 1.0  # a rod
    shape = Polygon([(113, 118), (143, 118), (143, 138), (113, 138)])  # a box on its middle
    whole = KnownMaskPredictor(grid=(128, 128))
    whole.logit_grid = None  # the same answers, never windowed
    windowed = KnownMaskPredictor(grid=(128, 128))
    calls: list[tuple[int, int]] = []
    real = windowed.decode

    def spy(boxes: np.ndarray, *args: Any, **kwargs: Any) -> Decoded:
        calls.append((threading.get_ident(), len(boxes)))
        return real(boxes, *args, **kwargs)

    windowed.decode = spy  # type: ignore[method-assign]
    options = GeometryOptions(resolution="whole")
    ref = refine_location(whole, frame, [_original(shape)], options)[0]
    got = refine_location(windowed, frame, [_original(shape)], options)[0]
    assert isinstance(ref, Refined) and isinstance(got, Refined)
    assert got.polygon.symmetric_difference(ref.polygon).area < 1e-6
    assert len(calls) >= 2 and {t for t, _ in calls} == {threading.get_ident()}  # grew, decoded again
    # the pure step: a patch holding only the first window's cells
    windowed.embed(frame)
    first = real(np.array([[113.0, 118.0, 143.0, 138.0]]), windows=np.array([[110, 105, 147, 152]]))
    prompt = Prompt(_original(shape), np.array([113.0, 118.0, 143.0, 138.0]))
    answer = _box_object(first.mask(0, 0), prompt, frame_window(256, 256), (256, 256))
    assert isinstance(answer, LargerWindow) and answer.margin > 8.0
    assert answer.window.contains(Window.around(prompt.box, answer.margin / 2, frame_window(256, 256)))
    assert not first.mask(0, 0).covers((0, 0, 128, 128))
    assert isinstance(_box_object(GridPatch.whole(whole.decode(prompt.box[None]).logits[0, 0]), prompt,
                                  frame_window(256, 256), (256, 256)), ObjectMask)


class ThreeMasks:
    """Three masks per box: the object, the object plus a distant blob (the larger union), and a
    ring; whole-grid logits cut to windows when asked."""

    description = "three-mask stand-in"
    max_batch = 8
    mask_input_size = (256, 256)
    logit_grid = (256, 256)
    input_size = None

    def __init__(self) -> None:
        yy, xx = np.mgrid[0:256, 0:256]
        disk = (xx - 60) ** 2 + (yy - 60) ** 2 < 20 ** 2
        blob = (xx - 200) ** 2 + (yy - 200) ** 2 < 40 ** 2
        near = (xx - 60) ** 2 + (yy - 60) ** 2 < 22 ** 2
        self.masks = [near | blob, disk, np.zeros_like(disk)]
        self.asked: list[Any] = []

    def embed(self, image: np.ndarray) -> None:
        pass

    def decode(self, boxes: np.ndarray, mask_inputs: np.ndarray | None = None, multimask: bool = False, *,
               windows: np.ndarray | None = None, areas: bool = False) -> Decoded:
        self.asked.append((windows is not None, areas))
        logits = np.stack([np.stack([np.where(m, 8.0, -8.0).astype(np.float32) for m in self.masks])] * len(boxes))
        scores = np.tile(np.array([0.9, 0.5, 0.1], np.float32), (len(boxes), 1))
        return from_whole_grid(logits, scores, (256, 256), windows=windows, areas=areas)


def test_best_of_three_counts_whole_grid_areas_with_windows() -> None:
    """Best of three keeps the mask that overlaps the original most over the whole grid. Inside
    the window the first mask (the object and a ring around it) overlaps nearly as well as the
    second (the object); over the whole grid its distant blob makes it worse. The windowed
    engine must ask for the areas and choose the same mask."""
    frame = np.zeros((256, 256, 3), np.float32)
    shape = Polygon([(40, 40), (80, 40), (80, 80), (40, 80)]).buffer(0)
    options = GeometryOptions(resolution="whole", prompt=BEST_OF_THREE)
    windowed = ThreeMasks()
    whole = ThreeMasks()
    whole.logit_grid = None  # type: ignore[assignment]
    got = refine_location(windowed, frame, [_original(shape)], options)[0]
    ref = refine_location(whole, frame, [_original(shape)], options)[0]
    assert windowed.asked[0] == (True, True) and whole.asked[0] == (False, False)
    assert isinstance(got, Refined) and isinstance(ref, Refined)
    assert got.polygon.symmetric_difference(ref.polygon).area < 1e-6
    assert abs(got.polygon.area - np.pi * 20 ** 2) < 0.05 * np.pi * 20 ** 2  # the object, not object + ring
