"""Issue 23, item 3: errors in the user's words.

Every error line says what happened in ``error`` and the details and what to do in ``info``.
One test per kind of message, through the real command line in-process (``cli.main``) against
the local server over real HTTP: the placement and the words that matter, no library text, no
repeated punctuation. Then the pure helpers of :mod:`sam2_refine.messages`.
"""

from __future__ import annotations

import json
import re
import socket
from typing import Any

import numpy as np
import pytest
import requests

from conftest import TOKEN
from sam2_refine import cli
from sam2_refine.fields import describe_value
from sam2_refine.messages import cause_text, sentence, sentences, server_failure
from sam2_refine.nimbus.errors import NimbusAPIError
from sam2_refine.testing.nimbus_server import NimbusTestServer
from sam2_refine.testing.stand_in import KnownMaskPredictor

LIBRARY_WORDS = ("HTTPConnectionPool", "Max retries", "urllib3", "NewConnectionError", "Traceback", "requests.",
                 "<", "Errno")


def request(**fields: Any) -> dict[str, Any]:
    values = {"Model": "sam2.1_hiera_tiny.pt", "Batch XY": "", "Batch Z": "", "Batch Time": "",
              "Delete original annotations": False, "Tag of objects to refine": []}
    values.update(fields)
    return {"workerInterface": values, "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 0, "tags": ["refined"]}


def compute(api_url: str, dataset_id: str, params: dict[str, Any], capsys, token: str = TOKEN,
            ) -> tuple[int, list[dict[str, Any]]]:
    code = cli.main(["--apiUrl", api_url, "--token", token, "--request", "compute",
                     "--parameters", json.dumps(params), "--datasetId", dataset_id])
    out = capsys.readouterr().out
    assert TOKEN not in out
    return code, [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def well_formed(line: dict[str, Any]) -> None:
    """What every error (and warning) line must be: two parts, each ending in one full stop, no
    library text, no doubled punctuation."""
    head, info = line.get("error", line.get("warning")), line["info"]
    assert head and info, line
    assert head.endswith((".", "?", "!")) or re.fullmatch(r"Invalid setting: [\w .]+", head), head
    assert info.endswith((".", "?", "!")), info
    for text in (head, info):
        assert ".." not in text.replace("...", ""), text
        assert ". ." not in text and "; ." not in text, text
        assert not any(word in text for word in LIBRARY_WORDS), text


@pytest.fixture
def env(ckpt, monkeypatch):
    monkeypatch.setenv("SAM2_CHECKPOINT_DIR", str(ckpt))
    monkeypatch.setenv("SAM2_REFINE_HTTP_RETRIES", "0")
    monkeypatch.setattr(cli, "_load_sam2", lambda path: (KnownMaskPredictor(), False))


def dataset(server, n_xy: int = 2) -> str:
    pixels = np.zeros((n_xy, 1, 1, 1, 64, 64), np.uint16)
    pixels[..., 20:40, 20:40] = 40000
    return server.add_dataset(pixels, layers=None).dataset_id


def square(tags=("cell",), xy=0) -> dict[str, Any]:
    return {"shape": "polygon", "tags": list(tags), "channel": 0, "location": {"XY": xy, "Z": 0, "Time": 0},
            "coordinates": [{"x": 18, "y": 18}, {"x": 42, "y": 18}, {"x": 42, "y": 42}, {"x": 18, "y": 42}]}


# -- one test per message kind --------------------------------------------------------------------


def test_server_unreachable(env, capsys):
    with NimbusTestServer(token=TOKEN) as server:
        api_url = server.api_url
    code, lines = compute(api_url, "0" * 24, request(), capsys)  # the server is gone: connection refused
    error, = [line for line in lines if "error" in line]
    assert code == 1
    assert error["error"] == "Could not reach the NimbusImage server."
    host = api_url.split("//")[1].split("/")[0]
    assert error["info"].startswith(f"While reading the dataset, no answer from {host}: the connection was refused")
    assert "Nothing was changed." in error["info"] and "Check that the server is running" in error["info"]
    assert error["info"].endswith(f"Request: GET folder/{'0' * 24}.")
    well_formed(error)


def test_token_refused(server, env, capsys):
    code, lines = compute(server.api_url, dataset(server), request(), capsys, token="not-the-token")
    error, = [line for line in lines if "error" in line]
    assert code == 1
    assert error["error"] == "The NimbusImage server did not accept the job's login."
    assert error["info"].startswith("While reading the dataset, the server answered: You must be logged in. "
                                    "Nothing was changed. The login may have expired")
    well_formed(error)  # not "You must be logged in.. Nothing was changed."


def test_dataset_not_found(server, env, capsys):
    code, lines = compute(server.api_url, "0123456789abcdef01234567", request(), capsys)
    error, = [line for line in lines if "error" in line]
    assert code == 1
    assert error["error"] == "The dataset was not found on the NimbusImage server."
    assert "The server has no dataset with id 0123456789abcdef01234567" in error["info"]
    assert "run the tool from there" in error["info"] and "Nothing was changed." in error["info"]
    well_formed(error)


def test_server_failure_while_reading_annotations(server, env, capsys):
    ds = dataset(server)
    server.fail("GET", "upenn_annotation", status=500)
    code, lines = compute(server.api_url, ds, request(), capsys)
    error, = [line for line in lines if "error" in line]
    assert code == 1
    assert error["error"] == "The NimbusImage server failed while reading the annotations."
    assert error["info"] == ("It answered: injected failure 500. Nothing was changed. This is usually temporary: run "
                             "the job again in a few minutes. Request: GET upenn_annotation (HTTP 500).")
    well_formed(error)


@pytest.mark.parametrize("value", ["true", "false"])
def test_checkbox_sent_as_text(server, env, capsys, value):
    """NimbusImage's form sends a tick box as true or false and its own checks refuse text
    (src/utils/workerInterface.ts): text is refused here too, with what to do."""
    code, lines = compute(server.api_url, dataset(server), request(**{"Delete original annotations": value}), capsys)
    error, = [line for line in lines if "error" in line]
    assert code == 2 and server.requests == []
    assert error["error"] == "Invalid setting: Delete original annotations"
    assert error["info"].startswith(f'It came as the text "{value}" instead of a tick box value (true or false, '
                                    "without quotes)")
    assert "Nothing was changed. Tick or untick the box in the tool's settings and save the tool" in error["info"]
    assert f"got '{value}'" not in error["info"]
    well_formed(error)


@pytest.mark.parametrize("field,value,words", [
    ("Padding", "wide", 'Expected a number from -20 to 20, got the text "wide".'),
    ("Tag of objects to refine", 5, "Expected a list of tag strings, got the number 5."),
    ("Refine point annotations", [True], "Expected a tick box value (true or false), got a list of 1 item."),
])
def test_field_of_the_wrong_type(server, env, capsys, field, value, words):
    code, lines = compute(server.api_url, dataset(server), request(**{field: value}), capsys)
    error, = [line for line in lines if "error" in line]
    assert code == 2 and error["error"] == f"Invalid setting: {field}"
    assert error["info"] == f'{words} Nothing was changed. Correct "{field}" in the tool\'s settings, then run the ' \
                            "tool again."
    well_formed(error)


def test_value_nimbusimage_fills_in(server, env, capsys):
    code, lines = compute(server.api_url, dataset(server), {**request(), "channel": "1"}, capsys)
    error, = [line for line in lines if "error" in line]
    assert code == 2 and error["error"] == "Invalid setting: channel"
    assert 'Expected a whole number, got the text "1". Nothing was changed. NimbusImage fills this value in' in \
        error["info"]
    well_formed(error)


def test_batch_past_the_dataset_end(server, env, capsys):
    ds = dataset(server, n_xy=2)
    code, lines = compute(server.api_url, ds, request(**{"Batch XY": "2-3"}), capsys)
    error, = [line for line in lines if "error" in line]
    assert code == 2
    assert error["error"] == "Invalid setting: Batch XY"  # what happened; the detail in info, as everywhere
    assert error["info"] == ('"2-3" asks for position 3, but the dataset has 2 positions on this axis (1-2). '
                             'Nothing was changed. Correct "Batch XY" in the tool\'s settings, then run the tool '
                             "again.")
    assert server.requests_to("GET", "upenn_annotation") == []
    well_formed(error)


def test_batch_words(server, env, capsys):
    code, lines = compute(server.api_url, dataset(server), request(**{"Batch XY": "first two"}), capsys)
    error, = [line for line in lines if "error" in line]
    assert code == 2 and error["error"] == "Invalid setting: Batch XY"
    assert error["info"].startswith('"first two" is not a position or a range; use comma-separated 1-based')
    assert error["info"].count('"first two"') == 1
    well_formed(error)


def test_tag_filter_that_matches_nothing_names_the_tags_there(server, env, capsys):
    ds = dataset(server, n_xy=2)
    server.add_annotations(ds, [square(("cell",)), square(("cell", "dapi")), square(("cell",)), square(()),
                                square(("nucleus",), xy=1)])  # the last: outside the batch
    code, lines = compute(server.api_url, ds, request(**{"Tag of objects to refine": ["nucleus"]}), capsys)
    warning, = [line for line in lines if "warning" in line]
    assert code == 0 and [line for line in lines if "error" in line] == []
    assert warning["title"] == "Nothing to refine"
    assert warning["warning"] == 'No annotation in the chosen batch carries the tag "nucleus".'
    assert warning["info"] == ('In the batch (XY 1, Z 1, Time 1), the polygon annotations there carry these tags '
                               '(how many carry each): "cell" (3), "dapi" (1). 1 have no tag. Choose one of these in '
                               '"Tag of objects to refine", or leave it empty to refine every polygon annotation of '
                               "the batch. Nothing was changed.")
    assert lines[-1]["progress"] == 1.0
    assert [r for r in server.requests if r.method != "GET"] == []
    well_formed(warning)


def test_batch_without_annotations_says_where_they_are(server, env, capsys):
    ds = dataset(server, n_xy=2)
    server.add_annotations(ds, [square(xy=1), square(xy=1)])
    code, lines = compute(server.api_url, ds, request(), capsys)
    warning, = [line for line in lines if "warning" in line]
    assert code == 0 and warning["warning"] == "The chosen batch holds no polygon annotations."
    assert warning["info"].startswith("Batch: XY 1, Z 1, Time 1; 2 annotation(s) of the dataset lie at other "
                                      'positions. Choose the positions in "Batch XY"')
    well_formed(warning)


def test_every_error_line_of_the_fault_kinds_is_well_formed(server, env, capsys):
    """A location whose image fails, the deletion failure, the upload failure: their lines too."""
    ds = dataset(server, n_xy=2)
    server.add_annotations(ds, [square(), square(xy=1)])
    server.fail("GET", r"item/\w+/tiles/region", status=502, calls=[1])
    code, lines = compute(server.api_url, ds, request(**{"Batch XY": "all"}), capsys)
    error, = [line for line in lines if "error" in line]
    assert code == 1 and error["error"] == "1 location(s) could not be processed; their annotations were kept."
    assert re.fullmatch(r"XY [12], Z 1, Time 1: its image could not be read: the server answered HTTP 502: "
                        r"injected failure 502 \(request GET item/\w+/tiles/region\)\. Running the job again "
                        r"processes them; what was refined is not made again\.", error["info"]), error
    well_formed(error)

    server.clear_faults()
    server.fail("DELETE", "upenn_annotation/multiple", status=500)
    code, lines = compute(server.api_url, ds, request(**{"Batch XY": "all", "Delete original annotations": True}),
                          capsys)
    error, = [line for line in lines if "error" in line]
    assert code == 1 and error["error"] == "Deleting the replaced originals failed part way."
    assert error["info"].startswith("The server answered HTTP 500: injected failure 500. 0 original(s) deleted; ")
    well_formed(error)

    server.clear_faults()
    server.add_annotations(ds, [square()])
    server.fail("POST", "upenn_annotation/multiple", status=500)
    code, lines = compute(server.api_url, ds, request(**{"Batch XY": "all"}), capsys)
    error, = [line for line in lines if "error" in line]
    assert error["error"] == "Uploading the refined annotations failed; no original annotation was deleted."
    assert error["info"].startswith("The server answered HTTP 500: injected failure 500. Created 0 of 1")
    well_formed(error)


# -- the helpers --------------------------------------------------------------------------------------


def test_sentences_end_in_one_full_stop_and_start_with_a_capital():
    assert sentence("You must be logged in.") == "You must be logged in."
    assert sentence("you must be logged in..") == "You must be logged in."
    assert sentence("wait...") == "Wait..."
    assert sentence("  ") == ""
    assert sentences("You must be logged in.", None, "", "nothing was changed") == (
        "You must be logged in. Nothing was changed.")


@pytest.mark.parametrize("value,words", [
    (None, "no value (null)"), (True, "the value true"), (21, "the number 21"), (0.5, "the number 0.5"),
    ("wide", 'the text "wide"'), ("", "an empty text"), ([1, 2], "a list of 2 items"),
    ({"a": 1}, "a group of named values (a JSON object)"), ("x" * 50, f'the text "{"x" * 37}..."'),
])
def test_values_are_described_in_words(value, words):
    assert describe_value(value) == words


def test_network_causes_in_words():
    def failure(exc: BaseException) -> NimbusAPIError:
        return NimbusAPIError("GET", "folder/x", None, f"{type(exc).__name__}: {exc}", exc)

    refused = requests.ConnectionError("HTTPConnectionPool(...): Max retries exceeded")
    refused.__context__ = ConnectionRefusedError(111, "Connection refused")
    assert cause_text(failure(refused), "http://h:8080/api/v1") == (
        "no answer from h:8080: the connection was refused (nothing listens at that address)")
    unknown = requests.ConnectionError(socket.gaierror(-2, "Name or service not known"))
    assert cause_text(failure(unknown)).endswith("the server's name could not be found")
    timeout = requests.ReadTimeout("Read timed out. (read timeout=1)")
    line = server_failure(failure(timeout), "reading the annotations")
    assert line.error == "The NimbusImage server did not answer in time."
    assert line.info.startswith("While reading the annotations, no answer from the NimbusImage server: it did not "
                                "answer in time")
    assert "Read timed out" not in line.info and "HTTPConnectionPool" not in line.info


def test_a_server_message_is_quoted_without_its_own_full_stop():
    exc = NimbusAPIError("POST", "upenn_annotation/multiple", 403, "Write access was denied for the item.")
    line = server_failure(exc, "uploading", changed="Nothing was deleted")
    assert line.error == "The NimbusImage server refused access."
    assert line.info.startswith("While uploading, the server answered: Write access was denied for the item. Nothing "
                                "was deleted. Your account may be allowed to see this dataset but not to change it")
    assert line.info.endswith("Request: POST upenn_annotation/multiple (HTTP 403).")
