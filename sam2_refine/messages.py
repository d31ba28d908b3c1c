"""What the user reads: bad settings and server failures explained.

NimbusImage shows an error or warning line as a notification: the ``error`` (or ``warning``)
text is its message, ``info`` the smaller text under it. Every error line of this worker says
what happened in ``error`` and gives the details and what to do in ``info``
(:func:`server_failure` builds both for a failed request). No library's own text reaches the
user (urllib3's ``HTTPConnectionPool(...)``, Python reprs), and no sentence ends in two full stops
(:func:`sentences`).

Pure functions: no I/O, no torch.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

#: Sentence endings that need no full stop after them.
_ENDINGS = (".", "!", "?")


def sentence(text: str) -> str:
    """``text`` stripped, starting with a capital letter and ending in exactly one full stop (or
    its own ``!``/``?``); "" stays ""."""
    text = text.strip()
    while text.endswith("..") and not text.endswith("..."):
        text = text[:-1]
    if text and not text.endswith(_ENDINGS):
        text += "."
    if text[:1].islower():
        text = text[0].upper() + text[1:]
    return text


def sentences(*parts: str | None) -> str:
    """The non-empty ``parts`` as sentences, joined by spaces (each ends in one full stop)."""
    return " ".join(sentence(p) for p in parts if p and p.strip())


def settings_failure(field: str, message: str, advice: str | None = None, in_form: bool = True) -> Explained:
    """One bad setting as an error line: the field in ``error``; the problem, that nothing was
    changed, and what to do in ``info``.

    Args:
        field: The field's name as the form shows it (or the parameter's, e.g. ``channel``).
        message: What is wrong with its value.
        advice: What to do, when the usual advice does not fit.
        in_form: Whether the user sets it in the tool's form (else NimbusImage fills it in).
    """
    if advice is None:
        advice = (f'Correct "{field}" in the tool\'s settings, then run the tool again' if in_form else
                  "NimbusImage fills this value in, not the tool's form: start the tool again from the dataset; "
                  "if it happens again, the tool may need to be created again")
    return Explained(f"Invalid setting: {field}", sentences(message, "Nothing was changed", advice))


# -- server failures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Explained:
    """One error line: ``error`` says what happened, ``info`` the details and what to do."""

    error: str
    info: str


_TIMED_OUT = "it did not answer in time"


def _network_cause(cause: BaseException | None) -> str:
    """A failed connection's cause in words (walking the exception chain: requests wraps urllib3,
    which wraps the socket's error)."""
    seen: set[int] = set()
    stack: list[Any] = [cause]
    while stack:
        exc = stack.pop()
        if not isinstance(exc, BaseException) or id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, ConnectionRefusedError):
            return "the connection was refused (nothing listens at that address)"
        if isinstance(exc, socket.gaierror) or type(exc).__name__ == "NameResolutionError":
            return "the server's name could not be found"
        if isinstance(exc, (TimeoutError, socket.timeout)) or "Timeout" in type(exc).__name__:
            return _TIMED_OUT
        if isinstance(exc, ConnectionResetError):
            return "the connection was closed before an answer came"
        stack.extend([exc.__cause__, exc.__context__, getattr(exc, "reason", None), *getattr(exc, "args", ())])
    return "the connection failed"


def _host(api_url: str | None) -> str:
    if not api_url:
        return "the NimbusImage server"
    parts = urlsplit(api_url)
    return parts.netloc or api_url


def _detail(exc: Any) -> str:
    """The server's message without its closing full stop (it is quoted inside a sentence)."""
    text = str(getattr(exc, "detail", "") or "").strip()
    return text.rstrip(".") if not text.endswith("...") else text


def request_text(exc: Any) -> str:
    """``Request: GET folder/abc (HTTP 400)``: which request failed, for whoever looks further."""
    request = f"{getattr(exc, 'method', '')} {getattr(exc, 'endpoint', '')}".strip()
    status = getattr(exc, "status", None)
    return f"Request: {request}" + (f" (HTTP {status})" if status is not None else "")


def cause_text(exc: Any, api_url: str | None = None) -> str:
    """Why a request failed, in words (no library text): no answer and why, the login refused,
    access refused, or the server's own message with its HTTP status."""
    status = getattr(exc, "status", None)
    detail = _detail(exc)
    transport = getattr(exc, "transport", None)
    if status is None and transport is not None:
        return f"no answer from {_host(api_url)}: {_network_cause(transport)}"
    if status == 401:
        return "the server did not accept the job's login" + (f" ({detail})" if detail else "")
    if status == 403:
        return "the server refused access" + (f" ({detail})" if detail else "")
    if status is None or 200 <= status < 300:
        return f"the server's answer could not be used ({detail or 'unreadable'})"
    return f"the server answered HTTP {status}" + (f": {detail}" if detail else "")


def server_failure(exc: Any, doing: str, *, api_url: str | None = None, changed: str = "Nothing was changed",
                   dataset_id: str | None = None, then: str | None = None) -> Explained:
    """A failed request (:class:`~sam2_refine.nimbus.errors.NimbusAPIError`) as one error line.

    Args:
        exc: The failure (its ``method``, ``endpoint``, ``status``, ``detail``, ``transport``).
        doing: What the job was doing, lower case, e.g. ``"reading the dataset"``.
        api_url: The server's address (only its host is named).
        changed: What was and was not changed (a sentence).
        dataset_id: The dataset, when the request concerned it (a "not found" names it).
        then: What to do, when the usual advice does not fit.
    """
    status = getattr(exc, "status", None)
    detail = _detail(exc)
    request = request_text(exc)
    if status is None and getattr(exc, "transport", None) is not None:
        timed_out = _network_cause(exc.transport) == _TIMED_OUT
        return Explained(
            "The NimbusImage server did not answer in time." if timed_out
            else "Could not reach the NimbusImage server.",
            sentences(f"While {doing}, {cause_text(exc, api_url)}", changed,
                      then or "Check that the server is running and that the worker can reach it (an "
                              "administrator may need to look), then run the job again", request))
    if status == 401:
        return Explained(
            "The NimbusImage server did not accept the job's login.",
            sentences(f"While {doing}, the server answered: {detail or 'not logged in'}", changed,
                      then or "The login may have expired: log in to NimbusImage again and run the tool again",
                      request))
    if status == 403:
        return Explained(
            "The NimbusImage server refused access.",
            sentences(f"While {doing}, the server answered: {detail or 'access denied'}", changed,
                      then or "Your account may be allowed to see this dataset but not to change it: ask its "
                              "owner for write access, then run the tool again", request))
    not_found = status == 404 or (status == 400 and "invalid" in detail.lower() and "id" in detail.lower())
    if not_found and dataset_id is not None and getattr(exc, "endpoint", "").startswith("folder/"):
        return Explained(
            "The dataset was not found on the NimbusImage server.",
            sentences(f"The server has no dataset with id {dataset_id} (it answered: {detail or 'not found'})",
                      changed, then or "It may have been deleted, or the tool was started for a dataset of another "
                                       "server: open the dataset in NimbusImage and run the tool from there", request))
    if status is None or 200 <= status < 300:
        return Explained(
            f"The NimbusImage server's answer could not be used while {doing}.",
            sentences(detail or "an unreadable answer", changed,
                      then or "Run the job again; if it happens again, an administrator should look at the server",
                      request))
    if status >= 500:
        return Explained(
            f"The NimbusImage server failed while {doing}.",
            sentences(f"It answered: {detail}" if detail else "It gave no reason", changed,
                      then or "This is usually temporary: run the job again in a few minutes", request))
    return Explained(
        f"The NimbusImage server refused a request while {doing}.",
        sentences(f"It answered: {detail}" if detail else "It gave no reason", changed,
                  then or "Run the job again; if it happens again, an administrator should look at the server",
                  request))


def counted(items: Iterable[tuple[str, int]], limit: int = 12) -> str:
    """``a (3), b (1)``: names with their counts, the most frequent first, at most ``limit``."""
    ordered = sorted(items, key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f'"{name}" ({count})' for name, count in ordered[:limit])
    rest = len(ordered) - limit
    return shown + (f" and {rest} more" if rest > 0 else "")
