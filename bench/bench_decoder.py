"""Mask decoder throughput on the CPU by object size: today's FastBoxDecoder, the windowed one.

Run from the repository root (after ``make venv``)::

    .venv/bin/python bench/bench_decoder.py                 # tiny and small, six sizes (~4 min)
    .venv/bin/python bench/bench_decoder.py --quick         # a smoke run

One process; for each SAM2.1 model (random weights: the decoder's speed does not depend on their
values) one embedded 1024 x 1024 image and, per object size, the same box prompts (``--prompts``
boxes of that size in the 1024 px model input, at random places) for every decoder:

- **before**: FastBoxDecoder as it was before window-local decoding (the module at
  ``--baseline``, read from git), whole 256 x 256 grid, single mask;
- **box (sam2's rule)**: the windowed decoder as the engine calls it for Box prompts: each
  prompt's logits only in the engine's first window (the box plus its margin), the
  dynamic-multimask rule counted over the whole grid as sam2 does;
- **box (rule near the box)**: the same, the rule counted in the box's neighbourhood
  (``Sam2BoxPredictor(local_statistics=True)``; not sam2's rule, not used in jobs);
- **three masks**: the windowed decoder's three-mask output (no whole-grid statistic);
- **best of three**: three masks with each mask's whole-grid area (what the engine's Best of
  three needs).

Each decoder call of a size is timed ``--repeats`` times, interleaved, after a warm-up; the table
gives prompts per second from the median, and each windowed variant's speed-up over
**before**; also the largest logit difference to sam2's own decoder inside the windows, and
sam2's own decoder's throughput (whole grid; its cost does not depend on the object size).
The prompt encoder, shared by all, is left out. Prints a table and writes JSON to
bench/results/decoder.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine_info import cpu_name  # noqa: E402
from sam2_refine.model.fast_decoder import FastBoxDecoder  # noqa: E402
from sam2_refine.engine.geometry import Window  # noqa: E402
from sam2_refine.model.logits import cells_for_windows  # noqa: E402
from sam2_refine.engine.objects import first_margin  # noqa: E402
from sam2_refine.model.sam2_model import DeviceChoice, Sam2BoxPredictor, neighbourhood_cells  # noqa: E402
from sam2_refine.testing.checkpoints import make_untrained_checkpoint  # noqa: E402

#: The last commit before window-local decoding: its FastBoxDecoder is "before".
BASELINE = "9066776"
MODELS = {"tiny": "sam2.1_hiera_tiny.pt", "small": "sam2.1_hiera_small.pt"}
SIZE = 1024
GRID = 256
VARIANTS = ("before", "box (sam2's rule)", "box (rule near the box)", "three masks", "best of three")


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def baseline_decoder(revision: str) -> type:
    """FastBoxDecoder as it was at ``revision`` (from git)."""
    for path in ("sam2_refine/model/fast_decoder.py", "sam2_refine/fast_decoder.py"):  # (moved in issue 24)
        shown = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:{path}"], capture_output=True, text=True)
        if shown.returncode == 0:
            break
    shown.check_returncode()
    module = types.ModuleType("fast_decoder_baseline")
    sys.modules[module.__name__] = module
    exec(compile(shown.stdout, f"{revision}:{path}", "exec"), module.__dict__)  # noqa: S102
    return module.FastBoxDecoder


def prompts(rng: np.random.Generator, count: int, size: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes of ``size`` px at random places of the 1024 px input; the engine's first window of
    each (grid cells) and the box's neighbourhood (where the local rule counts)."""
    x0, y0 = rng.uniform(0, SIZE - 1 - size, (2, count))
    boxes = np.stack([x0, y0, x0 + size, y0 + size], 1)
    region = Window(0, 0, SIZE, SIZE)
    pixels = []
    for box in boxes:
        win = Window.around(box, first_margin(box, region, (GRID, GRID)), region)
        pixels.append([win.top, win.left, win.bottom, win.right])
    cells = cells_for_windows(np.array(pixels), (GRID, GRID), (SIZE, SIZE))
    return boxes, cells, neighbourhood_cells(boxes, (SIZE, SIZE), (GRID, GRID))


def measure_model(name: str, sizes: list[int], count: int, repeats: int, before_cls: type | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_untrained_checkpoint(Path(tmp) / MODELS[name], MODELS[name], seed=0)
        predictor, _ = Sam2BoxPredictor.load(checkpoint, DeviceChoice("cpu", False, False))
    model = predictor.model
    rng = np.random.default_rng(0)
    predictor.embed(rng.random((SIZE, SIZE, 3), dtype=np.float32))
    features = predictor._predictor._features  # what Sam2BoxPredictor.decode feeds the decoder
    embed, high_res = features["image_embed"], list(features["high_res_feats"])
    penc, dec = model.sam_prompt_encoder, model.sam_mask_decoder
    fast = FastBoxDecoder(model)
    before = before_cls(model) if before_cls is not None else None
    with torch.inference_mode():
        for decoder in (fast, before):
            if decoder is not None:
                decoder.set_image_features(embed, high_res)

    def sam2_decoder(sparse: torch.Tensor, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        dense = penc.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(len(sparse), -1, *penc.image_embedding_size)
        logits, iou, _, _ = dec(image_embeddings=embed, image_pe=penc.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=multimask, repeat_image=len(sparse) > 1,
                                high_res_features=high_res)
        return logits, iou

    rows = []
    sam2_rate = None
    for size in sizes:
        boxes, cells, near = prompts(rng, count, size)
        with torch.inference_mode():
            coords = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 2, 2)
            labels = torch.tensor([[2, 3]], dtype=torch.int).repeat(count, 1)
            sparse, _ = penc(points=(coords, labels), boxes=None, masks=None)
            calls = {
                "box (sam2's rule)": lambda s=sparse, c=cells: fast.decode_windows(s, c, False),
                "box (rule near the box)": lambda s=sparse, c=cells, nb=near: fast.decode_windows(
                    s, c, False, statistics=nb),
                "three masks": lambda s=sparse, c=cells: fast.decode_windows(s, c, True),
                "best of three": lambda s=sparse, c=cells: fast.decode_windows(s, c, True, areas=True),
            }
            if before is not None:
                calls = {"before": lambda s=sparse: before(s, False), **calls}
            # correctness first (untimed): the windows against sam2's own decoder
            diffs = {}
            for multimask in (False, True):
                ref = sam2_decoder(sparse, multimask)[0]
                got = fast.decode_windows(sparse, cells, multimask)
                diffs["three masks" if multimask else "single mask"] = max(
                    float((got.logits[k] - ref[k, :, t:b, lf:r]).abs().max())
                    for k, (t, lf, b, r) in enumerate(got.windows))
            if sam2_rate is None:  # sam2's decoder: the whole grid whatever the size, timed once
                sam2_decoder(sparse, False)
                started = time.perf_counter()
                for _ in range(2):
                    sam2_decoder(sparse, False)
                sam2_rate = 2 * count / (time.perf_counter() - started)
            for call in calls.values():  # warm-up
                call()
            times: dict[str, list[float]] = {key: [] for key in calls}
            for _ in range(repeats):  # interleaved, so that other load hits all alike
                for key, call in calls.items():
                    started = time.perf_counter()
                    call()
                    times[key].append(time.perf_counter() - started)
        rate = {key: count / float(np.median(v)) for key, v in times.items()}
        best = {key: count / float(np.min(v)) for key, v in times.items()}
        row = {"model": name, "size": size, "prompts": count, "rate": rate, "rate_best": best,
               "seconds": times, "max_abs_logit_diff": diffs,
               "window_cells_mean": float(np.mean((cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1])))}
        if "before" in rate:
            row["speedup"] = {key: rate[key] / rate["before"] for key in rate if key != "before"}
        rows.append(row)
        print(f"{name} {size:4d} px: " + ", ".join(f"{k} {v:6.1f}/s" for k, v in rate.items()), flush=True)
    return {"model": name, "sam2_prompts_per_s": sam2_rate, "rows": rows}


def table(results: list[dict]) -> str:
    head = ("| model | object (px in the 1024 input) | before (prompts/s) | box, sam2's rule | "
            "box, rule near the box | three masks | best of three | max logit diff to sam2 |")
    lines = [head, "|" + "---|" * 8]
    for result in results:
        for row in result["rows"]:
            rate, speed = row["rate"], row.get("speedup", {})

            def cell(key: str, rate: dict = rate, speed: dict = speed) -> str:
                return f"{rate[key]:.0f}" + (f" ({speed[key]:.2f}x)" if key in speed else "")

            diff = max(row["max_abs_logit_diff"].values())
            lines.append(f"| {row['model']} | {row['size']} | {rate['before']:.0f} | {cell(VARIANTS[1])} | "
                         f"{cell(VARIANTS[2])} | {cell(VARIANTS[3])} | {cell(VARIANTS[4])} | {diff:.1e} |"
                         if "before" in rate else
                         f"| {row['model']} | {row['size']} | - | {cell(VARIANTS[1])} | {cell(VARIANTS[2])} | "
                         f"{cell(VARIANTS[3])} | {cell(VARIANTS[4])} | {diff:.1e} |")
    sam2 = ", ".join(f"{r['model']} {r['sam2_prompts_per_s']:.1f}" for r in results)
    return "\n".join(lines) + f"\n\nsam2's own decoder (whole grid, any size), prompts/s: {sam2}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", default="tiny,small", help="comma-separated: tiny, small")
    parser.add_argument("--sizes", default="16,32,64,128,200,400", help="object sizes, px in the 1024 input")
    parser.add_argument("--prompts", type=int, default=32, help="prompts per decoder call")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per decoder and size")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the 'before' FastBoxDecoder")
    parser.add_argument("--quick", action="store_true", help="tiny, two sizes, 8 prompts, 2 repeats")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "decoder.json")
    args = parser.parse_args()
    models = ["tiny"] if args.quick else args.models.split(",")
    sizes = [32, 200] if args.quick else [int(s) for s in args.sizes.split(",")]
    count, repeats = (8, 2) if args.quick else (args.prompts, max(1, args.repeats))
    torch.set_num_threads(args.threads)
    try:
        before_cls = baseline_decoder(args.baseline)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"no baseline ({type(exc).__name__}): git revision {args.baseline} unavailable", flush=True)
        before_cls = None
    load_before = load_average()
    results = [measure_model(name, sizes, count, repeats, before_cls) for name in models]
    load_after = load_average()
    print()
    print(table(results))
    print(f"\nload average before/after: {load_before} / {load_after} on {os.cpu_count()} CPUs")
    out = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": cpu_name(), "cpu_count": os.cpu_count(), "repeats": repeats, "baseline": args.baseline,
           "load_average_before": load_before, "load_average_after": load_after, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")


if __name__ == "__main__":
    main()
