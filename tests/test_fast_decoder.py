"""FastBoxDecoder gives sam2's own mask decoder's output (random-weight SAM2.1 tiny, CPU)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from sam2_refine.model.fast_decoder import FastBoxDecoder, UnsupportedModelError
from sam2_refine.model.sam2_model import DeviceChoice, Sam2BoxPredictor, build_model
from sam2_refine.testing.checkpoints import sharpen_decoder

CPU = DeviceChoice("cpu", bfloat16=False, tf32=False)
LOGIT_TOL = 1e-3
IOU_TOL = 1e-4


@dataclass
class Setup:
    model: torch.nn.Module
    fast: Sam2BoxPredictor
    slow: Sam2BoxPredictor
    image_hw: tuple[int, int]

    @property
    def features(self) -> dict:
        return self.fast._predictor._features


@pytest.fixture(scope="module")
def setup(checkpoint_dir: Path) -> Iterator[Setup]:
    model = build_model(checkpoint_dir / "sam2.1_hiera_tiny.pt", CPU)
    sharpen_decoder(model)
    fast = Sam2BoxPredictor(model, CPU, fast_decoder=True)
    slow = Sam2BoxPredictor(model, CPU, fast_decoder=False)
    image = np.random.default_rng(3).random((300, 400, 3), dtype=np.float32)
    fast.embed(image)
    slow.embed(image)
    yield Setup(model, fast, slow, image.shape[:2])


def _random_boxes(rng: np.random.Generator, count: int, size: float) -> np.ndarray:
    x0, y0 = rng.uniform(0, 0.7 * size, (2, count))
    w, h = rng.uniform(0.05 * size, 0.6 * size, (2, count))
    return np.stack([x0, y0, np.minimum(x0 + w, size), np.minimum(y0 + h, size)], 1)


def _sparse(model: torch.nn.Module, boxes: np.ndarray) -> torch.Tensor:
    """Box prompts (model input coordinates) encoded as sam2_model does it."""
    coords = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 2, 2)
    labels = torch.tensor([[2, 3]], dtype=torch.int).repeat(len(boxes), 1)
    sparse, _ = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    return sparse


def _sam2(model: torch.nn.Module, features: dict, sparse: torch.Tensor, multimask: bool,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """sam2's own decoder, called as sam2_model does (no mask input)."""
    penc = model.sam_prompt_encoder
    dense = penc.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
        len(sparse), -1, *penc.image_embedding_size)
    logits, iou, _, _ = model.sam_mask_decoder(
        image_embeddings=features["image_embed"], image_pe=penc.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
        multimask_output=multimask, repeat_image=len(sparse) > 1,
        high_res_features=list(features["high_res_feats"]))
    return logits, iou


def _assert_close(fast: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> None:
    (logits, iou), (ref_logits, ref_iou) = fast, ref
    assert logits.shape == ref_logits.shape and logits.dtype == torch.float32
    assert iou.shape == ref_iou.shape
    assert (logits - ref_logits).abs().max().item() <= LOGIT_TOL
    assert (iou - ref_iou).abs().max().item() <= IOU_TOL


@pytest.mark.slow
@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("batch", [1, 7])
def test_matches_sam2_decoder(setup: Setup, batch: int, multimask: bool) -> None:
    rng = np.random.default_rng(batch + 10 * multimask)
    decoder = FastBoxDecoder(setup.model)
    feats = setup.features
    with torch.inference_mode():
        decoder.set_image_features(feats["image_embed"], list(feats["high_res_feats"]))
        sparse = _sparse(setup.model, _random_boxes(rng, batch, 1024.0))
        ref = _sam2(setup.model, feats, sparse, multimask)
        got = decoder(sparse, multimask)
    assert ref[0].shape == (batch, 3 if multimask else 1, 256, 256)
    assert ref[0].abs().max().item() > 5.0  # the tolerance is small relative to the logits
    _assert_close(got, ref)


@pytest.mark.slow
def test_point_prompts(setup: Setup) -> None:
    """Any number of sparse tokens works (here one positive point and sam2's padding point)."""
    decoder = FastBoxDecoder(setup.model)
    feats = setup.features
    coords = torch.as_tensor(np.random.default_rng(4).uniform(0, 1024, (3, 1, 2)), dtype=torch.float32)
    with torch.inference_mode():
        decoder.set_image_features(feats["image_embed"], list(feats["high_res_feats"]))
        sparse, _ = setup.model.sam_prompt_encoder(
            points=(coords, torch.ones(3, 1, dtype=torch.int)), boxes=None, masks=None)
        assert sparse.shape[1] == 2
        _assert_close(decoder(sparse, False), _sam2(setup.model, feats, sparse, False))


@pytest.mark.slow
def test_chunking_does_not_change_the_output(setup: Setup) -> None:
    feats = setup.features
    rng = np.random.default_rng(5)
    outs = []
    with torch.inference_mode():
        sparse = _sparse(setup.model, _random_boxes(rng, 5, 1024.0))
        for chunk in (1, 2, 5):
            decoder = FastBoxDecoder(setup.model, chunk=chunk, tile=1024 * chunk)
            decoder.set_image_features(feats["image_embed"], list(feats["high_res_feats"]))
            outs.append(decoder(sparse, False))
    for logits, iou in outs[1:]:
        torch.testing.assert_close(logits, outs[0][0], atol=1e-4, rtol=0)
        torch.testing.assert_close(iou, outs[0][1], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_weights_changed_after_set_image_features(setup: Setup) -> None:
    """The per-image cache depends on the weights: it is redone when they change in place."""
    feats = setup.features
    norm = setup.model.sam_mask_decoder.transformer.layers[1].norm4
    saved = norm.weight.detach().clone()
    decoder = FastBoxDecoder(setup.model)
    try:
        with torch.inference_mode():
            decoder.set_image_features(feats["image_embed"], list(feats["high_res_feats"]))
            sparse = _sparse(setup.model, _random_boxes(np.random.default_rng(8), 2, 1024.0))
            before = decoder(sparse, False)
        with torch.no_grad():
            norm.weight.mul_(1.5)
        with torch.inference_mode():
            ref = _sam2(setup.model, feats, sparse, False)
            got = decoder(sparse, False)
        assert (before[0] - ref[0]).abs().max().item() > 10 * LOGIT_TOL  # the change matters
        _assert_close(got, ref)
    finally:
        with torch.no_grad():
            norm.weight.copy_(saved)


@pytest.mark.slow
def test_dynamic_multimask_fallback(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """With one mask asked for, sam2 falls back to the best of the three multimask outputs
    for prompts whose single mask is unstable; the fast decoder must choose alike."""
    dec = setup.model.sam_mask_decoder
    assert dec.dynamic_multimask_via_stability
    feats = setup.features
    rng = np.random.default_rng(11)
    with torch.inference_mode():
        sparse = _sparse(setup.model, _random_boxes(rng, 12, 1024.0))
        penc = setup.model.sam_prompt_encoder
        all_logits, all_iou, _, _ = dec.predict_masks(
            image_embeddings=feats["image_embed"], image_pe=penc.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=penc.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                len(sparse), -1, *penc.image_embedding_size),
            repeat_image=True, high_res_features=list(feats["high_res_feats"]))
        stability = dec._get_stability_scores(all_logits[:, :1])[:, 0].sort().values
    # A threshold in the widest gap between the prompts' stability scores (not at either end),
    # so that some prompts keep the single mask and some fall back.
    gaps = stability[1:] - stability[:-1]
    widest = int(torch.argmax(gaps[1:-1])) + 1
    assert gaps[widest] > 1e-4
    monkeypatch.setattr(dec, "dynamic_multimask_stability_thresh",
                        float(stability[widest] + stability[widest + 1]) / 2)
    decoder = FastBoxDecoder(setup.model)
    with torch.inference_mode():
        decoder.set_image_features(feats["image_embed"], list(feats["high_res_feats"]))
        ref = _sam2(setup.model, feats, sparse, False)
        got = decoder(sparse, False)
        stable = (dec._get_stability_scores(all_logits[:, :1])[:, 0]
                  >= dec.dynamic_multimask_stability_thresh)
    assert 0 < int(stable.sum()) < len(stable)  # both branches occur
    best = all_iou[:, 1:].argmax(1) + 1
    rows = torch.arange(len(sparse))
    expected = torch.where(stable[:, None, None], all_logits[:, 0], all_logits[rows, best])
    torch.testing.assert_close(ref[0][:, 0], expected)  # the rule as understood here
    _assert_close(got, ref)


def fast_decoder_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one at each call of FastBoxDecoder (which still runs)."""
    calls: list[int] = []
    original = FastBoxDecoder.__call__

    def spy(self: FastBoxDecoder, *args: object, **kwargs: object) -> object:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FastBoxDecoder, "__call__", spy)
    return calls


@pytest.mark.parametrize("multimask", [False, True])
def test_predictor_fast_equals_sam2(setup: Setup, multimask: bool,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fast_decoder_calls(monkeypatch)
    height, width = setup.image_hw
    boxes = _random_boxes(np.random.default_rng(21), 6, float(min(height, width)))
    fast = setup.fast.decode(boxes, multimask=multimask)
    assert len(calls) == 1
    slow = setup.slow.decode(boxes, multimask=multimask)
    assert len(calls) == 1
    assert fast.logits.shape == slow.logits.shape == (6, 3 if multimask else 1, 256, 256)
    assert fast.logits.dtype == np.float32 and fast.scores.dtype == np.float32
    np.testing.assert_allclose(fast.logits, slow.logits, rtol=0, atol=LOGIT_TOL)
    np.testing.assert_allclose(fast.scores, slow.scores, rtol=0, atol=IOU_TOL)


def test_predictor_mask_input_uses_sam2(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the fast decoder does not take mask inputs")

    monkeypatch.setattr(FastBoxDecoder, "__call__", fail)
    boxes = np.array([[20.0, 30.0, 200.0, 150.0], [100.0, 40.0, 300.0, 280.0]])
    masks = np.random.default_rng(2).normal(0, 4, (2, 1, 256, 256)).astype(np.float32)
    fast = setup.fast.decode(boxes, mask_inputs=masks)
    slow = setup.slow.decode(boxes, mask_inputs=masks)
    np.testing.assert_array_equal(fast.logits, slow.logits)


def test_unsupported_models_raise(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    dec = setup.model.sam_mask_decoder
    with monkeypatch.context() as patch:
        patch.setattr(dec, "use_high_res_features", False)
        with pytest.raises(UnsupportedModelError):
            FastBoxDecoder(setup.model)
        assert Sam2BoxPredictor(setup.model, CPU)._fast is None  # falls back to sam2's decoder
    layers = dec.transformer.layers
    try:
        dec.transformer.layers = torch.nn.ModuleList(list(layers)[:1])
        with pytest.raises(UnsupportedModelError):
            FastBoxDecoder(setup.model)
    finally:
        dec.transformer.layers = layers
    with monkeypatch.context() as patch:
        patch.setattr(dec.transformer.layers[1], "skip_first_layer_pe", True)
        with pytest.raises(UnsupportedModelError):
            FastBoxDecoder(setup.model)
    FastBoxDecoder(setup.model)  # restored


def test_decoding_before_an_image_raises(setup: Setup) -> None:
    decoder = FastBoxDecoder(setup.model)
    with pytest.raises(RuntimeError):
        decoder(torch.zeros(1, 3, 256), False)


def test_empty_batch(setup: Setup) -> None:
    decoder = FastBoxDecoder(setup.model)
    feats = setup.features
    decoder.set_image_features(feats["image_embed"], list(feats["high_res_feats"]))
    for multimask, count in ((False, 1), (True, 3)):
        logits, iou = decoder(torch.zeros(0, 3, 256), multimask)
        assert logits.shape == (0, count, 256, 256) and iou.shape == (0, count)


@pytest.mark.parametrize("negatives", [0, 2])
def test_predictor_point_prompts_match_sam2_image_predictor(setup: Setup, negatives: int,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Point prompts (issue 13) through ``decode(None, points=..., point_labels=...)``: the fast
    decoder runs them and gives what sam2's own ``SAM2ImagePredictor.predict(point_coords=...,
    point_labels=...)`` gives on the same image features (sam2 normalises by the image size
    and its prompt encoder appends the padding point; here pixel centres are at integers, so
    sam2 is given the coordinates + 0.5)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    calls = fast_decoder_calls(monkeypatch)
    height, width = setup.image_hw
    rng = np.random.default_rng(31 + negatives)
    count = 4
    points = np.stack([rng.uniform(0, width - 1, (count, 1 + negatives)),
                       rng.uniform(0, height - 1, (count, 1 + negatives))], axis=2)
    labels = np.zeros((count, 1 + negatives), dtype=np.int64)
    labels[:, 0] = 1
    fast = setup.fast.decode(None, multimask=True, points=points, point_labels=labels)
    assert len(calls) == 1  # the fast decoder decoded them
    slow = setup.slow.decode(None, multimask=True, points=points, point_labels=labels)
    assert fast.logits.shape == (count, 3, 256, 256) and fast.scores.shape == (count, 3)
    np.testing.assert_allclose(fast.logits, slow.logits, rtol=0, atol=LOGIT_TOL)

    reference = SAM2ImagePredictor(setup.model)
    reference._features = setup.features
    reference._orig_hw = [setup.image_hw]
    reference._is_image_set = True
    with torch.inference_mode():
        _, scores, low_res = reference.predict(point_coords=points + 0.5, point_labels=labels,
                                               multimask_output=True, return_logits=True)
    np.testing.assert_allclose(slow.logits, low_res, rtol=0, atol=LOGIT_TOL)
    np.testing.assert_allclose(slow.scores, scores, rtol=0, atol=IOU_TOL)


def test_predictor_boxes_and_points_in_one_prompt(setup: Setup) -> None:
    """A box and points together: the box's corners first, then the points, as sam2 does."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    boxes = np.array([[40.0, 50.0, 200.0, 180.0], [150.0, 20.0, 330.0, 260.0]])
    points = np.array([[[100.0, 100.0]], [[200.0, 150.0]]])
    labels = np.array([[1], [0]])
    got = setup.slow.decode(boxes, multimask=False, points=points, point_labels=labels)
    reference = SAM2ImagePredictor(setup.model)
    reference._features = setup.features
    reference._orig_hw = [setup.image_hw]
    reference._is_image_set = True
    with torch.inference_mode():
        _, _, low_res = reference.predict(point_coords=points + 0.5, point_labels=labels, box=boxes + 0.5,
                                          multimask_output=False, return_logits=True)
    np.testing.assert_allclose(got.logits, low_res, rtol=0, atol=LOGIT_TOL)


def test_prompt_points_are_checked() -> None:
    from sam2_refine.model.sam2_model import model_prompt_points

    with pytest.raises(ValueError, match="boxes or points"):
        model_prompt_points(None, None, None, (100, 100), 1024)
    with pytest.raises(ValueError, match="point_labels"):
        model_prompt_points(None, np.zeros((1, 1, 2)), None, (100, 100), 1024)
    with pytest.raises(ValueError, match="expected points"):
        model_prompt_points(None, np.zeros((1, 2)), np.zeros((1, 2)), (100, 100), 1024)
    with pytest.raises(ValueError, match="2 boxes but 1"):
        model_prompt_points(np.zeros((2, 4)), np.zeros((1, 1, 2)), np.ones((1, 1)), (100, 100), 1024)
    coords, labels = model_prompt_points(np.array([[0.0, 0.0, 99.0, 49.0]]), np.array([[[49.5, 24.5]]]),
                                         np.array([[1]]), (50, 100), 1000)
    np.testing.assert_allclose(coords, [[[5.0, 10.0], [995.0, 990.0], [500.0, 500.0]]])
    assert labels.tolist() == [[2, 3, 1]]
