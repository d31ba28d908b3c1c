"""The checkpoint directory as the Model field offers it: sidecars, labels, tuned defaults, the
sha256 check, and the Model value confined to the directory's own files (no torch model built:
the checkpoints have the real layouts and constant weights)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from sam2_refine.model import checkpoints as ckpts
from sam2_refine import interface as ui
from sam2_refine.model.checkpoints import CheckpointChoiceError, resolve_model, scan_models
from sam2_refine.fields import check_tuned_defaults
from sam2_refine.job.settings import SettingsErrors, parse_settings
from sam2_refine.testing.checkpoints import write_layout_checkpoint

SMALL = "sam2.1_hiera_small.pt"
LAB = "lab_nuclei_ft.pt"
GOOD_SIDECAR = {
    "label": "Nuclei, lab fine-tune",
    "description": "SAM2.1 small fine-tuned on 1,200 DAPI nuclei.",
    "config": "sam2.1_hiera_s",
    "defaults": {"Prompt": "Box + shape", "Resolution": "Object crops", "Smoothing": "0.5", "Padding": 1},
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    """The stock small model and a lab's fine-tune of it (with its sidecar)."""
    directory = tmp_path / "checkpoints"
    write_layout_checkpoint(directory / SMALL, SMALL, untrained=False)
    lab = write_layout_checkpoint(directory / LAB, "sam2.1_hiera_s", untrained=False)
    (directory / "lab_nuclei_ft.json").write_text(json.dumps({**GOOD_SIDECAR, "sha256": sha256(lab)}))
    return directory


def request(**fields: Any) -> dict[str, Any]:
    return {"workerInterface": {"Model": LAB, **fields}, "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 0,
            "tags": []}


def model_error(directory: Path, **fields: Any) -> str:
    with pytest.raises(SettingsErrors) as info:
        parse_settings(request(**fields), "ds", directory)
    errors = {e.field: e.message for e in info.value.errors}
    assert set(errors) == {"Model"}, errors
    return errors["Model"]


# -- a good sidecar ------------------------------------------------------------------------------

def test_a_good_sidecar_labels_the_model(directory: Path) -> None:
    catalogue = scan_models(directory)
    assert catalogue.unusable == ()
    lab, small = catalogue.models
    assert lab.item == "Nuclei, lab fine-tune, SAM2.1 small (lab_nuclei_ft.pt)"
    assert lab.description == GOOD_SIDECAR["description"]
    assert lab.defaults == {"Prompt": "Box + shape", "Resolution": "Object crops", "Smoothing": 0.5, "Padding": 1}
    assert small.item == "SAM2.1 small (sam2.1_hiera_small.pt)" and small.defaults == {}
    spec = ui.build_interface(catalogue)["Model"]
    assert spec["items"] == [lab.item, small.item] and spec["default"] == small.item
    assert GOOD_SIDECAR["description"] in spec["tooltip"] and "Prompt = Box + shape" in spec["tooltip"]


def test_tuned_defaults_fill_empty_fields_and_never_override_the_user(directory: Path) -> None:
    settings = parse_settings(request(Prompt=None, Resolution="", Padding=-3), "ds", directory)
    assert settings.model == LAB and settings.checkpoint == directory / LAB
    assert (settings.prompt, settings.resolution) == ("box+shape", "crops")  # null / "" -> tuned
    assert settings.smoothing == 0.5  # missing -> tuned
    assert settings.padding == -3  # the user's value wins
    plain = parse_settings({**request(), "workerInterface": {"Model": SMALL}}, "ds", directory)
    assert (plain.prompt, plain.resolution, plain.smoothing, plain.padding) == ("box", "auto", 0.7, 0)


def test_the_form_defaults_follow_the_default_model(directory: Path) -> None:
    (directory / "sam2.1_hiera_small.json").write_text(json.dumps({"defaults": {"Smoothing": 1.5, "Prompt":
                                                                                "Best of three by overlap"}}))
    spec = ui.build_interface(scan_models(directory))
    assert spec["Smoothing"]["default"] == 1.5 and spec["Prompt"]["default"] == "Best of three by overlap"
    assert spec["Padding"]["default"] == 0 and spec["Resolution"]["default"] == "Auto"  # not tuned: as before


def test_model_value_as_item_or_file_name(directory: Path) -> None:
    item = scan_models(directory).models[0].item
    for value in (item, LAB, "An older label of the same file (lab_nuclei_ft.pt)"):
        assert parse_settings(request(Model=value), "ds", directory).model == LAB


# -- sha256: checked by compute, never by the interface ---------------------------------------------

def test_wrong_sha256_is_refused_by_compute_only(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sidecar = directory / "lab_nuclei_ft.json"
    sidecar.write_text(json.dumps({**GOOD_SIDECAR, "sha256": "0" * 64}))
    with monkeypatch.context() as patch:
        patch.setattr(ckpts, "file_sha256", lambda path: pytest.fail("the interface hashed a checkpoint"))
        assert [m.name for m in scan_models(directory).models] == [LAB, SMALL]
    message = model_error(directory)
    assert f"its SHA-256 is {sha256(directory / LAB)}, but its sidecar lab_nuclei_ft.json says {'0' * 64}" in message
    assert resolve_model(directory, LAB, verify_sha256=False).name == LAB


# -- bad sidecars: that one model is unavailable, with the reason ------------------------------------

BAD_SIDECARS = {
    "not_json": ('{"label": "x",', "not JSON (Expecting"),
    "not_an_object": ('["label"]', "expected a JSON object, got list"),
    "unknown_key": ({"label": "x", "model_type": "vit_h"}, "unknown key(s) 'model_type'; allowed: label, "),
    "duplicate_key": ('{"label": "a", "label": "b"}', '"label" is given twice'),
    "unknown_config": ({"config": "sam3_hiera_t"}, "'sam3_hiera_t' is not one of sam2's packaged configs"),
    "user_yaml": ({"config": "my_model.yaml"}, "'my_model.yaml' is not one of sam2's packaged configs"),
    "path_as_config": ({"config": "configs/sam2.1/sam2.1_hiera_s.yaml"}, "must be a config name, not a path"),
    "relative_path_config": ({"config": "../../evil.yaml"}, "must be a config name, not a path"),
    "config_of_other_weights": ({"config": "sam2.1_hiera_t"},
                                "says config sam2.1_hiera_t, but its weights are SAM2.1 small"),
    "sha256_not_hex": ({"sha256": "abc"}, '"sha256" must be 64 hexadecimal digits'),
    "label_too_long": ({"label": "x" * 61}, '"label" is 61 characters long'),
    "label_two_lines": ({"label": "a\nb"}, '"label" must be one line'),
    "label_not_text": ({"label": 5}, '"label" must be non-empty text'),
    "defaults_not_an_object": ({"defaults": ["Box"]}, '"defaults" must be an object'),
    "default_field_not_tunable": ({"defaults": {"Delete original annotations": True}},
                                  "'Delete original annotations' is not a field a model can set"),
    "default_unknown_field": ({"defaults": {"Promt": "Box"}}, "'Promt' is not a field a model can set"),
    "default_bad_select": ({"defaults": {"Prompt": "Circle"}}, 'Prompt: expected one of "Box", '),
    "default_out_of_range": ({"defaults": {"Padding": 99}},
                             "Padding: expected a number from -20 to 20, got the number 99"),
    "default_bool_number": ({"defaults": {"Smoothing": True}}, "Smoothing: expected a number"),
    "default_null": ({"defaults": {"Resolution": None}}, "Resolution: no value given"),
}


@pytest.mark.parametrize("case", list(BAD_SIDECARS))
def test_a_bad_sidecar_makes_only_its_model_unavailable(directory: Path, case: str) -> None:
    content, reason = BAD_SIDECARS[case]
    text = content if isinstance(content, str) else json.dumps(content)
    (directory / "lab_nuclei_ft.json").write_text(text)
    catalogue = scan_models(directory)
    assert [m.name for m in catalogue.models] == [SMALL]  # the other model is still offered
    (unusable,) = catalogue.unusable
    assert unusable.name == LAB and unusable.reason.startswith("its sidecar lab_nuclei_ft.json")
    assert reason in unusable.reason
    message = model_error(directory)
    assert message.startswith("'lab_nuclei_ft.pt' cannot be used: its sidecar lab_nuclei_ft.json") and reason in message


def test_a_sidecar_that_is_not_text_or_too_large(directory: Path) -> None:
    sidecar = directory / "lab_nuclei_ft.json"
    sidecar.write_bytes(b"\xff\xfe{}")
    assert "is not UTF-8 text" in scan_models(directory).unusable[0].reason
    sidecar.write_text(json.dumps({"description": "x" * 70_000}))
    assert "is larger than 64 kB" in scan_models(directory).unusable[0].reason


def test_config_with_its_yaml_extension_is_a_name(directory: Path) -> None:
    (directory / "lab_nuclei_ft.json").write_text(json.dumps({"config": "sam2.1_hiera_s.yaml"}))
    assert scan_models(directory).unusable == ()


def test_check_tuned_defaults_reports_every_bad_field() -> None:
    with pytest.raises(ValueError) as info:
        check_tuned_defaults({"Padding": 50, "Prompt": "x", "Smoothing": 1})
    assert "Padding" in str(info.value) and "Prompt" in str(info.value) and "Smoothing" not in str(info.value)
    assert check_tuned_defaults({"Minimum overlap with original": 0.25}) == {"Minimum overlap with original": 0.25}


# -- other files of the directory --------------------------------------------------------------------

def test_every_other_file_is_named_with_its_reason(directory: Path) -> None:
    (directory / "orphan.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(b"\0" * 16)
    (directory / ".hidden.pt").write_bytes(b"")
    (directory / "subdir").mkdir()
    write_layout_checkpoint(directory / "lab_nuclei_ft.pth", "sam2.1_hiera_s")  # same stem as LAB: its
    (directory / "broken.pt").symlink_to(directory / "missing.pt")              # sidecar is ambiguous
    reasons = {u.name: u.reason for u in scan_models(directory).unusable}
    assert reasons == {
        "broken.pt": "a link to a missing file",
        "lab_nuclei_ft.pt": "its sidecar lab_nuclei_ft.json could belong to lab_nuclei_ft.pt or lab_nuclei_ft.pth; "
                            "rename one of them",
        "lab_nuclei_ft.pth": "its sidecar lab_nuclei_ft.json could belong to lab_nuclei_ft.pth or lab_nuclei_ft.pt; "
                             "rename one of them",
        "model.safetensors": "not a .pt or .pth checkpoint file (ignored)",
        "orphan.json": "a sidecar without its checkpoint (orphan.pt)",
    }


# -- the Model value stays inside the checkpoint directory ---------------------------------------------

@pytest.mark.parametrize("value", [
    "SAM2.1 small (../sam2.1_hiera_small.pt)", "SAM2.1 small (sub/sam2.1_hiera_small.pt)",
    "SAM2.1 small (/etc/passwd)", "x (other.pt)", "SAM2.1 small (sam2.1_hiera_small.pt) ", "(sam2.1_hiera_small.pt)",
    "sam2.1_hiera_small", "SAM2.1 small", "sub/sam2.1_hiera_small.pt", f"{SMALL}\0", "../checkpoints/" + SMALL,
])
def test_model_value_names_only_files_of_the_directory(directory: Path, value: str) -> None:
    (directory / "sub").mkdir()
    write_layout_checkpoint(directory / "sub" / SMALL, SMALL)
    message = model_error(directory, Model=value)
    assert "not a plain file name" in message or "not in the checkpoint directory" in message


def test_resolution_only_ever_opens_a_listed_file(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened = []
    real = ckpts.inspect_model
    monkeypatch.setattr(ckpts, "inspect_model", lambda path: opened.append(path) or real(path))
    for value in ("x (../../etc/passwd)", "../lab_nuclei_ft.pt", "SAM (sam2.1_hiera_small.pt)"):
        try:
            resolve_model(directory, value)
        except CheckpointChoiceError:
            pass
    assert opened == [directory / SMALL]


def test_the_readme_example_sidecar_is_valid() -> None:
    """The example an operator copies from docs/models.md passes every rule."""
    from sam2_refine.model.architectures import architectures
    from sam2_refine.model.sidecar import parse_sidecar

    readme = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    section = readme[readme.index("**The sidecar**"):]
    example = section[section.index("```json") + len("```json"):section.index("```", section.index("```json") + 7)]
    sidecar = parse_sidecar(example, set(architectures()), check_tuned_defaults)
    assert sidecar.config == "sam2.1_hiera_s" and sidecar.label and sidecar.sha256
    assert sidecar.defaults["Prompt"] == "Box + shape"


def test_default_is_the_first_usable_model_without_the_stock_small(tmp_path: Path) -> None:
    write_layout_checkpoint(tmp_path / "b_large.pt", "sam2.1_hiera_l", untrained=False)
    write_layout_checkpoint(tmp_path / "a_broken.pt", "sam2.1_hiera_t")
    (tmp_path / "a_broken.json").write_text("{")
    write_layout_checkpoint(tmp_path / "c_tiny.pt", "sam2_hiera_t", untrained=False)
    catalogue = scan_models(tmp_path)
    assert catalogue.default.name == "b_large.pt"
    assert ui.build_interface(catalogue)["Model"]["default"] == "SAM2.1 large (b_large.pt)"
    assert ui.build_interface(scan_models(tmp_path / "missing"))["Model"] == {
        **ui.build_interface(scan_models(tmp_path / "missing"))["Model"], "items": [], "default": None}
