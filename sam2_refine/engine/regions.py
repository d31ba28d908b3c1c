"""Which parts of a frame the model sees: the whole frame, or windows around groups of objects.

SAM2 squeezes whatever it is given into a 1024x1024 input, and its masks come back on a
256x256 grid. On a 4096x4096 frame one grid cell spans 16 frame pixels, so a 20 px nucleus is
about one cell: its outline is lost. "Object crops" cut windows at native resolution around
groups of nearby objects instead (each ~1024 px, the model's input size), so small objects
keep their pixels:

- every object gets a context margin around its box (half its size, at least 16 px), and its
  whole box plus margin lies inside its window (an object is never split);
- objects are grouped by the 768 px tile their centre falls in: neighbours share a window, and
  a window is the union of its objects' boxes plus margins, made square where the frame allows
  (SAM2 stretches its input to a square), at least 256 px;
- "Auto" uses crops when the frame is larger than the model input and the objects are small
  relative to it (median object under 32 px once the frame is squeezed to 1024), else the
  whole frame.

Coordinates are frame pixels (x = column, y = row); windows are :class:`~sam2_refine.engine.geometry.Window`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from sam2_refine.engine.geometry import Window

WHOLE, CROPS, AUTO = "whole", "crops", "auto"
MODEL_INPUT = 1024
TILE = 768
MIN_CROP = 256
MIN_MARGIN = 16.0
#: Auto uses crops when the median object would be smaller than this in the model's input.
SMALL_IN_MODEL_PX = 32.0


@dataclass(frozen=True)
class Region:
    """A window of the frame the model embeds once, and the prompts decoded on it.

    Attributes:
        window: The pixels embedded.
        members: Indices (into the boxes given to :func:`plan_regions`) of its objects.
    """

    window: Window
    members: tuple[int, ...]


def choose_mode(boxes: np.ndarray, height: int, width: int, mode: str) -> str:
    """Resolve ``"auto"`` to ``"whole"`` or ``"crops"`` (see the module docstring)."""
    if mode != AUTO:
        return mode
    longest = max(height, width)
    if longest <= MODEL_INPUT or len(boxes) == 0:
        return WHOLE
    sizes = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    return CROPS if float(np.median(sizes)) * MODEL_INPUT / longest < SMALL_IN_MODEL_PX else WHOLE


def _square(win: Window, bounds: Window, minimum: int) -> Window:
    """Grow ``win`` to a square of side >= ``minimum`` around its centre, kept inside ``bounds``."""
    side = max(win.height, win.width, minimum)
    side_h, side_w = min(side, bounds.height), min(side, bounds.width)
    cy, cx = (win.top + win.bottom) / 2, (win.left + win.right) / 2
    top = int(round(min(max(cy - side_h / 2, bounds.top), bounds.bottom - side_h)))
    left = int(round(min(max(cx - side_w / 2, bounds.left), bounds.right - side_w)))
    grown = Window(top, left, top + side_h, left + side_w)
    # Rounding must never cut the objects' own window.
    return Window(min(grown.top, win.top), min(grown.left, win.left),
                  max(grown.bottom, win.bottom), max(grown.right, win.right))


def plan_regions(boxes: np.ndarray, height: int, width: int, mode: str) -> list[Region]:
    """Split the prompts of one frame into regions to embed.

    Args:
        boxes: float (N, 4) prompt boxes (x0, y0, x1, y1) in frame pixels.
        height, width: The frame's size.
        mode: ``"whole"``, ``"crops"`` or ``"auto"``.

    Returns:
        Regions covering every prompt exactly once, in row-major tile order.
    """
    bounds = Window(0, 0, height, width)
    mode = choose_mode(boxes, height, width, mode)
    if mode == WHOLE or len(boxes) == 0:
        return [Region(bounds, tuple(range(len(boxes))))]
    sizes = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    margins = np.maximum(MIN_MARGIN, 0.5 * sizes)
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    tiles: dict[tuple[int, int], list[int]] = defaultdict(list)
    for k, (cx, cy) in enumerate(centres):
        tiles[(int(cy // TILE), int(cx // TILE))].append(k)
    regions = []
    for key in sorted(tiles):
        members = tiles[key]
        needs = [Window.around(boxes[k], float(margins[k]), bounds) for k in members]
        union = Window(min(w.top for w in needs), min(w.left for w in needs),
                       max(w.bottom for w in needs), max(w.right for w in needs))
        regions.append(Region(_square(union, bounds, MIN_CROP), tuple(members)))
    return regions
