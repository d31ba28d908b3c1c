"""A small REST session for the check: the server's status and message are kept, never hidden."""

from __future__ import annotations

import json
from typing import Any

import requests


class RestError(RuntimeError):
    def __init__(self, method: str, path: str, status: int, message: str) -> None:
        super().__init__(f"{method} {path} answered {status}: {message}")
        self.status = status
        self.message = message


def message_of(response: requests.Response) -> str:
    """Girder's error ``message`` (or the body's start)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict) and "message" in body:
        return str(body["message"])
    return json.dumps(body)[:300]


class Rest:
    """Requests to ``api_url`` with ``Girder-Token``; :meth:`call` returns the response as it is,
    :meth:`json` raises :class:`RestError` on a status >= 400."""

    def __init__(self, api_url: str, token: str | None = None, timeout: float = 300.0) -> None:
        self.api_url = api_url.rstrip("/")
        self.session = requests.Session()
        self.timeout = timeout
        if token:
            self.session.headers["Girder-Token"] = token

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        return self.session.request(method, f"{self.api_url}/{path.lstrip('/')}", **kwargs)

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.call(method, path, **kwargs)
        if response.status_code >= 400:
            raise RestError(method, path, response.status_code, message_of(response))
        return response.json() if response.content else None

    def upload(self, parent_type: str, parent_id: str, name: str, data: bytes,
               content_type: str = "application/octet-stream") -> dict[str, Any]:
        """One file, sent in the request that starts the upload (as the app's ``uploadJSONFile``
        does), in chunks when large (Girder's ``file/chunk``)."""
        chunk = 32 * 1024 * 1024
        params = {"parentType": parent_type, "parentId": parent_id, "name": name, "size": len(data)}
        if len(data) <= chunk:
            return self.json("POST", "file", params=params, data=data, headers={"Content-Type": content_type})
        upload = self.json("POST", "file", params=params)
        result = upload
        for offset in range(0, len(data), chunk):
            result = self.json("POST", "file/chunk", params={"uploadId": upload["_id"], "offset": offset},
                               data=data[offset:offset + chunk], headers={"Content-Type": content_type})
        return result

    def close(self) -> None:
        self.session.close()
