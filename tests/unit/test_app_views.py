"""The pure logic behind every callback, on a fixture cache: figures from result files, messages with the
exact command when a result is missing, traversal refused, capture requests validated."""

from __future__ import annotations

import json

import pytest

from app import data
from app.jobs import build_spec, parse_event, parse_hooks, progress_percent, split_texts
from app.pages import ast_probe, capture, dark_matter, home, layers, linearscope, safety
from app.security import UnsafePathError
from tests.browser.fixture_cache import populate
from tests.unit._dash_text import dash_text


class _Root(type(__import__("pathlib").Path())):
    run_id: str


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = _Root(tmp_path_factory.mktemp("app-unit"))
    r.run_id = populate(r)["run_id"]
    data.set_root(r)
    data.clear_caches()
    return r


@pytest.fixture(autouse=True)
def _root(root):
    data.set_root(root)


def test_layers_accuracy_control_changes_traces(root):
    fig, msg = layers.accuracy_view("smollm2-135m", [])
    assert msg is None and [t["name"] for t in fig["data"]] == ["test accuracy"]
    fig2, _ = layers.accuracy_view("smollm2-135m", ["train", "controls"])
    assert {"train accuracy", "majority baseline", "token-identity control", "random-feature control"} <= {t["name"] for t in fig2["data"]}


def test_missing_results_name_the_command(root):
    _, msg = layers.accuracy_view("qwen2.5-coder-0.5b", None)
    assert "probekit demo --model qwen2.5-coder-0.5b" in dash_text(msg) and f"PROBEKIT_CACHE={root}" in dash_text(msg)
    *_, msg = dark_matter.figures_view("minilm-l6", "stacked")
    assert "probekit dark-matter run --model minilm-l6" in dash_text(msg)
    _, msg = ast_probe.layer_view("minilm-l6", "f1", ["on"])
    assert "probekit ast-probe --model minilm-l6" in dash_text(msg)
    _, _, msg = linearscope.digit_view(7)
    assert "probekit linearscope --digit-index 7" in dash_text(msg)
    _, msg = linearscope.prompt_view("minilm-l6", "bars")
    assert "probekit linearscope --model minilm-l6" in dash_text(msg)
    empty = dash_text(safety.safety_message())
    assert "probekit safety run" in empty and f"PROBEKIT_CACHE={root}" in empty
    *_, msg = safety.activation_view("minilm-l6", None, None, None, None)
    assert "probekit safety run --part activation --activation-model minilm-l6" in dash_text(msg)


@pytest.mark.parametrize("bad", ["../../etc", "/etc/passwd", "a/b/c", "..", "x\x00y"])
def test_crafted_result_ids_are_refused(root, bad):
    for fig_msg in (layers.accuracy_view(bad, None), ast_probe.layer_view(bad, "f1", []), ast_probe.tree_view(bad, 0),
                    dark_matter.figures_view(bad, None)[::3], linearscope.prompt_view(bad, None)):
        assert fig_msg[0]["data"] == [] and "notice error" in dash_text(fig_msg[1])
    with pytest.raises(UnsafePathError):
        data.result_path("demo", bad)


@pytest.mark.parametrize("bad", ["../" * 3 + "etc", "/tmp", "0123456789abcdef0123456", "*", "../runs/x"])
def test_crafted_run_ids_are_refused(root, bad):
    fig, msg = layers.stats_view(bad, "mean_norm")
    assert fig["data"] == [] and "notice error" in dash_text(msg)
    assert "not a run id" in dash_text(layers.token_view(bad, "blocks.0.hook_resid_post", 0)[0])
    assert "bad" in dash_text(home.verify_run(bad)) and "Not deleted" in dash_text(home.delete_run(bad))
    assert layers.token_choices(bad, None, None) == ([], None, [], None)


def test_run_stats_and_token_view(root):
    rid = root.run_id
    fig, msg = layers.stats_view(rid, "mean_norm")
    assert msg is None and fig["data"][0]["x"] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    y = fig["data"][0]["y"]
    assert y[1] > y[0]  # the fixture scales hook j by j + 1
    fig2, _ = layers.stats_view(rid, "std_norm")
    assert fig2["data"][0]["y"] != y
    hooks, hook, docs, doc = layers.token_choices(rid, None, None)
    assert hook == "blocks.1.hook_resid_post" and doc == 0 and len(docs) == 3
    view = layers.token_view(rid, hook, 0)
    spans = view[2].children
    assert "".join(s.children for s in spans[1:]) == "def f(x):\n    return x + 1"  # decoded by the byte tokenizer
    assert len({s.style["backgroundColor"] for s in spans}) > 1
    assert "no document 9" in dash_text(layers.token_view(rid, hook, 9)[0])


def test_ast_views(root):
    f1, _ = ast_probe.layer_view("smollm2-135m", "f1", ["on"])
    c, _ = ast_probe.layer_view("smollm2-135m", "c_accuracy", ["on"])
    # F1, its two controls and the published line (a legend entry); other metrics have neither
    assert len(f1["data"]) == 4 and len(c["data"]) == 1 and f1["data"][0]["y"] != c["data"][0]["y"]
    both, _ = ast_probe.k_view("smollm2-135m", "both")
    sep, _ = ast_probe.k_view("smollm2-135m", "separate")
    mat, _ = ast_probe.k_view("smollm2-135m", "matryoshka")
    assert len(both["data"]) == 4 and len(sep["data"]) == 2 and mat["data"][0]["y"] == [0.45, 0.52, 0.57, 0.54]
    fig, msg, opts, layer = ast_probe.recall_view("smollm2-135m", None)
    assert layer == "5" and [o["value"] for o in opts] == ["embed", "2", "5"]
    fig2, *_ = ast_probe.recall_view("smollm2-135m", "2")
    assert fig2["data"][0]["x"] != fig["data"][0]["x"]
    assert len(ast_probe.snippet_options("smollm2-135m")) == 4
    t0, m0 = ast_probe.tree_view("smollm2-135m", 0)
    assert m0 is None and len(t0["data"]) == 6 and "layer 5" in t0["layout"]["title"]["text"]
    # the chosen layer drives the predicted tree: layer 2's is the gold tree, the embeddings' a flat ∅ root
    t2, _ = ast_probe.tree_view("smollm2-135m", 0, "2")
    te, _ = ast_probe.tree_view("smollm2-135m", 0, "embed")
    assert "layer 2" in t2["layout"]["title"]["text"] and "layer embed" in te["layout"]["title"]["text"]
    red = lambda t: sum(c == "#d62728" for c in t["data"][5]["marker"]["color"])  # noqa: E731  spurious nodes
    assert red(t0) == 1 and red(t2) == 0 and len(te["data"][5]["x"]) == 1
    assert "outside the 4 test snippets" in dash_text(ast_probe.tree_view("smollm2-135m", 9)[1])
    _, msg = ast_probe.tree_view("old-run", 0)
    assert "test_snippets" in dash_text(msg) and "--out" in dash_text(msg) and "probekit ast-probe --model smollm2-135m" in dash_text(msg)


def test_dark_matter_and_linearscope_views(root):
    stacked, r2, ce, msg = dark_matter.figures_view("smollm2-135m", "stacked")
    total, *_ = dark_matter.figures_view("smollm2-135m", "total")
    assert msg is None and len(stacked["data"]) == 4 and len(total["data"]) == 1 and len(r2["data"]) == 3
    assert len(ce["data"]) == 5
    sc, _ = dark_matter.scatter_view("smollm2-135m")
    assert len(sc["data"][0]["x"]) == 50 and sc["data"][0]["text"][0] == "…ctx[tok0]"
    head = dash_text(dark_matter.headline_view("smollm2-135m"))  # every number beside its CI or why it has none
    assert "95% CI (n)" in head and "FVU" in head and ("documents)" in head or "not assessed: " in head)
    assert "notice" in dash_text(dark_matter.headline_view("no-such-model"))
    rows, share, msg = linearscope.digit_view(3)
    assert msg is None and len(rows["data"]) == 11 and len(share["data"][0]["y"]) == 10
    bars, _ = linearscope.prompt_view("smollm2-135m", "bars")
    heat, _ = linearscope.prompt_view("smollm2-135m", "heatmap")
    assert bars["data"][0]["type"] == "bar" and heat["data"][0]["type"] == "heatmap"


def test_json_is_cached_by_mtime(root):
    p = data.result_path("demo", "smollm2-135m")
    a = data.load_json(p)
    assert data.load_json(p) is a
    obj = json.loads(p.read_text())
    obj["model"] = "changed"
    p.write_text(json.dumps(obj) + " ")
    assert data.load_json(p)["model"] == "changed"


def test_home_lists_and_deletes(root):
    from tests.browser.fixture_cache import write_run

    runs = data.list_runs()
    assert [r["run_id"] for r in runs] == [root.run_id] and runs[0]["complete"]
    assert "verified" in dash_text(home.verify_run(root.run_id))
    extra = write_run(root, seed=3)
    assert extra.run_id in home.confirm_message(extra.run_id)
    assert "Deleted run" in dash_text(home.delete_run(extra.run_id)) and not extra.path.exists()
    kinds = {f["kind"] for f in data.result_files()}
    assert {"demo", "ast-probe", "dark-matter", "linearscope"} <= kinds
    assert "layer_probes.html" in dash_text(home.results_list())


def test_file_route_and_pages_refuse_traversal(root, tmp_path):
    from app import create_app

    (tmp_path / "secret.json").write_text('{"secret": 1}')
    (root / "results" / "out-link").symlink_to(tmp_path, target_is_directory=True)
    client = create_app(root).server.test_client()
    assert client.get("/files/results/demo/smollm2-135m/layer_probes.json").status_code == 200
    for bad in ["../../etc/passwd", "..%2F..%2Fpyproject.toml", "out-link/secret.json", "demo/smollm2-135m/x.txt",
                "%2Fetc%2Fpasswd"]:
        r = client.get(f"/files/results/{bad}")
        assert r.status_code in (404, 308) or b"_dash-config" in r.data
        assert b"secret" not in r.data and b"root:" not in r.data


def test_capture_spec_validation(root, tmp_path):
    from probekit.testing import byte_tokenizer

    (root / "models" / "tiny-llama" / "config.json").write_text("{}")
    spec = build_spec(root, model="models/tiny-llama", hooks="blocks.0.hook_resid_post, blocks.1.hook_resid_post",
                      dataset="texts", n_functions=None, texts="a\n---\nb c\n---\n  ")
    assert spec.texts == ["a", "b c"] and spec.hooks == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert spec.model_path == str((root / "models" / "tiny-llama").resolve())
    bad = [dict(model=None), dict(model="models/../../etc"), dict(model="/etc"), dict(model="smollm2-135m"),
           dict(model="digits-cnn"), dict(hooks=""), dict(hooks="a/b"), dict(dataset="stdlib", n_functions=0),
           dict(dataset="texts", texts="  "), dict(dataset="nope"), dict(max_length=2)]
    for kw in bad:
        args = dict(model="models/tiny-llama", hooks="blocks.0.hook_resid_post", dataset="stdlib", n_functions=5,
                    texts=None) | kw
        with pytest.raises(ValueError):
            build_spec(root, **args)
    assert split_texts("x\n---\ny") == ["x", "y"] and parse_hooks("a.b c,d") == ["a.b", "c", "d"]
    assert parse_event('{"event": "progress", "done": 1, "total": 2}')["done"] == 1
    assert parse_event("capture: 50%|###") is None and parse_event('{"event": "rm -rf"}') is None
    assert progress_percent(5, 10) == 50 and progress_percent(5, 0) == 0 and progress_percent(20, 10) == 100
    assert capture.progress_step({"event": "progress", "done": 3, "total": 4})[0] == "75"
    view, value, label = capture.final_view({"event": "done", "run_id": "a" * 24, "rows": 3, "hooks": ["h"]})
    assert (value, label) == ("100", "100%") and "a" * 24 in dash_text(view)
    assert capture.final_view({"event": "error", "message": "boom"})[2] == "failed"
    assert capture.cancelled_view()[2] == "cancelled"
    opts = capture.model_options()
    assert {"value": "models/tiny-llama", "label": "models/tiny-llama (local folder)", "disabled": False} in opts
    assert all(o["disabled"] for o in opts if o["value"] == "smollm2-135m")


def test_cli_parses_app_defaults():
    from probekit.cli import build_parser

    a = build_parser().parse_args(["app"])
    assert (a.host, a.port, a.debug, a.cache_root) == ("127.0.0.1", 8050, False, None)
    a = build_parser().parse_args(["app", "--host", "0.0.0.0", "--port", "9000", "--debug", "--cache-root", "x"])
    assert (a.host, a.port, a.debug, a.cache_root) == ("0.0.0.0", 9000, True, "x")


def test_linearscope_picker_lists_every_computed_digit(tmp_path):
    import numpy as np

    from tests.browser.fixture_cache import linearscope_digit

    folder = tmp_path / "results" / "linearscope" / "digits-cnn"
    folder.mkdir(parents=True)
    for i, label in ((0, 0), (12, 3), (40, 7)):
        p = linearscope_digit()
        p["one"]["label"] = label
        p["one"]["input"] = np.random.default_rng(i).random((1, 8, 8)).tolist()
        (folder / f"digit-{i}.json").write_text(json.dumps(p))
    data.set_root(tmp_path)
    opts, value = linearscope.digit_options(None)
    assert value == 0 and opts == [{"label": "#0 (class 0)", "value": 0}, {"label": "#12 (class 3)", "value": 12},
                                   {"label": "#40 (class 7)", "value": 40}]
    opts, value = linearscope.digit_options(7)  # a URL digit not computed stays selectable, and says so
    assert value == 7 and opts[-1] == {"label": "#7 (not computed)", "value": 7}
    page = dash_text(linearscope.layout({"digit": 12}))
    assert '"value": 12' in page and "#40 (class 7)" in page
    a, _, msg_a = linearscope.digit_view(12)
    b, _, msg_b = linearscope.digit_view(40)
    assert msg_a is None and msg_b is None
    assert a["data"][0]["z"] != b["data"][0]["z"]  # choosing a digit changes the input image
    assert "label 3" in a["layout"]["title"]["text"] and "label 7" in b["layout"]["title"]["text"]
    _, _, msg = linearscope.digit_view(7)
    assert "probekit linearscope --digit-index 7" in dash_text(msg)


def test_incomplete_result_files_give_an_error_not_a_failed_callback(root):
    """A payload lacking a field a figure reads (an older or interrupted run) shows a message naming the file."""
    from tests.browser.fixture_cache import _write, ast_result, dark_matter_result, demo_result, linearscope_digit

    demo = demo_result()
    del demo["result"]["train_score"]
    _write(root, "demo/broken/layer_probes.json", demo)
    dm = dark_matter_result()
    del dm["fvu_split"]
    _write(root, "dark-matter/broken/dark_matter.json", dm)
    ast = ast_result()
    del ast["result"]["recall"]
    _write(root, "ast-probe/broken/ast_probe.json", ast)
    digit = linearscope_digit()
    del digit["one"]["matrix"]
    _write(root, "linearscope/digits-cnn/digit-9.json", digit)
    data.clear_caches()
    try:
        views = [layers.accuracy_view("broken", ["train"]), dark_matter.figures_view("broken", "stacked")[::3],
                 ast_probe.layer_view("broken", "recall", []), linearscope.digit_view(9)[::2]]
        for fig, msg in views:
            assert fig["data"] == [] and "notice error" in dash_text(msg) and "cannot be drawn" in dash_text(msg)
        assert "layer_probes.json of broken" in dash_text(views[0][1])
        assert layers.accuracy_view("broken", [])[1] is None  # what the file does hold still draws
    finally:  # the other tests of this module list the results
        import shutil

        for rel in ("demo/broken", "dark-matter/broken", "ast-probe/broken"):
            shutil.rmtree(root / "results" / rel)
        (root / "results" / "linearscope" / "digits-cnn" / "digit-9.json").unlink()
        data.clear_caches()
