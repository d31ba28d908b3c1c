"""A dataset view's own contrast (``layerContrasts``) is the contrast the model gets.

The rule followed is the app's (NimbusImage ``src/store/index.ts``, getter ``layers``): the
view's entry for a layer id replaces that layer's ``contrast`` as a whole; layers without an
entry keep their own; entries for unknown ids are ignored.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest

from conftest import TOKEN
from sam2_refine.job import compute as job
from sam2_refine.engine.imaging import Layer, LayerError, LocationImage, merge_layers, parse_layers, view_contrast
from sam2_refine.nimbus.errors import NimbusAPIError
from sam2_refine.nimbus.client import NimbusClient
from sam2_refine.nimbus.progress import Reporter
from sam2_refine.job.settings import parse_settings
from sam2_refine.testing.datasets import annotation_doc, cell_scene, rough_polygon
from sam2_refine.testing.stand_in import KnownMaskPredictor
from sam2_refine.nimbus.views import ViewLayers, choose_view, holds_tool, rank_views

H, W = 4, 101
WHITE = (1.0, 1.0, 1.0)


def layer_doc(layer_id: str, channel: int = 0, mode: str = "percentile", black: float = 0, white: float = 100,
              visible: bool = True) -> dict[str, Any]:
    return {"id": layer_id, "name": f"layer {layer_id}", "color": "#ffffff", "channel": channel,
            "visible": visible, "contrast": {"mode": mode, "blackPoint": black, "whitePoint": white}}


def contrast(mode: str, black: float, white: float) -> dict[str, Any]:
    return {"mode": mode, "blackPoint": black, "whitePoint": white}


def ramp(scale: float = 1.0) -> np.ndarray:
    """Every row is 0, 1, ..., 100 (times ``scale``): p % of the range is p * scale."""
    return np.tile(np.arange(W, dtype=np.float64) * scale, (H, 1)).astype(np.float32)


# -- the rule, as a pure function ---------------------------------------------------------------

@pytest.mark.parametrize("contrasts", [None, {}])
def test_no_override_keeps_the_layers_own_contrast(contrasts) -> None:
    raw = [layer_doc("a", mode="percentile", black=1, white=99)]
    assert parse_layers(raw, 1, contrasts) == parse_layers(raw, 1) == [
        Layer(0, WHITE, "percentile", 1.0, 99.0, "layer a")]


def test_override_replaces_the_layers_contrast() -> None:
    raw = [layer_doc("a", mode="percentile", black=1, white=99)]
    layers = parse_layers(raw, 1, {"a": contrast("absolute", 500, 3000)})
    assert layers == [Layer(0, WHITE, "absolute", 500.0, 3000.0, "layer a")]


def test_only_the_layers_the_view_names_are_overridden() -> None:
    raw = [layer_doc("a", channel=0, black=1, white=99), layer_doc("b", channel=1, black=2, white=98),
           layer_doc("c", channel=1, black=3, white=97)]
    layers = parse_layers(raw, 2, {"b": contrast("absolute", 10, 20)})
    assert [(layer.mode, layer.black, layer.white) for layer in layers] == [
        ("percentile", 1.0, 99.0), ("absolute", 10.0, 20.0), ("percentile", 3.0, 97.0)]


def test_an_override_for_a_layer_id_that_does_not_exist_is_ignored() -> None:
    raw = [layer_doc("a", black=1, white=99)]
    assert parse_layers(raw, 1, {"gone": contrast("absolute", 10, 20)}) == parse_layers(raw, 1)


def test_a_layer_without_an_id_keeps_its_own_contrast() -> None:
    spec = layer_doc("a", black=1, white=99)
    del spec["id"]
    assert view_contrast(spec, {"a": contrast("absolute", 10, 20)}) == spec["contrast"]


def test_a_null_entry_counts_as_absent() -> None:
    """The app tests the entry for truth (``contrast ? {...layer, contrast} : {...layer}``)."""
    raw = [layer_doc("a", black=1, white=99)]
    assert parse_layers(raw, 1, {"a": None}) == parse_layers(raw, 1)


def test_a_partial_override_replaces_the_whole_contrast_not_field_by_field() -> None:
    """``{...layer, contrast}``: the view's object stands alone; a field it lacks takes the
    default of its mode, never the layer's own value."""
    raw = [layer_doc("a", mode="percentile", black=7, white=93)]
    (layer,) = parse_layers(raw, 1, {"a": {"mode": "percentile", "whitePoint": 50}})
    assert (layer.mode, layer.black, layer.white) == ("percentile", 0.0, 50.0)
    (layer,) = parse_layers(raw, 1, {"a": {"blackPoint": 5, "whitePoint": 60}})
    assert (layer.mode, layer.black, layer.white) == ("percentile", 5.0, 60.0)


def test_an_absolute_override_without_its_points_is_an_error_naming_the_view() -> None:
    raw = [layer_doc("a", mode="absolute", black=10, white=20)]
    with pytest.raises(LayerError, match="layer a: the dataset view's contrast needs numeric"):
        parse_layers(raw, 1, {"a": {"mode": "absolute"}})


@pytest.mark.parametrize(("entry", "message"), [
    ("high", "the dataset view's contrast 'high' is not an object"),
    ({"mode": "gamma", "blackPoint": 0, "whitePoint": 1}, "the dataset view's contrast mode 'gamma'"),
])
def test_a_bad_override_says_it_comes_from_the_view(entry, message) -> None:
    with pytest.raises(LayerError, match=message):
        parse_layers([layer_doc("a")], 1, {"a": entry})


def test_view_contrasts_that_are_not_an_object_are_an_error() -> None:
    with pytest.raises(LayerError, match="contrast settings"):
        parse_layers([layer_doc("a")], 1, ["a"])


def test_an_override_on_a_hidden_layer_does_not_show_it() -> None:
    raw = [layer_doc("a", channel=0), layer_doc("b", channel=0, visible=False)]
    layers = parse_layers(raw, 1, {"b": contrast("absolute", 0, 1)})
    assert [layer.name for layer in layers] == ["layer a"]


def test_override_modes_percentile_against_absolute_on_the_merged_image() -> None:
    """Values 0, 2, ..., 200. The layer says 'percentile 0..100' (the whole range). The view's
    'absolute 20..60' is in raw units (value 40 -> 0.5); the view's 'percentile 20..60' is in
    percent of the frame's range (20 % .. 60 % of 0..200 = 40..120, so value 80 -> 0.5)."""
    plane = ramp(scale=2.0)
    raw = [layer_doc("a", mode="percentile", black=0, white=100)]
    value = np.arange(W) * 2.0
    own = merge_layers({0: plane}, parse_layers(raw, 1, {}))
    np.testing.assert_allclose(own[0, :, 0], value / 200.0, atol=1e-6)
    absolute = merge_layers({0: plane}, parse_layers(raw, 1, {"a": contrast("absolute", 20, 60)}))
    np.testing.assert_allclose(absolute[0, :, 0], np.clip((value - 20) / 40.0, 0, 1), atol=1e-6)
    percentile = merge_layers({0: plane}, parse_layers(raw, 1, {"a": contrast("percentile", 20, 60)}))
    np.testing.assert_allclose(percentile[0, :, 0], np.clip((value - 40) / 80.0, 0, 1), atol=1e-6)
    # And the other way round: a layer saved as absolute, shown by the view as percentile.
    raw_abs = [layer_doc("a", mode="absolute", black=0, white=1)]
    flipped = merge_layers({0: plane}, parse_layers(raw_abs, 1, {"a": contrast("percentile", 20, 60)}))
    np.testing.assert_array_equal(flipped, percentile)


# -- the test server stores it as the plugin does; the client reads it ------------------------

def test_server_stores_layer_contrasts_on_the_view_document(server, client) -> None:
    pixels = np.zeros((1, 1, 1, 1, 4, 4), np.uint16)
    layers = [layer_doc("a")]
    ds = server.add_dataset(pixels, layers=layers, layer_contrasts={"a": contrast("absolute", 3, 9)})
    (view,) = client._request("GET", "dataset_view", params={"datasetId": ds.dataset_id})
    assert view["layerContrasts"] == {"a": contrast("absolute", 3, 9)}
    assert view["lastLocation"] == {"xy": 0, "z": 0, "time": 0}
    assert view["configurationId"] == ds.collection_id and view["_id"] == ds.view_id
    plain = server.add_dataset(pixels, layers=layers)  # the schema requires the key: {} when none
    (view,) = client._request("GET", "dataset_view", params={"datasetId": plain.dataset_id})
    assert view["layerContrasts"] == {}
    with pytest.raises(ValueError, match="give layers too"):
        server.add_dataset(pixels, layer_contrasts={"a": contrast("absolute", 3, 9)})


def test_client_returns_the_views_contrasts_with_its_layers(server, client) -> None:
    pixels = np.zeros((1, 1, 1, 2, 4, 4), np.uint8)
    layers = [layer_doc("a", channel=1)]
    ds = server.add_dataset(pixels, layers=layers, layer_contrasts={"a": contrast("absolute", 3, 9)})
    assert client.get_layers(ds.dataset_id) == ViewLayers(layers, {"a": contrast("absolute", 3, 9)}, ds.view_id)
    assert client.get_layers(server.add_dataset(pixels).dataset_id) == ViewLayers(None, {}, None)


def test_a_view_document_without_layer_contrasts_reads_as_none(server, client) -> None:
    """Documents the schema did not check (older ones): the app reads a missing key as {}
    (src/store/GirderAPI.ts, asDatasetView)."""
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8), layers=[layer_doc("a")])
    del server.state.views[ds.view_id]["layerContrasts"]
    assert client.get_layers(ds.dataset_id).layer_contrasts == {}


# -- the job: the image the model receives follows the view ------------------------------------

class _Looking(KnownMaskPredictor):
    """Known masks; keeps every image it is given."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.images: list[np.ndarray] = []

    def embed(self, image: np.ndarray) -> None:
        self.images.append(np.array(image, copy=True))
        super().embed(image)


def _run(server, ckpt, layer_contrasts, channels: np.ndarray | None = None,
         layers: list[dict[str, Any]] | None = None) -> tuple[int, _Looking, np.ndarray, list[dict[str, Any]]]:
    """A job on one location of ``channels`` (C, 160, 224) (default: the scene's own) shown
    by ``layers`` (default: one white layer "nuclei", percentile 0.5..99.5, on channel 0)."""
    scene = cell_scene(160, 224, 6, radius=(9.0, 14.0), seed=3)
    channels = scene.channels if channels is None else channels
    layers = layers or [{"id": "nuclei", "name": "nuclei", "channel": 0, "color": "#ffffff", "visible": True,
                         "contrast": contrast("percentile", 0.5, 99.5)}]
    ds = server.add_dataset(channels[None, None, None], layers=layers, layer_contrasts=layer_contrasts)
    rng = np.random.default_rng(1)
    server.add_annotations(ds.dataset_id, [annotation_doc(rough_polygon(scene.labels == k, "dilated", rng))
                                           for k in range(1, scene.count + 1)])
    predictor = _Looking(labels=scene.labels)
    params = {"workerInterface": {"Model": "sam2.1_hiera_tiny.pt", "Batch XY": "all", "Batch Z": "all",
                                  "Batch Time": "all"},
              "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 0, "tags": ["refined"]}
    with NimbusClient(server.api_url, TOKEN) as client:
        code = job.run_compute(parse_settings(params, ds.dataset_id, ckpt), client,
                               Reporter(stream=io.StringIO(), secrets=(TOKEN,)), lambda path: (predictor, False))
    return code, predictor, channels, layers


def test_the_model_receives_the_image_with_the_views_contrast(server, ckpt) -> None:
    # The view shows the nuclei channel through a narrow absolute window at the dim end: the
    # background (not black any more) and every nucleus saturate.
    override = {"nuclei": contrast("absolute", 0, 2000)}
    code, seen, channels, layers = _run(server, ckpt, override)
    code_plain, seen_plain, _, _ = _run(server, ckpt, None)
    assert code == code_plain == 0 and seen.images and seen_plain.images
    image, plain = seen.images[0], seen_plain.images[0]
    assert image.shape == plain.shape == (160, 224, 3)
    height, width = channels.shape[1:]
    expected = LocationImage({0: channels[0]}, parse_layers(layers, 1, override)).window(0, 0, height, width)
    np.testing.assert_allclose(image, expected, atol=1e-6)
    without = LocationImage({0: channels[0]}, parse_layers(layers, 1)).window(0, 0, height, width)
    np.testing.assert_allclose(plain, without, atol=1e-6)
    assert np.abs(image - plain).mean() > 0.2  # the override changed what the model sees


def test_the_model_receives_the_apps_percentile_contrast(server, ckpt) -> None:
    """The view's "percentile 50..90" as the app draws it (src/store/images.ts, toStyle, with the
    frame's histogram min and max): the frame holds 0..1001, so the black point is 50 % of the
    range, 500.5, which d3's rangeRound (Math.round) makes 501 (numpy's round would make 500),
    and the white point 900.9 -> 901; a two-colour channel with a second, cyan layer absolute
    0..3000 on channel 1, combined by the maximum (the viewer's default "lighten")."""
    scene = cell_scene(160, 224, 6, radius=(9.0, 14.0), seed=3)
    nuclei = scene.channels[0].astype(np.float64)
    nuclei = np.round((nuclei - nuclei.min()) / (nuclei.max() - nuclei.min()) * 1001).astype(np.uint16)
    assert (nuclei.min(), nuclei.max()) == (0, 1001)
    channels = np.stack([nuclei, scene.channels[1]])
    override = {"nuclei": contrast("percentile", 50, 90)}
    layers = [{"id": "nuclei", "name": "nuclei", "channel": 0, "color": "#ffffff", "visible": True,
               "contrast": contrast("percentile", 0.5, 99.5)},
              {"id": "cyto", "name": "cyto", "channel": 1, "color": "#00ffff", "visible": True,
               "contrast": contrast("absolute", 0, 3000)}]
    code, seen, _, _ = _run(server, ckpt, override, channels, layers)
    assert code == 0 and seen.images
    grey = np.clip((nuclei - 501.0) / (901.0 - 501.0), 0, 1)
    cyan = np.clip(scene.channels[1] / 3000.0, 0, 1)
    expected = np.stack([grey, np.maximum(grey, cyan), np.maximum(grey, cyan)], axis=-1)
    np.testing.assert_allclose(seen.images[0], expected, atol=1e-6)
    # The test can tell: numpy's rounding, or percentiles of the values, give another image.
    banker = np.clip((nuclei - 500.0) / (901.0 - 500.0), 0, 1)
    assert np.abs(seen.images[0][..., 0] - banker).max() > 1e-3
    low, high = np.percentile(nuclei, [50, 90])
    by_values = np.clip((nuclei - low) / (high - low), 0, 1)
    assert np.abs(seen.images[0][..., 0] - by_values).mean() > 0.05


# -- which view: the user's own, most recently opened, holding the launching tool --------------

def view(view_id: str, config: str = "c1", last_viewed: Any = None, **extra: Any) -> dict[str, Any]:
    doc = {"_id": view_id, "datasetId": "d", "configurationId": config, "layerContrasts": {}, **extra}
    if last_viewed is not None:
        doc["lastViewed"] = last_viewed
    return doc


def test_rank_views_puts_own_views_first_then_latest_opened() -> None:
    own = [view("o1", last_viewed=5), view("o2", last_viewed=9), view("o3")]
    readable = [view("r1", last_viewed=100), *own, view("r2"), view("r3", last_viewed=50)]
    assert [v["_id"] for v in rank_views(own, readable)] == ["o2", "o1", "o3", "r1", "r3", "r2"]


def test_rank_views_keeps_the_server_order_among_views_never_opened_and_drops_junk() -> None:
    readable = [view("a"), "junk", view("b"), view("c", last_viewed=True), None, view("d")]
    assert [v["_id"] for v in rank_views({"not": "a list"}, readable)] == ["a", "b", "c", "d"]
    assert rank_views(None, None) == []


def test_holds_tool() -> None:
    config = {"meta": {"tools": [{"id": "t1", "name": "SAM2 refine"}, "junk"]}}
    assert holds_tool(config, "t1") and not holds_tool(config, "t2")
    assert not holds_tool({"meta": {}}, "t1") and not holds_tool(None, "t1")
    assert not holds_tool({"meta": {"tools": {"id": "t1"}}}, "t1")


def _configurations(asked: list[str]) -> Any:
    table = {"c1": {"meta": {"layers": [layer_doc("a")], "tools": [{"id": "t1"}]}},
             "c2": {"meta": {"layers": [layer_doc("b")], "tools": [{"id": "t2"}]}}}

    def configuration_of(config_id: str) -> Any:
        asked.append(config_id)
        return table[config_id]
    return configuration_of


def test_choose_view_takes_the_first_view_whose_configuration_holds_the_tool() -> None:
    ranked = [view("v1", "c1", layerContrasts={"a": contrast("absolute", 1, 2)}), view("v2", "c1"),
              view("v3", "c2", layerContrasts={"b": contrast("absolute", 3, 4)})]
    asked: list[str] = []
    assert choose_view(ranked, _configurations(asked), "t2") == ViewLayers(
        [layer_doc("b")], {"b": contrast("absolute", 3, 4)}, "v3")
    assert asked == ["c1", "c2"]  # each configuration read once, and no further than needed
    asked.clear()
    assert choose_view(ranked, _configurations(asked), "t1").view_id == "v1" and asked == ["c1"]


def test_choose_view_falls_back_to_the_first_view() -> None:
    ranked = [view("v1", "c2"), view("v2", "c1")]
    for tool_id in (None, "", "a tool no configuration holds"):
        asked: list[str] = []
        chosen = choose_view(ranked, _configurations(asked), tool_id)
        assert chosen == ViewLayers([layer_doc("b")], {}, "v1")
        assert asked == (["c2"] if not tool_id else ["c2", "c1"])
    assert choose_view([], _configurations([]), "t1") == ViewLayers()
    no_config = view("v0", "c1")
    del no_config["configurationId"]
    assert choose_view([no_config], _configurations([]), "t1") == ViewLayers(None, {}, "v0")


def test_settings_keep_the_launching_tools_id(ckpt) -> None:
    params = {"workerInterface": {"Model": "sam2.1_hiera_tiny.pt"}, "tile": {"XY": 0, "Z": 0, "Time": 0}}
    assert parse_settings({**params, "id": " tool-7 "}, "d", ckpt).tool_id == "tool-7"
    for odd in (None, "", 7, ["t"]):
        assert parse_settings({**params, "id": odd}, "d", ckpt).tool_id is None
    assert parse_settings(params, "d", ckpt).tool_id is None


def test_server_lists_views_as_the_plugin_does(server, client) -> None:
    server.add_token("tok-colleague", "colleague")
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8))
    other = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8))
    mine_old = server.add_view(ds.dataset_id, [layer_doc("a")], last_viewed=10)
    theirs = server.add_view(ds.dataset_id, [layer_doc("a")], owner="colleague", last_viewed=30)
    never = server.add_view(ds.dataset_id, configuration_id=server.state.views[mine_old]["configurationId"])
    mine_new = server.add_view(ds.dataset_id, [layer_doc("a")], last_viewed=20)
    server.add_view(other.dataset_id, [layer_doc("a")])

    def ids(**params: Any) -> list[str]:
        return [v["_id"] for v in client._request("GET", "dataset_view", params={"datasetId": ds.dataset_id,
                                                                                  **params})]
    assert ids() == [mine_old, theirs, never, mine_new]  # sorted by lowerName: the stored order
    assert ids(sort="lastViewed", sortdir=-1) == [theirs, mine_new, mine_old, never]  # missing last
    assert ids(sort="lastViewed") == [never, mine_old, mine_new, theirs]  # missing first
    assert ids(currentUserOnly="true", sort="lastViewed", sortdir=-1) == [mine_new, mine_old, never]
    assert ids(currentUserOnly="false") == ids()
    with NimbusClient(server.api_url, "tok-colleague") as colleague:
        assert [v["_id"] for v in colleague._request("GET", "dataset_view", params={
            "datasetId": ds.dataset_id, "currentUserOnly": "yes"})] == [theirs]
    assert ids(limit=2, offset=1) == [theirs, never]
    with pytest.raises(NimbusAPIError, match="sortdir"):
        ids(sortdir=2)


def test_server_lists_50_views_unless_asked_for_all(server, client) -> None:
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8), layers=[layer_doc("a")])
    for _ in range(55):
        server.add_view(ds.dataset_id, configuration_id=ds.collection_id)
    assert len(client._request("GET", "dataset_view", params={"datasetId": ds.dataset_id})) == 50
    assert len(client._request("GET", "dataset_view", params={"datasetId": ds.dataset_id, "limit": 0})) == 56


def test_client_reads_the_users_own_view_not_the_first_listed(server, client) -> None:
    server.add_token("tok-colleague", "colleague")
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8))
    server.add_view(ds.dataset_id, [layer_doc("a")], owner="colleague", last_viewed=99,
                    layer_contrasts={"a": contrast("absolute", 1, 2)})
    mine = server.add_view(ds.dataset_id, [layer_doc("a")], last_viewed=1,
                           layer_contrasts={"a": contrast("absolute", 3, 4)})
    assert client.get_layers(ds.dataset_id) == ViewLayers([layer_doc("a")], {"a": contrast("absolute", 3, 4)}, mine)
    own, readable = server.requests_to("GET", "dataset_view")
    assert own.params["currentUserOnly"] == "true" and "currentUserOnly" not in readable.params
    assert own.params["limit"] == readable.params["limit"] == "0"


def test_client_reads_the_view_whose_configuration_holds_the_tool(server, client) -> None:
    ds = server.add_dataset(np.zeros((1, 1, 1, 1, 4, 4), np.uint8))
    server.add_view(ds.dataset_id, [layer_doc("a")], last_viewed=50, tools=[{"id": "other-tool"}])
    holding = server.add_view(ds.dataset_id, [layer_doc("b")], last_viewed=10, tools=[{"id": "refine-tool"}],
                              layer_contrasts={"b": contrast("absolute", 5, 6)})
    assert client.get_layers(ds.dataset_id, "refine-tool") == ViewLayers(
        [layer_doc("b")], {"b": contrast("absolute", 5, 6)}, holding)
    assert client.get_layers(ds.dataset_id).layers == [layer_doc("a")]  # no tool: the latest opened


def test_a_job_launched_by_a_tool_uses_its_users_view(server, ckpt) -> None:
    """Two users' views of one dataset, and the launching user's second configuration: the job
    sees the contrast of the view that holds its tool and belongs to its user, whichever the
    server lists first."""
    server.add_token("tok-colleague", "colleague")
    scene = cell_scene(160, 224, 6, radius=(9.0, 14.0), seed=3)
    ds = server.add_dataset(scene.channels[None, None, None])
    nuclei = [{"id": "nuclei", "name": "nuclei", "channel": 0, "color": "#ffffff", "visible": True,
               "contrast": contrast("percentile", 0.5, 99.5)}]
    tool = {"id": "refine-tool", "name": "SAM2 refine"}
    shared = server.add_view(ds.dataset_id, nuclei, owner="colleague", last_viewed=300, tools=[tool],
                             layer_contrasts={"nuclei": contrast("absolute", 0, 60000)})
    server.add_view(ds.dataset_id, nuclei, last_viewed=200, layer_contrasts={"nuclei": contrast("absolute", 0, 1)})
    server.add_view(ds.dataset_id, configuration_id=server.state.views[shared]["configurationId"],
                    last_viewed=100, layer_contrasts={"nuclei": contrast("absolute", 0, 2000)})
    rng = np.random.default_rng(1)
    server.add_annotations(ds.dataset_id, [annotation_doc(rough_polygon(scene.labels == k, "dilated", rng))
                                           for k in range(1, scene.count + 1)])
    predictor = _Looking(labels=scene.labels)
    params = {"workerInterface": {"Model": "sam2.1_hiera_tiny.pt"}, "id": "refine-tool",
              "tile": {"XY": 0, "Z": 0, "Time": 0}, "channel": 0, "tags": ["refined"]}
    with NimbusClient(server.api_url, TOKEN) as client:
        code = job.run_compute(parse_settings(params, ds.dataset_id, ckpt), client,
                               Reporter(stream=io.StringIO(), secrets=(TOKEN,)), lambda path: (predictor, False))
    assert code == 0 and predictor.images
    height, width = scene.channels.shape[1:]
    expected = LocationImage({0: scene.channels[0]}, [Layer(0, WHITE, "absolute", 0.0, 2000.0, "nuclei")]
                             ).window(0, 0, height, width)
    np.testing.assert_allclose(predictor.images[0], expected, atol=1e-6)
