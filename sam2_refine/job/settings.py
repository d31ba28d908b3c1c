"""Compute parameters -> one validated, immutable :class:`RefineSettings`.

Every input is checked here, before the job touches the server's data, by the fields' own rules
(:mod:`sam2_refine.fields`). Each bad value becomes a :class:`~sam2_refine.fields.SettingError`
naming the field and what it accepts; :func:`parse_settings` collects all of them so the user sees
every problem at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sam2_refine import fields
from sam2_refine.annotations import Location
from sam2_refine.job.batch_ranges import AxisSelection, BatchRangeError, parse_batch
from sam2_refine.model.checkpoints import CheckpointChoiceError, ModelEntry, resolve_model
from sam2_refine.fields import (
    SettingError,
    check_bool,
    check_checkbox,
    check_int,
    check_number,
    check_select,
    check_tags,
    describe_value,
)


class SettingsErrors(ValueError):
    """Every bad input of one job."""

    def __init__(self, errors: list[SettingError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


@dataclass(frozen=True)
class RefineSettings:
    """Everything one compute job needs to know, validated.

    Attributes:
        dataset_id: The dataset (folder) id.
        model: Checkpoint file name, e.g. ``sam2.1_hiera_small.pt``.
        checkpoint: Its path: a usable SAM2 checkpoint of the checkpoint directory (recognised from
            its weights; its sidecar's sha256, if any, checked).
        padding: Pixels to grow (or, negative, shrink) each refined polygon, in [-20, 20].
        smoothing: Simplification tolerance in pixels, in [0, 3].
        refine_tags: Refine annotations carrying any of these; empty = every polygon.
        delete_originals: Delete each original once its replacement is confirmed.
        batch_xy, batch_z, batch_time: The batch fields, parsed (positions 0-based).
        tile: The position the tool was launched from (used for blank batch fields).
        channel: Channel assigned to the new annotations.
        output_tags: Tags of the new annotations (may be empty).
        keep_original_tags: Add each original's own tags to its refined annotation.
        resolution: ``"auto"``, ``"whole"`` or ``"crops"`` (sam2_refine.engine.regions).
        prompt: ``"box"``, ``"box+shape"`` or ``"best3"`` (sam2_refine.engine.options).
        min_overlap: Minimum IoU of a refined shape with its original, in [0, 1]; 0 = off.
        refine_points: Also refine point annotations (prompted with the point).
        refine_rectangles: Also refine rectangle annotations (prompted with their box).
        separate: Keep the refined outlines of touching objects (same tags, same location) apart.
        tool_id: The id of the tool that launched the job (compute parameter ``id``), or None;
            it tells which dataset view's layers to use (sam2_refine.nimbus.views).
        kept_tag: A tag added to every original the job keeps (so the app's tag filter finds
            them), or None (off).
    """

    dataset_id: str
    model: str
    checkpoint: Path
    padding: float
    smoothing: float
    refine_tags: tuple[str, ...]
    delete_originals: bool
    batch_xy: AxisSelection
    batch_z: AxisSelection
    batch_time: AxisSelection
    tile: Location
    channel: int
    output_tags: tuple[str, ...]
    keep_original_tags: bool = False
    resolution: str = "auto"
    prompt: str = "box"
    min_overlap: float = 0.0
    refine_points: bool = fields.REFINE_POINTS_DEFAULT
    refine_rectangles: bool = fields.REFINE_RECTANGLES_DEFAULT
    separate: bool = fields.SEPARATE_DEFAULT
    tool_id: str | None = None
    kept_tag: str | None = None

    @property
    def shapes(self) -> tuple[str, ...]:
        """The annotation shapes the job lists as originals (``blob`` with ``polygon``)."""
        return ("polygon", "blob") + (("rectangle",) if self.refine_rectangles else ()) + (
            ("point",) if self.refine_points else ())


def _shape_settings(values: dict[str, Any], attempt: Any) -> dict[str, Any]:
    """The fields of issue 13, each checked on its own (see :func:`sam2_refine.interface.shape_fields`)."""
    return {
        "refine_points": attempt(check_checkbox, fields.REFINE_POINTS, values.get(fields.REFINE_POINTS),
                                 fields.REFINE_POINTS_DEFAULT),
        "refine_rectangles": attempt(check_checkbox, fields.REFINE_RECTANGLES, values.get(fields.REFINE_RECTANGLES),
                                     fields.REFINE_RECTANGLES_DEFAULT),
        "separate": attempt(check_checkbox, fields.SEPARATE, values.get(fields.SEPARATE), fields.SEPARATE_DEFAULT),
    }


def _kept_tag(field: str, value: Any, refine_tags: tuple[str, ...] | None,
              output_tags: tuple[str, ...] | None) -> str | None:
    """The "Tag kept annotations" text: one tag, or None when empty (off). It must tell the
    kept originals apart: not one of the tags to refine (every original carries one) nor one of
    the tool's own tags (every refined annotation carries those)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise SettingError(field, f"expected one tag as text, got {describe_value(value)}")
    tag = value.strip()
    if tag in (refine_tags or ()):
        raise SettingError(field, f'"{tag}" is also a tag of the objects to refine, which every annotation the '
                                  "job looks at may carry; choose a tag of its own, such as \"sam2-kept\"")
    if tag in (output_tags or ()):
        raise SettingError(field, f'"{tag}" is also the tag the tool gives to refined annotations, so kept and '
                                  "refined ones could not be told apart; choose another, such as \"sam2-kept\"")
    return tag


def _tile(value: Any) -> Location:
    if not isinstance(value, dict):
        raise SettingError("tile", f"expected the position the tool was started from ({{XY, Z, Time}}), got "
                                   f"{describe_value(value)}")
    return Location(*(check_int(f"tile.{k}", value.get(k, 0)) for k in ("XY", "Z", "Time")))


def with_tuned_defaults(values: Mapping[str, Any], model: ModelEntry | None) -> dict[str, Any]:
    """The field values with the model's tuned defaults put where a field is null, empty or
    missing (a saved tool that never had the field, or a field left blank). A value the
    user gave always wins."""
    merged = dict(values)
    for name, value in (model.defaults if model is not None else {}).items():
        current = merged.get(name)
        if current is None or (isinstance(current, str) and not current.strip()):
            merged[name] = value
    return merged


def _tool_id(value: Any) -> str | None:
    """The launching tool's id, or None where the parameters carry none (it only guides the
    choice of dataset view, so an odd value is not an error)."""
    return value.strip() if isinstance(value, str) and value.strip() else None


def parse_settings(params: Any, dataset_id: str | None, checkpoint_dir: Path) -> RefineSettings:
    """Check every compute input and build the settings.

    Args:
        params: The ``--parameters`` JSON (docs/nimbus-contract.md §2).
        dataset_id: ``--datasetId``, or None to take ``params["datasetId"]``.
        checkpoint_dir: Where the Model field's checkpoint must be.

    Raises:
        SettingsErrors: one :class:`SettingError` per bad input.
    """
    errors: list[SettingError] = []
    if not isinstance(params, dict):
        raise SettingsErrors([SettingError("parameters", "expected a JSON object")])
    values = params.get("workerInterface")
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise SettingsErrors([SettingError("workerInterface", "expected a JSON object")])

    def attempt(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except SettingError as exc:
            errors.append(exc)
        except BatchRangeError as exc:
            errors.append(SettingError(exc.field, exc.message))
        except CheckpointChoiceError as exc:
            errors.append(SettingError(fields.MODEL, str(exc)))
        return None

    dataset = dataset_id or params.get("datasetId")
    if not isinstance(dataset, str) or not dataset.strip():
        errors.append(SettingError("datasetId", "no dataset id given (--datasetId)"))
    model = attempt(resolve_model, checkpoint_dir, values.get(fields.MODEL))
    values = with_tuned_defaults(values, model)
    padding = attempt(check_number, fields.PADDING, values.get(fields.PADDING), *fields.PADDING_RANGE,
                      fields.PADDING_DEFAULT)
    smoothing = attempt(check_number, fields.SMOOTHING, values.get(fields.SMOOTHING), *fields.SMOOTHING_RANGE,
                        fields.SMOOTHING_DEFAULT)
    refine_tags = attempt(check_tags, fields.REFINE_TAGS, values.get(fields.REFINE_TAGS))
    delete = attempt(check_bool, fields.DELETE_ORIGINALS, values.get(fields.DELETE_ORIGINALS))
    batches = [attempt(parse_batch, name, values.get(name))
               for name in (fields.BATCH_XY, fields.BATCH_Z, fields.BATCH_TIME)]
    tile = attempt(_tile, params.get("tile", params.get("assignment")))
    channel = attempt(check_int, "channel", params.get("channel", 0))
    output_tags = attempt(check_tags, "tags", params.get("tags"))
    keep_tags = attempt(check_bool, fields.KEEP_TAGS, values.get(fields.KEEP_TAGS))
    resolution = attempt(check_select, fields.RESOLUTION, values.get(fields.RESOLUTION), fields.RESOLUTION_ITEMS,
                         fields.RESOLUTION_DEFAULT)
    prompt = attempt(check_select, fields.PROMPT, values.get(fields.PROMPT), fields.PROMPT_ITEMS, fields.PROMPT_DEFAULT)
    min_overlap = attempt(check_number, fields.MIN_OVERLAP, values.get(fields.MIN_OVERLAP), *fields.MIN_OVERLAP_RANGE,
                          fields.MIN_OVERLAP_DEFAULT)
    shape_settings = _shape_settings(values, attempt)
    kept_tag = attempt(_kept_tag, fields.KEPT_TAG, values.get(fields.KEPT_TAG), refine_tags, output_tags)
    if errors:
        raise SettingsErrors(errors)
    return RefineSettings(
        dataset_id=str(dataset).strip(),
        model=model.name,
        checkpoint=model.path,
        padding=padding,
        smoothing=smoothing,
        refine_tags=refine_tags,
        delete_originals=delete,
        batch_xy=batches[0],
        batch_z=batches[1],
        batch_time=batches[2],
        tile=tile,
        channel=channel,
        output_tags=output_tags,
        keep_original_tags=keep_tags,
        resolution=resolution,
        prompt=prompt,
        min_overlap=min_overlap,
        kept_tag=kept_tag,
        **shape_settings,
        tool_id=_tool_id(params.get("id")),
    )
