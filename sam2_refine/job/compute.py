"""One compute job, start to finish: the stages of the worker wired together.

settings (already parsed) -> dataset layout and batch positions -> layers -> annotations ->
selection -> model -> per location: frames, merged image, refinement -> upload -> convergence
with other jobs and confirmed deletions (:mod:`sam2_refine.job.converge`) -> summary. Progress lines
cover the whole job; every original ends up in the :class:`~sam2_refine.job.replace.Ledger`, refined
or kept with a reason.

Other jobs may refine the same originals at the same time. The refinements on the server are
read again before each location and before each upload chunk, and what another job already
made is not made again (this narrows the window); whatever still overlaps is brought to one
refinement per original by :func:`~sam2_refine.job.converge.converge`, which does not depend on
timing.

Exit status: 0 when the job finished (some originals may be kept, with warnings); 1 when it
failed part way (the messages say what was and was not done); 2 for bad settings (nothing was
read or changed beyond the dataset's layout); 143 when stopped by SIGTERM.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from sam2_refine import fields
from sam2_refine.job.batch_ranges import BatchRangeError, describe_positions
from sam2_refine.job.batch_reads import BatchReader
from sam2_refine.job.converge import ConvergeReport, RefinementWatch, ServerView, ViewBuilder, converge, read_view
from sam2_refine.engine.imaging import Layer, LayerError, LocationImage, parse_layers
from sam2_refine.messages import (
    Explained,
    cause_text,
    counted,
    request_text,
    sentences,
    server_failure,
    settings_failure,
)
from sam2_refine.job.interrupt import EXIT_INTERRUPTED, JobInterrupted
from sam2_refine.job.kept import TagReport, kept_by_position, kept_text, update_tags
from sam2_refine.nimbus.client import MAX_CHUNK, DatasetInfo, DegradedFrameError, NimbusAPIError, NimbusClient
from sam2_refine.engine.outline_pool import OutlinePool, workers_from_env
from sam2_refine.model.predictor import BoxPredictor
from sam2_refine.job.prefetch import FramePrefetcher, PrefetchPolicy, location_bytes
from sam2_refine.engine.location import STEP_DECODE, STEP_EMBED, refine_location
from sam2_refine.engine.options import GeometryOptions
from sam2_refine.annotations import Kept
from sam2_refine.job.replace import Ledger, pending_upload, upload
from sam2_refine.nimbus.progress import Heartbeat, ProgressSpan, Reporter
from sam2_refine.annotations import Original
from sam2_refine.job.selection import Selection, select
from sam2_refine.annotations import Location
from sam2_refine.job.settings import RefineSettings

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_BAD_SETTINGS = 0, 1, 2
#: Environment variable naming a file for the job's JSON summary (demo, tests, benchmarks).
SUMMARY_ENV = "SAM2_REFINE_SUMMARY"
#: How many ids a warning lists before it says "and N more".
LISTED_IDS = 50
#: Refined annotations are uploaded during the job once this many are waiting...
UPLOAD_CHUNK = 1000
#: ... or once the oldest waiting one has waited this many seconds (so that another job
#: started meanwhile on the same batch finds them and does not refine them again).
UPLOAD_AFTER_S = 10.0

#: Loads the model from a checkpoint path: (predictor, untrained?). It may also take a keyword
#: ``on_step`` (a callable taking the step's text), told each step of the loading as it starts.
PredictorLoader = Callable[..., "tuple[BoxPredictor, bool]"]


class JobFailed(Exception):
    """A failure that ends the job; the message is for the user."""

    def __init__(self, message: str, info: str = "", exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.info = info
        self.exit_code = exit_code


@dataclass(frozen=True)
class Batch:
    """The positions the job processes on each axis (0-based)."""

    xy: tuple[int, ...]
    z: tuple[int, ...]
    time: tuple[int, ...]
    #: How many positions the dataset has on each axis (XY, Z, Time).
    sizes: tuple[int, int, int] = (1, 1, 1)

    def holds(self, location: Location) -> bool:
        """Whether ``location`` is one of the batch's positions."""
        return location.xy in self.xy and location.z in self.z and location.time in self.time


def _failed(line: Explained, exit_code: int = EXIT_FAILED) -> JobFailed:
    return JobFailed(line.error, line.info, exit_code)


def _dataset_failure(exc: NimbusAPIError, client: NimbusClient, settings: RefineSettings) -> Explained:
    """Why the dataset could not be read, in words."""
    if exc.status is None and exc.transport is None and "holds no large image" in exc.detail:
        return Explained("The dataset holds no image.",
                         sentences(f"Dataset {settings.dataset_id} has no large image item, so there is nothing to "
                                   "look at", "Nothing was changed",
                                   "Open the dataset in NimbusImage to check that its image was imported, then run "
                                   "the tool again"))
    return server_failure(exc, "reading the dataset", api_url=client.api_url, dataset_id=settings.dataset_id)


def resolve_batch(settings: RefineSettings, info: DatasetInfo) -> Batch:
    """Check the batch fields against the dataset's size.

    Raises:
        JobFailed: a position beyond the dataset (exit 2; the message states the size).
    """
    try:
        return Batch(
            settings.batch_xy.resolve(fields.BATCH_XY, info.num_xy, settings.tile.xy),
            settings.batch_z.resolve(fields.BATCH_Z, info.num_z, settings.tile.z),
            settings.batch_time.resolve(fields.BATCH_TIME, info.num_time, settings.tile.time),
            (info.num_xy, info.num_z, info.num_time),
        )
    except BatchRangeError as exc:
        line = settings_failure(exc.field, exc.message)
        raise JobFailed(line.error, line.info, EXIT_BAD_SETTINGS) from None


def fetch_annotations(reader: BatchReader, settings: RefineSettings) -> Iterator[dict[str, Any]]:
    """Every polygon at the batch's locations, and every point and rectangle there when the job
    refines those (``settings.shapes``).

    Polygons are read without a tag filter, which is applied later: the reading holds both the
    candidates (any of the refine tags) and every refinement made by an earlier run, whatever
    output tags that run used (see :mod:`sam2_refine.job.markers`; refinements are polygons, and only
    count at their original's location, so all of them are at the batch's locations). Filtering
    by tags on the server would miss refinements tagged differently and refine their originals
    twice. The server's schema has no ``blob`` shape (the app's blob tool makes polygons), so
    none is asked for.
    """
    yield from reader.annotations(tuple(s for s in ("polygon", *settings.shapes) if s != "blob"))


def geometry_options(settings: RefineSettings) -> GeometryOptions:
    """How the engine refines, from the job's settings."""
    return GeometryOptions(smoothing=settings.smoothing, padding=settings.padding,
                           resolution=settings.resolution, prompt=settings.prompt,
                           min_overlap=settings.min_overlap, separate=settings.separate,
                           group_tags=settings.refine_tags)


def find_refinements(reader: BatchReader) -> dict[str, str]:
    """original id -> id of its surviving refinement on the server, for the batch's originals
    (see markers, refinements)."""
    return read_view(reader, ()).index.survivors()


def original_shapes(selection: Selection) -> tuple[str, ...]:
    """The shapes of the selected originals (to read whether they still exist)."""
    shapes = {o.doc.get("shape") for originals in selection.by_location.values() for o in originals}
    return tuple(sorted(s for s in shapes if isinstance(s, str) and s))


def load_location_image(client: NimbusClient, info: DatasetInfo, layers: list[Layer],
                        location: Location) -> LocationImage:
    """Fetch each needed channel's frame once, exactly (checked against the tile metadata);
    merged lazily, window by window.

    Raises:
        DegradedFrameError: a frame arrived unlike the metadata (its dtype or size).
        NimbusAPIError: a frame could not be fetched.
    """
    planes = {}
    for channel in sorted({layer.channel for layer in layers}):
        try:
            frame = info.frame_number(channel, location.xy, location.z, location.time)
        except KeyError as exc:
            raise NimbusAPIError("GET", f"item/{info.item_id}/tiles", None, str(exc)) from None
        planes[channel] = client.get_frame(info.item_id, frame, expected=info.frame_spec())
    return LocationImage(planes, layers)


def _ids_text(ids: list[str]) -> str:
    shown = ", ".join(ids[:LISTED_IDS])
    return shown + (f" and {len(ids) - LISTED_IDS} more" if len(ids) > LISTED_IDS else "")


def run_compute(
    settings: RefineSettings,
    client: NimbusClient,
    reporter: Reporter,
    load_predictor: PredictorLoader,
    outline_pool: OutlinePool | None = None,
) -> int:
    """Run one compute job; returns the exit status (see the module docstring).

    ``outline_pool``: where the engine's outline work runs (kept open: the caller's); default:
    a pool of :func:`~sam2_refine.engine.outline_pool.workers_from_env` worker processes for the
    model's device, started once the model is loaded and stopped with the job."""
    ledger = Ledger()
    try:
        with Heartbeat(reporter):  # a progress line at least every 2 s, also in a long step
            return _run(settings, client, reporter, load_predictor, ledger, outline_pool)
    except JobFailed as exc:
        reporter.error(str(exc), exc.info)
        return exc.exit_code
    except JobInterrupted as exc:
        untouched = not ledger.deleted and not ledger.delete_unknown
        reporter.error(f"The job was stopped ({exc.signal_name})" +
                       ("; no original annotation was deleted." if untouched else "."),
                       sentences(f"{ledger.created_here()} refined annotation(s) had been created; "
                                 f"{ledger.deletion_text()}", "Running the job again refines only what is missing and "
                                 "does not duplicate what was made"))
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - report what was done before any unexpected failure
        log.debug("unexpected failure", exc_info=True)
        untouched = not ledger.deleted and not ledger.delete_unknown
        reporter.error("The job failed unexpectedly; no original annotation was deleted."
                       if untouched else "The job failed unexpectedly.",
                       sentences(f"{ledger.created_here()} refined annotation(s) had been created; "
                                 f"{ledger.deletion_text()} before the failure",
                                 "Running the job again refines only what is missing; if the failure comes back, "
                                 "report it with the technical detail",
                                 f"Technical detail: {type(exc).__name__}: {exc}"))
        return EXIT_FAILED
    finally:
        _write_summary(ledger)


def _run(settings: RefineSettings, client: NimbusClient, reporter: Reporter,
         load_predictor: PredictorLoader, ledger: Ledger, outline_pool: OutlinePool | None) -> int:
    started = time.monotonic()
    reporter.progress(0.0, "Reading dataset", "Frame layout and layer settings", until=0.02)
    try:
        info = client.get_dataset_info(settings.dataset_id)
    except NimbusAPIError as exc:
        raise _failed(_dataset_failure(exc, client, settings)) from None
    batch = resolve_batch(settings, info)
    reader = BatchReader(client, settings.dataset_id, (batch.xy, batch.z, batch.time),
                         (info.num_xy, info.num_z, info.num_time))
    try:
        view = client.get_layers(settings.dataset_id, settings.tool_id)
        layers = parse_layers(view.layers, info.num_channels, view.layer_contrasts)
    except NimbusAPIError as exc:
        raise _failed(server_failure(exc, "reading the dataset's layer settings", api_url=client.api_url)) from None
    except LayerError as exc:
        raise JobFailed("The dataset's layer settings cannot be used.",
                        sentences(str(exc), "Nothing was changed",
                                  "Correct the layers in the dataset's view (each visible layer needs one of the "
                                  "dataset's channels, a colour and a contrast), then run the tool again")) from None

    reporter.progress(0.02, "Fetching annotations", _listed_text(settings), until=MODEL_STEPS[0])
    seen = ViewBuilder()  # the same reading, as convergence reads the batch
    try:
        selection = select(seen.watching(fetch_annotations(reader, settings)), settings.refine_tags,
                           batch.xy, batch.z, batch.time)
    except NimbusAPIError as exc:
        raise _failed(server_failure(exc, "reading the annotations", api_url=client.api_url)) from None
    if selection.duplicates:
        reporter.warning(f"The server listed {len(selection.duplicates)} annotation(s) more than once; "
                         "each is refined once.", _ids_text(list(selection.duplicates)))
    if selection.without_id:
        reporter.warning(f"{selection.without_id} annotation(s) without an id were skipped.")
    if client.pages_by_offset:
        reporter.warning("This server ignores the afterId cursor, so annotations are listed page by page by "
                         "offset: while another job changes this dataset, a listing can miss annotations, and "
                         "jobs running at the same time on overlapping batches may not end with one refinement "
                         "per original. Do not run overlapping jobs on this dataset at once.",
                         title="Server pages by offset")
    shapes = original_shapes(selection)
    if settings.kept_tag:
        ledger.kept_tag_before = {o.id for originals in selection.by_location.values() for o in originals
                                  if settings.kept_tag in o.tags}
    selection = _take_earlier_refinements(selection, ledger, reporter)
    if selection.count == 0:
        if not ledger.previous and not _needs_converge(selection, batch):
            _nothing_to_refine(settings, batch, selection, reporter, _elsewhere(client, settings, seen.count))
            return EXIT_OK
        # Nothing was made since the selection's reading: convergence starts from it.
        return _finish(settings, client, reader, reporter, ledger, [], started, batch, shapes, seen.view())

    watch = RefinementWatch(reader, settings.output_tags)
    uploader = _Uploader(client, ledger, settings, watch)
    with FramePrefetcher(client, _locations_to_fetch(selection),
                         lambda c, location: load_location_image(c, info, layers, location),
                         location_bytes(info, layers), PrefetchPolicy.from_env()) as frames:
        frames.start()  # the first locations' frames arrive while the model loads
        predictor = _load_model(settings, reporter, load_predictor, selection)
        with _outline_work(predictor, outline_pool, reporter) as pool:
            failed_locations = _refine_all(settings, reporter, predictor, selection, ledger, uploader, frames,
                                           watch, pool)

    reporter.progress(0.85, "Uploading", f"Creating {uploader.pending()} refined annotation(s)", until=0.9)
    uploader.flush()
    if uploader.error is not None:
        unconfirmed = len(ledger.not_created)
        found = _reconcile(reader, ledger)
        _warn_kept(reporter, ledger, batch.sizes, None, settings.kept_tag)
        reporter.error(
            "Uploading the refined annotations failed; no original annotation was deleted.",
            sentences(cause_text(uploader.error, client.api_url),
                      f"Created {ledger.created_here()} of {len(ledger.refined)}"
                      + (f" ({found} of the {unconfirmed} unconfirmed ones were found on the server after all)"
                         if found else "")
                      + f"; {len(ledger.not_created)} were not created",
                      "Every original annotation is still in place; running the job again refines only what is "
                      "missing", request_text(uploader.error)))
        return EXIT_FAILED
    return _finish(settings, client, reader, reporter, ledger, failed_locations, started, batch, shapes)


def _needs_converge(selection: Selection, batch: Batch) -> bool:
    """Whether the batch holds refinements (to bring to one per original, and whose connections
    a stopped job may have left twice) or marks to report, although no original is left to
    refine."""
    index = selection.index
    return (any(r.location is not None and batch.holds(r.location) for g in index.groups.values() for r in g)
            or any(u.location is not None and batch.holds(u.location) for u in index.unreadable))


def _kinds_text(settings: RefineSettings, last: str) -> str:
    """``polygon``, ``polygon or rectangle``, ``polygon, rectangle and point``: the shapes refined."""
    kinds = ["polygon"] + (["rectangle"] if settings.refine_rectangles else []) + (
        ["point"] if settings.refine_points else [])
    return kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + f" {last} " + kinds[-1]


def _batch_text(batch: Batch) -> str:
    return (f"XY {describe_positions(batch.xy)}, Z {describe_positions(batch.z)}, "
            f"Time {describe_positions(batch.time)}")


def _elsewhere(client: NimbusClient, settings: RefineSettings, in_batch: int) -> int | None:
    """How many of the dataset's annotations lie outside the batch (the batch's reading saw
    ``in_batch``); None when the server cannot count them."""
    try:
        return max(0, client.count_annotations(settings.dataset_id) - in_batch)
    except NimbusAPIError as exc:
        log.info("could not count the dataset's annotations: %s", exc)
        return None


def _nothing_to_refine(settings: RefineSettings, batch: Batch, selection: Selection, reporter: Reporter,
                       outside: int | None) -> None:
    """The job found nothing to refine: a warning saying why in the user's terms (the tags the
    batch does hold, with how many annotations carry each; or that the batch holds none), then
    the last progress line."""
    where = _batch_text(batch)
    kinds = _kinds_text(settings, "or")
    if settings.refine_tags and (selection.batch_tags or selection.batch_untagged):
        tags = settings.refine_tags
        wanted = f'the tag "{tags[0]}"' if len(tags) == 1 else "any of the tags " + ", ".join(f'"{t}"' for t in tags)
        present = (f"the {kinds} annotations there carry these tags (how many carry each): "
                   f"{counted(selection.batch_tags.items())}" if selection.batch_tags
                   else f"the {kinds} annotations there carry no tag at all")
        untagged = (f"{selection.batch_untagged} have no tag" if selection.batch_tags and selection.batch_untagged
                    else None)
        reporter.warning(f"No annotation in the chosen batch carries {wanted}.",
                         sentences(f"In the batch ({where}), {present}", untagged,
                                   'Choose one of these in "Tag of objects to refine", or leave it empty to refine '
                                   f"every {kinds} annotation of the batch", "Nothing was changed"),
                         title="Nothing to refine")
    else:
        elsewhere = (f"{outside} annotation(s) of the dataset lie at other positions" if outside
                     else f"the dataset holds no {kinds} annotations at all" if outside == 0
                     else "the server could not say how many lie at other positions")
        reporter.warning(f"The chosen batch holds no {kinds} annotations.",
                         sentences(f"Batch: {where}; {elsewhere}",
                                   'Choose the positions in "Batch XY", "Batch Z" and "Batch Time" ("all" for every '
                                   "position; empty for the one the tool was started from)", "Nothing was changed"),
                         title="Nothing to refine")
    reporter.progress(1.0, "Complete", "Nothing to refine in the chosen batch")


def _listed_text(settings: RefineSettings) -> str:
    kinds = ["Polygon"] + (["rectangle"] if settings.refine_rectangles else []) + (
        ["point"] if settings.refine_points else [])
    names = kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + " and " + kinds[-1]
    return f"{names} annotations of the dataset"


def _take_earlier_refinements(selection: Selection, ledger: Ledger, reporter: Reporter) -> Selection:
    """Originals already refined (by an earlier run, or by another job running now) are not
    refined again (see markers). A refinement counts only at its original's location."""
    again: dict[str, str] = {}
    for location, originals in selection.by_location.items():
        for original in originals:
            found = selection.index.for_original(original.id, location)
            if found:
                again[original.id] = found[0].id
    if not again:
        return selection
    remaining: dict[Location, list[Original]] = {}
    for location, originals in selection.by_location.items():
        for original in originals:
            if original.id in again:
                ledger.already_refined(original.id, location, again[original.id])
        rest = [o for o in originals if o.id not in again]
        if rest:
            remaining[location] = rest
    reporter.warning(f"{len(again)} annotation(s) had already been refined (by an earlier run or another "
                     "job); their refinements are kept and not made again.", _ids_text(sorted(again)),
                     title="Already refined")
    return dataclasses.replace(selection, by_location=remaining)


def _reconcile(reader: BatchReader, ledger: Ledger) -> int:
    """After a failed upload, look for refinements the server created without confirming them."""
    try:
        on_server = find_refinements(reader)
    except NimbusAPIError as exc:
        log.info("could not re-check the refinements: %s", exc)
        return 0
    found = [o for o in ledger.not_created if o in on_server]
    for original_id in found:
        ledger.created[original_id] = ledger.mine[original_id] = on_server[original_id]
    ledger.not_created = [o for o in ledger.not_created if o not in on_server]
    return len(found)


def _finish(settings: RefineSettings, client: NimbusClient, reader: BatchReader, reporter: Reporter,
            ledger: Ledger, failed_locations: list[str], started: float, batch: Batch, shapes: tuple[str, ...],
            first_view: ServerView | None = None) -> int:
    """Convergence with other jobs, confirmed deletions, warnings, the summary line."""
    deleting = settings.delete_originals
    steps = [0.9, 0.92, 0.94, 0.96, 0.97, 0.98]  # this line, then convergence's steps (the bar moves towards each)
    reporter.progress(steps[0], "Checking refinements", "One refinement per original"
                      + (", then deleting the replaced originals" if deleting else ""), until=steps[1])
    told = [0]

    def converge_step(title: str, info: str) -> None:
        told[0] = min(told[0] + 1, len(steps) - 1)
        following = steps[told[0] + 1] if told[0] + 1 < len(steps) else None
        reporter.progress(steps[told[0]], title, info, until=following)

    result = converge(reader, ledger, delete=deleting, shapes=shapes, first_view=first_view, on_step=converge_step)
    tagging = (_tag_kept(settings, client, reporter, ledger)
               if settings.kept_tag and result.error is None and result.stable else None)
    _warn_kept(reporter, ledger, batch.sizes, tagging, settings.kept_tag)
    _warn_converge(reporter, ledger, result)
    if result.error is not None:
        _report_converge_error(reporter, ledger, result, client.api_url)
        return EXIT_FAILED
    if not result.stable:
        reporter.error("Other jobs kept refining the same annotations while this job checked them.",
                       sentences(ledger.deletion_text(), "Running the job again when they are done finishes the job"))
        return EXIT_FAILED

    if tagging is not None and tagging.error is not None:
        reporter.error(f'Could not tag the kept annotations with "{tagging.tag}".',
                       sentences(cause_text(tagging.error, client.api_url),
                                 f"{tagging.tagged} of the kept annotations carry the tag",
                                 "The refined annotations are in place; running the job again adds the missing tags",
                                 request_text(tagging.error)))
        return EXIT_FAILED
    summary = ledger.summary()
    elapsed = time.monotonic() - started
    if summary["selected"] == 0:
        reporter.progress(1.0, "Complete", "Nothing left to refine in the chosen batch")
        return EXIT_OK
    text = (f"Refined {summary['refined']} of {summary['selected']}, kept {summary['kept']}, "
            f"deleted {summary['deleted']}"
            + (f", {summary['already_refined']} already refined earlier" if summary["already_refined"] else "")
            + (f", {summary['refined_by_another_job']} refined by another job"
               if summary["refined_by_another_job"] else "")
            + f" ({elapsed:.1f} s)")
    if failed_locations:
        more = f"; and {len(failed_locations) - 20} more" if len(failed_locations) > 20 else ""
        reporter.error(f"{len(failed_locations)} location(s) could not be processed; their annotations "
                       "were kept.", sentences("; ".join(failed_locations[:20]) + more,
                                               "Running the job again processes them; what was refined is not made "
                                               "again"))
        reporter.progress(1.0, "Finished with errors", text)
        return EXIT_FAILED
    reporter.progress(1.0, "Complete", text)
    return EXIT_OK


def _report_converge_error(reporter: Reporter, ledger: Ledger, result: ConvergeReport, api_url: str) -> None:
    untouched = not ledger.deleted and not ledger.delete_unknown
    nothing = "; no original annotation was deleted." if untouched else "."
    again = "Running the job again finishes the job without duplicating anything"
    cause, request = cause_text(result.error, api_url), request_text(result.error)
    if result.stage == "delete":
        reporter.error("Deleting the replaced originals failed part way.",
                       sentences(cause, f"{ledger.deletion_text()}; {len(ledger.delete_failed)} remain next to "
                                 "their refined copies", "Running the job again deletes them", request))
    elif result.stage == "links":
        reporter.error("Could not re-create the originals' connections" + nothing,
                       sentences(cause, f"{result.moved} connection(s) were re-created", "The refined annotations "
                                 "are in place", again, request))
    elif result.stage == "duplicates":
        reporter.error("Could not remove the duplicate refinements that jobs running at the same time made"
                       + nothing, sentences(cause, ledger.deletion_text(), again, request))
    else:
        reporter.error("Could not read the refinements back to check them" + nothing,
                       sentences(cause, ledger.deletion_text(), again, request))


def _warn_converge(reporter: Reporter, ledger: Ledger, result: ConvergeReport) -> None:
    """What convergence found: other jobs' refinements, marks not to trust."""
    ledger.concurrent = sorted(result.concurrent)
    ledger.duplicates_removed = {o: list(ids) for o, ids in result.removed.items()}
    if result.concurrent:
        removed = sum(len(v) for v in result.removed.values())
        reporter.warning(f"{len(result.concurrent)} annotation(s) were refined at the same time by another job; "
                         "one refinement each was kept.",
                         (f"{removed} duplicate refinement(s) removed, their connections moved to the one kept. "
                          if removed else "") + _ids_text(sorted(result.concurrent)),
                         title="Refined by another job")
    untrusted: dict[str, list[str]] = {}
    for u in result.unreadable:
        untrusted.setdefault(u.reason, []).append(u.id)
    if result.misplaced:
        untrusted["its sam2Refine mark names an original at another location"] = [r.id for r in result.misplaced]
    for reason, ids in sorted(untrusted.items()):
        reporter.warning(f"{len(ids)} annotation(s) carry a mark this worker does not trust: {reason}; "
                         "they were left alone.", _ids_text(sorted(ids)), title="Marks not trusted")
    by_reason: dict[str, list[str]] = {}
    for _, reason, ids in result.left_alone:
        by_reason.setdefault(reason, []).extend(ids)
    for reason, ids in sorted(by_reason.items()):
        reporter.warning(f"{len(ids)} refinement(s) share an original, but {reason}; none was removed.",
                         _ids_text(sorted(ids)), title="Marks not trusted")
    ledger.not_trusted = sorted({u.id for u in result.unreadable} | {r.id for r in result.misplaced}
                                | {i for _, _, ids in result.left_alone for i in ids})


#: Where the progress bar stands while the model loads: from the first to the last, one step each;
#: and once it is ready.
MODEL_STEPS, READY = (0.08, 0.098), 0.1


def _load_model(settings: RefineSettings, reporter: Reporter, load_predictor: PredictorLoader,
                selection: Selection) -> BoxPredictor:
    """The model, each step of its loading a progress line (importing torch alone takes seconds)."""
    low, high = MODEL_STEPS
    fractions = [low + (high - low) * k / 7 for k in range(8)]  # the real loader tells seven steps
    reporter.progress(low, "Loading model", f"{settings.model} for {selection.count} annotation(s) "
                                            f"at {len(selection.by_location)} location(s)", until=fractions[1])
    told = [0]

    def step(text: str) -> None:  # each step a little further; the heartbeat moves the bar towards the next
        told[0] = min(told[0] + 1, len(fractions) - 1)
        following = fractions[told[0] + 1] if told[0] + 1 < len(fractions) else READY
        reporter.progress(fractions[told[0]], "Loading model", f"{settings.model}: {text}", until=following)

    try:
        predictor, untrained = _call_loader(load_predictor, settings.checkpoint, step)
    except Exception as exc:
        model_module = sys.modules.get("sam2_refine.model.sam2_model")  # (imported by the loader, with torch)
        if model_module is None or not isinstance(exc, model_module.CheckpointError):
            raise
        raise JobFailed("The SAM2 model could not be loaded.",
                        sentences(str(exc), "Nothing was changed",
                                  "An administrator should check the checkpoint files of the worker image")) from None
    if untrained:
        reporter.warning("UNTRAINED MODEL: this checkpoint holds random weights made for tests or the "
                         "offline demo. Its masks are meaningless.", settings.model, title="Untrained model")
    return predictor


def _call_loader(load_predictor: PredictorLoader, checkpoint: Path,
                 on_step: Callable[[str], None]) -> tuple[BoxPredictor, bool]:
    """``load_predictor(checkpoint)``, telling it ``on_step`` when it takes one (the real loader
    does; stand-ins in tests need not)."""
    try:
        takes_steps = "on_step" in inspect.signature(load_predictor).parameters
    except (TypeError, ValueError):
        takes_steps = False
    if takes_steps:
        return load_predictor(checkpoint, on_step=on_step)  # type: ignore[call-arg]
    return load_predictor(checkpoint)


def predictor_device(predictor: BoxPredictor) -> str:
    """``"cuda"`` or ``"cpu"``: where the model runs (stand-ins without a ``device``: the CPU)."""
    device = getattr(predictor, "device", "cpu")
    return device if isinstance(device, str) else "cpu"


@contextmanager
def _outline_work(predictor: BoxPredictor, given: OutlinePool | None, reporter: Reporter) -> Iterator[OutlinePool]:
    """The job's outline pool: ``given`` (left open), else one for the model's device (its worker
    processes started now, while the first location is prepared; stopped after the last)."""
    if given is not None:
        reporter.progress(READY, "Model ready", _ready_text(predictor, given))
        yield given
        return
    with OutlinePool(workers_from_env(predictor_device(predictor))) as pool:
        pool.start()
        reporter.progress(READY, "Model ready", _ready_text(predictor, pool))
        yield pool


def _ready_text(predictor: BoxPredictor, pool: OutlinePool) -> str:
    if pool.inline:
        return predictor.description
    return f"{predictor.description}; outlines on {pool.workers} worker process(es)"


class _Uploader:
    """Uploads refined annotations in chunks while the job goes on; stops at the first failure.

    Before each chunk the refinements on the server are read again: an original that another
    job refined meanwhile is not uploaded again (its refinement is its replacement)."""

    def __init__(self, client: NimbusClient, ledger: Ledger, settings: RefineSettings,
                 watch: RefinementWatch) -> None:
        self.client, self.ledger, self.settings, self.watch = client, ledger, settings, watch
        self.error: NimbusAPIError | None = None
        self._last = time.monotonic()

    def pending(self) -> int:
        """Refined shapes not uploaded yet."""
        return len(pending_upload(self.ledger))

    def flush(self, at_least: int = 1, or_after: float | None = None) -> None:
        """Upload what is pending if there are ``at_least`` documents, or any once ``or_after``
        seconds have passed since the last upload (no-op after a failure)."""
        waiting = self.pending()
        late = or_after is not None and time.monotonic() - self._last >= or_after
        if self.error is not None or not waiting or (waiting < at_least and not late):
            return
        self._last = time.monotonic()
        while self.error is None and self.pending():
            _skip_refined_elsewhere(self.watch, self.ledger,
                                    {r.original_id: self.ledger.locations[r.original_id]
                                     for r in pending_upload(self.ledger)})
            if not self.pending():
                return
            report = upload(self.client, self.ledger, self.settings.dataset_id, self.settings.channel,
                            self.settings.output_tags, self.settings.keep_original_tags,
                            delete_original=self.settings.delete_originals, limit=MAX_CHUNK)
            self.error = report.error


def _skip_refined_elsewhere(watch: RefinementWatch, ledger: Ledger, originals: dict[str, Location]) -> list[str]:
    """Read the refinements again; originals (id -> location) that another job has refined
    meanwhile get that refinement as their replacement. Returns their ids."""
    index = watch.read(set(originals.values()))
    if index is None:
        return []
    taken = []
    for original_id, location in originals.items():
        found = index.for_original(original_id, location)
        if found and original_id not in ledger.created:
            ledger.refined_by_another(original_id, location, found[0].id)
            taken.append(original_id)
    return taken


def _locations_to_fetch(selection: Selection) -> list[Location]:
    """Locations with something to refine, in order: only their frames are fetched."""
    return [loc for loc, originals in selection.by_location.items() if any(o.problem is None for o in originals)]


def _refine_all(settings: RefineSettings, reporter: Reporter, predictor: BoxPredictor, selection: Selection,
                ledger: Ledger, uploader: _Uploader, frames: FramePrefetcher[LocationImage],
                watch: RefinementWatch, pool: OutlinePool) -> list[str]:
    """Refine every location; returns descriptions of locations that failed.

    Frames come from ``frames`` (fetched ahead within its byte budget), and refined annotations
    are uploaded in chunks of :data:`UPLOAD_CHUNK` as they accumulate (or after
    :data:`UPLOAD_AFTER_S` seconds). After an upload failure no further location is processed
    (its originals are kept). Before a location, the refinements are read again when that is
    cheap relative to the job (:class:`RefinementWatch`): what another job has refined meanwhile
    is not refined again. The outline work of each location runs on ``pool``.
    """
    options = geometry_options(settings)
    span = ProgressSpan(reporter, 0.1, 0.85, "Refining")
    total = selection.count
    done = 0
    failed: list[str] = []
    locations = list(selection.by_location.items())
    for index, (location, originals) in enumerate(locations, start=1):
        where = f"Location {index}/{len(locations)} ({location.describe()})"
        if uploader.error is not None:
            for original in originals:
                ledger.keep(original.id, location, "not processed: the upload failed")
            continue
        span.update(done / total, where)
        if location not in frames.wanted:  # nothing to look at: no image fetched
            ledger.record(location, [Kept(o.id, o.problem or "no shape") for o in originals])
            done += len(originals)
            continue
        if watch.due():
            taken = set(_skip_refined_elsewhere(watch, ledger, {o.id: location for o in originals}))
            if taken:
                done += len(taken)
                originals = [o for o in originals if o.id not in taken]
        try:
            image = frames.take(location)  # taken even when unused, so that the next one is fetched
        except NimbusAPIError as exc:
            degraded = isinstance(exc, DegradedFrameError)
            if originals:
                failed.append(f"{location.describe()}: its image could not be read: {cause_text(exc)} "
                              f"(request {exc.method} {exc.endpoint})")
                if degraded:
                    reporter.error(f"The image at {location.describe()} arrived degraded; its annotations were kept.",
                                   sentences(exc.detail, "The server could not send this frame's exact pixels, and a "
                                             "degraded image is never refined", "Ask the server's operator to install "
                                             "pyvips or a newer large_image (the worker asks for encodings pickle:5, "
                                             "then TILED)"))
            for original in originals:
                ledger.keep(original.id, location, "its image arrived degraded (not the dataset's pixel type or size)"
                            if degraded else "its image could not be read")
            done += len(originals)
            continue
        if not originals:  # all refined by another job meanwhile
            del image
            continue
        for original in originals:  # (the kept tag is a status of the original, not copied: see kept)
            ledger.tags[original.id] = tuple(t for t in original.tags if t != settings.kept_tag)
        outcomes = refine_location(predictor, image, originals, options, pool=pool,
                                   on_step=_location_steps(span, done, len(originals), total, where))
        del image
        ledger.record(location, outcomes)
        done += len(originals)
        uploader.flush(at_least=UPLOAD_CHUNK, or_after=UPLOAD_AFTER_S)
    span.update(1.0, f"{len(locations)} location(s) done")
    return failed


def _tag_kept(settings: RefineSettings, client: NimbusClient, reporter: Reporter, ledger: Ledger) -> TagReport:
    """The kept tag added to every kept original, taken from refined originals that are still on
    the server (see :mod:`sam2_refine.job.kept`)."""
    tag = settings.kept_tag
    assert tag is not None
    keep = sorted({i for ids in ledger.kept_by_reason().values() for i in ids})
    gone = set(ledger.deleted) | set(ledger.delete_unknown) | ledger.already_deleted
    untag = sorted(o for o in ledger.created if o in ledger.kept_tag_before and o not in gone)
    span = ProgressSpan(reporter, 0.98, 0.99, "Tagging kept annotations")
    span.update(0.0, f'Adding "{tag}" to {len(keep)} kept annotation(s)')
    report = update_tags(client, tag, keep, untag,
                         on_progress=lambda done, total: span.update(done / total, f"{done}/{total} annotation(s)"))
    ledger.kept_tagging = report.as_json()
    return report


#: The shares of a location's progress: embedding its image (or regions), decoding its objects'
#: prompts, tracing their outlines (on a CPU the embedding takes most of a small location's time).
EMBED_SHARE, DECODE_SHARE, TRACE_SHARE = 0.3, 0.45, 0.25


def _location_steps(span: ProgressSpan, before: int, count: int, total: int, where: str,
                    ) -> Callable[[str, int, int], None]:
    """The engine's steps within one location (:func:`~sam2_refine.engine.location.refine_location`'s
    ``on_step``) as progress lines: the location's share of the bar (``count`` of the job's
    ``total`` originals, after ``before``) filled as its regions are embedded, its objects
    decoded and their outlines traced (:data:`EMBED_SHARE`, :data:`DECODE_SHARE`,
    :data:`TRACE_SHARE`); never backwards. While a region is embedded (one long step) the
    heartbeat moves the bar towards the end of that region's share."""
    regions = [0, 1]  # regions embedded (or being embedded), of how many
    decoded = [0.0]
    reached = [0.0]

    def at(part: float) -> float:
        return (before + count * min(1.0, part)) / total

    def on_step(step: str, done: int, of: int) -> None:
        until = None
        if step == STEP_EMBED:
            regions[:] = [done, max(of, 1)]
            text, minor = "computing the image embedding" + (f" (region {done}/{of})" if of > 1 else ""), False
            part = EMBED_SHARE * (done - 1) / regions[1] + DECODE_SHARE * decoded[0]
            until = at(EMBED_SHARE * done / regions[1] + DECODE_SHARE * decoded[0])
        elif step == STEP_DECODE:
            decoded[0] = done / of if of else 1.0
            text, minor = f"{done}/{of} objects decoded", True
            part = EMBED_SHARE * regions[0] / regions[1] + DECODE_SHARE * decoded[0]
        else:
            text, minor = f"{done}/{of} outlines traced", True
            part = EMBED_SHARE + DECODE_SHARE + TRACE_SHARE * (done / of if of else 1.0)
            if done < of:
                until = at(EMBED_SHARE + DECODE_SHARE + TRACE_SHARE * (done + 1) / of)
        reached[0] = max(reached[0], part)
        span.update(at(reached[0]), f"{where}: {text}", minor=minor, until=until)

    return on_step


def _warn_kept(reporter: Reporter, ledger: Ledger, sizes: tuple[int, int, int], tagging: TagReport | None,
               kept_tag: str | None) -> None:
    """One warning for every kept original: counted by position and reason (ids in the summary
    file only), and how to find them in the app (``tagging``: what tagging them with
    ``kept_tag`` did, None when it did not run)."""
    groups = kept_by_position(ledger.kept_by_reason(), ledger.locations)
    count = sum(len(ids) for reasons in groups.values() for ids in reasons.values())
    if count:
        where = f" at {len(groups)} position(s)" if len(groups) > 1 else ""
        if tagging is None and kept_tag:
            find = f'They were not tagged "{kept_tag}": the job stopped before; running it again tags them'
        elif tagging is None:
            find = 'Set "Tag kept annotations" to tag them, so that the tag filter shows them'
        elif tagging.tagged == count:
            find = f'They carry the tag "{tagging.tag}": the tag filter shows them'
        else:
            find = f'{tagging.tagged} of them carry the tag "{tagging.tag}", which the tag filter shows'
        reporter.warning(f"{count} annotation(s) were kept unchanged{where}.",
                         sentences(kept_text(groups, sizes), find), title="Annotations kept")
    if tagging is not None and tagging.refused:
        refused = sum(len(ids) for ids in tagging.refused.values())
        reporter.warning(f'{refused} kept annotation(s) could not be tagged "{tagging.tag}".',
                         sentences("; ".join(f"{len(ids)}: {reason}" for reason, ids in tagging.refused.items()),
                                   "They are kept unchanged; the summary file lists them"),
                         title="Annotations kept")


def _write_summary(ledger: Ledger) -> None:
    path = os.environ.get(SUMMARY_ENV)
    if path:
        Path(path).write_text(json.dumps(ledger.summary(), indent=2))
