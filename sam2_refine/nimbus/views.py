"""The dataset view a job takes its layer settings from (docs/nimbus-contract.md §6).

A NimbusImage dataset view (``dataset_view``) ties a dataset to a configuration (``upenn_collection``,
whose ``meta.layers`` are the layers and ``meta.tools`` the tools) and carries one user's own
contrast per layer (``layerContrasts``). One dataset can have several views: one per user who
opened it (a view belongs to the user who made it) and per configuration it is in.

The job is not told which view the user launched it from (the compute parameters name the
dataset and the tool, not the view), so :func:`choose_view` picks the view the user most
likely has on screen: among the views of the dataset, the user's own first, then the others
they can read, each group most recently opened first (``lastViewed``, which the app sets when
a view is opened); the first of these whose configuration holds the tool that launched the job,
else the first. The override itself is applied by :func:`sam2_refine.engine.imaging.parse_layers`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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


def rank_views(own: Any, readable: Any) -> list[Mapping[str, Any]]:
    """The dataset's views, the likeliest to be on the user's screen first.

    Args:
        own: The views the user owns (``GET dataset_view?currentUserOnly=true``), as sent.
        readable: Every view the user can read (``GET dataset_view``), as sent.

    Returns:
        The user's own views, then the other readable ones, each group by ``lastViewed``
        (epoch milliseconds), latest first; views never opened (no number) after them, in the
        order the server sent them. Each view once (by ``_id``); entries that are not objects
        are dropped.
    """
    def opened(view: Mapping[str, Any]) -> float:
        value = view.get("lastViewed")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("-inf")

    ranked: list[Mapping[str, Any]] = []
    seen: set[Any] = set()
    for group in (own, readable):
        views = [v for v in (group if isinstance(group, list) else []) if isinstance(v, Mapping)]
        for view in sorted(views, key=opened, reverse=True):  # stable: ties keep the server's order
            key = view.get("_id")
            if key is not None and key in seen:
                continue
            seen.add(key)
            ranked.append(view)
    return ranked


def holds_tool(configuration: Any, tool_id: str) -> bool:
    """Whether a configuration (``upenn_collection`` document) has the tool ``tool_id`` in its
    ``meta.tools``."""
    meta = configuration.get("meta") if isinstance(configuration, Mapping) else None
    tools = meta.get("tools") if isinstance(meta, Mapping) else None
    return isinstance(tools, list) and any(isinstance(t, Mapping) and t.get("id") == tool_id for t in tools)


def choose_view(ranked: Sequence[Mapping[str, Any]], configuration_of: Callable[[str], Any],
                tool_id: str | None) -> ViewLayers:
    """The layer settings of the view the job uses (see the module docstring).

    Args:
        ranked: The candidate views, from :func:`rank_views`.
        configuration_of: configuration id -> its ``upenn_collection`` document (asked at most
            once per id, only while needed).
        tool_id: The id of the tool that launched the job (compute parameter ``id``), or None.

    Returns:
        The chosen view's layers and contrasts; empty :class:`ViewLayers` when there is no view.
    """
    fetched: dict[str, Any] = {}

    def configuration(view: Mapping[str, Any]) -> Any:
        config_id = view.get("configurationId")
        if not isinstance(config_id, str) or not config_id:
            return None
        if config_id not in fetched:
            fetched[config_id] = configuration_of(config_id)
        return fetched[config_id]

    if not ranked:
        return ViewLayers()
    chosen = ranked[0]
    if tool_id:
        chosen = next((view for view in ranked if holds_tool(configuration(view), tool_id)), chosen)
    return _view_layers(chosen, configuration(chosen))


def _view_layers(view: Mapping[str, Any], configuration: Any) -> ViewLayers:
    contrasts = view.get("layerContrasts")
    meta = configuration.get("meta") if isinstance(configuration, Mapping) else None
    layers = meta.get("layers") if isinstance(meta, Mapping) else None
    view_id = view.get("_id")
    return ViewLayers(list(layers) if layers else None, {} if contrasts is None else contrasts,
                      view_id if isinstance(view_id, str) else None)
