"""Checkpoints with random weights, for the tests and the offline demo only.

They have the real SAM2.1 architecture and are saved exactly like a real checkpoint
(``{"model": state_dict}``), so the worker loads them through its real path. They also carry
:data:`~sam2_refine.sam2_model.UNTRAINED_MARKER`, and the worker announces such a checkpoint
with a warning on every job: an untrained model never runs silently.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sam2_refine.checkpoints import CHECKPOINT_CONFIGS
from sam2_refine.sam2_model import UNTRAINED_MARKER


def make_untrained_checkpoint(path: Path, name: str = "sam2.1_hiera_tiny.pt", seed: int = 0) -> Path:
    """Write a random-weight checkpoint of the architecture ``name`` implies to ``path``.

    Args:
        path: File to write (its directory is created).
        name: Which SAM2.1 checkpoint's architecture to use.
        seed: Seed for the random initialisation (same seed, same weights).
    """
    from sam2.build_sam import build_sam2

    torch.manual_seed(seed)
    model = build_sam2(CHECKPOINT_CONFIGS[name], ckpt_path=None, device="cpu", mode="eval")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    torch.save({"model": model.state_dict(), UNTRAINED_MARKER: True}, tmp)
    tmp.replace(path)
    return path
