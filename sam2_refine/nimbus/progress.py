"""The NimbusImage progress protocol: one JSON object per stdout line, flushed at once.

The app reads the worker's stdout line by line (docs/nimbus-contract.md §4):

    {"progress": 0.42, "title": "Refining", "info": "Location 3/7"}
    {"warning": "msg", "title": "Warning", "info": "details", "type": "warning"}
    {"error": "msg", "title": "Error", "info": "details", "type": "error"}

A numeric ``progress`` in [0, 1] moves the job's progress bar; ``warning`` and ``error`` become
notifications. Every line is written and flushed in one call so the app sees it as it happens.

The :class:`Reporter` also scrubs every text it writes of the secrets it was told about (the
Girder token), so that no message can leak one even if an exception text carried it.

The bar keeps moving (issue 23): the job reports the steps within a location (objects decoded,
outlines traced) as minor lines, which the reporter writes at most every ``min_gap`` seconds
(the latest one wins); and while one step runs long (importing torch, embedding a large image,
waiting for the server) a :class:`Heartbeat` writes the current line again, with the seconds
the step has taken, so that no more than about 2 s pass without a line. Lines may come from the
heartbeat's thread: every line is written under a lock.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Return ``text`` with every non-empty secret replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


#: Seconds in which the heartbeat moves a long step's bar half of the way to where the next step
#: will put it.
CREEP_HALF_LIFE = 5.0


@dataclass
class Reporter:
    """Writes progress, warning and error lines for the NimbusImage app.

    Attributes:
        stream: Where the lines go (stdout in production).
        secrets: Strings that must never appear in a line (the Girder token).
        lines: Every object written, in order (the job's own record, for its summary).
        clock: Seconds, monotonic (injected by tests).
        min_gap: Least seconds between a minor progress line and the line before it.
    """

    stream: IO[str] = field(default_factory=lambda: sys.stdout)
    secrets: tuple[str, ...] = ()
    lines: list[dict[str, Any]] = field(default_factory=list)
    clock: Callable[[], float] = time.monotonic
    min_gap: float = 0.5
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    #: The latest progress asked for: (fraction, title, info, until), when it was asked for,
    #: whether it was held back, and when the last progress line was written.
    _state: tuple[float, str, str, float | None] | None = field(default=None, repr=False, compare=False)
    _state_since: float = field(default=0.0, repr=False, compare=False)
    _held: bool = field(default=False, repr=False, compare=False)
    _last_progress_at: float | None = field(default=None, repr=False, compare=False)

    def _emit(self, obj: dict[str, Any]) -> None:
        text = scrub(json.dumps(obj, allow_nan=False), self.secrets)
        with self._lock:
            self.lines.append(json.loads(text))
            self.stream.write(text + "\n")
            self.stream.flush()

    def progress(self, fraction: float, title: str, info: str = "", minor: bool = False,
                 until: float | None = None) -> None:
        """Move the progress bar to ``fraction`` (clamped to [0, 1]).

        Args:
            minor: A step within a stage: not written when the last progress line is less than
                ``min_gap`` seconds old (the next line, or the heartbeat, shows it then).
            until: Where the next step will put the bar (at least): while this step takes long,
                the heartbeat moves the bar towards it, never reaching it (see :meth:`beat`).
        """
        if not math.isfinite(fraction):
            fraction = 0.0
        fraction = min(1.0, max(0.0, float(fraction)))
        with self._lock:
            now = self.clock()
            state = (round(fraction, 4), title, info, until)
            if state != self._state:
                self._state, self._state_since = state, now
            if minor and self._last_progress_at is not None and now - self._last_progress_at < self.min_gap:
                self._held = True
                return
            self._write_progress(state[0], title, info, now)

    def _write_progress(self, fraction: float, title: str, info: str, now: float) -> None:
        self._held = False
        self._last_progress_at = now
        self._emit({"progress": fraction, "title": title, "info": info})

    def beat(self, quiet: float) -> bool:
        """Write the latest progress again if no progress line came for ``quiet`` seconds (a
        line held back: after ``min_gap``), with how long its step has taken. Nothing once the
        bar is full. Returns whether a line was written (see :class:`Heartbeat`).

        A step given ``until`` moves the bar: half of the way to ``until`` after
        :data:`CREEP_HALF_LIFE` seconds, three quarters after twice that, and so on; it never
        reaches ``until``, which the next step reaches, so the bar never goes back."""
        with self._lock:
            state, last = self._state, self._last_progress_at
            if state is None or last is None or state[0] >= 1.0:
                return False
            fraction, title, info, until = state
            now = self.clock()
            if self._held and now - last >= self.min_gap:
                self._write_progress(fraction, title, info, now)
                return True
            if now - last < quiet:
                return False
            elapsed = now - self._state_since
            if until is not None and until > fraction:
                crept = fraction + (until - fraction) * (1.0 - 0.5 ** (elapsed / CREEP_HALF_LIFE))
                fraction = max(fraction, math.floor(crept * 10000) / 10000)  # rounded down: below until
            self._write_progress(fraction, title, f"{info} ({elapsed:.0f} s)" if info else f"{elapsed:.0f} s", now)
            return True

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

    def update(self, fraction: float, info: str = "", minor: bool = False, until: float | None = None) -> None:
        """``fraction`` (and ``until``, see :meth:`Reporter.progress`) of this stage."""
        fraction = min(1.0, max(0.0, fraction))
        width = self.end - self.start
        self.reporter.progress(self.start + width * fraction, self.title, info, minor=minor,
                               until=None if until is None else self.start + width * min(1.0, max(0.0, until)))


class Heartbeat:
    """While the job runs, a thread that keeps the progress bar alive (:meth:`Reporter.beat`):
    a progress line at least every ``quiet`` + ``poll`` seconds (under 2 s by default), also
    while one step takes long. Use as a context manager around the job.

    Args:
        reporter: Where the lines go.
        quiet: Seconds without a progress line after which the current one is written again.
        poll: Seconds between the thread's looks.
    """

    def __init__(self, reporter: Reporter, quiet: float = 1.5, poll: float = 0.25) -> None:
        self.reporter, self.quiet, self.poll = reporter, quiet, poll
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            self.reporter.beat(self.quiet)

    def __enter__(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._run, name="progress-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
