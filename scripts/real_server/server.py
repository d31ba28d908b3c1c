"""Starts and stops the Girder server program (:mod:`.girder_app`) in the check's environment."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

APP = Path(__file__).with_name("girder_app.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GirderServer:
    """``girder_app.py`` as a subprocess on 127.0.0.1; its output goes to ``workdir/girder.log``."""

    def __init__(self, python: Path, workdir: Path, mongo_uri: str | None) -> None:
        self.python = python
        self.workdir = workdir
        self.mongo_uri = mongo_uri
        self.port = free_port()
        self.mount = workdir / "girder-mount"
        self.assetstore = workdir / "assetstore"
        self.log_path = workdir / "girder.log"
        self.process: subprocess.Popen | None = None
        #: The kernel's number for the FUSE connection of the mount (its device minor number).
        self.fuse_connection: int | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    def start(self, timeout: float = 180.0) -> None:
        self.mount.mkdir(parents=True, exist_ok=True)
        self.assetstore.mkdir(parents=True, exist_ok=True)
        ready = self.workdir / "girder.ready"
        ready.unlink(missing_ok=True)
        argv = [str(self.python), str(APP), "--port", str(self.port), "--assetstore", str(self.assetstore),
                "--mount", str(self.mount), "--ready", str(ready)]
        if self.mongo_uri:
            argv += ["--mongo-uri", self.mongo_uri]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready.exists():
                self.fuse_connection = os.minor(os.stat(self.mount).st_dev)
                return
            if self.process.poll() is not None:
                code = self.process.returncode
                raise RuntimeError(f"Girder stopped while starting (exit {code}):\n{self.log_tail()}")
            time.sleep(0.2)
        raise RuntimeError(f"Girder did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM: Girder shuts down, closes what it read through its FUSE mount and unmounts it
        (``girder_app._unmount``). Only if that does not end it in time: a lazy unmount, SIGKILL,
        and as a last resort the FUSE connection aborted (``/sys/fs/fuse/connections``), so that no
        process is left waiting on a dead mount. Never raises."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._detach()
                self.process.kill()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._abort_connection()
                    try:
                        self.process.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        pass
        if os.path.ismount(self.mount):
            self._detach()
            self._abort_connection()

    def _detach(self) -> None:
        tool = shutil.which("fusermount3") or shutil.which("fusermount")
        subprocess.run([tool, "-u", "-z", str(self.mount)] if tool else ["umount", "-l", str(self.mount)],
                       check=False, capture_output=True)

    def _abort_connection(self) -> None:
        if self.fuse_connection is None:
            return
        abort = Path("/sys/fs/fuse/connections") / str(self.fuse_connection) / "abort"
        try:
            abort.write_text("1")
        except OSError:
            pass

    def __enter__(self) -> GirderServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
