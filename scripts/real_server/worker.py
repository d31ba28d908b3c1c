"""Runs the worker's own ``entrypoint.py`` as NimbusImage does (a subprocess with
``--apiUrl --token --request --parameters [--datasetId]``), in the worker's Python, with:

- a request recorder (:mod:`real_server.recorder`): every request of the worker's own
  ``NimbusClient`` is written down (method, endpoint, the parameters that choose what is read, a
  summary of the body and of the answer or failure; never a header) in a JSON-lines file, so
  that the check sees which reads a job made and whether each succeeded;
- a frame recorder: ``NimbusClient.get_frame`` is wrapped so that every frame the worker's own
  client hands to the job is written down (frame, window, dtype, shape, sha256, range) in a
  JSON-lines file, then returned unchanged; the check compares them with the source image;
- where no trained SAM2 checkpoint is given, the STAND-IN SEGMENTER, NOT SAM2
  (``sam2_refine.testing.stand_in.ModelResolutionPredictor``, which thresholds the DAPI band
  of the merged image at the model's 1024 px input) swapped in for ``cli._load_sam2`` the way
  ``tests/test_faults.py`` does; the command line, settings, HTTP client, engine and exit code
  are the worker's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STAND_IN = "stand-in segmenter, not SAM2"
SCRIPTS = Path(__file__).resolve().parents[1]

#: Runs inside the worker's Python. argv: MODE (stand-in|sam2) ENTRYPOINT [worker arguments...].
LAUNCHER = r"""
import inspect, json, os, runpy, sys, threading, types
sys.path.append(os.environ["CHECK_SCRIPTS"])
from real_server.checks import digest
from real_server import recorder

mode, entrypoint, worker_argv = sys.argv[1], sys.argv[2], sys.argv[3:]
record_path = os.environ["CHECK_FRAMES"]
lock = threading.Lock()

requests_path = os.environ.get("CHECK_REQUESTS")
if requests_path:
    def write_request(entry):
        with open(requests_path, "a") as out:
            out.write(json.dumps(entry) + "\n")

    recorder.install(write_request)

from sam2_refine.nimbus import client as nimbus_client
original = nimbus_client.NimbusClient.get_frame
signature = inspect.signature(original)

def write(entry):
    with lock, open(record_path, "a") as out:
        out.write(json.dumps(entry) + "\n")

def get_frame(self, *args, **kwargs):
    bound = signature.bind(self, *args, **kwargs)
    bound.apply_defaults()
    values = list(bound.arguments.values())  # (self, item id, frame, window...) by position if renamed
    frame = bound.arguments.get("frame", values[2] if len(values) > 2 else None)
    window = bound.arguments.get("window", values[3] if len(values) > 3 else None)
    entry = {"frame": int(frame) if isinstance(frame, int) else -1,
             "window": [int(v) for v in window] if isinstance(window, (tuple, list)) else None}
    try:
        pixels = original(self, *args, **kwargs)
    except BaseException as exc:
        write({**entry, "error": f"{type(exc).__name__}: {exc}"})
        raise
    import numpy as np
    array = np.asarray(pixels)
    write({**entry, "dtype": str(array.dtype), "shape": list(array.shape), "sha256": digest(array),
           "min": int(array.min()) if array.size else None, "max": int(array.max()) if array.size else None})
    return pixels

nimbus_client.NimbusClient.get_frame = get_frame

if mode == "stand-in":
    class CheckpointError(RuntimeError):
        pass

    def _real(name):
        if name.startswith("__"):
            raise AttributeError(name)
        sys.modules.pop("sam2_refine.model.sam2_model", None)
        import importlib
        return getattr(importlib.import_module("sam2_refine.model.sam2_model"), name)

    fake = types.ModuleType("sam2_refine.model.sam2_model")
    fake.CheckpointError = CheckpointError
    fake.__getattr__ = _real
    sys.modules["sam2_refine.model.sam2_model"] = fake
    import sam2_refine.cli as cli
    if not hasattr(cli, "_load_sam2"):
        print(json.dumps({"error": "the check cannot swap in its stand-in: sam2_refine.cli has no _load_sam2"}))
        sys.exit(3)
    from sam2_refine.testing.stand_in import ModelResolutionPredictor

    def load(path):
        predictor = ModelResolutionPredictor(threshold=0.3, band=2)
        predictor.description = "STAND-IN SEGMENTER, NOT SAM2 (thresholds the DAPI band at 1024 px)"
        return predictor, False

    cli._load_sam2 = load

if mode == "probe":
    from sam2_refine.nimbus.client import NimbusClient
    api, item, frames = worker_argv[0], worker_argv[1], [int(f) for f in worker_argv[2].split(",")]
    with NimbusClient(api, os.environ["CHECK_TOKEN"]) as client:
        for frame in frames:
            try:
                client.get_frame(item, frame)
            except Exception:
                pass
    sys.exit(0)

sys.argv = [entrypoint, *worker_argv]
runpy.run_path(entrypoint, run_name="__main__")
"""


@dataclass
class Run:
    name: str
    returncode: int
    stdout: str
    stderr: str
    frames: list[dict[str, Any]]
    summary: dict[str, Any] | None
    seconds: float
    #: Every request the worker's client sent (:mod:`real_server.recorder` records).
    requests: list[dict[str, Any]] = field(default_factory=list)

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stdout.splitlines():
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                out.append(value)
        return out


@dataclass
class Worker:
    """The worker tree, its Python, and how it is run."""

    tree: Path
    python: Path
    checkpoints: Path
    mode: str  # "stand-in" or "sam2"
    workdir: Path

    def env(self, frames: Path, summary: Path | None, token: str | None = None,
            requests: Path | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SAM2_REFINE_") and not k.startswith("CHECK_")}
        env.update(PYTHONPATH=str(self.tree), PYTHONUNBUFFERED="1", SAM2_CHECKPOINT_DIR=str(self.checkpoints),
                   CHECK_SCRIPTS=str(SCRIPTS), CHECK_FRAMES=str(frames))
        if requests is not None:
            env["CHECK_REQUESTS"] = str(requests)
        if summary is not None:
            env["SAM2_REFINE_SUMMARY"] = str(summary)
        if token is not None:
            env["CHECK_TOKEN"] = token
        return env

    def start(self, name: str, argv: list[str], mode: str | None = None) -> tuple[subprocess.Popen, Path, Path]:
        frames = self.workdir / f"{name}.frames.jsonl"
        summary = self.workdir / f"{name}.summary.json"
        for path in (frames, summary, _requests_path(frames)):
            path.unlink(missing_ok=True)
        command = [str(self.python), "-c", LAUNCHER, mode or self.mode, str(self.tree / "entrypoint.py"), *argv]
        process = subprocess.Popen(command, cwd=self.tree, env=self.env(frames, summary, None, _requests_path(frames)),
                                   text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return process, frames, summary

    @staticmethod
    def finish(name: str, process: subprocess.Popen, frames: Path, summary: Path, started: float,
               workdir: Path) -> Run:
        import time

        stdout, stderr = process.communicate()
        (workdir / f"{name}.stdout.txt").write_text(stdout)
        (workdir / f"{name}.stderr.txt").write_text(stderr)
        records = _json_lines(frames)
        account = json.loads(summary.read_text()) if summary.exists() else None
        return Run(name, process.returncode, stdout, stderr, records, account, time.monotonic() - started,
                   _json_lines(_requests_path(frames)))

    def run_many(self, jobs: list[tuple[str, list[str]]]) -> list[Run]:
        """Start every job at once; wait for all."""
        import time

        started = time.monotonic()
        handles = [(name, *self.start(name, argv)) for name, argv in jobs]
        return [self.finish(name, process, frames, summary, started, self.workdir)
                for name, process, frames, summary in handles]

    def probe_frames(self, api_url: str, token: str, item_id: str, frames: list[int]) -> list[dict[str, Any]]:
        """Every frame fetched once by the worker's own ``NimbusClient.get_frame``."""
        record = self.workdir / "probe.frames.jsonl"
        record.unlink(missing_ok=True)
        command = [str(self.python), "-c", LAUNCHER, "probe", str(self.tree / "entrypoint.py"), api_url, item_id,
                   ",".join(str(f) for f in frames)]
        done = subprocess.run(command, cwd=self.tree, env=self.env(record, None, token), text=True,
                              capture_output=True)
        (self.workdir / "probe.stderr.txt").write_text(done.stderr)
        return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []

    def probe_reads(self, api_url: str, token: str, spec: dict[str, Any]) -> list[dict[str, Any]]:
        """The worker's own reads (``reads_probe.py``: ``NimbusClient`` and ``BatchReader``) called
        as ``spec`` says; each call's value or error and the requests it sent."""
        spec_path, out_path = self.workdir / "reads.spec.json", self.workdir / "reads.out.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        out_path.unlink(missing_ok=True)
        command = [str(self.python), str(SCRIPTS / "real_server" / "reads_probe.py"), api_url, str(spec_path),
                   str(out_path)]
        env = self.env(self.workdir / "reads.frames.jsonl", None, token)
        done = subprocess.run(command, cwd=self.tree, env=env, text=True, capture_output=True)
        (self.workdir / "reads.stderr.txt").write_text(done.stderr)
        if done.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"the reads probe failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")
        return json.loads(out_path.read_text())


def _requests_path(frames: Path) -> Path:
    return frames.with_name(frames.name.replace(".frames.jsonl", ".requests.jsonl"))


def _json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def compute_argv(api_url: str, token: str, dataset_id: str, parameters: dict[str, Any]) -> list[str]:
    return ["--apiUrl", api_url, "--token", token, "--request", "compute", "--parameters",
            json.dumps(parameters), "--datasetId", dataset_id]


def interface_argv(api_url: str, token: str, image: str) -> list[str]:
    return ["--apiUrl", api_url, "--token", token, "--request", "interface", "--parameters",
            json.dumps({"image": image})]


def tool_parameters(batch_xy: str, delete: bool, model: str) -> dict[str, Any]:
    """The compute parameters NimbusImage sends for a SAM2 Refiner tool (contract section 2)."""
    return {
        "type": "annotation", "name": "SAM2 Refiner", "image": "annotations/sam2_refine_worker:latest",
        "channel": 0, "tags": ["refined"], "tile": {"XY": 0, "Z": 0, "Time": 0},
        "assignment": {"XY": 0, "Z": 0, "Time": 0}, "connectTo": {"tags": [], "channel": None},
        "workerInterface": {"Batch XY": batch_xy, "Batch Z": "", "Batch Time": "",
                            "Tag of objects to refine": ["nucleus"], "Model": model,
                            "Delete original annotations": delete, "Padding": 0, "Smoothing": 0.7},
    }


def helper(python: Path, tree: Path, code: str, *args: str) -> str:
    """Run a snippet in the worker's Python with its tree first on the path; returns stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAM2_REFINE_")}
    env["PYTHONPATH"] = str(tree)
    done = subprocess.run([str(python), "-c", code, *args], cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{code.splitlines()[0]}...: {done.stderr.strip()[-800:]}")
    return done.stdout


def trained_models(python: Path, tree: Path, directory: Path) -> list[str]:
    """Trained SAM2 checkpoints in ``directory``, as the worker itself recognises them."""
    if not directory.is_dir():
        return []
    code = ("import sys, json\nfrom pathlib import Path\nfrom sam2_refine.model.checkpoints import scan_models\n"
            "print(json.dumps([m.name for m in scan_models(Path(sys.argv[1])).models if not m.untrained]))")
    return json.loads(helper(python, tree, code, str(directory)))


def make_stand_in_checkpoint(python: Path, tree: Path, directory: Path) -> str:
    """A checkpoint file with SAM2.1 tiny's layout and constant weights (the stand-in never loads
    it; the worker's settings accept it): the tests' ``write_layout_checkpoint``."""
    name = "sam2.1_hiera_tiny.pt"
    code = ("import sys\nfrom pathlib import Path\n"
            "from sam2_refine.testing.checkpoints import write_layout_checkpoint\n"
            "write_layout_checkpoint(Path(sys.argv[1]))")
    helper(python, tree, code, str(directory / name))
    return name


def default_python(tree: Path) -> Path:
    candidate = tree / ".venv" / "bin" / "python"
    return candidate if candidate.exists() else Path(sys.executable)
