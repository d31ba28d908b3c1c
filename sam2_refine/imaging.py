"""A location's channel frames -> one RGB image, as the user sees it (contract section 6).

Each visible layer maps one channel through its contrast window to [0, 1], tints it with the
layer colour, and the layers combine by pixel-wise maximum. Layers are matched to channels by
``layer.channel`` (two layers may show one channel). A dataset without layer settings gets
:func:`default_layers`. The layers' own Z/Time settings are not applied: every layer shows the
annotation's own location, as in the original worker.

A dataset view may override a layer's contrast (``layerContrasts``, keyed by layer id); the user
sees the override, so the model gets it too (:func:`view_contrast`, the rule the app applies).
"""

from __future__ import annotations

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
#: Contrast of channels without layer settings: the 0.5th..99.99th percentile. The white point
#: is high because microscopy objects are often sparse: nuclei covering 0.3 % of a frame put
#: the 99.5th percentile in the background, which would turn the whole frame white.
DEFAULT_CONTRAST = ("percentile", 0.5, 99.99)


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
        black: Black point (a percentile in [0, 100], or a raw value).
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
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (black, white)):
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


def percentiles(plane: np.ndarray, quantiles: tuple[float, float]) -> tuple[float, float]:
    """``np.percentile(plane, quantiles)`` (linear interpolation), exactly, and fast for integers.

    For uint8/uint16 planes the sorted values are read off a histogram instead of partitioning
    the whole plane (a 4096x4096 uint16 frame: ~30 ms instead of ~300 ms). Float planes ignore
    non-finite values.
    """
    if plane.dtype in (np.uint8, np.uint16):
        counts = np.bincount(plane.ravel(), minlength=256)
        cumulative = np.cumsum(counts)
        n = int(cumulative[-1])
        out = []
        for q in quantiles:
            rank = (n - 1) * q / 100.0
            lo, hi = int(np.floor(rank)), int(np.ceil(rank))
            v_lo = float(np.searchsorted(cumulative, lo, side="right"))
            v_hi = float(np.searchsorted(cumulative, hi, side="right"))
            out.append(v_lo + (v_hi - v_lo) * (rank - lo))
        return out[0], out[1]
    values = plane if plane.dtype.kind in "ui" else plane[np.isfinite(plane)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, list(quantiles))
    return float(low), float(high)


def contrast_limits(plane: np.ndarray, layer: Layer) -> tuple[float, float]:
    """(black, white) in the plane's raw units."""
    if layer.mode == "absolute":
        return layer.black, layer.white
    return percentiles(plane, (float(np.clip(layer.black, 0, 100)), float(np.clip(layer.white, 0, 100))))


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
        if white > black:
            scaled = plane.astype(np.float32)  # a copy, scaled in place
            np.subtract(scaled, np.float32(black), out=scaled)
            np.multiply(scaled, np.float32(1.0 / (white - black)), out=scaled)
            np.clip(scaled, 0.0, 1.0, out=scaled)
        else:  # a flat window (e.g. a sparse channel whose percentiles coincide): above it is white
            scaled = (plane.astype(np.float32, copy=False) > np.float32(white)).astype(np.float32)
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
