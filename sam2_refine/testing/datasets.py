"""Synthetic microscopy-like datasets with ground truth, and rough annotations made from it.

:func:`cell_scene` draws non-overlapping elliptical cells (a nucleus channel and a cytoplasm
channel, blurred, with shot noise and a background gradient) and returns the ground-truth label
image with it. :func:`rough_polygon` makes the kind of rough outline a user draws quickly:
dilated, eroded, jittered, or just the box.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from skimage.measure import find_contours


@dataclass(frozen=True)
class Scene:
    """A synthetic image with ground truth.

    Attributes:
        channels: (C, H, W) pixels (uint16 unless asked otherwise).
        labels: (H, W) int32 nucleus labels (the bright channel-0 objects): 0 = background,
            k = object k (1..N).
    """

    channels: np.ndarray
    labels: np.ndarray

    @property
    def count(self) -> int:
        return int(self.labels.max())


def _as_dtype(planes: np.ndarray, dtype: type) -> np.ndarray:
    """Planes with values in [0, 1] as a frame of ``dtype``: uint16 up to 60000, uint8 up to 250,
    else float32 as they are."""
    if dtype == np.uint16:
        return (planes * 60000).astype(np.uint16)
    if dtype == np.uint8:
        return (planes * 250).astype(np.uint8)
    return planes.astype(np.float32)


def cell_scene(
    height: int,
    width: int,
    count: int,
    radius: tuple[float, float] = (8.0, 16.0),
    seed: int = 0,
    dtype: type = np.uint16,
    noise: bool = True,
) -> Scene:
    """Draw up to ``count`` non-overlapping cells (fewer if they do not fit).

    Channel 0 holds the nuclei (the segmentation targets: bright ellipses on a dark background),
    channel 1 a dimmer, larger cytoplasm around each.
    """
    rng = np.random.default_rng(seed)
    labels = np.zeros((height, width), dtype=np.int32)
    cyto = np.zeros((height, width), dtype=np.int32)
    brightness = [0.0]
    placed = 0
    for _ in range(count * 30):
        if placed == count:
            break
        a = rng.uniform(*radius)
        b = a * rng.uniform(0.6, 1.0)
        cx, cy = rng.uniform(a + 2, width - a - 2), rng.uniform(a + 2, height - a - 2)
        angle = rng.uniform(0, 180)
        trial = np.zeros_like(labels, dtype=np.uint8)
        cv2.ellipse(trial, (int(round(cx * 16)), int(round(cy * 16))),
                    (int(round(a * 16)), int(round(b * 16))), angle, 0, 360, 1, -1, cv2.LINE_8, 4)
        halo = cv2.dilate(trial, np.ones((7, 7), np.uint8))
        if np.any(labels[halo > 0]):
            continue
        placed += 1
        labels[trial > 0] = placed
        brightness.append(float(rng.uniform(0.55, 1.0)))
        ring = cv2.dilate(trial, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9)))
        cyto[(ring > 0) & (cyto == 0)] = placed
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    background = 0.04 + 0.03 * (xx / max(width, 1)) + 0.02 * (yy / max(height, 1))
    texture = cv2.GaussianBlur(rng.random((height, width)).astype(np.float32), (0, 0), 2.0)
    level = np.asarray(brightness, dtype=np.float32)[labels]
    nucleus = np.where(labels > 0, level * (0.75 + 0.2 * texture), 0.0).astype(np.float32)
    nucleus = cv2.GaussianBlur(nucleus, (0, 0), 0.8) + background
    cytoplasm = cv2.GaussianBlur(np.where(cyto > 0, 0.35, 0.0).astype(np.float32), (0, 0), 1.5) + background
    planes = np.stack([nucleus, cytoplasm])
    if noise:
        planes = rng.poisson(planes * 2000.0).astype(np.float32) / 2000.0
    planes = np.clip(planes, 0, 1)
    return Scene(_as_dtype(planes, dtype), labels)


def outline(mask: np.ndarray) -> np.ndarray:
    """The outer boundary of a bool mask as (K, 2) (x, y) points (marching squares at 0.5)."""
    padded = np.pad(mask.astype(np.float32), 1)
    contours = find_contours(padded, 0.5, fully_connected="high")
    best = max(contours, key=len)
    return best[:-1, ::-1] - 1.0


def rough_polygon(mask: np.ndarray, kind: str, rng: np.random.Generator, amount: float = 3.0) -> np.ndarray:
    """A rough outline of one object, as a user might draw it.

    Args:
        mask: bool (H, W), the object.
        kind: ``"dilated"`` (``amount`` px too big), ``"eroded"`` (too small), ``"jittered"``
            (every vertex moved by up to ``amount`` px, few vertices), or ``"box"`` (its
            bounding box).
        rng: Random source for ``"jittered"``.

    Returns:
        (K, 2) float64 (x, y) points, K >= 3.
    """
    r = int(round(amount))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    if kind == "dilated":
        return outline(cv2.dilate(mask.astype(np.uint8), kernel) > 0)
    if kind == "eroded":
        eroded = cv2.erode(mask.astype(np.uint8), kernel) > 0
        return outline(eroded if eroded.any() else mask)
    if kind == "box":
        rows, cols = np.nonzero(mask)
        x0, x1, y0, y1 = cols.min() - 0.5, cols.max() + 0.5, rows.min() - 0.5, rows.max() + 0.5
        return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)
    if kind == "jittered":
        points = outline(mask)
        step = max(1, len(points) // 12)
        sparse = points[::step]
        return sparse + rng.uniform(-amount, amount, size=sparse.shape)
    raise ValueError(f"unknown kind {kind!r}")


def annotation_doc(points: np.ndarray, xy: int = 0, z: int = 0, time: int = 0,
                   tags: list[str] | None = None, channel: int = 0) -> dict:
    """A polygon annotation document for the test server (``datasetId`` set on insertion)."""
    return {
        "shape": "polygon",
        "tags": list(tags or []),
        "channel": channel,
        "location": {"XY": xy, "Z": z, "Time": time},
        "coordinates": [{"x": float(x), "y": float(y)} for x, y in points],
    }


@dataclass(frozen=True)
class GridScene:
    """Many round objects on a jittered grid: fast to build at any size and count.

    Attributes:
        channels: (C, H, W) uint16.
        labels: (H, W) int32, object k (1..N) where disk k is.
        centres: (N, 2) float64 (x, y).
        radii: (N,) float64.
    """

    channels: np.ndarray
    labels: np.ndarray
    centres: np.ndarray
    radii: np.ndarray

    @property
    def count(self) -> int:
        return len(self.radii)


def grid_scene(height: int, width: int, count: int, channels: int = 1, seed: int = 0) -> GridScene:
    """``count`` bright disks on a dark, noisy background, one per cell of a jittered grid."""
    rng = np.random.default_rng(seed)
    cols = int(np.ceil(np.sqrt(count * width / height)))
    rows = int(np.ceil(count / cols))
    cell = min(width / cols, height / rows)
    labels = np.zeros((height, width), dtype=np.int32)
    centres, radii = [], []
    for k in range(count):
        r, c = divmod(k, cols)
        radius = cell * rng.uniform(0.22, 0.32)
        slack = cell / 2 - radius - 1
        cx = (c + 0.5) * width / cols + rng.uniform(-slack, slack)
        cy = (r + 0.5) * height / rows + rng.uniform(-slack, slack)
        cv2.circle(labels, (int(round(cx * 16)), int(round(cy * 16))), int(round(radius * 16)), k + 1, -1,
                   cv2.LINE_8, 4)
        centres.append((cx, cy))
        radii.append(radius)
    base = np.where(labels > 0, 30000, 2000).astype(np.float32)
    planes = [np.clip(base + rng.normal(0, 800, size=base.shape), 0, 65535).astype(np.uint16) for _ in range(channels)]
    return GridScene(np.stack(planes), labels, np.asarray(centres), np.asarray(radii))


def rough_octagons(centres: np.ndarray, radii: np.ndarray, rng: np.random.Generator, jitter: float = 0.25,
                   ) -> list[np.ndarray]:
    """A rough 8-vertex outline around each disk: radius off by up to +-``jitter``, vertices jittered."""
    angles = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    out = []
    for (cx, cy), radius in zip(centres, radii, strict=True):
        r = radius * (1 + rng.uniform(-jitter, jitter)) * (1 + rng.uniform(-0.1, 0.1, size=8))
        out.append(np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], axis=1))
    return out


def dense_scene(height: int, width: int, count: int, radius: tuple[float, float] = (9.0, 14.0),
                spacing: float = 1.55, seed: int = 0, dtype: type = np.uint16) -> Scene:
    """Up to ``count`` elliptical nuclei packed so that many touch (a dense field).

    Centres are at least ``spacing`` times the larger radius of the pair apart, so neighbouring
    ellipses overlap; each overlapped pixel goes to the ellipse it is deepest inside (the
    smallest ``(u/a)^2 + (v/b)^2``), so touching nuclei share straight-ish boundaries. Channel 0:
    nuclei of different brightness, the pixels on a boundary between two nuclei 30 % dimmer,
    blurred, shot noise.
    """
    rng = np.random.default_rng(seed)
    depth = np.full((height, width), np.inf, dtype=np.float32)
    labels = np.zeros((height, width), dtype=np.int32)
    centres: list[tuple[float, float, float]] = []
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(count * 40):
        if len(centres) == count:
            break
        a = rng.uniform(*radius)
        cx, cy = rng.uniform(a + 2, width - a - 2), rng.uniform(a + 2, height - a - 2)
        if any((cx - x) ** 2 + (cy - y) ** 2 < (spacing * max(a, r)) ** 2 for x, y, r in centres):
            continue
        b = a * rng.uniform(0.7, 1.0)
        t = np.radians(rng.uniform(0, 180))
        r0, r1 = int(max(cy - a - 1, 0)), int(min(cy + a + 2, height))
        c0, c1 = int(max(cx - a - 1, 0)), int(min(cx + a + 2, width))
        dx, dy = xx[r0:r1, c0:c1] - cx, yy[r0:r1, c0:c1] - cy
        u = dx * np.cos(t) + dy * np.sin(t)
        v = -dx * np.sin(t) + dy * np.cos(t)
        d = (u / a) ** 2 + (v / b) ** 2
        centres.append((cx, cy, a))
        win = d < np.minimum(depth[r0:r1, c0:c1], 1.0)
        depth[r0:r1, c0:c1][win] = d[win]
        labels[r0:r1, c0:c1][win] = len(centres)
    brightness = np.concatenate([[0.0], rng.uniform(0.55, 1.0, len(centres))]).astype(np.float32)
    level = brightness[labels]
    edge = (labels > 0) & (cv2.dilate(labels.astype(np.float32), np.ones((3, 3), np.uint8)) != labels)
    edge &= cv2.erode(np.where(labels > 0, labels, 10 ** 6).astype(np.float32), np.ones((3, 3), np.uint8)) > 0
    nucleus = np.where(edge, 0.7 * level, level).astype(np.float32)
    nucleus = cv2.GaussianBlur(nucleus, (0, 0), 0.8) + 0.04
    plane = np.clip(rng.poisson(nucleus * 2000.0).astype(np.float32) / 2000.0, 0, 1)
    planes = np.stack([plane, plane])
    return Scene(_as_dtype(planes, dtype), labels)
