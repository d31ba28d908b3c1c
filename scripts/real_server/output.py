"""What the check prints: every line carries the database label; the last line is the count.

Pure apart from :meth:`Output.say` writing to a stream.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO


@dataclass(frozen=True)
class Result:
    """One check: its name, whether it passed, and what was seen."""

    name: str
    passed: bool
    detail: str = ""


def database_label(mongo_uri: str | None, substitute: str) -> str:
    """The prefix of every line: which database the server ran on.

    Args:
        mongo_uri: The MongoDB URI used, or None when the in-process substitute was used.
        substitute: The substitute's name (e.g. ``"mongomock_ng 7.11.1"``).
    """
    if mongo_uri is None:
        return f"[substitute DB: {substitute}, not MongoDB]"
    return "[MongoDB]"


def result_line(result: Result) -> str:
    """``PASS name: detail`` or ``FAIL name: detail``."""
    status = "PASS" if result.passed else "FAIL"
    return f"{status} {result.name}" + (f": {result.detail}" if result.detail else "")


def summary_line(results: list[Result]) -> str:
    """``N passed, M failed``: the last line of the output, alone."""
    passed = sum(1 for r in results if r.passed)
    return f"{passed} passed, {len(results) - passed} failed"


def exit_code(results: list[Result]) -> int:
    """0 when every check passed and there was at least one; else 1."""
    return 0 if results and all(r.passed for r in results) else 1


@dataclass
class Output:
    """Prints every line with ``label``; keeps the results for the closing count."""

    label: str
    stream: TextIO = field(default_factory=lambda: sys.stdout)
    results: list[Result] = field(default_factory=list)

    def say(self, text: str = "") -> None:
        for line in (text.splitlines() or [""]):
            print(f"{self.label} {line}".rstrip(), file=self.stream, flush=True)

    def check(self, name: str, passed: bool, detail: str = "") -> Result:
        result = Result(name, bool(passed), detail)
        self.results.append(result)
        self.say(result_line(result))
        return result

    def finish(self) -> int:
        """The closing lines; returns the exit code."""
        self.say("(the count below covers the checks above; every line above names the database)")
        print(summary_line(self.results), file=self.stream, flush=True)
        return exit_code(self.results)
