"""Outline work on all cores: a bounded pool of worker processes for the engine's per-object work.

The engine (:mod:`sam2_refine.engine.location`) hands the work it does per object outside the model
(finding each mask's object: upsampling in a window, choosing the component; tracing,
simplifying, padding and validating outlines) to an :class:`OutlinePool` as tasks: pure
functions of picklable arguments, a chunk of objects each. The model stays on the calling
thread (a predictor is not thread-safe); the pool never calls it.

**Processes, not threads.** Tracing outlines on more threads was slower than on one
(docs/performance.md, "Outline work in parallel", has the figures): each object costs some forty
OpenCV, scikit-image (its contour assembly is Python), shapely and numpy calls on small arrays,
and the interpreter holds the GIL between them for most of that time. So the pool runs worker
processes, each with OpenCV on one thread. They are forked from multiprocessing's
``forkserver``: a fresh interpreter that imports the engine once per job and inherits nothing of
the job's threads, HTTP sessions or torch state; each worker is then a fork of it, where
``spawn`` costs every worker its own interpreter and imports. A script that runs jobs must guard its top level
(``if __name__ == "__main__":``), as multiprocessing requires: the server imports it.

**Bounded.** At most ``max_in_flight`` tasks (default 2 per worker: one running, one waiting)
are submitted and not finished; :meth:`OutlinePool.submit` blocks until one finishes. What the
pool holds is therefore at most that many chunks of objects' windows, whatever the number of
objects (and the engine keeps at most that many decoded batches waiting for their tasks).

**Inline.** With 0 workers there is no process: :meth:`submit` runs the task at once on the
calling thread and returns its finished future. The engine runs the same tasks either way, so
its results do not depend on the pool (``tests/test_outline_pool.py``).

An exception raised by a task (a bug, not an object's :class:`~sam2_refine.engine.geometry.AnnotationProblem`,
which the tasks turn into that object's reason) is raised again by the future's ``result()``
on the calling thread, and so fails the job; a worker that dies does the same
(``BrokenProcessPool``).

Configuration (operators; read once per job): :data:`WORKERS_ENV`.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

#: Worker processes for the engine's outline work: ``auto`` (or empty: :func:`default_workers`),
#: or a whole number 0 to :data:`MAX_WORKERS` (0: on the job's thread, no process).
WORKERS_ENV = "SAM2_REFINE_OUTLINE_WORKERS"
MAX_WORKERS = 64
#: Workers when the model runs on the CPU: none. The model keeps the cores (torch uses them
#: all); worker processes next to it made the CPU job slower (docs/performance.md, "Outline work in parallel").
CPU_WORKERS = 0


def cpu_quota(cpu_max: str | None = None, cfs_quota_us: str | None = None,
              cfs_period_us: str | None = None) -> int | None:
    """Whole cores a cgroup's CPU quota allows (rounded up), or None where there is none.

    Args:
        cpu_max: cgroup v2 ``cpu.max`` text, ``"<quota> <period>"`` or ``"max <period>"``.
        cfs_quota_us, cfs_period_us: cgroup v1 ``cpu.cfs_quota_us`` (-1: none) and
            ``cpu.cfs_period_us`` texts, used when ``cpu_max`` is None.
    """
    try:
        if cpu_max is not None:
            quota, period = cpu_max.split()[:2]
            if quota == "max":
                return None
            return max(1, math.ceil(int(quota) / int(period)))
        if cfs_quota_us is not None and cfs_period_us is not None and int(cfs_quota_us) > 0:
            return max(1, math.ceil(int(cfs_quota_us) / int(cfs_period_us)))
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _read(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return None


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, within its cgroup's CPU quota (a container
    started with ``--cpus 4`` on a 64-core host gets 4)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = max(1, os.cpu_count() or 1)
    quota = cpu_quota(_read("/sys/fs/cgroup/cpu.max"), _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
                      _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))
    return min(cores, quota) if quota is not None else cores


def default_workers(device: str, cores: int | None = None) -> int:
    """Workers for a model on ``device``: one per usable core on a GPU (the model then leaves
    the CPU to the work around it), :data:`CPU_WORKERS` on the CPU."""
    if device == "cuda":
        return min(MAX_WORKERS, cores if cores is not None else usable_cores())
    return CPU_WORKERS


def workers_from_env(device: str, environ: Mapping[str, str] | None = None) -> int:
    """The workers :data:`WORKERS_ENV` asks for, else :func:`default_workers` for ``device``; a
    malformed or out-of-range value is logged (stderr) and the default used."""
    environ = os.environ if environ is None else environ
    text = environ.get(WORKERS_ENV, "").strip()
    if text and text.lower() != "auto":
        if text.isdigit() and int(text) <= MAX_WORKERS:
            return int(text)
        log.warning("ignoring %s: %r is not 'auto' or a whole number in 0..%d", WORKERS_ENV, text, MAX_WORKERS)
    return default_workers(device)


def _start_worker(initializer: Callable[[], None] | None, job_pid: int) -> None:
    """In each worker process: the job alone decides when workers stop (SIGINT and SIGTERM are
    the job's to handle: it stops the pool), a worker whose job has died (SIGKILL, out of memory)
    exits at once (:func:`_exit_with`), and OpenCV runs on this process's thread only (the pool
    is the parallelism)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _exit_with(job_pid)
    import cv2

    cv2.setNumThreads(1)
    if initializer is not None:
        initializer()


def _exit_with(job_pid: int) -> None:
    """End this process when process ``job_pid`` ends.

    A worker is a child of multiprocessing's forkserver, not of the job, so nothing tells it
    when the job is killed: it would wait for tasks for ever, holding its memory. A daemon
    thread waits on a pidfd of the job (Linux 5.3+; opened now, while the job is alive, so no
    other process can take its number), else polls it twice a second, and then exits."""
    pidfd_open = getattr(os, "pidfd_open", None)
    fd = None
    if pidfd_open is not None:
        try:
            fd = pidfd_open(job_pid)
        except OSError:  # no pidfd (old kernel, seccomp): poll below
            fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])  # readable once the job has exited
        else:
            while True:
                try:
                    os.kill(job_pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:  # alive, another user's: cannot happen for our parent job
                    pass
                time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-job", daemon=True).start()


def _ready() -> int:
    return os.getpid()


#: What the forkserver imports once, so that each worker forked from it has them: the script
#: (where it has a path; its functions may be tasks) and the engine.
PRELOAD = ["__main__", "sam2_refine.engine.objects", "sam2_refine.engine.outlines"]


def _context(method: str | None) -> multiprocessing.context.BaseContext:
    if method is None:
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(PRELOAD)  # read when the server starts (once per process)
    return context


class OutlinePool:
    """Runs tasks (module-level functions of picklable arguments) in ``workers`` processes, at
    most ``max_in_flight`` at a time, or inline on the calling thread with 0 workers.

    Use as a context manager (or call :meth:`close`). Not shared between threads: one thread
    submits and collects.

    Args:
        workers: Worker processes (0: inline).
        max_in_flight: Most tasks submitted and not finished (default ``2 * workers``).
        initializer: Called once in each worker process after it starts (tests: faults).
        context: The multiprocessing start method; default ``forkserver`` (``spawn`` where the
            platform has no forkserver). Neither inherits the job's state.

    Attributes:
        workers: As given (0 when the processes could not be started: then inline).
        peak_in_flight: Most tasks in flight at any time (tests, benchmarks).
        submitted: Tasks submitted.
    """

    def __init__(self, workers: int = 0, max_in_flight: int | None = None,
                 initializer: Callable[[], None] | None = None, context: str | None = None) -> None:
        if not 0 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be in 0..{MAX_WORKERS}, got {workers}")
        self.workers = workers
        self.max_in_flight = max(1, max_in_flight if max_in_flight is not None else 2 * workers)
        self.peak_in_flight = 0
        self.submitted = 0
        self._slots = threading.BoundedSemaphore(self.max_in_flight)
        self._lock = threading.Lock()
        self._in_flight = 0
        self._executor: ProcessPoolExecutor | None = None
        if workers:
            try:
                self._executor = ProcessPoolExecutor(workers, mp_context=_context(context),
                                                     initializer=_start_worker, initargs=(initializer, os.getpid()))
            except (OSError, ValueError) as exc:  # e.g. no /dev/shm for the pool's locks
                log.warning("outline work runs on the job's thread: could not start %d worker process(es): %s",
                            workers, exc)
                self.workers = 0

    @property
    def inline(self) -> bool:
        """Whether tasks run on the calling thread."""
        return self._executor is None

    def __enter__(self) -> OutlinePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start every worker process now (each imports the engine's libraries, about 0.2 s of
        one core), so that the first tasks do not wait for them; returns without waiting.

        Where the processes cannot be started (no writable temporary directory for the
        forkserver's socket, no processes allowed), this is logged and the pool runs its tasks
        inline from then on: the job goes on, on its own thread."""
        if self._executor is None:
            return
        try:
            for _ in range(self.workers):
                self._executor.submit(_ready)
        except OSError as exc:
            log.warning("outline work runs on the job's thread: could not start %d worker process(es): %s",
                        self.workers, exc)
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
            self.workers = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` in a worker (inline: now); waits while ``max_in_flight`` tasks
        are unfinished. The future's ``result()`` raises what ``fn`` raised."""
        self.submitted += 1
        if self._executor is None:
            future: Future[Any] = Future()
            try:
                future.set_result(fn(*args))
            except Exception as exc:  # noqa: BLE001 - handed to the caller through result(), as a worker's
                future.set_exception(exc)
            return future
        self._slots.acquire()
        with self._lock:
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            self._release(None)
            raise
        future.add_done_callback(self._release)
        return future

    def _release(self, _future: Future[Any] | None) -> None:
        with self._lock:
            self._in_flight -= 1
        self._slots.release()

    def close(self) -> None:
        """Cancel tasks not started, wait for running ones, stop the worker processes."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
