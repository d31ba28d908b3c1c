"""A location's channel frames -> one RGB image, as the user sees it (docs/nimbus-contract.md §6).

Each visible layer maps one channel through its contrast window to [0, 1], tints it with the
layer colour, and the layers combine by pixel-wise maximum. Layers are matched to channels by
``layer.channel`` (two layers may show one channel). A dataset without layer settings gets
:func:`default_layers`. The layers' own Z/Time settings are not applied: every layer shows the
annotation's own location, as in the original worker.

A dataset view may override a layer's contrast (``layerContrasts``, keyed by layer id); the user
sees the override, so the model gets it too (:func:`view_contrast`, the rule the app applies).

The window follows the app (NimbusImage ``src/store/images.ts``, ``toStyle``) and large_image's
tile style (``large_image/tilesource/base.py``, ``_applyStyle``): an ``absolute`` contrast is
the raw black and white values; a ``percentile`` contrast is a percentage of the frame's
min..max range, rounded to an integer as d3's ``rangeRound`` does (:func:`percent_of_range`),
not a percentile of the pixel values; a pixel maps to ``(value - black) / (white - black)``
(``/ 1`` when they are equal), clipped to [0, 1], times the layer colour; layers combine by
the maximum (the viewer's default composition, CSS ``mix-blend-mode: lighten``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

#: Colours given to channels when the dataset has no layer settings.
DEFAULT_COLOURS = ((1.0, 1.0, 1.0),)
MULTI_CHANNEL_COLOURS = (
    (0.0, 1.0, 0.0), (1.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 0.0, 0.0),
    (1.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.5, 0.0),
)
#: Contrast of channels without layer settings: the frame's min..max, the contrast the app gives
#: a new layer (NimbusImage ``src/store/model.ts``, ``newLayer``: percentile 0..100).
DEFAULT_CONTRAST = ("percentile", 0.0, 100.0)


class LayerError(ValueError):
    """Layer settings that cannot be used. ``layer`` names the layer concerned."""

    def __init__(self, layer: str, message: str) -> None:
        super().__init__(f"layer {layer}: {message}")
        self.layer = layer


@dataclass(frozen=True)
class Layer:
    """One visible layer.

    Attributes:
        channel: The channel it shows (0-based).
        colour: (r, g, b) in [0, 1].
        mode: ``"percentile"`` or ``"absolute"``.
        black: Black point: a percentage of the frame's min..max range (``percentile``; 0 = the
            lowest value, 100 = the highest), or a raw value (``absolute``).
        white: White point (same units).
        name: For messages.
    """

    channel: int
    colour: tuple[float, float, float]
    mode: str
    black: float
    white: float
    name: str = ""


def parse_colour(text: Any) -> tuple[float, float, float]:
    """``"#rrggbb"`` (or ``"#rgb"``) -> (r, g, b) floats in [0, 1]."""
    if not isinstance(text, str) or not text.startswith("#") or len(text) not in (4, 7):
        raise ValueError(f"colour {text!r} is not #rrggbb")
    digits = text[1:]
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    value = int(digits, 16)
    return ((value >> 16) / 255.0, ((value >> 8) & 255) / 255.0, (value & 255) / 255.0)


def view_contrast(spec: Mapping[str, Any], layer_contrasts: Mapping[str, Any] | None) -> Any:
    """The contrast a dataset view shows for one layer: the view's override, or the layer's own.

    The app's rule (NimbusImage ``src/store/index.ts``, getter ``layers``): the view's
    ``layerContrasts[layer.id]``, when present, replaces the layer's ``contrast`` as a whole (it
    is not merged field by field); a layer without an entry keeps its own contrast; entries for
    ids that no layer has are ignored. A ``null`` entry counts as absent, as in the app.

    Args:
        spec: One layer of the configuration's ``meta.layers``.
        layer_contrasts: The view's ``layerContrasts`` (layer id -> contrast), or None.

    Returns:
        The contrast to use, unchecked (:func:`parse_layers` checks it).
    """
    override = _view_override(spec, layer_contrasts)
    return spec.get("contrast") if override is None else override


def _view_override(spec: Mapping[str, Any], layer_contrasts: Mapping[str, Any] | None) -> Any:
    """The view's entry for this layer's id, or None."""
    layer_id = spec.get("id")
    if not layer_contrasts or not isinstance(layer_id, str):
        return None
    return layer_contrasts.get(layer_id)


def parse_layers(raw: Sequence[Mapping[str, Any]] | None, num_channels: int,
                 layer_contrasts: Mapping[str, Any] | None = None) -> list[Layer]:
    """The visible layers of a dataset view, checked; defaults when there are none.

    Args:
        raw: ``meta.layers`` of the dataset's configuration, or None.
        num_channels: The dataset's channel count.
        layer_contrasts: The view's per-layer contrast overrides (``layerContrasts``: layer id ->
            ``{mode, blackPoint, whitePoint}``), applied by :func:`view_contrast`; None = none.

    Raises:
        LayerError: a visible layer is malformed, shows a channel the dataset lacks, or no layer
            is visible. A bad contrast saved in the view says so.
    """
    if layer_contrasts is not None and not isinstance(layer_contrasts, Mapping):
        raise LayerError("(all)", f"the dataset view's contrast settings {layer_contrasts!r} are not an object "
                                  "of layer id -> contrast")
    if not raw:
        return default_layers(num_channels)
    layers = []
    for index, spec in enumerate(raw):
        if not isinstance(spec, Mapping):
            raise LayerError(str(index + 1), "is not an object")
        name = str(spec.get("name") or spec.get("id") or index + 1)
        if spec.get("visible", True) is False:
            continue
        channel = spec.get("channel")
        if isinstance(channel, bool) or not isinstance(channel, int) or not 0 <= channel < num_channels:
            raise LayerError(name, f"shows channel {channel!r}, but the dataset has channels 0-{num_channels - 1}")
        try:
            colour = parse_colour(spec.get("color", "#ffffff"))
        except ValueError as exc:
            raise LayerError(name, str(exc)) from None
        from_view = _view_override(spec, layer_contrasts) is not None
        where = "the dataset view's contrast" if from_view else "contrast"
        contrast = view_contrast(spec, layer_contrasts) or {}
        if not isinstance(contrast, Mapping):
            raise LayerError(name, f"{where} {contrast!r} is not an object with mode, blackPoint and whitePoint")
        mode = contrast.get("mode", "percentile")
        if mode not in ("percentile", "absolute"):
            raise LayerError(name, f"{where} mode {mode!r} is not percentile or absolute")
        default_black, default_white = (0.0, 100.0) if mode == "percentile" else (None, None)
        black = contrast.get("blackPoint", default_black)
        white = contrast.get("whitePoint", default_white)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   for v in (black, white)):
            raise LayerError(name, f"{where} needs numeric blackPoint and whitePoint")
        layers.append(Layer(channel, colour, mode, float(black), float(white), name))
    if not layers:
        raise LayerError("(all)", "no layer is visible, so there is no image to segment")
    return layers


def default_layers(num_channels: int) -> list[Layer]:
    """Every channel visible, white for a single channel, distinct colours for several."""
    colours = DEFAULT_COLOURS if num_channels == 1 else MULTI_CHANNEL_COLOURS
    mode, black, white = DEFAULT_CONTRAST
    return [Layer(c, colours[c % len(colours)], mode, black, white, f"channel {c}") for c in range(num_channels)]


def js_round(value: float) -> float:
    """JavaScript's ``Math.round``: the nearest integer, halves rounded up (towards +infinity).

    Python's ``round`` and numpy's round halves to even (``round(2.5) == 2``); the app's
    ``Math.round(2.5)`` is 3 and ``Math.round(-2.5)`` is -2. ``value`` must be finite.
    """
    low = math.floor(value)
    return float(low + 1 if value - low >= 0.5 else low)


def frame_range(plane: np.ndarray) -> tuple[float, float]:
    """(min, max) of a frame's pixel values: the ``min`` and ``max`` of the histogram the app asks
    large_image for (``item/{id}/tiles/histogram``). Float frames ignore non-finite values; a
    frame with none gives (0, 1).

    Args:
        plane: (H, W) raw frame, any integer or float dtype.
    """
    low, high = plane.min(), plane.max()
    if plane.dtype.kind == "f" and not (np.isfinite(low) and np.isfinite(high)):
        values = plane[np.isfinite(plane)]
        if values.size == 0:
            return 0.0, 1.0
        low, high = values.min(), values.max()
    return float(low), float(high)


def percent_of_range(low: float, high: float, point: float) -> float:
    """A ``percentile`` contrast point in raw units, as the app computes it.

    NimbusImage ``src/store/images.ts`` ``toStyle``: ``scaleLinear().domain([0, 100])
    .rangeRound([hist.min, hist.max])(point)``, i.e. d3's ``interpolateRound``:
    ``Math.round(low * (1 - t) + high * t)`` with ``t = point / 100``, computed in the same
    float64 steps. Not clamped: a point outside 0..100 lies outside the range, as in d3.

    Args:
        low, high: The frame's min and max (:func:`frame_range`).
        point: The black or white point, in percent of the range.
    """
    t = point / 100.0
    return js_round(low * (1.0 - t) + high * t)


def contrast_limits(plane: np.ndarray, layer: Layer) -> tuple[float, float]:
    """(black, white) in the plane's raw units, as the app styles the layer's tiles."""
    if layer.mode == "absolute":
        return layer.black, layer.white
    low, high = frame_range(plane)
    return percent_of_range(low, high, layer.black), percent_of_range(low, high, layer.white)


def merge_layers(planes: Mapping[int, np.ndarray], layers: Sequence[Layer],
                 limits: Sequence[tuple[float, float]] | None = None) -> np.ndarray:
    """Combine channel planes into one RGB image.

    Args:
        planes: channel -> (H, W) array (uint8, uint16, or float) for every layer's channel.
        layers: The visible layers.
        limits: Each layer's (black, white) in raw units; default: computed from ``planes``
            (pass them when ``planes`` are a window of a larger frame, so that the contrast is
            the frame's).

    Returns:
        float32 (H, W, 3) in [0, 1].
    """
    first = planes[layers[0].channel]
    merged = np.empty(first.shape + (3,), dtype=np.float32)
    written = [False, False, False]
    for index, layer in enumerate(layers):
        plane = planes[layer.channel]
        black, white = limits[index] if limits is not None else contrast_limits(plane, layer)
        # large_image's style: (value - min) / (max - min), or / 1 where max == min (a flat
        # window: on integer frames everything above it is white); max < min inverts the ramp.
        delta = white - black if white != black else 1.0
        scaled = plane.astype(np.float32)  # a copy, scaled in place
        np.subtract(scaled, np.float32(black), out=scaled)
        np.multiply(scaled, np.float32(1.0 / delta), out=scaled)
        np.clip(scaled, 0.0, 1.0, out=scaled)
        if np.issubdtype(plane.dtype, np.floating):  # integer frames hold no NaN or infinity
            scaled = np.nan_to_num(scaled, nan=0.0, posinf=1.0, neginf=0.0)
        for band in range(3):
            colour = layer.colour[band]
            if colour <= 0:
                continue
            part = scaled if colour == 1 else scaled * np.float32(colour)
            if written[band]:
                np.maximum(merged[..., band], part, out=merged[..., band])
            else:
                merged[..., band] = part
                written[band] = True
    for band in range(3):
        if not written[band]:
            merged[..., band] = 0.0
    return merged


class LocationImage:
    """A location's channel frames, merged into RGB only where asked (:meth:`window`).

    The contrast limits are computed once over the whole frames, so every window is merged
    exactly as the whole frame would be; only the requested pixels are ever converted to float,
    so object crops of a huge frame cost the raw frames plus the crops, not a full RGB copy.

    Args:
        planes: channel -> (H, W) raw frame, for every layer's channel.
        layers: The visible layers.
    """

    def __init__(self, planes: Mapping[int, np.ndarray], layers: Sequence[Layer]) -> None:
        self.planes = dict(planes)
        self.layers = list(layers)
        self.limits = [contrast_limits(self.planes[layer.channel], layer) for layer in self.layers]
        self.height, self.width = self.planes[self.layers[0].channel].shape

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)

    def window(self, top: int, left: int, bottom: int, right: int) -> np.ndarray:
        """float32 (bottom - top, right - left, 3) RGB in [0, 1] for rows top..bottom-1,
        columns left..right-1."""
        crops = {c: plane[top:bottom, left:right] for c, plane in self.planes.items()}
        return merge_layers(crops, self.layers, self.limits)


    def window_shrunk(self, top: int, left: int, bottom: int, right: int, size: int) -> np.ndarray:
        """The window merged at ``size`` x ``size`` (area-averaged first, then merged with the
        frame's contrast): a model that squeezes its input to that size sees almost the same
        image, at a fraction of the cost of merging every pixel. float32 (size, size, 3)."""
        crops = {c: cv2.resize(np.ascontiguousarray(plane[top:bottom, left:right], dtype=np.float32),
                               (size, size), interpolation=cv2.INTER_AREA)
                 for c, plane in self.planes.items()}
        return merge_layers(crops, self.layers, self.limits)


class ArrayImage:
    """An already merged (H, W, 3) float32 image behind the :class:`LocationImage` interface."""

    def __init__(self, rgb: np.ndarray) -> None:
        self.rgb = rgb
        self.height, self.width = rgb.shape[:2]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)

    def window(self, top: int, left: int, bottom: int, right: int) -> np.ndarray:
        return self.rgb[top:bottom, left:right]

    def window_shrunk(self, top: int, left: int, bottom: int, right: int, size: int) -> np.ndarray:
        return cv2.resize(np.ascontiguousarray(self.rgb[top:bottom, left:right]), (size, size),
                          interpolation=cv2.INTER_AREA)
