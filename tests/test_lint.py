"""The code style the project holds itself to: ruff's pyflakes, pycodestyle and bugbear rules."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ruff() -> str | None:
    beside = Path(sys.executable).parent / "ruff"
    return str(beside) if beside.exists() else shutil.which("ruff")


def test_ruff_is_clean():
    ruff = _ruff()
    if ruff is None:
        if os.environ.get("CI"):
            pytest.fail("ruff is not installed (dev extras); under CI this is a failure")
        pytest.skip("ruff is not installed (install the dev extras: make venv)")
    done = subprocess.run([ruff, "check", "sam2_refine", "bench", "tests", "entrypoint.py", "scripts", "examples"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
