"""How the client's requests are retried and timed (:class:`RetryPolicy`, :class:`Timeouts`).

Transient failures are retried by urllib3's :class:`~urllib3.util.retry.Retry` mounted on the
session (no hand-written retry loop): connection errors, and for idempotent methods (GET,
DELETE, PUT, HEAD, OPTIONS) also read errors and HTTP 502/503/504, with bounded exponential
backoff (:class:`RetryPolicy`). ``Retry-After`` is honoured up to the backoff cap, so a
server cannot stall a job for longer than the policy allows.

POST is never retried once a request may have reached the server. Creating annotations or
connections is not idempotent: a 502/504 from a proxy, or a connection dropped while the
response was on its way, can follow a request the server has already carried out, and a
blind retry would then create every annotation of the chunk twice. So a POST is retried
only on a failure to *connect* (the request was certainly never sent); any other failure
is surfaced to the caller, which knows what it tried to create and reports it
(:class:`~sam2_refine.nimbus.errors.PartialCreateError` carries what earlier chunks did create).
"""

from __future__ import annotations

from dataclasses import dataclass

from urllib3.util.retry import Retry


IDEMPOTENT_METHODS = frozenset({"GET", "DELETE", "PUT", "HEAD", "OPTIONS"})


class _BoundedRetry(Retry):
    """urllib3's Retry, with ``Retry-After`` capped at ``backoff_max`` (urllib3 sleeps for any value)."""

    def get_retry_after(self, response):  # type: ignore[no-untyped-def] - urllib3's signature
        value = super().get_retry_after(response)
        return None if value is None else min(value, self.backoff_max)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff for transient failures.

    Sleep before retry k (k >= 2) is ``backoff_factor * 2**(k-1)`` seconds, at most
    ``backoff_max`` (also the most a ``Retry-After`` header can ask for); at most ``total``
    retries per request.
    """

    total: int = 5
    backoff_factor: float = 0.5
    backoff_max: float = 20.0
    status_forcelist: tuple[int, ...] = (502, 503, 504)

    def to_urllib3(self) -> Retry:
        return _BoundedRetry(
            total=self.total,
            connect=self.total,
            read=self.total,
            status=self.total,
            other=0,
            backoff_factor=self.backoff_factor,
            backoff_max=self.backoff_max,
            status_forcelist=self.status_forcelist,
            allowed_methods=IDEMPOTENT_METHODS,
            raise_on_status=False,
            respect_retry_after_header=True,
        )


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for a connection, and for each read of a response."""

    connect: float = 10.0
    read: float = 300.0
