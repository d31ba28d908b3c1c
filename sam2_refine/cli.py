"""The NimbusImage command line: ``--apiUrl --token --request {interface,compute} --parameters JSON
[--datasetId]``, exactly as the server passes it (docs/nimbus-contract.md §1).

``main`` returns the process exit status and never raises: 0 on success, non-zero on any
failure, with an error line on stdout saying what happened. The token is never printed: the
reporter scrubs it from every line, and logging goes to stderr without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from sam2_refine.fields import FORM_FIELDS
from sam2_refine.interface import build_interface, checkpoint_dir
from sam2_refine.job.interrupt import EXIT_INTERRUPTED, JobInterrupted, stop_on_sigterm
from sam2_refine.job.settings import SettingsErrors, parse_settings
from sam2_refine.messages import sentences, server_failure, settings_failure
from sam2_refine.model.checkpoints import ModelCatalogue, scan_models
# the loader handed to the job (tests swap in stand-ins as cli._load_sam2)
from sam2_refine.model.loading import load_sam2 as _load_sam2
from sam2_refine.nimbus.client import NimbusClient
from sam2_refine.nimbus.errors import NimbusAPIError
from sam2_refine.nimbus.progress import Reporter
from sam2_refine.nimbus.retry import RetryPolicy, Timeouts
from sam2_refine.worker_info import DEFAULT_IMAGE_NAME

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: What to do about a command line the NimbusImage server built.
_FROM_THE_SERVER = ("The NimbusImage server starts the worker with this command line: an administrator should "
                    "check how the worker is run")
#: Seconds to wait for each read of a server response (default 300).
TIMEOUT_ENV = "SAM2_REFINE_HTTP_TIMEOUT"
#: Retries of a transient failure (default 5).
RETRIES_ENV = "SAM2_REFINE_HTTP_RETRIES"


#: ``entrypoint.py --help``: what an operator needs; NimbusImage itself never asks for it.
USAGE = """\
usage: entrypoint.py --apiUrl URL --token TOKEN --request {interface,compute}
                     --parameters JSON [--datasetId ID]
       entrypoint.py --help

SAM2 Refine: a NimbusImage worker that refines rough annotations (polygons, points,
rectangles) into polygons that follow the object's boundary, with Meta's SAM2.
NimbusImage starts it with the arguments below (docs/nimbus-contract.md section 1).

arguments:
  --apiUrl URL        the Girder API root, e.g. http://localhost:8080/api/v1
  --token TOKEN       a Girder token of the user who started the job (never printed)
  --request interface post the tool's form (its fields and model list) to NimbusImage
  --request compute   refine the annotations the form's settings select
  --parameters JSON   the job's settings as NimbusImage sends them ({} for interface)
  --datasetId ID      the dataset (folder id) of a compute job

output: one JSON object per line on stdout (progress, warnings, errors; NimbusImage shows
them); logging goes to stderr. Neither ever holds the token.

exit status:
  0    done (some annotations may have been kept unchanged: the job's warnings say which)
  1    the job failed (server, image, model or upload trouble); originals are left in place
  2    invalid command line or settings (a field's value); nothing was changed
  143  stopped by SIGTERM (docker stop, a cancel); nothing was deleted that was not
       replaced, and running the same job again finishes it without duplicates

environment (all optional):
  SAM2_CHECKPOINT_DIR               folder of SAM2 checkpoints offered in the Model list
                                    (default: /code/sam2/checkpoints in the image)
  SAM2_REFINE_CPU_PRECISION         auto | bf16 | fp32: the CPU image encoder's precision
                                    (auto: bfloat16 where the CPU has bfloat16 units)
  SAM2_REFINE_HTTP_TIMEOUT          seconds to wait for each server response (default 300)
  SAM2_REFINE_HTTP_RETRIES          retries of a transient server failure (default 5)
  SAM2_REFINE_PREFETCH_BYTES        frames fetched ahead, e.g. 2G (default 1G; 0: one location)
  SAM2_REFINE_PREFETCH_CONNECTIONS  locations fetched at once, 1 to 16 (default 4)
  SAM2_REFINE_OUTLINE_WORKERS       outline worker processes: auto or 0 to 64 (default auto:
                                    none on the CPU)
  SAM2_REFINE_SUMMARY               a file to write the job's JSON summary to

docs: README.md and docs/ in the source repository.
"""


def http_policies() -> tuple[RetryPolicy, Timeouts]:
    """Retry and timeout policies, from the environment where set (bad values: the defaults).

    A read timeout also caps the wait between retries (and any ``Retry-After``), so that a job
    with a short timeout also gives up soon.
    """
    retry, timeouts = RetryPolicy(), Timeouts()
    try:
        if os.environ.get(RETRIES_ENV):
            retry = RetryPolicy(total=max(0, int(os.environ[RETRIES_ENV])))
        if os.environ.get(TIMEOUT_ENV):
            read = float(os.environ[TIMEOUT_ENV])
            if read > 0:
                timeouts = Timeouts(connect=min(timeouts.connect, read), read=read)
                retry = RetryPolicy(total=retry.total, backoff_factor=retry.backoff_factor,
                                    backoff_max=min(retry.backoff_max, read))
    except ValueError:
        logging.getLogger(__name__).warning("ignoring a malformed %s or %s", TIMEOUT_ENV, RETRIES_ENV)
    return retry, timeouts


def _client(api_url: str, token: str) -> NimbusClient:
    retry, timeouts = http_policies()
    return NimbusClient(api_url, token, retry=retry, timeouts=timeouts)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage (which could echo the token) and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="entrypoint.py", description="SAM2 Refiner NimbusImage worker",
                             add_help=False, allow_abbrev=False)
    parser.add_argument("--apiUrl", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--request", required=True, choices=["interface", "compute"])
    parser.add_argument("--parameters", required=True)
    parser.add_argument("--datasetId", default=None)
    return parser


def run_interface(api_url: str, token: str, params: dict, reporter: Reporter) -> int:
    """Post the UI description; no model, no dataset, no torch."""
    image = params.get("image") if isinstance(params, dict) else None
    if not isinstance(image, str) or not image:
        image = DEFAULT_IMAGE_NAME
    models = scan_models(checkpoint_dir())
    warn_about_checkpoints(models, reporter)
    with _client(api_url, token) as client:
        try:
            client.post_interface(image, build_interface(models))
        except NimbusAPIError as exc:
            line = server_failure(exc, "publishing the tool's form", api_url=api_url,
                                  changed="The tool's form was not updated")
            reporter.error(line.error, line.info)
            return EXIT_FAILED
    return EXIT_OK


def warn_about_checkpoints(models: ModelCatalogue, reporter: Reporter) -> None:
    """One warning naming every file of the checkpoint directory that is not offered, with its
    reason; another when no usable checkpoint is left."""
    if models.unusable:
        reporter.warning(f"{len(models.unusable)} file(s) in the checkpoint directory cannot be used and are not "
                         "offered in the Model list.", models.unusable_text(), title="Unusable checkpoints")
    if not models.models:
        reporter.warning("No SAM2 checkpoint found in the worker image.", str(models.directory))


def run_compute(api_url: str, token: str, params: dict, dataset_id: str | None, reporter: Reporter) -> int:
    from sam2_refine.job import compute as job  # the engine; torch is imported only when the model loads

    try:
        settings = parse_settings(params, dataset_id, checkpoint_dir())
    except SettingsErrors as exc:
        for error in exc.errors:
            line = settings_failure(error.field, error.message, error.advice, error.field in FORM_FIELDS)
            reporter.error(line.error, line.info)
        return EXIT_USAGE
    with _client(api_url, token) as client:
        return job.run_compute(settings, client, reporter, _load_sam2)


def token_candidates(argv: Sequence[str]) -> tuple[str, ...]:
    """Every value that could be the token, whatever form the command line gives it in
    (``--token T``, ``--token=T``, an abbreviation such as ``--tok T``), before parsing: so that
    no message, not even a usage error, can carry it."""
    found = []
    for index, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if len(name) >= 3 and "--token".startswith(name):
            if eq:
                found.append(value)
            elif index + 1 < len(argv):
                found.append(argv[index + 1])
    return tuple(v for v in found if v)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and all(arg in ("--help", "-h") for arg in argv):
        sys.stdout.write(USAGE)
        return EXIT_OK
    reporter = Reporter(secrets=token_candidates(argv))
    with stop_on_sigterm():
        try:
            return _main(argv, reporter)
        except JobInterrupted as exc:  # before or outside a compute job (which reports its own)
            reporter.error(f"The worker was stopped ({exc.signal_name}) before it changed anything.",
                           "Nothing was changed. Run the tool again when you are ready.")
            return EXIT_INTERRUPTED


def _main(argv: list[str], reporter: Reporter) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
    except ValueError as exc:
        reporter.error("Invalid command line.",
                       sentences(str(exc), "Nothing was changed", _FROM_THE_SERVER))
        return EXIT_USAGE
    reporter.secrets = tuple(dict.fromkeys((*reporter.secrets, args.token)))
    try:
        params = json.loads(args.parameters)
    except ValueError as exc:
        reporter.error("Invalid --parameters: not JSON.",
                       sentences(f"The tool's settings could not be read ({exc})", "Nothing was changed",
                                 _FROM_THE_SERVER))
        return EXIT_USAGE
    try:
        if args.request == "interface":
            return run_interface(args.apiUrl, args.token, params, reporter)
        return run_compute(args.apiUrl, args.token, params, args.datasetId, reporter)
    except Exception as exc:  # noqa: BLE001 - last resort: report, never a traceback with secrets
        reporter.error("The worker failed unexpectedly.",
                       sentences("If it happens again, report it with the technical detail",
                                 f"Technical detail: {type(exc).__name__}: {exc}"))
        logging.getLogger(__name__).debug("unexpected failure", exc_info=True)
        return EXIT_FAILED
