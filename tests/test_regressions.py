"""Regression tests: reliability bugs found while writing the issue-7 tests, each fixed.

Ordered by severity at the time they were found. Each docstring keeps the original report.
"""

from __future__ import annotations

import io
import json
import signal
import time
from collections import Counter

import numpy as np
import pytest

from conftest import TOKEN
from sam2_refine import cli
from sam2_refine.job import compute as job
from sam2_refine.job.batch_ranges import BatchRangeError, parse_batch
from sam2_refine.job.markers import original_of
from sam2_refine.nimbus.errors import NimbusAPIError
from sam2_refine.nimbus.client import NimbusClient
from sam2_refine.nimbus.retry import RetryPolicy, Timeouts
from sam2_refine.nimbus.progress import Reporter
from sam2_refine.job.settings import parse_settings
from sam2_refine.testing.datasets import annotation_doc, cell_scene, rough_polygon
from sam2_refine.testing.stand_in import KnownMaskPredictor


def _run(server, dataset_id, ckpt, *, output_tags, refine_tags=("cell",), delete=False) -> int:
    request = {"workerInterface": {"Model": "sam2.1_hiera_tiny.pt", "Batch XY": "all",
                                   "Tag of objects to refine": list(refine_tags),
                                   "Delete original annotations": delete},
               "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 0, "tags": list(output_tags)}
    settings = parse_settings(request, dataset_id, ckpt)
    with NimbusClient(server.api_url, TOKEN, retry=RetryPolicy(total=1, backoff_factor=0.01)) as client:
        return job.run_compute(settings, client, Reporter(stream=io.StringIO(), secrets=(TOKEN,)),
                               lambda path: (KnownMaskPredictor(), False))


# -- 1. duplicates when the tool's output tags change between runs (data: duplicated annotations) --

@pytest.mark.parametrize("second_tags", [("refined", "v2"), ("other",)], ids=["tag_added", "tag_changed"])
def test_rerun_with_other_output_tags_does_not_refine_again(server, ckpt, second_tags):
    """Refinements are looked up only among polygons carrying ALL of the current output tags
    (job._queries / find_refinements), so after the user adds or changes an output tag (with
    refine tags set) the earlier refinements are not found and every original is refined a
    second time. With "Delete original annotations" on, the originals are then deleted and two
    refinements of each remain. This is exactly the crash-recovery re-run the markers exist for.

    Repro: refine tags ["cell"], output tags ["refined"]; run; run again with output tags
    ["refined", "v2"] -> 2 annotations carry sam2Refine.originalId == each original.
    """
    scene = cell_scene(160, 224, 4, radius=(9.0, 15.0), seed=0)
    ds = server.add_dataset(scene.channels[None, None, None], layers=[
        {"channel": 0, "color": "#ffffff", "visible": True,
         "contrast": {"mode": "percentile", "blackPoint": 0.5, "whitePoint": 99.5}}])
    rng = np.random.default_rng(1)
    originals = server.add_annotations(ds.dataset_id, [
        annotation_doc(rough_polygon(scene.labels == k, "jittered", rng), tags=["cell"])
        for k in range(1, scene.count + 1)])
    assert _run(server, ds.dataset_id, ckpt, output_tags=("refined",)) == 0
    assert _run(server, ds.dataset_id, ckpt, output_tags=second_tags, delete=True) == 0
    counts = Counter(original_of(a) for a in server.annotations(ds.dataset_id) if original_of(a))
    assert counts == Counter({o: 1 for o in originals}), counts


# -- 2. Retry-After is obeyed without a bound: a job can hang for hours ------------------------

def test_retry_after_does_not_outlast_the_timeouts(server):
    """urllib3's Retry sleeps for the whole ``Retry-After`` of a 503 (or 429/413) on GET and
    DELETE, uncapped (backoff_max does not apply to it), on every retry. A proxy answering
    ``503, Retry-After: 3600`` stalls the job for 5 hours with the default 5 retries, whatever
    SAM2_REFINE_HTTP_TIMEOUT says (the CLI with TIMEOUT=1, default retries and Retry-After: 12
    took 60 s to fail in the investigation).

    Repro: GET upenn_annotation answers 503 with Retry-After: 8; a client with 1 retry and a
    1 s read timeout takes 8 s to give up.
    """
    original = server.handle

    def maintenance(method, path, params, body, token):
        if method == "GET" and path == "upenn_annotation":
            return 503, b'{"message": "maintenance"}', "application/json", {"Retry-After": "8"}
        return original(method, path, params, body, token)

    server.handle = maintenance
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 8, 8), dtype=np.uint8))
    # The fix: Retry-After is capped at the policy's backoff_max (20 s by default; the CLI caps
    # it further at SAM2_REFINE_HTTP_TIMEOUT).
    with NimbusClient(server.api_url, TOKEN, retry=RetryPolicy(total=1, backoff_max=1),
                      timeouts=Timeouts(connect=1, read=1)) as client:
        started = time.monotonic()
        with pytest.raises(NimbusAPIError) as caught:
            client.list_annotations(ds.dataset_id, "polygon")
        elapsed = time.monotonic() - started
    assert elapsed < 4, f"gave up after {elapsed:.1f} s: Retry-After was obeyed uncapped"
    assert caught.value.status == 503


def test_cli_timeout_caps_the_retry_wait(monkeypatch):
    monkeypatch.setenv("SAM2_REFINE_HTTP_TIMEOUT", "1.5")
    monkeypatch.setenv("SAM2_REFINE_HTTP_RETRIES", "3")
    retry, timeouts = cli.http_policies()
    assert (retry.total, retry.backoff_max, timeouts.read, timeouts.connect) == (3, 1.5, 1.5, 1.5)
    monkeypatch.setenv("SAM2_REFINE_HTTP_TIMEOUT", "soon")
    retry, timeouts = cli.http_policies()  # a malformed value: the defaults, with a log line
    assert timeouts.read == 300


# -- 3. "no original annotation was deleted" while a DELETE was already on its way ----------------

@pytest.mark.slow
def test_sigterm_during_a_sent_delete_does_not_claim_nothing_was_deleted(server, ckpt, tmp_path):
    """SIGTERM while the DELETE request is in flight: the worker reports "The job was stopped
    (SIGTERM); no original annotation was deleted. ... 0 original(s) deleted", but the server
    carries out the DELETE it received and the originals are gone (their refinements exist, so
    no data is lost: the message, and the summary's deleted/delete_failed, are wrong). The same
    happens when the DELETE times out: "Deleted 0; 2 originals remain next to their refined
    copies" while the server deletes them.

    Repro: the server delays DELETE upenn_annotation/multiple by 2 s; SIGTERM the CLI once the
    DELETE has arrived; after the delay both replaced originals are gone.
    """
    from test_cli_e2e import BIG, LAYERS, SMALL, ann, params, pixels
    from test_faults import LiveRun, cli_argv, cli_env, error_text, wait_until_answered

    ds = server.add_dataset(pixels(1, 1), layers=LAYERS)
    big, _ = server.add_annotations(ds.dataset_id, [ann(BIG), ann(SMALL)])
    server.fail("DELETE", r"upenn_annotation/multiple", action="delay", delay=2, calls=[1])
    live = LiveRun(cli_argv(server, params(**{"Delete original annotations": True}), ds.dataset_id, standin=True),
                   cli_env(ckpt, tmp_path / "s.json"))
    live.wait_for(lambda: server.requests_to("DELETE", r"upenn_annotation/multiple"))
    live.proc.send_signal(signal.SIGTERM)
    run = live.finish()
    wait_until_answered(server, "DELETE", r"upenn_annotation/multiple")
    assert run.returncode == 143
    assert big not in {a["_id"] for a in server.annotations(ds.dataset_id)}  # the server did delete it
    text = error_text(run)
    assert "no original annotation was deleted" not in text and "0 original(s) deleted" not in text, text


# -- 4. a Batch field with a very long number is an unexpected failure, not a setting error -------

def test_huge_batch_number_is_a_setting_error(server, ckpt, monkeypatch, capsys):
    """``int()`` refuses strings of more than 4300 digits with a plain ValueError, which
    parse_batch does not turn into BatchRangeError: parse_settings lets it through and the CLI
    reports "The worker failed unexpectedly." with exit 1 instead of "Invalid setting: Batch XY"
    with exit 2 (the field is not named).

    Repro: Batch XY = "1" * 5000.
    """
    with pytest.raises(BatchRangeError):
        parse_batch("Batch XY", "1" * 5000)
    monkeypatch.setenv("SAM2_CHECKPOINT_DIR", str(ckpt))
    request = {"workerInterface": {"Model": "sam2.1_hiera_tiny.pt", "Batch XY": "1" * 5000},
               "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 0, "tags": []}
    code = cli.main(["--apiUrl", server.api_url, "--token", TOKEN, "--request", "compute",
                     "--parameters", json.dumps(request), "--datasetId", "x"])
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert code == 2 and first["error"] == "Invalid setting: Batch XY", first


# -- 5. Batch ranges are expanded without a total bound ------------------------------------------

def test_batch_ranges_have_a_total_bound():
    """Each range is limited to 1,000,000 positions, but their sum is not: a 334-character Batch
    field of 20 such ranges builds a set of 20 million ints (about 1.4 GB, 1.4 s) before the
    positions are checked against the dataset's size. (A user's typo or a saved tool from a
    huge dataset, not an attack: the worker should refuse or stay lazy.)

    Repro: "1-1000000,1000001-2000000,2000001-3000000" -> 3,000,000 positions.
    """
    text = ",".join(f"{k * 1_000_000 + 1}-{(k + 1) * 1_000_000}" for k in range(3))
    try:
        parsed = parse_batch("Batch XY", text)
    except BatchRangeError:
        return
    assert len(parsed.positions) <= 1_000_000, f"{len(parsed.positions)} positions expanded"


# -- 6. a layer whose contrast is not an object: "failed unexpectedly" --------------------------

def test_layer_contrast_not_an_object_names_the_layer(server, ckpt, tmp_path, monkeypatch):
    """imaging.parse_layers calls ``contrast.get`` on whatever ``contrast`` is: a string or a list
    raises AttributeError, reported as "The job failed unexpectedly" (AttributeError: 'str'
    object has no attribute 'get') instead of "The dataset's layer settings cannot be used."
    naming the layer. Nothing is changed either way (exit 1).

    Repro: a layer {"channel": 0, "visible": true, "contrast": "high"}.
    """
    monkeypatch.setenv(job.SUMMARY_ENV, str(tmp_path / "s.json"))
    ds = server.add_dataset(np.full((1, 1, 1, 1, 32, 32), 100, dtype=np.uint16),
                            layers=[{"name": "nuclei", "channel": 0, "visible": True, "contrast": "high"}])
    server.add_annotations(ds.dataset_id, [annotation_doc(np.array([[4.0, 4.0], [20, 4], [20, 20], [4, 20]]))])
    request = {"workerInterface": {"Model": "sam2.1_hiera_tiny.pt"}, "tile": {"XY": 0, "Z": 0, "Time": 0},
               "channel": 0, "tags": []}
    reporter = Reporter(stream=io.StringIO())
    with NimbusClient(server.api_url, TOKEN) as client:
        code = job.run_compute(parse_settings(request, ds.dataset_id, ckpt), client, reporter,
                               lambda path: (KnownMaskPredictor(), False))
    error = [line for line in reporter.lines if "error" in line][0]
    assert code == 1
    assert error["error"] == "The dataset's layer settings cannot be used." and "nuclei" in error["info"], error


# -- 7. the token is scrubbed only when given as "--token VALUE" --------------------------------

@pytest.mark.parametrize("token_args", [[f"--token={TOKEN}"], ["--tok", TOKEN]], ids=["equals", "abbreviated"])
def test_token_is_scrubbed_whatever_the_argument_form(token_args, ckpt, monkeypatch, capsys):
    """cli.main finds the token to scrub by looking for the exact argument "--token" followed by
    a value, while argparse also accepts "--token=VALUE" and abbreviations ("--tok VALUE").
    Then the Reporter scrubs nothing: any message that echoes the token is printed as is. (The
    HTTP client still scrubs server messages with the parsed token, and NimbusImage passes
    "--token VALUE", so this is defence in depth; the repro needs the token in a field value.)

    Repro: --token=SECRET with "channel": "SECRET" -> "expected a whole number, got 'SECRET'".
    """
    monkeypatch.setenv("SAM2_CHECKPOINT_DIR", str(ckpt))
    request = {"workerInterface": {"Model": "sam2.1_hiera_tiny.pt"}, "tile": {"XY": 0, "Z": 0, "Time": 0},
               "channel": TOKEN, "tags": []}
    code = cli.main(["--apiUrl", "http://127.0.0.1:9/api/v1", *token_args, "--request", "compute",
                     "--parameters", json.dumps(request), "--datasetId", "x"])
    out = capsys.readouterr()
    assert code == 2
    assert TOKEN not in out.out + out.err

