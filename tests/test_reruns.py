"""Safe re-runs (issue 7): running a job again never refines an original twice, finishes the
deletions a crashed run left, and never treats a refinement as an original.

Most runs are in-process over real HTTP with the known-mask stand-in (as in test_job); one test
runs the real CLI with the real SAM2.1 tiny model (random weights) and then re-runs the CLI.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import TOKEN, run_worker
from sam2_refine.job import compute as job
from sam2_refine.job.markers import original_of
from sam2_refine.nimbus.client import NimbusClient
from sam2_refine.nimbus.retry import RetryPolicy
from sam2_refine.nimbus.progress import Reporter
from sam2_refine.job.settings import parse_settings
from sam2_refine.testing.datasets import annotation_doc, cell_scene, rough_polygon
from sam2_refine.testing.stand_in import KnownMaskPredictor
from test_cli_e2e import BIG, LAYERS, ann, params, pixels

H, W = 160, 224


def scene_dataset(server, n_xy: int = 1, count: int = 6, seed: int = 0, tags=("cell",)):
    """``n_xy`` positions of the same synthetic scene, one rough outline per nucleus each."""
    scene = cell_scene(H, W, count, radius=(9.0, 15.0), seed=seed)
    pixels_ = np.broadcast_to(scene.channels, (n_xy, 1, 1) + scene.channels.shape).copy()
    ds = server.add_dataset(pixels_, layers=[{"channel": 0, "color": "#ffffff", "visible": True,
                                              "contrast": {"mode": "percentile", "blackPoint": 0.5,
                                                           "whitePoint": 99.5}}])
    rng = np.random.default_rng(1)
    docs = [annotation_doc(rough_polygon(scene.labels == k, "jittered", rng), xy=xy, tags=list(tags))
            for xy in range(n_xy) for k in range(1, scene.count + 1)]
    return ds, scene, server.add_annotations(ds.dataset_id, docs)


def run_job(server, ds, ckpt, summary: Path, *, delete: bool = False, output_tags=("refined",),
            refine_tags=(), predictor=None) -> tuple[int, Reporter, dict[str, Any]]:
    values = {"Model": "sam2.1_hiera_tiny.pt", "Batch XY": "all", "Batch Z": "all", "Batch Time": "all",
              "Delete original annotations": delete, "Tag of objects to refine": list(refine_tags)}
    request = {"workerInterface": values, "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 0,
               "tags": list(output_tags)}
    settings = parse_settings(request, ds.dataset_id, ckpt)
    reporter = Reporter(stream=io.StringIO(), secrets=(TOKEN,))
    predictor = predictor or KnownMaskPredictor()
    os.environ[job.SUMMARY_ENV] = str(summary)
    try:
        with NimbusClient(server.api_url, TOKEN, retry=RetryPolicy(total=1, backoff_factor=0.01)) as client:
            code = job.run_compute(settings, client, reporter, lambda path: (predictor, False))
    finally:
        os.environ.pop(job.SUMMARY_ENV, None)
    return code, reporter, json.loads(summary.read_text())


def refinement_counts(server, dataset_id) -> Counter:
    """original id -> how many annotations on the server refine it."""
    return Counter(o for o in (original_of(d) for d in server.annotations(dataset_id)) if o is not None)


def deleted_ids(server) -> Counter:
    return Counter(i for r in server.requests_to("DELETE", "upenn_annotation/multiple") for i in r.body)


def warned(reporter: Reporter, title: str) -> list[dict]:
    return [line for line in reporter.lines if line.get("title") == title]


def test_running_twice_refines_each_original_once(server, ckpt, tmp_path):
    ds, scene, originals = scene_dataset(server, n_xy=2)
    code, _, first = run_job(server, ds, ckpt, tmp_path / "1.json")
    assert code == 0 and first["refined"] == len(originals) == 2 * scene.count
    posts = len(server.requests_to("POST", "upenn_annotation/multiple"))

    code, reporter, second = run_job(server, ds, ckpt, tmp_path / "2.json")
    assert code == 0
    assert refinement_counts(server, ds.dataset_id) == Counter({o: 1 for o in originals})
    assert len(server.requests_to("POST", "upenn_annotation/multiple")) == posts  # nothing created
    again = warned(reporter, "Already refined")
    assert again and f"{len(originals)} annotation(s) had already been refined" in again[0]["warning"]
    assert second["already_refined"] == len(originals) and second["refined"] == 0
    assert second["replacements"] == first["replacements"]
    assert "already refined earlier" in [line for line in reporter.lines if "progress" in line][-1]["info"]
    assert server.requests_to("DELETE", "upenn_annotation/multiple") == []
    # A third run, now with delete on, deletes every original exactly once and creates nothing.
    code, _, third = run_job(server, ds, ckpt, tmp_path / "3.json", delete=True)
    assert code == 0 and third["deleted"] == len(originals)
    assert deleted_ids(server) == Counter({o: 1 for o in originals})
    assert len(server.requests_to("POST", "upenn_annotation/multiple")) == posts
    assert {d["_id"] for d in server.annotations(ds.dataset_id)} == set(first["replacements"].values())


@pytest.mark.parametrize("fault", ["status_500", "drop_after"])
def test_rerun_with_delete_after_a_crash_on_the_second_chunk(server, ckpt, tmp_path, monkeypatch, fault):
    """Upload fails on chunk 2 of 3 (or its answer is lost); the re-run with delete on deletes
    every original whose refinement exists exactly once and refines only the rest."""
    monkeypatch.setattr(job, "UPLOAD_CHUNK", 3)
    ds, scene, originals = scene_dataset(server, n_xy=3, count=4)
    by_xy = {xy: [a["_id"] for a in server.annotations(ds.dataset_id) if a["location"]["XY"] == xy]
             for xy in range(3)}
    if fault == "status_500":
        server.fail("POST", "upenn_annotation/multiple", status=500, calls=[2])
    else:
        server.fail("POST", "upenn_annotation/multiple", action="drop_after", calls=[2])
    code, reporter, first = run_job(server, ds, ckpt, tmp_path / "1.json", delete=True)
    assert code == 1
    assert server.requests_to("DELETE", "upenn_annotation/multiple") == []  # a failed upload deletes nothing
    made = set(refinement_counts(server, ds.dataset_id))
    expected_made = set(by_xy[0]) | (set(by_xy[1]) if fault == "drop_after" else set())
    assert made == expected_made
    assert set(first["replacements"]) == made  # the lost answer was recovered by looking
    server.clear_faults()

    code, reporter, second = run_job(server, ds, ckpt, tmp_path / "2.json", delete=True)
    assert code == 0, reporter.lines
    assert second["already_refined"] == len(made)
    assert refinement_counts(server, ds.dataset_id) == Counter({o: 1 for o in originals})
    assert deleted_ids(server) == Counter({o: 1 for o in originals})
    assert not {d["_id"] for d in server.annotations(ds.dataset_id)} & set(originals)
    created_again = [original_of(d) for r in server.requests_to("POST", "upenn_annotation/multiple")[2:]
                     for d in r.body if original_of(d) in made]
    assert created_again == []


def test_refinements_are_never_originals_even_with_the_refine_tag(server, ckpt, tmp_path):
    """Output tags == refine tags: the refinements carry the refine tag, and are still skipped."""
    ds, scene, originals = scene_dataset(server, tags=("nucleus",))
    code, _, first = run_job(server, ds, ckpt, tmp_path / "1.json", output_tags=("nucleus",),
                             refine_tags=("nucleus",))
    assert code == 0 and first["refined"] == len(originals)
    refined_ids = set(first["replacements"].values())
    assert all(d["tags"] == ["nucleus"] for d in server.annotations(ds.dataset_id) if d["_id"] in refined_ids)

    code, reporter, second = run_job(server, ds, ckpt, tmp_path / "2.json", output_tags=("nucleus",),
                                     refine_tags=("nucleus",), delete=True)
    assert code == 0
    assert second["selected"] == len(originals)  # the refinements were not selected
    assert not set(second["replacements"]) & refined_ids
    assert not any(original_of(d) in refined_ids for d in server.annotations(ds.dataset_id))
    assert deleted_ids(server) == Counter({o: 1 for o in originals})
    assert {d["_id"] for d in server.annotations(ds.dataset_id)} == refined_ids
    # Once the originals are gone, a third run finds nothing to refine and deletes nothing.
    code, reporter, third = run_job(server, ds, ckpt, tmp_path / "3.json", output_tags=("nucleus",),
                                    refine_tags=("nucleus",), delete=True)
    assert code == 0 and third["selected"] == 0
    assert "Nothing left to refine" in [line for line in reporter.lines if "progress" in line][-1]["info"]
    assert {d["_id"] for d in server.annotations(ds.dataset_id)} == refined_ids


def test_no_refine_tags_and_no_output_tags_still_skips_refinements(server, ckpt, tmp_path):
    ds, scene, originals = scene_dataset(server, tags=())
    code, _, first = run_job(server, ds, ckpt, tmp_path / "1.json", output_tags=())
    assert code == 0 and first["refined"] == len(originals)
    code, reporter, second = run_job(server, ds, ckpt, tmp_path / "2.json", output_tags=())
    assert code == 0 and second["already_refined"] == len(originals) and second["refined"] == 0
    assert refinement_counts(server, ds.dataset_id) == Counter({o: 1 for o in originals})


def test_deleting_a_refinement_lets_the_original_be_refined_again(server, ckpt, tmp_path, client):
    ds, scene, originals = scene_dataset(server)
    code, _, first = run_job(server, ds, ckpt, tmp_path / "1.json")
    assert code == 0
    victim = originals[0]
    client.delete_annotations([first["replacements"][victim]])
    code, reporter, second = run_job(server, ds, ckpt, tmp_path / "2.json")
    assert code == 0
    assert second["refined"] == 1 and set(second["replacements"]) == set(originals)
    assert second["replacements"][victim] != first["replacements"][victim]
    assert second["already_refined"] == len(originals) - 1
    assert refinement_counts(server, ds.dataset_id) == Counter({o: 1 for o in originals})


@pytest.mark.slow
def test_real_cli_rerun_does_not_duplicate_then_deletes(server, checkpoint_dir, tmp_path):
    """The real CLI and model refine; the CLI re-run (no model needed) duplicates nothing."""
    ds = server.add_dataset(pixels(1, 1), layers=LAYERS)
    original = server.add_annotations(ds.dataset_id, [ann(BIG)])[0]
    request = params(**{"Batch XY": "all"})
    run = run_worker(server, "compute", request, dataset_id=ds.dataset_id, checkpoint_dir=checkpoint_dir,
                     summary=tmp_path / "1.json")
    assert run.returncode == 0, run.stdout + run.stderr
    refined = json.loads((tmp_path / "1.json").read_text())["replacements"][original]

    again = run_worker(server, "compute", request, dataset_id=ds.dataset_id, checkpoint_dir=checkpoint_dir,
                       summary=tmp_path / "2.json")
    assert again.returncode == 0, again.stdout + again.stderr
    assert any(w["title"] == "Already refined" and original in w["info"] for w in again.warnings())
    assert not any(p["title"] == "Loading model" for p in again.progress())  # nothing left to refine
    assert len(server.requests_to("POST", "upenn_annotation/multiple")) == 1
    assert refinement_counts(server, ds.dataset_id) == Counter({original: 1})

    last = run_worker(server, "compute", {**request, "workerInterface": {**request["workerInterface"],
                                                                        "Delete original annotations": True}},
                      dataset_id=ds.dataset_id, checkpoint_dir=checkpoint_dir, summary=tmp_path / "3.json")
    assert last.returncode == 0, last.stdout + last.stderr
    assert deleted_ids(server) == Counter({original: 1})
    assert [d["_id"] for d in server.annotations(ds.dataset_id)] == [refined]
