"""The machine a benchmark ran on, as its tables name it (imported by the bench scripts, which run
with ``bench/`` first on the path)."""

from __future__ import annotations

import platform


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (e.g. ``AMD EPYC ...``), else what
    :func:`platform.processor` says."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
