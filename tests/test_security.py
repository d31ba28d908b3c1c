"""Security (issue 7): the token never leaks, nothing but numpy arrays is unpickled from the network, the Model
value cannot reach outside the checkpoint directory, and checkpoints load with weights_only.

The token used everywhere is conftest's TOKEN, easy to find in any output it leaks into.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TOKEN, WorkerRun, run_worker
from sam2_refine import cli
from sam2_refine.job import compute as job
from sam2_refine.model.checkpoints import CheckpointChoiceError, resolve_checkpoint
from sam2_refine.nimbus.errors import NimbusAPIError
from sam2_refine.nimbus.client import NimbusClient
from sam2_refine.nimbus.retry import RetryPolicy
from sam2_refine.nimbus.progress import Reporter
from sam2_refine.job.settings import SettingsErrors, parse_settings
from sam2_refine.testing.nimbus_server import NimbusTestServer
from sam2_refine.testing.stand_in import KnownMaskPredictor
from test_cli_e2e import BIG, LAYERS, SMALL, ann, params, pixels
from test_faults import STANDIN_LAUNCHER

CKPT = "sam2.1_hiera_tiny.pt"


def echo_token(server: NimbusTestServer, method: str, path: str, status: int, as_json: bool = True) -> None:
    """Answer ``method path`` with ``status`` and a message that carries the token."""
    original = server.handle
    text = f"token {TOKEN} rejected; header Girder-Token: {TOKEN}"

    def handle(m, p, params_, body, token):
        if m == method and p == path:
            if as_json:
                return status, json.dumps({"message": text, "type": "rest"}).encode(), "application/json", {}
            return status, f"<html><body>{text}</body></html>".encode(), "text/html", {}
        return original(m, p, params_, body, token)

    server.handle = handle


def one_location(server: NimbusTestServer) -> tuple[str, list[str]]:
    ds = server.add_dataset(pixels(1, 1), layers=LAYERS)
    return ds.dataset_id, server.add_annotations(ds.dataset_id, [ann(BIG), ann(SMALL)])


def standin_cli(server, request, dataset_id, ckpt, *argv_tail: str, token_args=None) -> WorkerRun:
    argv = [sys.executable, "-c", STANDIN_LAUNCHER, "--apiUrl", server.api_url,
            *(token_args or ["--token", TOKEN]), "--request", "compute", "--parameters", json.dumps(request),
            "--datasetId", dataset_id, *argv_tail]
    env = {**os.environ, "SAM2_CHECKPOINT_DIR": str(ckpt), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    return WorkerRun(done.returncode, done.stdout, done.stderr)


def assert_no_token(run: WorkerRun) -> None:
    assert TOKEN not in run.stdout, run.stdout
    assert TOKEN not in run.stderr, run.stderr


# -- the token ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_no_token_in_a_normal_run_with_the_real_model(server, checkpoint_dir, tmp_path):
    dataset_id, _ = one_location(server)
    run = run_worker(server, "compute", params(**{"Delete original annotations": True}), dataset_id=dataset_id,
                     checkpoint_dir=checkpoint_dir, summary=tmp_path / "s.json")
    assert run.returncode == 0, run.stdout + run.stderr
    assert_no_token(run)
    assert TOKEN not in (tmp_path / "s.json").read_text()
    # The token went only as a header: never in a URL or a body the server received.
    assert all(r.authorized for r in server.requests)
    assert not any(TOKEN in json.dumps([r.path, r.params, r.body]) for r in server.requests)


@pytest.mark.slow
@pytest.mark.parametrize("where", [
    ("GET", "folder/{ds}", 500, True), ("GET", "upenn_annotation", 500, False),
    ("GET", "dataset_view", 503, True), ("POST", "upenn_annotation/multiple", 500, True),
    ("POST", "upenn_annotation/multiple", 502, False), ("DELETE", "upenn_annotation/multiple", 500, True),
], ids=["folder-500-json", "annotations-500-html", "dataset_view-503", "create-500", "create-502-html",
        "delete-500"])
def test_no_token_when_the_server_echoes_it_in_an_error(server, stub_ckpt, monkeypatch, where):
    monkeypatch.setenv("SAM2_REFINE_HTTP_RETRIES", "1")
    method, path, status, as_json = where
    dataset_id, originals = one_location(server)
    echo_token(server, method, path.format(ds=dataset_id), status, as_json)
    run = standin_cli(server, params(**{"Delete original annotations": True}), dataset_id, stub_ckpt)
    assert run.returncode == 1, run.stdout + run.stderr
    errors = run.errors()
    assert errors and any(f"Request: {method} {path.format(ds=dataset_id)} (HTTP {status})" in e["info"]
                          for e in errors), errors
    assert "***" in json.dumps(errors)  # the echoed token was there, and was scrubbed
    assert_no_token(run)


def test_no_token_in_a_401_run(server, stub_ckpt):
    dataset_id, _ = one_location(server)
    echo_token(server, "GET", f"folder/{dataset_id}", 401)
    run = standin_cli(server, params(), dataset_id, stub_ckpt)
    assert run.returncode == 1
    assert "HTTP 401" in run.errors()[0]["info"]
    assert_no_token(run)
    # And with a wrong token: every request is refused, the wrong token is not printed either.
    wrong = "wrong-" + TOKEN[::-1]
    run = standin_cli(server, params(), dataset_id, stub_ckpt, token_args=["--token", wrong])
    assert run.returncode == 1 and "HTTP 401" in run.errors()[0]["info"]
    assert wrong not in run.stdout + run.stderr


BAD_COMMAND_LINES = {
    "only_token": ["--token", TOKEN],
    "bad_request": ["--apiUrl", "x", "--token", TOKEN, "--request", "nope", "--parameters", "{}"],
    "parameters_not_json": ["--apiUrl", "x", "--token", TOKEN, "--request", "compute",
                            "--parameters", '{"Model": "' + TOKEN],
    "unknown_argument": ["--apiUrl", "x", "--token", TOKEN, "--request", "compute", "--parameters", "{}",
                         "--verbose", TOKEN],
    "token_twice": ["--apiUrl", "x", "--token", "first", "--token", TOKEN, "--request", "nope",
                    "--parameters", "{}"],
    "token_equals": ["--apiUrl", "x", f"--token={TOKEN}", "--request", "nope", "--parameters", "{}"],
    "token_missing_value": ["--apiUrl", "x", "--request", "compute", "--parameters", "{}", "--token"],
    "no_dataset": ["--apiUrl", "http://127.0.0.1:9/api/v1", "--token", TOKEN, "--request", "compute",
                   "--parameters", json.dumps(params())],
}


@pytest.mark.parametrize("name", list(BAD_COMMAND_LINES))
def test_no_token_in_bad_command_lines(name, capsys, stub_ckpt, monkeypatch):
    """In-process through cli.main (the same code entrypoint.py runs); exit 2, an error line."""
    monkeypatch.setenv("SAM2_CHECKPOINT_DIR", str(stub_ckpt))
    code = cli.main(BAD_COMMAND_LINES[name])
    out = capsys.readouterr()
    assert code == 2
    assert json.loads(out.out.splitlines()[0])["type"] == "error"
    assert TOKEN not in out.out + out.err


def test_no_token_in_log_records_or_exceptions(server, stub_ckpt, caplog, tmp_path, monkeypatch):
    """In-process, every logger at DEBUG: a clean job, then one whose server echoes the token."""
    monkeypatch.setenv(job.SUMMARY_ENV, str(tmp_path / "s.json"))
    caplog.set_level(logging.DEBUG)
    stream = io.StringIO()
    for echo in (False, True):
        dataset_id, _ = one_location(server)
        settings = parse_settings(params(**{"Delete original annotations": True}), dataset_id, stub_ckpt)
        if echo:
            echo_token(server, "POST", "upenn_annotation/multiple", 500)
        with NimbusClient(server.api_url, TOKEN, retry=RetryPolicy(total=1, backoff_factor=0.01)) as client:
            code = job.run_compute(settings, client, Reporter(stream=stream, secrets=(TOKEN,)),
                                   lambda path: (KnownMaskPredictor(), False))
        assert code == (1 if echo else 0)
    assert caplog.records  # urllib3 and the worker did log
    for record in caplog.records:
        text = record.getMessage() + (logging.Formatter().formatException(record.exc_info) if record.exc_info else "")
        assert TOKEN not in text, record
    assert TOKEN not in stream.getvalue()
    # The client's own exception text, and its chained causes, are scrubbed too.
    with NimbusClient(server.api_url, TOKEN, retry=RetryPolicy(total=0)) as client:
        with pytest.raises(NimbusAPIError) as info:
            client.create_annotations([{"x": 1}])
    chain, exc = [], info.value
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    assert all(TOKEN not in str(e) and TOKEN not in repr(e) for e in chain)
    assert "***" in str(info.value)


# -- pickles from the network: numpy arrays only -----------------------------------------------------

class _RunsCode:
    """A pickle that would call ``marker.touch`` (a harmless stand-in for ``os.system``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_network_pickles_are_read_only_as_arrays(server, stub_ckpt, monkeypatch, tmp_path):
    """A whole job reads its frames as pickles (pickle:5) without pickle.load/loads or np.load,
    which would run any global the server names."""
    def refuse(*args, **kwargs):
        raise AssertionError("an unrestricted unpickler was used")

    monkeypatch.setenv(job.SUMMARY_ENV, str(tmp_path / "s.json"))
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(np, "load", refuse)
    ds = server.add_dataset(pixels(2, 2), layers=LAYERS)
    server.add_annotations(ds.dataset_id, [ann(BIG, xy, t) for xy in range(2) for t in range(2)])
    settings = parse_settings(params(**{"Batch XY": "all", "Batch Time": "all"}), ds.dataset_id, stub_ckpt)
    reporter = Reporter(stream=io.StringIO(), secrets=(TOKEN,))
    with NimbusClient(server.api_url, TOKEN, retry=RetryPolicy(total=1, backoff_factor=0.01)) as client:
        code = job.run_compute(settings, client, reporter, lambda path: (KnownMaskPredictor(), False))
    assert code == 0, reporter.lines
    regions = server.requests_to("GET", r"item/\w+/tiles/region")
    assert len(regions) == 8  # 4 locations x 2 channels
    assert {r.params.get("encoding") for r in regions} == {"pickle:5"}


def test_a_pickle_that_would_run_code_is_refused_and_the_job_keeps_everything(server, stub_ckpt, monkeypatch,
                                                                              tmp_path):
    """A server (or a man in the middle) answering a region with a pickle that calls a function:
    never run; that encoding counts as unreadable, the next ones (TILED, TIFF) are asked for."""
    from sam2_refine.testing import nimbus_server

    marker = tmp_path / "ran"
    evil = pickle.dumps(_RunsCode(marker), protocol=5)
    honest = nimbus_server.encode_region

    def encode(region, encoding, *args):
        return (evil, "application/octet-stream") if encoding.startswith("pickle") else honest(region, encoding, *args)

    monkeypatch.setattr(nimbus_server, "encode_region", encode)
    monkeypatch.setenv(job.SUMMARY_ENV, str(tmp_path / "s.json"))
    dataset_id, ids = one_location(server)
    settings = parse_settings(params(), dataset_id, stub_ckpt)
    reporter = Reporter(stream=io.StringIO(), secrets=(TOKEN,))
    with NimbusClient(server.api_url, TOKEN, retry=RetryPolicy(total=1, backoff_factor=0.01)) as client:
        code = job.run_compute(settings, client, reporter, lambda path: (KnownMaskPredictor(), False))
    assert not marker.exists()
    assert code == 0, reporter.lines  # uint8 pixels: TILED is exact for them
    encodings = [r.params.get("encoding") for r in server.requests_to("GET", r"item/\w+/tiles/region")]
    assert encodings[:2] == ["pickle:5", "TILED"] and set(encodings[2:]) == {"TILED"}


# -- the Model value and the checkpoint directory ---------------------------------------------------

@pytest.mark.parametrize("model", ["../x.pt", "/etc/passwd", f"sub/{CKPT}", f"../{CKPT}", f"..\\{CKPT}",
                                   f"./{CKPT}", "..", f"{CKPT}\0.txt", f"/{CKPT}", f"{CKPT}/"])
def test_model_value_cannot_leave_the_checkpoint_directory(server, stub_ckpt, monkeypatch, capsys, model):
    (stub_ckpt / "sub").mkdir(exist_ok=True)
    (stub_ckpt / "sub" / CKPT).write_bytes(b"")
    monkeypatch.setenv("SAM2_CHECKPOINT_DIR", str(stub_ckpt))
    dataset_id, _ = one_location(server)
    code = cli.main(["--apiUrl", server.api_url, "--token", TOKEN, "--request", "compute",
                     "--parameters", json.dumps(params(Model=model)), "--datasetId", dataset_id])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 2
    assert lines[0]["error"] == "Invalid setting: Model"
    assert server.requests == []


def test_symlinked_checkpoint_is_followed_and_still_checked(tmp_path):
    """Behaviour: a symlink named like a checkpoint inside the directory is accepted and its
    target is read (the directory is the image builder's, not the user's); the target must
    still be a SAM2 checkpoint, recognised from its weights. A dangling link is "not in the
    directory"."""
    from sam2_refine.testing.checkpoints import write_layout_checkpoint

    directory = tmp_path / "ckpts"
    directory.mkdir()
    secret = tmp_path / "outside.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n" * 20)
    (directory / CKPT).symlink_to(secret)
    with pytest.raises(CheckpointChoiceError) as info:
        resolve_checkpoint(directory, CKPT)
    assert "not a PyTorch checkpoint" in str(info.value) and "root:x" not in str(info.value)
    (directory / CKPT).unlink()
    outside = write_layout_checkpoint(tmp_path / "elsewhere" / "weights.bin")
    (directory / CKPT).symlink_to(outside)
    path = resolve_checkpoint(directory, CKPT)
    assert path == directory / CKPT and path.is_symlink()
    (directory / CKPT).unlink()
    (directory / CKPT).symlink_to(tmp_path / "missing.pt")
    with pytest.raises(CheckpointChoiceError, match="not in the checkpoint directory"):
        resolve_checkpoint(directory, CKPT)
    # A symlinked directory of checkpoints works as the directory itself.
    real = tmp_path / "real"
    write_layout_checkpoint(real / CKPT)
    (tmp_path / "linked").symlink_to(real)
    assert resolve_checkpoint(tmp_path / "linked", CKPT) == tmp_path / "linked" / CKPT
    with pytest.raises(SettingsErrors):
        parse_settings(params(Model=str(real / CKPT)), "ds", tmp_path / "linked")


# -- weights_only --------------------------------------------------------------------------------

class _Payload:
    """Pickles as a call to open(marker, "w"): loading it unsafely creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _malicious_checkpoint(path: Path, marker: Path) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"weight": torch.zeros(2)}, "extra": _Payload(marker)}, path)
    return path


def test_a_malicious_checkpoint_runs_no_code(tmp_path):
    """Two locks: the layout reader refuses the pickle's global without importing it, and
    torch's weights_only load refuses it too (should a file change after it was recognised)."""
    import torch

    from sam2_refine.model.sam2_model import CheckpointError, Sam2BoxPredictor, inspect_checkpoint, load_state_dict
    from sam2_refine.testing.checkpoints import write_layout_checkpoint

    # Control: loaded unsafely, this payload does run (so the test below means something).
    control_marker = tmp_path / "control-ran"
    control = _malicious_checkpoint(tmp_path / "control" / CKPT, control_marker)
    torch.load(control, weights_only=False)
    assert control_marker.exists()

    marker = tmp_path / "payload-ran"
    evil = _malicious_checkpoint(tmp_path / "ckpts" / CKPT, marker)
    with pytest.raises(CheckpointError) as info:
        Sam2BoxPredictor.load(evil)
    assert "a pickle with code: it would call io.open (refused, never run)" in str(info.value)
    with pytest.raises(CheckpointChoiceError, match="a pickle with code"):
        resolve_checkpoint(evil.parent, CKPT)
    entry = inspect_checkpoint(write_layout_checkpoint(tmp_path / "good" / CKPT))
    with pytest.raises(CheckpointError) as info:
        load_state_dict(evil, entry)
    assert "corrupt or not a PyTorch checkpoint" in str(info.value)
    assert not marker.exists()


@pytest.mark.slow
def test_a_malicious_checkpoint_through_the_cli(server, tmp_path):
    """The real CLI: the settings refuse the file (exit 2) before the server is asked anything;
    nothing ran, nothing changed."""
    marker = tmp_path / "payload-ran"
    _malicious_checkpoint(tmp_path / "ckpts" / CKPT, marker)
    dataset_id, originals = one_location(server)
    run = run_worker(server, "compute", params(**{"Delete original annotations": True}), dataset_id=dataset_id,
                     checkpoint_dir=tmp_path / "ckpts")
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.errors()[0]["error"] == "Invalid setting: Model"
    assert "a pickle with code" in run.errors()[0]["info"]
    assert not marker.exists()
    assert server.requests == []
    assert {a["_id"] for a in server.annotations(dataset_id)} == set(originals)
    assert_no_token(run)
