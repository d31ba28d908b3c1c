"""End to end: the real ``entrypoint.py`` as a subprocess, the local server over real HTTP, and a
real SAM2.1 tiny model loaded from a checkpoint the tests make (random weights).

With random weights the masks are meaningless, but deterministic: a box covering most of the
frame gets a mask that passes the quality checks (refined), a small box gets a mask far larger
than itself (kept). These tests check the contract, the accounting and the data safety, not
the masks; geometry and accuracy are tested with stand-in predictors.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TOKEN, run_worker
from sam2_refine.model.checkpoints import scan_models
from sam2_refine.interface import build_interface
from sam2_refine.testing.nimbus_server import NimbusTestServer

pytestmark = pytest.mark.slow

HEIGHT, WIDTH = 96, 128
BIG = [[4, 4], [120, 6], [122, 90], [6, 88]]          # covers most of the frame: refined
SMALL = [[50, 40], [60, 40], [60, 50], [50, 50]]       # tiny: its mask is far larger, kept
LAYERS = [
    {"id": "l0", "name": "nuclei", "channel": 0, "color": "#00ff00", "visible": True,
     "contrast": {"mode": "percentile", "blackPoint": 1, "whitePoint": 99}},
    {"id": "l1", "name": "cyto", "channel": 1, "color": "#ff00ff", "visible": True,
     "contrast": {"mode": "absolute", "blackPoint": 100, "whitePoint": 40000}},
]


def pixels(n_xy: int = 2, n_t: int = 2) -> np.ndarray:
    """(XY, T, Z=1, C=2, H, W) uint16 with a bright blob per frame."""
    rng = np.random.default_rng(3)
    out = rng.integers(200, 2000, size=(n_xy, n_t, 1, 2, HEIGHT, WIDTH), dtype=np.uint16)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    blob = (xx - 64) ** 2 / 900 + (yy - 48) ** 2 / 500 < 1
    out[..., blob] += 30000
    return out


def ann(points, xy=0, time=0, tags=("cell",)) -> dict:
    return {"shape": "polygon", "tags": list(tags), "channel": 0, "location": {"XY": xy, "Z": 0, "Time": time},
            "coordinates": [{"x": float(x), "y": float(y)} for x, y in points]}


def params(**fields) -> dict:
    interface = {"Model": "sam2.1_hiera_tiny.pt", "Delete original annotations": False, "Padding": 0,
                 "Smoothing": 0.7, "Tag of objects to refine": [], "Batch XY": "", "Batch Z": "", "Batch Time": ""}
    interface.update(fields)
    return {"type": "annotation", "name": "SAM2 Refiner", "image": "annotations/sam2_refine_worker:latest",
            "channel": 1, "tags": ["refined"], "tile": {"XY": 0, "Z": 0, "Time": 0},
            "assignment": {"XY": 0, "Z": 0, "Time": 0}, "connectTo": {"tags": [], "channel": None},
            "workerInterface": interface}


def assert_no_token(run) -> None:
    assert TOKEN not in run.stdout and TOKEN not in run.stderr


def writes(server: NimbusTestServer) -> list:
    return [r for r in server.requests if r.method in ("POST", "DELETE", "PUT")]


def test_interface_posts_the_fields(server, checkpoint_dir):
    image = "annotations/sam2_refine_worker:latest"
    started = time.perf_counter()
    run = run_worker(server, "interface", {"image": image}, checkpoint_dir=checkpoint_dir)
    elapsed = time.perf_counter() - started
    assert run.returncode == 0, run.stdout + run.stderr
    posted = server.interface(image)
    assert posted == build_interface(scan_models(checkpoint_dir))
    assert list(posted) == ["SAM2 Refiner", "Batch XY", "Batch Z", "Batch Time", "Tag of objects to refine",
                            "Model", "Delete original annotations", "Padding", "Smoothing",
                            "Resolution", "Prompt", "Minimum overlap with original", "Keep original tags",
                            "Refine point annotations", "Refine rectangle annotations",
                            "Keep touching objects apart", "Tag kept annotations"]
    item = "SAM2.1 tiny, UNTRAINED test weights (sam2.1_hiera_tiny.pt)"
    assert posted["Model"]["items"] == [item]
    assert posted["Model"]["default"] == item
    assert run.warnings() == []  # every file of the directory is usable
    # The interface job touches no dataset and no model: one request, and it is quick.
    assert [(r.method, r.path) for r in server.requests] == [("POST", "worker_interface")]
    print(f"\ninterface request: {elapsed:.2f} s (process start included)")
    assert elapsed < 10
    assert_no_token(run)


def test_refines_a_2xy_2time_dataset_and_deletes_only_replaced(server, checkpoint_dir, tmp_path):
    ds = server.add_dataset(pixels(), layers=LAYERS)
    ids = {}
    for xy in range(2):
        for t in range(2):
            ids[(xy, t, "big")] = server.add_annotations(ds.dataset_id, [ann(BIG, xy, t)])[0]
            ids[(xy, t, "small")] = server.add_annotations(ds.dataset_id, [ann(SMALL, xy, t)])[0]
    summary_path = tmp_path / "summary.json"
    run = run_worker(server, "compute", params(**{"Batch XY": "1-2", "Batch Time": "all",
                                                  "Delete original annotations": True}),
                     dataset_id=ds.dataset_id, checkpoint_dir=checkpoint_dir, summary=summary_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert_no_token(run)
    summary = json.loads(summary_path.read_text())
    assert summary["selected"] == 8 and summary["refined"] == 4 and summary["kept"] == 4
    big = {ids[(xy, t, "big")] for xy in range(2) for t in range(2)}
    small = {ids[(xy, t, "small")] for xy in range(2) for t in range(2)}
    assert set(summary["replacements"]) == big and set(summary["deleted_ids"]) == big

    stored = {a["_id"]: a for a in server.annotations(ds.dataset_id)}
    assert small <= set(stored) and not big & set(stored)  # kept originals stay, replaced ones go
    new = [a for a in stored.values() if a["_id"] not in small]
    assert len(new) == 4
    for doc in new:
        assert doc["shape"] == "polygon" and doc["tags"] == ["refined"] and doc["channel"] == 1
        assert doc["datasetId"] == ds.dataset_id
        xs = [p["x"] for p in doc["coordinates"]]
        ys = [p["y"] for p in doc["coordinates"]]
        assert len(xs) >= 3 and min(xs) >= -0.5 and max(xs) <= WIDTH - 0.5 and max(ys) <= HEIGHT - 0.5
    assert sorted((d["location"]["XY"], d["location"]["Time"]) for d in new) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for xy in range(2):
        for t in range(2):
            replacement = summary["replacements"][ids[(xy, t, "big")]]
            assert stored[replacement]["location"] == {"XY": xy, "Z": 0, "Time": t}

    progress = run.progress()
    fractions = [p["progress"] for p in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    infos = " ".join(p["info"] for p in progress)
    for where in ("XY 1, Z 1, Time 1", "XY 1, Z 1, Time 2", "XY 2, Z 1, Time 1", "XY 2, Z 1, Time 2"):
        assert where in infos
    titles = [p["title"] for p in progress]
    for stage in ("Fetching annotations", "Loading model", "Refining", "Uploading", "Deleting originals", "Complete"):
        assert stage in titles
    assert "Refined 4 of 8, kept 4, deleted 4" in progress[-1]["info"]
    kept_warning, = [w for w in run.warnings() if w["title"] == "Annotations kept"]
    assert kept_warning["warning"].startswith("4 annotation(s) were kept unchanged at 4 position(s)")
    for where in ("XY 1, Time 1: 1 kept: 1 ", "XY 1, Time 2: 1 kept", "XY 2, Time 1: 1 kept", "XY 2, Time 2: 1 kept"):
        assert where in kept_warning["info"]  # Z left out: the dataset has one Z
    assert not any(i in kept_warning["info"] for i in small)  # ids only in the summary file
    by_position = summary["kept_by_position"]
    assert sorted(i for reasons in by_position.values() for ids in reasons.values() for i in ids) == sorted(small)
    assert any("UNTRAINED" in w["warning"] for w in run.warnings())
    # Each location's frames were fetched once per channel, exactly (pickle:5).
    regions = server.requests_to("GET", r"item/\w+/tiles/region")
    assert len(regions) == 4 * 2 and len({r.params["frame"] for r in regions}) == 8
    assert all(r.params["encoding"] == "pickle:5" for r in regions)


def test_delete_off_keeps_every_original(server, checkpoint_dir, tmp_path):
    ds = server.add_dataset(pixels(1, 1), layers=LAYERS)
    originals = server.add_annotations(ds.dataset_id, [ann(BIG), ann(SMALL)])
    run = run_worker(server, "compute", params(), dataset_id=ds.dataset_id, checkpoint_dir=checkpoint_dir,
                     summary=tmp_path / "s.json")
    assert run.returncode == 0, run.stdout + run.stderr
    stored = server.annotations(ds.dataset_id)
    assert {a["_id"] for a in stored} >= set(originals) and len(stored) == 3
    assert server.requests_to("DELETE", "upenn_annotation/multiple") == []
    assert json.loads((tmp_path / "s.json").read_text())["deleted"] == 0


def test_tag_and_batch_filtering(server, checkpoint_dir, tmp_path):
    ds = server.add_dataset(pixels(3, 2), layers=LAYERS)
    wanted = server.add_annotations(ds.dataset_id, [ann(BIG, 1, 0, ["a"]), ann(BIG, 1, 1, ["x", "b"])])
    unwanted = server.add_annotations(ds.dataset_id, [
        ann(BIG, 1, 0, ["c"]),            # other tag
        ann(BIG, 1, 0, []),               # no tag
        ann(BIG, 0, 0, ["a"]),            # XY outside the batch
        ann(BIG, 2, 1, ["b"]),            # XY outside the batch
    ])
    run = run_worker(server, "compute", params(**{"Tag of objects to refine": ["a", "b"], "Batch XY": "2",
                                                  "Batch Time": "1-2"}),
                     dataset_id=ds.dataset_id, checkpoint_dir=checkpoint_dir, summary=tmp_path / "s.json")
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert set(summary["replacements"]) | set(i for v in summary["kept_reasons"].values() for i in v) == set(wanted)
    assert not set(unwanted) & set(summary["replacements"])
    # The batch's annotations are read without a tag filter (tags are filtered here, so that
    # earlier refinements with any output tags are seen): on a dataset this small one listing of
    # its polygons is cheaper than queries by location (read_plan), and no blob is asked for.
    # The re-reads while the job runs ask for the polygons at one location with the tool's
    # output tags (other jobs' refinements).
    listings = server.requests_to("GET", "upenn_annotation")
    assert listings and all(r.params["shape"] == "polygon" and "tags" not in r.params for r in listings)
    rereads = server.requests_to("POST", "upenn_annotation/list/ids")
    assert rereads and all(r.body["filters"]["location"] in ({"XY": 1, "Z": 0, "Time": 0}, {"XY": 1, "Z": 0, "Time": 1})
                           and r.body["filters"]["tags"] == {"values": ["refined"], "exclusive": False}
                           for r in rereads)
    frames = {int(r.params["frame"]) for r in server.requests_to("GET", r"item/\w+/tiles/region")}
    assert frames == {ds.frame_of[(1, t, 0, c)] for t in range(2) for c in range(2)}


def test_upload_failure_deletes_nothing_and_fails(server, checkpoint_dir, tmp_path):
    ds = server.add_dataset(pixels(1, 1), layers=LAYERS)
    originals = server.add_annotations(ds.dataset_id, [ann(BIG), ann(SMALL)])
    server.fail("POST", "upenn_annotation/multiple", status=500)
    run = run_worker(server, "compute", params(**{"Delete original annotations": True}), dataset_id=ds.dataset_id,
                     checkpoint_dir=checkpoint_dir, summary=tmp_path / "s.json")
    assert run.returncode == 1
    assert server.requests_to("DELETE", "upenn_annotation/multiple") == []
    assert [a["_id"] for a in server.annotations(ds.dataset_id)] == originals
    error = run.errors()[-1]
    assert "no original annotation was deleted" in error["error"]
    assert "Created 0 of 1" in error["info"] and "HTTP 500" in error["info"]
    assert_no_token(run)


BAD_SETTINGS = [
    ({"Model": "../sam2.1_hiera_tiny.pt"}, "Model"),
    ({"Model": "sam2.1_hiera_large.pt"}, "Model"),
    ({"Padding": 25}, "Padding"),
    ({"Padding": -20.5}, "Padding"),
    ({"Smoothing": 3.5}, "Smoothing"),
    ({"Smoothing": -1}, "Smoothing"),
    ({"Batch XY": "3-1"}, "Batch XY"),
    ({"Batch Z": "x"}, "Batch Z"),
    ({"Batch Time": "0"}, "Batch Time"),
    ({"Batch XY": "-2"}, "Batch XY"),
    ({"Batch Time": "1--3"}, "Batch Time"),
]


@pytest.mark.parametrize("fields,field", BAD_SETTINGS,
                         ids=[f"{k}={v}" for (d, _) in BAD_SETTINGS for k, v in d.items()])
def test_bad_setting_is_an_error_naming_the_field(server, checkpoint_dir, fields, field):
    ds = server.add_dataset(pixels(1, 1), layers=LAYERS)
    server.add_annotations(ds.dataset_id, [ann(BIG)])
    run = run_worker(server, "compute", params(**fields), dataset_id=ds.dataset_id, checkpoint_dir=checkpoint_dir)
    assert run.returncode == 2
    errors = run.errors()
    assert errors and errors[0]["error"] == f"Invalid setting: {field}"
    assert "Nothing was changed" in errors[0]["info"]
    assert server.requests == []  # settings are checked before the server's data is touched
    assert_no_token(run)


def test_batch_beyond_the_dataset_states_its_size(server, checkpoint_dir):
    ds = server.add_dataset(pixels(2, 2), layers=LAYERS)
    original = server.add_annotations(ds.dataset_id, [ann(BIG)])
    run = run_worker(server, "compute", params(**{"Batch XY": "1-3"}), dataset_id=ds.dataset_id,
                     checkpoint_dir=checkpoint_dir)
    assert run.returncode == 2
    error = run.errors()[0]
    assert error["error"] == "Invalid setting: Batch XY"
    assert '"1-3" asks for position 3, but the dataset has 2 positions on this axis (1-2)' in error["info"]
    assert error["info"].endswith("then run the tool again.") and "Nothing was changed." in error["info"]
    assert writes(server) == [] and server.requests_to("GET", "upenn_annotation") == []
    assert [a["_id"] for a in server.annotations()] == original


def test_per_annotation_failures_are_warned_and_kept(server, checkpoint_dir, tmp_path):
    ds = server.add_dataset(pixels(1, 1), layers=LAYERS)
    bad = {
        "fewer than 3 points": ann([[1, 1], [5, 5]]),
        "non-finite": ann([[1, 1], [float("nan"), 5], [9, 9]]),  # served as null, like orjson
        "zero-area box": ann([[10, 10], [20, 10], [30, 10]]),
        "outside the frame": ann([[500, 500], [520, 500], [520, 520]]),
        "bad mask": ann(SMALL),  # random weights: a mask far larger than it, or beside it
    }
    bad_ids = dict(zip(bad, server.add_annotations(ds.dataset_id, bad.values())))
    good = server.add_annotations(ds.dataset_id, [ann(BIG)])[0]
    run = run_worker(server, "compute", params(**{"Delete original annotations": True}), dataset_id=ds.dataset_id,
                     checkpoint_dir=checkpoint_dir, summary=tmp_path / "s.json")
    assert run.returncode == 0, run.stdout + run.stderr
    kept_text = json.dumps(json.loads((tmp_path / "s.json").read_text())["kept_by_position"])
    reasons = json.loads((tmp_path / "s.json").read_text())["kept_reasons"]
    expected = {"fewer than 3 points": ("fewer than 3 points",), "non-finite": ("not a number",),
                "zero-area box": ("encloses no area",), "outside the frame": ("outside the 128x96 frame",),
                "bad mask": ("far larger than the original", "does not overlap the original", "empty mask")}
    for key, ann_id in bad_ids.items():
        assert ann_id in kept_text
        assert any(any(e in reason for e in expected[key]) and ann_id in ids
                   for reason, ids in reasons.items()), json.dumps(reasons)
    stored = {a["_id"] for a in server.annotations(ds.dataset_id)}
    assert set(bad_ids.values()) <= stored and good not in stored
    deletes = server.requests_to("DELETE", "upenn_annotation/multiple")
    assert [r.body for r in deletes] == [[good]]


def test_missing_checkpoint_file_and_corrupt_checkpoint(server, tmp_path):
    ds = server.add_dataset(pixels(1, 1), layers=LAYERS)
    original = server.add_annotations(ds.dataset_id, [ann(BIG)])
    empty_dir = tmp_path / "none"
    empty_dir.mkdir()
    run = run_worker(server, "compute", params(), dataset_id=ds.dataset_id, checkpoint_dir=empty_dir)
    assert run.returncode == 2 and "none found" in run.errors()[0]["info"]
    corrupt_dir = tmp_path / "corrupt"
    corrupt_dir.mkdir()
    (corrupt_dir / "sam2.1_hiera_tiny.pt").write_bytes(b"not a checkpoint" * 100)
    run = run_worker(server, "compute", params(), dataset_id=ds.dataset_id, checkpoint_dir=corrupt_dir)
    # Recognised as unusable by the settings: nothing was asked of the server.
    assert run.returncode == 2
    assert run.errors()[0]["error"] == "Invalid setting: Model"
    assert "not a PyTorch checkpoint" in run.errors()[0]["info"]
    assert server.requests == [] and [a["_id"] for a in server.annotations()] == original
    assert_no_token(run)


def test_wrong_architecture_checkpoint_is_refused(server, checkpoint_dir, tmp_path):
    """A tiny checkpoint saved under the stock small model's name is not run as either: the
    weights say tiny, the name promises small; the settings refuse it before the server is
    asked anything."""
    ds = server.add_dataset(pixels(1, 1), layers=LAYERS)
    server.add_annotations(ds.dataset_id, [ann(BIG)])
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "sam2.1_hiera_small.pt").symlink_to(checkpoint_dir / "sam2.1_hiera_tiny.pt")
    run = run_worker(server, "compute", params(Model="sam2.1_hiera_small.pt"), dataset_id=ds.dataset_id,
                     checkpoint_dir=wrong)
    assert run.returncode == 2
    assert "named like the stock SAM2.1 small checkpoint, but its weights are SAM2.1 tiny" in run.errors()[0]["info"]
    assert server.requests == []


def test_no_annotations_is_a_clean_success(server, checkpoint_dir):
    ds = server.add_dataset(pixels(1, 1), layers=LAYERS)
    run = run_worker(server, "compute", params(), dataset_id=ds.dataset_id, checkpoint_dir=checkpoint_dir)
    assert run.returncode == 0
    assert run.progress()[-1]["progress"] == 1.0 and "Nothing to refine" in run.progress()[-1]["info"]
    assert [w["warning"] for w in run.warnings()] == ["The chosen batch holds no polygon annotations."]
    assert writes(server) == []


def test_bad_command_lines_exit_non_zero_without_echoing_the_token(server, checkpoint_dir):
    run = run_worker(server, "compute", params(), checkpoint_dir=checkpoint_dir)  # no --datasetId
    assert run.returncode == 2 and run.errors()[0]["error"] == "Invalid setting: datasetId"
    import subprocess
    import sys
    from conftest import REPO
    for argv in (["--token", TOKEN], ["--apiUrl", "x", "--token", TOKEN, "--request", "nope", "--parameters", "{}"],
                 ["--apiUrl", "x", "--token", TOKEN, "--request", "compute", "--parameters", "{not json"]):
        done = subprocess.run([sys.executable, str(REPO / "entrypoint.py"), *argv], capture_output=True, text=True,
                              timeout=60, cwd=REPO)
        assert done.returncode == 2
        assert TOKEN not in done.stdout + done.stderr
        assert json.loads(done.stdout.splitlines()[0])["type"] == "error"


def test_demo_runs_end_to_end_and_labels_an_untrained_model(tmp_path, checkpoint_dir, monkeypatch, capsys):
    """The README's first command, in-process (it starts its own server and worker subprocess).
    Offline (an untrained checkpoint only): the honest SAM2 run rejects nearly every mask, and the
    same job with the stand-in segmenter refines, confirms and replaces every original."""
    from sam2_refine import demo

    monkeypatch.setenv("SAM2_CHECKPOINT_DIR", str(checkpoint_dir))
    summary = demo.run(tmp_path, allow_download=False)
    printed = capsys.readouterr().out
    assert summary["worker_exit_code"] == 0
    assert summary["untrained_model"] is True  # the test checkpoint carries the marker
    assert summary["annotations"] == 28
    assert summary["refined"] + summary["kept"] == 28
    assert summary["refined"] <= 3  # random weights: the quality checks reject nearly every mask
    overlay = tmp_path / "overlay.png"
    import cv2
    image = cv2.imread(str(overlay))
    assert image is not None and image.shape[0] > 512 and image.shape[1] > 1024
    assert tuple(image[5, 5]) == (0, 0, 160)  # the red UNTRAINED title bar
    assert json.loads((tmp_path / "summary.json").read_text())["overlay"] == str(overlay)
    stand_in = summary["stand_in"]
    assert stand_in["segmenter"] == "stand-in segmenter, not SAM2" and stand_in["exit_code"] == 0
    assert stand_in["refined"] == stand_in["deleted"] == 28 and stand_in["kept"] == 0  # created, confirmed, replaced
    assert stand_in["mean_iou_to_truth_after"] > stand_in["mean_iou_to_truth_before"] + 0.15
    stand_in_image = cv2.imread(stand_in["overlay"])
    assert stand_in_image is not None and tuple(stand_in_image[5, 5]) == (0, 90, 200)  # its own orange bar
    lines = [line for line in printed.splitlines() if "STAND-IN" in line.upper()]
    assert any("STAND-IN SEGMENTER, NOT SAM2: exit code 0" in line and "refined 28" in line for line in lines)
    assert len(lines) >= 5 and all("stand-in segmenter, not sam2" in line.lower() for line in lines)


def test_demo_serve_is_the_server_the_readme_runs_the_worker_against(checkpoint_dir):
    """The README's "Try it by hand": ``python -m sam2_refine.demo --serve PORT`` serves the example
    and prints the worker's arguments; ``entrypoint.py --request interface`` run against it with
    them posts the form; the example's 28 rough annotations are there to refine; SIGTERM stops it
    (exit 0)."""
    import os
    import signal
    import subprocess
    import sys

    import requests

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(repo))
    serving = subprocess.Popen([sys.executable, "-m", "sam2_refine.demo", "--serve", "0"], cwd=repo, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 60
        while not line.startswith("--apiUrl") and time.monotonic() < deadline:
            line = serving.stdout.readline()
            assert line or serving.poll() is None, serving.stderr.read()
        args = line.split()
        assert args[0::2] == ["--apiUrl", "--token", "--datasetId"], line
        api_url, token, dataset_id = args[1::2]
        assert api_url.startswith("http://127.0.0.1:")
        listing = requests.get(f"{api_url}/upenn_annotation", params={"datasetId": dataset_id, "limit": 0},
                               headers={"Girder-Token": token}, timeout=30).json()
        assert len(listing) == 28 and {tag for a in listing for tag in a["tags"]} == {"nucleus"}
        run = subprocess.run([sys.executable, str(repo / "entrypoint.py"), *args[:4], "--request", "interface",
                              "--parameters", json.dumps({"image": "annotations/sam2_refine_worker:latest"})],
                             capture_output=True, text=True, timeout=120, cwd=repo,
                             env=dict(env, SAM2_CHECKPOINT_DIR=str(checkpoint_dir)))
        assert run.returncode == 0, run.stdout + run.stderr
        posted = requests.get(f"{api_url}/worker_interface", params={"image": "annotations/sam2_refine_worker:latest"},
                              headers={"Girder-Token": token}, timeout=30)
        assert posted.status_code == 200 and "Model" in posted.json(), posted.text
        serving.send_signal(signal.SIGTERM)
        assert serving.wait(timeout=30) == 0
    finally:
        if serving.poll() is None:
            serving.kill()
            serving.wait()
