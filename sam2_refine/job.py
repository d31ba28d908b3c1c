"""One compute job, start to finish: the stages of the worker wired together.

settings (already parsed) -> dataset layout and batch positions -> layers -> annotations ->
selection -> model -> per location: frames, merged image, refinement -> upload -> confirmed
deletions -> summary. Progress lines cover the whole job; every original ends up in the
:class:`~sam2_refine.replace.Ledger`, refined or kept with a reason.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from sam2_refine import interface as ui
from sam2_refine.batch_ranges import BatchRangeError
from sam2_refine.imaging import Layer, LayerError, LocationImage, parse_layers
from sam2_refine.interrupt import EXIT_INTERRUPTED, JobInterrupted
from sam2_refine.markers import original_of
from sam2_refine.nimbus_client import DatasetInfo, NimbusAPIError, NimbusClient
from sam2_refine.predictor import BoxPredictor
from sam2_refine.prefetch import FramePrefetcher, PrefetchPolicy, location_bytes
from sam2_refine.refine import GeometryOptions, Kept, refine_location
from sam2_refine.replace import Ledger, delete_replaced, relink, upload
from sam2_refine.report import ProgressSpan, Reporter
from sam2_refine.selection import Original, Selection, select
from sam2_refine.settings import Location, RefineSettings

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_BAD_SETTINGS = 0, 1, 2
#: Environment variable naming a file for the job's JSON summary (demo, tests, benchmarks).
SUMMARY_ENV = "SAM2_REFINE_SUMMARY"
#: How many ids a warning lists before it says "and N more".
LISTED_IDS = 50
#: Refined annotations are uploaded during the job once this many are waiting.
UPLOAD_CHUNK = 1000

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
    """original id -> id of an annotation on the server that refines it (see markers)."""
    found: dict[str, str] = {}
    for page in client.iter_annotation_pages(settings.dataset_id, "polygon"):
        for doc in page:
            original = original_of(doc) if isinstance(doc, dict) else None
            if original is not None and isinstance(doc.get("_id"), str):
                found.setdefault(original, doc["_id"])
    return found


def load_location_image(client: NimbusClient, info: DatasetInfo, layers: list[Layer],
                        location: Location) -> LocationImage:
    """Fetch each needed channel's frame once; merged lazily, window by window."""
    planes = {}
    for channel in sorted({layer.channel for layer in layers}):
        try:
            frame = info.frame_number(channel, location.xy, location.z, location.time)
        except KeyError as exc:
            raise NimbusAPIError("GET", f"item/{info.item_id}/tiles", None, str(exc)) from None
        planes[channel] = client.get_frame(info.item_id, frame)
        if planes[channel].shape != (info.height, info.width):
            raise NimbusAPIError("GET", f"item/{info.item_id}/tiles/region", None,
                                 f"frame {frame} is {planes[channel].shape[::-1]}, expected "
                                 f"{info.width}x{info.height}")
    return LocationImage(planes, layers)


def _ids_text(ids: list[str]) -> str:
    shown = ", ".join(ids[:LISTED_IDS])
    return shown + (f" and {len(ids) - LISTED_IDS} more" if len(ids) > LISTED_IDS else "")


def run_compute(
    settings: RefineSettings,
    client: NimbusClient,
    reporter: Reporter,
    load_predictor: PredictorLoader,
) -> int:
    """Run one compute job; returns the exit status (see the module docstring)."""
    ledger = Ledger()
    try:
        return _run(settings, client, reporter, load_predictor, ledger)
    except JobFailed as exc:
        reporter.error(str(exc), exc.info)
        return exc.exit_code
    except JobInterrupted as exc:
        untouched = not ledger.deleted and not ledger.delete_unknown
        reporter.error(f"The job was stopped ({exc.signal_name})" +
                       ("; no original annotation was deleted." if untouched else "."),
                       f"{len(ledger.created) - len(ledger.previous)} refined annotation(s) had been created; "
                       f"{ledger.deletion_text()}. Running the job again refines only what is missing and does "
                       "not duplicate what was made.")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - report what was done before any unexpected failure
        log.debug("unexpected failure", exc_info=True)
        untouched = not ledger.deleted and not ledger.delete_unknown
        reporter.error("The job failed unexpectedly; no original annotation was deleted."
                       if untouched else "The job failed unexpectedly.",
                       f"{type(exc).__name__}: {exc}. {len(ledger.created) - len(ledger.previous)} refined "
                       f"annotation(s) had been created; {ledger.deletion_text()} before the failure.")
        return EXIT_FAILED
    finally:
        _write_summary(ledger)


def _run(settings: RefineSettings, client: NimbusClient, reporter: Reporter,
         load_predictor: PredictorLoader, ledger: Ledger) -> int:
    started = time.monotonic()
    reporter.progress(0.0, "Reading dataset", "Frame layout and layer settings")
    try:
        info = client.get_dataset_info(settings.dataset_id)
    except NimbusAPIError as exc:
        raise JobFailed("Could not read the dataset.", f"{exc}. Nothing was changed.") from None
    batch = resolve_batch(settings, info)
    try:
        layers = parse_layers(client.get_layers(settings.dataset_id), info.num_channels)
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
    selection = _take_earlier_refinements(selection, ledger, reporter)
    if selection.count == 0:
        if not ledger.previous:
            reporter.progress(1.0, "Complete", "No annotations found to refine in the chosen batch and tags")
            return EXIT_OK
        return _finish(settings, client, reporter, ledger, [], started)

    uploader = _Uploader(client, ledger, settings)
    with FramePrefetcher(client, _locations_to_fetch(selection),
                         lambda c, location: load_location_image(c, info, layers, location),
                         location_bytes(info, layers), PrefetchPolicy.from_env()) as frames:
        frames.start()  # the first locations' frames arrive while the model loads
        predictor = _load_model(settings, reporter, load_predictor, selection)
        failed_locations = _refine_all(settings, reporter, predictor, selection, ledger, uploader, frames)

    reporter.progress(0.85, "Uploading", f"Creating {uploader.pending()} refined annotation(s)")
    uploader.flush()
    if uploader.error is not None:
        unconfirmed = len(ledger.not_created)
        found = _reconcile(client, settings, ledger)
        _warn_kept(reporter, ledger)
        reporter.error(
            "Uploading the refined annotations failed; no original annotation was deleted.",
            f"{uploader.error}. Created {len(ledger.created) - len(ledger.previous)} of {len(ledger.refined)}"
            + (f" ({found} of the {unconfirmed} unconfirmed ones were found on the server after all)" if found else "")
            + f"; {len(ledger.not_created)} were not created. Every original annotation is still in place; "
            "running the job again refines only what is missing.")
        return EXIT_FAILED
    return _finish(settings, client, reporter, ledger, failed_locations, started)


def _listed_text(settings: RefineSettings) -> str:
    kinds = ["Polygon"] + (["rectangle"] if settings.refine_rectangles else []) + (
        ["point"] if settings.refine_points else [])
    names = kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + " and " + kinds[-1]
    return f"{names} annotations of the dataset"


def _take_earlier_refinements(selection: Selection, ledger: Ledger, reporter: Reporter) -> Selection:
    """Originals an earlier run already refined are not refined again (see markers)."""
    again = {o.id for originals in selection.by_location.values() for o in originals
             if o.id in selection.refinements}
    if not again:
        return selection
    remaining: dict[Location, list[Original]] = {}
    for location, originals in selection.by_location.items():
        for original in originals:
            if original.id in again:
                ledger.already_refined(original.id, location, selection.refinements[original.id])
        rest = [o for o in originals if o.id not in again]
        if rest:
            remaining[location] = rest
    reporter.warning(f"{len(again)} annotation(s) had already been refined by an earlier run; their "
                     "refinements are kept and not made again.", _ids_text(sorted(again)),
                     title="Already refined")
    return Selection(remaining, selection.duplicates, selection.without_id, selection.refinements)


def _reconcile(client: NimbusClient, settings: RefineSettings, ledger: Ledger) -> int:
    """After a failed upload, look for refinements the server created without confirming them."""
    try:
        on_server = find_refinements(client, settings)
    except NimbusAPIError as exc:
        log.info("could not re-check the refinements: %s", exc)
        return 0
    found = [o for o in ledger.not_created if o in on_server]
    for original_id in found:
        ledger.created[original_id] = on_server[original_id]
    ledger.not_created = [o for o in ledger.not_created if o not in on_server]
    return len(found)


def _finish(settings: RefineSettings, client: NimbusClient, reporter: Reporter, ledger: Ledger,
            failed_locations: list[str], started: float) -> int:
    """Warnings for kept originals, confirmed deletions, the summary line."""
    _warn_kept(reporter, ledger)
    if settings.delete_originals and ledger.created:
        reporter.progress(0.93, "Keeping links", "Re-creating the originals' connections on their refinements")
        relinked, link_error = relink(client, ledger, settings.dataset_id)
        if link_error is not None:
            reporter.error("Could not re-create the originals' connections; no original annotation was deleted.",
                           f"{link_error}. {relinked} connection(s) were re-created. The refined annotations are "
                           "in place; running the job again finishes the job without duplicating them.")
            return EXIT_FAILED
        reporter.progress(0.95, "Deleting originals", f"Deleting {len(ledger.created)} replaced original(s)"
                          + (f"; {relinked} connection(s) moved to their refinements" if relinked else ""))
        error = delete_replaced(client, ledger)
        if error is not None:
            reporter.error("Deleting the replaced originals failed part way.",
                           f"{error}. {ledger.deletion_text()}; {len(ledger.delete_failed)} remain next to "
                           "their refined copies (running the job again deletes them).")
            return EXIT_FAILED

    summary = ledger.summary()
    elapsed = time.monotonic() - started
    text = (f"Refined {summary['refined']} of {summary['selected']}, kept {summary['kept']}, "
            f"deleted {summary['deleted']}"
            + (f", {summary['already_refined']} already refined earlier" if summary["already_refined"] else "")
            + f" ({elapsed:.1f} s)")
    if failed_locations:
        reporter.error(f"{len(failed_locations)} location(s) could not be processed; their annotations "
                       "were kept.", "; ".join(failed_locations[:20]))
        reporter.progress(1.0, "Finished with errors", text)
        return EXIT_FAILED
    reporter.progress(1.0, "Complete", text)
    return EXIT_OK


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
    reporter.progress(0.1, "Model ready", predictor.description)
    return predictor


class _Uploader:
    """Uploads refined annotations in chunks while the job goes on; stops at the first failure."""

    def __init__(self, client: NimbusClient, ledger: Ledger, settings: RefineSettings) -> None:
        self.client, self.ledger, self.settings = client, ledger, settings
        self.error: NimbusAPIError | None = None

    def pending(self) -> int:
        """Refined shapes not uploaded yet."""
        done = self.ledger.created.keys() | set(self.ledger.not_created)
        return sum(1 for r in self.ledger.refined if r.original_id not in done)

    def flush(self, at_least: int = 1) -> None:
        """Upload what is pending if there are ``at_least`` documents (no-op after a failure)."""
        if self.error is not None or self.pending() < at_least:
            return
        report = upload(self.client, self.ledger, self.settings.dataset_id, self.settings.channel,
                        self.settings.output_tags, self.settings.keep_original_tags)
        self.error = report.error


def _locations_to_fetch(selection: Selection) -> list[Location]:
    """Locations with something to refine, in order: only their frames are fetched."""
    return [loc for loc, originals in selection.by_location.items() if any(o.problem is None for o in originals)]


def _refine_all(settings: RefineSettings, reporter: Reporter, predictor: BoxPredictor, selection: Selection,
                ledger: Ledger, uploader: _Uploader, frames: FramePrefetcher[LocationImage]) -> list[str]:
    """Refine every location; returns descriptions of locations that failed.

    Frames come from ``frames`` (fetched ahead within its byte budget), and refined annotations are
    uploaded in chunks of :data:`UPLOAD_CHUNK` as they accumulate. After an upload failure no
    further location is processed (its originals are kept).
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
        try:
            image = frames.take(location)
        except NimbusAPIError as exc:
            failed.append(f"{location.describe()}: {exc}")
            for original in originals:
                ledger.keep(original.id, location, "its image could not be read")
            done += len(originals)
            continue
        for original in originals:
            ledger.tags[original.id] = original.tags
        base = done
        outcomes = refine_location(predictor, image, originals, options,
                                   on_progress=lambda n, b=base, w=where: span.update((b + n) / total, w))
        del image
        ledger.record(location, outcomes)
        done += len(originals)
        uploader.flush(at_least=UPLOAD_CHUNK)
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
