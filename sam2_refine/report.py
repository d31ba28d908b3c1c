"""The NimbusImage progress protocol: one JSON object per stdout line, flushed at once.

The app reads the worker's stdout line by line (contract section 4):

    {"progress": 0.42, "title": "Refining", "info": "Location 3/7"}
    {"warning": "msg", "title": "Warning", "info": "details", "type": "warning"}
    {"error": "msg", "title": "Error", "info": "details", "type": "error"}

A numeric ``progress`` in [0, 1] moves the job's progress bar; ``warning`` and ``error`` become
notifications. Every line is written and flushed in one call so the app sees it as it happens.

The :class:`Reporter` also scrubs every text it writes of the secrets it was told about (the
Girder token), so that no message can leak one even if an exception text carried it.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO, Any


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Return ``text`` with every non-empty secret replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


@dataclass
class Reporter:
    """Writes progress, warning and error lines for the NimbusImage app.

    Attributes:
        stream: Where the lines go (stdout in production).
        secrets: Strings that must never appear in a line (the Girder token).
        lines: Every object written, in order (the job's own record, for its summary).
    """

    stream: IO[str] = field(default_factory=lambda: sys.stdout)
    secrets: tuple[str, ...] = ()
    lines: list[dict[str, Any]] = field(default_factory=list)

    def _emit(self, obj: dict[str, Any]) -> None:
        text = scrub(json.dumps(obj, allow_nan=False), self.secrets)
        self.lines.append(json.loads(text))
        self.stream.write(text + "\n")
        self.stream.flush()

    def progress(self, fraction: float, title: str, info: str = "") -> None:
        """Move the progress bar to ``fraction`` (clamped to [0, 1])."""
        if not math.isfinite(fraction):
            fraction = 0.0
        fraction = min(1.0, max(0.0, float(fraction)))
        self._emit({"progress": round(fraction, 4), "title": title, "info": info})

    def warning(self, message: str, info: str = "", title: str = "Warning") -> None:
        """A notification that does not stop the job."""
        self._emit({"warning": message, "title": title, "info": info, "type": "warning"})

    def error(self, message: str, info: str = "", title: str = "Error") -> None:
        """A notification for a failure; the job then exits non-zero."""
        self._emit({"error": message, "title": title, "info": info, "type": "error"})


@dataclass
class ProgressSpan:
    """Maps the progress of one stage (0..1) into a span [start, end] of the whole job."""

    reporter: Reporter
    start: float
    end: float
    title: str

    def update(self, fraction: float, info: str = "") -> None:
        fraction = min(1.0, max(0.0, fraction))
        self.reporter.progress(self.start + (self.end - self.start) * fraction, self.title, info)
