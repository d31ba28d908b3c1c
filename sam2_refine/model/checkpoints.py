"""The SAM2 checkpoints in the checkpoint directory, and the check of a Model field value.

Every ``.pt`` / ``.pth`` file in the directory is recognised from its weights
(:mod:`sam2_refine.model.checkpoint_layout`, :mod:`sam2_refine.model.architectures`), whatever its name,
with its optional sidecar (:mod:`sam2_refine.model.sidecar`). :func:`scan_models` sorts them into
the usable ones, each with a readable label, and the unusable ones, each with the reason.
:func:`resolve_model` checks one Model field value for a compute job, before the server is
touched: it names a usable checkpoint of the directory (and its sidecar's sha256, when given,
matches the file).

The Model field's items are ``"<label> (<file name>)"``, e.g. ``"SAM2.1 small
(sam2.1_hiera_small.pt)"``: readable in NimbusImage's select, and still plain strings (the
contract's ``items`` is a list of strings; NimbusImage's client checks a value with
``items.includes``). A value is resolved by the file name it ends with, so a saved tool keeps
working when a label changes, and plain file names (what saved tools hold) work as before.

No torch here: the interface request and the settings check run before anything heavy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sam2_refine.model.architectures import (
    UNTRAINED_MARKER,
    Architecture,
    NotASam2Checkpoint,
    Recognised,
    architectures,
    recognise,
)
from sam2_refine.model.checkpoint_layout import LayoutError, read_layout
from sam2_refine.fields import check_tuned_defaults
from sam2_refine.model.sidecar import Sidecar, SidecarError, read_sidecar, sidecar_path

__all__ = [
    "CHECKPOINT_CONFIGS", "STOCK_CHECKPOINTS", "SUFFIXES", "UNTRAINED_MARKER", "CheckpointChoiceError",
    "ModelCatalogue", "ModelEntry", "ModelUnusable", "Unusable", "file_sha256", "inspect_model",
    "list_candidates", "resolve_checkpoint", "resolve_model", "scan_models",
]

#: File endings read as checkpoints.
SUFFIXES = (".pt", ".pth")
#: Meta's release file names -> architecture key. A file with one of these names must hold
#: that architecture (a copy under the wrong name is refused rather than run as another size).
STOCK_CHECKPOINTS: dict[str, str] = {
    "sam2.1_hiera_tiny.pt": "sam2.1_hiera_t",
    "sam2.1_hiera_small.pt": "sam2.1_hiera_s",
    "sam2.1_hiera_base_plus.pt": "sam2.1_hiera_b+",
    "sam2.1_hiera_large.pt": "sam2.1_hiera_l",
    "sam2_hiera_tiny.pt": "sam2_hiera_t",
    "sam2_hiera_small.pt": "sam2_hiera_s",
    "sam2_hiera_base_plus.pt": "sam2_hiera_b+",
    "sam2_hiera_large.pt": "sam2_hiera_l",
}
#: Stock file name -> sam2's Hydra config name (a name inside the sam2 package, not a path).
CHECKPOINT_CONFIGS: dict[str, str] = {
    "sam2.1_hiera_tiny.pt": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_small.pt": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_base_plus.pt": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_large.pt": "configs/sam2.1/sam2.1_hiera_l.yaml",
    "sam2_hiera_tiny.pt": "configs/sam2/sam2_hiera_t.yaml",
    "sam2_hiera_small.pt": "configs/sam2/sam2_hiera_s.yaml",
    "sam2_hiera_base_plus.pt": "configs/sam2/sam2_hiera_b+.yaml",
    "sam2_hiera_large.pt": "configs/sam2/sam2_hiera_l.yaml",
}
#: The model the Model select offers first, when usable.
DEFAULT_MODEL = "sam2.1_hiera_small.pt"
_HASH_CHUNK = 16 * 1024 * 1024


class CheckpointChoiceError(ValueError):
    """The Model value does not name a usable checkpoint."""


class ModelUnusable(ValueError):
    """A checkpoint file that cannot be used; the message is the reason."""


@dataclass(frozen=True)
class ModelEntry:
    """A usable checkpoint.

    Attributes:
        name: Its file name in the checkpoint directory.
        path: Its path.
        recognised: Its architecture and where its weights are.
        label: Readable name: the sidecar's label, else the architecture's (``"SAM2.1 small"``).
        description: The sidecar's description, or None.
        sha256: The digest its sidecar promises, or None.
        defaults: Field name -> value the model was tuned with (from the sidecar), checked.
    """

    name: str
    path: Path
    recognised: Recognised
    label: str
    description: str | None = None
    sha256: str | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def architecture(self) -> Architecture:
        return self.recognised.architecture

    @property
    def untrained(self) -> bool:
        return self.recognised.untrained

    @property
    def item(self) -> str:
        """The Model field's item: ``"<label> (<file name>)"``."""
        return f"{self.label} ({self.name})"


@dataclass(frozen=True)
class Unusable:
    """A file of the checkpoint directory that is not offered, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class ModelCatalogue:
    """The checkpoint directory, sorted (see :func:`scan_models`)."""

    directory: Path
    models: tuple[ModelEntry, ...] = ()
    unusable: tuple[Unusable, ...] = ()

    @property
    def items(self) -> list[str]:
        return [m.item for m in self.models]

    @property
    def default(self) -> ModelEntry | None:
        """``sam2.1_hiera_small.pt`` when usable, else the first usable model, else None."""
        for model in self.models:
            if model.name == DEFAULT_MODEL:
                return model
        return self.models[0] if self.models else None

    def unusable_text(self) -> str:
        """``name: reason`` for each unusable file, one per line."""
        return "\n".join(f"{u.name}: {u.reason}" for u in self.unusable)


def _entries(directory: Path) -> list[Path]:
    try:
        return sorted((p for p in directory.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    except OSError:
        return []


def list_candidates(directory: Path) -> list[str]:
    """Names of the ``.pt`` / ``.pth`` files (or links to files) in ``directory``, sorted."""
    return [p.name for p in _entries(directory) if p.suffix in SUFFIXES and p.is_file()]


def _label(name: str, recognised: Recognised, sidecar: Sidecar | None) -> str:
    arch = recognised.architecture.label
    if sidecar is not None and sidecar.label:
        label = sidecar.label if arch in sidecar.label else f"{sidecar.label}, {arch}"
    else:
        label = arch
    if recognised.untrained:
        label += ", UNTRAINED test weights"
    return label


def inspect_model(path: Path) -> ModelEntry:
    """Recognise one checkpoint file and read its sidecar (no hashing).

    Args:
        path: The checkpoint file.

    Raises:
        ModelUnusable: the reason it cannot be used.
    """
    name = path.name
    if not path.is_file():
        raise ModelUnusable("a link to a missing file" if path.is_symlink() else "not a file")
    others = [p for p in (path.with_suffix(s) for s in SUFFIXES) if p != path and p.is_file()]
    if others and sidecar_path(path).exists():
        raise ModelUnusable(f"its sidecar {sidecar_path(path).name} could belong to {name} or {others[0].name}; "
                            "rename one of them")
    try:
        layout = read_layout(path)
        recognised = recognise(layout)
    except (LayoutError, NotASam2Checkpoint) as exc:
        raise ModelUnusable(str(exc)) from None
    except OSError as exc:
        raise ModelUnusable(f"it cannot be read ({type(exc).__name__})") from None
    arch = recognised.architecture
    stock = STOCK_CHECKPOINTS.get(name)
    if stock is not None and stock != arch.key:
        expected = architectures()[stock]
        raise ModelUnusable(f"named like the stock {expected.label} checkpoint, but its weights are {arch.label} "
                            f"({arch.key}); give it another name to use it as {arch.label}")
    try:
        sidecar = read_sidecar(sidecar_path(path), set(architectures()), check_tuned_defaults)
    except SidecarError as exc:
        raise ModelUnusable(str(exc)) from None
    if sidecar is not None and sidecar.config is not None and sidecar.config != arch.key:
        raise ModelUnusable(f"its sidecar {sidecar_path(path).name} says config {sidecar.config}, but its weights "
                            f"are {arch.label} ({arch.key})")
    return ModelEntry(
        name=name, path=path, recognised=recognised, label=_label(name, recognised, sidecar),
        description=sidecar.description if sidecar else None, sha256=sidecar.sha256 if sidecar else None,
        defaults=dict(sidecar.defaults) if sidecar else {},
    )


def scan_models(directory: Path) -> ModelCatalogue:
    """Every file of the checkpoint directory: usable models and unusable files with reasons.

    ``.pt`` / ``.pth`` files are recognised (:func:`inspect_model`); a sidecar ``NAME.json``
    without its checkpoint, and any other file, are listed as unusable too (an operator who put
    a file there meant something by it). Hidden files and subdirectories are ignored. Reads each
    checkpoint's layout, never its weights; never hashes.
    """
    models, unusable = [], []
    entries = _entries(directory)
    stems = {p.stem for p in entries if p.suffix in SUFFIXES}
    for path in entries:
        if path.suffix in SUFFIXES:
            try:
                models.append(inspect_model(path))
            except ModelUnusable as exc:
                unusable.append(Unusable(path.name, str(exc)))
        elif path.is_dir():
            continue
        elif path.suffix == ".json":
            if path.stem not in stems:
                unusable.append(Unusable(path.name, f"a sidecar without its checkpoint ({path.stem}.pt)"))
        else:
            unusable.append(Unusable(path.name, "not a .pt or .pth checkpoint file (ignored)"))
    return ModelCatalogue(directory, tuple(models), tuple(unusable))


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, hex (reads it all; docs/models.md says how long that takes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _named_file(value: str, names: list[str]) -> str | None:
    """The listed file a Model value names: the name itself, or an item ending in ``(name)``."""
    if value in names:
        return value
    matches = [n for n in names if value.endswith(f" ({n})")]
    return max(matches, key=len) if matches else None


def resolve_model(directory: Path, value: object, verify_sha256: bool = True) -> ModelEntry:
    """The usable checkpoint a Model field value names, for a compute job.

    Args:
        directory: The checkpoint directory.
        value: The Model field's value: a file name of the directory, or an item of the field
            (``"<label> (<file name>)"``, whatever the label). Empty (``""``, blank, ``None``, or
            the key missing) means the default model, as the Model select offers it
            (:attr:`ModelCatalogue.default`), as an empty select means its default elsewhere.
        verify_sha256: Check the file against its sidecar's ``"sha256"`` (reads the file).

    Raises:
        CheckpointChoiceError: not text, not a file of ``directory`` (paths, ``..``, a name it
            does not hold), an unusable checkpoint (with the reason), a digest that does not
            match, or empty while the directory holds no usable checkpoint.
    """
    names = list_candidates(directory)
    listing = ", ".join(names) if names else f"none found in {directory}"
    if value is None or (isinstance(value, str) and not value.strip()):
        default = scan_models(directory).default
        if default is None:
            raise CheckpointChoiceError(f"no model was chosen, and the worker image holds no usable SAM2 "
                                        f"checkpoint to use by default (files: {listing})")
        value = default.name
    if not isinstance(value, str):
        raise CheckpointChoiceError(f"expected a checkpoint file name, got {type(value).__name__}")
    name = _named_file(value, names)
    if name is None:
        if "/" in value or "\\" in value or ".." in value or "\0" in value:
            raise CheckpointChoiceError(f'"{value}" is not a plain file name; choose one of: {listing}')
        raise CheckpointChoiceError(f'"{value}" is not in the checkpoint directory; available: {listing}')
    try:
        entry = inspect_model(directory / name)
    except ModelUnusable as exc:
        raise CheckpointChoiceError(f"{name!r} cannot be used: {exc}") from None
    if verify_sha256 and entry.sha256 is not None:
        try:
            actual = file_sha256(entry.path)
        except OSError as exc:
            raise CheckpointChoiceError(f"{name!r} cannot be read ({type(exc).__name__})") from None
        if actual != entry.sha256:
            raise CheckpointChoiceError(
                f"{name!r} cannot be used: its SHA-256 is {actual}, but its sidecar {Path(name).stem}.json says "
                f"{entry.sha256} (a damaged or replaced file)")
    return entry


def resolve_checkpoint(directory: Path, name: object) -> Path:
    """The path of the usable checkpoint ``name`` names (see :func:`resolve_model`).

    Raises:
        CheckpointChoiceError: see :func:`resolve_model`.
    """
    return resolve_model(directory, name).path
