"""The check's own virtual environment: Girder 5, NimbusImage's plugin, large_image; cached.

Separate from the worker's environment. It is made once and kept (default
``~/.cache/sam2-refine/real-server-check/venv``); a stamp file records what it was made from,
and it is made again when that changes (another checkout path, Girder version, Python, or this
plan). Packages from the checkouts are installed editable, so changes to those checkouts are
seen without reinstalling.

What NimbusImage's ``devops/girder/Dockerfile`` installs, and what is installed here:

- ``girder`` from the package index (version ``--girder-version``; the plugin asks for ``girder>5``);
- the AnnotationPlugin from the NimbusImage checkout (its own requirements: girder-worker,
  girder-jobs, ...);
- from the large_image checkout (``girder-5`` branch): large_image, the tile sources named in its
  ``requirements-dev.txt`` that install from the package index (:data:`SOURCES`), the converter
  and the tasks (the transcoding job the app starts), girder_large_image;
- ``pyvips`` (for ``encoding=TILED`` and the converter), with ``pyvips-binary`` when no libvips
  is installed;
- ``mongomock-ng``, the in-process database substitute.

Not installed: the sources that need binaries from large_image's own wheel index, Java or
system libraries (:data:`SKIPPED`), the ``girder-claude-chat`` plugin, and the web clients
(npm builds): none of them is on the worker's path.
"""

from __future__ import annotations

import ctypes.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

#: Bump when the install plan changes, so cached environments are made again.
PLAN_VERSION = 3
#: Tile sources installed from the large_image checkout (those a TIFF dataset can use and that
#: install from the package index).
SOURCES = ("tiff", "tifffile", "ometiff", "multi", "pil", "vips", "test", "dummy", "deepzoom", "zarr")
#: Sources of the Dockerfile's requirements-dev.txt not installed, and why.
SKIPPED = {
    "bioformats": "needs Java",
    "gdal": "needs GDAL's Python bindings from large_image's wheel index",
    "mapnik": "needs mapnik from large_image's wheel index",
    "openjpeg": "needs the OpenJPEG library (glymur)",
    "openslide": "needs OpenSlide",
    "nd2": "Nikon files only",
    "dicom": "DICOM files only",
    "rasterio": "geospatial files only",
}
SUBSTITUTE_PACKAGE = "mongomock-ng"


def default_location() -> Path:
    import os

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "sam2-refine" / "real-server-check" / "venv"


def python_in(venv: Path) -> Path:
    return venv / "bin" / "python"


def sources_in(large_image: Path) -> list[str]:
    """The tile sources ``requirements-dev.txt`` of the checkout names (``-e sources/NAME``)."""
    text = (large_image / "requirements-dev.txt").read_text()
    return re.findall(r"^-e sources/([A-Za-z0-9_]+)", text, flags=re.MULTILINE)


def install_plan(nimbus: Path, large_image: Path, girder_version: str, have_libvips: bool) -> list[list[str]]:
    """The ``pip install`` argument lists, in order (pure)."""
    plugin = nimbus / "devops" / "girder" / "plugins" / "AnnotationPlugin"
    wanted = [s for s in sources_in(large_image) if s in SOURCES]
    large = ["-e", str(large_image)]
    for name in wanted:
        large += ["-e", str(large_image / "sources" / name)]
    utilities = large_image / "utilities"
    large += ["-e", str(utilities / "converter"), "-e", f"{utilities / 'tasks'}[girder]",
              "-e", str(large_image / "girder")]
    return [
        ["--upgrade", "pip"],
        [f"girder=={girder_version}", "-e", str(plugin)],
        large + ["pyvips"] + ([] if have_libvips else ["pyvips-binary"]),
        [SUBSTITUTE_PACKAGE],
    ]


def stamp_for(nimbus: Path, large_image: Path, girder_version: str, python: str) -> dict[str, object]:
    return {"plan": PLAN_VERSION, "nimbus": str(nimbus.resolve()), "large_image": str(large_image.resolve()),
            "girder": girder_version, "python": python}


def ensure(venv: Path, nimbus: Path, large_image: Path, girder_version: str, python: str,
           say: Callable[[str], None]) -> Path:
    """Make (or reuse) the environment; returns its python."""
    stamp_path = venv / "check-venv.json"
    stamp = stamp_for(nimbus, large_image, girder_version, python)
    if stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp and python_in(venv).exists():
        say(f"check environment: {venv} (cached; made from the same checkouts)")
        return python_in(venv)
    if venv.exists():
        say(f"check environment: {venv} was made from something else; making it again")
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    say(f"check environment: making {venv} with {python} (a few minutes, once)")
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    have_libvips = ctypes.util.find_library("vips") is not None
    log = venv / "install.log"
    for args in install_plan(nimbus, large_image, girder_version, have_libvips):
        say("pip install " + " ".join(args))
        with log.open("a") as out:
            done = subprocess.run([str(python_in(venv)), "-m", "pip", "install", *args], stdout=out,
                                  stderr=subprocess.STDOUT)
        if done.returncode != 0:
            tail = log.read_text().splitlines()[-15:]
            raise RuntimeError("pip install failed (log: %s):\n%s" % (log, "\n".join(tail)))
    stamp_path.write_text(json.dumps(stamp, indent=1))
    return python_in(venv)


def versions(venv_python: Path) -> dict[str, str]:
    """Installed versions of the packages that matter, read in the environment."""
    code = ("import json, importlib.metadata as m\n"
            "names = ['girder', 'upenncontrast_annotation', 'large-image', 'girder-large-image', "
            "'large-image-source-tiff', 'large-image-source-multi', 'large-image-converter', 'pyvips', "
            "'pyvips-binary', 'mongomock-ng', 'pymongo', 'uvicorn']\n"
            "out = {}\n"
            "for n in names:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: pass\n"
            "try:\n"
            "    import pyvips; out['libvips'] = '%d.%d.%d' % tuple(pyvips.version(i) for i in range(3))\n"
            "except Exception as e: out['libvips'] = 'unavailable: ' + type(e).__name__\n"
            "print(json.dumps(out))\n")
    done = subprocess.run([str(venv_python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def git_commit(path: Path) -> str:
    """The checkout's commit, or a plain statement that it is not a git checkout."""
    done = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    if done.returncode != 0:
        return "not a git checkout (commit unknown)"
    status = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True)
    changed = len(status.stdout.splitlines())
    return done.stdout.strip() + (f" with {changed} changed file(s) not committed" if changed else "")


def default_python() -> str:
    """Python 3.11 as NimbusImage's Dockerfile uses, else this interpreter."""
    return shutil.which("python3.11") or sys.executable
