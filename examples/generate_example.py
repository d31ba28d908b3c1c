"""Regenerate the bundled demo example (examples/nuclei/): run from the repository root.

A realistic synthetic two-channel fluorescence field (nuclei and cytoplasm, 512x512 uint16,
blurred, with shot noise, uneven background and varying brightness), its ground-truth nucleus
labels, and rough polygon annotations of the kind a user draws quickly (too big, too small,
jittered, plain boxes). The files are committed; this script documents how they were made.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import tifffile
from shapely.geometry import Polygon

from sam2_refine.testing.datasets import cell_scene, rough_polygon

OUT = Path(__file__).resolve().parent / "nuclei"
KINDS = ("jittered", "dilated", "eroded", "box")


def main() -> None:
    scene = cell_scene(512, 512, 28, radius=(11.0, 19.0), seed=2024)
    rng = np.random.default_rng(7)
    annotations = []
    for label in range(1, scene.count + 1):
        kind = KINDS[label % len(KINDS)]
        points = rough_polygon(scene.labels == label, kind, rng, amount=3.0)
        # Hand-drawn outlines have a few dozen vertices, not one per pixel.
        points = np.asarray(Polygon(points).simplify(1.0).exterior.coords)[:-1]
        annotations.append({"kind": kind, "truth_label": label, "tags": ["nucleus"],
                            "coordinates": [{"x": round(float(x), 2), "y": round(float(y), 2)} for x, y in points]})
    OUT.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(OUT / "image.tif", scene.channels, compression="zlib",
                     metadata={"axes": "CYX", "channels": ["DAPI", "Cytoplasm"]})
    cv2.imwrite(str(OUT / "truth.png"), scene.labels.astype(np.uint16))
    (OUT / "annotations.json").write_text(json.dumps(annotations, indent=1))
    layers = [
        {"id": "dapi", "name": "DAPI", "channel": 0, "color": "#3399ff", "visible": True,
         "contrast": {"mode": "percentile", "blackPoint": 1, "whitePoint": 99.8},
         "xy": {"type": "current", "value": None}, "z": {"type": "current", "value": None},
         "time": {"type": "current", "value": None}, "layerGroup": None},
        {"id": "cyto", "name": "Cytoplasm", "channel": 1, "color": "#ff33cc", "visible": True,
         "contrast": {"mode": "percentile", "blackPoint": 1, "whitePoint": 99.5},
         "xy": {"type": "current", "value": None}, "z": {"type": "current", "value": None},
         "time": {"type": "current", "value": None}, "layerGroup": None},
    ]
    (OUT / "layers.json").write_text(json.dumps(layers, indent=1))
    print(f"{scene.count} nuclei -> {OUT}")


if __name__ == "__main__":
    main()
