"""Frames ahead: locations' frames fetched in the background, in order, within a byte budget.

While the engine refines one location, the frames of the next locations are on their way. How
far ahead the worker fetches follows a budget in **bytes** (:class:`PrefetchPolicy`), not a
count: as many locations as fit are requested ahead of the one being refined, so that when
frames take longer to arrive than to refine (a GPU host, a slow tile server) several locations
are in flight at once, over up to ``connections`` HTTP sessions, while the memory held by
frames fetched ahead never exceeds the budget. One location is always fetched ahead, even when
its frames alone exceed the budget (then locations travel one at a time, as before).

Guarantees (tests/test_prefetch.py):

- locations are requested in the order given and each one's fetch runs once: :meth:`take`
  hands its result over exactly once (a second ``take`` of the same location is an error);
- ``bytes ahead`` (the frames of locations requested but not yet taken, counted by their size
  from the tile metadata) never exceeds the budget, except for the single location ahead;
- a fetch's failure is raised by :meth:`take` for that location only (the job keeps that
  location's originals, "its image could not be read"); later locations are unaffected;
- every worker thread has its own client (:meth:`~sam2_refine.nimbus.client.NimbusClient.clone`:
  a requests session is not shared between threads); all are closed on exit, after the
  threads have stopped.

Configuration (operators; read once per job): :data:`BUDGET_ENV` and :data:`CONNECTIONS_ENV`.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from sam2_refine.engine.imaging import Layer
from sam2_refine.nimbus.dataset import DatasetInfo
from sam2_refine.nimbus.client import NimbusClient
from sam2_refine.annotations import Location

log = logging.getLogger(__name__)

#: Bytes of frames the worker may hold fetched ahead of the location being refined: a number
#: of bytes, or with a K, M or G suffix (powers of 1024), e.g. ``2G``. ``0``: one location ahead.
BUDGET_ENV = "SAM2_REFINE_PREFETCH_BYTES"
#: Most locations fetched at the same time (each over its own HTTP session), 1 to 16.
CONNECTIONS_ENV = "SAM2_REFINE_PREFETCH_CONNECTIONS"
DEFAULT_BUDGET_BYTES = 1 << 30  # 1 GiB: e.g. 42 locations of three 2048 x 2048 uint16 frames
DEFAULT_CONNECTIONS = 4
MAX_CONNECTIONS = 16
#: Bytes per pixel assumed when the tile metadata names no (known) dtype: float32's, larger
#: than the uint8/uint16 most microscopy frames have, so the budget errs on the safe side.
UNKNOWN_DTYPE_BYTES = 4

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?\s*", re.IGNORECASE)

T = TypeVar("T")


@dataclass(frozen=True)
class PrefetchPolicy:
    """How far ahead frames are fetched.

    Attributes:
        budget_bytes: Most bytes of frames held ahead of the location being refined (>= 0).
            One location is always fetched ahead, whatever its size.
        connections: Most locations fetched at the same time, each over its own HTTP session.
    """

    budget_bytes: int = DEFAULT_BUDGET_BYTES
    connections: int = DEFAULT_CONNECTIONS

    def __post_init__(self) -> None:
        if self.budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {self.budget_bytes}")
        if not 1 <= self.connections <= MAX_CONNECTIONS:
            raise ValueError(f"connections must be in 1..{MAX_CONNECTIONS}, got {self.connections}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PrefetchPolicy:
        """The policy :data:`BUDGET_ENV` and :data:`CONNECTIONS_ENV` ask for; a malformed or
        out-of-range value is logged (stderr) and its default used."""
        environ = os.environ if environ is None else environ
        budget, connections = DEFAULT_BUDGET_BYTES, DEFAULT_CONNECTIONS
        if environ.get(BUDGET_ENV, "").strip():
            try:
                budget = parse_bytes(environ[BUDGET_ENV])
            except ValueError as exc:
                log.warning("ignoring %s: %s", BUDGET_ENV, exc)
        if environ.get(CONNECTIONS_ENV, "").strip():
            text = environ[CONNECTIONS_ENV].strip()
            if text.isdigit() and 1 <= int(text) <= MAX_CONNECTIONS:
                connections = int(text)
            else:
                log.warning("ignoring %s: %r is not a whole number in 1..%d", CONNECTIONS_ENV, text,
                            MAX_CONNECTIONS)
        return cls(budget, connections)


def parse_bytes(text: str) -> int:
    """``"1073741824"``, ``"512M"``, ``"1.5G"``, ``"64KiB"`` -> bytes (suffixes are powers of 1024).

    Raises:
        ValueError: not a non-negative number with an optional K/M/G suffix.
    """
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a number of bytes (e.g. 1073741824, 512M, 2G)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def location_bytes(info: DatasetInfo, layers: Sequence[Layer]) -> int:
    """Bytes of one location's frames: one (height, width) frame per channel the layers show,
    in the dtype the tile metadata names (:data:`UNKNOWN_DTYPE_BYTES` per pixel if none)."""
    try:
        itemsize = np.dtype(info.dtype).itemsize if info.dtype else UNKNOWN_DTYPE_BYTES
    except TypeError:
        itemsize = UNKNOWN_DTYPE_BYTES
    return len({layer.channel for layer in layers}) * info.width * info.height * itemsize


@dataclass
class _Ahead(Generic[T]):
    future: Future[T]
    nbytes: int


class FramePrefetcher(Generic[T]):
    """Fetches locations in background threads, in order, as far ahead as the budget allows.

    Use as a context manager. :meth:`start` requests the first locations (e.g. while the model
    loads); :meth:`take` waits for a location's result (or raises its fetch's exception), and
    requests the next locations that fit, so they travel while this one is refined.

    Args:
        client: The job's client; each worker thread uses its own :meth:`NimbusClient.clone`.
        locations: The locations to fetch, in the order they will be taken.
        fetch: ``fetch(client, location)`` -> the location's frames (e.g. a
            :class:`~sam2_refine.engine.imaging.LocationImage`); runs in a worker thread.
        nbytes: Bytes one location's frames hold (:func:`location_bytes`).
        policy: Budget and connections.

    Attributes (statistics, for tests and benchmarks):
        peak_bytes_ahead: Most bytes of requested, not yet taken locations at any time.
        peak_in_flight: Most fetches running at the same time.
        started: How many fetches ran (started in a worker thread).
        requested: The locations requested so far, in the order they were requested.
    """

    def __init__(self, client: NimbusClient, locations: Sequence[Location],
                 fetch: Callable[[NimbusClient, Location], T], nbytes: int,
                 policy: PrefetchPolicy | None = None) -> None:
        self.wanted: tuple[Location, ...] = tuple(locations)
        self.policy = policy or PrefetchPolicy()
        self._position = {location: k for k, location in enumerate(self.wanted)}
        if len(self._position) != len(self.wanted):
            raise ValueError("each location must be listed once")
        self._client, self._fetch, self._nbytes = client, fetch, max(0, int(nbytes))
        self._next = 0  # position of the next location to request
        self._ahead: dict[Location, _Ahead[T]] = {}  # requested, not taken; in position order
        self._pool = ThreadPoolExecutor(max_workers=self.policy.connections, thread_name_prefix="prefetch")
        self._local = threading.local()
        self._clients: list[NimbusClient] = []
        self._lock = threading.Lock()
        self._running = 0
        self.peak_bytes_ahead = 0
        self.peak_in_flight = 0
        self.started = 0
        self.requested: list[Location] = []

    def __enter__(self) -> FramePrefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancel what has not started, wait for running fetches, close the threads' clients."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._ahead.clear()
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()

    @property
    def bytes_ahead(self) -> int:
        """Bytes of the locations requested and not yet taken."""
        return sum(ahead.nbytes for ahead in self._ahead.values())

    def start(self) -> None:
        """Request the first locations that fit the budget (at least one)."""
        self._request_what_fits()

    def take(self, location: Location) -> T:
        """The location's result, waited for; raises what its fetch raised.

        Locations listed before it and never taken are dropped (not fetched, or their result
        discarded). Each location can be taken once.

        Raises:
            KeyError: ``location`` is not listed, or was already taken or dropped.
        """
        position = self._position.get(location)
        if position is None or (position < self._next and location not in self._ahead):
            raise KeyError(f"location {location} is not to be fetched, or was already taken")
        for earlier in [loc for loc in self._ahead if self._position[loc] < position]:
            self._ahead.pop(earlier).future.cancel()
        self._next = max(self._next, position)
        if location not in self._ahead:  # nothing is ahead now: this one is requested first
            self._request_what_fits()
        ahead = self._ahead.pop(location)
        self._request_what_fits()  # the next locations travel while this one is refined
        return ahead.future.result()

    def _request_what_fits(self) -> None:
        while self._next < len(self.wanted):
            if self._ahead and self.bytes_ahead + self._nbytes > self.policy.budget_bytes:
                return
            location = self.wanted[self._next]
            self._next += 1
            self.requested.append(location)
            self._ahead[location] = _Ahead(self._pool.submit(self._run, location), self._nbytes)
            self.peak_bytes_ahead = max(self.peak_bytes_ahead, self.bytes_ahead)

    def _thread_client(self) -> NimbusClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._client.clone()
            with self._lock:
                self._clients.append(client)
        return client

    def _run(self, location: Location) -> T:
        client = self._thread_client()
        with self._lock:
            self.started += 1
            self._running += 1
            self.peak_in_flight = max(self.peak_in_flight, self._running)
        try:
            return self._fetch(client, location)
        finally:
            with self._lock:
                self._running -= 1
