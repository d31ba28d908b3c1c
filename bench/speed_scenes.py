"""The speed benchmark's configurations and datasets (no torch: also for the zero-cost runs).

A configuration is a frame size, objects per location N and locations L; its dataset is
:func:`sam2_refine.testing.datasets.grid_scene` (bright disks on a dark, noisy background, one
per cell of a jittered grid) at every location, each disk outlined by a rough octagon (or, for
``points``, marked by a click within 2 px of its centre), served by the local NimbusImage
test server.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sam2_refine.testing.datasets import grid_scene, rough_octagons
from sam2_refine.testing.nimbus_server import NimbusTestServer


@dataclass(frozen=True)
class Config:
    size: int
    objects: int
    locations: int
    per_box: bool = True
    points: bool = False  # the objects are marked by points (issue 13) instead of rough polygons

    @property
    def name(self) -> str:
        return f"{self.size}x{self.size} N={self.objects} L={self.locations}" + (" points" if self.points else "")


FULL = [
    Config(1024, 200, 1), Config(1024, 100, 4), Config(2048, 100, 2), Config(4096, 500, 1), Config(4096, 100, 2),
    Config(2048, 10, 1), Config(2048, 100, 1), Config(2048, 1000, 1), Config(2048, 5000, 1, per_box=False),
    # 9: the twin of 7 with points (the per-box loop has no point prompts)
    Config(2048, 1000, 1, per_box=False, points=True),
]
QUICK = [Config(1024, 20, 1), Config(2048, 20, 2), Config(1024, 20, 1, per_box=False, points=True)]


def build_dataset(server: NimbusTestServer, cfg: Config, seed: int = 0):
    """The configuration's dataset on ``server``: (dataset, scene)."""
    scene = grid_scene(cfg.size, cfg.size, cfg.objects, channels=1, seed=seed)
    pixels = np.broadcast_to(scene.channels, (cfg.locations, 1, 1) + scene.channels.shape).copy()
    ds = server.add_dataset(pixels)
    rng = np.random.default_rng(seed)
    for xy in range(cfg.locations):
        where = {"tags": ["rough"], "channel": 0, "location": {"XY": xy, "Z": 0, "Time": 0}}
        if cfg.points:  # a click within 2 px of each centre
            clicks = scene.centres + rng.uniform(-2, 2, size=scene.centres.shape)
            docs = [{**where, "shape": "point", "coordinates": [{"x": float(x), "y": float(y)}]} for x, y in clicks]
        else:
            docs = [{**where, "shape": "polygon", "coordinates": [{"x": float(x), "y": float(y)} for x, y in ring]}
                    for ring in rough_octagons(scene.centres, scene.radii, rng)]
        server.add_annotations(ds.dataset_id, docs)
    return ds, scene


def job_parameters(resolution: str = "Whole frame", tag: str = "engine", model: str = "sam2.1_hiera_tiny.pt") -> dict:
    """The job's parameters: the configuration's objects refined with the default fields, whole
    frame (the same model passes as the floor), points on; ``model``: the checkpoint's file name."""
    return {"workerInterface": {"Model": model, "Tag of objects to refine": ["rough"],
                                "Batch XY": "all", "Batch Z": "all", "Batch Time": "all",
                                "Smoothing": 0.7, "Padding": 0, "Delete original annotations": False,
                                "Resolution": resolution, "Refine point annotations": True},
            "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 0, "tags": [tag]}
