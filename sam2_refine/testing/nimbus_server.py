"""A local NimbusImage server for tests, the demo and the benchmarks: a double of the real one.

A real HTTP server on 127.0.0.1 (a free port) that speaks the endpoints and JSON shapes of the
NimbusImage API that this worker uses, with everything held in memory. Each behaviour it
imitates follows the real server's code, named where it is implemented (NimbusImage's plugin
``devops/girder/plugins/AnnotationPlugin/upenncontrast_annotation/server/``, large_image's
``girder-5`` branch; tests/test_server_double.py has a test per behaviour):

- datasets built from numpy arrays of shape (XY, T, Z, C, H, W) in uint8, uint16 or float32;
  tile metadata and regions as large_image gives them (:mod:`sam2_refine.testing.large_image_double`:
  512 px tiles, ``Index`` unlike ``Frame``, ``encoding=TIFF`` squeezed to 8 bits, ``TILED``
  exact for 8/16 bits and needing pyvips, ``pickle:N`` exact); no ``selectedLargeImageId`` on
  the folder unless asked;
- layer settings (``dataset_view`` -> ``upenn_collection``; the view's ``layerContrasts``),
  annotations and connections;
- the ``Girder-Token`` header checked on every request (401 otherwise);
- created annotations validated as the real server validates them (required ``coordinates,
  tags, channel, location, shape, datasetId``; shape one of point/line/polygon/rectangle;
  all-or-nothing per request, 400 with a message); ``shape=blob`` lists nothing; with
  ``afterId``, ``Girder-Total-Count`` counts what lies after the cursor; non-finite numbers are
  served as ``null`` (as orjson does);
- connections as the plugin treats them: the bulk delete of annotations LEAVES their
  connections, deleting one annotation removes its connections, creating connections answers
  400 for the whole body when any end does not exist;
- annotations updated in part (``PUT upenn_annotation/multiple``, what the app sends when a
  user edits tags: only the fields given change, the merged documents validated all or nothing);
- every request recorded (:attr:`NimbusTestServer.requests`), and faults on demand
  (:meth:`NimbusTestServer.fail`): a status on the k-th call to an endpoint or always, a dropped
  connection (before or after the server acted), or a delay.

Usage::

    with NimbusTestServer(token="secret") as server:
        ds = server.add_dataset(pixels)            # pixels: (XY, T, Z, C, H, W)
        server.add_annotations(ds.dataset_id, [...])
        ... run the worker with --apiUrl server.api_url --token secret ...
"""

from __future__ import annotations

import itertools
import json
import math
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np

from sam2_refine.testing.annotation_store import AnnotationStore, ConnectionStore
from sam2_refine.testing.large_image_double import RegionError, encode_region, tile_metadata

API_ROOT = "/api/v1/"
REQUIRED_ANNOTATION_KEYS = ("coordinates", "tags", "channel", "location", "shape", "datasetId")
ANNOTATION_SHAPES = ("point", "line", "polygon", "rectangle")
#: The fields an update may change: the annotation schema's properties (upstream
#: helpers/customModel.py ``getUpdatableFields``, models/annotation.py ``annotationSchema``).
UPDATABLE_ANNOTATION_KEYS = ("name", "coordinates", "tags", "channel", "location", "shape", "datasetId", "color")
AXES = ("XY", "T", "Z", "C")


class _ObjectIds:
    """24-hex-digit ids, like MongoDB ObjectIds.

    ``ordered=True``: they increase with creation order (one server process). ``ordered=False``:
    drawn at random (seeded), as ids made by several server processes or clocks are not ordered
    by creation time; a client must not read any order of creation into them.
    """

    def __init__(self, ordered: bool = True, seed: int = 0) -> None:
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._rng = None if ordered else np.random.default_rng(seed)
        self._used: set[str] = set()

    def new(self) -> str:
        with self._lock:
            if self._rng is None:
                return f"{0x650000000000000000000000 + next(self._counter):024x}"
            while True:
                value = "".join(f"{int(b):02x}" for b in self._rng.integers(0, 256, 12))
                if value not in self._used:
                    self._used.add(value)
                    return value


@dataclass
class TestDataset:
    """A dataset held by the server.

    Attributes:
        dataset_id: Folder id (what the worker gets as ``--datasetId``).
        item_id: The large-image item.
        pixels: Shape (XY, T, Z, C, H, W).
        frame_of: (xy, t, z, c) -> frame number.
        layers: The view's layer settings, or None for a dataset without a view.
    """

    dataset_id: str
    item_id: str
    pixels: np.ndarray
    frame_of: dict[tuple[int, int, int, int], int]
    layers: list[dict[str, Any]] | None
    view_id: str | None = None
    collection_id: str | None = None
    channel_names: tuple[str, ...] = ()
    #: The frames in the order the tile metadata lists them: ((xy, t, z, c), frame number).
    frame_list: list[tuple[tuple[int, int, int, int], int]] = field(default_factory=list)

    def frame_pixels(self, frame: int) -> np.ndarray:
        """The (H, W) plane of frame number ``frame``."""
        xy, t, z, c = self._index_of_frame[frame]
        return self.pixels[xy, t, z, c]

    @cached_property
    def _index_of_frame(self) -> dict[int, tuple[int, int, int, int]]:
        return {number: key for key, number in self.frame_of.items()}


@dataclass
class Fault:
    """A failure the server injects for requests matching ``method`` and ``path``.

    ``path`` is a regular expression matched against the path after ``/api/v1/``. ``calls`` are
    the 1-based numbers of the matching calls that fail (None = every call). ``client``: only
    requests made with the token registered under that name (:meth:`NimbusTestServer.add_token`).
    ``action``: ``"status"`` answers ``status``; ``"drop_before"`` closes the connection without
    acting; ``"drop_after"`` acts (creates, deletes) and then closes the connection without an
    answer; ``"delay"`` sleeps ``delay`` seconds and then answers normally.
    """

    method: str
    path: str
    status: int = 500
    calls: frozenset[int] | None = None
    action: str = "status"
    delay: float = 0.0
    client: str | None = None
    seen: int = 0
    fired: int = 0

    def matches(self, method: str, path: str, client: str | None = None) -> bool:
        return (method == self.method and re.fullmatch(self.path, path) is not None
                and (self.client is None or self.client == client))


@dataclass
class RecordedRequest:
    """One request the server received (the token itself is not kept: ``client`` is the name
    its token was registered under, see :meth:`NimbusTestServer.add_token`)."""

    method: str
    path: str
    params: dict[str, str]
    body: Any
    authorized: bool
    status: int = 0
    client: str | None = None
    #: time.monotonic() when the server finished acting on it (0 while it is in flight).
    done_at: float = 0.0
    #: Bytes of the response body the server sent (0 while in flight, or when it dropped it).
    response_bytes: int = 0


def _finite(obj: Any) -> Any:
    """Replace non-finite floats by None, as the real server's JSON encoder (orjson) does."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


class _BadRequest(Exception):
    """An error answer. ``kind`` is Girder's ``type``: ``"validation"`` for schema and id
    problems (girder.exceptions.ValidationException), ``"rest"`` otherwise."""

    def __init__(self, status: int, message: str, kind: str = "rest", field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.field = field


class DroppedRequest(Exception):
    """Close the connection without an answer (raised by a fault, or by a ``before_acting`` hook)."""



@dataclass
class _State:
    datasets: dict[str, TestDataset] = field(default_factory=dict)
    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    views: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: view id -> the client (token name; None = the main token) whose user owns the view.
    view_owners: dict[str, str | None] = field(default_factory=dict)
    collections: dict[str, dict[str, Any]] = field(default_factory=dict)
    annotations: AnnotationStore = field(default_factory=AnnotationStore)
    connections: ConnectionStore = field(default_factory=ConnectionStore)
    interfaces: dict[str, Any] = field(default_factory=dict)


class NimbusTestServer:
    """An in-memory NimbusImage API on 127.0.0.1 (see the module docstring).

    Args:
        token: The token the server accepts (more with :meth:`add_token`).
        port: 0 picks a free port.
        poll_interval: Seconds between the serving thread's shutdown checks (stopping waits this long).
        ordered_ids: Ids increase with creation order; False draws them at random (several
            server processes: ids are not ordered by creation time).
        id_seed: Seed for random ids.
    """

    def __init__(self, token: str = "test-token", port: int = 0, poll_interval: float = 0.02,
                 ordered_ids: bool = True, id_seed: int = 0) -> None:
        self.token = token
        self.poll_interval = poll_interval
        self._ids = _ObjectIds(ordered_ids, id_seed)
        #: token -> client name, for tokens other than ``token`` (several jobs, told apart).
        self._clients: dict[str, str] = {}
        #: Called as ``hook(request)`` before the server acts on each authorized request (in the
        #: request's thread: it may sleep or wait, to force an interleaving of several clients;
        #: see :mod:`sam2_refine.testing.interleave`).
        self.before_acting: Callable[[RecordedRequest], None] | None = None
        #: Called as ``ids(client)`` for the id of each annotation a client creates, when set (to
        #: choose which of two jobs' refinements has the smaller id); else :meth:`new_id`.
        self.annotation_ids: Callable[[str | None], str] | None = None
        self._lock = threading.RLock()
        self.state = _State()
        self.requests: list[RecordedRequest] = []
        self.faults: list[Fault] = []
        #: Honour ``afterId`` on annotation lists (set False to act like an older server).
        self.cursor_paging = True
        #: Regions in ``encoding=pickle:N`` (False: a girder_large_image from before pickle output).
        self.serves_pickle = True
        #: pyvips installed, which ``encoding=TILED`` needs (False: it answers 500).
        self.has_pyvips = True
        #: ``POST upenn_annotation/list/ids`` and ``hydrate`` exist (False: an older server, 404).
        self.has_list_ids = True
        #: How many ``list/ids`` queries the server ran (each walks the whole dataset).
        self.scans = 0
        #: How many connection listings it answered (each walks all of the dataset's connections).
        self.connection_scans = 0
        self._calls: Counter[tuple[str, str]] = Counter()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    def start(self) -> NimbusTestServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, name="nimbus-test-server",
                                            kwargs={"poll_interval": self.poll_interval}, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> NimbusTestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- building state -----------------------------------------------------------------------

    def new_id(self) -> str:
        return self._ids.new()

    def add_token(self, token: str, client: str) -> None:
        """Accept ``token`` too; its requests are recorded (and matched by faults) as ``client``."""
        with self._lock:
            self._clients[token] = client

    def add_dataset(
        self,
        pixels: np.ndarray,
        *,
        name: str = "dataset",
        layers: list[dict[str, Any]] | None = None,
        layer_contrasts: dict[str, Any] | None = None,
        channel_names: Sequence[str] | None = None,
        shuffle_frames: bool = False,
        select_image: bool = False,
        extra_items: int = 1,
    ) -> TestDataset:
        """Add a dataset (folder + large-image item + optional view with layer settings).

        Args:
            pixels: Shape (XY, T, Z, C, H, W); uint8, uint16 or float32.
            layers: Layer settings for the dataset's view; None gives a dataset without a view.
            layer_contrasts: The view's per-layer contrast overrides (``layerContrasts``: layer id
                -> ``{mode, blackPoint, whitePoint}``); None stores ``{}``. Needs ``layers``.
            shuffle_frames: List frames in a scrambled order (frame numbers stay consistent),
                so that clients must use ``Frame``, not list positions.
            select_image: Set ``meta.selectedLargeImageId`` on the folder. Off by default: a
                dataset folder the app makes has no such key (the app sends null, and Girder's
                folder metadata update drops null values).
            extra_items: Plain (non-image) items listed before the image item.
        """
        pixels = np.asarray(pixels)
        if pixels.ndim != 6:
            raise ValueError("pixels must have shape (XY, T, Z, C, H, W)")
        if pixels.dtype not in (np.uint8, np.uint16, np.float32):
            raise ValueError(f"unsupported dtype {pixels.dtype}")
        if layer_contrasts is not None and layers is None:
            raise ValueError("layer_contrasts belong to a dataset view: give layers too")
        n_xy, n_t, n_z, n_c = pixels.shape[:4]
        order = [(xy, t, z, c) for xy in range(n_xy) for t in range(n_t) for z in range(n_z) for c in range(n_c)]
        frame_of = {key: number for number, key in enumerate(order)}
        with self._lock:
            folder_id, item_id = self.new_id(), self.new_id()
            folder = {"_id": folder_id, "name": name, "_modelType": "folder",
                      "meta": {"subtype": "contrastDataset"}}
            if select_image:
                folder["meta"]["selectedLargeImageId"] = item_id
            self.state.folders[folder_id] = folder
            for k in range(extra_items):
                extra = self.new_id()
                self.state.items[extra] = {"_id": extra, "name": f"notes-{k}.txt", "folderId": folder_id}
            self.state.items[item_id] = {"_id": item_id, "name": f"{name}.tiff", "folderId": folder_id,
                                         "largeImage": {"fileId": self.new_id()}}
            frame_list = list(frame_of.items())
            if shuffle_frames:
                perm = np.random.default_rng(len(order)).permutation(len(order))
                frame_list = [frame_list[i] for i in perm]
            ds = TestDataset(folder_id, item_id, pixels, frame_of, layers,
                             channel_names=tuple(channel_names or (f"Channel {c}" for c in range(n_c))),
                             frame_list=frame_list)
            self.state.datasets[folder_id] = ds
            if layers is not None:
                ds.view_id = self.add_view(folder_id, layers, layer_contrasts=layer_contrasts,
                                           configuration_name=f"{name} configuration")
                ds.collection_id = self.state.views[ds.view_id]["configurationId"]
        return ds

    def add_view(
        self,
        dataset_id: str,
        layers: list[dict[str, Any]] | None = None,
        *,
        configuration_id: str | None = None,
        layer_contrasts: dict[str, Any] | None = None,
        owner: str | None = None,
        last_viewed: float | None = None,
        tools: list[dict[str, Any]] | None = None,
        configuration_name: str = "configuration",
    ) -> str:
        """Add a dataset view (one user's view of the dataset in one configuration); its id.

        Args:
            dataset_id: The dataset.
            layers: Layers of a new configuration made for this view (with ``tools``).
            configuration_id: Or an existing configuration (another user's view of it).
            layer_contrasts: The view's ``layerContrasts``; None stores ``{}``.
            owner: The client (:meth:`add_token` name; None = the main token) whose user owns
                the view. Every view is readable by every token (as if shared).
            last_viewed: ``lastViewed`` (epoch ms, set by the app when the view is opened);
                None leaves the key out (a view never opened since it was made).
            tools: The new configuration's ``meta.tools`` (each ``{"id": ..., ...}``).
        """
        if (layers is None) == (configuration_id is None):
            raise ValueError("give either layers (a new configuration) or configuration_id")
        with self._lock:
            if dataset_id not in self.state.folders:
                raise ValueError(f"no dataset {dataset_id}")
            if configuration_id is None:
                configuration_id = self.new_id()
                self.state.collections[configuration_id] = {
                    "_id": configuration_id, "name": configuration_name,
                    "meta": {"layers": layers, "tools": list(tools or [])}}
            elif configuration_id not in self.state.collections:
                raise ValueError(f"no configuration {configuration_id}")
            view_id = self.new_id()
            # The view document as the plugin stores it: layerContrasts and lastLocation are
            # required (follows NimbusImage devops/girder/plugins/AnnotationPlugin/
            # upenncontrast_annotation/server/models/datasetView.py, DatasetViewSchema), and
            # each contrast override is stored as sent, keyed by layer id.
            view = {"_id": view_id, "datasetId": dataset_id, "configurationId": configuration_id,
                    "layerContrasts": dict(layer_contrasts or {}),
                    "lastLocation": {"xy": 0, "z": 0, "time": 0}}
            if last_viewed is not None:
                view["lastViewed"] = last_viewed
            self.state.views[view_id] = view
            self.state.view_owners[view_id] = owner
        return view_id

    def add_annotations(self, dataset_id: str, annotations: Iterable[dict[str, Any]]) -> list[str]:
        """Store annotations as given (no validation: tests may seed odd documents).

        ``datasetId`` is set to ``dataset_id``; an ``_id`` is assigned unless the document has one.
        """
        ids = []
        with self._lock:
            for ann in annotations:
                doc = dict(ann)
                doc["datasetId"] = dataset_id
                doc.setdefault("_id", self.new_id())
                self.state.annotations.put(doc)
                ids.append(doc["_id"])
        return ids

    def add_connections(self, connections: Iterable[dict[str, Any]]) -> list[str]:
        ids = []
        with self._lock:
            for con in connections:
                doc = dict(con)
                doc.setdefault("_id", self.new_id())
                doc.setdefault("tags", [])
                doc.setdefault("label", "")
                self.state.connections.put(doc)
                ids.append(doc["_id"])
        return ids

    def annotations(self, dataset_id: str | None = None) -> list[dict[str, Any]]:
        """A snapshot of the stored annotations (of one dataset, if given), in id order."""
        with self._lock:
            docs = [dict(a) for a in self.state.annotations.values()
                    if dataset_id is None or a.get("datasetId") == dataset_id]
        return sorted(docs, key=lambda a: a["_id"])

    def connections(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(c) for c in self.state.connections.values()]

    def interface(self, image: str) -> Any:
        with self._lock:
            return self.state.interfaces.get(image)

    # -- faults and records -------------------------------------------------------------------

    def fail(
        self,
        method: str,
        path: str,
        *,
        status: int = 500,
        calls: Iterable[int] | None = None,
        action: str = "status",
        delay: float = 0.0,
        client: str | None = None,
    ) -> Fault:
        """Inject a fault (see :class:`Fault`). ``calls=None`` fails every matching call."""
        if action not in ("status", "drop_before", "drop_after", "delay"):
            raise ValueError(action)
        fault = Fault(method.upper(), path, status, None if calls is None else frozenset(calls), action, delay,
                      client)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def requests_to(self, method: str, path_regex: str, client: str | None = None) -> list[RecordedRequest]:
        """Recorded requests matching ``method`` and ``path_regex`` (and ``client``, if given)."""
        with self._lock:
            return [r for r in self.requests if r.method == method and re.fullmatch(path_regex, r.path)
                    and (client is None or r.client == client)]

    # -- request handling ---------------------------------------------------------------------

    def _fault_for(self, method: str, path: str, client: str | None = None) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path, client):
                    fault.seen += 1
                    if fault.calls is None or fault.seen in fault.calls:
                        fault.fired += 1
                        return fault
        return None

    def handle(self, method: str, path: str, params: dict[str, str], body: Any, token: str | None,
               ) -> tuple[int, bytes, str, dict[str, str]]:
        """Answer one request: (status, body bytes, content type, extra headers)."""
        with self._lock:
            client = self._clients.get(token) if token is not None else None
        authorized = token == self.token or client is not None
        record = RecordedRequest(method, path, params, body, authorized, client=client)
        with self._lock:
            self.requests.append(record)
        if authorized and self.before_acting is not None:
            self.before_acting(record)
        try:
            answer = self._handle(record, token)
            record.response_bytes = len(answer[1])
            return answer
        finally:
            record.done_at = time.monotonic()

    def _handle(self, record: RecordedRequest, token: str | None) -> tuple[int, bytes, str, dict[str, str]]:
        method, path, params, body, authorized = (record.method, record.path, record.params, record.body,
                                                  record.authorized)
        fault = self._fault_for(method, path, record.client)
        if fault is not None and fault.action == "delay":
            time.sleep(fault.delay)
            fault = None
        if fault is not None and fault.action == "drop_before":
            record.status = -1
            raise DroppedRequest()
        if fault is not None and fault.action == "status":
            record.status = fault.status
            return _json_response(fault.status, {"message": f"injected failure {fault.status}", "type": "rest"})
        try:
            if not authorized:
                raise _BadRequest(401, "You must be logged in.")
            status, payload, ctype, headers = self._route(method, path, params, body, record.client)
        except _BadRequest as exc:
            record.status = exc.status
            answer = {"message": exc.message, "type": exc.kind}
            if exc.field is not None:
                answer["field"] = exc.field
            return _json_response(exc.status, answer)
        if fault is not None and fault.action == "drop_after":
            record.status = -1
            raise DroppedRequest()
        record.status = status
        if ctype == "application/json":
            return status, json.dumps(_finite(payload)).encode(), ctype, headers
        return status, payload, ctype, headers

    def _route(self, method: str, path: str, params: dict[str, str], body: Any, client: str | None = None,
               ) -> tuple[int, Any, str, dict[str, str]]:
        json_ok = "application/json"
        m = re.fullmatch(r"folder/(\w+)", path)
        if method == "GET" and m:
            return 200, self._get(self.state.folders, m.group(1), "folder"), json_ok, {}
        if method == "GET" and path == "item":
            folder_id = _required(params, "folderId")
            with self._lock:
                items = [i for i in self.state.items.values() if i.get("folderId") == folder_id]
            return 200, items, json_ok, {}
        m = re.fullmatch(r"item/(\w+)/tiles", path)
        if method == "GET" and m:
            return 200, self._tiles(m.group(1)), json_ok, {}
        m = re.fullmatch(r"item/(\w+)/tiles/internal_metadata", path)
        if method == "GET" and m:
            ds = self._dataset_of_item(m.group(1))
            return 200, {"format": "numpy", "dtype": str(ds.pixels.dtype)}, json_ok, {}
        m = re.fullmatch(r"item/(\w+)/tiles/region", path)
        if method == "GET" and m:
            return self._region(m.group(1), params)
        if method == "GET" and path == "dataset_view":
            return 200, self._find_views(params, client), json_ok, {}
        m = re.fullmatch(r"upenn_collection/(\w+)", path)
        if method == "GET" and m:
            return 200, self._get(self.state.collections, m.group(1), "upenn_collection"), json_ok, {}
        if method == "POST" and path in ("upenn_annotation/list/ids", "upenn_annotation/hydrate"):
            if not self.has_list_ids:  # a server from before mid-2026: Girder has no such route
                raise _BadRequest(404, f'No matching route for "{method} {path}"')
            return 200, (self._list_ids(body) if path.endswith("ids") else self._hydrate(body)), json_ok, {}
        if method == "GET" and path == "upenn_annotation/count":
            return 200, self._count_annotations(params), json_ok, {}
        if method == "GET" and path == "annotation_connection/count":
            dataset_id = _required(params, "datasetId")
            with self._lock:
                return 200, {"count": self.state.connections.count(dataset_id)}, json_ok, {}
        if method == "GET" and path == "upenn_annotation":
            docs, total = self._find_annotations(params)
            return 200, docs, json_ok, {"Girder-Total-Count": str(total)}
        odd = re.fullmatch(r"upenn_annotation/([^/]+)", path)
        if odd and method in ("GET", "DELETE") and not re.fullmatch(r"[0-9a-f]{24}", odd.group(1)) \
                and odd.group(1) not in ("multiple", "count", "list", "hydrate"):
            # Girder's loadmodel parses the id first: a malformed one is a validation error.
            raise _BadRequest(400, f"Invalid ObjectId: {odd.group(1)}", "validation", "id")
        m = re.fullmatch(r"upenn_annotation/([0-9a-f]{24})", path)
        if method == "GET" and m:
            return 200, self._annotation(m.group(1)), json_ok, {}
        if method == "DELETE" and m:
            self._delete_annotation(m.group(1))
            return 200, None, json_ok, {}
        if method == "POST" and path == "upenn_annotation/multiple":
            return 200, self._create_annotations(body, client), json_ok, {}
        if method == "DELETE" and path == "upenn_annotation/multiple":
            self._delete_annotations(body)
            return 200, None, json_ok, {}
        if method == "PUT" and path == "upenn_annotation/multiple":
            return 200, self._update_annotations(body), json_ok, {}
        if method == "GET" and path == "annotation_connection":
            return 200, self._find_connections(params), json_ok, {}
        if method == "POST" and path == "annotation_connection/multiple":
            return 200, self._create_connections(body), json_ok, {}
        if method == "DELETE" and path == "annotation_connection/multiple":
            return 200, self._delete_connections(body), json_ok, {}
        if method == "POST" and path == "worker_interface":
            image = _required(params, "image")
            if not isinstance(body, dict):
                raise _BadRequest(400, "The interface must be a JSON object.")
            with self._lock:
                self.state.interfaces[image] = body
            return 200, body, json_ok, {}
        if method == "GET" and path == "worker_interface":
            # NimbusImage server/api/workerInterfaces.py ``find``: the image's stored interface
            # (null when none was posted)
            image = _required(params, "image")
            with self._lock:
                return 200, self.state.interfaces.get(image), json_ok, {}
        raise _BadRequest(404, f"No matching route for \"{method} {path}\"")

    def _find_views(self, params: dict[str, str], client: str | None) -> list[dict[str, Any]]:
        """``GET dataset_view``: follows NimbusImage devops/girder/plugins/AnnotationPlugin/
        upenncontrast_annotation/server/api/datasetView.py, ``find``: optional ``datasetId`` and
        ``configurationId`` filters; ``currentUserOnly`` (helpers/params.py getBooleanParam:
        true/1/yes/on) keeps the views the user owns; Girder's paging (girder/api/rest.py
        getPagingParameters): ``limit`` 50 unless given (0 = all), ``offset``, ``sort`` by
        ``lowerName`` unless given (no view has that field, so the stored order) and ``sortdir``,
        with MongoDB's order (a missing field before numbers, before strings; ties kept)."""
        try:
            limit, offset = int(params.get("limit", 50)), int(params.get("offset", 0))
            sortdir = int(params.get("sortdir", 1))
        except ValueError:
            raise _BadRequest(400, "Invalid value for offset, limit, or sortdir parameter.") from None
        if sortdir not in (1, -1):
            raise _BadRequest(400, "Invalid value for sortdir parameter.")
        sort = params.get("sort", "lowerName")
        mine = str(params.get("currentUserOnly", "")).lower() in ("true", "1", "yes", "on")
        with self._lock:
            views = [dict(v) for v in self.state.views.values()
                     if all(v.get(key) == params[key] for key in ("datasetId", "configurationId") if key in params)
                     and (not mine or self.state.view_owners.get(v["_id"]) == client)]

        def bson_order(view: dict[str, Any]) -> tuple[int, Any]:
            value = view.get(sort)
            if value is None:
                return (0, 0)
            return (1, value) if isinstance(value, (int, float)) else (2, str(value))

        views.sort(key=bson_order, reverse=sortdir == -1)
        views = views[offset:]
        return views[:limit] if limit else views

    def _annotation(self, annotation_id: str) -> dict[str, Any]:
        """Girder's loadmodel: 400 "Invalid upenn_annotation id" for one that does not exist."""
        with self._lock:
            doc = self.state.annotations.get(annotation_id)
        if doc is None:
            raise _BadRequest(400, f"Invalid upenn_annotation id ({annotation_id}).")
        return doc

    def _get(self, table: dict[str, dict[str, Any]], key: str, kind: str) -> dict[str, Any]:
        with self._lock:
            if key not in table:
                raise _BadRequest(400, f"Invalid {kind} id ({key}).")
            return table[key]

    def _dataset_of_item(self, item_id: str) -> TestDataset:
        with self._lock:
            for ds in self.state.datasets.values():
                if ds.item_id == item_id:
                    return ds
        raise _BadRequest(400, f"Invalid item id ({item_id}).")

    def _tiles(self, item_id: str) -> dict[str, Any]:
        ds = self._dataset_of_item(item_id)
        n_xy, n_t, n_z, n_c, height, width = ds.pixels.shape
        sizes = {"IndexXY": n_xy, "IndexT": n_t, "IndexZ": n_z, "IndexC": n_c}
        frames = []
        for (xy, t, z, c), number in ds.frame_list:
            indices = {k: v for k, v in (("IndexXY", xy), ("IndexT", t), ("IndexZ", z), ("IndexC", c))
                       if sizes[k] > 1}
            frames.append((indices, number))
        return tile_metadata(width, height, ds.pixels.dtype, frames, ds.channel_names)

    def _region(self, item_id: str, params: dict[str, str]) -> tuple[int, bytes, str, dict[str, str]]:
        ds = self._dataset_of_item(item_id)
        try:
            frame = int(params.get("frame", "0"))
            plane = ds.frame_pixels(frame)
        except (KeyError, ValueError):
            raise _BadRequest(400, f"Frame number {params.get('frame')} is invalid.") from None
        height, width = plane.shape
        try:
            left = max(0, int(float(params.get("left", 0))))
            top = max(0, int(float(params.get("top", 0))))
            right = min(width, int(float(params.get("right", width))))
            bottom = min(height, int(float(params.get("bottom", height))))
        except ValueError:
            raise _BadRequest(400, "Region bounds must be numbers.") from None
        if right <= left or bottom <= top:
            raise _BadRequest(400, "Empty region.")
        region = np.ascontiguousarray(plane[top:bottom, left:right])
        encoding = params.get("encoding", "JPEG")  # rest/tiles.py getTilesRegion: default JPEG
        if encoding.startswith("pickle") and not self.serves_pickle:
            # girder_large_image before pickle output: mimeTypeFromEncoding rejects it.
            raise _BadRequest(400, f'Value Error: Invalid encoding "{encoding}"')
        try:
            payload, mime = encode_region(region, encoding, params.get("tiffCompression"), self.has_pyvips)
        except RegionError as exc:
            raise _BadRequest(exc.status, exc.message) from None
        return 200, payload, mime, {}

    def _find_annotations(self, params: dict[str, str]) -> tuple[list[dict[str, Any]], int]:
        """``GET upenn_annotation`` (api/annotation.py find): shape and tags ("has all") filters,
        ``_id`` order, an ``afterId`` cursor that drops the offset, default limit 50. A page
        costs what it holds (the index walked from the cursor), not the dataset."""
        dataset_id = _required(params, "datasetId")
        if dataset_id not in self.state.folders:
            raise _BadRequest(400, f"No such folder: {dataset_id}", "validation")  # Folder().load(exc=True)
        shape = params.get("shape")
        tags = None
        if params.get("tags"):
            try:
                tags = json.loads(params["tags"])
            except ValueError:
                raise _BadRequest(400, "Parameter tags must be valid JSON.") from None
            if not isinstance(tags, list):
                raise _BadRequest(400, "Parameter tags must be a JSON list.")
        limit = int(params.get("limit", 50))
        offset = int(params.get("offset", 0))
        after = params.get("afterId") if self.cursor_paging else None
        if after:
            offset = 0

        def keep(doc: dict[str, Any]) -> bool:
            return not tags or all(t in (doc.get("tags") or []) for t in tags)

        with self._lock:
            docs = self.state.annotations.page(dataset_id, shape, keep, after=after or None, offset=offset,
                                               limit=max(limit, 0), descending=params.get("sortdir") == "-1")
            # The afterId condition is part of the query the count is taken from: it counts
            # what lies after the cursor (tag filters are not counted here: the worker's
            # listings that count pages filter by shape only).
            total = self.state.annotations.count(dataset_id, shape, after or None)
        return docs, total

    def _list_ids(self, body: Any) -> dict[str, Any]:
        """``POST upenn_annotation/list/ids`` (api/annotation.py listAnnotationIds, models/annotation.py
        listIds and _buildListMatchStages, helpers/validation.py): ``{datasetId, filters:
        {location: {XY?, Z?, Time?}, shape?, tags: {values, exclusive}, idConstraints}}`` ->
        ``{total, ids}``, in ``_id`` order. Every query walks all of the dataset's entries (the
        plugin's aggregation is hinted to ``{datasetId, _id}``); ``exclusive: false`` is "has any
        of the tags", ``true`` "has exactly these tags"."""
        if not isinstance(body, dict):
            raise _BadRequest(400, "Request body must be a JSON object")
        dataset_id = body.get("datasetId")
        if not isinstance(dataset_id, str) or not re.fullmatch(r"[0-9a-f]{24}", dataset_id):
            raise _BadRequest(400, "datasetId is required" if dataset_id is None else "datasetId is not a valid id")
        if dataset_id not in self.state.folders:
            raise _BadRequest(400, f"No such folder: {dataset_id}", "validation")  # Folder().load(exc=True)
        filters = body.get("filters") or {}
        if not isinstance(filters, dict):
            raise _BadRequest(400, "filters must be an object")
        tags = filters.get("tags")
        if tags is not None and not isinstance(tags, dict):
            raise _BadRequest(400, "filters.tags must be an object")
        values = (tags or {}).get("values")
        if values is not None and not isinstance(values, list):
            raise _BadRequest(400, "filters.tags.values must be a list")
        location = filters.get("location")
        if location is not None and not isinstance(location, dict):
            raise _BadRequest(400, "filters.location must be an object")
        constraints = filters.get("idConstraints")
        if constraints is not None and (not isinstance(constraints, list) or not all(
                isinstance(c, list) and c and all(isinstance(i, str) and i for i in c) for c in constraints)):
            raise _BadRequest(400, "idConstraints must be a list of non-empty lists of id strings")
        if constraints and not all(re.fullmatch(r"[0-9a-f]{24}", i) for c in constraints for i in c):
            raise _BadRequest(400, "idConstraints contains an invalid id")
        shape = filters.get("shape") or None
        wanted = {k: (location or {}).get(k) for k in ("XY", "Z", "Time")}
        wanted = {k: v for k, v in wanted.items() if v is not None}
        tag_set = set(values or [])
        exclusive = bool((tags or {}).get("exclusive"))
        allowed = [set(c) for c in constraints or []]

        pairs = tuple(wanted.items())

        def keep(doc: dict[str, Any]) -> bool:
            if shape and doc.get("shape") != shape:
                return False
            if pairs:
                where = doc.get("location")
                if type(where) is not dict:
                    return False
                for key, value in pairs:
                    if where.get(key) != value:
                        return False
            if tag_set:
                have = doc.get("tags") if isinstance(doc.get("tags"), list) else []
                if exclusive and not (set(have) >= tag_set and len(have) == len(tag_set)):
                    return False
                if not exclusive and not tag_set.intersection(have):
                    return False
            return all(doc["_id"] in c for c in allowed)

        with self._lock:
            ids = self.state.annotations.scan(dataset_id, keep)
            self.scans += 1
        return {"total": len(ids), "ids": ids}

    def _hydrate(self, body: Any) -> list[dict[str, Any]]:
        """``POST upenn_annotation/hydrate`` (api/annotation.py hydrate): a JSON array of ids ->
        the documents of those that exist, found by ``_id`` (in ``_id`` order)."""
        if not isinstance(body, list):
            raise _BadRequest(400, "Parameter 'annotationIds' must be a JSON array.")
        for value in body:
            if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{24}", value):
                raise _BadRequest(400, "annotationId is not a valid id")
        with self._lock:
            found = (self.state.annotations.get(i) for i in sorted(set(body)))
            return [d for d in found if d is not None]

    def _count_annotations(self, params: dict[str, str]) -> dict[str, int]:
        """``GET upenn_annotation/count`` (api/annotation.py count): ``{count}``."""
        dataset_id = _required(params, "datasetId")
        if dataset_id not in self.state.folders:
            raise _BadRequest(400, f"No such folder: {dataset_id}", "validation")  # Folder().load(exc=True)
        with self._lock:
            return {"count": self.state.annotations.count(dataset_id, params.get("shape") or None)}

    def _create_annotations(self, body: Any, client: str | None = None) -> list[dict[str, Any]]:
        if not isinstance(body, list):
            raise _BadRequest(400, "Request body must be a JSON array.")
        for ann in body:
            problem = _annotation_problem(ann, self.state.folders)
            if problem:
                # fastjsonschema's message, raised as Girder's ValidationException (models/annotation.py)
                raise _BadRequest(400, problem, "validation")
        created = []
        with self._lock:
            for ann in body:
                doc = {k: v for k, v in ann.items() if k != "_id"}
                doc["_id"] = self.annotation_ids(client) if self.annotation_ids is not None else self.new_id()
                self.state.annotations.put(doc)
                created.append(doc)
        return created

    def _update_annotations(self, body: Any) -> list[Any] | None:
        """``PUT upenn_annotation/multiple``: partial updates of existing annotations.

        Follows NimbusImage devops/girder/plugins/AnnotationPlugin/upenncontrast_annotation/
        server/api/annotation.py (``updateMultiple``) and models/annotation.py
        (``updateMultiple``), with helpers/customModel.py (``filterUpdateFields``,
        ``saveMany``): the body is a JSON array of objects, each naming its annotation by
        ``id`` or ``_id``; only the schema's fields (``name, coordinates, tags, channel,
        location, shape, datasetId, color``) are taken, each replacing the stored field whole
        (a ``tags`` list replaces the tags); every other field of the stored document stays.
        An id the server does not hold fails the whole request with 403 before anything is
        saved; the merged documents are validated by the creation schema, all or nothing (400);
        the answer is ``null`` (``[]`` for an empty array). The same id twice: the later wins.
        """
        if not isinstance(body, list):
            raise _BadRequest(400, "Request body must be a JSON array.")
        if not body:
            return []
        updates: dict[str, dict[str, Any]] = {}
        for update in body:
            if not isinstance(update, dict):
                raise _BadRequest(400, "Each annotation update must be a JSON object.")
            ann_id = update.get("id") or update.get("_id")
            if not ann_id:
                raise _BadRequest(400, "Each annotation must have an 'id' or '_id' field.")
            if not isinstance(ann_id, str) or not re.fullmatch(r"[0-9a-f]{24}", ann_id):
                raise _BadRequest(400, f"Invalid annotation id: {ann_id}")
            fields = {k: v for k, v in update.items() if k in UPDATABLE_ANNOTATION_KEYS}
            if "datasetId" in fields and not (isinstance(fields["datasetId"], str)
                                             and re.fullmatch(r"[0-9a-f]{24}", fields["datasetId"])):
                raise _BadRequest(400, f"Invalid datasetId: {fields['datasetId']}")
            updates[ann_id] = fields
        with self._lock:
            moved_to = {f["datasetId"] for f in updates.values() if "datasetId" in f}
            missing_datasets = sorted(moved_to - set(self.state.folders))
            if missing_datasets:
                raise _BadRequest(403, f"Dataset(s) not found: {missing_datasets}", "access")  # AccessException
            if not set(updates) <= set(self.state.annotations):
                raise _BadRequest(403, "Write access was denied for one or more annotations.", "access")
            merged = {ann_id: {**self.state.annotations[ann_id], **fields} for ann_id, fields in updates.items()}
            for doc in merged.values():
                problem = _annotation_problem(doc, self.state.folders)
                if problem:  # fastjsonschema's message, as Girder's ValidationException (customModel.py saveMany)
                    raise _BadRequest(400, problem, "validation")
            self.state.annotations.update(merged)
        return None

    def _delete_annotations(self, body: Any) -> None:
        """``DELETE upenn_annotation/multiple``. The annotations' connections STAY: the plugin's
        handler for this event (server/models/connections.py, annotationsRemovedEvent) matches the
        body's string ids against ObjectId fields and finds nothing (models/annotation.py
        deleteMultiple triggers it with the string ids)."""
        if not isinstance(body, list) or not all(isinstance(i, str) for i in body):
            raise _BadRequest(400, "Request body must be a JSON array of id strings.")
        with self._lock:
            for ann_id in set(body):
                self.state.annotations.pop(ann_id)

    def _delete_annotation(self, annotation_id: str) -> None:
        """``DELETE upenn_annotation/{id}``: Girder's model remove event carries the document, whose
        ObjectId matches, so the annotation's connections go with it (models/annotation.py
        annotationRemovedEvent -> models/connections.py annotationsRemovedEvent)."""
        self._annotation(annotation_id)  # loadmodel: 400 if missing
        with self._lock:
            self.state.annotations.pop(annotation_id)
            for con in self.state.connections.touching(annotation_id):
                self.state.connections.pop(con["_id"])

    def _find_connections(self, params: dict[str, str]) -> list[dict[str, Any]]:
        """``GET annotation_connection`` (server/api/connections.py find): filters, an ``afterId``
        cursor that drops the offset, default limit 50; without ``sort`` it sorts by a field
        connections lack (``lowerName``), i.e. in stored order: ask for ``sort=_id``."""
        dataset_id = _required(params, "datasetId")
        with self._lock:
            # find() hints the {datasetId, _id} index whatever the filter: a query for one
            # annotation's connections walks all of the dataset's connections too.
            docs = self.state.connections.of_dataset(dataset_id, sort_by_id=params.get("sort") == "_id")
            self.connection_scans += 1
        for key in ("parentId", "childId"):
            if params.get(key):
                docs = [c for c in docs if c.get(key) == params[key]]
        if params.get("nodeAnnotationId"):
            node = params["nodeAnnotationId"]
            docs = [c for c in docs if node in (c.get("parentId"), c.get("childId"))]
        if params.get("sort") == "_id":
            docs.sort(key=lambda c: c["_id"], reverse=params.get("sortdir") == "-1")
        offset = int(params.get("offset", 0))
        if params.get("afterId"):
            docs = [c for c in docs if c["_id"] > params["afterId"]]
            offset = 0
        limit = int(params.get("limit", 50))
        docs = docs[offset:]
        return docs[:limit] if limit > 0 else docs

    def _create_connections(self, body: Any) -> list[dict[str, Any]]:
        """``POST annotation_connection/multiple``: validated all-or-nothing as
        server/models/connections.py validateMultiple does (schema with required ``parentId,
        childId, datasetId, tags``; a contrastDataset folder; then EVERY child, then every
        parent must exist, else 400 for the whole body)."""
        if not isinstance(body, list):
            raise _BadRequest(400, "Request body must be a JSON array.")
        for index, con in enumerate(body):
            if not isinstance(con, dict):
                raise _BadRequest(400, f"Validation Error: connection {index} is not an object")
            for key in ("parentId", "childId", "datasetId"):
                if not isinstance(con.get(key), str):
                    raise _BadRequest(400, f"Validation Error: connection {index}: '{key}' is a required property")
            if not isinstance(con.get("tags"), list) or not all(isinstance(t, str) for t in con["tags"]):
                raise _BadRequest(400, f"Validation Error: connection {index}: 'tags' must be an array of strings")
        with self._lock:
            for con in body:
                if con["datasetId"] not in self.state.folders:
                    raise _BadRequest(400, "Connection dataset ID is invalid")
            if any(con["childId"] not in self.state.annotations for con in body):
                raise _BadRequest(400, "A child annotation does not exist")
            if any(con["parentId"] not in self.state.annotations for con in body):
                raise _BadRequest(400, "A parent annotation does not exist")
            created = []
            for con in body:
                doc = {"label": "", **{k: v for k, v in con.items() if k != "_id"}}
                doc["_id"] = self.new_id()
                self.state.connections.put(doc)
                created.append(doc)
        return created

    def _delete_connections(self, body: Any) -> str:
        """``DELETE annotation_connection/multiple``: answers the text of pymongo's DeleteResult
        (server/api/connections.py deleteMultiple returns removeWithQuery's result)."""
        if not isinstance(body, list):
            raise _BadRequest(400, "Request body must be a JSON array.")
        with self._lock:
            removed = sum(self.state.connections.pop(str(con_id)) is not None for con_id in body)
        return f"DeleteResult({{'n': {removed}, 'ok': 1.0}}, acknowledged=True)"


def _required(params: dict[str, str], key: str) -> str:
    value = params.get(key)
    if not value:
        raise _BadRequest(400, f"Parameter '{key}' is required.")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _annotation_problem(ann: Any, folders: dict[str, Any]) -> str | None:
    """What the real server's schema would reject in ``ann``, or None."""
    if not isinstance(ann, dict):
        return "data must be object"
    missing = [key for key in REQUIRED_ANNOTATION_KEYS if key not in ann]
    if missing:  # fastjsonschema names the missing required properties
        return f"data must contain {missing} properties"
    coords = ann["coordinates"]
    if not isinstance(coords, list) or not coords:
        return "data.coordinates must be a non-empty array"
    for point in coords:
        if not isinstance(point, dict) or not _is_number(point.get("x")) or not _is_number(point.get("y")):
            return "data.coordinates[] must be objects with numeric x and y"
        if "z" in point and not _is_number(point["z"]):
            return "data.coordinates[].z must be number"
    if not isinstance(ann["tags"], list) or not all(isinstance(t, str) for t in ann["tags"]):
        return "data.tags must be an array of strings"
    if not _is_int(ann["channel"]):
        return "data.channel must be integer"
    location = ann["location"]
    if not isinstance(location, dict) or not all(_is_int(location[k]) for k in ("XY", "Z", "Time") if k in location):
        return "data.location must be an object with integer XY, Z, Time"
    if ann["shape"] not in ANNOTATION_SHAPES:
        return f"data.shape must be one of {list(ANNOTATION_SHAPES)}"
    if ann["datasetId"] not in folders:
        return "Annotation dataset ID is invalid"
    if "name" in ann and not isinstance(ann["name"], str):
        return "data.name must be string"
    if "color" in ann and ann["color"] is not None and not isinstance(ann["color"], str):
        return "data.color must be string or null"
    return None


def _json_response(status: int, payload: Any) -> tuple[int, bytes, str, dict[str, str]]:
    return status, json.dumps(payload).encode(), "application/json", {}


def _make_handler(server: NimbusTestServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # TCP_NODELAY: without it, a keep-alive response written in two parts (headers, body)
        # waits ~40 ms for the client's delayed ACK on every request (Nagle's algorithm), a
        # test-server artifact that real Girder deployments do not have.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass  # quiet: the server records requests itself

        def _serve(self, method: str) -> None:
            url = urlsplit(self.path)
            if not url.path.startswith(API_ROOT):
                self._send(*_json_response(404, {"message": "Not under /api/v1"}))
                return
            path = unquote(url.path[len(API_ROOT):]).strip("/")
            params = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body: Any = None
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    self._send(*_json_response(400, {"message": "Invalid JSON passed in request body."}))
                    return
            try:
                status, payload, ctype, headers = server.handle(
                    method, path, params, body, self.headers.get("Girder-Token"))
            except DroppedRequest:
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            self._send(status, payload, ctype, headers)

        def _send(self, status: int, payload: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            try:
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                self.close_connection = True

        def do_GET(self) -> None:  # noqa: N802 - stdlib naming
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def do_DELETE(self) -> None:  # noqa: N802
            self._serve("DELETE")

        def do_PUT(self) -> None:  # noqa: N802
            self._serve("PUT")

    return Handler
