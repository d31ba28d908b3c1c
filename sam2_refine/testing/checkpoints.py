"""Checkpoints with random or constant weights, for the tests and the offline demo only.

- :func:`make_untrained_checkpoint`: the real architecture (any of sam2's eight), built by sam2
  with random weights and saved exactly like a real checkpoint (``{"model": state_dict}``), so
  the worker loads it through its real path.
- :func:`write_layout_checkpoint`: the same names and shapes without building a model: every
  weight is a zero broadcast to its shape (one 4-byte storage for all), so even SAM2.1 large
  is a file of a few hundred kB that ``torch.load`` and sam2 load like any other.

Both carry :data:`~sam2_refine.model.architectures.UNTRAINED_MARKER`, and the worker announces such
a checkpoint with a warning on every job: an untrained model never runs silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sam2_refine.model.architectures import UNTRAINED_MARKER, architectures, expected_weights
from sam2_refine.model.checkpoints import STOCK_CHECKPOINTS


def architecture_key(name: str) -> str:
    """``"sam2.1_hiera_t"`` for ``"sam2.1_hiera_tiny.pt"`` (stock file names or keys)."""
    key = STOCK_CHECKPOINTS.get(name, name)
    if key not in architectures():
        raise KeyError(f"unknown SAM2 architecture {name!r}")
    return key


def save_checkpoint(path: Path, weights: Mapping[str, torch.Tensor], *, layout: str | None = "model",
                    prefix: str = "", extra: Mapping[str, Any] | None = None, untrained: bool = True) -> Path:
    """Write ``weights`` as a checkpoint, atomically.

    Args:
        path: File to write (its directory is created).
        weights: The state dict.
        layout: Top-level key of the state dict (``"model"`` as sam2 saves it), or None for a
            bare state dict.
        prefix: Prepended to every weight name (e.g. ``"module."``).
        extra: More top-level entries (e.g. a training checkpoint's optimizer and epoch).
        untrained: Carry the untrained marker (only with a ``layout`` key).
    """
    state_dict = {prefix + name: tensor for name, tensor in weights.items()}
    if layout is None:
        obj: Any = state_dict
    else:
        obj = {layout: state_dict, **(extra or {})}
        if untrained:
            obj[UNTRAINED_MARKER] = True
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    torch.save(obj, tmp)
    tmp.replace(path)
    return path


def layout_weights(name: str, dtype: torch.dtype = torch.float32,
                   shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """Zero weights of an architecture's (or the given) shapes, all views of one element."""
    zero = torch.zeros((), dtype=dtype)
    shapes = shapes if shapes is not None else expected_weights(architecture_key(name))
    return {weight: zero.expand(*shape) for weight, shape in shapes.items()}


def write_layout_checkpoint(path: Path, name: str = "sam2.1_hiera_tiny.pt", **save: Any) -> Path:
    """A checkpoint of the architecture ``name`` names (a stock file name or a key such as
    ``"sam2_hiera_l"``) with constant zero weights; see the module docstring."""
    return save_checkpoint(path, layout_weights(name), **save)


def make_untrained_checkpoint(path: Path, name: str = "sam2.1_hiera_tiny.pt", seed: int = 0, **save: Any) -> Path:
    """Write a random-weight checkpoint of the architecture ``name`` names to ``path``.

    Args:
        path: File to write (its directory is created).
        name: A stock file name (``"sam2_hiera_tiny.pt"``) or an architecture key (``"sam2.1_hiera_s"``).
        seed: Seed for the random initialisation (same seed, same weights).
        save: Passed to :func:`save_checkpoint` (layout, prefix, extra).
    """
    from sam2.build_sam import build_sam2

    torch.manual_seed(seed)
    model = build_sam2(architectures()[architecture_key(name)].config, ckpt_path=None, device="cpu", mode="eval")
    return save_checkpoint(path, model.state_dict(), **save)


def sharpen_decoder(model: torch.nn.Module, seed: int = 7) -> None:
    """Make a random-weight model's mask decoder a harder test of a re-formulation of it, in place.

    A fresh checkpoint's LayerNorms have weight 1 and bias 0 (which would hide mistakes in how
    they are folded) and its logits are tiny (|logit| < 1, against which an absolute tolerance
    means nothing): the LayerNorm affines are drawn at random, the attention made sharper and the
    mask logits brought to the order of 10.
    """
    gen = torch.Generator().manual_seed(seed)
    dec = model.sam_mask_decoder
    with torch.no_grad():
        for module in dec.modules():
            if isinstance(module, torch.nn.LayerNorm) or type(module).__name__ == "LayerNorm2d":
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.3)
        for name, param in dec.transformer.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(3.0)  # sharper attention
        for mlp in dec.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(40.0)  # logits of order 10
