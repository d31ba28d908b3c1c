"""Loading SAM2 for a job, one visible step at a time.

Importing torch and sam2 takes seconds on a cold start, so each import is a step the progress bar
names before it starts; torch is therefore imported here inside the function, never at module
level (``--request interface`` and the settings parser import this module's callers without
loading torch).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sam2_refine.model.predictor import BoxPredictor


def load_sam2(checkpoint: Path, on_step: Callable[[str], None] | None = None) -> tuple[BoxPredictor, bool]:
    """(the SAM2 predictor of ``checkpoint``, whether its weights are the untrained marker's), each
    step told to ``on_step`` as it starts."""
    step = on_step or (lambda text: None)
    step("importing PyTorch")
    import torch  # noqa: F401 - imported here, as a step of its own

    step("importing SAM2")
    import sam2.build_sam  # noqa: F401 - Hydra and the model zoo

    from sam2_refine.model.sam2_model import Sam2BoxPredictor

    return Sam2BoxPredictor.load(checkpoint, on_step=step)
