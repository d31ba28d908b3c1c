"""Girder 5 with NimbusImage's plugin and girder_large_image, served on 127.0.0.1 for the check.

Runs INSIDE the check's own virtual environment (Girder, the plugin, large_image); it imports
nothing of the worker. Started by ``scripts/check_real_server.py``; not a module of the worker.

What it does, as a NimbusImage deployment does (NimbusImage ``docker-compose.yaml``: provision,
``girder mount /mnt/fuse``, ``uvicorn girder.asgi:app``):

- connects to MongoDB at ``--mongo-uri``; or, with ``--substitute-db``, to an in-process
  substitute (``mongomock_ng``, patched in for ``pymongo.MongoClient`` the way Girder's own test
  fixture ``pytest_girder`` patches mongomock in for ``--mock-db``);
- mounts Girder's read-only FUSE view (Girder's own ``ServerFuse``) at ``--mount``, in a thread of
  this process (a separate ``girder mount`` process cannot see an in-process database); the
  multi-source file the app writes names its image by file name, and large_image finds it
  through this mount, as in the deployment;
- skips the static web pages of plugins whose web client was not built (no npm here): the REST
  API is all the worker uses;
- serves ``girder.asgi:app`` with uvicorn on 127.0.0.1:``--port``, and writes ``--ready`` once the
  API answers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


#: What was changed to run Girder on the substitute database, printed at start.
SUBSTITUTE_PATCHES = (
    "pymongo.MongoClient is mongomock_ng.MongoClient (as pytest_girder's --mock-db does with mongomock)",
    "girder.api.rest._MONGO_CURSOR_TYPES also names mongomock_ng's Cursor and CommandCursor (so that "
    "Girder lists them and sets Girder-Total-Count, as it does for pymongo's)",
    "mongomock_ng's Cursor gains count(with_limit_and_skip) through count_documents, the shim Girder "
    "itself adds to pymongo's Cursor (girder/models/__init__.py)",
    "mongomock_ng's deletes run one at a time: it finds the matching documents, then deletes them one "
    "by one, so two requests deleting the same document at once raised KeyError (a 500) in the second; "
    "MongoDB's delete_many skips a document another delete removed first",
)


def _patch_database(uri: str | None) -> str:
    if uri:
        return uri
    import girder.api.rest
    import mongomock_ng
    import mongomock_ng.collection
    import mongomock_ng.command_cursor
    import pymongo

    pymongo.MongoClient = mongomock_ng.MongoClient
    girder.api.rest._MONGO_CURSOR_TYPES = (*girder.api.rest._MONGO_CURSOR_TYPES, mongomock_ng.collection.Cursor,
                                           mongomock_ng.command_cursor.CommandCursor)

    def count(self, with_limit_and_skip=False):
        options = {}
        if with_limit_and_skip and self._limit:
            options["limit"] = self._limit
        if with_limit_and_skip and self._skip:
            options["skip"] = self._skip
        return self.collection.count_documents(self._spec or {}, **options)

    mongomock_ng.collection.Cursor.count = count

    deleting = threading.Lock()
    delete = mongomock_ng.collection.Collection._delete

    def delete_one_at_a_time(self, *args, **kwargs):
        with deleting:
            return delete(self, *args, **kwargs)

    mongomock_ng.collection.Collection._delete = delete_one_at_a_time
    for patch in SUBSTITUTE_PATCHES:
        print(f"substitute database patch: {patch}", flush=True)
    return "mongodb://127.0.0.1:27017/girder_real_server_check"


def _skip_unbuilt_web_clients() -> None:
    import girder.plugin

    register = girder.plugin.registerPluginStaticContent

    def register_if_built(plugin, css, js, staticDir, tree):  # noqa: N803 - Girder's names
        files = [f for f in [*css, *js] if "?" not in f]
        if any(not (Path(staticDir) / f.lstrip("/")).exists() for f in files):
            print(f"web client of plugin {plugin} not built: its pages are not served (REST only)", flush=True)
            return None
        return register(plugin=plugin, css=css, js=js, staticDir=staticDir, tree=tree)

    girder.plugin.registerPluginStaticContent = register_if_built


def _provision(assetstore: Path) -> None:
    """An assetstore, as NimbusImage ``devops/girder/provision.py`` makes one (users are made over REST)."""
    from girder.models.assetstore import Assetstore

    if Assetstore().findOne() is None:
        Assetstore().createFilesystemAssetstore("Assetstore", str(assetstore))


def _mount(path: Path) -> threading.Thread:
    """Girder's FUSE view at ``path`` in a thread (``girder mount`` without the fork)."""
    from girder.cli.mount import FUSELogError, ServerFuse
    from girder.models.setting import Setting
    from girder.settings import SettingKey

    options = {"foreground": True, "auto_cache": True, "ro": True, "auto_unmount": True}
    operations = ServerFuse(stat=os.stat(path), options=options)
    Setting().set(SettingKey.GIRDER_MOUNT_INFORMATION, {
        "path": str(path), "mounttime": time.time(), "hasStats": True, "hasFlat": True})
    thread = threading.Thread(target=FUSELogError, args=(operations, str(path)), kwargs=options,
                              name="girder-mount", daemon=True)
    thread.start()
    for _ in range(100):
        if os.path.ismount(path):
            return thread
        time.sleep(0.1)
    raise SystemExit(f"the Girder FUSE mount at {path} did not come up (is FUSE available: /dev/fuse, fusermount3?)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mongo-uri", default=None)
    parser.add_argument("--assetstore", type=Path, required=True)
    parser.add_argument("--mount", type=Path, required=True)
    parser.add_argument("--ready", type=Path, required=True)
    args = parser.parse_args()

    uri = _patch_database(args.mongo_uri)
    os.environ["GIRDER_SERVER_MODE"] = "production"
    os.environ["GIRDER_MONGO_URI"] = uri
    from girder.utility import config

    config.getConfig()["database"]["uri"] = uri
    _skip_unbuilt_web_clients()

    import uvicorn
    from girder.asgi import app

    _provision(args.assetstore)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning",
                                           server_header=False, date_header=False))
    # libfuse takes SIGTERM for itself where nobody handles it; handled here, it stays with Python.
    # uvicorn installs its own handler while it serves and raises the signal again when it has shut
    # down: both only ask the server to stop, so that the mount is always taken down below.
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    mount_thread = _mount(args.mount)

    def announce() -> None:
        while not server.started:
            time.sleep(0.05)
        args.ready.write_text(str(args.port))

    threading.Thread(target=announce, daemon=True).start()
    server.run()
    _unmount(args.mount, mount_thread)
    os._exit(0)  # nothing of the mount may be touched by the interpreter's own finalisation


def _unmount(path: Path, thread: threading.Thread) -> None:
    """Close what large_image holds open (files read through the mount), then unmount while the
    FUSE thread still serves: a process that exits with a file open on its own mount waits on it
    for ever."""
    try:
        from large_image.cache_util import cachesClear

        cachesClear()
    except Exception as exc:  # noqa: BLE001 - shutting down: say it and go on
        print(f"could not clear large_image's caches: {exc}", flush=True)
    import gc

    gc.collect()
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    for flags in (["-u"], ["-u", "-z"]):
        command = [tool, *flags, str(path)] if tool else ["umount", *(["-l"] if "-z" in flags else []), str(path)]
        if subprocess.run(command, capture_output=True).returncode == 0:
            break
    thread.join(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
