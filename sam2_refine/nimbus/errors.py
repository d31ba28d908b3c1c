"""What a call to the NimbusImage server raises: :class:`NimbusAPIError` for every HTTP or
network failure (the method, the endpoint without query string, the status; never the token),
and its kinds: a create that failed part way, an endpoint the server lacks, a frame that could
not be decoded or arrived degraded. The user's words for them: :mod:`sam2_refine.messages`.
"""

from __future__ import annotations

from typing import Any


class NimbusAPIError(Exception):
    """An HTTP or network failure talking to the NimbusImage server.

    Attributes:
        method: HTTP method, e.g. ``"POST"``.
        endpoint: The path relative to the API root, without query string.
        status: HTTP status code, or None when no response arrived (connection, timeout).
        detail: The server's message or the network error, scrubbed of the token.
        transport: The network failure (a ``requests`` connection error or timeout) when no
            answer came, else None; for messages in the user's words
            (:func:`sam2_refine.messages.server_failure`), never shown as text.
    """

    def __init__(self, method: str, endpoint: str, status: int | None, detail: str,
                 transport: BaseException | None = None) -> None:
        self.method = method
        self.endpoint = endpoint
        self.status = status
        self.detail = detail
        self.transport = transport
        where = f"{method} {endpoint}"
        what = f"HTTP {status}" if status is not None else "no response"
        super().__init__(f"{where} failed: {what}: {detail}" if detail else f"{where} failed: {what}")


class PartialCreateError(NimbusAPIError):
    """Creating a list of documents failed part way.

    Attributes:
        created: The documents the server did create and confirm, in input order (a prefix of
            the input: chunks are sent in order and the first failure stops the upload).
        not_created: How many of the input documents were not (or not certainly) created.
    """

    def __init__(self, cause: NimbusAPIError, created: list[dict[str, Any]], not_created: int):
        super().__init__(cause.method, cause.endpoint, cause.status, cause.detail, cause.transport)
        self.created = created
        self.not_created = not_created


class ServerLacksEndpoint(NimbusAPIError):
    """The server has no such endpoint (an older NimbusImage): the caller reads another way."""


class UnreadableFrameError(NimbusAPIError):
    """A frame's body arrived but could not be decoded in the encoding asked for."""


class DegradedFrameError(NimbusAPIError):
    """Every encoding the server served gave a frame unlike the tile metadata (an 8-bit copy of
    a 16-bit frame, another size).

    Attributes:
        frame: The frame number.
        arrivals: ``"<encoding>: arrived as ...; the dataset's metadata says ..."`` per encoding.
    """

    def __init__(self, method: str, endpoint: str, frame: int, arrivals: list[str]) -> None:
        super().__init__(method, endpoint, None,
                         f"frame {frame} could not be read exactly: " + "; ".join(arrivals))
        Exception.__init__(self, f"{method} {endpoint}: {self.detail}")  # an answer came: not "no response"
        self.frame = frame
        self.arrivals = arrivals
