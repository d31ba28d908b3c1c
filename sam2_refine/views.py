"""The dataset view a job takes its layer settings from (contract section 6).

A NimbusImage dataset view (``dataset_view``) ties a dataset to a configuration (``upenn_collection``,
whose ``meta.layers`` are the layers) and carries the user's own contrast per layer
(``layerContrasts``). :class:`ViewLayers` is what the client reads of it; the override itself is
applied by :func:`sam2_refine.imaging.parse_layers`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ViewLayers:
    """The layer settings of one dataset view.

    Attributes:
        layers: The configuration's ``meta.layers``; None when the dataset has no view or the
            configuration has no layers (the job then uses default layers).
        layer_contrasts: The view's ``layerContrasts``: layer id -> ``{mode, blackPoint,
            whitePoint}``, the contrast the user set in this view; ``{}`` when it has none.
            As the server sent it (checked by ``parse_layers``).
        view_id: The view read, or None.
    """

    layers: list[dict[str, Any]] | None = None
    layer_contrasts: Any = field(default_factory=dict)
    view_id: str | None = None
