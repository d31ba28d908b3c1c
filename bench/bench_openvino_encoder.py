"""Is OpenVINO worth it for SAM2's image encoder on the CPU? Conversion cost, speed, agreement.

OpenVINO is not a dependency of the worker. Measure it without touching the worker's
environment, e.g. with packages installed beside it::

    .venv/bin/python -m pip install --target /tmp/ovpkgs --no-deps openvino openvino-telemetry
    PYTHONPATH=/tmp/ovpkgs .venv/bin/python bench/bench_openvino_encoder.py

For each model (SAM2.1 tiny, small, base+; random weights: speed does not depend on their
values) it measures:

- the conversion, once per model: ``openvino.convert_model`` of the image encoder (traced from
  torch), ``openvino.save_model`` (what an image build would do), and, per job, reading the
  saved model and compiling it for the CPU (``Core.compile_model``, default precision hint:
  bfloat16 where the CPU has the units), without and with OpenVINO's compiled-model cache;
- the encoder's time on one 1024 x 1024 input: torch float32, torch bfloat16 autocast with a
  channels-last input (what a job runs on a CPU with bfloat16 units), and OpenVINO, alternating
  call by call after a warm-up; medians and fastest of ``--rounds``;
- agreement with torch float32 through the project's decoder (``FastBoxDecoder``): logit sign
  agreement and mask IoU of 56 boxes on ``examples/nuclei`` (random weights: a numerics check),
  for torch bfloat16 and for OpenVINO.

JSON in ``bench/results/openvino_encoder.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_encoder_precision import (FP32, LABELS, chosen_bf16, grid_agreement, load_average,  # noqa: E402
                                     machine, model_for, scenes)

from sam2_refine.model.sam2_model import Sam2BoxPredictor  # noqa: E402


class _Outputs(torch.nn.Module):
    """The image encoder with its outputs as a flat tuple (what OpenVINO converts)."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.encoder(x)
        return (*out["backbone_fpn"], *out["vision_pos_enc"])


class OpenVinoEncoder(torch.nn.Module):
    """Stands in for ``model.image_encoder``: runs the compiled OpenVINO model, answers as sam2's
    encoder does (float32 torch tensors)."""

    def __init__(self, compiled: Any, levels: int) -> None:
        super().__init__()
        self.compiled, self.levels = compiled, levels

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        result = self.compiled(x.contiguous().numpy())
        outs = [torch.from_numpy(np.asarray(result[i], dtype=np.float32)) for i in range(2 * self.levels)]
        fpn, pos = outs[:self.levels], outs[self.levels:]
        return {"vision_features": fpn[-1], "vision_pos_enc": pos, "backbone_fpn": fpn}


def _core(threads: int | None) -> Any:
    import openvino as ov

    core = ov.Core()
    if threads:
        core.set_property("CPU", {"INFERENCE_NUM_THREADS": threads})
    return core


def convert(model: torch.nn.Module, directory: Path, threads: int | None = None) -> tuple[Any, dict[str, float], int]:
    """(compiled model, seconds of each step, feature levels)."""
    import openvino as ov

    wrapper = _Outputs(model.image_encoder).eval()
    example = torch.zeros(1, 3, model.image_size, model.image_size)
    with torch.inference_mode():
        levels = len(model.image_encoder(example)["backbone_fpn"])
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    with torch.no_grad():
        converted = ov.convert_model(wrapper, example_input=example)
    seconds["convert_model"] = time.perf_counter() - started
    path = directory / "encoder.xml"
    started = time.perf_counter()
    ov.save_model(converted, path)
    seconds["save_model"] = time.perf_counter() - started
    core = _core(threads)
    started = time.perf_counter()
    compiled = core.compile_model(core.read_model(path), "CPU")
    seconds["read_and_compile"] = time.perf_counter() - started
    cached = _core(threads)
    cached.set_property({"CACHE_DIR": str(directory / "cache")})
    cached.compile_model(cached.read_model(path), "CPU")  # fills the cache
    cached = _core(threads)
    cached.set_property({"CACHE_DIR": str(directory / "cache")})
    started = time.perf_counter()
    cached.compile_model(path, "CPU")
    seconds["read_and_compile_cached"] = time.perf_counter() - started
    seconds["precision_hint"] = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    return compiled, seconds, levels


class Swapped:
    """Runs calls with ``model.image_encoder`` replaced by ``encoder`` (the float32 path of
    ``Sam2BoxPredictor.embed`` calls ``model.image_encoder`` through sam2's ``forward_image``)."""

    def __init__(self, model: torch.nn.Module, encoder: torch.nn.Module) -> None:
        self.model, self.encoder = model, encoder

    def __call__(self, call: Any) -> Any:
        original = self.model.image_encoder
        self.model.image_encoder = self.encoder
        try:
            return call()
        finally:
            self.model.image_encoder = original


def measure_model(key: str, directory: Path, work: Path, rounds: int, image: np.ndarray, frame: np.ndarray,
                  boxes: np.ndarray, threads: int | None = None) -> dict[str, Any]:
    _, model = model_for(key, directory)
    compiled, seconds, levels = convert(model, work / key, threads)
    fp32, bf16 = Sam2BoxPredictor(model, FP32), Sam2BoxPredictor(model, chosen_bf16())
    with_openvino = Swapped(model, OpenVinoEncoder(compiled, levels))
    variants = {"torch fp32": lambda: fp32.embed(image), "torch bf16 + channels_last": lambda: bf16.embed(image),
                "OpenVINO": lambda: with_openvino(lambda: fp32.embed(image))}
    for call in variants.values():  # warm-up
        call()
    times: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(rounds):
        for label, call in variants.items():
            started = time.perf_counter()
            call()
            times[label].append(time.perf_counter() - started)
    # agreement with torch float32 through the fast decoder, on the nuclei frame
    fp32.embed(frame)
    reference = fp32.decode(boxes).logits
    bf16.embed(frame)
    low = bf16.decode(boxes).logits
    with_openvino(lambda: fp32.embed(frame))
    ov_logits = fp32.decode(boxes).logits  # the features stay the OpenVINO encoder's until the next embed
    agree = {label: {k: v for k, v in grid_agreement(reference, logits).items() if k != "iou"}
             for label, logits in (("torch bf16 + channels_last", low), ("OpenVINO", ov_logits))}
    base = statistics.median(times["torch fp32"])
    print(f"{LABELS[key]}: conversion {json.dumps(seconds)}", flush=True)
    for label, values in times.items():
        extra = agree.get(label, {})
        print(f"  {label}: median {statistics.median(values):.2f} s ({base / statistics.median(values):.2f}x "
              f"fp32), fastest {min(values):.2f} s" + (
                  f"; sign agreement {extra['sign_agreement']:.5f}, mask IoU mean {extra['iou_mean']:.4f} "
                  f"min {extra['iou_min']:.4f}" if extra else ""), flush=True)
    return {"conversion_s": seconds, "times": times, "agreement": agree}


def main(argv: list[str] | None = None) -> int:
    from sam2_refine.engine.geometry import polygon_from_ring, prompt_box, ring_from_coordinates

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,small,base_plus")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--checkpoints", type=Path)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "openvino_encoder.json")
    parser.add_argument("--threads", type=int, help="torch's and OpenVINO's threads (default: one per core)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import openvino as ov
    except ImportError:
        print("openvino is not installed (see this script's docstring); nothing was measured")
        return 1
    result: dict[str, Any] = {"meta": {**machine(), "openvino": ov.__version__, "load_before": load_average()},
                              "models": {}}
    print(json.dumps(result["meta"]), flush=True)
    image = np.random.default_rng(0).random((1024, 1024, 3), dtype=np.float32)
    frame, docs = next(iter(scenes().values()))
    boxes = np.stack([prompt_box(polygon_from_ring(ring_from_coordinates(d["coordinates"])), 512, 512)
                      for d in docs])
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.checkpoints or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        for key in args.models.split(","):
            result["models"][key] = measure_model(key, directory, Path(tmp), args.rounds, image, frame, boxes,
                                                  args.threads)
    result["meta"]["load_after"] = load_average()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
