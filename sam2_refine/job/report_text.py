"""What a compute job tells the user, in words: the warnings at its end (originals kept, other
jobs' refinements, marks not trusted), why nothing was refined, why a step failed, and the
progress text within one location.

Every text names what happened, what was and was not changed, and what to do
(:mod:`sam2_refine.messages` builds the sentences); ids are listed up to :data:`LISTED_IDS`.
"""

from __future__ import annotations

from collections.abc import Callable

from sam2_refine.engine.location import STEP_DECODE, STEP_EMBED
from sam2_refine.job.batch_ranges import Batch, describe_positions
from sam2_refine.job.converge import ConvergeReport
from sam2_refine.job.kept import TagReport, kept_by_position, kept_text
from sam2_refine.job.replace import Ledger
from sam2_refine.job.selection import Selection
from sam2_refine.job.settings import RefineSettings
from sam2_refine.messages import Explained, cause_text, counted, request_text, sentences, server_failure
from sam2_refine.nimbus.errors import NimbusAPIError
from sam2_refine.nimbus.client import NimbusClient
from sam2_refine.nimbus.progress import ProgressSpan, Reporter


#: How many ids a warning lists before it says "and N more".
LISTED_IDS = 50


def ids_text(ids: list[str]) -> str:
    shown = ", ".join(ids[:LISTED_IDS])
    return shown + (f" and {len(ids) - LISTED_IDS} more" if len(ids) > LISTED_IDS else "")


def dataset_failure(exc: NimbusAPIError, client: NimbusClient, settings: RefineSettings) -> Explained:
    """Why the dataset could not be read, in words."""
    if exc.status is None and exc.transport is None and "holds no large image" in exc.detail:
        return Explained("The dataset holds no image.",
                         sentences(f"Dataset {settings.dataset_id} has no large image item, so there is nothing to "
                                   "look at", "Nothing was changed",
                                   "Open the dataset in NimbusImage to check that its image was imported, then run "
                                   "the tool again"))
    return server_failure(exc, "reading the dataset", api_url=client.api_url, dataset_id=settings.dataset_id)


def kinds_text(settings: RefineSettings, last: str) -> str:
    """``polygon``, ``polygon or rectangle``, ``polygon, rectangle and point``: the shapes refined."""
    kinds = ["polygon"] + (["rectangle"] if settings.refine_rectangles else []) + (
        ["point"] if settings.refine_points else [])
    return kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + f" {last} " + kinds[-1]


def batch_text(batch: Batch) -> str:
    return (f"XY {describe_positions(batch.xy)}, Z {describe_positions(batch.z)}, "
            f"Time {describe_positions(batch.time)}")


def nothing_to_refine(settings: RefineSettings, batch: Batch, selection: Selection, reporter: Reporter,
                       outside: int | None) -> None:
    """The job found nothing to refine: a warning saying why in the user's terms (the tags the
    batch does hold, with how many annotations carry each; or that the batch holds none), then
    the last progress line."""
    where = batch_text(batch)
    kinds = kinds_text(settings, "or")
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


def listed_text(settings: RefineSettings) -> str:
    kinds = ["Polygon"] + (["rectangle"] if settings.refine_rectangles else []) + (
        ["point"] if settings.refine_points else [])
    names = kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + " and " + kinds[-1]
    return f"{names} annotations of the dataset"


def report_converge_error(reporter: Reporter, ledger: Ledger, result: ConvergeReport, api_url: str) -> None:
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


def warn_converge(reporter: Reporter, ledger: Ledger, result: ConvergeReport) -> None:
    """What convergence found: other jobs' refinements, marks not to trust."""
    ledger.concurrent = sorted(result.concurrent)
    ledger.duplicates_removed = {o: list(ids) for o, ids in result.removed.items()}
    if result.concurrent:
        removed = sum(len(v) for v in result.removed.values())
        reporter.warning(f"{len(result.concurrent)} annotation(s) were refined at the same time by another job; "
                         "one refinement each was kept.",
                         (f"{removed} duplicate refinement(s) removed, their connections moved to the one kept. "
                          if removed else "") + ids_text(sorted(result.concurrent)),
                         title="Refined by another job")
    untrusted: dict[str, list[str]] = {}
    for u in result.unreadable:
        untrusted.setdefault(u.reason, []).append(u.id)
    if result.misplaced:
        untrusted["its sam2Refine mark names an original at another location"] = [r.id for r in result.misplaced]
    for reason, ids in sorted(untrusted.items()):
        reporter.warning(f"{len(ids)} annotation(s) carry a mark this worker does not trust: {reason}; "
                         "they were left alone.", ids_text(sorted(ids)), title="Marks not trusted")
    by_reason: dict[str, list[str]] = {}
    for _, reason, ids in result.left_alone:
        by_reason.setdefault(reason, []).extend(ids)
    for reason, ids in sorted(by_reason.items()):
        reporter.warning(f"{len(ids)} refinement(s) share an original, but {reason}; none was removed.",
                         ids_text(sorted(ids)), title="Marks not trusted")
    ledger.not_trusted = sorted({u.id for u in result.unreadable} | {r.id for r in result.misplaced}
                                | {i for _, _, ids in result.left_alone for i in ids})


def warn_kept(reporter: Reporter, ledger: Ledger, sizes: tuple[int, int, int], tagging: TagReport | None,
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


#: The shares of a location's progress: embedding its image (or regions), decoding its objects'
#: prompts, tracing their outlines (on a CPU the embedding takes most of a small location's time).
EMBED_SHARE, DECODE_SHARE, TRACE_SHARE = 0.3, 0.45, 0.25


def location_steps(span: ProgressSpan, before: int, count: int, total: int, where: str,
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
