"""The eight SAM2 architectures sam2 1.1.0 builds (SAM 2.0 and 2.1 x tiny, small, base_plus,
large): recognised from their weights under any name, loaded strictly through the real path
(small sizes), and FastBoxDecoder equal to sam2's decoder for every one of them.

Each architecture is built once (random weights, CPU; ``built`` is a module fixture with one
parameter per architecture, so pytest runs each architecture's tests together and frees the
model before building the next): about 5 s for all eight.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from sam2_refine.model.architectures import NotASam2Checkpoint, architectures, expected_weights, recognise
from sam2_refine.model.checkpoint_layout import read_layout
from sam2_refine.model.checkpoints import ModelUnusable, inspect_model, scan_models
from sam2_refine.model.fast_decoder import FastBoxDecoder
from sam2_refine.model.sam2_model import DeviceChoice, Sam2BoxPredictor
from sam2_refine.testing.checkpoints import layout_weights, save_checkpoint, sharpen_decoder, write_layout_checkpoint
from sam2_refine.testing.sam2_layouts import ARCHITECTURES, build_model, weight_shapes

CPU = DeviceChoice("cpu", bfloat16=False, tf32=False)
KEYS = list(ARCHITECTURES)
#: Custom file names, as a lab would name its files.
CUSTOM = {key: f"lab_{key.replace('.', '_').replace('+', 'plus')}_ft.pt" for key in KEYS}
LABELS = {"sam2_hiera_t": "SAM2.0 tiny", "sam2_hiera_s": "SAM2.0 small", "sam2_hiera_b+": "SAM2.0 base+",
          "sam2_hiera_l": "SAM2.0 large", "sam2.1_hiera_t": "SAM2.1 tiny", "sam2.1_hiera_s": "SAM2.1 small",
          "sam2.1_hiera_b+": "SAM2.1 base+", "sam2.1_hiera_l": "SAM2.1 large"}
#: (trunk width, trunk blocks) per size, from sam2's configs (embed_dim, sum of stages).
TRUNKS = {"tiny": (96, 12), "small": (96, 16), "base_plus": (112, 24), "large": (144, 48)}
ONLY_IN_2_1 = {"no_obj_embed_spatial", "obj_ptr_tpos_proj.weight", "obj_ptr_tpos_proj.bias"}


@dataclass
class Built:
    key: str
    model: torch.nn.Module
    shapes: dict[str, tuple[int, ...]]


@pytest.fixture(scope="module", params=KEYS)
def built(request: pytest.FixtureRequest) -> Iterator[Built]:
    torch.manual_seed(0)
    model = build_model(request.param)
    yield Built(request.param, model, weight_shapes(model))
    del model


# -- the table the worker reads (sam2_layouts.json) is what sam2 builds ---------------------------

@pytest.mark.slow
def test_layout_table_is_what_sam2_builds(built: Built) -> None:
    assert expected_weights(built.key) == built.shapes
    arch = architectures()[built.key]
    assert (arch.config, arch.version, arch.size) == ARCHITECTURES[built.key]
    assert arch.label == LABELS[built.key]


def test_what_tells_the_architectures_apart(built: Built) -> None:
    arch = architectures()[built.key]
    width = built.shapes["image_encoder.trunk.patch_embed.proj.weight"][0]
    blocks = {int(m.group(1)) for n in built.shapes if (m := re.match(r"image_encoder\.trunk\.blocks\.(\d+)\.", n))}
    assert (width, len(blocks)) == TRUNKS[arch.size]
    assert (ONLY_IN_2_1 <= set(built.shapes)) == (arch.version == "2.1")
    if arch.version == "2.0":
        twin = built.key.replace("sam2_", "sam2.1_")
        assert set(expected_weights(twin)) - set(built.shapes) == ONLY_IN_2_1


# -- recognised under any name ---------------------------------------------------------------------

def test_recognised_under_a_custom_name(built: Built, tmp_path: Path) -> None:
    """Shapes from the model sam2 built (not from the table), saved as sam2 saves a checkpoint."""
    path = save_checkpoint(tmp_path / CUSTOM[built.key], layout_weights("", shapes=built.shapes), untrained=False)
    assert path.stat().st_size < 2_000_000  # every weight a view of one element: cheap for large too
    catalogue = scan_models(tmp_path)
    assert catalogue.unusable == ()
    (entry,) = catalogue.models
    assert entry.architecture.key == built.key and entry.label == LABELS[built.key]
    assert entry.item == f"{LABELS[built.key]} ({CUSTOM[built.key]})"
    assert not entry.untrained and entry.recognised.state_dict_key == "model"


@pytest.mark.parametrize("variant", ["sam2_training", "bare", "module_prefix", "state_dict_key", "bfloat16"])
def test_layout_variants(variant: str, tmp_path: Path) -> None:
    key = "sam2.1_hiera_s"
    weights = layout_weights(key, dtype=torch.bfloat16 if variant == "bfloat16" else torch.float32)
    save = {
        "sam2_training": dict(extra={"optimizer": {"state": {0: {"step": torch.tensor(3.0),
                                                                 "exp_avg": torch.zeros(2)}},
                                                   "param_groups": [{"lr": 1e-5, "params": [0]}]},
                                     "epoch": 40, "loss": {}, "steps": {"train": 4000}, "time_elapsed": 1.5e4,
                                     "best_meter_values": {}}),
        "bare": dict(layout=None), "module_prefix": dict(layout=None, prefix="module."),
        "state_dict_key": dict(layout="state_dict", prefix="model."), "bfloat16": {},
    }[variant]
    entry = inspect_model(save_checkpoint(tmp_path / "x.pt", weights, **save))
    assert entry.architecture.key == key
    assert entry.recognised.state_dict_key == {"bare": None, "module_prefix": None,
                                               "state_dict_key": "state_dict"}.get(variant, "model")
    assert entry.recognised.prefix == {"module_prefix": "module.", "state_dict_key": "model."}.get(variant, "")
    assert entry.recognised.dtypes == (("bfloat16",) if variant == "bfloat16" else ("float32",))


def test_stock_names_of_both_versions(tmp_path: Path) -> None:
    for name in ("sam2_hiera_tiny.pt", "sam2_hiera_large.pt", "sam2.1_hiera_small.pt", "sam2.1_hiera_base_plus.pt"):
        write_layout_checkpoint(tmp_path / name, name, untrained=False)
    catalogue = scan_models(tmp_path)
    assert catalogue.items == ["SAM2.1 base+ (sam2.1_hiera_base_plus.pt)", "SAM2.1 small (sam2.1_hiera_small.pt)",
                               "SAM2.0 large (sam2_hiera_large.pt)", "SAM2.0 tiny (sam2_hiera_tiny.pt)"]
    assert catalogue.default.name == "sam2.1_hiera_small.pt"


def test_a_stock_name_holding_another_architecture_is_refused(tmp_path: Path) -> None:
    write_layout_checkpoint(tmp_path / "sam2.1_hiera_large.pt", "sam2_hiera_l")
    with pytest.raises(ModelUnusable, match="named like the stock SAM2.1 large checkpoint, but its weights are "
                                            "SAM2.0 large"):
        inspect_model(tmp_path / "sam2.1_hiera_large.pt")


# -- foreign files: each with its reason ------------------------------------------------------------

def _sam1(width: int, extra: dict | None = None) -> dict[str, tuple[int, ...]]:
    shapes = {"image_encoder.pos_embed": (1, 64, 64, width),
              "image_encoder.patch_embed.proj.weight": (width, 3, 16, 16),
              "image_encoder.blocks.0.attn.qkv.weight": (3 * width, width),
              "image_encoder.blocks.0.norm1.weight": (width,), "image_encoder.neck.0.weight": (256, width, 1, 1),
              "prompt_encoder.point_embeddings.0.weight": (1, 256), "mask_decoder.iou_token.weight": (1, 256),
              "mask_decoder.mask_tokens.weight": (4, 256)}
    return {**shapes, **(extra or {})}


def _sam2(key: str, change=None) -> dict[str, tuple[int, ...]]:
    shapes = expected_weights(key)
    if change:
        change(shapes)
    return shapes


FOREIGN = {
    "sam1_vit_h": (_sam1(1280), r"a SAM \(segment-anything, SAM 1\) checkpoint \(ViT-H image encoder"),
    "sam1_vit_b": (_sam1(768), r"a SAM \(segment-anything, SAM 1\) checkpoint \(ViT-B image encoder"),
    "hq_sam": (_sam1(1024, {"mask_decoder.hf_token.weight": (1, 256),
                            "mask_decoder.compress_vit_feat.0.weight": (1024, 256, 2, 2)}),
               r"an HQ-SAM checkpoint .*ViT-L"),
    "mobile_sam": ({"image_encoder.patch_embed.seq.0.c.weight": (32, 3, 3, 3),
                    "image_encoder.layers.0.blocks.0.conv1.c.weight": (256, 64, 1, 1),
                    "mask_decoder.iou_token.weight": (1, 256)}, r"a MobileSAM checkpoint \(TinyViT"),
    "random_state_dict": ({"fc1.weight": (10, 5), "fc1.bias": (10,), "fc2.weight": (2, 10)},
                          r"not a SAM2 checkpoint: none of its 3 weights are SAM2's \(e\.g\. fc1\.bias"),
    "sam2_other_shape": (_sam2("sam2.1_hiera_s",
                               lambda s: s.update({"image_encoder.trunk.pos_embed": (1, 96, 14, 14)})),
                         r"an architecture sam2 cannot build: .*nearest is SAM2\.1 small \(sam2\.1_hiera_s\), from "
                         r"which 1 weight\(s\) have other shapes \(e\.g\. image_encoder\.trunk\.pos_embed: "
                         r"\(1, 96, 14, 14\), sam2\.1_hiera_s has \(1, 96, 7, 7\)\)"),
    "sam2_missing_weights": (_sam2("sam2.1_hiera_t", lambda s: [s.pop(n) for n in list(s)
                                                                if n.startswith("memory_attention.")]),
                             r"nearest is SAM2\.1 tiny .* are missing \(e\.g\. memory_attention\."),
    "hq_sam2": (_sam2("sam2.1_hiera_l", lambda s: s.update({"sam_mask_decoder.hf_token.weight": (1, 256),
                                                            "sam_mask_decoder.hf_mlp.layers.0.weight": (256, 256)})),
                r"nearest is SAM2\.1 large .* 2 are unexpected \(HQ-SAM 2\?\)"),
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_foreign_weights_are_not_sam2(case: str, tmp_path: Path) -> None:
    shapes, reason = FOREIGN[case]
    path = save_checkpoint(tmp_path / f"{case}.pth", layout_weights("", shapes=shapes), untrained=False)
    with pytest.raises(NotASam2Checkpoint, match=reason):
        recognise(read_layout(path))
    catalogue = scan_models(tmp_path)
    assert catalogue.models == () and [u.name for u in catalogue.unusable] == [path.name]
    assert re.search(reason, catalogue.unusable[0].reason)


def test_integer_weights_and_no_state_dict(tmp_path: Path) -> None:
    weights = layout_weights("sam2.1_hiera_t")
    weights["sam_mask_decoder.iou_token.weight"] = torch.zeros(1, 256, dtype=torch.int64)
    path = save_checkpoint(tmp_path / "ints.pt", weights)
    with pytest.raises(NotASam2Checkpoint, match="SAM2.1 tiny weights, but 1 of them are not floating point"):
        recognise(read_layout(path))
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "none.pt")
    with pytest.raises(NotASam2Checkpoint, match=r"no state dict of weights in it \(top-level keys: 'epoch', 'lr'\)"):
        recognise(read_layout(tmp_path / "none.pt"))
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(NotASam2Checkpoint, match="it holds a list"):
        recognise(read_layout(tmp_path / "list.pt"))


# -- the real path: sam2 builds the detected architecture and loads the weights strictly ----------

@pytest.mark.slow
@pytest.mark.parametrize("built", ["sam2_hiera_t", "sam2.1_hiera_s"], indirect=True)
def test_small_models_load_through_the_real_path(built: Built, tmp_path: Path) -> None:
    """SAM2.0 tiny saved as sam2's trainer saves it, SAM2.1 small as a DDP-prefixed bare state
    dict, both under custom names: built by sam2 from the detected config, loaded strictly, and
    the weights are the ones saved. (The larger sizes are recognised from their layouts above;
    their strict load is the same code.)"""
    state = built.model.state_dict()
    if built.key == "sam2_hiera_t":
        path = save_checkpoint(tmp_path / "legacy_tiny.pt", state, extra={"epoch": 12, "steps": {"train": 1200}})
    else:
        path = save_checkpoint(tmp_path / "lab_nuclei_ft.pt", state, layout=None, prefix="module.")
    predictor, untrained = Sam2BoxPredictor.load(path, CPU)
    assert untrained == (built.key == "sam2_hiera_t")  # the trainer-style file carries the test marker
    assert LABELS[built.key] in predictor.description and path.name in predictor.description
    loaded = predictor.model.state_dict()
    assert set(loaded) == set(state)
    for name in ("image_encoder.trunk.patch_embed.proj.weight", "sam_mask_decoder.iou_token.weight",
                 "memory_attention.layers.0.self_attn.q_proj.weight"):
        torch.testing.assert_close(loaded[name], state[name], rtol=0, atol=0)
    predictor.embed(np.random.default_rng(0).random((64, 80, 3), dtype=np.float32))
    decoded = predictor.decode(np.array([[10.0, 10.0, 50.0, 40.0]]))
    assert decoded.logits.shape == (1, 1, 256, 256)


# -- FastBoxDecoder equals sam2's decoder for every architecture ------------------------------------

@pytest.mark.slow
def test_fast_decoder_equals_sam2s_for_every_architecture(built: Built) -> None:
    model = built.model
    sharpen_decoder(model, seed=11)
    assert Sam2BoxPredictor(model, CPU).decoder_name.startswith("FastBoxDecoder")  # no fallback
    gen = torch.Generator().manual_seed(3)
    embed = torch.randn(1, 256, 64, 64, generator=gen)
    high_res = [torch.randn(1, 32, 256, 256, generator=gen), torch.randn(1, 64, 128, 128, generator=gen)]
    corners = torch.rand(3, 2, 2, generator=gen) * 1024
    coords = torch.stack([corners.min(1).values, corners.max(1).values], 1)
    labels = torch.tensor([[2, 3]], dtype=torch.int).repeat(3, 1)
    penc = model.sam_prompt_encoder
    decoder = FastBoxDecoder(model)
    with torch.inference_mode():
        sparse, dense = penc(points=(coords, labels), boxes=None, masks=None)
        decoder.set_image_features(embed, high_res)
        for multimask in (False, True):
            ref_logits, ref_iou, _, _ = model.sam_mask_decoder(
                image_embeddings=embed, image_pe=penc.get_dense_pe(), sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense, multimask_output=multimask, repeat_image=True,
                high_res_features=high_res)
            logits, iou = decoder(sparse, multimask)
            assert ref_logits.abs().max().item() > 5.0
            assert (logits - ref_logits).abs().max().item() <= 1e-3
            assert (iou - ref_iou).abs().max().item() <= 1e-4


@pytest.mark.parametrize("built", ["sam2.1_hiera_t"], indirect=True)
def test_unsupported_decoder_falls_back_with_a_log_line(built: Built, caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(built.model.sam_mask_decoder, "use_high_res_features", False)
    with caplog.at_level(logging.INFO, logger="sam2_refine.model.sam2_model"):
        predictor = Sam2BoxPredictor(built.model, CPU)
    assert predictor.decoder_name == "sam2's MaskDecoder"
    assert any("using sam2's mask decoder: FastBoxDecoder does not support this model" in r.getMessage()
               for r in caplog.records)
