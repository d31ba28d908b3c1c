"""The UI description (contract section 3), the checkpoint list, and a torch-free interface path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sam2_refine import interface as ui
from sam2_refine.model.checkpoints import list_candidates
from sam2_refine.interface import build_interface, checkpoint_dir, default_model

REPO = Path(__file__).resolve().parents[1]

EXPECTED_ORDER = [
    "SAM2 Refiner",
    "Batch XY",
    "Batch Z",
    "Batch Time",
    "Tag of objects to refine",
    "Model",
    "Delete original annotations",
    "Padding",
    "Smoothing",
]
#: Fields added after the original ones (the originals keep their order and defaults).
ADDED = ["Resolution", "Prompt", "Minimum overlap with original", "Keep original tags",
         "Refine point annotations", "Refine rectangle annotations", "Keep touching objects apart",
         "Tag kept annotations"]
MODELS = ["sam2.1_hiera_base_plus.pt", "sam2.1_hiera_small.pt", "sam2.1_hiera_tiny.pt"]


def test_fields_names_and_order() -> None:
    spec = build_interface(MODELS)
    assert list(spec) == EXPECTED_ORDER + ADDED
    assert [spec[name]["displayOrder"] for name in EXPECTED_ORDER + ADDED] == list(range(len(EXPECTED_ORDER + ADDED)))


def test_added_fields_and_defaults() -> None:
    spec = build_interface(MODELS)
    assert spec["Resolution"]["items"] == ["Auto", "Whole frame", "Object crops"]
    assert spec["Resolution"]["default"] == "Auto"
    assert spec["Prompt"]["items"] == ["Box", "Box + shape", "Best of three by overlap"]
    assert spec["Prompt"]["default"] == "Box"
    overlap = spec["Minimum overlap with original"]
    assert (overlap["type"], overlap["min"], overlap["max"], overlap["default"]) == ("number", 0, 1, 0)
    assert spec["Keep original tags"] == {**spec["Keep original tags"], "type": "checkbox", "default": False}
    assert all(spec[name].get("tooltip") for name in ADDED)


def test_issue_13_fields_come_after_the_others_with_their_defaults() -> None:
    spec = build_interface(MODELS)
    assert [spec[name]["displayOrder"] for name in (ui.REFINE_POINTS, ui.REFINE_RECTANGLES, ui.SEPARATE)] == [
        13, 14, 15]
    assert spec[ui.REFINE_POINTS]["default"] is False  # the original behaviour: polygons only
    assert spec[ui.REFINE_RECTANGLES]["default"] is False
    assert spec[ui.SEPARATE]["default"] is True  # decided by measurement: docs/accuracy.md
    assert all(spec[name]["tooltip"] for name in (ui.REFINE_POINTS, ui.REFINE_RECTANGLES, ui.SEPARATE))


def test_field_types() -> None:
    spec = build_interface(MODELS)
    assert {name: field["type"] for name, field in spec.items()} == {
        "SAM2 Refiner": "notes",
        "Batch XY": "text",
        "Batch Z": "text",
        "Batch Time": "text",
        "Tag of objects to refine": "tags",
        "Model": "select",
        "Delete original annotations": "checkbox",
        "Padding": "number",
        "Smoothing": "number",
        "Resolution": "select",
        "Prompt": "select",
        "Minimum overlap with original": "number",
        "Keep original tags": "checkbox",
        "Refine point annotations": "checkbox",
        "Refine rectangle annotations": "checkbox",
        "Keep touching objects apart": "checkbox",
        "Tag kept annotations": "text",
    }


def test_module_constants_match_field_names() -> None:
    assert [ui.NOTES, ui.BATCH_XY, ui.BATCH_Z, ui.BATCH_TIME, ui.REFINE_TAGS, ui.MODEL,
            ui.DELETE_ORIGINALS, ui.PADDING, ui.SMOOTHING] == EXPECTED_ORDER


def test_notes_carry_the_description() -> None:
    notes = build_interface(MODELS)["SAM2 Refiner"]
    assert isinstance(notes["value"], str)
    assert "SAM2" in notes["value"]
    assert len(notes["value"]) > 40


def test_the_tool_describes_polygons_points_and_rectangles() -> None:
    """Issue 23: the notes field and the Docker image's description (worker_info, which
    tests/test_packaging.py checks against both Dockerfiles) say what is refined now."""
    from sam2_refine import worker_info

    for text in (build_interface(MODELS)["SAM2 Refiner"]["value"], worker_info.DESCRIPTION):
        words = text.lower()
        assert "polygon" in words and "rectangle" in words and "point" in words, text
        assert "(via bounding boxes)" not in words


def test_kept_tag_field_is_text_and_empty_by_default() -> None:
    field = build_interface(MODELS)[ui.KEPT_TAG]
    assert field["type"] == "text" and "default" not in field  # the app's text default is ""
    assert field["displayOrder"] == 16 and field["tooltip"]


def test_padding_and_smoothing_numbers() -> None:
    spec = build_interface(MODELS)
    padding = spec["Padding"]
    assert (padding["min"], padding["max"], padding["default"], padding["unit"]) == (-20, 20, 0, "Pixels")
    smoothing = spec["Smoothing"]
    assert (smoothing["min"], smoothing["max"], smoothing["default"]) == (0, 3, 0.7)


@pytest.mark.parametrize(("field", "words"), [("Batch XY", "XY positions"), ("Batch Z", "Z slices"),
                                              ("Batch Time", "Time points")])
def test_batch_fields_vue_attrs(field: str, words: str) -> None:
    spec = build_interface(MODELS)[field]
    attrs = spec["vueAttrs"]
    assert attrs["placeholder"] == "ex. 1-3, 5-8, or all"
    assert attrs["label"] == f"Enter the {words} you want to process"
    assert attrs["persistentPlaceholder"] is True
    assert attrs["filled"] is True
    assert isinstance(attrs["tooltip"], str) and attrs["tooltip"].strip()
    assert "all" in attrs["tooltip"]


def test_model_select_items_and_default() -> None:
    spec = build_interface(MODELS)["Model"]
    assert spec["items"] == MODELS
    assert spec["default"] == "sam2.1_hiera_small.pt"


def test_model_default_first_when_small_missing() -> None:
    models = ["sam2.1_hiera_large.pt", "sam2.1_hiera_tiny.pt"]
    spec = build_interface(models)["Model"]
    assert spec["items"] == models
    assert spec["default"] == "sam2.1_hiera_large.pt"


def test_model_default_none_without_models() -> None:
    spec = build_interface([])["Model"]
    assert spec["items"] == []
    assert spec["default"] is None
    assert default_model([]) is None


def test_model_items_are_a_copy() -> None:
    models = list(MODELS)
    spec = build_interface(models)
    spec["Model"]["items"].append("x.pt")
    assert models == MODELS


def test_model_items_from_a_directory_are_sorted(tmp_path: Path) -> None:
    for name in ("sam2.1_hiera_tiny.pt", "sam2.1_hiera_base_plus.pt", "sam2.1_hiera_small.pt"):
        (tmp_path / name).write_bytes(b"")
    spec = build_interface(list_candidates(tmp_path))["Model"]
    assert spec["items"] == sorted(spec["items"]) == MODELS
    assert spec["default"] == "sam2.1_hiera_small.pt"


def test_checkbox_default_false() -> None:
    spec = build_interface(MODELS)["Delete original annotations"]
    assert spec["default"] is False


def test_every_field_but_the_notes_has_a_tooltip() -> None:
    spec = build_interface(MODELS)
    for name, field in spec.items():
        if field["type"] == "notes":
            continue
        tip = field["vueAttrs"]["tooltip"] if name.startswith("Batch ") else field["tooltip"]
        assert isinstance(tip, str) and len(tip.strip()) > 10, name


def test_interface_is_json_serialisable() -> None:
    spec = build_interface(MODELS)
    assert json.loads(json.dumps(spec)) == spec


def test_list_checkpoints_only_pt_files_sorted(tmp_path: Path) -> None:
    for name in ("b.pt", "a.pt", "c.txt", "d.pt.bak", "e.PT.txt", "sam2.1_hiera_tiny.pt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "dir.pt").mkdir()  # a directory is not a checkpoint
    assert list_candidates(tmp_path) == ["a.pt", "b.pt", "sam2.1_hiera_tiny.pt"]


def test_list_checkpoints_missing_or_empty_dir(tmp_path: Path) -> None:
    assert list_candidates(tmp_path / "nope") == []
    assert list_candidates(tmp_path) == []
    file_path = tmp_path / "file"
    file_path.write_text("x")
    assert list_candidates(file_path) == []


def test_checkpoint_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SAM2_CHECKPOINT_DIR", str(tmp_path))
    assert checkpoint_dir() == tmp_path
    monkeypatch.delenv("SAM2_CHECKPOINT_DIR")
    assert checkpoint_dir() == Path("/code/sam2/checkpoints")
    monkeypatch.setenv("SAM2_CHECKPOINT_DIR", "")
    assert checkpoint_dir() == Path("/code/sam2/checkpoints")


def test_interface_and_cli_do_not_import_torch() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    code = ("import sys, sam2_refine.interface, sam2_refine.cli; "
            "print('torch' in sys.modules, 'sam2' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


def test_help_prints_the_usage_an_operator_needs_and_exits_0(tmp_path: Path) -> None:
    """``entrypoint.py --help``, as a subprocess: arguments, exit codes and every environment
    variable the package reads (each ``*_ENV = "..."`` constant outside the test doubles), on
    stdout, exit 0, without importing torch."""
    import ast
    import re

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-X", "importtime", str(root / "entrypoint.py"), "--help"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for argument in ("--apiUrl", "--token", "--request", "--parameters", "--datasetId"):
        assert argument in text
    for status in ("0 ", "1 ", "2 ", "143 "):
        assert f"\n  {status}" in text
    names = set()
    for path in (root / "sam2_refine").rglob("*.py"):
        if "testing" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and node.targets[0].id.endswith("_ENV") and isinstance(node.value, ast.Constant)):
                names.add(node.value.value)
    assert len(names) >= 8, names
    missing = sorted(name for name in names if name not in text)
    assert not missing, missing
    documented = set(re.findall(r"\b(SAM2_[A-Z_]+)\b", text))
    assert documented == names, documented ^ names
    imported = re.findall(r"\|\s+(\S+)\s*$", out.stderr, flags=re.MULTILINE)  # -X importtime's list
    assert "json" in imported and "torch" not in imported and "sam2" not in imported
