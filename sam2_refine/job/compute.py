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
from pathlib import Path
from typing import Any

from sam2_refine import fields
from sam2_refine.job.batch_ranges import Batch, BatchRangeError
from sam2_refine.job.batch_reads import BatchReader
from sam2_refine.job.converge import RefinementWatch, ServerView, ViewBuilder, converge, read_view
from sam2_refine.engine.imaging import Layer, LayerError, LocationImage, parse_layers
from sam2_refine.messages import (
    Explained,
    cause_text,
    request_text,
    sentences,
    server_failure,
    settings_failure,
)
from sam2_refine.job.interrupt import EXIT_INTERRUPTED, JobInterrupted
from sam2_refine.job.kept import TagReport, update_tags
from sam2_refine.nimbus.dataset import DatasetInfo
from sam2_refine.nimbus.errors import DegradedFrameError, NimbusAPIError
from sam2_refine.nimbus.client import NimbusClient
from sam2_refine.engine.outline_pool import OutlinePool, workers_from_env
from sam2_refine.model.predictor import BoxPredictor
from sam2_refine.job.prefetch import FramePrefetcher, PrefetchPolicy, location_bytes
from sam2_refine.engine.location import refine_location
from sam2_refine.engine.options import GeometryOptions
from sam2_refine.annotations import Kept
from sam2_refine.job.replace import Ledger
from sam2_refine.nimbus.progress import Heartbeat, ProgressSpan, Reporter
from sam2_refine.annotations import Original
from sam2_refine.job.selection import Selection, select
from sam2_refine.annotations import Location
from sam2_refine.job.report_text import (
    dataset_failure,
    ids_text,
    listed_text,
    location_steps,
    nothing_to_refine,
    report_converge_error,
    warn_converge,
    warn_kept,
)
from sam2_refine.job.settings import RefineSettings
from sam2_refine.job.upload import Uploader, skip_refined_elsewhere

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_BAD_SETTINGS = 0, 1, 2
#: Environment variable naming a file for the job's JSON summary (demo, tests, benchmarks).
SUMMARY_ENV = "SAM2_REFINE_SUMMARY"
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


def _failed(line: Explained, exit_code: int = EXIT_FAILED) -> JobFailed:
    return JobFailed(line.error, line.info, exit_code)


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
        raise _failed(dataset_failure(exc, client, settings)) from None
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

    reporter.progress(0.02, "Fetching annotations", listed_text(settings), until=MODEL_STEPS[0])
    seen = ViewBuilder()  # the same reading, as convergence reads the batch
    try:
        selection = select(seen.watching(fetch_annotations(reader, settings)), settings.refine_tags,
                           batch.xy, batch.z, batch.time)
    except NimbusAPIError as exc:
        raise _failed(server_failure(exc, "reading the annotations", api_url=client.api_url)) from None
    if selection.duplicates:
        reporter.warning(f"The server listed {len(selection.duplicates)} annotation(s) more than once; "
                         "each is refined once.", ids_text(list(selection.duplicates)))
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
            nothing_to_refine(settings, batch, selection, reporter, _elsewhere(client, settings, seen.count))
            return EXIT_OK
        # Nothing was made since the selection's reading: convergence starts from it.
        return _finish(settings, client, reader, reporter, ledger, [], started, batch, shapes, seen.view())

    watch = RefinementWatch(reader, settings.output_tags)
    uploader = Uploader(client, ledger, settings, watch)
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
        warn_kept(reporter, ledger, batch.sizes, None, settings.kept_tag)
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


def _elsewhere(client: NimbusClient, settings: RefineSettings, in_batch: int) -> int | None:
    """How many of the dataset's annotations lie outside the batch (the batch's reading saw
    ``in_batch``); None when the server cannot count them."""
    try:
        return max(0, client.count_annotations(settings.dataset_id) - in_batch)
    except NimbusAPIError as exc:
        log.info("could not count the dataset's annotations: %s", exc)
        return None


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
                     "job); their refinements are kept and not made again.", ids_text(sorted(again)),
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
    warn_kept(reporter, ledger, batch.sizes, tagging, settings.kept_tag)
    warn_converge(reporter, ledger, result)
    if result.error is not None:
        report_converge_error(reporter, ledger, result, client.api_url)
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


def _locations_to_fetch(selection: Selection) -> list[Location]:
    """Locations with something to refine, in order: only their frames are fetched."""
    return [loc for loc, originals in selection.by_location.items() if any(o.problem is None for o in originals)]


def _refine_all(settings: RefineSettings, reporter: Reporter, predictor: BoxPredictor, selection: Selection,
                ledger: Ledger, uploader: Uploader, frames: FramePrefetcher[LocationImage],
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
            taken = set(skip_refined_elsewhere(watch, ledger, {o.id: location for o in originals}))
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
                                   on_step=location_steps(span, done, len(originals), total, where))
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


def _write_summary(ledger: Ledger) -> None:
    path = os.environ.get(SUMMARY_ENV)
    if path:
        Path(path).write_text(json.dumps(ledger.summary(), indent=2))
