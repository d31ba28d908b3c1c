"""Layers -> merged RGB image (contract section 6): contrast, tint, max combination, channel matching."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

from sam2_refine.imaging import Layer, LayerError, default_layers, merge_layers, parse_colour, parse_layers

H, W = 4, 101


def layer_doc(channel: int, color: str = "#ffffff", mode: str = "percentile", black: float = 0,
              white: float = 100, visible: bool = True, name: str | None = None) -> dict[str, Any]:
    return {
        "id": f"id-{channel}-{color}",
        "name": name if name is not None else f"layer {channel} {color}",
        "color": color,
        "channel": channel,
        "visible": visible,
        "contrast": {"mode": mode, "blackPoint": black, "whitePoint": white},
        "xy": {"type": "current", "value": None},
        "z": {"type": "current", "value": None},
        "time": {"type": "current", "value": None},
        "layerGroup": None,
    }


def ramp(dtype: Any = np.float32, scale: float = 1.0) -> np.ndarray:
    """Every row is 0, 1, ..., 100 (times ``scale``): the p-th percentile is p * scale."""
    return np.tile(np.arange(W, dtype=np.float64) * scale, (H, 1)).astype(dtype)


def check_image(img: np.ndarray, shape: tuple[int, int] = (H, W)) -> None:
    assert img.dtype == np.float32
    assert img.shape == shape + (3,)
    assert np.all(np.isfinite(img))
    assert img.min() >= 0.0 and img.max() <= 1.0


def merge(raw: list[dict[str, Any]], planes: dict[int, np.ndarray], num_channels: int = 3) -> np.ndarray:
    img = merge_layers(planes, parse_layers(raw, num_channels))
    check_image(img, next(iter(planes.values())).shape)
    return img


def test_percentile_contrast_on_a_ramp() -> None:
    img = merge([layer_doc(0, "#ffffff", "percentile", 10, 90)], {0: ramp()})
    values = np.arange(W, dtype=np.float64)
    expected = np.clip((values - 10.0) / 80.0, 0, 1)
    for band in range(3):
        np.testing.assert_allclose(img[0, :, band], expected, atol=1e-6)
    assert img[0, 10, 0] == 0.0 and img[0, 90, 0] == 1.0
    assert img[0, 50, 0] == pytest.approx(0.5)
    # Every row identical.
    assert np.array_equal(img[0], img[3])


def test_percentile_default_window_is_min_to_max() -> None:
    raw = [{"channel": 0, "color": "#ffffff", "visible": True, "contrast": {"mode": "percentile"}}]
    img = merge(raw, {0: ramp(scale=3.0)}, 1)
    np.testing.assert_allclose(img[0, :, 0], np.arange(W) / 100.0, atol=1e-6)


def test_absolute_contrast() -> None:
    img = merge([layer_doc(0, "#ffffff", "absolute", 20, 60)], {0: ramp()})
    expected = np.clip((np.arange(W) - 20.0) / 40.0, 0, 1)
    np.testing.assert_allclose(img[1, :, 1], expected, atol=1e-6)
    assert img[0, 40, 2] == pytest.approx(0.5)


def test_absolute_contrast_uses_raw_units_not_percentiles() -> None:
    plane = ramp(np.uint16, scale=100.0)  # 0 .. 10000
    img = merge([layer_doc(0, "#ffffff", "absolute", 0, 5000)], {0: plane})
    assert img[0, 25, 0] == pytest.approx(0.5)
    assert img[0, 50, 0] == 1.0 and img[0, 100, 0] == 1.0


def test_red_tint_fills_only_the_red_band() -> None:
    img = merge([layer_doc(0, "#ff0000", "percentile", 0, 100)], {0: ramp()})
    np.testing.assert_allclose(img[..., 0], ramp() / 100.0, atol=1e-6)
    assert not img[..., 1].any()
    assert not img[..., 2].any()


def test_partial_colour_scales_the_band() -> None:
    img = merge([layer_doc(0, "#00ff80", "absolute", 0, 100)], {0: ramp()})
    assert not img[..., 0].any()
    np.testing.assert_allclose(img[0, 100], [0.0, 1.0, 128 / 255], atol=1e-6)
    np.testing.assert_allclose(img[0, 50], [0.0, 0.5, 0.5 * 128 / 255], atol=1e-6)


def test_two_layers_combine_by_maximum() -> None:
    rising = ramp()
    falling = rising[:, ::-1].copy()
    raw = [layer_doc(0, "#ff0000", "absolute", 0, 100), layer_doc(1, "#ffff00", "absolute", 0, 100)]
    img = merge(raw, {0: rising, 1: falling})
    x = np.arange(W) / 100.0
    np.testing.assert_allclose(img[0, :, 0], np.maximum(x, x[::-1]), atol=1e-6)  # both layers
    np.testing.assert_allclose(img[0, :, 1], x[::-1], atol=1e-6)  # only the yellow layer
    assert not img[..., 2].any()


def test_invisible_layers_skipped() -> None:
    raw = [layer_doc(0, "#ff0000", "absolute", 0, 100, visible=False),
           layer_doc(1, "#00ff00", "absolute", 0, 100)]
    layers = parse_layers(raw, 2)
    assert [layer.channel for layer in layers] == [1]
    img = merge_layers({0: ramp(), 1: ramp()}, layers)
    assert not img[..., 0].any()
    assert img[..., 1].max() == 1.0


def test_invisible_layer_on_missing_channel_is_not_an_error() -> None:
    raw = [layer_doc(9, visible=False), layer_doc(0)]
    assert [layer.channel for layer in parse_layers(raw, 1)] == [0]


def test_layers_match_channels_by_channel_not_position() -> None:
    # Channel 0 is bright at the left, channel 2 at the right, channel 1 is flat zero.
    left = np.zeros((H, W), np.float32)
    left[:, :10] = 100
    right = np.zeros((H, W), np.float32)
    right[:, -10:] = 100
    planes = {0: left, 1: np.zeros((H, W), np.float32), 2: right}
    raw = [layer_doc(2, "#0000ff", "absolute", 0, 100), layer_doc(0, "#ff0000", "absolute", 0, 100)]
    img = merge(raw, planes)
    # Red (channel 0) on the left only, blue (channel 2) on the right only.
    assert np.all(img[:, :10, 0] == 1.0) and not img[:, 10:, 0].any()
    assert np.all(img[:, -10:, 2] == 1.0) and not img[:, :-10, 2].any()
    assert not img[..., 1].any()


def test_two_layers_on_the_same_channel() -> None:
    # Layers [ch1 green, ch0 red, ch0 blue (different window)]: both ch0 layers must read channel 0.
    planes = {0: ramp(), 1: np.full((H, W), 100, np.float32)}
    raw = [layer_doc(1, "#00ff00", "absolute", 0, 100),
           layer_doc(0, "#ff0000", "absolute", 0, 100),
           layer_doc(0, "#0000ff", "absolute", 0, 50)]
    img = merge(raw, planes, 2)
    x = np.arange(W, dtype=np.float64)
    np.testing.assert_allclose(img[0, :, 0], x / 100.0, atol=1e-6)
    np.testing.assert_allclose(img[0, :, 2], np.clip(x / 50.0, 0, 1), atol=1e-6)
    assert np.all(img[..., 1] == 1.0)


def test_parse_layers_keeps_given_order_and_fields() -> None:
    raw = [layer_doc(2, "#0000ff", "absolute", 5, 9, name="B"), layer_doc(0, "#f00", "percentile", 1, 99, name="A")]
    layers = parse_layers(raw, 3)
    assert layers == [Layer(2, (0.0, 0.0, 1.0), "absolute", 5.0, 9.0, "B"),
                      Layer(0, (1.0, 0.0, 0.0), "percentile", 1.0, 99.0, "A")]


@pytest.mark.parametrize("mode", ["percentile", "absolute"])
def test_dtypes_give_the_same_result(mode: str) -> None:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, size=(16, 24))
    planes = {
        np.uint8: base.astype(np.uint8),
        np.uint16: (base * 257).astype(np.uint16),
        np.float32: (base / 255.0).astype(np.float32),
    }
    # Absolute windows in each dtype's own units, the same relative window (20 % .. 80 %).
    windows = {np.uint8: (0.2 * 255, 0.8 * 255), np.uint16: (0.2 * 65535, 0.8 * 65535), np.float32: (0.2, 0.8)}
    results = []
    for dtype, plane in planes.items():
        black, white = (5, 95) if mode == "percentile" else windows[dtype]
        raw = [layer_doc(0, "#ff8000", mode, black, white)]
        img = merge_layers({0: plane}, parse_layers(raw, 1))
        check_image(img, plane.shape)
        results.append(img)
    np.testing.assert_allclose(results[0], results[1], atol=1e-5)
    np.testing.assert_allclose(results[0], results[2], atol=1e-5)
    assert results[0][..., 0].max() == 1.0 and results[0][..., 0].min() == 0.0


@pytest.mark.parametrize(("mode", "black", "white"), [("absolute", 50, 50), ("absolute", 60, 10),
                                                      ("percentile", 40, 40), ("percentile", 90, 10)])
def test_flat_window_does_not_divide_by_zero(mode: str, black: float, white: float) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            img = merge([layer_doc(0, "#ffffff", mode, black, white)], {0: ramp()})
    assert set(np.unique(img)) <= {0.0, 1.0}


def test_flat_window_on_a_constant_plane_is_black() -> None:
    with np.errstate(all="raise"):
        img = merge([layer_doc(0, "#ffffff", "percentile", 1, 99)], {0: np.full((H, W), 7, np.uint16)})
    assert not img.any()


def test_sparse_channel_with_a_collapsed_window_keeps_its_background_black() -> None:
    # Fewer than 0.5 % bright pixels: the 1st and 99.5th percentiles are both the background.
    plane = np.full((100, 100), 100, np.uint16)
    plane[50, 50:53] = 5000
    img = merge_layers({0: plane}, default_layers(1))
    check_image(img, (100, 100))
    assert np.all(img[50, 50:53] == 1.0)
    assert np.count_nonzero(img[..., 0]) == 3


def test_flat_absolute_window_is_a_threshold() -> None:
    img = merge([layer_doc(0, "#ffffff", "absolute", 50, 50)], {0: ramp()})
    np.testing.assert_array_equal(img[0, :, 0], (np.arange(W) > 50).astype(np.float32))


@pytest.mark.parametrize("mode", ["percentile", "absolute"])
def test_nan_does_not_propagate(mode: str) -> None:
    plane = ramp()
    plane[1, 30] = np.nan
    plane[2, 70] = np.inf
    plane[3, 5] = -np.inf
    img = merge([layer_doc(0, "#ffffff", mode, 0, 100)], {0: plane})
    assert img[1, 30, 0] == 0.0
    # Other pixels still follow the window computed from the finite values (0..100 either way).
    np.testing.assert_allclose(img[0, :, 0], np.arange(W) / 100.0, atol=1e-6)
    np.testing.assert_allclose(img[1, :30, 0], np.arange(30) / 100.0, atol=1e-6)


def test_all_nan_plane() -> None:
    img = merge([layer_doc(0)], {0: np.full((H, W), np.nan, np.float32)})
    assert not img.any()


def test_no_visible_layer_is_an_error() -> None:
    raw = [layer_doc(0, visible=False), layer_doc(1, visible=False)]
    with pytest.raises(LayerError, match="visible"):
        parse_layers(raw, 2)


@pytest.mark.parametrize("channel", [3, -1, None, "0", True])
def test_layer_on_a_missing_channel_names_the_layer(channel: Any) -> None:
    raw = [layer_doc(0), {**layer_doc(0), "channel": channel, "name": "Cytoplasm"}]
    with pytest.raises(LayerError) as info:
        parse_layers(raw, 3)
    assert info.value.layer == "Cytoplasm"
    assert "Cytoplasm" in str(info.value)


@pytest.mark.parametrize("change", [{"color": "red"}, {"color": "#12345"},
                                    {"contrast": {"mode": "gamma", "blackPoint": 0, "whitePoint": 1}},
                                    {"contrast": {"mode": "absolute"}},
                                    {"contrast": {"mode": "absolute", "blackPoint": "0", "whitePoint": 1}}])
def test_malformed_layer_names_the_layer(change: dict[str, Any]) -> None:
    raw = [{**layer_doc(0, name="Nuclei"), **change}]
    with pytest.raises(LayerError) as info:
        parse_layers(raw, 1)
    assert info.value.layer == "Nuclei"


def test_parse_colour() -> None:
    assert parse_colour("#ff0000") == (1.0, 0.0, 0.0)
    assert parse_colour("#0F0") == (0.0, 1.0, 0.0)
    assert parse_colour("#000080") == (0.0, 0.0, 128 / 255)
    for bad in ("ff0000", "#ff00", None, 3):
        with pytest.raises(ValueError):
            parse_colour(bad)


def test_default_layers_single_channel_is_white() -> None:
    layers = default_layers(1)
    assert len(layers) == 1
    assert layers[0].channel == 0
    assert layers[0].colour == (1.0, 1.0, 1.0)
    assert layers[0].mode == "percentile"
    assert layers[0].black < layers[0].white


def test_default_layers_three_channels_distinct_colours() -> None:
    layers = default_layers(3)
    assert [layer.channel for layer in layers] == [0, 1, 2]
    colours = [layer.colour for layer in layers]
    assert len(set(colours)) == 3
    assert all(max(c) > 0 for c in colours)
    # All visible: each channel shows up in the merged image.
    planes = {c: np.zeros((8, 8), np.uint16) for c in range(3)}
    for c in range(3):
        planes[c][c, :] = 1000
    img = merge_layers(planes, layers)
    check_image(img, (8, 8))
    for c in range(3):
        np.testing.assert_allclose(img[c, 0], colours[c], atol=1e-6)


@pytest.mark.parametrize("raw", [None, []])
def test_no_layer_settings_gives_defaults(raw: Any) -> None:
    assert parse_layers(raw, 2) == default_layers(2)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.int32])
def test_fast_percentiles_equal_numpy(dtype):
    from sam2_refine.imaging import percentiles

    rng = np.random.default_rng(3)
    for size in (1, 2, 7, 1000, 65537):
        high = 255 if dtype == np.uint8 else 60000
        plane = rng.integers(0, high, size=size).astype(dtype).reshape(-1, 1)
        for q in ((0.0, 100.0), (1.0, 99.5), (0.1, 99.9), (50.0, 50.0), (33.3, 66.6)):
            expected = np.percentile(plane, q)
            assert percentiles(plane, q) == pytest.approx(tuple(expected), abs=1e-6), (dtype, size, q)


def test_location_image_windows_are_merged_as_the_whole_frame_is():
    from sam2_refine.imaging import LocationImage

    rng = np.random.default_rng(5)
    planes = {0: rng.integers(0, 60000, size=(300, 400)).astype(np.uint16),
              1: rng.integers(0, 255, size=(300, 400)).astype(np.uint8)}
    layers = default_layers(2)
    whole = merge_layers(planes, layers)
    image = LocationImage(planes, layers)
    assert image.shape == (300, 400, 3)
    np.testing.assert_array_equal(image.window(0, 0, 300, 400), whole)
    # A window uses the frame's contrast, not its own.
    np.testing.assert_array_equal(image.window(50, 120, 90, 200), whole[50:90, 120:200])
