"""The worker's UI description (docs/nimbus-contract.md §3) and the checkpoint list it offers.

The fields' names, defaults and accepted values are :mod:`sam2_refine.fields`; this module lays
them out as NimbusImage's form (type, tooltip, display order) with the checkpoint catalogue's
models in the Model select.

This module imports neither torch nor sam2: ``--request interface`` runs on a CPU queue with
no GPU and no dataset, and must finish in about a second.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sam2_refine.model.checkpoints import DEFAULT_MODEL, ModelCatalogue
from sam2_refine.fields import (
    BATCH_TIME,
    BATCH_XY,
    BATCH_Z,
    DELETE_ORIGINALS,
    KEEP_TAGS,
    KEPT_TAG,
    MIN_OVERLAP,
    MIN_OVERLAP_DEFAULT,
    MIN_OVERLAP_RANGE,
    MODEL,
    PADDING,
    PADDING_DEFAULT,
    PADDING_RANGE,
    PROMPT,
    PROMPT_DEFAULT,
    PROMPT_ITEMS,
    REFINE_POINTS,
    REFINE_POINTS_DEFAULT,
    REFINE_RECTANGLES,
    REFINE_RECTANGLES_DEFAULT,
    REFINE_TAGS,
    RESOLUTION,
    RESOLUTION_DEFAULT,
    RESOLUTION_ITEMS,
    SEPARATE,
    SEPARATE_DEFAULT,
    SMOOTHING,
    SMOOTHING_DEFAULT,
    SMOOTHING_RANGE,
)
from sam2_refine.worker_info import CHECKPOINT_DIR_ENV, DEFAULT_CHECKPOINT_DIR, INTERFACE_NAME

NOTES = INTERFACE_NAME  # the notes entry at the top of the form (not a value the job reads)

DESCRIPTION = (
    "This tool uses the SAM2 model to refine existing annotations into outlines that follow the "
    "objects in the image. Polygons prompt the model with their bounding box (optionally also "
    "their shape); rectangles, when turned on below, with their box; points, when turned on below, "
    "with the point itself. Each result is a new polygon annotation; an annotation whose result "
    "fails the quality checks is left unchanged, and can be tagged so that you can find it."
)


def checkpoint_dir() -> Path:
    """Where the SAM2 checkpoints are: ``$SAM2_CHECKPOINT_DIR``, else ``/code/sam2/checkpoints``."""
    return Path(os.environ.get(CHECKPOINT_DIR_ENV) or DEFAULT_CHECKPOINT_DIR)


def default_model(models: list[str]) -> str | None:
    """``sam2.1_hiera_small.pt`` when present, else the first model, else None."""
    if DEFAULT_MODEL in models:
        return DEFAULT_MODEL
    return models[0] if models else None


def _batch_field(axis_words: str, order: int) -> dict[str, Any]:
    return {
        "type": "text",
        "vueAttrs": {
            "placeholder": "ex. 1-3, 5-8, or all",
            "label": f"Enter the {axis_words} you want to process",
            "persistentPlaceholder": True,
            "filled": True,
            "tooltip": (f"Enter the {axis_words} to process (1-based). Separate multiple groups "
                        "with a comma, or enter 'all'. Leave blank for the current one."),
        },
        "displayOrder": order,
    }


MODEL_TOOLTIP = ("The SAM2 model to use for refinement. Larger models may give slightly better results, but "
                 "are slower and use more memory. Left empty, the default model is used.")


def _model_field(models: Sequence[str] | ModelCatalogue, order: int) -> dict[str, Any]:
    """The Model select: the usable checkpoints as ``"<label> (<file name>)"`` items."""
    if not isinstance(models, ModelCatalogue):
        return {"type": "select", "items": list(models), "default": default_model(list(models)),
                "tooltip": MODEL_TOOLTIP, "displayOrder": order}
    lines = []
    for model in models.models:
        line = model.item + (f": {model.description}" if model.description else "")
        if model.defaults:
            line += " [tuned for " + ", ".join(f"{k} = {v}" for k, v in model.defaults.items()) + "]"
        lines.append(line)
    tooltip = MODEL_TOOLTIP
    if lines:
        tooltip += (" Models: " + "; ".join(lines) + ". A model's tuned values are used for fields left "
                    "empty; the form's own defaults follow the default model.")
    default = models.default
    return {"type": "select", "items": models.items, "default": default.item if default else None,
            "tooltip": tooltip, "displayOrder": order}


def _follow_default_model(spec: dict[str, Any], models: Sequence[str] | ModelCatalogue) -> dict[str, Any]:
    """The fields' defaults become the default model's tuned values (from its sidecar)."""
    default = models.default if isinstance(models, ModelCatalogue) else None
    for name, value in (default.defaults if default is not None else {}).items():
        if name in spec:
            spec[name]["default"] = value
    return spec


def build_interface(models: Sequence[str] | ModelCatalogue) -> dict[str, Any]:
    """The UI description: field name -> field spec, in display order.

    Args:
        models: The checkpoint directory's models (:func:`sam2_refine.model.checkpoints.scan_models`),
            or plain item strings for the Model select.
    """
    return _follow_default_model({
        NOTES: {"type": "notes", "value": DESCRIPTION, "displayOrder": 0},
        BATCH_XY: _batch_field("XY positions", 1),
        BATCH_Z: _batch_field("Z slices", 2),
        BATCH_TIME: _batch_field("Time points", 3),
        REFINE_TAGS: {
            "type": "tags",
            "tooltip": "Annotations carrying any of these tags are refined. Leave empty to refine "
                       "every polygon annotation in the batch (and every point and rectangle, where "
                       "those are turned on below).",
            "displayOrder": 4,
        },
        MODEL: _model_field(models, 5),
        DELETE_ORIGINALS: {
            "type": "checkbox",
            "default": False,
            "tooltip": "If checked, each original annotation is deleted once its refined "
                       "replacement has been created. Originals that could not be refined are kept.",
            "displayOrder": 6,
        },
        PADDING: {
            "type": "number",
            "min": PADDING_RANGE[0],
            "max": PADDING_RANGE[1],
            "default": PADDING_DEFAULT,
            "unit": "Pixels",
            "tooltip": "Padding will expand (or, if negative, contract) the polygon boundary.",
            "displayOrder": 7,
        },
        SMOOTHING: {
            "type": "number",
            "min": SMOOTHING_RANGE[0],
            "max": SMOOTHING_RANGE[1],
            "default": SMOOTHING_DEFAULT,
            "tooltip": "Smoothing is used to simplify the polygons (the largest distance, in "
                       "pixels, a simplified outline may stray from the mask); 0.7 is a good default.",
            "displayOrder": 8,
        },
        RESOLUTION: {
            "type": "select",
            "items": list(RESOLUTION_ITEMS),
            "default": RESOLUTION_DEFAULT,
            "tooltip": "Whole frame: the model sees the whole frame squeezed to 1024 px (small objects "
                       "in large frames lose detail). Object crops: windows at native resolution "
                       "around groups of nearby objects (slower, one model pass per window). Auto: "
                       "crops when the frame is larger than 1024 px and the objects are small in it.",
            "displayOrder": 9,
        },
        PROMPT: {
            "type": "select",
            "items": list(PROMPT_ITEMS),
            "default": PROMPT_DEFAULT,
            "tooltip": "Box: each annotation's bounding box. Box + shape: the box and the annotation's "
                       "own outline. Best of three by overlap: three candidate masks per box, keeping "
                       "the one that agrees best with the annotation.",
            "displayOrder": 10,
        },
        MIN_OVERLAP: {
            "type": "number",
            "min": MIN_OVERLAP_RANGE[0],
            "max": MIN_OVERLAP_RANGE[1],
            "step": 0.05,
            "default": MIN_OVERLAP_DEFAULT,
            "tooltip": "Refined shapes that overlap their original less than this (intersection over "
                       "union, 0 to 1) are not created and the original is kept. 0 turns the check off.",
            "displayOrder": 11,
        },
        KEEP_TAGS: {
            "type": "checkbox",
            "default": False,
            "tooltip": "Also give each refined annotation the tags of its original annotation.",
            "displayOrder": 12,
        },
        **shape_fields(13),
        KEPT_TAG: {
            "type": "text",
            "vueAttrs": {
                "placeholder": "ex. sam2-kept (empty: no tag)",
                "label": "Tag for annotations left unchanged",
                "persistentPlaceholder": True,
                "filled": True,
            },
            "tooltip": "If given, every original annotation the job leaves unchanged (its refined outline failed "
                       "a quality check, or its image could not be read) gets this tag, so that the tag filter "
                       "shows the outlines left for you to fix. Nothing else of them changes. Leave empty for "
                       "no tag.",
            "displayOrder": 16,
        },
    }, models)


def shape_fields(first_order: int) -> dict[str, Any]:
    """The fields of issue 13 (points and rectangles as prompts, touching objects kept apart),
    from display order ``first_order`` on."""
    return {
        REFINE_POINTS: {
            "type": "checkbox",
            "default": REFINE_POINTS_DEFAULT,
            "tooltip": "Also turn point annotations carrying the tags into outlines: each point prompts "
                       "the model for three masks; of those of a size typical for that tag's points at the "
                       "location, the one the model rates best is kept (the model's rating alone when "
                       "fewer than three points share the tag). Masks far from that size are not used.",
            "displayOrder": first_order,
        },
        REFINE_RECTANGLES: {
            "type": "checkbox",
            "default": REFINE_RECTANGLES_DEFAULT,
            "tooltip": "Also turn rectangle annotations carrying the tags into outlines, prompting with each "
                       "rectangle as its box (a rotated rectangle prompts with its bounding box).",
            "displayOrder": first_order + 1,
        },
        SEPARATE: {
            "type": "checkbox",
            "default": SEPARATE_DEFAULT,
            "tooltip": "Refined outlines of objects with the same tags do not overlap: where two masks claim "
                       "the same pixels, the pixels go to the object the model is surer of (on a tie, the "
                       "nearer one). Turn off for objects that really overlap.",
            "displayOrder": first_order + 2,
        },
    }
