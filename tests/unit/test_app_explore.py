"""The app as an exploration tool, without a browser: the result index over the cache and report folders, the
two-way URL binding, hook names known before any weights load, hook order, capture progress labels, figure sizes."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from app import data
from app.pages import ast_probe, capture, layers
from app.security import UnsafePathError
from app.urlstate import PageState
from probekit.result_index import scan, scan_cache, scan_report
from tests.browser.fixture_cache import REPORT_MODEL, ast_result, demo_result, populate, write_report


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    root = tmp_path_factory.mktemp("explore-cache")
    populate(root)
    reports = tmp_path_factory.mktemp("explore-reports")
    write_report(reports)
    return root, reports


@pytest.fixture(autouse=True)
def _set(roots):
    data.set_root(roots[0])
    data.set_reports([roots[1]])
    data.clear_caches()
    yield
    data.set_reports([])


# ------------------------------------------------------------------ result index


def test_index_lists_cache_and_report_sets_with_model_date_and_config(roots):
    root, reports = roots
    sets = scan(root / "results", [reports])
    by = {(s.kind, s.id): s for s in sets}
    assert ("demo", "smollm2-135m") in by and ("ast-probe", "smollm2-135m") in by and ("ast-probe", "old-run") in by
    assert ("linearscope-digits", "0") in by and ("linearscope-digits", "3") in by
    rep = by[("demo", "report:demo")]
    assert rep.source == "report demo" and rep.model == REPORT_MODEL and rep.config["n_functions"] == 20
    assert rep.path == (reports / "demo" / "layer_probes" / "layer_probes.json").resolve()
    assert by[("ast-probe", "report:demo")].model == REPORT_MODEL
    assert all(s.date.endswith("UTC") for s in sets)
    # the metrics.json beside the stages is not a result set
    assert not any(s.path.name == "metrics.json" for s in sets)


def test_two_sets_of_a_kind_in_one_report_get_their_folder_in_the_id(tmp_path):
    for sub in ("ast_probe", "ast_probe_js"):
        (tmp_path / "r" / sub).mkdir(parents=True)
        (tmp_path / "r" / sub / "ast_probe.json").write_text(json.dumps(ast_result("m")))
    assert sorted(s.id for s in scan_report(tmp_path / "r")) == ["report:r/ast_probe", "report:r/ast_probe_js"]


def test_index_never_follows_a_link_out_of_its_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "layer_probes.json").write_text(json.dumps(demo_result()))
    rep = tmp_path / "reports" / "r"
    rep.mkdir(parents=True)
    os.symlink(outside, rep / "stage", target_is_directory=True)
    (rep / "evil.json").symlink_to(outside / "layer_probes.json")
    assert scan_report(rep) == []
    res = tmp_path / "cache" / "results" / "demo"
    res.mkdir(parents=True)
    os.symlink(outside, res / "m", target_is_directory=True)
    assert scan_cache(tmp_path / "cache" / "results") == []


def test_pages_list_and_draw_report_sets(roots):
    assert data.list_results("demo") == ["smollm2-135m", "report:demo"]
    fig, msg = layers.accuracy_view("report:demo", ["controls"])
    assert msg is None and REPORT_MODEL in fig["layout"]["title"]["text"]
    assert len(fig["data"][0]["x"]) == 5
    label = data.result_label("demo", "report:demo")
    assert "report demo" in label and REPORT_MODEL in label
    f, m = ast_probe.layer_view("report:demo", "f1", ["on"])
    assert m is None and f["data"]


@pytest.mark.parametrize("bad", ["report:../x", "report:demo/../../etc", "report:nope", "report:/etc/passwd"])
def test_a_report_id_is_looked_up_never_joined_into_a_path(roots, bad):
    with pytest.raises(UnsafePathError):
        data.result_path("demo", bad)
    _, msg = layers.accuracy_view(bad, [])
    assert msg is not None


def test_app_refuses_a_missing_report_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="--reports"):
        data.set_reports([tmp_path / "nope"])


def test_cli_passes_report_folders():
    from probekit.cli import build_parser

    a = build_parser().parse_args(["app", "--reports", "r1", "r2"])
    assert a.reports == ["r1", "r2"] and build_parser().parse_args(["app"]).reports is None


# ------------------------------------------------------------------ URL state both ways


def _state():
    return PageState("/p", {"a": str, "n": int}, [("p-a", "value"), ("p-n", "value")],
                     lambda q: [q.get("a", "x"), q.get("n", 1)], lambda a, n: dict(a=a, n=n))


def test_a_control_change_writes_the_query_and_a_query_change_sets_the_controls():
    from dash import no_update

    st = _state()
    assert st.sync("p-a", "/p", "?a=x&n=1", ["y", 1]) == ["?a=y&n=1", no_update, no_update]
    assert st.sync("p-a", "/p", "?a=y&n=1", ["y", 1]) == [no_update, no_update, no_update]  # nothing to push
    # back/forward or a pasted link: the query drives every control, defaults for what it leaves out
    assert st.sync(st.id, "/p", "?n=5", ["y", 1]) == [no_update, "x", 5]
    assert st.sync(st.id, "/p", "?a=y&n=1", ["y", 1]) == [no_update, no_update, no_update]
    assert st.sync(st.id, "/other", "?a=z", ["y", 1]) == [no_update] * 3  # another page's URL is not ours


def test_page_controls_round_trip_through_the_query(roots):
    from app.urlstate import encode_query, parse_query

    for page in (ast_probe, layers):
        values = page.controls({})
        again = page.controls(parse_query(encode_query(page.STATE.to_query(*values)), page.SCHEMA))
        assert again == values, page.__name__
    # an emptied checklist stays empty, not the default
    values = layers.controls({})
    values[1] = []
    assert layers.controls(parse_query(encode_query(layers.STATE.to_query(*values)), layers.SCHEMA))[1] == []


# ------------------------------------------------------------------ hooks


def test_hook_names_from_the_config_are_the_bridge_names(roots, tiny_dir, tiny_llama):
    root, _ = roots
    dest = root / "models" / "tiny-llama-2"
    shutil.copytree(tiny_dir["llama"], dest, dirs_exist_ok=True)
    names = data.model_hook_names("models/tiny-llama-2")
    bridge, _ = tiny_llama
    assert sorted(names) == sorted(bridge.hook_dict)  # the same names a loaded model has
    assert names == sorted(names, key=data.hook_order_key)
    (dest / "model.safetensors").write_bytes(b"not weights")  # never read: only config.json and the tokenizer
    data.clear_caches()
    assert data.model_hook_names("models/tiny-llama-2") == names


def test_capture_checks_hooks_against_the_model(roots, tiny_dir):
    root, _ = roots
    shutil.copytree(tiny_dir["llama"], root / "models" / "tiny-llama-3", dirs_exist_ok=True)
    model = "models/tiny-llama-3"
    assert capture.check_hooks(model, "blocks.0.hook_resid_post, blocks.1.hook_resid_post") == [
        "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    with pytest.raises(ValueError, match=r"blocks\.9\.hook_resid_post.*did you mean blocks\.\d\.hook_resid_post"):
        capture.check_hooks(model, "blocks.0.hook_resid_post blocks.9.hook_resid_post")
    assert "blocks.1.hook_resid_post" in [o["value"] for o in capture.hook_options(model)]
    assert capture.hook_options(None) == [] and capture.hook_options("models/nope") == []


def test_hooks_sort_in_layer_order_not_alphabetically():
    hooks = ["blocks.10.hook_resid_post", "blocks.2.mlp.hook_post", "blocks.2.hook_resid_post", "hook_embed",
             "blocks.2.attn.hook_pattern", "blocks.2.hook_resid_pre", "ln_final.hook_normalized", "blocks.2.hook_resid_mid"]
    assert sorted(hooks, key=data.hook_order_key) == [
        "hook_embed", "blocks.2.hook_resid_pre", "blocks.2.attn.hook_pattern", "blocks.2.hook_resid_mid",
        "blocks.2.mlp.hook_post", "blocks.2.hook_resid_post", "blocks.10.hook_resid_post", "ln_final.hook_normalized"]


def test_progress_labels_show_loading_as_its_own_step_and_true_counts():
    assert capture.progress_step({"event": "status", "message": "loading model"}) == [
        "0", "Step 1 of 2: loading model …"]
    assert capture.progress_step({"event": "progress", "done": 7, "total": 7})[1].endswith("(7 / 7 tokens)")
    assert capture.progress_step({"event": "progress", "done": 3, "total": 12})[0] == "25"


# ------------------------------------------------------------------ figure sizes


def test_fit_figure_gives_room_to_the_plot_and_keeps_the_legend_inside():
    import plotly.graph_objects as go

    from probekit.figure_layout import fit_figure

    fig = go.Figure([go.Bar(x=[f"blocks.{i}.hook_resid_post" for i in range(30)], y=list(range(30)), name=f"s{j}")
                     for j in range(3)], layout={"title": "t", "legend": {"orientation": "h", "y": -0.25},
                                                 "height": 200})
    fig.update_xaxes(tickangle=-45)
    fit_figure(fig)
    m = fig.layout.margin
    plot = fig.layout.height - m.t - m.b
    assert plot >= 340 and plot >= 0.6 * fig.layout.height
    assert m.b >= 70 + 6.5 * len("blocks.29.hook_resid_post") * 0.7 - 1  # room for the rotated labels
    assert fig.layout.legend.orientation == "v" and fig.layout.legend.x > 1 and fig.layout.legend.y == 1
    many = fit_figure(go.Figure(go.Heatmap(z=[[0.0] * 3] * 40)))
    assert many.layout.height - many.layout.margin.t - many.layout.margin.b >= 14 * 40
    table = go.Figure(go.Table(header={"values": ["a"]}, cells={"values": [[1]]}), layout={"height": 90})
    assert fit_figure(table).layout.height == 90  # tables and subplot grids size themselves


def test_cache_browser_marks_a_model_folder_that_is_gone(tmp_path):
    from app.pages import home

    assert home.model_text("smollm2-135m") == "smollm2-135m"
    assert home.model_text(str(tmp_path)) == str(tmp_path)[-48:]
    gone = home.model_text("/tmp/probekit-random-init-abc123")
    assert "folder gone" in gone and "probekit-random-init-abc123" in gone
