"""How long recognising a checkpoint takes: the interface request's cost per file.

Builds SAM2.1 large with random weights (sam2's own ``build_sam2``), saves it as sam2 saves a
checkpoint (``{"model": state_dict}``, 898 MB) in a temporary directory, and times, side by side:

- ``read_layout`` + ``recognise`` (what the interface request does per file: zip directory and
  ``data.pkl`` only), with the file's pages evicted from the page cache first (cold; like the
  first request after a container starts) and with them cached (warm);
- ``scan_models`` of the directory holding it (the whole interface-side work);
- ``--request interface`` end to end: the real ``entrypoint.py`` against the local test server,
  Python start-up included;
- for scale, what a compute job does with the same file: ``sha256`` of it (only when a sidecar
  gives one), ``torch.load(weights_only=True, mmap=True)``, and ``torch.load`` without mmap.

The file is deleted afterwards. ``python bench/bench_layout.py [--repeat 5]``; JSON in
``bench/results/layout.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from sam2_refine.model.architectures import recognise  # noqa: E402
from sam2_refine.model.checkpoint_layout import read_layout  # noqa: E402
from sam2_refine.model.checkpoints import file_sha256, scan_models  # noqa: E402
from sam2_refine.testing.nimbus_server import NimbusTestServer  # noqa: E402
from sam2_refine.testing.sam2_layouts import build_model  # noqa: E402

TOKEN = "bench-token"


def evict(path: Path) -> bool:
    """Drop the file's pages from the page cache (no root needed for one's own clean pages)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def timed(fn, repeat: int, cold_path: Path | None = None) -> list[float]:
    times = []
    for _ in range(repeat):
        if cold_path is not None:
            evict(cold_path)
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def interface_request(directory: Path) -> None:
    with NimbusTestServer(token=TOKEN) as server:
        env = {**os.environ, "SAM2_CHECKPOINT_DIR": str(directory),
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run([sys.executable, str(REPO / "entrypoint.py"), "--apiUrl", server.api_url,
                               "--token", TOKEN, "--request", "interface", "--parameters", '{"image": "x"}'],
                              env=env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0 or not server.interface("x")["Model"]["items"]:
            raise RuntimeError(f"interface request failed: {done.stdout} {done.stderr}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "layout.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-layout-", dir="/tmp") as tmp:
        directory = Path(tmp)
        path = directory / "lab_large_ft.pt"
        torch.manual_seed(0)
        model = build_model("sam2.1_hiera_l")
        torch.save({"model": model.state_dict()}, path)
        del model
        size_mb = path.stat().st_size / 1e6
        layout = read_layout(path)
        arch = recognise(layout).architecture
        print(f"{path.name}: {size_mb:.0f} MB, {layout.tensors} tensors, recognised as {arch.label} ({arch.key})")

        def layout_read() -> None:
            recognise(read_layout(path))

        rows = {
            "layout + recognise, cold cache": timed(layout_read, args.repeat, cold_path=path),
            "layout + recognise, warm cache": timed(layout_read, args.repeat),
            "scan_models of the directory (warm)": timed(lambda: scan_models(directory), args.repeat),
            "--request interface end to end (process start included)":
                timed(lambda: interface_request(directory), max(1, args.repeat // 2)),
            "sha256 of the file (compute, sidecar with sha256; warm)":
                timed(lambda: file_sha256(path), max(1, args.repeat // 2)),
            "torch.load(weights_only=True, mmap=True) (compute; warm)":
                timed(lambda: torch.load(path, map_location="cpu", weights_only=True, mmap=True),
                      max(1, args.repeat // 2)),
            "torch.load(weights_only=True), no mmap (warm)":
                timed(lambda: torch.load(path, map_location="cpu", weights_only=True), max(1, args.repeat // 2)),
        }
    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"a {size_mb:.0f} MB SAM2.1 large checkpoint; median of the runs (min-max)\n")
    print("| step | seconds |\n|---|---|")
    for name, times in rows.items():
        print(f"| {name} | {statistics.median(times):.3f} ({min(times):.3f}-{max(times):.3f}, n={len(times)}) |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
                                    "cpus": os.cpu_count(), "size_mb": round(size_mb, 1), "seconds": rows},
                                   indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
