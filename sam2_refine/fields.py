"""The tool's form: each field's name, default and accepted values, and the check of one value.

Saved tools store the field names (the keys of ``workerInterface`` in the compute parameters), so
these strings never change. The rules here check one value of one field; a bad value raises
:class:`SettingError` naming the field and what it accepts, with the value described in words
(:func:`describe_value`), never a Python repr. The same rules check the defaults a checkpoint's
sidecar gives (:func:`check_tuned_defaults`), so a model cannot set a value the form would refuse.

Used by the settings parser (:mod:`sam2_refine.job.settings`), the UI description
(:mod:`sam2_refine.interface`) and the checkpoint catalogue (:mod:`sam2_refine.model.checkpoints`).
Imports nothing of the package.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

# Field names: the keys of ``workerInterface`` in the compute parameters.
BATCH_XY = "Batch XY"
BATCH_Z = "Batch Z"
BATCH_TIME = "Batch Time"
REFINE_TAGS = "Tag of objects to refine"
MODEL = "Model"
DELETE_ORIGINALS = "Delete original annotations"
PADDING = "Padding"
SMOOTHING = "Smoothing"

# Fields added after the original ones (their defaults keep saved tools working as before).
RESOLUTION = "Resolution"
PROMPT = "Prompt"
MIN_OVERLAP = "Minimum overlap with original"
KEEP_TAGS = "Keep original tags"
# Points and rectangles as prompts, touching objects kept apart.
REFINE_POINTS = "Refine point annotations"
REFINE_RECTANGLES = "Refine rectangle annotations"
SEPARATE = "Keep touching objects apart"
# A tag that makes the originals the job kept easy to find in the app.
KEPT_TAG = "Tag kept annotations"

#: The fields a user sets in the tool's form (the other parameters NimbusImage fills in).
FORM_FIELDS = frozenset({BATCH_XY, BATCH_Z, BATCH_TIME, REFINE_TAGS, MODEL, DELETE_ORIGINALS, PADDING, SMOOTHING,
                         RESOLUTION, PROMPT, MIN_OVERLAP, KEEP_TAGS, REFINE_POINTS, REFINE_RECTANGLES, SEPARATE,
                         KEPT_TAG})

#: Resolution field item -> engine mode (sam2_refine.engine.regions).
RESOLUTION_ITEMS = {"Auto": "auto", "Whole frame": "whole", "Object crops": "crops"}
RESOLUTION_DEFAULT = "Auto"
#: Prompt field item -> engine prompt (sam2_refine.engine.options).
PROMPT_ITEMS = {"Box": "box", "Box + shape": "box+shape", "Best of three by overlap": "best3"}
PROMPT_DEFAULT = "Box"
MIN_OVERLAP_RANGE = (0, 1)
MIN_OVERLAP_DEFAULT = 0

REFINE_POINTS_DEFAULT = False
REFINE_RECTANGLES_DEFAULT = False
#: On by default: measured in bench/bench_accuracy.py (docs/accuracy.md).
SEPARATE_DEFAULT = True

PADDING_RANGE = (-20, 20)
PADDING_DEFAULT = 0
SMOOTHING_RANGE = (0, 3)
SMOOTHING_DEFAULT = 0.7


class SettingError(ValueError):
    """One bad input. ``field`` is the interface field (or parameter) it concerns."""

    def __init__(self, field: str, message: str, advice: str | None = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        #: What to do, when the usual advice (correct the field) does not fit.
        self.advice = advice


def describe_value(value: Any) -> str:
    """A setting's value in words, for a message: ``the text "yes"``, ``the number 21``, ``a list
    of 2 items``; never a Python repr."""
    if value is None:
        return "no value (null)"
    if isinstance(value, bool):
        return f"the value {'true' if value else 'false'}"
    if isinstance(value, (int, float)):
        return f"the number {value:g}" if isinstance(value, float) else f"the number {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f'the text "{shown}"' if shown.strip() else "an empty text"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, dict):
        return "a group of named values (a JSON object)"
    return f"a value of type {type(value).__name__}"


def checkbox_problem(value: Any) -> tuple[str, str | None]:
    """Why ``value`` is not a tick box's value (true or false), and what to do (None: the usual
    advice), in words.

    NimbusImage's form sends a tick box as true or false, and its own checks refuse text
    (``src/utils/workerInterface.ts``, ``normalizeWorkerInterfaceValue``: "Deliberately strict:
    Boolean("false") is true"); this worker is as strict, and says what to do."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
        return (f'it came as the text "{value.strip()}" instead of a tick box value (true or false, without '
                "quotes), as a tool saved by another program may hold it",
                "Tick or untick the box in the tool's settings and save the tool, then run it again")
    return f"expected a tick box value (true or false), got {describe_value(value)}", None


# -- the check of one value -------------------------------------------------------------------------

def check_number(field: str, value: Any, low: float, high: float, default: float) -> float:
    """A number field: in [low, high]; missing, null or blank = ``default``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return float(default)
    if isinstance(value, bool):
        raise SettingError(field, f"expected a number from {low:g} to {high:g}, got {describe_value(value)}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingError(field, f"expected a number from {low:g} to {high:g}, got {describe_value(value)}") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise SettingError(field, f"expected a number from {low:g} to {high:g}, got {describe_value(value)}")
    return number


def check_tags(field: str, value: Any) -> tuple[str, ...]:
    """A tags field: a list of tag strings (or one string); blank tags dropped, duplicates once."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise SettingError(field, f"expected a list of tag strings, got {describe_value(value)}")
    return tuple(dict.fromkeys(t for t in value if t.strip()))


def check_bool(field: str, value: Any) -> bool:
    """A checkbox whose missing or null value is false."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise SettingError(field, *checkbox_problem(value))
    return value


def check_checkbox(field: str, value: Any, default: bool) -> bool:
    """A checkbox: true or false; missing or null (a tool saved before the field existed) is
    the field's default."""
    if value is None:
        return default
    if not isinstance(value, bool):
        raise SettingError(field, *checkbox_problem(value))
    return value


def check_int(field: str, value: Any, minimum: int = 0) -> int:
    """A whole number >= ``minimum`` (a float with no fraction counts)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise SettingError(field, f"expected a whole number, got {describe_value(value)}")
    if value < minimum:
        raise SettingError(field, f"expected a whole number >= {minimum}, got {describe_value(value)}")
    return int(value)


def check_select(field: str, value: Any, items: dict[str, str], default: str) -> str:
    """A select field's engine value; null / "" (a field a saved tool never had) = the default."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return items[default]
    if not isinstance(value, str) or value not in items:
        choices = ", ".join(f'"{k}"' for k in items)
        raise SettingError(field, f"expected one of {choices}, got {describe_value(value)}")
    return items[value]


# -- defaults a model's sidecar may set (sam2_refine.model.sidecar) ---------------------------------

def _tuned_number(field: str, low: float, high: float) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        number = check_number(field, value, low, high, 0)
        return int(number) if number.is_integer() else number
    return check


def _tuned_select(field: str, items: Mapping[str, str]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        check_select(field, value, dict(items), next(iter(items)))
        return value
    return check


#: Fields a checkpoint's sidecar may give a default for (the value the model was tuned with),
#: each checked by its field's own rule and returned as the field takes it.
TUNABLE_FIELDS: dict[str, Callable[[Any], Any]] = {
    PADDING: _tuned_number(PADDING, *PADDING_RANGE),
    SMOOTHING: _tuned_number(SMOOTHING, *SMOOTHING_RANGE),
    RESOLUTION: _tuned_select(RESOLUTION, RESOLUTION_ITEMS),
    PROMPT: _tuned_select(PROMPT, PROMPT_ITEMS),
    MIN_OVERLAP: _tuned_number(MIN_OVERLAP, *MIN_OVERLAP_RANGE),
}


def check_tuned_defaults(defaults: Mapping[str, Any]) -> dict[str, Any]:
    """A sidecar's ``"defaults"``, checked: field name -> value as the field takes it.

    Raises:
        ValueError: every field that is not tunable or whose value its field would refuse.
    """
    problems, checked = [], {}
    for name, value in defaults.items():
        check = TUNABLE_FIELDS.get(name)
        if check is None:
            problems.append(f"{name!r} is not a field a model can set (one of: {', '.join(TUNABLE_FIELDS)})")
        elif value is None or (isinstance(value, str) and not value.strip()):
            problems.append(f"{name}: no value given")
        else:
            try:
                checked[name] = check(value)
            except SettingError as exc:
                problems.append(str(exc))
    if problems:
        raise ValueError("; ".join(problems))
    return checked
