"""Which SAM2 architecture a checkpoint's weights are, from their names and shapes alone.

sam2 1.1.0 packages eight model configs: SAM 2.0 and SAM 2.1, each in four sizes (tiny, small,
base_plus, large). Their weights (name -> shape) are in ``sam2_layouts.json``, generated from
sam2 itself (``sam2_refine.testing.sam2_layouts``). SAM 2.1 has three weights 2.0 lacks
(``no_obj_embed_spatial``, ``obj_ptr_tpos_proj.weight``, ``.bias``); the sizes differ in the
Hiera trunk (width 96 / 96 / 112 / 144, 12 / 16 / 24 / 48 blocks) and the neck's inputs.

A checkpoint is a SAM2 checkpoint of architecture A when its state dict has exactly A's
weights with A's shapes, all floating point: then ``build_sam2(A's config)`` loads it with no
missing or unexpected weight. Anything else gets a reason a user can act on: another model
family (SAM, HQ-SAM, MobileSAM), SAM2-like weights no packaged config builds (with the nearest
one and what differs), no weights at all. No torch here.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sam2_refine.model.checkpoint_layout import FLOAT_DTYPES, CheckpointLayout, TensorInfo, describe

LAYOUTS_FILE = Path(__file__).with_name("sam2_layouts.json")
#: Where a state dict may sit in a checkpoint: sam2's own ``{"model": ...}`` (its release files
#: and its training code's checkpoints, which add optimizer, epoch, loss, steps, time_elapsed,
#: best_meter_values, scaler), a bare state dict, and the two other common conventions.
STATE_DICT_KEYS: tuple[str | None, ...] = ("model", None, "state_dict", "model_state_dict")
#: Name prefixes that wrappers add: DistributedDataParallel, torch.compile, Lightning modules.
NAME_PREFIXES = ("module.", "_orig_mod.", "model.")
#: Key that marks a checkpoint made by this project's tests or offline demo (random weights).
UNTRAINED_MARKER = "sam2_refine_untrained"
SIZE_WORDS = {"tiny": "tiny", "small": "small", "base_plus": "base+", "large": "large"}
_MAX_EXAMPLES = 3


class NotASam2Checkpoint(ValueError):
    """The weights are not those of an architecture sam2 builds; the message says why."""


@dataclass(frozen=True)
class Architecture:
    """One of sam2's packaged model configs.

    Attributes:
        key: Config name without folder and extension, e.g. ``"sam2.1_hiera_s"``.
        config: sam2's Hydra config name, e.g. ``"configs/sam2.1/sam2.1_hiera_s.yaml"``.
        version: ``"2.0"`` or ``"2.1"``.
        size: ``"tiny"``, ``"small"``, ``"base_plus"`` or ``"large"``.
    """

    key: str
    config: str
    version: str
    size: str

    @property
    def label(self) -> str:
        """E.g. ``"SAM2.1 small"``."""
        return f"SAM{self.version} {SIZE_WORDS[self.size]}"


@dataclass(frozen=True)
class Recognised:
    """A checkpoint recognised as a SAM2 architecture.

    Attributes:
        architecture: Which one.
        state_dict_key: Where its state dict is: a top-level key, or None for the top level.
        prefix: A prefix stripped from every weight name (``""`` when none).
        dtypes: The weights' dtypes, e.g. ``("float32",)``.
        untrained: The checkpoint carries :data:`UNTRAINED_MARKER` (random weights).
    """

    architecture: Architecture
    state_dict_key: str | None
    prefix: str
    dtypes: tuple[str, ...]
    untrained: bool


def _expand(rows: list[list]) -> dict[str, tuple[int, ...]]:
    weights: dict[str, tuple[int, ...]] = {}
    for template, shape, ranges in rows:
        if not ranges:
            weights[template] = tuple(shape)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            for number in range(int(first), int(last or first) + 1):
                weights[template.replace("#", str(number), 1)] = tuple(shape)
    return weights


@functools.cache
def _table() -> tuple[dict[str, Architecture], dict[str, dict[str, tuple[int, ...]]]]:
    document = json.loads(LAYOUTS_FILE.read_text())
    shared = _expand(document["shared"])
    architectures, weights = {}, {}
    for key, entry in document["architectures"].items():
        architectures[key] = Architecture(key, entry["config"], entry["version"], entry["size"])
        weights[key] = {**shared, **_expand(entry["weights"])}
    return architectures, weights


def architectures() -> dict[str, Architecture]:
    """Every packaged architecture, by key (``sam2_hiera_t`` ... ``sam2.1_hiera_l``)."""
    return dict(_table()[0])


def expected_weights(key: str) -> dict[str, tuple[int, ...]]:
    """The weights (name -> shape) sam2 builds for architecture ``key``."""
    return dict(_table()[1][key])


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ")"


def _examples(names: list[str]) -> str:
    shown = ", ".join(sorted(names)[:_MAX_EXAMPLES])
    return shown + (", ..." if len(names) > _MAX_EXAMPLES else "")


def find_state_dict(root: Any) -> tuple[str | None, dict[str, TensorInfo]]:
    """Where the weights are (see :data:`STATE_DICT_KEYS`): (key or None, name -> tensor).

    Raises:
        NotASam2Checkpoint: nothing in the checkpoint is a dict of tensors.
    """
    if not isinstance(root, dict):
        raise NotASam2Checkpoint(f"not a SAM2 checkpoint: it holds {describe(root)}, not a dict of weights")
    for key in STATE_DICT_KEYS:
        candidate = root if key is None else root.get(key)
        if (isinstance(candidate, dict) and candidate
                and all(isinstance(k, str) and isinstance(v, TensorInfo) for k, v in candidate.items())):
            return key, candidate
    keys = ", ".join(repr(k) for k in list(root)[:6]) + (", ..." if len(root) > 6 else "")
    raise NotASam2Checkpoint(f"not a SAM2 checkpoint: no state dict of weights in it (top-level keys: {keys})")


def _strip_prefix(weights: dict[str, TensorInfo]) -> tuple[str, dict[str, TensorInfo]]:
    """Remove :data:`NAME_PREFIXES` that every name carries: (prefix removed, weights)."""
    removed = ""
    while True:
        prefix = next((p for p in NAME_PREFIXES if all(name.startswith(p) for name in weights)), None)
        if prefix is None:
            return removed, weights
        removed += prefix
        weights = {name[len(prefix):]: tensor for name, tensor in weights.items()}


def _exact(weights: Mapping[str, TensorInfo], key: str) -> bool:
    expected = _table()[1][key]
    return len(weights) == len(expected) and all(
        name in weights and weights[name].shape == shape for name, shape in expected.items())


def _foreign_family(names: set[str], weights: Mapping[str, TensorInfo]) -> str | None:
    """A reason naming a known non-SAM2 model family, or None."""
    def has(pattern: str) -> bool:
        return any(re.match(pattern, n) for n in names)

    if has(r"image_encoder\.layers\.\d+\.") and (has(r"image_encoder\.patch_embed\.seq\.") or
                                                 has(r"image_encoder\.layers\.\d+\.blocks\.")):
        return ("not a SAM2 checkpoint: a MobileSAM checkpoint (TinyViT image encoder, image_encoder.layers.*); "
                "SAM2 needs its Hiera encoder")
    if has(r"image_encoder\.blocks\.\d+\.") and has(r"mask_decoder\."):
        proj = weights.get("image_encoder.patch_embed.proj.weight")
        vit = {768: "ViT-B", 1024: "ViT-L", 1280: "ViT-H"}.get(proj.shape[0] if proj and proj.shape else -1)
        encoder = f"{vit} image encoder" if vit else "ViT image encoder"
        if has(r"mask_decoder\.(hf_token|hf_mlp|compress_vit_feat|embedding_encoder)"):
            return (f"not a SAM2 checkpoint: an HQ-SAM checkpoint (SAM with a high-quality token, {encoder}); "
                    "SAM2 needs its Hiera encoder and memory modules")
        return (f"not a SAM2 checkpoint: a SAM (segment-anything, SAM 1) checkpoint ({encoder}, "
                "image_encoder.blocks.*); SAM2 needs its Hiera encoder and memory modules")
    return None


def _looks_like_sam2(names: set[str]) -> bool:
    return any(n.startswith(("image_encoder.trunk.", "sam_mask_decoder.", "memory_attention.",
                             "memory_encoder.", "sam_prompt_encoder.")) for n in names)


def _nearest(weights: Mapping[str, TensorInfo]) -> str:
    """Why SAM2-like weights fit no packaged architecture, against the nearest one."""
    def score(key: str) -> int:
        return sum(1 for name, shape in _table()[1][key].items()
                   if name in weights and weights[name].shape == shape)

    table = _table()
    key = max(table[1], key=score)
    expected = table[1][key]
    missing = [n for n in expected if n not in weights]
    unexpected = [n for n in weights if n not in expected]
    reshaped = [n for n in expected if n in weights and weights[n].shape != expected[n]]
    parts = []
    if reshaped:
        first = sorted(reshaped)[0]
        parts.append(f"{len(reshaped)} weight(s) have other shapes (e.g. {first}: {_shape(weights[first].shape)}, "
                     f"{key} has {_shape(expected[first])})")
    if missing:
        parts.append(f"{len(missing)} are missing (e.g. {_examples(missing)})")
    if unexpected:
        hint = " (HQ-SAM 2?)" if any(".hf_" in n or "hf_token" in n for n in unexpected) else ""
        parts.append(f"{len(unexpected)} are unexpected{hint} (e.g. {_examples(unexpected)})")
    return (f"an architecture sam2 cannot build: SAM2 weights that fit none of its packaged configs; the nearest "
            f"is {table[0][key].label} ({key}), from which " + "; ".join(parts))


def recognise(layout: CheckpointLayout) -> Recognised:
    """The SAM2 architecture of a checkpoint, from its layout (:func:`read_layout`).

    Raises:
        NotASam2Checkpoint: the message says what the file is instead, or what does not fit.
    """
    state_key, weights = find_state_dict(layout.root)
    prefix, weights = _strip_prefix(weights)
    untrained = isinstance(layout.root, dict) and layout.root.get(UNTRAINED_MARKER) is True
    names = set(weights)
    for key, architecture in _table()[0].items():
        if _exact(weights, key):
            dtypes = tuple(sorted({t.dtype for t in weights.values()}))
            odd = [n for n, t in weights.items() if t.dtype not in FLOAT_DTYPES]
            if odd:
                raise NotASam2Checkpoint(f"{architecture.label} weights, but {len(odd)} of them are not floating "
                                         f"point (e.g. {sorted(odd)[0]}: {weights[sorted(odd)[0]].dtype})")
            return Recognised(architecture, state_key, prefix, dtypes, untrained)
    family = _foreign_family(names, weights)
    if family:
        raise NotASam2Checkpoint(family)
    if _looks_like_sam2(names):
        raise NotASam2Checkpoint(_nearest(weights))
    raise NotASam2Checkpoint(f"not a SAM2 checkpoint: none of its {len(weights)} weights are SAM2's "
                             f"(e.g. {_examples(list(weights))})")
