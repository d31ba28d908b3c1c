"""Layers -> merged RGB image (contract section 6): contrast, tint, max combination, channel matching."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

from sam2_refine.engine.imaging import (Layer, LayerError, contrast_limits, default_layers, frame_range, js_round,
                                 merge_layers, parse_colour, parse_layers, percent_of_range)

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
    """Every row is 0, 1, ..., 100 (times ``scale``): p % of the range is p * scale."""
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


def test_percentile_is_a_share_of_the_range_not_a_percentile_of_the_pixels() -> None:
    """The app's "percentile" (src/store/images.ts, toStyle): p % of the way from the frame's
    min to its max. 99 % of these pixels are 0..98 and one in a hundred is 1000: a percentile of
    the values would put the white point near 98; the app puts it at 900."""
    plane = np.tile(np.arange(100, dtype=np.uint16), (100, 1))
    plane[:, 99] = 1000
    (layer,) = parse_layers([layer_doc(0, "#ffffff", "percentile", 10, 90)], 1)
    assert contrast_limits(plane, layer) == (100.0, 900.0)
    assert np.percentile(plane, 90) < 100  # what the worker used to take
    img = merge([layer_doc(0, "#ffffff", "percentile", 10, 90)], {0: plane}, 1)
    np.testing.assert_allclose(img[0, :, 0], np.clip((plane[0] - 100.0) / 800.0, 0, 1), atol=1e-6)
    assert not img[:, :99].any() and np.all(img[:, 99] == 1.0)


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
    base[0, :2] = (0, 255)  # the full range, so that 20 % and 80 % of it are whole numbers
    planes = {
        np.uint8: base.astype(np.uint8),
        np.uint16: (base * 257).astype(np.uint16),
        np.float32: (base / 255.0).astype(np.float32),
    }
    if mode == "percentile":  # the app rounds the points to integers: 0.2 of a 0..1 frame is 0
        del planes[np.float32]  # (test_percentile_points_are_whole_numbers_on_float_frames)
    # Absolute windows in each dtype's own units, the same relative window (20 % .. 80 %).
    windows = {np.uint8: (0.2 * 255, 0.8 * 255), np.uint16: (0.2 * 65535, 0.8 * 65535), np.float32: (0.2, 0.8)}
    results = []
    for dtype, plane in planes.items():
        black, white = (20, 80) if mode == "percentile" else windows[dtype]
        raw = [layer_doc(0, "#ff8000", mode, black, white)]
        img = merge_layers({0: plane}, parse_layers(raw, 1))
        check_image(img, plane.shape)
        results.append(img)
    for other in results[1:]:
        np.testing.assert_allclose(results[0], other, atol=1e-5)
    assert results[0][..., 0].max() == 1.0 and results[0][..., 0].min() == 0.0


def test_percentile_points_are_whole_numbers_on_float_frames() -> None:
    """rangeRound rounds whatever the dtype: on a 0..1 float frame 10 % and 40 % of the range
    are both 0, a flat window, so everything above 0 keeps its own value (large_image divides
    by 1 then); on a 0..1000 frame the points are 100 and 400."""
    plane = ramp(np.float32, scale=0.01)  # 0.00 .. 1.00
    (layer,) = parse_layers([layer_doc(0, "#ffffff", "percentile", 10, 40)], 1)
    assert contrast_limits(plane, layer) == (0.0, 0.0)
    img = merge([layer_doc(0, "#ffffff", "percentile", 10, 40)], {0: plane}, 1)
    np.testing.assert_allclose(img[0, :, 0], plane[0], atol=1e-6)
    assert contrast_limits(ramp(np.float32, scale=10.0), layer) == (100.0, 400.0)


@pytest.mark.parametrize(("mode", "black", "white"), [("absolute", 50, 50), ("absolute", 60, 10),
                                                      ("percentile", 40, 40), ("percentile", 90, 10)])
def test_flat_or_inverted_window_does_not_divide_by_zero(mode: str, black: float, white: float) -> None:
    """large_image's style (base.py, _applyStyle): (value - black) / (white - black), divided by 1
    when they are equal (on this integer-valued ramp: a threshold), an inverted ramp when white
    is below black (the app's contrast editor keeps black <= white; a configuration made through
    the API may not)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            img = merge([layer_doc(0, "#ffffff", mode, black, white)], {0: ramp()})
    x = np.arange(W, dtype=np.float64)
    expected = (x > black).astype(float) if black == white else np.clip((x - black) / (white - black), 0, 1)
    np.testing.assert_allclose(img[0, :, 0], expected, atol=1e-6)


def test_flat_window_on_a_constant_plane_is_black() -> None:
    with np.errstate(all="raise"):
        img = merge([layer_doc(0, "#ffffff", "percentile", 1, 99)], {0: np.full((H, W), 7, np.uint16)})
    assert not img.any()


def test_sparse_channel_keeps_its_background_black() -> None:
    # Fewer than 0.5 % bright pixels: the default window (the frame's min..max, as the app gives
    # a new layer) keeps them white and the background black.
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


#: (min, max, point, the app's black/white point), computed by d3 itself: d3-scale 4.0.2 and
#: d3-interpolate 3.0.1, NimbusImage's versions (pnpm-lock.yaml), in node 20 with
#: ``scaleLinear().domain([0, 100]).rangeRound([min, max])(point)``.
D3_RANGE_ROUND = [
    [0, 100, 12.5, 13], [0, 101, 50, 51], [0, 3, 50, 2], [0, 5, 50, 3], [1, 4, 50, 3], [-3, 0, 50, -1],
    [-5, 0, 50, -2], [0, 255, 5, 13], [0, 255, 95, 242], [0, 65535, 5, 3277], [0, 65535, 95, 62258],
    [100, 4095, 0.5, 120], [100, 4095, 99.5, 4075], [7, 7, 0, 7], [7, 7, 100, 7], [7, 7, 40, 7],
    [0, 1, 49.999, 0], [0, 1, 50, 1], [0, 1, 50.001, 1], [0.25, 0.75, 50, 1], [0, 0.4, 100, 0],
    [-0.5, 0.5, 0, 0], [0, 1000, 0.05, 1], [0, 1000, 0.15, 2], [0, 10, 15, 2], [0, 10, 25, 3],
    [0, 10, 35, 4], [0, 200, 20, 40], [0, 200, 60, 120], [3, 200, -10, -17], [3, 200, 150, 299],
    [0, 60000, 33.3, 19980], [12, 4000, 66.6, 2668], [0, 2, 25, 1], [0, 2, 75, 2],
]


@pytest.mark.parametrize(("low", "high", "point", "expected"), D3_RANGE_ROUND)
def test_percent_of_range_equals_d3_range_round(low: float, high: float, point: float, expected: float) -> None:
    assert percent_of_range(float(low), float(high), float(point)) == expected


def test_js_round_takes_halves_up_unlike_numpy() -> None:
    for value, expected in [(0.5, 1), (1.5, 2), (2.5, 3), (-0.5, 0), (-1.5, -1), (-2.5, -2), (2.4999, 2),
                            (0.49999999999999994, 0), (-0.49999999999999994, 0), (7.0, 7), (-7.0, -7),
                            (2.0 ** 53, 2.0 ** 53)]:
        assert js_round(value) == expected, value
    assert np.round(2.5) == 2.0 and js_round(2.5) == 3.0  # why numpy's rounding is not used
    assert percent_of_range(0.0, 5.0, 50.0) == 3.0  # 2.5: the app's 3, numpy's 2


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64])
def test_frame_range_is_the_frames_min_and_max(dtype) -> None:
    rng = np.random.default_rng(3)
    low = -200 if np.dtype(dtype).kind in "if" else 0
    plane = rng.integers(low, 250, size=(37, 53)).astype(dtype)
    assert frame_range(plane) == (float(plane.min()), float(plane.max()))
    assert isinstance(frame_range(plane)[0], float)


def test_frame_range_of_a_float_frame_ignores_non_finite_values() -> None:
    plane = ramp(np.float32, scale=0.5)
    plane[:, 0] = np.nan  # the zeros
    plane[1, 1], plane[2, 2] = np.inf, -np.inf
    assert frame_range(plane) == (0.5, 50.0)
    assert frame_range(np.full((3, 3), np.nan, np.float32)) == (0.0, 1.0)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_a_constant_frame_shows_black(dtype) -> None:
    """min == max: every percentile point is that value; nothing lies above it."""
    plane = np.full((H, W), 7, dtype)
    for black, white in ((0, 100), (1, 99), (50, 50)):
        (layer,) = parse_layers([layer_doc(0, "#ffffff", "percentile", black, white)], 1)
        assert contrast_limits(plane, layer) == (7.0, 7.0)
        with np.errstate(all="raise"):
            assert not merge_layers({0: plane}, [layer]).any()


@pytest.mark.parametrize("point", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_contrast_point_is_refused(point: float) -> None:
    with pytest.raises(LayerError, match="numeric blackPoint and whitePoint"):
        parse_layers([layer_doc(0, "#ffffff", "percentile", point, 100)], 1)


def test_percentile_points_are_taken_over_the_whole_frame() -> None:
    """A window of a frame is merged with the frame's points, not its own min and max."""
    from sam2_refine.engine.imaging import LocationImage

    plane = np.zeros((50, 60), np.uint16)
    plane[:, 30:] = 1000
    plane[40:, :] += 1  # min 0, max 1001: 50 % is 500.5, the app's 501
    image = LocationImage({0: plane}, parse_layers([layer_doc(0, "#ffffff", "percentile", 50, 100)], 1))
    assert image.limits == [(501.0, 1001.0)]
    window = image.window(0, 30, 10, 60)  # all 1000 here
    np.testing.assert_allclose(window[..., 0], (1000.0 - 501.0) / 500.0, atol=1e-6)


def test_location_image_windows_are_merged_as_the_whole_frame_is():
    from sam2_refine.engine.imaging import LocationImage

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
