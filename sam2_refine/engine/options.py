"""How the engine prompts the model and turns masks into polygons: :class:`GeometryOptions` and
the names of its modes."""

from __future__ import annotations

from dataclasses import dataclass

#: Prompts of polygons and rectangles (the Prompt field's engine values: sam2_refine.fields.PROMPT_ITEMS).
BOX, BOX_AND_SHAPE, BEST_OF_THREE = "box", "box+shape", "best3"
#: Point mask choice (:mod:`sam2_refine.engine.point_choice`): plausible size then score (the rule),
#: BIIGLE's closest to the expected area, or the model's score alone (both for measuring).
BY_SIZE_AND_SCORE, BY_AREA, BY_SCORE = "both", "area", "score"


@dataclass(frozen=True)
class GeometryOptions:
    """How the engine prompts the model and turns masks into polygons.

    Attributes:
        smoothing: Simplification tolerance in pixels (0 = none).
        padding: Buffer distance in pixels (negative shrinks).
        resolution: ``"whole"`` frame, object ``"crops"``, or ``"auto"`` (see :mod:`sam2_refine.engine.regions`).
        prompt: For polygons and rectangles: ``"box"``; ``"box+shape"`` (the original outline
            also given as mask logits); ``"best3"`` (three masks per box, the one that overlaps
            the original most is kept). Points always prompt with the point and three masks.
        min_overlap: Quality gate: a refined shape whose IoU with its original (polygon or
            rectangle) is below this is not used (0 = off; points have no area to compare).
        separate: Keep touching objects apart (:mod:`sam2_refine.engine.separation`).
        point_choice: :data:`BY_SIZE_AND_SCORE` (the two-pass rule of
            :mod:`sam2_refine.engine.point_choice`), or, for measuring it, :data:`BY_AREA` (BIIGLE's
            second pass) or :data:`BY_SCORE` (the model's score alone).
        negative_points: Give the other points (same tags) that fall inside a point's candidate
            masks as negative points, in a second decoding of that point (off: measured worse
            than ``exclusive_points``, and half the points of a dense field decoded twice; kept
            for measuring real models).
        exclusive_points: Set aside a point's candidates that hold other points of its group
            (:func:`sam2_refine.engine.point_choice.without_merges`).
        group_tags: Objects are grouped by the ones of these tags they carry (all their tags
            when empty): points' expected areas and separation are per group.
    """

    smoothing: float = 0.7
    padding: float = 0.0
    resolution: str = "auto"
    prompt: str = BOX
    min_overlap: float = 0.0
    separate: bool = False
    point_choice: str = BY_SIZE_AND_SCORE
    negative_points: bool = False
    exclusive_points: bool = True
    group_tags: tuple[str, ...] = ()

    @property
    def pad_apart(self) -> bool:
        """Whether outlines are traced unpadded, then padded without growing into each other
        (separation with a positive Padding: :func:`sam2_refine.engine.separation.keep_padded_apart`)."""
        return self.separate and self.padding > 0
