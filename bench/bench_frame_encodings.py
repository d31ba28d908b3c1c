"""Frame encodings side by side: pickle:5 (the worker's first choice), TILED and TIFF.

Fetches one frame through the local test server (a double of large_image's region endpoint:
the same encodings, byte for byte the same kind of body) with the worker's own client, which
decodes and checks it, and times each encoding, interleaved, over several rounds.

    python bench/bench_frame_encodings.py [--size 4096] [--rounds 5]

Prints per encoding: the median wall time of ``NimbusClient.get_frame`` (request, transfer on
loopback, decoding), the bytes on the wire, whether the frame arrived exactly, and the time
relative to pickle:5. The server's own encoding time is included (a real server's differs:
pyvips writes TILED to a temporary file; pickling is a memory copy).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from machine_info import cpu_name
from sam2_refine.nimbus.errors import DegradedFrameError
from sam2_refine.nimbus.client import NimbusClient
from sam2_refine.testing.large_image_double import encode_region
from sam2_refine.testing.nimbus_server import NimbusTestServer

TOKEN = "bench-token"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="frame width and height (px)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    frame = rng.integers(0, 4096, size=(1, 1, 1, 1, args.size, args.size), dtype=np.uint16)  # 12-bit camera
    results: dict[str, list[float]] = {"pickle:5": [], "TILED": [], "TIFF": []}
    sizes: dict[str, int] = {}
    exact: dict[str, bool] = {}
    with NimbusTestServer(token=TOKEN) as server:
        ds = server.add_dataset(frame)
        with NimbusClient(server.api_url, TOKEN) as client:
            info = client.get_dataset_info(ds.dataset_id)
            for _ in range(args.rounds):
                for encoding in results:
                    client._frame_encodings = (encoding,)  # one encoding at a time
                    started = time.perf_counter()
                    try:
                        got = client.get_frame(info.item_id, 0, expected=info.frame_spec())
                        exact[encoding] = bool(np.array_equal(got, frame[0, 0, 0, 0]))
                    except DegradedFrameError:
                        exact[encoding] = False
                    results[encoding].append(time.perf_counter() - started)
    for encoding in results:  # the bodies' sizes, encoded again outside the timing
        sizes[encoding] = len(encode_region(frame[0, 0, 0, 0], encoding, "none")[0])
    print(f"frame {args.size} x {args.size} uint16 ({frame[0, 0, 0, 0].nbytes / 2**20:.0f} MiB), "
          f"{args.rounds} rounds interleaved, {cpu_name()}, {platform.python_version()}")
    base = statistics.median(results["pickle:5"])
    print("| encoding | median s | bytes on the wire | exact | time vs pickle:5 |")
    print("|---|---|---|---|---|")
    for encoding, times in results.items():
        median = statistics.median(times)
        print(f"| {encoding} | {median:.3f} | {sizes[encoding] / 2**20:.1f} MiB | "
              f"{'yes' if exact[encoding] else 'no (refused as degraded)'} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
