"""Force interleavings of several clients' requests on a :class:`NimbusTestServer`.

Jobs running at the same time are told apart by their tokens (``server.add_token(token,
"job1")``). An :class:`Interleaver` installed as the server's ``before_acting`` hook runs in each
request's thread before the server acts on it, and can

- hold a client's n-th matching request until a condition holds (another client has made some
  request, a process has exited, ...): :meth:`Interleaver.hold`;
- delay every request of some clients by a random time from a seeded generator (many
  repetitions with different seeds cover many interleavings): :meth:`Interleaver.random_delays`;
- call a function at the first request of a client that meets a condition (e.g. SIGKILL that
  job's process once its upload was answered), and drop that request unanswered, without
  acting: :meth:`Interleaver.kill_when`.

Races are tested by forcing orders with these, not by hoping to hit them.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sam2_refine.testing.nimbus_server import DroppedRequest, NimbusTestServer, RecordedRequest


@dataclass
class _Rule:
    client: str
    method: str
    path: str
    nth: int | None
    action: Callable[[RecordedRequest], None]
    when: Callable[[RecordedRequest], bool] | None = None
    seen: int = 0
    fired: int = 0

    def matches(self, record: RecordedRequest) -> bool:
        return (record.client == self.client and (self.method == "*" or record.method == self.method)
                and re.fullmatch(self.path, record.path) is not None
                and (self.when is None or self.when(record)))


@dataclass
class Interleaver:
    """The server's ``before_acting`` hook (see the module docstring).

    Attributes:
        timeout: Longest a held request waits for its condition (then it goes on, and the
            hold is recorded in ``timed_out``: a test should assert that list is empty).
    """

    server: NimbusTestServer
    timeout: float = 60.0
    timed_out: list[str] = field(default_factory=list)
    _rules: list[_Rule] = field(default_factory=list)
    _delays: dict[str, tuple[random.Random, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.server.before_acting = self

    def hold(self, client: str, method: str, path: str, until: Callable[[], bool], nth: int | None = 1,
             when: Callable[[RecordedRequest], bool] | None = None) -> None:
        """Hold ``client``'s ``nth`` request (None: every one) matching ``method`` (``"*"``: any),
        the path regex ``path`` and ``when(request)`` (if given) until ``until()`` is true."""

        def wait(record: RecordedRequest) -> None:
            deadline = time.monotonic() + self.timeout
            while not until():
                if time.monotonic() > deadline:
                    self.timed_out.append(f"{client} {record.method} {record.path}")
                    return
                time.sleep(0.005)

        with self._lock:
            self._rules.append(_Rule(client, method, path, nth, wait, when))

    def kill_when(self, client: str, when: Callable[[RecordedRequest], bool], kill: Callable[[], None]) -> None:
        """At the first request of ``client`` for which ``when(request)`` is true, call ``kill()``
        (which should return once the job is dead) and drop that request unanswered, without
        acting: the job ends between that request and the one before."""
        fired = threading.Event()

        def act(record: RecordedRequest) -> None:
            if fired.is_set() or not when(record):
                return
            fired.set()
            kill()
            raise DroppedRequest()

        with self._lock:
            self._rules.append(_Rule(client, "*", ".*", None, act))

    def random_delays(self, clients: list[str], seed: int, max_delay: float) -> None:
        """Delay each request of ``clients`` by a uniform random time in [0, max_delay) s
        (a generator per client, seeded from ``seed``: the same seed, the same delays)."""
        with self._lock:
            for k, client in enumerate(clients):
                self._delays[client] = (random.Random(seed * 1000 + k), max_delay)

    def count(self, client: str, method: str, path: str) -> int:
        """How many of ``client``'s requests matching ``method``/``path`` the server has received."""
        return len(self.server.requests_to(method, path, client))

    def answered(self, client: str, method: str, path: str) -> int:
        """How many of them the server has finished acting on."""
        return sum(1 for r in self.server.requests_to(method, path, client) if r.done_at)

    def __call__(self, record: RecordedRequest) -> None:
        if record.client is None:
            return
        actions = []
        with self._lock:
            delay = self._delays.get(record.client)
            pause = delay[0].random() * delay[1] if delay is not None else 0.0
            for rule in self._rules:
                if rule.matches(record):
                    rule.seen += 1
                    if rule.nth is None or rule.seen == rule.nth:
                        rule.fired += 1
                        actions.append(rule.action)
        if pause:
            time.sleep(pause)
        for action in actions:
            action(record)
