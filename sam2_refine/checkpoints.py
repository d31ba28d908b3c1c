"""The SAM2.1 checkpoints this worker knows, and the check of a Model field value.

No torch here: the settings are checked before anything heavy is imported.
"""

from __future__ import annotations

from pathlib import Path

#: Checkpoint file name -> sam2's Hydra config name (a name inside the sam2 package, not a path).
CHECKPOINT_CONFIGS: dict[str, str] = {
    "sam2.1_hiera_tiny.pt": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_small.pt": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_base_plus.pt": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_large.pt": "configs/sam2.1/sam2.1_hiera_l.yaml",
}


class CheckpointChoiceError(ValueError):
    """The Model value does not name a usable checkpoint."""


def resolve_checkpoint(directory: Path, name: object) -> Path:
    """The path of the checkpoint the Model field names.

    Args:
        directory: The checkpoint directory.
        name: The Model field's value.

    Returns:
        ``directory / name``, an existing regular file with a known config.

    Raises:
        CheckpointChoiceError: ``name`` is not a string, is empty, is not a plain file name
            (path separators, ``..``), has no known config, or is not in ``directory``.
    """
    available = sorted(p.name for p in directory.glob("*.pt")) if directory.is_dir() else []
    listing = ", ".join(available) if available else f"none found in {directory}"
    if name is None or (isinstance(name, str) and not name.strip()):
        raise CheckpointChoiceError(f"no model selected; choose one of: {listing}")
    if not isinstance(name, str):
        raise CheckpointChoiceError(f"expected a checkpoint file name, got {type(name).__name__}")
    if "/" in name or "\\" in name or name in (".", "..") or ".." in name or "\0" in name:
        raise CheckpointChoiceError(f"{name!r} is not a plain file name; choose one of: {listing}")
    if name not in CHECKPOINT_CONFIGS:
        known = ", ".join(CHECKPOINT_CONFIGS)
        raise CheckpointChoiceError(f"{name!r} is not a SAM2.1 checkpoint this worker knows ({known})")
    path = directory / name
    if not path.is_file():
        raise CheckpointChoiceError(f"{name!r} is not in the checkpoint directory; available: {listing}")
    return path
