"""Window-local decoding (FastBoxDecoder.decode_windows) gives sam2's own decoder's logits inside
each prompt's window, and sam2's choice of mask: random-weight SAM2.1 tiny and small, CPU.

sam2's dynamic-multimask rule (single-mask output) and the best-of-three overlap need statistics
of the whole 256 x 256 grid; these tests show that windowing would change the choice if they
were taken from the window alone, and that the decoder counts them over the whole grid.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from sam2_refine.model.checkpoints import CHECKPOINT_CONFIGS
from sam2_refine.model.fast_decoder import FastBoxDecoder
from sam2_refine.model.logits import cells_for_windows, upsample_window
from sam2_refine.model.sam2_model import DeviceChoice, Sam2BoxPredictor, build_model, neighbourhood_cells
from sam2_refine.testing.checkpoints import sharpen_decoder

CPU = DeviceChoice("cpu", bfloat16=False, tf32=False)
LOGIT_TOL = 1e-3
IOU_TOL = 1e-4
GRID = 256


@dataclass
class Model:
    model: torch.nn.Module
    features: dict


def _embedded(model: torch.nn.Module, seed: int) -> Model:
    sharpen_decoder(model)
    predictor = Sam2BoxPredictor(model, CPU)
    predictor.embed(np.random.default_rng(seed).random((240, 320, 3), dtype=np.float32))
    return Model(model, predictor._predictor._features)


@pytest.fixture(scope="module")
def tiny(checkpoint_dir: Path) -> Model:
    return _embedded(build_model(checkpoint_dir / "sam2.1_hiera_tiny.pt", CPU), 3)


@pytest.fixture(scope="module")
def small() -> Iterator[Model]:
    from sam2.build_sam import build_sam2

    torch.manual_seed(1)
    yield _embedded(build_sam2(CHECKPOINT_CONFIGS["sam2.1_hiera_small.pt"], None, device="cpu", mode="eval"), 4)


@pytest.fixture(params=["tiny", "small"])
def setup(request: pytest.FixtureRequest) -> Model:
    return request.getfixturevalue(request.param)


def _sparse(model: torch.nn.Module, boxes: np.ndarray) -> torch.Tensor:
    coords = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 2, 2)
    labels = torch.tensor([[2, 3]], dtype=torch.int).repeat(len(boxes), 1)
    with torch.inference_mode():
        sparse, _ = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    return sparse


def _sam2_all(setup: Model, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All four masks and IoU predictions of sam2's decoder (before any rule)."""
    penc, dec = setup.model.sam_prompt_encoder, setup.model.sam_mask_decoder
    with torch.inference_mode():
        logits, iou, _, _ = dec.predict_masks(
            image_embeddings=setup.features["image_embed"], image_pe=penc.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=penc.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                len(sparse), -1, *penc.image_embedding_size),
            repeat_image=True, high_res_features=list(setup.features["high_res_feats"]))
    return logits, iou


def _sam2(setup: Model, sparse: torch.Tensor, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """sam2's decoder as the predictor calls it (its rule applied)."""
    penc = setup.model.sam_prompt_encoder
    with torch.inference_mode():
        logits, iou, _, _ = setup.model.sam_mask_decoder(
            image_embeddings=setup.features["image_embed"], image_pe=penc.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=penc.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                len(sparse), -1, *penc.image_embedding_size),
            multimask_output=multimask, repeat_image=len(sparse) > 1,
            high_res_features=list(setup.features["high_res_feats"]))
    return logits, iou


def _decoder(setup: Model, **kwargs: object) -> FastBoxDecoder:
    decoder = FastBoxDecoder(setup.model, **kwargs)
    with torch.inference_mode():
        decoder.set_image_features(setup.features["image_embed"], list(setup.features["high_res_feats"]))
    return decoder


def _boxes(rng: np.random.Generator, count: int) -> np.ndarray:
    x0, y0 = rng.uniform(0, 800, (2, count))
    w, h = rng.uniform(20, 400, (2, count))
    return np.stack([x0, y0, np.minimum(x0 + w, 1023), np.minimum(y0 + h, 1023)], 1)


#: windows of the 256 x 256 grid: touching every edge and corner, one cell, the whole grid,
#: odd sizes, not aligned to the 4 x 4 cells of an image token, partly outside (clipped)
WINDOWS = np.array([
    [0, 0, 17, 23], [240, 250, 256, 256], [0, 201, 9, 256], [199, 0, 256, 5], [100, 100, 101, 101],
    [0, 0, 256, 256], [37, 61, 130, 97], [-20, -3, 30, 40], [250, 120, 300, 190], [3, 5, 255, 7],
    [128, 128, 192, 192],
])


def _clipped(windows: np.ndarray) -> np.ndarray:
    out = np.clip(windows, 0, GRID)
    out[:, :2] = np.minimum(out[:, :2], GRID - 1)
    out[:, 2:] = np.maximum(out[:, 2:], out[:, :2] + 1)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("multimask", [False, True])
def test_logits_equal_sam2_inside_each_window(setup: Model, multimask: bool) -> None:
    rng = np.random.default_rng(5 + multimask)
    sparse = _sparse(setup.model, _boxes(rng, len(WINDOWS)))
    ref_logits, ref_iou = _sam2(setup, sparse, multimask)
    assert ref_logits.abs().max().item() > 5.0  # the tolerance is small relative to the logits
    for chunk in (None, 3):  # prompts of different window sizes in one chunk
        out = _decoder(setup, chunk=chunk).decode_windows(sparse, WINDOWS, multimask)
        np.testing.assert_array_equal(out.windows, _clipped(WINDOWS))
        assert out.areas is None
        torch.testing.assert_close(out.iou, ref_iou, atol=IOU_TOL, rtol=0)
        for k, (top, left, bottom, right) in enumerate(out.windows):
            expected = ref_logits[k, :, top:bottom, left:right]
            assert out.logits[k].shape == expected.shape  # nothing beyond the window is returned
            assert (out.logits[k] - expected).abs().max().item() <= LOGIT_TOL


def test_whole_grid_call_is_the_windowed_path(tiny: Model) -> None:
    """__call__ (the whole grid) equals sam2 too, and equals decode_windows on a full window."""
    sparse = _sparse(tiny.model, _boxes(np.random.default_rng(8), 4))
    decoder = _decoder(tiny)
    logits, iou = decoder(sparse, False)
    ref = _sam2(tiny, sparse, False)
    assert (logits - ref[0]).abs().max().item() <= LOGIT_TOL
    whole = decoder.decode_windows(sparse, [[0, 0, GRID, GRID]] * 4, False)
    torch.testing.assert_close(torch.stack(whole.logits), logits, atol=1e-5, rtol=0)


def _stability(logits: torch.Tensor, delta: float) -> torch.Tensor:
    flat = logits.flatten(-2)
    area_i, area_u = (flat > delta).sum(-1).float(), (flat > -delta).sum(-1).float()
    return torch.where(area_u > 0, area_i / area_u, 1.0)


@pytest.mark.slow
def test_dynamic_rule_counts_the_whole_grid(tiny: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """sam2 falls back from mask 0 to the best multimask output when mask 0's stability over the
    whole grid is low. With a threshold between the whole-grid and the in-window stability of
    mask 0, the window alone would choose the other mask for every prompt: the decoder must
    (and does) choose as sam2 does; counting in the window only (statistics=windows) does not."""
    dec = tiny.model.sam_mask_decoder
    assert dec.dynamic_multimask_via_stability  # as built by the worker (apply_postprocessing)
    delta = dec.dynamic_multimask_stability_delta
    rng = np.random.default_rng(11)
    sparse = _sparse(tiny.model, _boxes(rng, 40))
    windows = np.array([[r, c, r + 24, c + 24] for r, c in rng.integers(0, GRID - 24, (40, 2))])
    all_logits, all_iou = _sam2_all(tiny, sparse)
    whole = _stability(all_logits[:, 0], delta)
    local = torch.stack([_stability(all_logits[k, 0, r0:r1, c0:c1], delta)
                         for k, (r0, c0, r1, c1) in enumerate(windows)])
    # a threshold between the whole-grid and in-window stability of the prompt where they differ
    # most; the prompts it separates likewise
    p0 = int(torch.argmax((local - whole).abs()))
    thresh = float(local[p0] + whole[p0]) / 2
    low, high = torch.minimum(local, whole), torch.maximum(local, whole)
    chosen = [int(k) for k in torch.nonzero((low < thresh) & (thresh < high)).view(-1)]
    assert p0 in chosen and float(high[p0] - low[p0]) > 0.01
    monkeypatch.setattr(dec, "dynamic_multimask_stability_thresh", thresh)
    idx = torch.tensor(chosen)
    ref_logits, ref_iou = _sam2(tiny, sparse[idx], False)
    decoder = _decoder(tiny)
    got = decoder.decode_windows(sparse[idx], windows[chosen], False)
    torch.testing.assert_close(got.iou, ref_iou, atol=IOU_TOL, rtol=0)
    for k, (top, left, bottom, right) in enumerate(got.windows):
        assert (got.logits[k] - ref_logits[k, :, top:bottom, left:right]).abs().max().item() <= LOGIT_TOL
    # the same, counted in the windows only, takes the other mask for every one of these prompts
    local_rule = decoder.decode_windows(sparse[idx], windows[chosen], False, statistics=windows[chosen])
    best = all_iou[idx, 1:].argmax(1) + 1
    for k, p in enumerate(chosen):
        stable_whole = bool(whole[p] >= thresh)
        other = all_logits[p, 0] if not stable_whole else all_logits[p, int(best[k])]
        top, left, bottom, right = local_rule.windows[k]
        assert (local_rule.logits[k][0] - other[top:bottom, left:right]).abs().max().item() <= LOGIT_TOL


def test_areas_count_the_whole_grid(setup: Model) -> None:
    """With areas, each mask's positive cells over the whole grid (what best-of-three's overlap
    needs), whatever the window."""
    rng = np.random.default_rng(12)
    sparse = _sparse(setup.model, _boxes(rng, 6))
    windows = WINDOWS[:6]
    ref_logits, _ = _sam2(setup, sparse, True)
    out = _decoder(setup).decode_windows(sparse, windows, True, areas=True)
    expected = (ref_logits > 0).flatten(2).sum(-1)
    # a cell within float rounding of 0 may count on either side
    near_zero = (ref_logits.abs() < LOGIT_TOL).flatten(2).sum(-1)
    assert ((out.areas - expected).abs() <= near_zero).all()
    single = _decoder(setup).decode_windows(sparse, windows, False, areas=True)
    ref_single, _ = _sam2(setup, sparse, False)
    assert ((single.areas[:, 0] - (ref_single[:, 0] > 0).flatten(1).sum(-1)).abs() <= near_zero.max()).all()


def test_statistics_cells_are_where_counts_are_taken(tiny: Model) -> None:
    """statistics=whole grid is the exact rule; statistics=cells counts exactly there."""
    rng = np.random.default_rng(13)
    sparse = _sparse(tiny.model, _boxes(rng, 5))
    decoder = _decoder(tiny)
    exact = decoder.decode_windows(sparse, WINDOWS[:5], True, areas=True)
    same = decoder.decode_windows(sparse, WINDOWS[:5], True, areas=True, statistics=[[0, 0, GRID, GRID]] * 5)
    torch.testing.assert_close(same.areas, exact.areas, atol=2, rtol=0)
    cells = np.array([[10, 20, 90, 130]] * 5)
    local = decoder.decode_windows(sparse, WINDOWS[:5], True, areas=True, statistics=cells)
    ref_logits, _ = _sam2(tiny, sparse, True)
    expected = (ref_logits[:, :, 10:90, 20:130] > 0).flatten(2).sum(-1)
    assert (local.areas - expected).abs().max().item() <= 2


@pytest.mark.slow
def test_predictor_windows_equal_whole_grid_crops(tiny: Model) -> None:
    """Sam2BoxPredictor.decode(windows=...) in region pixels: the fast decoder's windows and
    sam2's decoder's whole grid cut to the same cells agree; each prompt's array is its window."""
    fast = Sam2BoxPredictor(tiny.model, CPU)
    slow = Sam2BoxPredictor(tiny.model, CPU, fast_decoder=False)
    image = np.random.default_rng(3).random((240, 320, 3), dtype=np.float32)
    fast.embed(image)
    slow.embed(image)
    boxes = np.array([[0, 0, 40, 30], [280, 200, 319, 239], [100, 50, 220, 180], [5, 100, 60, 230]], float)
    windows = np.array([[-5, -5, 45, 50], [190, 270, 250, 330], [40, 90, 190, 230], [90, 0, 239, 70]])
    cells = cells_for_windows(windows, (GRID, GRID), (240, 320))
    for multimask in (False, True):
        got = fast.decode(boxes, multimask=multimask, windows=windows, areas=multimask)
        ref = slow.decode(boxes, multimask=multimask, windows=windows, areas=multimask)
        full = slow.decode(boxes, multimask=multimask)
        np.testing.assert_array_equal(got.windows, cells)
        np.testing.assert_array_equal(ref.windows, cells)
        assert got.grid_size == ref.grid_size == (GRID, GRID)
        np.testing.assert_allclose(got.scores, ref.scores, atol=IOU_TOL, rtol=0)
        for k, (top, left, bottom, right) in enumerate(cells):
            assert got.logits[k].shape == (full.logits.shape[1], bottom - top, right - left)
            assert got.logits[k].base is None or got.logits[k].base.nbytes == got.logits[k].nbytes
            np.testing.assert_allclose(got.logits[k], ref.logits[k], atol=LOGIT_TOL, rtol=0)
            np.testing.assert_allclose(ref.logits[k], full.logits[k, :, top:bottom, left:right])
            # upsampling the window's pixels from the patch equals upsampling the whole grid
            rows = (max(windows[k, 0], 0), min(windows[k, 2], 240))
            cols = (max(windows[k, 1], 0), min(windows[k, 3], 320))
            np.testing.assert_allclose(upsample_window(got.mask(k, 0), (240, 320), rows, cols),
                                       upsample_window(full.logits[k, 0], (240, 320), rows, cols),
                                       atol=LOGIT_TOL, rtol=0)
        if multimask:
            np.testing.assert_array_equal(ref.areas, np.count_nonzero(full.logits > 0, axis=(2, 3)))
            assert np.abs(got.areas - ref.areas).max() <= 2


def test_memory_is_bounded_by_the_windows_at_any_count(tiny: Model) -> None:
    """Many prompts with small windows: every returned array is its window, owning no larger
    buffer; a window larger than the grid is clipped to it."""
    rng = np.random.default_rng(14)
    count = 150
    sparse = _sparse(tiny.model, _boxes(rng, count))
    windows = np.array([[r, c, r + 12, c + 9] for r, c in rng.integers(-4, GRID - 4, (count, 2))])
    windows[0] = [-1000, -1000, 5000, 5000]
    out = _decoder(tiny, chunk=4).decode_windows(sparse, windows, True)
    for k, logits in enumerate(out.logits):
        top, left, bottom, right = out.windows[k]
        assert logits.shape == (3, bottom - top, right - left)
        assert logits.untyped_storage().nbytes() == logits.numel() * logits.element_size()
    assert tuple(out.windows[0]) == (0, 0, GRID, GRID)
    assert max(x.numel() for x in out.logits[1:]) <= 3 * 12 * 9


def test_neighbourhood_cells() -> None:
    cells = neighbourhood_cells(np.array([[100.0, 200.0, 163.0, 231.0]]), (1024, 1024), (GRID, GRID))
    # box cells x 25.1..41.0, y 50.1..58.0; its larger side is 16 cells
    np.testing.assert_array_equal(cells, [[34, 9, 74, 57]])
