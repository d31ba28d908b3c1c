"""Which pixels the app's "percentile" contrast is taken from: large_image's histogram min and max.

NimbusImage asks ``GET item/{id}/tiles/histogram`` with ``width=2048&height=2048&resample=false
&bins=4096&frame=F`` (``src/store/GirderAPI.ts``, ``baseHistogramOptions``) and uses its ``min``
and ``max`` as the ends of the percentile range (``src/store/images.ts``, ``toStyle``). This
script asks large_image the same question on synthetic 16-bit frames of several sizes, stored
three ways (a plain multi-page TIFF; the ``multi-source2.json`` the app writes over it; the TIFF
transcoded by ``large_image_converter``, the app's default for every format but ND2), and prints
the histogram's min and max beside the full frame's, every f-th pixel's (``[::f, ::f]``) and the
f x f block means', where f is the reduction of the pyramid level the histogram reads.

Not part of the worker or its tests: it needs large_image (the ``girder-5`` branch NimbusImage
installs) with its multi, tifffile and converter packages in the Python that runs it, e.g. the
virtual environment of the real-server check::

    ~/.cache/sam2-refine/real-server-check/venv/bin/python scripts/app_histogram_pixels.py

Each frame holds values 100..3999 and four lone pixels: 7 at (1, 1), 65000 at (3, 5), 50 at
(2, 2) and 60000 at (4, 4); the first two lie on odd rows, which every-other-pixel sampling skips.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import tifffile

#: The app's histogram options (NimbusImage src/store/GirderAPI.ts, baseHistogramOptions).
APP_OPTIONS = {"bins": 4096, "output": {"maxWidth": 2048, "maxHeight": 2048}, "resample": False}


def reduction(width: int, height: int, size: int = 2048) -> int:
    """The factor by which the level the histogram reads is reduced: large_image
    (``tilesource/tileiterator.py``, ``_tileIteratorInfo``) takes the level at least as large as
    the requested output (``size`` on the longer side), i.e. 2 ** -ceil(log2(scale))."""
    scale = min(size / width, size / height)
    if scale >= 1:
        return 1
    return 2 ** -int(math.ceil(round(math.log2(scale), 4)))


def frame(size: int, rng: np.random.Generator) -> np.ndarray:
    plane = rng.integers(100, 4000, size=(size, size), dtype=np.uint16)
    plane[1, 1], plane[3, 5], plane[2, 2], plane[4, 4] = 7, 65000, 50, 60000
    return plane


def app_min_max(path: Path) -> tuple[float, float]:
    import large_image

    source = large_image.open(str(path))
    entry = source.histogram(frame=0, **APP_OPTIONS)["histogram"][0]
    return entry["min"], entry["max"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 4096, 5000])
    parser.add_argument("--no-transcode", action="store_true", help="skip large_image_converter (slow)")
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for size in args.sizes:
            planes = np.stack([frame(size, rng), frame(size, rng)])
            plain = folder / f"plain{size}.tif"
            tifffile.imwrite(plain, planes, photometric="minisblack")
            multi = folder / f"multi{size}.json"  # as MultiSourceConfiguration.vue writes it for one file
            multi.write_text(json.dumps({"channels": ["A", "B"], "sources": [
                {"path": plain.name, "framesAsAxes": {"c": 1}, "cValues": [0]}], "uniformSources": True,
                "singleBand": False}))
            stores = {"plain TIFF": plain, "multi-source": multi}
            if not args.no_transcode:
                import large_image_converter

                transcoded = folder / f"transcoded{size}.tiff"
                large_image_converter.convert(str(plain), str(transcoded))
                stores["transcoded"] = transcoded
            plane = planes[0]
            f = reduction(size, size)
            crop = plane[:size - size % f, :size - size % f]
            means = crop.reshape(crop.shape[0] // f, f, crop.shape[1] // f, f).mean(axis=(1, 3))
            for name, path in stores.items():
                low, high = app_min_max(path)
                print(f"{size} px, {name}: histogram min/max {low:g}/{high:g}; full frame "
                      f"{plane.min()}/{plane.max()}; [::{f}, ::{f}] {plane[::f, ::f].min()}/{plane[::f, ::f].max()}; "
                      f"{f}x{f} means {means.min():g}/{means.max():g}", flush=True)


if __name__ == "__main__":
    main()
