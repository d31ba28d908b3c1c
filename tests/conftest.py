"""Shared fixtures: the local NimbusImage server, a client, an untrained checkpoint, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sam2_refine.nimbus.client import NimbusClient
from sam2_refine.nimbus.retry import RetryPolicy, Timeouts
from sam2_refine.testing.nimbus_server import NimbusTestServer

REPO = Path(__file__).resolve().parents[1]
#: A token that is easy to find in any output it leaks into.
TOKEN = "tok-SECRET-7f3a9c-do-not-print"


@pytest.fixture
def server() -> Iterator[NimbusTestServer]:
    with NimbusTestServer(token=TOKEN) as srv:
        yield srv


@pytest.fixture
def client(server: NimbusTestServer) -> Iterator[NimbusClient]:
    with NimbusClient(server.api_url, TOKEN, retry=RetryPolicy(backoff_factor=0.01),
                      timeouts=Timeouts(connect=5, read=30)) as c:
        yield c


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A checkpoint directory for stand-in runs: a SAM2.1 tiny checkpoint with the real layout
    and constant weights (settings recognise it from its weights; stand-ins never load it)."""
    from sam2_refine.testing.checkpoints import write_layout_checkpoint

    directory = tmp_path / "stub-ckpt"
    write_layout_checkpoint(directory / "sam2.1_hiera_tiny.pt")
    return directory


@pytest.fixture
def stub_ckpt(ckpt: Path) -> Path:
    return ckpt


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint directory holding an untrained (random-weight) SAM2.1 tiny checkpoint."""
    from sam2_refine.testing.checkpoints import make_untrained_checkpoint

    directory = tmp_path_factory.mktemp("checkpoints")
    make_untrained_checkpoint(directory / "sam2.1_hiera_tiny.pt", seed=0)
    return directory


@dataclass
class WorkerRun:
    returncode: int
    stdout: str
    stderr: str

    @property
    def messages(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stdout.splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
        return out

    def errors(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if "error" in m]

    def warnings(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if "warning" in m]

    def progress(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if "progress" in m]


def run_worker(server: NimbusTestServer, request: str, params: dict[str, Any], *,
               dataset_id: str | None = None, checkpoint_dir: Path | None = None,
               summary: Path | None = None, timeout: float = 600, token: str = TOKEN) -> WorkerRun:
    """Run the real ``entrypoint.py`` as a subprocess against ``server``."""
    argv = [sys.executable, str(REPO / "entrypoint.py"), "--apiUrl", server.api_url, "--token", token,
            "--request", request, "--parameters", json.dumps(params)]
    if dataset_id is not None:
        argv += ["--datasetId", dataset_id]
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if checkpoint_dir is not None:
        env["SAM2_CHECKPOINT_DIR"] = str(checkpoint_dir)
    if summary is not None:
        env["SAM2_REFINE_SUMMARY"] = str(summary)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    return WorkerRun(done.returncode, done.stdout, done.stderr)
