"""The engine at one location: embed each region once, prompt with every annotation, one polygon each.

For each original annotation the outcome is either :class:`~sam2_refine.annotations.Refined` (a
clean polygon) or :class:`~sam2_refine.annotations.Kept` (with the reason it was not refined).
Nothing here talks to the server.

The frame is embedded whole or in object crops (:mod:`sam2_refine.engine.regions`). Polygons and
rectangles prompt with their box (optionally with the original outline as mask logits, or asking
for three masks and keeping the one that agrees best with the original). Points prompt with the
point and ask for three masks; which one is kept is decided once the whole location is decoded
(:mod:`sam2_refine.engine.point_choice`): the best-scored mask of a size plausible for the point's
tags, among those that hold no other point of the same tags. A location is refined in stages:

1. **Object masks** (per region, while its embedding is current): each mask's low-resolution
   logits are upsampled only in a window around the object
   (:func:`sam2_refine.model.logits.upsample_window`) and the component that matches the original
   is chosen (:func:`~sam2_refine.engine.objects.object_mask`): first the prompt box plus a
   margin; if the chosen component reaches a window edge, the window grows until it does not (or
   the mask is rejected as far larger than the original). The result is kept cropped to the component's bounding box.
   A predictor with a fixed ``logit_grid`` is asked for box prompts' logits only in such a
   window (for :data:`~sam2_refine.engine.decoding.GROWTH_PAID` x the first margin);
   :func:`~sam2_refine.engine.objects.object_mask` is pure and answers
   :class:`~sam2_refine.engine.objects.LargerWindow` when a window outgrows the logits it has,
   and the chunk (:class:`~sam2_refine.engine.decoding.BoxChunk`) decodes those prompts again for
   it, on the calling thread.
2. **Points' choice** among their three candidates, by the expected area of their tag.
3. **Separation** (option): objects of the same tags whose windows meet give up the pixels
   their neighbours claim more strongly (:mod:`sam2_refine.engine.separation`).
4. **Tracing** (:func:`~sam2_refine.engine.outlines.trace`): the outline at the logits' sub-pixel
   zero crossing, simplified, padded, clipped to the frame; then the quality gate.

Memory therefore grows with the objects' size, not with N x frame size.

Where the work runs: the model (embedding, decoding, the decodings of larger windows) and
separation run on the calling thread; the per-object work of stages 1 and 4
(:func:`~sam2_refine.engine.objects.find_objects`, :func:`~sam2_refine.engine.outlines.trace_objects`:
pure functions of picklable arguments, a chunk of objects each) runs on an
:class:`~sam2_refine.engine.outline_pool.OutlinePool`: inline by default (the CPU job), on worker
processes on a GPU host, where box prompts' outlines are traced while the next batch is decoded
(:class:`~sam2_refine.engine.outlines.EarlyTraces`). The outcomes are the same either way
(``tests/test_outline_pool.py``).

The stages live in their own modules, in the order they import each other: options, prompts
(originals -> prompts) -> objects (stage 1, pure) -> outlines (stage 4, pure) -> decoding (the
model's thread and the location's work state) -> this module (regions, stages 1-4 in order,
stages 2 and 3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from shapely.geometry import Polygon

from sam2_refine.annotations import Kept, Original, Outcome, Refined
from sam2_refine.engine import outlines, point_choice
from sam2_refine.engine.decoding import BoxChunk, LocationWork, ObjectMasks, PointChunk
from sam2_refine.engine.geometry import fill_holes
from sam2_refine.engine.imaging import ArrayImage, LocationImage
from sam2_refine.engine.objects import ObjectMask, chooser, cropped
from sam2_refine.engine.options import GeometryOptions
from sam2_refine.engine.outline_pool import OutlinePool
from sam2_refine.engine.outlines import EarlyTraces, Traced, in_chunks, overlap
from sam2_refine.engine.prompts import Prompt, planning, prepare
from sam2_refine.engine.regions import plan_regions
from sam2_refine.engine.separation import Claim, keep_padded_apart, neighbour_pairs, separate
from sam2_refine.model.predictor import BoxPredictor


def _choose_points(prompts: Sequence[Prompt], options: GeometryOptions, work: LocationWork) -> None:
    """Stage 2: each point's candidate, by the two-pass rule (or the score), and its quality checks."""
    points = [p for p in prompts if p.point is not None and p.original.id in work.candidates]
    table = {p.original.id: (p.group, [c.mask.area if c.mask is not None else None
                                       for c in work.candidates[p.original.id]],
                             [c.score for c in work.candidates[p.original.id]]) for p in points}
    others = ({p.original.id: [c.others for c in work.candidates[p.original.id]] for p in points}
              if options.exclusive_points else None)
    chosen, expected = point_choice.choose_all(table, rule=options.point_choice, others=others)
    frame_area = float(work.height * work.width)
    for prompt in points:
        pid = prompt.original.id
        candidates = work.candidates.pop(pid)
        index = chosen[pid]
        if index is None:
            best = max(range(len(candidates)), key=lambda c: candidates[c].score)
            work.keep(pid, candidates[best].reason or "no usable mask")
            continue
        candidate = candidates[index]
        assert candidate.mask is not None
        problem = point_choice.area_problem(candidate.mask.area, expected.get(prompt.group), frame_area)
        if problem is not None:
            work.keep(pid, problem)
            continue
        work.masks[pid] = candidate.mask
        work.scores[pid] = candidate.score


_NO_FIELD = np.zeros((0, 0), dtype=np.float32)  # a claim's field where only its window is looked at


def _claim_field(mask: ObjectMask) -> np.ndarray:
    magnitude = np.maximum(np.abs(mask.logits), np.float32(1e-3))
    return np.where(fill_holes(mask.component), magnitude, -magnitude).astype(np.float32)


def _separate(prompts: Sequence[Prompt], work: LocationWork) -> None:
    """Stage 3: touching objects of one group give up the pixels their neighbours win."""
    members = [p for p in prompts if p.original.id in work.masks]
    if len(members) < 2:
        return
    # only objects whose windows meet a neighbour's can lose pixels: their claim fields alone are made
    windows = [Claim(work.masks[p.original.id].window, _NO_FIELD, (0.0, 0.0), p.group) for p in members]
    members = [members[k] for k in sorted({k for pair in neighbour_pairs(windows) for k in pair})]
    claims = []
    for prompt in members:
        mask = work.masks[prompt.original.id]
        anchor = prompt.original.shape.centroid
        claims.append(Claim(mask.window, _claim_field(mask), (float(anchor.x), float(anchor.y)), prompt.group))
    for prompt, claim, field in zip(members, claims, separate(claims), strict=True):
        if field is claim.field:
            continue
        component = chooser(prompt)(field > 0, claim.window)
        if component is None or not component.any():
            work.keep(prompt.original.id, "its mask lies within masks of touching objects that the model is "
                                          "surer of (Keep touching objects apart)")
            continue
        work.masks[prompt.original.id] = cropped(claim.window, field, component, int(np.count_nonzero(component)))


def _trace_all(prompts: Sequence[Prompt], options: GeometryOptions, work: LocationWork, pool: OutlinePool,
               on_traced: Callable[[int, int], None] | None = None) -> None:
    """Stage 4: polygons (in the pool, :func:`~sam2_refine.engine.outlines.trace_objects`) and the quality gate. With
    separation and a positive Padding, the outlines are traced unpadded first, then padded
    without growing into each other (:func:`sam2_refine.engine.separation.keep_padded_apart`, here:
    it needs them all)."""
    gate = f"its overlap with the original is below the minimum ({options.min_overlap:g})"
    traced = [p for p in prompts if p.original.id in work.masks]
    apart = options.pad_apart
    gated = options.min_overlap > 0
    masks = [work.masks.pop(p.original.id) for p in traced]
    early = work.early.results() if work.early is not None else {}
    results: list[Traced | str | None] = [None] * len(traced)
    for k, prompt in enumerate(traced):  # outlines traced ahead, of masks separation left as they were
        ahead = early.get(prompt.original.id)
        if ahead is not None and ahead[0] is masks[k]:
            results[k] = ahead[1]
    todo = [k for k, result in enumerate(results) if result is None]
    shapes = [traced[k].original.shape if gated and not apart and traced[k].point is None else None for k in todo]
    early_done = len(traced) - len(todo)
    if on_traced is not None:  # (issue 23: progress as outlines are traced)
        on_traced(early_done, len(traced))
    on_done = None if on_traced is None else (lambda n: on_traced(early_done + n, len(traced)))
    for k, result in zip(todo, in_chunks(pool, outlines.trace_objects, [masks[k] for k in todo], shapes, options,
                                          work.frame_hw, apart, on_done=on_done), strict=True):
        results[k] = result
    del masks, early
    polygons: list[Polygon | None] = []
    cores: list[Polygon | None] = []
    for prompt, result in zip(traced, results, strict=True):
        if isinstance(result, str):
            work.outcomes[prompt.original.id] = Kept(prompt.original.id, result)
            cores.append(None)
            polygons.append(None)
        else:
            assert result is not None
            cores.append(result.core)
            polygons.append(result.polygon)
    if apart:
        polygons = keep_padded_apart(polygons, cores, [p.group for p in traced])
        for prompt, core, polygon in zip(traced, cores, polygons, strict=True):
            if core is not None and polygon is None:
                work.outcomes[prompt.original.id] = Kept(prompt.original.id, "nothing is left of the padded "
                                                         "shape beside its neighbours")
    for prompt, polygon, result in zip(traced, polygons, results, strict=True):
        pid = prompt.original.id
        if polygon is None:
            continue
        if prompt.point is None and gated:
            value = result.overlap if not apart and isinstance(result, Traced) else None
            if (overlap(polygon, prompt.original.shape) if value is None else value) < options.min_overlap:
                work.outcomes[pid] = Kept(pid, gate)
                continue
        work.outcomes[pid] = Refined(pid, polygon, work.scores[pid])


#: The steps of a location that :func:`refine_location` reports to ``on_step(step, done, total)``:
#: a region embedded (``done`` of ``total`` regions, called before it), prompts decoded (originals
#: done of the location's), outlines traced (of those that had a mask).
STEP_EMBED, STEP_DECODE, STEP_TRACE = "embedding", "decoding", "tracing"


def refine_location(
    predictor: BoxPredictor,
    image: np.ndarray | LocationImage | ArrayImage,
    originals: Sequence[Original],
    options: GeometryOptions,
    on_progress: Callable[[int], None] | None = None,
    pool: OutlinePool | None = None,
    on_step: Callable[[str, int, int], None] | None = None,
) -> list[Outcome]:
    """Refine every original of one location (see the module docstring for the stages).

    The frame is split into regions (:func:`sam2_refine.engine.regions.plan_regions`); each region is
    embedded once and its prompts are decoded in batches of at most ``predictor.max_batch``
    (box prompts and point prompts in separate batches).

    Args:
        predictor: The model (its embedding is replaced).
        image: The merged frame: float32 (H, W, 3) RGB in [0, 1], or a
            :class:`~sam2_refine.engine.imaging.LocationImage` that merges only the windows embedded.
        originals: Annotations at this location.
        options: Resolution, prompt, smoothing, padding, quality gate, separation, points.
        on_progress: Called with the number of originals decoded so far (after each batch).
        pool: Where the outline work runs (:mod:`sam2_refine.engine.outline_pool`); default: on this
            thread. The outlines are the same either way.
        on_step: Called as ``on_step(step, done, total)`` at each step (:data:`STEP_EMBED`,
            :data:`STEP_DECODE`, :data:`STEP_TRACE`), for a progress bar that moves within a
            location.

    Returns:
        One outcome per original, in the order given.
    """
    pool = pool if pool is not None else OutlinePool(0)
    source = ArrayImage(image) if isinstance(image, np.ndarray) else image
    height, width = source.height, source.width
    prompts, kept = prepare(originals, width, height, options.group_tags)
    work = LocationWork(prompts, height, width)
    if not pool.inline:
        work.early = EarlyTraces(pool, options, work.frame_hw)
    work.outcomes.update({k.original_id: k for k in kept})
    done = len(kept)
    mode, boxes = planning(prompts, height, width, options.resolution)
    tell = on_step or (lambda name, done, total: None)
    regions = plan_regions(boxes, height, width, mode) if prompts else []
    for number, region in enumerate(regions, start=1):
        tell(STEP_EMBED, number, len(regions))
        win = region.window
        size = getattr(predictor, "input_size", None)
        if size and (win.height > 2 * size or win.width > 2 * size):
            predictor.embed(source.window_shrunk(win.top, win.left, win.bottom, win.right, size),
                            region_hw=(win.height, win.width))
        else:
            predictor.embed(source.window(win.top, win.left, win.bottom, win.right))
        members = [prompts[i] for i in region.members]
        step = max(1, predictor.max_batch)
        stage = ObjectMasks(pool, win, work.frame_hw)
        boxes_here = [p for p in members if p.point is None]
        points_here = [p for p in members if p.point is not None]
        for kind_members, points in ((boxes_here, False), (points_here, True)):
            for start in range(0, len(kind_members), step):
                chunk = kind_members[start:start + step]
                stage.add(PointChunk(predictor, chunk, win, options, work, pool) if points
                          else BoxChunk(predictor, chunk, win, options, work))
                done += len(chunk)
                if on_progress is not None:
                    on_progress(done)
                tell(STEP_DECODE, done, len(originals))
        stage.finish()  # before the next region replaces the embedding
    _choose_points(prompts, options, work)
    if options.separate:
        _separate(prompts, work)
    _trace_all(prompts, options, work, pool, lambda done, total: tell(STEP_TRACE, done, total))
    return [work.outcomes[o.id] for o in originals]
