"""One compute job, start to finish: the stages of the worker wired together.

settings (already parsed) -> dataset layout and batch positions -> layers -> annotations ->
selection -> model -> per location: frames, merged image, refinement -> upload -> convergence
with other jobs and confirmed deletions (:mod:`sam2_refine.converge`) -> summary. Progress lines
cover the whole job; every original ends up in the :class:`~sam2_refine.replace.Ledger`, refined
or kept with a reason.

Other jobs may refine the same originals at the same time. The refinements on the server are
read again before each location and before each upload chunk, and what another job already
made is not made again (this narrows the window); whatever still overlaps is brought to one
refinement per original by :func:`~sam2_refine.converge.converge`, which does not depend on
timing.

Exit status: 0 when the job finished (some originals may be kept, with warnings); 1 when it
failed part way (the messages say what was and was not done); 2 for bad settings (nothing was
read or changed beyond the dataset's layout); 143 when stopped by SIGTERM.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from sam2_refine import interface as ui
from sam2_refine.batch_ranges import BatchRangeError
from sam2_refine.converge import ConvergeReport, RefinementWatch, converge, read_view
from sam2_refine.imaging import Layer, LayerError, LocationImage, parse_layers
from sam2_refine.interrupt import EXIT_INTERRUPTED, JobInterrupted
from sam2_refine.nimbus_client import MAX_CHUNK, DatasetInfo, DegradedFrameError, NimbusAPIError, NimbusClient
from sam2_refine.outline_pool import OutlinePool, workers_from_env
from sam2_refine.predictor import BoxPredictor
from sam2_refine.prefetch import FramePrefetcher, PrefetchPolicy, location_bytes
from sam2_refine.refine import GeometryOptions, Kept, refine_location
from sam2_refine.replace import Ledger, pending_upload, upload
from sam2_refine.report import ProgressSpan, Reporter
from sam2_refine.selection import Original, Selection, select
from sam2_refine.settings import Location, RefineSettings

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

#: Loads the model from a checkpoint path: (predictor, untrained?).
PredictorLoader = Callable[[Path], "tuple[BoxPredictor, bool]"]


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

    def holds(self, location: Location) -> bool:
        """Whether ``location`` is one of the batch's positions."""
        return location.xy in self.xy and location.z in self.z and location.time in self.time


def resolve_batch(settings: RefineSettings, info: DatasetInfo) -> Batch:
    """Check the batch fields against the dataset's size.

    Raises:
        JobFailed: a position beyond the dataset (exit 2; the message states the size).
    """
    try:
        return Batch(
            settings.batch_xy.resolve(ui.BATCH_XY, info.num_xy, settings.tile.xy),
            settings.batch_z.resolve(ui.BATCH_Z, info.num_z, settings.tile.z),
            settings.batch_time.resolve(ui.BATCH_TIME, info.num_time, settings.tile.time),
        )
    except BatchRangeError as exc:
        raise JobFailed(f"Invalid setting: {exc}", "Nothing was changed.", EXIT_BAD_SETTINGS) from None


def fetch_annotations(client: NimbusClient, settings: RefineSettings) -> Iterator[dict[str, Any]]:
    """Every polygon annotation of the dataset (and blobs, where a server has them), paged; also
    every point and rectangle when the job refines those (``settings.shapes``).

    One listing of every polygon, filtered here rather than by the server: it holds both the
    candidates (any of the refine tags) and every refinement made by an earlier run, whatever
    output tags that run used (see :mod:`sam2_refine.markers`; refinements are polygons, so the
    point and rectangle listings hold none). Filtering by tags on the server would miss
    refinements tagged differently and refine their originals twice. From the point and
    rectangle listings only documents of that shape are taken (a server that ignored the shape
    filter would otherwise list every polygon twice).
    """
    for page in client.iter_annotation_pages(settings.dataset_id, "polygon"):
        yield from page
    try:
        blob_pages = list(client.iter_annotation_pages(settings.dataset_id, "blob"))
    except NimbusAPIError as exc:  # not every server knows blobs: ignored, as upstream does
        log.info("blob query failed, ignored: %s", exc)
        blob_pages = []
    for page in blob_pages:
        yield from page
    for shape in settings.shapes:
        if shape in ("polygon", "blob"):
            continue
        for page in client.iter_annotation_pages(settings.dataset_id, shape):
            yield from (doc for doc in page if isinstance(doc, dict) and doc.get("shape") == shape)


def geometry_options(settings: RefineSettings) -> GeometryOptions:
    """How the engine refines, from the job's settings."""
    return GeometryOptions(smoothing=settings.smoothing, padding=settings.padding,
                           resolution=settings.resolution, prompt=settings.prompt,
                           min_overlap=settings.min_overlap, separate=settings.separate,
                           group_tags=settings.refine_tags)


def find_refinements(client: NimbusClient, settings: RefineSettings) -> dict[str, str]:
    """original id -> id of its surviving refinement on the server (see markers, refinements)."""
    return read_view(client, settings.dataset_id, ()).index.survivors()


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
    a pool of :func:`~sam2_refine.outline_pool.workers_from_env` worker processes for the
    model's device, started once the model is loaded and stopped with the job."""
    ledger = Ledger()
    try:
        return _run(settings, client, reporter, load_predictor, ledger, outline_pool)
    except JobFailed as exc:
        reporter.error(str(exc), exc.info)
        return exc.exit_code
    except JobInterrupted as exc:
        untouched = not ledger.deleted and not ledger.delete_unknown
        reporter.error(f"The job was stopped ({exc.signal_name})" +
                       ("; no original annotation was deleted." if untouched else "."),
                       f"{ledger.created_here()} refined annotation(s) had been created; "
                       f"{ledger.deletion_text()}. Running the job again refines only what is missing and does "
                       "not duplicate what was made.")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - report what was done before any unexpected failure
        log.debug("unexpected failure", exc_info=True)
        untouched = not ledger.deleted and not ledger.delete_unknown
        reporter.error("The job failed unexpectedly; no original annotation was deleted."
                       if untouched else "The job failed unexpectedly.",
                       f"{type(exc).__name__}: {exc}. {ledger.created_here()} refined "
                       f"annotation(s) had been created; {ledger.deletion_text()} before the failure.")
        return EXIT_FAILED
    finally:
        _write_summary(ledger)


def _run(settings: RefineSettings, client: NimbusClient, reporter: Reporter,
         load_predictor: PredictorLoader, ledger: Ledger, outline_pool: OutlinePool | None) -> int:
    started = time.monotonic()
    reporter.progress(0.0, "Reading dataset", "Frame layout and layer settings")
    try:
        info = client.get_dataset_info(settings.dataset_id)
    except NimbusAPIError as exc:
        raise JobFailed("Could not read the dataset.", f"{exc}. Nothing was changed.") from None
    batch = resolve_batch(settings, info)
    try:
        view = client.get_layers(settings.dataset_id, settings.tool_id)
        layers = parse_layers(view.layers, info.num_channels, view.layer_contrasts)
    except NimbusAPIError as exc:
        raise JobFailed("Could not read the layer settings.", f"{exc}. Nothing was changed.") from None
    except LayerError as exc:
        raise JobFailed("The dataset's layer settings cannot be used.", f"{exc}. Nothing was changed.") from None

    reporter.progress(0.02, "Fetching annotations", _listed_text(settings))
    try:
        selection = select(fetch_annotations(client, settings), settings.refine_tags,
                           batch.xy, batch.z, batch.time)
    except NimbusAPIError as exc:
        raise JobFailed("Could not fetch the annotations.", f"{exc}. Nothing was changed.") from None
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
    selection = _take_earlier_refinements(selection, ledger, reporter)
    if selection.count == 0:
        if not ledger.previous and not _needs_converge(selection, batch):
            reporter.progress(1.0, "Complete", "No annotations found to refine in the chosen batch and tags")
            return EXIT_OK
        return _finish(settings, client, reporter, ledger, [], started, batch, shapes)

    watch = RefinementWatch(client, settings.dataset_id, settings.output_tags)
    uploader = _Uploader(client, ledger, settings, watch)
    with FramePrefetcher(client, _locations_to_fetch(selection),
                         lambda c, location: load_location_image(c, info, layers, location),
                         location_bytes(info, layers), PrefetchPolicy.from_env()) as frames:
        frames.start()  # the first locations' frames arrive while the model loads
        predictor = _load_model(settings, reporter, load_predictor, selection)
        with _outline_work(predictor, outline_pool, reporter) as pool:
            failed_locations = _refine_all(settings, reporter, predictor, selection, ledger, uploader, frames,
                                           watch, pool)

    reporter.progress(0.85, "Uploading", f"Creating {uploader.pending()} refined annotation(s)")
    uploader.flush()
    if uploader.error is not None:
        unconfirmed = len(ledger.not_created)
        found = _reconcile(client, settings, ledger)
        _warn_kept(reporter, ledger)
        reporter.error(
            "Uploading the refined annotations failed; no original annotation was deleted.",
            f"{uploader.error}. Created {ledger.created_here()} of {len(ledger.refined)}"
            + (f" ({found} of the {unconfirmed} unconfirmed ones were found on the server after all)" if found else "")
            + f"; {len(ledger.not_created)} were not created. Every original annotation is still in place; "
            "running the job again refines only what is missing.")
        return EXIT_FAILED
    return _finish(settings, client, reporter, ledger, failed_locations, started, batch, shapes)


def _needs_converge(selection: Selection, batch: Batch) -> bool:
    """Whether the batch holds refinements (to bring to one per original, and whose connections
    a stopped job may have left twice) or marks to report, although no original is left to
    refine."""
    index = selection.index
    return (any(r.location is not None and batch.holds(r.location) for g in index.groups.values() for r in g)
            or any(u.location is not None and batch.holds(u.location) for u in index.unreadable))


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
    return Selection(remaining, selection.duplicates, selection.without_id, selection.index)


def _reconcile(client: NimbusClient, settings: RefineSettings, ledger: Ledger) -> int:
    """After a failed upload, look for refinements the server created without confirming them."""
    try:
        on_server = find_refinements(client, settings)
    except NimbusAPIError as exc:
        log.info("could not re-check the refinements: %s", exc)
        return 0
    found = [o for o in ledger.not_created if o in on_server]
    for original_id in found:
        ledger.created[original_id] = ledger.mine[original_id] = on_server[original_id]
    ledger.not_created = [o for o in ledger.not_created if o not in on_server]
    return len(found)


def _finish(settings: RefineSettings, client: NimbusClient, reporter: Reporter, ledger: Ledger,
            failed_locations: list[str], started: float, batch: Batch, shapes: tuple[str, ...]) -> int:
    """Convergence with other jobs, confirmed deletions, warnings, the summary line."""
    deleting = settings.delete_originals
    reporter.progress(0.9, "Checking refinements", "One refinement per original"
                      + (", then deleting the replaced originals" if deleting else ""))
    steps = iter((0.92, 0.94, 0.96, 0.97, 0.98))
    result = converge(client, settings.dataset_id, ledger, delete=deleting, shapes=shapes, in_batch=batch.holds,
                      on_step=lambda title, info: reporter.progress(next(steps, 0.98), title, info))
    _warn_kept(reporter, ledger)
    _warn_converge(reporter, ledger, result)
    if result.error is not None:
        _report_converge_error(reporter, ledger, result)
        return EXIT_FAILED
    if not result.stable:
        reporter.error("Other jobs kept refining the same annotations while this job checked them.",
                       f"{ledger.deletion_text()}. Running the job again when they are done finishes the job.")
        return EXIT_FAILED

    summary = ledger.summary()
    elapsed = time.monotonic() - started
    if summary["selected"] == 0:
        reporter.progress(1.0, "Complete", "No annotations found to refine in the chosen batch and tags")
        return EXIT_OK
    text = (f"Refined {summary['refined']} of {summary['selected']}, kept {summary['kept']}, "
            f"deleted {summary['deleted']}"
            + (f", {summary['already_refined']} already refined earlier" if summary["already_refined"] else "")
            + (f", {summary['refined_by_another_job']} refined by another job"
               if summary["refined_by_another_job"] else "")
            + f" ({elapsed:.1f} s)")
    if failed_locations:
        reporter.error(f"{len(failed_locations)} location(s) could not be processed; their annotations "
                       "were kept.", "; ".join(failed_locations[:20]))
        reporter.progress(1.0, "Finished with errors", text)
        return EXIT_FAILED
    reporter.progress(1.0, "Complete", text)
    return EXIT_OK


def _report_converge_error(reporter: Reporter, ledger: Ledger, result: ConvergeReport) -> None:
    untouched = not ledger.deleted and not ledger.delete_unknown
    nothing = "; no original annotation was deleted." if untouched else "."
    again = "running the job again finishes the job without duplicating anything."
    if result.stage == "delete":
        reporter.error("Deleting the replaced originals failed part way.",
                       f"{result.error}. {ledger.deletion_text()}; {len(ledger.delete_failed)} remain next to "
                       "their refined copies (running the job again deletes them).")
    elif result.stage == "links":
        reporter.error("Could not re-create the originals' connections" + nothing,
                       f"{result.error}. {result.moved} connection(s) were re-created. The refined annotations "
                       f"are in place; {again}")
    elif result.stage == "duplicates":
        reporter.error("Could not remove the duplicate refinements that jobs running at the same time made"
                       + nothing, f"{result.error}. {ledger.deletion_text()}; {again}")
    else:
        reporter.error("Could not read the refinements back to check them" + nothing,
                       f"{result.error}. {ledger.deletion_text()}; {again}")


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


def _load_model(settings: RefineSettings, reporter: Reporter, load_predictor: PredictorLoader,
                selection: Selection) -> BoxPredictor:
    from sam2_refine.sam2_model import CheckpointError  # only now: imports torch

    reporter.progress(0.08, "Loading model", f"{settings.model} for {selection.count} annotation(s) "
                                              f"at {len(selection.by_location)} location(s)")
    try:
        predictor, untrained = load_predictor(settings.checkpoint)
    except CheckpointError as exc:
        raise JobFailed("The SAM2 model could not be loaded.", f"{exc}. Nothing was changed.") from None
    if untrained:
        reporter.warning("UNTRAINED MODEL: this checkpoint holds random weights made for tests or the "
                         "offline demo. Its masks are meaningless.", settings.model, title="Untrained model")
    return predictor


def predictor_device(predictor: BoxPredictor) -> str:
    """``"cuda"`` or ``"cpu"``: where the model runs (stand-ins without a ``device``: the CPU)."""
    device = getattr(predictor, "device", "cpu")
    return device if isinstance(device, str) else "cpu"


@contextmanager
def _outline_work(predictor: BoxPredictor, given: OutlinePool | None, reporter: Reporter) -> Iterator[OutlinePool]:
    """The job's outline pool: ``given`` (left open), else one for the model's device (its worker
    processes started now, while the first location is prepared; stopped after the last)."""
    if given is not None:
        reporter.progress(0.1, "Model ready", _ready_text(predictor, given))
        yield given
        return
    with OutlinePool(workers_from_env(predictor_device(predictor))) as pool:
        pool.start()
        reporter.progress(0.1, "Model ready", _ready_text(predictor, pool))
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
    index = watch.read()
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
                failed.append(f"{location.describe()}: {exc}")
                if degraded:
                    reporter.error(f"The image at {location.describe()} arrived degraded; its annotations were kept.",
                                   f"{exc.detail}. The server could not send this frame's exact pixels, and a "
                                   "degraded image is never refined. Ask the server's operator to install pyvips "
                                   "or a newer large_image (the worker asks for encodings pickle:5, then TILED).")
            for original in originals:
                ledger.keep(original.id, location, "its image arrived degraded (not the dataset's pixel type or size)"
                            if degraded else "its image could not be read")
            done += len(originals)
            continue
        if not originals:  # all refined by another job meanwhile
            del image
            continue
        for original in originals:
            ledger.tags[original.id] = original.tags
        base = done
        outcomes = refine_location(predictor, image, originals, options,
                                   on_progress=lambda n, b=base, w=where: span.update((b + n) / total, w), pool=pool)
        del image
        ledger.record(location, outcomes)
        done += len(originals)
        uploader.flush(at_least=UPLOAD_CHUNK, or_after=UPLOAD_AFTER_S)
    span.update(1.0, f"{len(locations)} location(s) done")
    return failed


def _warn_kept(reporter: Reporter, ledger: Ledger) -> None:
    for reason, ids in sorted(ledger.kept_by_reason().items()):
        reporter.warning(f"{len(ids)} annotation(s) kept unchanged: {reason}", _ids_text(ids),
                         title="Annotations kept")


def _write_summary(ledger: Ledger) -> None:
    path = os.environ.get(SUMMARY_ENV)
    if path:
        Path(path).write_text(json.dumps(ledger.summary(), indent=2))
