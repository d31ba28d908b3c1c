"""Load (issue 7): 50 locations x 500 annotations = 25,000 originals in one job.

In-process through ``job.run_compute`` over real HTTP to the local server, with the known-mask
stand-in on a coarse 64x64 logit grid (the model is not what is measured: the listing, the
selection, the engine's geometry, the chunked uploads, the ledger and the deletions are).
Frames are 256x256 with a jittered grid of 500 small disks; each annotation is a rough octagon.

Checks: the job completes in CI time, memory stays bounded (peak RSS growth), every original is
accounted for in the summary (refined, or kept with a reason), and with delete on exactly the
replaced originals are deleted, each once.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import TOKEN
from sam2_refine.job import compute as job
from sam2_refine.job.markers import original_of
from sam2_refine.nimbus.client import NimbusClient
from sam2_refine.nimbus.retry import RetryPolicy
from sam2_refine.nimbus.progress import Reporter
from sam2_refine.job.settings import parse_settings
from sam2_refine.testing.datasets import annotation_doc, grid_scene, rough_octagons
from sam2_refine.testing.nimbus_server import NimbusTestServer
from sam2_refine.testing.stand_in import KnownMaskPredictor

pytestmark = pytest.mark.slow

LOCATIONS, PER_LOCATION, SIZE = 50, 500, 256
#: CI budget for the job itself (the aim is well under a minute on 2 cores).
MAX_SECONDS = 120
#: Peak RSS may grow at most this much during the job (server in the same process included).
MAX_RSS_GROWTH = 1.5e9


def peak_rss() -> int:
    """VmHWM of this process, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def test_25000_annotations_in_one_job(tmp_path: Path, monkeypatch):
    import sam2_refine.model.sam2_model  # noqa: F401 - torch is imported by every job; not counted as growth

    from sam2_refine.testing.checkpoints import write_layout_checkpoint

    ckpt = tmp_path / "ckpt"
    write_layout_checkpoint(ckpt / "sam2.1_hiera_tiny.pt")
    scene = grid_scene(SIZE, SIZE, PER_LOCATION, seed=0)
    assert scene.count == PER_LOCATION
    with NimbusTestServer(token=TOKEN) as server:
        pixels = np.broadcast_to(scene.channels, (LOCATIONS, 1, 1) + scene.channels.shape).copy()
        ds = server.add_dataset(pixels, layers=[{"channel": 0, "color": "#ffffff", "visible": True, "contrast": {
            "mode": "absolute", "blackPoint": 2000, "whitePoint": 30000}}])
        rng = np.random.default_rng(0)
        originals = server.add_annotations(ds.dataset_id, [
            annotation_doc(points, xy=xy, tags=["cell"])
            for xy in range(LOCATIONS) for points in rough_octagons(scene.centres, scene.radii, rng)])
        assert len(originals) == LOCATIONS * PER_LOCATION

        summary_path = tmp_path / "summary.json"
        monkeypatch.setenv(job.SUMMARY_ENV, str(summary_path))
        request = {"workerInterface": {"Model": "sam2.1_hiera_tiny.pt", "Batch XY": "all",
                                       "Tag of objects to refine": ["cell"], "Delete original annotations": True},
                   "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 0, "tags": ["refined"]}
        settings = parse_settings(request, ds.dataset_id, ckpt)
        predictor = KnownMaskPredictor(grid=(64, 64), max_batch=64)
        reporter = Reporter(stream=io.StringIO(), secrets=(TOKEN,))

        resettable = reset_peak_rss()
        rss_before, peak_before = _current_rss(), peak_rss()
        started = time.perf_counter()
        with NimbusClient(server.api_url, TOKEN, retry=RetryPolicy(total=2, backoff_factor=0.01)) as client:
            code = job.run_compute(settings, client, reporter, lambda path: (predictor, False))
        elapsed = time.perf_counter() - started
        growth = peak_rss() - (rss_before if resettable else peak_before)

        summary = json.loads(summary_path.read_text())
        kept = {i for ids in summary["kept_reasons"].values() for i in ids}
        print(f"\nload: {LOCATIONS} locations x {PER_LOCATION} = {len(originals)} annotations in {elapsed:.1f} s "
              f"({elapsed / len(originals) * 1e3:.2f} ms each); peak RSS growth {growth / 1e6:.0f} MB "
              f"({'reset' if resettable else 'not resettable: growth over the earlier peak'}); "
              f"refined {summary['refined']}, kept {summary['kept']} "
              f"{ {r: len(v) for r, v in summary['kept_reasons'].items()} }, deleted {summary['deleted']}; "
              f"{predictor.embed_calls} embeds, {predictor.decode_calls} decode calls")

        assert code == 0, [line for line in reporter.lines if "error" in line]
        assert elapsed < MAX_SECONDS
        assert growth < MAX_RSS_GROWTH
        assert threading.active_count() < 10  # no leftover prefetch or HTTP threads piling up

        # Every original accounted for, exactly once.
        assert summary["selected"] == len(originals)
        assert set(summary["replacements"]) | kept == set(originals)
        assert not set(summary["replacements"]) & kept
        assert summary["refined"] + summary["kept"] == len(originals)
        assert summary["refined"] > 0.9 * len(originals)  # the coarse grid still finds most disks
        assert predictor.embed_calls == LOCATIONS

        # Exactly the replaced originals deleted, each once; the kept ones are all still there.
        deleted = Counter(i for r in server.requests_to("DELETE", "upenn_annotation/multiple") for i in r.body)
        assert set(deleted) == set(summary["replacements"]) and set(deleted.values()) == {1}
        assert sorted(summary["deleted_ids"]) == sorted(summary["replacements"])
        stored = server.annotations(ds.dataset_id)
        remaining_originals = {a["_id"] for a in stored if original_of(a) is None}
        assert remaining_originals == kept
        refinements = Counter(original_of(a) for a in stored if original_of(a) is not None)
        assert set(refinements) == set(summary["replacements"]) and set(refinements.values()) == {1}
        # Uploaded in chunks while the job went on, never one giant request.
        posts = server.requests_to("POST", "upenn_annotation/multiple")
        assert len(posts) > 1 and max(len(p.body) for p in posts) <= 5000
        # Progress lines stayed monotonic and ended at 1.
        fractions = [line["progress"] for line in reporter.lines if "progress" in line]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0


def _current_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
