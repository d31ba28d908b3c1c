"""The optional sidecar of a checkpoint: ``NAME.json`` beside ``NAME.pt`` (or ``NAME.pth``).

It tells the worker what the file's weights alone cannot::

    {
      "label": "Nuclei, lab fine-tune",
      "description": "SAM2.1 small fine-tuned on 1,200 DAPI nuclei (confocal, 40x), March 2026.",
      "sha256": "3f0c...64 hex digits...",
      "config": "sam2.1_hiera_s",
      "defaults": {"Prompt": "Box + shape", "Resolution": "Object crops", "Smoothing": 0.5}
    }

Every key is optional; no other key is allowed. ``label`` (at most 60 characters) and
``description`` (at most 500) are shown in the Model field. ``sha256`` is the file's digest,
checked by a compute job before the model is loaded (not by the interface request, which must stay
fast). ``config`` names one of sam2's packaged configs (``sam2.1_hiera_s``, optionally with
``.yaml``; never a path or a YAML of one's own) and must agree with the architecture the
weights show. ``defaults`` gives values for this worker's own fields that the model was tuned
with; each is checked by the same rules as the field itself (the checker is passed in by the
caller: :func:`sam2_refine.fields.check_tuned_defaults`).

A sidecar that breaks any rule makes its checkpoint unavailable, with the reason; it never
stops the worker. No torch here.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KEYS = ("label", "description", "sha256", "config", "defaults")
MAX_LABEL = 60
MAX_DESCRIPTION = 500
MAX_BYTES = 64 * 1024
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")

#: Checks a ``defaults`` object; returns the values as the fields take them, or raises
#: ValueError saying which field's value is wrong and why.
DefaultsCheck = Callable[[Mapping[str, Any]], dict[str, Any]]


class SidecarError(ValueError):
    """The sidecar breaks a rule; the message says which (for users)."""


@dataclass(frozen=True)
class Sidecar:
    """A checked sidecar (see the module docstring); absent keys are None / empty."""

    label: str | None = None
    description: str | None = None
    sha256: str | None = None
    config: str | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)


def sidecar_path(checkpoint: Path) -> Path:
    """``NAME.json`` for ``NAME.pt``."""
    return checkpoint.with_suffix(".json")


def _text(data: dict[str, Any], key: str, limit: int) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise SidecarError(f'"{key}" must be non-empty text, got {value!r}')
    if len(value) > limit:
        raise SidecarError(f'"{key}" is {len(value)} characters long (at most {limit})')
    if any(unicodedata.category(c).startswith("C") and c not in "\n" for c in value):
        raise SidecarError(f'"{key}" holds control characters')
    if key == "label" and "\n" in value:
        raise SidecarError('"label" must be one line')
    return value.strip()


def _config(value: Any, known: set[str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise SidecarError(f'"config" must be the name of one of sam2\'s packaged configs, got {value!r}')
    if "/" in value or "\\" in value or ".." in value:
        raise SidecarError(f'"config" must be a config name, not a path ({value!r}); '
                           f'one of: {", ".join(sorted(known))}')
    name = value.removesuffix(".yaml")
    if name not in known:
        raise SidecarError(f'"config" {value!r} is not one of sam2\'s packaged configs ({", ".join(sorted(known))})')
    return name


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise SidecarError(f'"{key}" is given twice')
        result[key] = value
    return result


def parse_sidecar(text: str, known_configs: set[str], check_defaults: DefaultsCheck | None) -> Sidecar:
    """Check a sidecar's text (see the module docstring).

    Args:
        text: The file's content.
        known_configs: Names ``"config"`` may take.
        check_defaults: Checks ``"defaults"``; None accepts none at all.

    Raises:
        SidecarError: the first rule it breaks.
    """
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicates)
    except json.JSONDecodeError as exc:
        raise SidecarError(f"not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, dict):
        raise SidecarError(f"expected a JSON object, got {type(data).__name__}")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise SidecarError(f"unknown key(s) {', '.join(repr(k) for k in unknown)}; allowed: {', '.join(KEYS)}")
    sha256 = data.get("sha256")
    if sha256 is not None and (not isinstance(sha256, str) or not _SHA256.match(sha256)):
        raise SidecarError(f'"sha256" must be 64 hexadecimal digits, got {sha256!r}')
    defaults = data.get("defaults")
    if defaults is None:
        checked: dict[str, Any] = {}
    elif not isinstance(defaults, dict):
        raise SidecarError(f'"defaults" must be an object of field name -> value, got {defaults!r}')
    elif check_defaults is None:
        raise SidecarError('"defaults" cannot be checked here')
    else:
        try:
            checked = check_defaults(defaults)
        except ValueError as exc:
            raise SidecarError(f'"defaults": {exc}') from None
    return Sidecar(
        label=_text(data, "label", MAX_LABEL),
        description=_text(data, "description", MAX_DESCRIPTION),
        sha256=sha256.lower() if sha256 else None,
        config=_config(data.get("config"), known_configs),
        defaults=checked,
    )


def read_sidecar(path: Path, known_configs: set[str], check_defaults: DefaultsCheck | None) -> Sidecar | None:
    """The sidecar at ``path``, checked; None when there is none.

    Raises:
        SidecarError: unreadable, too large, or it breaks a rule (the message names the file).
    """
    if not path.exists():
        return None
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise SidecarError(f"its sidecar {path.name} cannot be read ({type(exc).__name__})") from None
    if len(raw) > MAX_BYTES:
        raise SidecarError(f"its sidecar {path.name} is larger than {MAX_BYTES // 1024} kB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SidecarError(f"its sidecar {path.name} is not UTF-8 text") from None
    try:
        return parse_sidecar(text, known_configs, check_defaults)
    except SidecarError as exc:
        raise SidecarError(f"its sidecar {path.name}: {exc}") from None
