"""parse_settings: compute parameters -> RefineSettings, or every bad field reported at once."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest

from sam2_refine.annotations import Location
from sam2_refine.job.settings import RefineSettings, SettingsErrors, parse_settings

TINY = "sam2.1_hiera_tiny.pt"
SMALL = "sam2.1_hiera_small.pt"


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    """Checkpoints with the real layouts (constant weights): settings recognise them."""
    from sam2_refine.testing.checkpoints import write_layout_checkpoint

    directory = tmp_path / "checkpoints"
    write_layout_checkpoint(directory / TINY, TINY)
    write_layout_checkpoint(directory / SMALL, SMALL)
    (directory / "notes.txt").write_text("not a checkpoint")
    return directory


def full_params(**interface: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "SAM2 Refiner": None,
        "Batch XY": "1-3, 5",
        "Batch Z": "all",
        "Batch Time": "",
        "Tag of objects to refine": ["nucleus", "cell"],
        "Model": TINY,
        "Delete original annotations": True,
        "Padding": -2.5,
        "Smoothing": 1.25,
    }
    values.update(interface)
    return {
        "datasetId": "ds-from-params",
        "type": "polygon",
        "id": "tool-1",
        "name": "SAM2 Refiner",
        "image": "annotations/sam2_refine_worker:latest",
        "channel": 2,
        "assignment": {"XY": 4, "Z": 1, "Time": 0},
        "tags": ["refined", "sam2"],
        "tile": {"XY": 4, "Z": 1, "Time": 0},
        "connectTo": {"tags": [], "channel": None},
        "workerInterface": values,
        "scales": {},
    }


def errors_of(params: Any, ckpt_dir: Path, dataset_id: str | None = "ds-1") -> dict[str, str]:
    with pytest.raises(SettingsErrors) as info:
        parse_settings(params, dataset_id, ckpt_dir)
    errors = info.value.errors
    assert errors, "SettingsErrors without errors"
    return {e.field: e.message for e in errors}


def test_full_valid_parameters(ckpt_dir: Path) -> None:
    settings = parse_settings(full_params(), "ds-1", ckpt_dir)
    assert isinstance(settings, RefineSettings)
    assert settings.dataset_id == "ds-1"  # --datasetId wins over params["datasetId"]
    assert settings.model == TINY
    assert settings.checkpoint == ckpt_dir / TINY
    assert settings.padding == -2.5
    assert settings.smoothing == 1.25
    assert settings.refine_tags == ("nucleus", "cell")
    assert settings.delete_originals is True
    assert settings.batch_xy.kind == "list"
    assert settings.batch_xy.positions == (0, 1, 2, 4)
    assert settings.batch_z.kind == "all"
    assert settings.batch_time.kind == "current"
    assert settings.tile == Location(4, 1, 0)
    assert settings.channel == 2
    assert settings.output_tags == ("refined", "sam2")
    # Blank batch fields resolve to the tile's position.
    assert settings.batch_time.resolve("Batch Time", 3, settings.tile.time) == (0,)
    assert settings.batch_xy.resolve("Batch XY", 10, settings.tile.xy) == (0, 1, 2, 4)


def test_dataset_id_from_params_when_not_given(ckpt_dir: Path) -> None:
    settings = parse_settings(full_params(), None, ckpt_dir)
    assert settings.dataset_id == "ds-from-params"


def test_empty_output_tags_and_tags_as_tuples(ckpt_dir: Path) -> None:
    params = full_params(**{"Tag of objects to refine": []})
    params["tags"] = []
    settings = parse_settings(params, "ds-1", ckpt_dir)
    assert settings.output_tags == ()
    assert settings.refine_tags == ()
    assert isinstance(settings.refine_tags, tuple)


def test_duplicate_and_blank_tags_dropped(ckpt_dir: Path) -> None:
    settings = parse_settings(full_params(**{"Tag of objects to refine": ["a", "", "b", "a", "  "]}),
                              "ds-1", ckpt_dir)
    assert settings.refine_tags == ("a", "b")


def test_delete_flag_false_and_missing(ckpt_dir: Path) -> None:
    assert parse_settings(full_params(**{"Delete original annotations": False}), "d", ckpt_dir) \
        .delete_originals is False
    params = full_params()
    del params["workerInterface"]["Delete original annotations"]
    assert parse_settings(params, "d", ckpt_dir).delete_originals is False


@pytest.mark.parametrize("missing", ["absent", None, ""])
def test_padding_and_smoothing_defaults(ckpt_dir: Path, missing: Any) -> None:
    params = full_params()
    for key in ("Padding", "Smoothing"):
        if missing == "absent":
            del params["workerInterface"][key]
        else:
            params["workerInterface"][key] = missing
    settings = parse_settings(params, "ds-1", ckpt_dir)
    assert settings.padding == 0.0
    assert settings.smoothing == 0.7


def test_numeric_strings_accepted(ckpt_dir: Path) -> None:
    settings = parse_settings(full_params(Padding="5", Smoothing=" 1.5 "), "ds-1", ckpt_dir)
    assert settings.padding == 5.0
    assert settings.smoothing == 1.5
    assert isinstance(settings.padding, float)


@pytest.mark.parametrize(("padding", "smoothing"), [(-20, 0), (20, 3), (0, 0.7), (-20.0, 3.0)])
def test_range_limits_inclusive(ckpt_dir: Path, padding: float, smoothing: float) -> None:
    settings = parse_settings(full_params(Padding=padding, Smoothing=smoothing), "ds-1", ckpt_dir)
    assert settings.padding == padding
    assert settings.smoothing == smoothing


def test_integer_batch_value_from_a_saved_tool(ckpt_dir: Path) -> None:
    settings = parse_settings(full_params(**{"Batch XY": 2}), "ds-1", ckpt_dir)
    assert settings.batch_xy.positions == (1,)


def test_missing_worker_interface_uses_defaults_and_the_default_model(ckpt_dir: Path) -> None:
    params = full_params()
    params["workerInterface"] = None
    settings = parse_settings(params, "ds-1", ckpt_dir)
    assert settings.model == SMALL and settings.checkpoint == ckpt_dir / SMALL


@pytest.mark.parametrize("model", [None, "", "   ", "missing key"])
def test_empty_model_means_the_default_model(ckpt_dir: Path, model: Any) -> None:
    """An empty Model (a saved tool or another client may send "" or null, or no key at all)
    is the default model, as an empty Resolution or Prompt is their default: the Model
    select's own default (sam2.1_hiera_small.pt here), whatever file comes first."""
    params = full_params(Model=model)
    if model == "missing key":
        del params["workerInterface"]["Model"]
    settings = parse_settings(params, "ds-1", ckpt_dir)
    assert settings.model == SMALL and settings.checkpoint == ckpt_dir / SMALL


def test_empty_model_takes_the_first_usable_one_without_the_default_file(tmp_path: Path) -> None:
    from sam2_refine.testing.checkpoints import write_layout_checkpoint

    directory = tmp_path / "only-tiny"
    write_layout_checkpoint(directory / TINY, TINY)
    assert parse_settings(full_params(Model=""), "ds-1", directory).model == TINY


def test_empty_model_without_any_usable_checkpoint_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a checkpoint")
    message = errors_of(full_params(Model=None), empty)["Model"]
    assert "no model was chosen" in message and "no usable SAM2 checkpoint" in message


def test_other_channel_missing_defaults_to_zero(ckpt_dir: Path) -> None:
    params = full_params()
    del params["channel"]
    assert parse_settings(params, "ds-1", ckpt_dir).channel == 0


def test_tile_falls_back_to_assignment(ckpt_dir: Path) -> None:
    params = full_params()
    del params["tile"]
    params["assignment"] = {"XY": 7, "Z": 0, "Time": 3}
    assert parse_settings(params, "ds-1", ckpt_dir).tile == Location(7, 0, 3)


# -- one bad value at a time: exactly that field is reported ---------------------------------

@pytest.mark.parametrize(
    "model",
    ["../x.pt", f"sub/{TINY}", f"..\\{TINY}", "sam2.1_hiera_large.pt", "foo.pt", 5, ["x"]],
)
def test_bad_model(ckpt_dir: Path, model: Any) -> None:
    errors = errors_of(full_params(Model=model), ckpt_dir)
    assert set(errors) == {"Model"}


@pytest.mark.parametrize("model", ["sam2.1_hiera_large.pt", "../x.pt"])
def test_model_error_lists_available_checkpoints(ckpt_dir: Path, model: Any) -> None:
    message = errors_of(full_params(Model=model), ckpt_dir)["Model"]
    assert TINY in message
    assert SMALL in message
    assert "notes.txt" not in message


def test_model_error_without_checkpoints_says_none_found(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    message = errors_of(full_params(Model=TINY), empty)["Model"]
    assert "none found" in message
    assert str(empty) in message


def test_unknown_model_names_the_available_ones(ckpt_dir: Path) -> None:
    """Checkpoints are recognised by their weights, not their names: an unknown name is one the
    directory does not hold, and the message lists what it does hold."""
    message = errors_of(full_params(Model="foo.pt"), ckpt_dir)["Model"]
    assert "foo.pt" in message and "not in the checkpoint directory" in message
    assert TINY in message and SMALL in message


@pytest.mark.parametrize("padding", [-21, 21, 20.5, -20.01, "abc", True, False, math.nan, math.inf, [1], {}])
def test_bad_padding(ckpt_dir: Path, padding: Any) -> None:
    errors = errors_of(full_params(Padding=padding), ckpt_dir)
    assert set(errors) == {"Padding"}
    assert "-20" in errors["Padding"] and "20" in errors["Padding"]


@pytest.mark.parametrize("smoothing", [-0.1, 3.5, "x", True, math.nan, -math.inf])
def test_bad_smoothing(ckpt_dir: Path, smoothing: Any) -> None:
    errors = errors_of(full_params(Smoothing=smoothing), ckpt_dir)
    assert set(errors) == {"Smoothing"}
    assert "0" in errors["Smoothing"] and "3" in errors["Smoothing"]


@pytest.mark.parametrize("field", ["Batch XY", "Batch Z", "Batch Time"])
@pytest.mark.parametrize("value", ["3-1", "x", "0", "-2", "1--3", "1,,2", "1-", True, [1], 2.5])
def test_bad_batch_field(ckpt_dir: Path, field: str, value: Any) -> None:
    errors = errors_of(full_params(**{field: value}), ckpt_dir)
    assert set(errors) == {field}
    assert "all" in errors[field]  # says what is accepted
    assert not errors[field].startswith(field)  # the field name is not repeated in the message


@pytest.mark.parametrize("tags", [[1], ["a", 2], [None], {"a": 1}, 3, True, [["a"]]])
def test_refine_tags_not_a_list_of_strings(ckpt_dir: Path, tags: Any) -> None:
    errors = errors_of(full_params(**{"Tag of objects to refine": tags}), ckpt_dir)
    assert set(errors) == {"Tag of objects to refine"}


@pytest.mark.parametrize("tags", [[1], "not-a-list-ok?", {"x": 1}])
def test_output_tags_not_a_list_of_strings(ckpt_dir: Path, tags: Any) -> None:
    params = full_params()
    params["tags"] = tags
    if isinstance(tags, str):
        # A single string is taken as one tag.
        assert parse_settings(params, "ds-1", ckpt_dir).output_tags == (tags,)
        return
    assert set(errors_of(params, ckpt_dir)) == {"tags"}


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, "", [True]])
def test_bad_delete_flag(ckpt_dir: Path, value: Any) -> None:
    errors = errors_of(full_params(**{"Delete original annotations": value}), ckpt_dir)
    assert set(errors) == {"Delete original annotations"}


@pytest.mark.parametrize("channel", [-1, "a", "1", 1.5, True, None])
def test_bad_channel(ckpt_dir: Path, channel: Any) -> None:
    params = full_params()
    params["channel"] = channel
    assert set(errors_of(params, ckpt_dir)) == {"channel"}


def test_missing_tile(ckpt_dir: Path) -> None:
    params = full_params()
    del params["tile"]
    del params["assignment"]
    assert set(errors_of(params, ckpt_dir)) == {"tile"}


@pytest.mark.parametrize("tile", [{"XY": -1, "Z": 0, "Time": 0}, {"XY": "a", "Z": 0, "Time": 0}, [0, 0, 0]])
def test_bad_tile(ckpt_dir: Path, tile: Any) -> None:
    params = full_params()
    params["tile"] = tile
    fields = set(errors_of(params, ckpt_dir))
    assert len(fields) == 1
    assert next(iter(fields)).startswith("tile")


@pytest.mark.parametrize("given", [None, "", "   "])
def test_missing_dataset_id(ckpt_dir: Path, given: str | None) -> None:
    params = full_params()
    del params["datasetId"]
    assert set(errors_of(params, ckpt_dir, dataset_id=given)) == {"datasetId"}


@pytest.mark.parametrize("params", [None, [], "x"])
def test_parameters_not_an_object(ckpt_dir: Path, params: Any) -> None:
    assert set(errors_of(params, ckpt_dir)) == {"parameters"}


def test_worker_interface_not_an_object(ckpt_dir: Path) -> None:
    params = full_params()
    params["workerInterface"] = ["x"]
    assert set(errors_of(params, ckpt_dir)) == {"workerInterface"}


def test_several_bad_fields_all_reported(ckpt_dir: Path) -> None:
    params = full_params(Model="foo.pt", Padding=99, Smoothing=-1, **{
        "Batch XY": "3-1", "Batch Z": "x", "Batch Time": "0",
        "Tag of objects to refine": [1], "Delete original annotations": "yes"})
    params["channel"] = -1
    del params["tile"]
    del params["assignment"]
    del params["datasetId"]
    with pytest.raises(SettingsErrors) as info:
        parse_settings(params, None, ckpt_dir)
    fields = [e.field for e in info.value.errors]
    assert sorted(fields) == sorted([
        "datasetId", "Model", "Padding", "Smoothing", "Tag of objects to refine",
        "Delete original annotations", "Batch XY", "Batch Z", "Batch Time", "tile", "channel"])
    # The combined message carries every field.
    for field in fields:
        assert f"{field}: " in str(info.value)


def test_input_not_mutated(ckpt_dir: Path) -> None:
    params = full_params()
    before = copy.deepcopy(params)
    parse_settings(params, "ds-1", ckpt_dir)
    assert params == before


# -- issue 13: points, rectangles, touching objects kept apart ------------------------------------


def test_shape_fields_default_to_the_original_behaviour(ckpt_dir: Path) -> None:
    settings = parse_settings(full_params(), "ds-1", ckpt_dir)
    assert (settings.refine_points, settings.refine_rectangles, settings.separate) == (False, False, True)
    assert settings.shapes == ("polygon", "blob")


def test_shape_fields_null_means_default(ckpt_dir: Path) -> None:
    settings = parse_settings(full_params(**{"Refine point annotations": None, "Refine rectangle annotations": None,
                                             "Keep touching objects apart": None}), "ds-1", ckpt_dir)
    assert (settings.refine_points, settings.refine_rectangles, settings.separate) == (False, False, True)


def test_shape_fields_on(ckpt_dir: Path) -> None:
    settings = parse_settings(full_params(**{"Refine point annotations": True, "Refine rectangle annotations": True,
                                             "Keep touching objects apart": False}), "ds-1", ckpt_dir)
    assert (settings.refine_points, settings.refine_rectangles, settings.separate) == (True, True, False)
    assert settings.shapes == ("polygon", "blob", "rectangle", "point")


def test_bad_shape_fields_are_each_named(ckpt_dir: Path) -> None:
    errors = errors_of(full_params(**{"Refine point annotations": "yes", "Refine rectangle annotations": 1,
                                      "Keep touching objects apart": "false"}), ckpt_dir)
    assert errors == {
        "Refine point annotations": 'it came as the text "yes" instead of a tick box value (true or false, '
                                    "without quotes), as a tool saved by another program may hold it",
        "Refine rectangle annotations": "expected a tick box value (true or false), got the number 1",
        "Keep touching objects apart": 'it came as the text "false" instead of a tick box value (true or false, '
                                       "without quotes), as a tool saved by another program may hold it",
    }


# -- issue 23: the kept tag, and values described in words ------------------------------------------


def test_kept_tag_is_off_when_empty_missing_or_null(ckpt_dir: Path) -> None:
    assert parse_settings(full_params(), "ds-1", ckpt_dir).kept_tag is None
    for value in ("", "   ", None):
        assert parse_settings(full_params(**{"Tag kept annotations": value}), "ds-1", ckpt_dir).kept_tag is None
    settings = parse_settings(full_params(**{"Tag kept annotations": "  sam2-kept "}), "ds-1", ckpt_dir)
    assert settings.kept_tag == "sam2-kept"


@pytest.mark.parametrize("value,words", [
    (["a"], "expected one tag as text, got a list of 1 item"),
    ("nucleus", '"nucleus" is also a tag of the objects to refine'),
    ("refined", '"refined" is also the tag the tool gives to refined annotations'),
])
def test_kept_tag_must_be_one_tag_of_its_own(ckpt_dir: Path, value: Any, words: str) -> None:
    message = errors_of(full_params(**{"Tag kept annotations": value}), ckpt_dir)["Tag kept annotations"]
    assert words in message


def test_wrong_types_are_described_in_words_not_python_reprs(ckpt_dir: Path) -> None:
    errors = errors_of(full_params(Padding="wide", Smoothing=[1], **{"Tag of objects to refine": {"a": 1},
                                                                     "Delete original annotations": "true"}), ckpt_dir)
    assert errors["Padding"] == 'expected a number from -20 to 20, got the text "wide"'
    assert errors["Smoothing"] == "expected a number from 0 to 3, got a list of 1 item"
    assert errors["Tag of objects to refine"] == ("expected a list of tag strings, got a group of named values "
                                                  "(a JSON object)")
    assert errors["Delete original annotations"].startswith('it came as the text "true" instead of a tick box value')
    assert not any("'" in message for message in errors.values())  # no Python repr
