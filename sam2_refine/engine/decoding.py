"""The model's side of a location: prompts decoded in chunks on the calling thread, their objects
found in the outline pool while the next chunk is decoded, windows that outgrow their logits
decoded again while the region's embedding is current; and :class:`LocationWork`, the state the
stages of one location hand each other.

Windows are frame pixels (top, left, bottom, right); grids are the model's logit cells.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Protocol

import cv2
import numpy as np

from sam2_refine.annotations import Kept, Outcome
from sam2_refine.engine.geometry import Window
from sam2_refine.engine.objects import (
    LargerWindow,
    MaskJob,
    MaskResult,
    ObjectMask,
    box_limits,
    chooser,
    decode_window,
    find_objects,
    first_margin,
)
from sam2_refine.engine.options import BEST_OF_THREE, BOX_AND_SHAPE, GeometryOptions
from sam2_refine.engine.outline_pool import OutlinePool
from sam2_refine.engine.outlines import EarlyTraces
from sam2_refine.engine.prompts import Prompt, shape_logits, shape_on_grid
from sam2_refine.model.logits import GridPatch, grid_window
from sam2_refine.model.predictor import BoxPredictor, Decoded


#: At most this many other points are given as negative points with one point prompt.
MAX_NEGATIVES = 8


#: Windowed decoding asks for each box prompt's logits in the window of this multiple of its
#: first margin, so that the first two growths of the window (margin x 2, x 4) need no second
#: decoding (a few cells more per prompt; a second decoding costs a whole transformer pass).
GROWTH_PAID = 4.0


def _choose_mask(decoded: Decoded, k: int, reference: np.ndarray | None) -> int:
    """Which of prompt ``k``'s C masks to use: the one overlapping ``reference`` (bool, the whole
    grid) most (ties: the model's score), or the best-scored when there is no reference.

    The overlap is the IoU on the grid; with windowed logits the intersection is counted in the
    window (which holds the whole reference) and each mask's area comes from the whole grid
    (``Decoded.areas``), so the choice is the same as over whole-grid logits."""
    scores = decoded.scores[k]
    if reference is None or scores.shape[0] == 1:
        return int(np.argmax(scores))
    inter = np.zeros(scores.shape[0], dtype=np.int64)
    for c in range(scores.shape[0]):
        patch = decoded.mask(k, c)
        rows, cols = patch.values.shape
        inside = reference[patch.top:patch.top + rows, patch.left:patch.left + cols]
        if np.count_nonzero(inside) != np.count_nonzero(reference):
            raise ValueError("the decoded window does not hold the whole reference")
        inter[c] = np.count_nonzero((patch.values > 0) & inside)
    union = decoded.positive_areas(k) + np.count_nonzero(reference) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return int(np.lexsort((scores, iou))[-1])


def _regrid(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """A bool grid resampled (nearest) to another grid size over the same region."""
    if mask.shape == tuple(hw):
        return mask
    return cv2.resize(mask.astype(np.uint8), (int(hw[1]), int(hw[0])), interpolation=cv2.INTER_NEAREST) > 0


# -- the location -------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One of a point's masks: its object mask (None when unusable, with the reason) and score."""

    mask: ObjectMask | None
    score: float
    reason: str = ""
    others: int = 0  # other points of the group inside the mask


class LocationWork:
    """What one location's stages hand each other: object masks, points' candidates, outcomes."""

    def __init__(self, prompts: Sequence[Prompt], height: int, width: int) -> None:
        self.height, self.width = height, width
        self.masks: dict[str, ObjectMask] = {}
        self.scores: dict[str, float] = {}
        self.candidates: dict[str, list[Candidate]] = {}
        self.outcomes: dict[str, Outcome] = {}
        self.early: EarlyTraces | None = None  # outlines traced ahead (with a pool)
        # the location's points by group, sorted by x, for finding the points inside a mask
        self._points: dict[Hashable, tuple[np.ndarray, np.ndarray, list[str]]] = {}
        by_group: dict[Hashable, list[Prompt]] = defaultdict(list)
        for prompt in prompts:
            if prompt.point is not None:
                by_group[prompt.group].append(prompt)
        for group, members in by_group.items():
            members.sort(key=lambda p: p.pixel[1])
            pixels = np.array([p.pixel for p in members], dtype=np.int64).reshape(-1, 2)
            self._points[group] = (pixels[:, 1].copy(), pixels, [p.original.id for p in members])

    @property
    def frame_hw(self) -> tuple[int, int]:
        return self.height, self.width

    def keep(self, original_id: str, reason: str) -> None:
        self.outcomes[original_id] = Kept(original_id, reason)
        self.masks.pop(original_id, None)

    def points_inside(self, prompt: Prompt, mask: ObjectMask) -> list[tuple[str, tuple[int, int]]]:
        """Other points of ``prompt``'s group whose pixel lies in ``mask``'s component:
        (id, (row, col)), nearest first."""
        cols, pixels, ids = self._points.get(prompt.group, (np.zeros(0, np.int64), np.zeros((0, 2)), []))
        win = mask.window
        found = []
        first, stop = np.searchsorted(cols, [win.left, win.right])
        for k in range(int(first), int(stop)):
            row, col = int(pixels[k, 0]), int(pixels[k, 1])
            if ids[k] != prompt.original.id and win.top <= row < win.bottom \
                    and mask.component[row - win.top, col - win.left]:
                found.append((ids[k], (row, col)))
        own_row, own_col = prompt.pixel
        return sorted(found, key=lambda f: (f[1][0] - own_row) ** 2 + (f[1][1] - own_col) ** 2)


def _cut(patch: GridPatch, window: Window, region: Window) -> GridPatch:
    """The cells of ``patch`` (which holds them) that upsampling ``window`` (frame pixels inside
    ``region``) reads, copied: what a windowed decoder would have returned for it."""
    rows = (window.top - region.top, window.bottom - region.top)
    cols = (window.left - region.left, window.right - region.left)
    top, left, bottom, right = grid_window(patch.grid_hw, (region.height, region.width), rows, cols)
    values = patch.values[top - patch.top:bottom - patch.top, left - patch.left:right - patch.left].copy()
    return GridPatch(values, top, left, patch.grid_hw)


class BoxChunk:
    """Box prompts of one chunk (polygons, rectangles) -> their object masks.

    Decoded here, on the model's thread, when made; :meth:`start` and :meth:`take` turn the
    answers into :class:`~sam2_refine.engine.objects.MaskJob` rounds for
    :func:`~sam2_refine.engine.objects.find_objects`. A predictor with a fixed
    ``logit_grid`` is asked only for each prompt's window of logits; a prompt whose mask
    outgrows it is decoded again for the larger window (all such prompts of the chunk and round
    in one call, in the chunk's order), as often as needed, keeping the mask chosen first.
    Whole-grid answers are cut to the same windows (the pool gets only those cells) and a larger
    window is cut again from them, without a model call.
    """

    def __init__(self, predictor: BoxPredictor, chunk: Sequence[Prompt], win: Window, options: GeometryOptions,
                 work: LocationWork) -> None:
        self.predictor, self.chunk, self.win, self.work = predictor, chunk, win, work
        grid_hw = getattr(predictor, "logit_grid", None)
        offset = np.array([win.left, win.top, win.left, win.top], dtype=np.float64)
        self.boxes = np.stack([p.box for p in chunk]) - offset
        references = None
        if options.prompt in (BOX_AND_SHAPE, BEST_OF_THREE):
            references = [shape_on_grid(p.original.shape, win, predictor.mask_input_size) for p in chunk]
        self.mask_inputs = (np.stack([shape_logits(r) for r in references])[:, None]
                            if options.prompt == BOX_AND_SHAPE and references is not None else None)
        self.multimask = options.prompt == BEST_OF_THREE
        best3 = self.multimask and references is not None
        if grid_hw is not None:
            refs = [_regrid(r, grid_hw) for r in references] if best3 and references else None
            margins = [first_margin(p.box, win, grid_hw) for p in chunk]
            windows = [decode_window(p.box, GROWTH_PAID * m, win, grid_hw, refs[k] if refs else None)
                       for k, (p, m) in enumerate(zip(chunk, margins, strict=True))]
            decoded = predictor.decode(self.boxes, self.mask_inputs, multimask=self.multimask,
                                       windows=_relative(windows, win), areas=best3)
        else:
            decoded = predictor.decode(self.boxes, self.mask_inputs, multimask=self.multimask)
        self.decoded: Decoded | None = decoded
        self.todo: list[tuple[int, int]] = []  # (index in chunk, mask index) of the jobs in flight
        for k in range(len(chunk)):
            reference = _regrid(references[k], decoded.grid_size) if best3 and references is not None else None
            best = _choose_mask(decoded, k, reference)
            work.scores[chunk[k].original.id] = float(decoded.scores[k, best])
            self.todo.append((k, best))

    def _job(self, k: int, patch: GridPatch, margin: float | None) -> MaskJob:
        prompt = self.chunk[k]
        return MaskJob(patch, prompt.box, None, chooser(prompt), *box_limits(prompt), margin=margin)

    def start(self) -> list[MaskJob]:
        """The first round: each prompt's chosen mask in its first window."""
        assert self.decoded is not None
        jobs = []
        for k, best in self.todo:
            patch = self.decoded.mask(k, best)
            if self.decoded.windows is None:
                box = self.chunk[k].box
                margin = first_margin(box, self.win, patch.grid_hw)
                patch = _cut(patch, decode_window(box, GROWTH_PAID * margin, self.win, patch.grid_hw), self.win)
            jobs.append(self._job(k, patch, None))
        return jobs

    def take(self, results: Sequence[MaskResult]) -> list[MaskJob]:
        """Record a round's results; the next round's jobs (larger windows), or none."""
        again, found = [], []
        for (k, best), result in zip(self.todo, results, strict=True):
            original_id = self.chunk[k].original.id
            if isinstance(result, str):
                self.work.keep(original_id, result)
            elif isinstance(result, LargerWindow):
                again.append((k, best, result))
            else:
                self.work.masks[original_id] = result
                found.append((self.chunk[k], result))
        if found and self.work.early is not None:
            self.work.early.offer(found)
        self.todo = [(k, best) for k, best, _ in again]
        decoded = self.decoded
        if not again or decoded is None:
            self.decoded = None
            return []
        if decoded.windows is None:  # the whole grid is at hand: cut the larger windows from it
            patches = [_cut(decoded.mask(k, best), grow.window, self.win) for k, best, grow in again]
        else:  # the same prompts, decoded again for their larger windows
            idx = [k for k, _, _ in again]
            inputs = None if self.mask_inputs is None else self.mask_inputs[idx]
            redecoded = self.predictor.decode(self.boxes[idx], inputs, multimask=self.multimask,
                                              windows=_relative([g.window for _, _, g in again], self.win))
            patches = [redecoded.mask(i, best) for i, (_, best, _) in enumerate(again)]
        return [self._job(k, patch, grow.margin) for (k, _, grow), patch in zip(again, patches, strict=True)]


def _relative(windows: Sequence[Window], region: Window) -> np.ndarray:
    """Frame windows as int (N, 4) (top, left, bottom, right) pixels of the region."""
    return np.array([[w.top - region.top, w.left - region.left, w.bottom - region.top,
                      w.right - region.left] for w in windows], dtype=np.int64).reshape(-1, 4)


class PointChunk:
    """Point prompts of one chunk -> three candidate object masks each (:meth:`start`,
    :meth:`take`, as :class:`BoxChunk`). The pool gets each mask's logits around the point's
    planning box (the whole grid where a mask turns out to need more); then, with negative
    points on, points whose candidates hold other points of their group are decoded a second
    time with those as negative points (grouped by their number, so that no padding point is
    added), their candidates found at once."""

    def __init__(self, predictor: BoxPredictor, chunk: Sequence[Prompt], win: Window, options: GeometryOptions,
                 work: LocationWork, pool: OutlinePool, decoded: Decoded | None = None) -> None:
        self.predictor, self.chunk, self.win, self.options, self.work, self.pool = (
            predictor, chunk, win, options, work, pool)
        self.origin = np.array([win.left, win.top], dtype=np.float64)
        if decoded is None:
            points = np.stack([p.point for p in chunk])[:, None] - self.origin
            decoded = predictor.decode(None, multimask=True, points=points,
                                       point_labels=np.ones((len(chunk), 1), np.int64))
        self.decoded: Decoded | None = decoded
        self.results: dict[tuple[int, int], MaskResult] = {}
        self.todo: list[tuple[int, int]] = []

    def _job(self, k: int, patch: GridPatch) -> MaskJob:
        prompt = self.chunk[k]
        return MaskJob(patch, None, prompt.point, chooser(prompt))

    def _first(self, decoded: Decoded, ks: Sequence[int]) -> list[MaskJob]:
        if decoded.windows is not None:
            raise ValueError("point prompts are decoded over the whole grid")
        self.todo = [(k, c) for k in ks for c in range(decoded.scores.shape[1])]
        jobs = []
        for k, c in self.todo:
            patch = decoded.mask(k, c)
            box = self.chunk[k].box  # the point's planning box
            margin = first_margin(box, self.win, patch.grid_hw)
            jobs.append(self._job(k, _cut(patch, decode_window(box, GROWTH_PAID * margin, self.win, patch.grid_hw),
                                          self.win)))
        return jobs

    def start(self) -> list[MaskJob]:
        assert self.decoded is not None
        return self._first(self.decoded, range(len(self.chunk)))

    def take(self, results: Sequence[MaskResult]) -> list[MaskJob]:
        decoded = self.decoded
        assert decoded is not None
        again = []
        for key, result in zip(self.todo, results, strict=True):
            if isinstance(result, LargerWindow):
                again.append(key)
            else:
                self.results[key] = result
        if again:  # the whole grid of those masks
            self.todo = again
            return [self._job(k, decoded.mask(k, c)) for k, c in again]
        for k in sorted({k for k, _ in self.results}):
            self.work.candidates[self.chunk[k].original.id] = self._candidates(decoded, k)
        self.results, self.decoded = {}, None
        if self.options.negative_points:
            self._negative_points()
        return []

    def _candidates(self, decoded: Decoded, k: int) -> list[Candidate]:
        prompt = self.chunk[k]
        out = []
        for c in range(decoded.scores.shape[1]):
            result, score = self.results[(k, c)], float(decoded.scores[k, c])
            if isinstance(result, str):
                out.append(Candidate(None, score, result))
            else:
                assert isinstance(result, ObjectMask)
                out.append(Candidate(result, score, others=len(self.work.points_inside(prompt, result))))
        return out

    def _negative_points(self) -> None:
        work = self.work
        again: dict[int, list[tuple[int, np.ndarray]]] = defaultdict(list)
        for k, prompt in enumerate(self.chunk):
            inside: dict[str, tuple[int, int]] = {}
            for candidate in work.candidates[prompt.original.id]:
                if candidate.mask is not None:
                    inside.update(work.points_inside(prompt, candidate.mask))
            if inside:
                negatives = sorted(inside.values(), key=lambda rc: (rc[0] - prompt.pixel[0]) ** 2
                                   + (rc[1] - prompt.pixel[1]) ** 2)[:MAX_NEGATIVES]
                xy = np.array([[c, r] for r, c in negatives], dtype=np.float64) - self.origin
                again[len(xy)].append((k, xy))
        step = max(1, self.predictor.max_batch)
        for count, items in sorted(again.items()):
            for start in range(0, len(items), step):
                part = items[start:start + step]
                pts = np.stack([np.vstack([self.chunk[k].point - self.origin, xy]) for k, xy in part])
                labels = np.zeros((len(part), count + 1), np.int64)
                labels[:, 0] = 1
                redecoded = self.predictor.decode(None, multimask=True, points=pts, point_labels=labels)
                sub = PointChunk(self.predictor, [self.chunk[k] for k, _ in part], self.win,
                                  replace(self.options, negative_points=False), work, self.pool, redecoded)
                jobs = sub.start()
                while jobs:  # found at once: negative points are for measuring, not overlapped
                    jobs = sub.take(self.pool.submit(find_objects, jobs, self.win, work.frame_hw).result())


class Chunk(Protocol):
    def start(self) -> list[MaskJob]: ...

    def take(self, results: Sequence[MaskResult]) -> list[MaskJob]: ...


class ObjectMasks:
    """Stage 1 of one region: chunks decoded on this thread, their objects found by the pool
    while the next chunks are decoded; what a chunk's round gives back (larger windows) is
    decoded again here, while the region's embedding is current (:meth:`finish` before the
    next region is embedded). At most ``pool.max_in_flight`` chunks wait for the pool, so
    decoded batches do not pile up."""

    def __init__(self, pool: OutlinePool, win: Window, frame_hw: tuple[int, int]) -> None:
        self.pool, self.win, self.frame_hw = pool, win, frame_hw
        self.pending: deque[tuple[Chunk, Future[list[MaskResult]]]] = deque()

    def add(self, chunk: Chunk) -> None:
        """Hand a decoded chunk to the pool; collect the chunks that are done."""
        while len(self.pending) >= self.pool.max_in_flight:
            self._collect_first()
        self._submit(chunk, chunk.start())
        while self.pending and self.pending[0][1].done():
            self._collect_first()

    def finish(self) -> None:
        """Wait for every chunk of the region to be done."""
        while self.pending:
            self._collect_first()

    def _submit(self, chunk: Chunk, jobs: list[MaskJob]) -> None:
        if jobs:
            self.pending.append((chunk, self.pool.submit(find_objects, jobs, self.win, self.frame_hw)))

    def _collect_first(self) -> None:
        chunk, future = self.pending.popleft()
        self._submit(chunk, chunk.take(future.result()))
