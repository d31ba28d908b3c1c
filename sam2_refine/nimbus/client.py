"""The one HTTP client of this worker: every call it makes to the NimbusImage server.

One class, :class:`NimbusClient`: one session per job, every endpoint the worker uses (dataset,
frames, views, annotations, connections, the interface), each call's paging, chunking and errors.
The data it reads and raises live beside it: :mod:`~sam2_refine.nimbus.dataset`,
:mod:`~sam2_refine.nimbus.errors`, :mod:`~sam2_refine.nimbus.retry`, :mod:`~sam2_refine.nimbus.frames`.

Built on :class:`girder_client.GirderClient` (token set with ``setToken``, sent as the
``Girder-Token`` header, never in a URL) with one :class:`requests.Session` for the whole job.

Errors
    Every HTTP or network failure raises :class:`~sam2_refine.nimbus.errors.NimbusAPIError`
    (:mod:`sam2_refine.nimbus.errors`); its text never contains the token: the client scrubs it
    from every message.

Retries
    urllib3's Retry, mounted on the session, as :class:`~sam2_refine.nimbus.retry.RetryPolicy`
    says (:mod:`sam2_refine.nimbus.retry`). POST is never retried once a request may have reached
    the server (creating is not idempotent); a failed create raises
    :class:`~sam2_refine.nimbus.errors.PartialCreateError` with what earlier chunks did create.

Paging
    Annotation lists are read in pages (``limit`` + ``afterId`` cursor on ``_id``, the real
    server's cursor pagination), so a dataset with a million annotations never needs one giant
    response. Creation and deletion are chunked (at most :data:`MAX_CHUNK` per request).

Pixels
    Frames are fetched exactly, in the frame's own dtype: ``encoding=pickle:5`` read by an
    allow-listed unpickler (numpy's array-rebuilding globals only), else ``TILED`` (a tiled TIFF,
    exact for 8 and 16 bits), else ``TIFF`` (exact for 8 bits only). Each frame is checked
    against the tile metadata (dtype, size); one that arrives degraded is refused
    (:class:`~sam2_refine.nimbus.errors.DegradedFrameError`), never refined. See :mod:`sam2_refine.nimbus.frames`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from typing import Any

import girder_client
import numpy as np
import requests
from requests.adapters import HTTPAdapter

from sam2_refine.nimbus.dataset import DatasetInfo, frame_map_from_tiles
from sam2_refine.nimbus.errors import (
    DegradedFrameError,
    NimbusAPIError,
    PartialCreateError,
    ServerLacksEndpoint,
    UnreadableFrameError,
)
from sam2_refine.nimbus.frames import (
    FrameDecodeError,
    FrameSpec,
    as_plane,
    frame_mismatch,
    read_tiff_plane,
    unpickle_array,
)
from sam2_refine.nimbus.progress import scrub
from sam2_refine.nimbus.retry import RetryPolicy, Timeouts
from sam2_refine.nimbus.views import ViewLayers, choose_view, rank_views

log = logging.getLogger(__name__)

#: Largest number of annotations (or connections, or ids) sent in one request.
MAX_CHUNK = 5000
#: Annotations read per page.
DEFAULT_PAGE_SIZE = 5000
#: Ids per ``upenn_annotation/hydrate`` request.
HYDRATE_CHUNK = 5000

#: How frames are asked for, most exact first (see :mod:`sam2_refine.nimbus.frames`).
FRAME_ENCODINGS = ("pickle:5", "TILED", "TIFF")
_ENCODING_PARAMS: dict[str, dict[str, str]] = {
    "pickle:5": {"encoding": "pickle:5"},
    # Uncompressed tiles: LZW (the server's default for TILED) needs a codec tifffile lacks.
    "TILED": {"encoding": "TILED", "tiffCompression": "none"},
    "TIFF": {"encoding": "TIFF"},
}


def _server_message(response: requests.Response | None) -> str:
    if response is None:
        return ""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict) and "message" in body:
        return str(body["message"])[:300]
    return str(body)[:300]


class NimbusClient:
    """Speaks the NimbusImage REST API (docs/nimbus-contract.md §5) for one job.

    Use as a context manager, or call :meth:`close`, to release the HTTP session.

    Args:
        api_url: The API root, e.g. ``http://host/api/v1``.
        token: The Girder token. It is sent as a header and scrubbed from every error text.
        retry: Backoff for transient failures.
        timeouts: Connect and read timeouts, applied to every request.
    """

    def __init__(
        self,
        api_url: str,
        token: str,
        *,
        retry: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
    ) -> None:
        self._token = token
        self._api_url = api_url
        self.retry = retry or RetryPolicy()
        self.timeouts = timeouts or Timeouts()
        self._gc = girder_client.GirderClient(apiUrl=api_url)
        self._gc.setToken(token)
        self._stack = ExitStack()
        session = requests.Session()
        adapter = HTTPAdapter(max_retries=self.retry.to_urllib3())
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self._stack.enter_context(self._gc.session(session))
        #: Frame encodings to try, in order (narrowed once a later one is the first that works).
        self._frame_encodings: tuple[str, ...] = FRAME_ENCODINGS
        #: Set once a listing found that the server ignores the ``afterId`` cursor and paged by
        #: offset instead (then another client's deletions during a listing can hide annotations).
        self.pages_by_offset = False

    def close(self) -> None:
        self._stack.close()

    @property
    def api_url(self) -> str:
        """The API root this client talks to (for messages: its host names the server)."""
        return self._api_url

    def clone(self) -> NimbusClient:
        """A new client with the same server, token and policies, and its own HTTP session
        (a requests session is not meant to be shared between threads)."""
        twin = NimbusClient(self._api_url, self._token, retry=self.retry, timeouts=self.timeouts)
        twin._frame_encodings = self._frame_encodings
        return twin

    def __enter__(self) -> NimbusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ----------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return scrub(text, (self._token,))

    def _request(
        self,
        method: str,
        endpoint: str,
        *,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        raw: bool = False,
    ) -> Any:
        """Send one request; return parsed JSON (or the response when ``raw``).

        Raises:
            NimbusAPIError: on any HTTP error status or network failure.
        """
        try:
            result = self._gc.sendRestRequest(
                method,
                endpoint,
                parameters=params,
                json=json_body,
                jsonResp=not raw,
                timeout=(self.timeouts.connect, self.timeouts.read),
            )
        except girder_client.HttpError as exc:
            detail = self._scrub(_server_message(exc.response))
            raise NimbusAPIError(method, endpoint, exc.status, detail) from None
        except requests.RequestException as exc:
            detail = self._scrub(f"{type(exc).__name__}: {exc}")
            network = isinstance(exc, (requests.ConnectionError, requests.Timeout,
                                       requests.exceptions.ChunkedEncodingError))
            raise NimbusAPIError(method, endpoint, None, detail, exc if network else None) from None
        except ValueError as exc:  # a 2xx whose body is not JSON
            raise NimbusAPIError(method, endpoint, None, f"invalid JSON response: {exc}") from None
        return result

    # -- dataset and pixels -------------------------------------------------------------------

    def get_folder(self, dataset_id: str) -> dict[str, Any]:
        return self._request("GET", f"folder/{dataset_id}")

    def find_image_item(self, dataset_id: str) -> dict[str, Any]:
        """The dataset's large-image item: ``meta.selectedLargeImageId``, else the first item
        with a ``largeImage`` key.

        Raises:
            NimbusAPIError: the folder has no large image (status None, explained in detail).
        """
        folder = self.get_folder(dataset_id)
        selected = (folder.get("meta") or {}).get("selectedLargeImageId")
        items = self._request("GET", "item", params={"folderId": dataset_id, "limit": 0})
        if selected:
            for item in items:
                if item.get("_id") == selected:
                    return item
        for item in items:
            if "largeImage" in item:
                return item
        raise NimbusAPIError("GET", "item", None, f"dataset {dataset_id} holds no large image")

    def get_tiles(self, item_id: str) -> dict[str, Any]:
        return self._request("GET", f"item/{item_id}/tiles")

    def get_internal_metadata(self, item_id: str) -> dict[str, Any]:
        return self._request("GET", f"item/{item_id}/tiles/internal_metadata")

    def get_dataset_info(self, dataset_id: str) -> DatasetInfo:
        """Folder -> image item -> tile metadata -> :class:`DatasetInfo`."""
        item = self.find_image_item(dataset_id)
        tiles = self.get_tiles(item["_id"])
        names = tiles.get("channels") or []
        return DatasetInfo(
            dataset_id=dataset_id,
            item_id=item["_id"],
            width=int(tiles["sizeX"]),
            height=int(tiles["sizeY"]),
            dtype=tiles.get("dtype"),
            frames=frame_map_from_tiles(tiles),
            channel_names=tuple(str(n) for n in names),
        )

    def get_frame(
        self,
        item_id: str,
        frame: int,
        window: tuple[int, int, int, int] | None = None,
        *,
        expected: FrameSpec | None = None,
    ) -> np.ndarray:
        """One frame's exact pixels, in the frame's own dtype, checked against ``expected``.

        The encodings of :data:`FRAME_ENCODINGS` are tried in order (see
        :mod:`sam2_refine.nimbus.frames` for what each keeps): one the server cannot serve
        (HTTP 400 or 500, a body that does not decode) or that arrives unlike ``expected``
        (an 8-bit TIFF of a 16-bit frame) is followed by the next. Once an encoding other than
        the first has worked, this client (and its clones made afterwards) start from it.

        Args:
            item_id: The large-image item.
            frame: Frame number (see :meth:`DatasetInfo.frame_number`).
            window: Optional (left, top, right, bottom) in pixels; right/bottom exclusive.
            expected: What the tile metadata promises (dtype, width, height of the frame or
                window); None checks nothing.

        Returns:
            2-D array of shape (rows, columns) = (height, width) of the frame or window.

        Raises:
            DegradedFrameError: an encoding arrived unlike ``expected`` and none arrived as expected.
            NimbusAPIError: no encoding could be fetched and read (each one's failure is listed).
        """
        endpoint = f"item/{item_id}/tiles/region"
        params: dict[str, Any] = {"frame": int(frame)}
        if window is not None:
            left, top, right, bottom = (int(v) for v in window)
            params.update(left=left, top=top, right=right, bottom=bottom)
        failures: list[str] = []
        degraded = False
        first_error: NimbusAPIError | None = None
        encodings = self._frame_encodings
        for position, encoding in enumerate(encodings):
            try:
                pixels = self._fetch_plane(endpoint, frame, {**params, **_ENCODING_PARAMS[encoding]})
            except NimbusAPIError as exc:
                if not isinstance(exc, UnreadableFrameError) and exc.status not in (400, 500):
                    raise  # not a matter of encoding: refused, missing, unreachable
                first_error = first_error or exc
                failures.append(f"{encoding}: " + (exc.detail if isinstance(exc, UnreadableFrameError)
                                                   else f"HTTP {exc.status} {exc.detail}"))
                log.info("frame %s: encoding %s failed (%s); trying the next", frame, encoding, exc.detail)
                continue
            problem = frame_mismatch(pixels, expected) if expected is not None else None
            if problem is not None:
                degraded = True
                failures.append(f"{encoding}: {problem}")
                continue
            if position:
                self._frame_encodings = encodings[position:]
                log.info("frames are fetched with encoding %s from now on", encoding)
            return pixels
        if degraded:
            raise DegradedFrameError("GET", endpoint, frame, failures)
        assert first_error is not None
        raise NimbusAPIError("GET", endpoint, first_error.status,
                             f"frame {frame} could not be read in any encoding: " + "; ".join(failures))

    def _fetch_plane(self, endpoint: str, frame: int, params: dict[str, Any]) -> np.ndarray:
        response = self._request("GET", endpoint, params=params, raw=True)
        try:
            if params["encoding"].startswith("pickle"):
                pixels = unpickle_array(response.content)
            else:
                pixels = read_tiff_plane(response.content)
            return as_plane(pixels)
        except FrameDecodeError as exc:
            raise UnreadableFrameError("GET", endpoint, response.status_code, str(exc)) from None

    def get_layers(self, dataset_id: str, tool_id: str | None = None) -> ViewLayers:
        """The layer settings of the dataset view the user most likely sees (the choice:
        :mod:`sam2_refine.nimbus.views`): its configuration's layers and the view's own contrasts
        (``layerContrasts``); empty when the dataset has no view.

        Args:
            dataset_id: The dataset folder id.
            tool_id: The tool that launched the job (compute parameter ``id``), or None.
        """
        # limit=0: every view (the server's default page is 50); the order is made by rank_views.
        query = {"datasetId": dataset_id, "limit": 0, "sort": "lastViewed", "sortdir": -1}
        own = self._request("GET", "dataset_view", params={**query, "currentUserOnly": "true"})
        readable = self._request("GET", "dataset_view", params=query)
        return choose_view(rank_views(own, readable),
                           lambda config_id: self._request("GET", f"upenn_collection/{config_id}"), tool_id)

    # -- annotations --------------------------------------------------------------------------

    def iter_annotation_pages(
        self,
        dataset_id: str,
        shape: str,
        tags: Sequence[str] | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> Iterator[list[dict[str, Any]]]:
        """Yield the dataset's annotations of one shape, a page at a time, in ``_id`` order.

        Args:
            tags: If given, only annotations carrying ALL of them (the server's filter).
            page_size: Annotations per request (> 0).
        """
        if page_size <= 0:
            raise ValueError("page_size must be positive")
        params: dict[str, Any] = {
            "datasetId": dataset_id, "shape": shape, "limit": page_size,
            "sort": "_id", "sortdir": 1,
        }
        if tags:
            params["tags"] = json.dumps(list(tags))
        yield from self._cursor_pages("upenn_annotation", params, page_size)

    def list_annotations(
        self, dataset_id: str, shape: str, tags: Sequence[str] | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> list[dict[str, Any]]:
        """All annotations of one shape (see :meth:`iter_annotation_pages`)."""
        return [a for page in self.iter_annotation_pages(dataset_id, shape, tags, page_size) for a in page]

    def list_annotation_ids(
        self,
        dataset_id: str,
        location: dict[str, int] | None = None,
        shape: str | None = None,
        tags: Sequence[str] | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[str]:
        """Ids of the dataset's annotations matching filters (``POST upenn_annotation/list/ids``,
        NimbusImage servers from mid-2026).

        Args:
            location: Any of ``XY``, ``Z``, ``Time`` (0-based); a key left out matches every value.
            shape: Only this shape.
            tags: Only annotations with ANY of these tags (the plugin's ``exclusive: false``).
            ids: Only these ids (the plugin's ``idConstraints``): which of them exist. An empty
                list matches nothing and is not sent (the plugin refuses ``[[]]`` with 400).

        Raises:
            ServerLacksEndpoint: the server has no such endpoint (404 or 405: an older server).
        """
        if ids is not None and not ids:
            return []
        filters: dict[str, Any] = {}
        if location:
            filters["location"] = dict(location)
        if shape:
            filters["shape"] = shape
        if tags:
            filters["tags"] = {"values": list(tags), "exclusive": False}
        if ids is not None:
            filters["idConstraints"] = [list(ids)]
        body = self._optional("POST", "upenn_annotation/list/ids", {"datasetId": dataset_id, "filters": filters})
        if not isinstance(body, dict) or not isinstance(body.get("ids"), list):
            raise NimbusAPIError("POST", "upenn_annotation/list/ids", None, "expected {total, ids}")
        return [str(i) for i in body["ids"]]

    def hydrate(self, annotation_ids: Sequence[str], chunk_size: int = HYDRATE_CHUNK) -> list[dict[str, Any]]:
        """The documents of the annotations among ``annotation_ids`` that exist
        (``POST upenn_annotation/hydrate``), asked for ``chunk_size`` ids at a time (the plugin
        warns that very long lists approach MongoDB's document size limit).

        Raises:
            ServerLacksEndpoint: the server has no such endpoint (404 or 405: an older server).
        """
        docs: list[dict[str, Any]] = []
        for start in range(0, len(annotation_ids), _checked_chunk(chunk_size)):
            chunk = [str(i) for i in annotation_ids[start:start + chunk_size]]
            page = self._optional("POST", "upenn_annotation/hydrate", chunk)
            if not isinstance(page, list):
                raise NimbusAPIError("POST", "upenn_annotation/hydrate", None, "expected a JSON list")
            docs.extend(d for d in page if isinstance(d, dict))
        return docs

    def count_annotations(self, dataset_id: str) -> int:
        """How many annotations the dataset holds (``GET upenn_annotation/count``)."""
        return _count(self._request("GET", "upenn_annotation/count", params={"datasetId": dataset_id}),
                      "upenn_annotation/count")

    def count_connections(self, dataset_id: str) -> int:
        """How many connections the dataset holds (``GET annotation_connection/count``)."""
        return _count(self._request("GET", "annotation_connection/count", params={"datasetId": dataset_id}),
                      "annotation_connection/count")

    def _optional(self, method: str, endpoint: str, body: Any) -> Any:
        """A request to an endpoint older servers lack: 404 or 405 raise :class:`ServerLacksEndpoint`."""
        try:
            return self._request(method, endpoint, json_body=body)
        except NimbusAPIError as exc:
            if exc.status in (404, 405):
                raise ServerLacksEndpoint(exc.method, exc.endpoint, exc.status, exc.detail) from None
            raise

    def get_annotation(self, annotation_id: str) -> dict[str, Any] | None:
        """One annotation by id, or None when the server has no such annotation.

        Girder answers a missing (or malformed) id with 400 "Invalid upenn_annotation id";
        404 is taken the same way.

        Raises:
            NimbusAPIError: any other failure (403: not readable with this token).
        """
        try:
            doc = self._request("GET", f"upenn_annotation/{annotation_id}")
        except NimbusAPIError as exc:
            if exc.status == 404 or (exc.status == 400 and "invalid" in exc.detail.lower()):
                return None
            raise
        if not isinstance(doc, dict):
            raise NimbusAPIError("GET", "upenn_annotation/{id}", None, "expected a JSON object")
        return doc

    def create_annotations(
        self, annotations: Sequence[dict[str, Any]], chunk_size: int = MAX_CHUNK,
    ) -> list[dict[str, Any]]:
        """Create annotations, at most ``chunk_size`` per request, in order.

        Returns:
            The created documents (each with ``_id``), in input order.

        Raises:
            PartialCreateError: a chunk failed or its response did not confirm it; ``created``
                holds what earlier chunks created, and no later chunk was sent.
        """
        return self._create_many("upenn_annotation/multiple", annotations, chunk_size)

    def delete_annotations(self, ids: Sequence[str], chunk_size: int = MAX_CHUNK) -> int:
        """Delete annotations by id. NimbusImage's bulk delete LEAVES their connections on the
        server (see :mod:`sam2_refine.job.converge`, which removes them itself).

        Returns:
            How many ids were sent for deletion (all of them, or an exception is raised).
        """
        for start in range(0, len(ids), _checked_chunk(chunk_size)):
            chunk = [str(i) for i in ids[start:start + chunk_size]]
            self._request("DELETE", "upenn_annotation/multiple", json_body=chunk)
        return len(ids)

    def update_annotation_tags(self, tags_by_id: Sequence[tuple[str, Sequence[str]]],
                               chunk_size: int = MAX_CHUNK) -> int:
        """Set the whole tag list of existing annotations, ``(id, tags)`` each; nothing else of
        them changes.

        ``PUT upenn_annotation/multiple`` with ``[{"id": ..., "tags": [...]}, ...]``, as the app
        sends a tag edit (``src/store/AnnotationsAPI.ts`` ``updateAnnotations``): the server
        replaces each named field and keeps the rest of the stored document
        (``server/api/annotation.py`` ``updateMultiple``). Each chunk is all or nothing: an id
        the server does not hold fails it (403), and so does a stored document its schema
        refuses (400). Setting a tag list is idempotent, so a PUT is retried like a GET.

        Returns:
            How many annotations were updated (all of them, or an exception is raised).

        Raises:
            NimbusAPIError: a chunk failed; the chunks before it were updated.
        """
        for start in range(0, len(tags_by_id), _checked_chunk(chunk_size)):
            body = [{"id": str(ann_id), "tags": [str(t) for t in tags]}
                    for ann_id, tags in tags_by_id[start:start + chunk_size]]
            self._request("PUT", "upenn_annotation/multiple", json_body=body)
        return len(tags_by_id)

    # -- connections --------------------------------------------------------------------------

    def iter_connection_pages(
        self,
        dataset_id: str,
        parent_id: str | None = None,
        child_id: str | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        *,
        node_id: str | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        """Connections of a dataset, a page at a time, optionally only those of one parent and/or
        child, or those with ``node_id`` at either end; paged with the ``afterId`` cursor in
        ``_id`` order (the server's default order is not ``_id``, so it is asked for)."""
        params: dict[str, Any] = {"datasetId": dataset_id, "limit": page_size, "sort": "_id", "sortdir": 1}
        for key, value in (("parentId", parent_id), ("childId", child_id), ("nodeAnnotationId", node_id)):
            if value:
                params[key] = value
        yield from self._cursor_pages("annotation_connection", params, page_size)

    def _cursor_pages(self, endpoint: str, params: dict[str, Any], page_size: int) -> Iterator[list[dict[str, Any]]]:
        """``GET endpoint`` a page at a time, in ``_id`` order (``params`` ask for it), each later
        page after the last ``_id`` read (``afterId``). A server that ignores ``afterId`` answers
        the first page again: from then on the pages are asked for by offset (and
        :attr:`pages_by_offset` says so)."""
        read = 0
        after: str | None = None
        cursor_ok = True
        while True:
            page_params = dict(params)
            if after is not None:
                page_params.update({"afterId": after} if cursor_ok else {"offset": read})
            page = self._request("GET", endpoint, params=page_params)
            if not isinstance(page, list):
                raise NimbusAPIError("GET", endpoint, None, "expected a JSON list")
            if cursor_ok and after is not None and page and str(page[0].get("_id", "")) <= after:
                cursor_ok = False  # an older server ignores afterId and starts again: page by offset
                self.pages_by_offset = True
                continue
            if page:
                yield page
            read += len(page)
            if len(page) < page_size:
                return
            after = str(page[-1].get("_id", ""))

    def list_connections(
        self,
        dataset_id: str,
        parent_id: str | None = None,
        child_id: str | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        *,
        node_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """All connections :meth:`iter_connection_pages` yields, in one list."""
        return [c for page in self.iter_connection_pages(dataset_id, parent_id, child_id, page_size, node_id=node_id)
                for c in page]

    def create_connections(
        self, connections: Sequence[dict[str, Any]], chunk_size: int = MAX_CHUNK,
    ) -> list[dict[str, Any]]:
        """Create connections ``{parentId, childId, datasetId, label, tags}``, chunked, in order."""
        return self._create_many("annotation_connection/multiple", connections, chunk_size)

    def delete_connections(self, ids: Sequence[str], chunk_size: int = MAX_CHUNK) -> int:
        """Delete connections by id (ids the server no longer has are ignored by it)."""
        for start in range(0, len(ids), _checked_chunk(chunk_size)):
            self._request("DELETE", "annotation_connection/multiple",
                          json_body=[str(i) for i in ids[start:start + chunk_size]])
        return len(ids)

    def _create_many(
        self, endpoint: str, docs: Sequence[dict[str, Any]], chunk_size: int,
    ) -> list[dict[str, Any]]:
        created: list[dict[str, Any]] = []
        for start in range(0, len(docs), _checked_chunk(chunk_size)):
            chunk = list(docs[start:start + chunk_size])
            try:
                response = self._request("POST", endpoint, json_body=chunk)
                confirmed = _confirm_created(endpoint, chunk, response)
            except NimbusAPIError as exc:
                raise PartialCreateError(exc, created, len(docs) - len(created)) from None
            created.extend(confirmed)
        return created

    # -- worker interface ---------------------------------------------------------------------

    def post_interface(self, image: str, interface: dict[str, Any]) -> Any:
        """Publish the worker's UI description for the Docker image ``image``."""
        return self._request("POST", "worker_interface", params={"image": image}, json_body=interface)


def _count(body: Any, endpoint: str) -> int:
    if not isinstance(body, dict) or not isinstance(body.get("count"), int) or isinstance(body["count"], bool):
        raise NimbusAPIError("GET", endpoint, None, "expected {count}")
    return int(body["count"])


def _checked_chunk(chunk_size: int) -> int:
    if not 0 < chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK}, got {chunk_size}")
    return chunk_size


def _confirm_created(endpoint: str, sent: list[dict[str, Any]], response: Any) -> list[dict[str, Any]]:
    """Check that a create response confirms every sent document, in order."""
    if not isinstance(response, list) or len(response) != len(sent):
        got = len(response) if isinstance(response, list) else type(response).__name__
        raise NimbusAPIError("POST", endpoint, None,
                             f"the server confirmed {got} of {len(sent)} documents")
    for doc in response:
        if not isinstance(doc, dict) or not doc.get("_id"):
            raise NimbusAPIError("POST", endpoint, None, "a created document came back without _id")
    return response
