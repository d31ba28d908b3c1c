"""Stopping a job on SIGTERM (what ``docker stop`` and the NimbusImage server's cancel send).

The handler raises :class:`JobInterrupted` in the main thread; the job catches it, reports what
it had done (created, deleted) and exits 143. Nothing is deleted that was not replaced, and a
re-run finishes the job without duplicating what was made (see :mod:`sam2_refine.job.markers`).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

#: Exit status after SIGTERM (128 + 15, as a shell reports it).
EXIT_INTERRUPTED = 143


class JobInterrupted(BaseException):
    """The process was asked to stop. A BaseException, so no ``except Exception`` swallows it."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


def _raise(signum: int, frame: object) -> None:
    raise JobInterrupted(signal.Signals(signum).name)


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`JobInterrupted` in the main thread."""
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
