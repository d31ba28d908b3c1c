"""scripts/download_checkpoints.py against a local HTTP server on 127.0.0.1.

The server serves a small generated file under the real checkpoint file name; the expected
digest is given through the script's ``--sha256 NAME=HEX`` option (CLI tests) or the
``sha256=`` argument (API tests). Nothing here reaches the internet.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "download_checkpoints.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("download_checkpoints", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


dc = _load_script()

PAYLOAD = bytes((i * 7 + 3) % 251 for i in range(300_000))
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
NAME = "tiny"
FILENAME = "sam2.1_hiera_tiny.pt"


class _Server:
    """A tiny file server. Knobs: cut the body once, ignore Range, answer 404."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.cut_once_at: int | None = None  # close the connection after this many body bytes, once
        self.ignore_range = False
        self.status_override: int | None = None
        self.requests: list[dict[str, str | None]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                owner.requests.append({"path": self.path, "range": self.headers.get("Range")})
                if owner.status_override is not None or self.path != "/" + FILENAME:
                    self.send_response(owner.status_override or 404)
                    self.send_header("Content-Length", "0")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    return
                data = owner.payload
                start = 0
                range_header = self.headers.get("Range")
                match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
                if match and not owner.ignore_range:
                    start = int(match.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", "bytes */%d" % len(data))
                        self.send_header("Content-Length", "0")
                        self.send_header("Connection", "close")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", "bytes %d-%d/%d" % (start, len(data) - 1, len(data)))
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Connection", "close")
                self.end_headers()
                if owner.cut_once_at is not None:
                    cut, owner.cut_once_at = owner.cut_once_at, None
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    # Drop the socket without sending the rest: the client sees a short body.
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = "http://127.0.0.1:%d/" % self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def file_server():
    with _Server(PAYLOAD) as srv:
        yield srv


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


def _quiet_download(tmp_path: Path, file_server: _Server, **kwargs: object) -> Path:
    kwargs.setdefault("backoff", 0.0)
    return dc.download(NAME, tmp_path, file_server.base_url, sha256=DIGEST, log=lambda _m: None, **kwargs)


# --- the digest table -------------------------------------------------------------------


def test_table_covers_the_four_official_checkpoints() -> None:
    assert dc.MODELS == ("tiny", "small", "base_plus", "large")
    assert dc.DEFAULT_MODELS == dc.MODELS
    assert dc.FILENAMES == {m: "sam2.1_hiera_%s.pt" % m for m in dc.MODELS}
    assert set(dc.SHA256) == set(dc.MODELS) == set(dc.SIZES)
    for digest in dc.SHA256.values():
        assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert len(set(dc.SHA256.values())) == 4
    # The published sizes, roughly 156/184/324/898 MB.
    approx_mb = {m: round(dc.SIZES[m] / 1e6) for m in dc.MODELS}
    assert approx_mb == {"tiny": 156, "small": 184, "base_plus": 324, "large": 898}
    assert dc.DEFAULT_BASE_URL == "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
    assert dc.url_for("large") == dc.DEFAULT_BASE_URL + "sam2.1_hiera_large.pt"


def test_script_is_stdlib_only_and_python38_syntax() -> None:
    source = SCRIPT.read_text()
    tree = ast.parse(source, feature_version=(3, 8))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    non_stdlib = {name for name in imported if name not in sys.stdlib_module_names and name != "__future__"}
    assert not non_stdlib, non_stdlib
    # No built-in generics at run time (dict[str, str] needs 3.9) outside annotations: the
    # module uses typing's Dict/List/Tuple for module-level values.
    assert "Dict[str, str] = {" in source


# --- downloads ----------------------------------------------------------------------------


def test_good_digest_puts_the_file_in_place(tmp_path: Path, file_server: _Server) -> None:
    result = _run_cli("--dest", str(tmp_path), "--models", NAME, "--base-url", file_server.base_url,
                      "--sha256", "%s=%s" % (NAME, DIGEST.upper()))
    assert result.returncode == 0, result.stderr
    final = tmp_path / FILENAME
    assert final.read_bytes() == PAYLOAD
    assert not (tmp_path / (FILENAME + ".part")).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME]
    assert "verified" in result.stdout


def test_bad_digest_fails_and_leaves_nothing(tmp_path: Path, file_server: _Server) -> None:
    wrong = hashlib.sha256(b"something else").hexdigest()
    result = _run_cli("--dest", str(tmp_path), "--models", NAME, "--base-url", file_server.base_url,
                      "--sha256", "%s=%s" % (NAME, wrong), "--retries", "0")
    assert result.returncode != 0
    assert list(tmp_path.iterdir()) == []  # no final file, no .part
    error_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1, result.stderr
    assert error_lines[0].startswith("error: SHA-256 mismatch for " + FILENAME)
    assert wrong in error_lines[0] and DIGEST in error_lines[0]
    # A fresh download that mismatches is not fetched a second time.
    assert len(file_server.requests) == 1


def test_interrupted_transfer_resumes_with_range(tmp_path: Path, file_server: _Server) -> None:
    file_server.cut_once_at = 100_000
    path = _quiet_download(tmp_path, file_server)
    assert path == tmp_path / FILENAME
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / (FILENAME + ".part")).exists()
    assert [r["range"] for r in file_server.requests] == [None, "bytes=100000-"]


def test_server_ignoring_range_restarts_cleanly(tmp_path: Path, file_server: _Server) -> None:
    file_server.cut_once_at = 120_000
    file_server.ignore_range = True
    path = _quiet_download(tmp_path, file_server)
    assert path.read_bytes() == PAYLOAD
    assert [r["range"] for r in file_server.requests] == [None, "bytes=120000-"]
    assert not (tmp_path / (FILENAME + ".part")).exists()


def test_part_file_from_an_earlier_run_is_resumed(tmp_path: Path, file_server: _Server) -> None:
    (tmp_path / (FILENAME + ".part")).write_bytes(PAYLOAD[:50_000])
    _quiet_download(tmp_path, file_server)
    assert (tmp_path / FILENAME).read_bytes() == PAYLOAD
    assert [r["range"] for r in file_server.requests] == ["bytes=50000-"]


def test_complete_part_file_is_verified_without_a_body(tmp_path: Path, file_server: _Server) -> None:
    (tmp_path / (FILENAME + ".part")).write_bytes(PAYLOAD)
    _quiet_download(tmp_path, file_server)
    assert (tmp_path / FILENAME).read_bytes() == PAYLOAD
    assert [r["range"] for r in file_server.requests] == ["bytes=%d-" % len(PAYLOAD)]  # answered 416


def test_poisoned_part_file_restarts_from_zero_once(tmp_path: Path, file_server: _Server) -> None:
    (tmp_path / (FILENAME + ".part")).write_bytes(b"\0" * 40_000)  # not a prefix of the file
    _quiet_download(tmp_path, file_server)
    assert (tmp_path / FILENAME).read_bytes() == PAYLOAD
    assert [r["range"] for r in file_server.requests] == ["bytes=40000-", None]


def test_part_file_larger_than_the_known_size_is_discarded(tmp_path: Path, file_server: _Server) -> None:
    (tmp_path / (FILENAME + ".part")).write_bytes(b"x" * (len(PAYLOAD) + 10))
    _quiet_download(tmp_path, file_server, size=len(PAYLOAD))
    assert (tmp_path / FILENAME).read_bytes() == PAYLOAD
    assert [r["range"] for r in file_server.requests] == [None]


def test_present_file_with_right_digest_is_skipped(tmp_path: Path, file_server: _Server) -> None:
    (tmp_path / FILENAME).write_bytes(PAYLOAD)
    result = _run_cli("--dest", str(tmp_path), "--models", NAME, "--base-url", file_server.base_url,
                      "--sha256", "%s=%s" % (NAME, DIGEST))
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stdout
    assert file_server.requests == []


def test_present_file_with_wrong_digest_is_replaced(tmp_path: Path, file_server: _Server) -> None:
    (tmp_path / FILENAME).write_bytes(b"stale")
    _quiet_download(tmp_path, file_server)
    assert (tmp_path / FILENAME).read_bytes() == PAYLOAD


def test_unreachable_host_fails_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a free port with nothing listening on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = _run_cli("--dest", str(tmp_path), "--models", NAME, "--base-url", "http://127.0.0.1:%d/" % port,
                      "--sha256", "%s=%s" % (NAME, DIGEST), "--retries", "0", "--timeout", "5")
    assert result.returncode == 1
    error_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1, result.stderr
    assert error_lines[0].startswith("error: cannot download " + FILENAME)
    assert "refused" in error_lines[0].lower() or "unreachable" in error_lines[0].lower()
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_http_error_fails_without_retrying(tmp_path: Path, file_server: _Server) -> None:
    file_server.status_override = 404
    result = _run_cli("--dest", str(tmp_path), "--models", NAME, "--base-url", file_server.base_url,
                      "--sha256", "%s=%s" % (NAME, DIGEST))
    assert result.returncode == 1
    assert "HTTP 404" in result.stderr
    assert len(file_server.requests) == 1
    assert list(tmp_path.iterdir()) == []


def test_server_error_is_retried_then_reported(tmp_path: Path, file_server: _Server) -> None:
    file_server.status_override = 503
    with pytest.raises(dc.DownloadError, match="HTTP 503"):
        _quiet_download(tmp_path, file_server, retries=2)
    assert len(file_server.requests) == 3


def test_unknown_model_is_a_usage_error(tmp_path: Path) -> None:
    result = _run_cli("--dest", str(tmp_path), "--models", "tiny,huge")
    assert result.returncode == 2
    assert "unknown model 'huge'" in result.stderr
    result = _run_cli("--dest", str(tmp_path), "--models", "tiny,,small")
    assert result.returncode == 2
    result = _run_cli("--dest", str(tmp_path), "--sha256", "tiny=abc")
    assert result.returncode == 2
    assert "not a SHA-256" in result.stderr


def test_missing_digest_refuses_to_download(tmp_path: Path, file_server: _Server, monkeypatch) -> None:
    monkeypatch.delitem(dc.SHA256, NAME)
    with pytest.raises(dc.DownloadError, match="no known SHA-256"):
        dc.download(NAME, tmp_path, file_server.base_url, log=lambda _m: None)
    assert file_server.requests == []


def test_api_download_all_and_default_digest_table(tmp_path: Path, file_server: _Server, monkeypatch) -> None:
    # The importable API used by the demo: patch the table instead of passing sha256=.
    monkeypatch.setitem(dc.SHA256, NAME, DIGEST)
    monkeypatch.setitem(dc.SIZES, NAME, len(PAYLOAD))
    paths = dc.download_all([NAME], tmp_path, file_server.base_url, log=lambda _m: None, backoff=0.0)
    assert paths == [tmp_path / FILENAME]
    assert dc.sha256_of(paths[0]) == DIGEST
