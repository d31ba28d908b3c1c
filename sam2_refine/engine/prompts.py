"""Originals -> prompts: each original's prompt box (a point's planning box), its group, its
outline as mask-prompt logits, and the resolution a location is refined at.

Coordinates are frame pixels, x = column, y = row; boxes are (x0, y0, x1, y1).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from shapely import affinity
from shapely.geometry.base import BaseGeometry

from sam2_refine.annotations import POINT, Kept, Original
from sam2_refine.engine.geometry import AnnotationProblem, Window, point_in_frame, prompt_box, rasterize_rough
from sam2_refine.engine.regions import CROPS, choose_mode


#: Frames with more pixels than this are always refined in object crops: a whole-frame RGB
#: float copy of 16384 x 16384 pixels alone is 3.2 GB (a 20000 x 20000 frame: 4.8 GB).
MAX_WHOLE_FRAME_PIXELS = 16384 * 16384


#: A point has no size. For choosing the resolution (Auto) it counts as an object of this many
#: pixels (nuclei-sized: Auto then uses crops on frames over 1024 px, where small objects need them).
POINT_SIZE_FOR_AUTO = 32.0


#: In object crops, the window around a point reaches at least this far from it in every direction
#: (its planning box is the point +- half of it, plus the regions' context margin).
POINT_CONTEXT = 128.0


@dataclass(frozen=True)
class Prompt:
    original: Original
    box: np.ndarray  # (4,) x0, y0, x1, y1: the prompt box, or a point's planning box
    point: np.ndarray | None = None  # (2,) x, y for a point
    group: Hashable = ()

    @property
    def pixel(self) -> tuple[int, int]:
        """(row, col) of the frame pixel holding the point."""
        assert self.point is not None
        return int(np.floor(self.point[1] + 0.5)), int(np.floor(self.point[0] + 0.5))


def object_group(original: Original, group_tags: Sequence[str]) -> tuple[str, ...]:
    """The group an object belongs to: the ones of ``group_tags`` it carries (all its tags when
    ``group_tags`` is empty), sorted."""
    tags = set(original.tags)
    return tuple(sorted(tags & set(group_tags) if group_tags else tags))


def prepare(originals: Sequence[Original], width: int, height: int, group_tags: Sequence[str],
             ) -> tuple[list[Prompt], list[Kept]]:
    prompts, kept = [], []
    for original in originals:
        if original.problem is not None or original.shape is None:
            kept.append(Kept(original.id, original.problem or "no shape"))
            continue
        group = object_group(original, group_tags)
        try:
            if original.kind == POINT:
                point = np.array([original.shape.x, original.shape.y], dtype=np.float64)
                point_in_frame(point, width, height)
                # a point on the frame's last edge (x = W - 0.5) belongs to the last pixel
                point = np.minimum(point, [width - 0.5 - 1e-6, height - 0.5 - 1e-6])
                half = POINT_CONTEXT / 2
                box = np.clip(np.concatenate([point - half, point + half]), -0.5,
                              [width - 0.5, height - 0.5, width - 0.5, height - 0.5])
                prompts.append(Prompt(original, box, point, group))
            else:
                prompts.append(Prompt(original, prompt_box(original.shape, width, height), None, group))
        except AnnotationProblem as exc:
            kept.append(Kept(original.id, exc.reason))
    return prompts, kept


def shape_on_grid(shape: BaseGeometry, region: Window, grid_hw: tuple[int, int]) -> np.ndarray:
    """The original's shape rasterised on the model's logit grid over ``region``.

    Grid cell (i, j) stands for the region's rows ``[i*Hr/h, (i+1)*Hr/h)`` (columns alike); its
    centre in frame coordinates is ``top + (i + 0.5) * Hr / h - 0.5``.

    Returns:
        bool (h, w).
    """
    h, w = grid_hw
    sy, sx = h / region.height, w / region.width
    local = affinity.affine_transform(shape, [sx, 0, 0, sy, (0.5 - region.left) * sx - 0.5,
                                              (0.5 - region.top) * sy - 0.5])
    return rasterize_rough(local, Window(0, 0, h, w))


def shape_logits(on_grid: np.ndarray) -> np.ndarray:
    """Mask-prompt logits for a rasterised outline: +8 well inside, -8 well outside, a smooth
    signed-distance ramp (tanh over ~2 cells) across the boundary. float32, same shape."""
    inside = cv2.distanceTransform(on_grid.astype(np.uint8), cv2.DIST_L2, 3)
    outside = cv2.distanceTransform((~on_grid).astype(np.uint8), cv2.DIST_L2, 3)
    return (8.0 * np.tanh((inside - outside) / 2.0)).astype(np.float32)


def planning(prompts: Sequence[Prompt], height: int, width: int, resolution: str) -> tuple[str, np.ndarray]:
    """The resolution mode (Auto resolved) and the boxes regions are planned with."""
    boxes = np.stack([p.box for p in prompts]) if prompts else np.zeros((0, 4))
    sizes = boxes.copy()
    for k, prompt in enumerate(prompts):
        if prompt.point is not None:
            half = POINT_SIZE_FOR_AUTO / 2
            sizes[k] = np.concatenate([prompt.point - half, prompt.point + half])
    if height * width > MAX_WHOLE_FRAME_PIXELS and resolution != CROPS:
        resolution = CROPS  # a whole-frame RGB copy would not fit in memory: crops need only windows
    return choose_mode(sizes, height, width, resolution), boxes
