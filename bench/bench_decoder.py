"""Mask decoder throughput on the CPU: sam2's own decoder against FastBoxDecoder.

Run from the repository root (after ``make venv``)::

    .venv/bin/python bench/bench_decoder.py               # batch sizes 1, 16, 64 (a few minutes)
    .venv/bin/python bench/bench_decoder.py --quick       # a smoke run

One process, one SAM2.1 tiny model with random weights (the decoder's speed does not depend
on their values), one embedded image, the same box prompts for both decoders. For each batch
size it times one decoder call of each, interleaved, ``--repeats`` times after a warm-up, and
reports prompts per second from the median (also the minimum, less disturbed by other
processes), the speed ratio, and the largest differences in logits and IoU predictions
between the two (single-mask output, the dynamic-multimask rule active, and the three-mask
output). sam2's decoder is called exactly as :mod:`sam2_refine.sam2_model` calls it
(``repeat_image`` for more than one prompt). The prompt encoder, shared by both, is left out.

Prints a table and writes JSON to bench/results/decoder.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sam2_refine.fast_decoder import FastBoxDecoder  # noqa: E402
from sam2_refine.sam2_model import DeviceChoice, Sam2BoxPredictor  # noqa: E402
from sam2_refine.testing.checkpoints import make_untrained_checkpoint  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per decoder and batch")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="batches 1,4 and 2 repeats")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "decoder.json")
    args = parser.parse_args()
    batches = [1, 4] if args.quick else [int(b) for b in args.batches.split(",")]
    repeats = 2 if args.quick else max(1, args.repeats)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_untrained_checkpoint(Path(tmp) / "sam2.1_hiera_tiny.pt", seed=0)
        predictor, _ = Sam2BoxPredictor.load(checkpoint, DeviceChoice("cpu", False, False))
    model = predictor.model
    rng = np.random.default_rng(0)
    predictor.embed(rng.random((768, 1024, 3), dtype=np.float32))
    features = predictor._predictor._features  # what Sam2BoxPredictor.decode feeds the decoder
    embed, high_res = features["image_embed"], list(features["high_res_feats"])
    penc, dec = model.sam_prompt_encoder, model.sam_mask_decoder
    fast = FastBoxDecoder(model)
    with torch.inference_mode():
        fast.set_image_features(embed, high_res)  # once per image, as Sam2BoxPredictor.embed does
        t0 = time.perf_counter()
        for _ in range(5):
            fast.set_image_features(embed, high_res)
        per_image_ms = (time.perf_counter() - t0) / 5 * 1000

    def sam2_decoder(sparse: torch.Tensor, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        dense = penc.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            len(sparse), -1, *penc.image_embedding_size)
        logits, iou, _, _ = dec(image_embeddings=embed, image_pe=penc.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=multimask, repeat_image=len(sparse) > 1,
                                high_res_features=high_res)
        return logits, iou

    rows = []
    load_before = load_average()
    for batch in batches:
        x0, y0 = rng.uniform(0, 700, (2, batch))
        w, h = rng.uniform(30, 600, (2, batch))
        boxes = np.stack([x0, y0, np.minimum(x0 + w, 1023), np.minimum(y0 + h, 1023)], 1)
        with torch.inference_mode():
            coords = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 2, 2)
            labels = torch.tensor([[2, 3]], dtype=torch.int).repeat(batch, 1)
            sparse, _ = penc(points=(coords, labels), boxes=None, masks=None)
            diffs = {}
            for multimask in (False, True):
                ref, got = sam2_decoder(sparse, multimask), fast(sparse, multimask)
                key = "multimask" if multimask else "single"
                diffs[key] = {"max_abs_logit_diff": float((ref[0] - got[0]).abs().max()),
                              "max_abs_iou_diff": float((ref[1] - got[1]).abs().max()),
                              "max_abs_logit": float(ref[0].abs().max())}
            times: dict[str, list[float]] = {"sam2": [], "fast": []}
            calls = {"sam2": lambda s=sparse: sam2_decoder(s, False), "fast": lambda s=sparse: fast(s, False)}
            for _ in range(repeats):  # interleaved, so that other load hits both alike
                for name, call in calls.items():
                    start = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - start)
        med = {k: float(np.median(v)) for k, v in times.items()}
        best = {k: float(np.min(v)) for k, v in times.items()}
        row = {
            "batch": batch,
            "sam2_prompts_per_s": batch / med["sam2"], "fast_prompts_per_s": batch / med["fast"],
            "speedup": med["sam2"] / med["fast"],
            "sam2_prompts_per_s_best": batch / best["sam2"],
            "fast_prompts_per_s_best": batch / best["fast"],
            "speedup_best": best["sam2"] / best["fast"],
            "sam2_seconds": times["sam2"], "fast_seconds": times["fast"],
            "differences": diffs,
        }
        rows.append(row)
        print(f"batch {batch:3d}: sam2 {row['sam2_prompts_per_s']:7.2f} prompts/s, "
              f"fast {row['fast_prompts_per_s']:7.2f} prompts/s, x{row['speedup']:.2f}", flush=True)

    print()
    print(f"{'batch':>5} | {'sam2 prompts/s':>14} | {'fast prompts/s':>14} | {'speedup':>7} | "
          f"{'(best-of) speedup':>17} | {'max |dlogit|':>12} | {'max |diou|':>10}")
    for row in rows:
        worst_logit = max(d["max_abs_logit_diff"] for d in row["differences"].values())
        worst_iou = max(d["max_abs_iou_diff"] for d in row["differences"].values())
        print(f"{row['batch']:>5} | {row['sam2_prompts_per_s']:>14.2f} | {row['fast_prompts_per_s']:>14.2f} | "
              f"{row['speedup']:>6.2f}x | {row['speedup_best']:>16.2f}x | {worst_logit:>12.2e} | "
              f"{worst_iou:>10.2e}")
    print(f"\nFastBoxDecoder per-image precomputation: {per_image_ms:.1f} ms "
          f"(once per image, not in the table)")
    load_after = load_average()
    print(f"load average before/after: {load_before} / {load_after} on {os.cpu_count()} CPUs "
          f"(other processes slow both decoders)")

    result = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name(),
        "cpu_count": os.cpu_count(), "repeats": repeats, "model": "sam2.1_hiera_tiny (random weights)",
        "fast_per_image_ms": per_image_ms, "load_average_before": load_before,
        "load_average_after": load_after, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")


if __name__ == "__main__":
    main()
