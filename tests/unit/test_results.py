"""probekit.results: figures and headline numbers rebuilt from result files alone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from probekit import results
from probekit.figure_layout import fit_figure
from probekit.cli import main
from tests.browser.fixture_cache import ast_result, dark_matter_result, demo_result, linearscope_digit, linearscope_lm


@pytest.fixture(scope="module")
def result_files(tiny_dir, tmp_path_factory):
    """One tiny result of each kind, written by the real commands."""
    import os

    tmp = tmp_path_factory.mktemp("results")
    old = os.environ.get("PROBEKIT_CACHE")
    os.environ["PROBEKIT_CACHE"] = str(tmp / "cache")
    try:
        model = str(tiny_dir["llama"])
        assert main(["linearscope", "--model", model, "--prompt", "x = 1", "--out", str(tmp / "ls")]) == 0
        assert main(["ast-probe", "--model", model, "--n-functions", "40", "--layers", "1", "--k", "4",
                     "--epochs", "1", "--k-sweep", "4", "--no-progress", "--out", str(tmp / "ast")]) == 0
    finally:
        if old is None:
            os.environ.pop("PROBEKIT_CACHE")
        else:
            os.environ["PROBEKIT_CACHE"] = old
    return tmp


def test_every_kind_round_trips_through_its_file(result_files):
    found = results.find(result_files)
    kinds = {results.load(p)["kind"] for p in found}
    assert kinds == {"linearscope_digits", "linearscope_lm", "ast_probe"}
    for p in found:
        payload = json.loads(p.read_text())  # the file alone, as the app and the reports see it
        figs = results.figures(payload)
        assert figs and all(f.to_json() for f in figs)
        head = results.headline(payload)
        assert head and all(isinstance(k, str) for k in head)


def test_ast_headline_and_figures_match_the_payload(result_files):
    payload = results.load(result_files / "ast" / "ast_probe.json")
    head = results.headline(payload)
    r, per = payload["result"], payload["per_snippet_f1"]["trained"]
    bi = r["layers"].index(payload["best_layer_by_validation"])
    assert head["best layer"] == payload["best_layer_by_validation"]
    # a tiny run has fewer test snippets than MIN_N: the caveat stands in the number's place
    n = payload["n_snippets"][2]
    assert n < 30 and head["best F1"] == f"too few to conclude (n = {n} test snippets)"
    assert head["best F1, 95% CI"].startswith(f"{r['f1'][bi]:.3f} [") and f"(n={n} test snippets)" in \
        head["best F1, 95% CI"]
    assert head["layer 0 (embeddings) F1, 95% CI"].startswith(f"{r['f1'][0]:.3f} [")
    assert np.mean(per[bi]) == pytest.approx(r["f1"][bi])  # the pooled per-snippet F1 is the run's own number
    figs = results.figures(payload)
    # F1 per layer (+ controls), F1 vs k, recall per label, the tree
    assert len(figs) == 4
    assert list(figs[0].data[0].y) == payload["result"]["f1"]
    assert figs[0].to_json() == results.ast_layer_figure(payload).to_json()  # the app's builder, report defaults


def test_unknown_kind_is_refused(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"kind": "nope"}))
    with pytest.raises(ValueError, match="not a probekit result"):
        results.load(bad)
    with pytest.raises(ValueError, match="expected one of"):
        results.figures({"kind": "nope"})
    assert results.find(tmp_path) == []


def test_linearscope_report_draws_the_shared_share_and_contribution_figures(result_files):
    payloads = {results.load(p)["kind"]: results.load(p) for p in results.find(result_files)}
    digits, lm = payloads["linearscope_digits"], payloads["linearscope_lm"]
    share = results.bias_share_figure(digits).to_json()
    assert [f.to_json() for f in results.figures(digits)].count(share) == 1  # the probe's own bars, once
    assert [f.to_json() for f in results.figures(lm)] == [results.token_contributions_figure(lm).to_json()]


# ------------------------------------------------------------------------------- the shared figure builders
# Hand-made payloads (the app tests' fixture cache): each trace must carry the payload's own numbers.


def _names(fig) -> list[str]:
    return [t.name for t in fig.data]


def test_layer_accuracy_figure_draws_the_scores_and_the_chosen_curves():
    p = demo_result()
    r = p["result"]
    fig = results.layer_accuracy_figure(p)
    assert _names(fig) == ["test accuracy", "train accuracy", "random-feature control", "majority baseline",
                           "token-identity control"]
    assert list(fig.data[0].x) == r["layers"] and list(fig.data[0].y) == r["test_score"]
    assert list(fig.data[1].y) == r["train_score"] and list(fig.data[2].y) == r["random_feature_control"]
    assert list(fig.data[3].y) == [0.13] * 7 and list(fig.data[4].y) == [0.55] * 7
    assert [f.to_json() for f in results.figures(p)] == [fig.to_json()]  # the report draws the same figure
    assert _names(results.layer_accuracy_figure(p, show=[])) == ["test accuracy"]
    train = results.layer_accuracy_figure(p, show=["train"])
    assert _names(train) == ["test accuracy", "train accuracy"] and list(train.data[1].y) == r["train_score"]
    ridge = results.layer_accuracy_figure({**p, "result": {**r, "metric": "r2", "kind": "ridge"}}, show=["controls"])
    assert _names(ridge)[0] == "test R²" and "train-mean baseline" in _names(ridge)
    assert ridge.layout.yaxis.range is None and fig.layout.yaxis.range == (0, 1.02)


def test_hook_stats_figure_plots_the_chosen_statistic():
    stats = {"hooks": ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], "n_sampled": 1234,
             "mean_norm": [1.0, 2.0], "std_norm": [0.1, 0.3], "mean_abs": [0.5, 0.7]}
    fig = results.hook_stats_figure(stats, run_id="abcdef0123456789")
    assert list(fig.data[0].x) == stats["hooks"] and list(fig.data[0].y) == [1.0, 2.0]
    assert "mean ‖x‖ per hook, run abcdef012345 (1,234 sampled rows)" == fig.layout.title.text
    assert list(results.hook_stats_figure(stats, stat="std_norm").data[0].y) == [0.1, 0.3]
    with pytest.raises(ValueError, match="stat must be one of"):
        results.hook_stats_figure(stats, stat="max")


def test_ast_layer_figure_selects_the_metric_controls_and_published_lines():
    p = ast_result(snippets=False)
    r = p["result"]
    fig = results.ast_layer_figure(p)
    assert list(fig.data[0].x) == ["embed", "2", "5"] and list(fig.data[0].y) == r["f1"]
    assert _names(fig)[1:] == ["layer 0 (embeddings)", "random-init model"]
    assert list(fig.data[2].y) == [0.37, 0.4, 0.41] and not fig.layout.shapes  # the report has no published line
    assert "best by validation: 5" in fig.layout.title.text
    c = results.ast_layer_figure(p, metric="c_accuracy")
    assert len(c.data) == 1 and list(c.data[0].y) == r["c_accuracy"] and c.layout.yaxis.title.text == "c accuracy"
    assert len(results.ast_layer_figure(p, controls=False).data) == 1
    pub = results.ast_layer_figure(p, published=True)
    assert _names(pub)[-1] == "published codebert_best" and list(pub.data[-1].y) == [0.751] * 3  # a legend entry
    one = results.ast_layer_figure({**p, "result": {**r, "controls": {"constant": [0.2]}}})
    assert list(one.data[1].y) == [0.2, 0.2, 0.2]  # a one-value control is drawn as a constant
    with pytest.raises(ValueError, match="metric must be one of"):
        results.ast_layer_figure(p, metric="accuracy")


def test_dark_matter_builders_draw_the_payload():
    p = dark_matter_result()
    s = p["fvu_split"]
    fvu = results.fvu_split_figure(p)
    assert _names(fvu) == ["absent features", "linear error", "nonlinear error", "cross term (held out)"]
    assert list(fvu.data[0].x) == ["128", "256", "512"]
    assert [list(t.y) for t in fvu.data] == [s["absent"], s["linear"], s["nonlinear"], s["cross"]]
    assert "blocks.3.hook_resid_post" in fvu.layout.title.text and "width 512" in fvu.layout.title.text
    total = results.fvu_split_figure(p, mode="total")
    assert _names(total) == ["FVU"] and list(total.data[0].y) == s["fvu"]
    with pytest.raises(ValueError, match="mode must be one of"):
        results.fvu_split_figure(p, mode="grouped")
    r2 = results.error_r2_figure(p)
    assert list(r2.data[0].x) == ["128", "256", "512"] and list(r2.data[0].y) == [0.4, 0.45, 0.5]
    assert list(r2.data[2].y) == [0.85] * 3
    ce = results.ce_figure(p)
    assert _names(ce) == ["clean", "x̂", "x̂ + linear error", "x̂ + nonlinear error", "zero ablation"]
    assert list(ce.data[1].y) == [2.5, 2.4, 2.3] and list(ce.data[4].y) == [8.0] * 3


def test_error_scatter_figure_draws_every_token_and_the_optional_diagonal():
    p = dark_matter_result()
    sc = p["scatter"]
    fig = results.error_scatter_figure(p)
    assert list(fig.data[0].x) == sc["actual"] and list(fig.data[0].y) == sc["predicted"]
    assert list(fig.data[0].text) == sc["hover"] and "512" in fig.layout.title.text
    assert _names(fig) == ["tokens", "y = x"] and list(fig.data[1].x) == [0, max(sc["actual"])]
    assert _names(results.error_scatter_figure(p, diagonal=False)) == ["tokens"]


def test_digit_rows_figure_draws_the_input_and_each_class_row():
    p = linearscope_digit()
    one = p["one"]
    fig = results.digit_rows_figure(p, index=5)
    assert len(fig.data) == 11 and fig.layout.title.text.startswith("Digit 5: label 2, predicted 2")
    # image rows flipped: a heatmap draws its first row at the bottom
    assert np.allclose(np.asarray(fig.data[0].z), np.asarray(one["input"]).reshape(8, 8)[::-1])
    assert np.allclose(np.asarray(fig.data[4].z), np.asarray(one["matrix"][3]).reshape(8, 8)[::-1])
    assert fig.data[1].zmax == pytest.approx(np.abs(one["matrix"]).max()) and fig.data[1].zmin == -fig.data[1].zmax
    assert results.digit_rows_figure(p).layout.title.text.startswith("Test digit:")


def test_bias_share_figure_marks_the_predicted_class():
    p = linearscope_digit()
    fig = results.bias_share_figure(p)
    one = p["one"]
    share = np.asarray(one["bias"]) / np.asarray(one["logits"])  # drawn from the result's b and y, not a copy
    assert np.allclose(list(fig.data[0].y), share) and list(fig.data[0].x) == [str(k) for k in range(10)]
    colors = list(fig.data[0].marker.color)
    assert colors[2] == "#d62728" and colors.count("#d62728") == 1
    assert "-0.020" in fig.layout.title.text  # the test-set mean at the predicted class


def test_token_contributions_figure_heatmap_or_bars():
    p = linearscope_lm()
    c = p["contributions"]
    heat = results.token_contributions_figure(p)
    assert heat.data[0].type == "heatmap" and list(heat.data[0].x)[:2] == ["0:<s>", "1:def"]
    assert np.allclose(np.asarray(heat.data[0].z), [c["linearscope"], c["grad_x_input"]])
    assert (heat.data[0].zmin, heat.data[0].zmax) == (-4.0, 4.0)  # symmetric around 0 at the largest |value|
    bars = results.token_contributions_figure(p, view="bars")
    assert [t.type for t in bars.data] == ["bar", "bar"]
    assert list(bars.data[0].y) == c["linearscope"] and list(bars.data[1].y) == c["grad_x_input"]
    with pytest.raises(ValueError, match="view must be one of"):
        results.token_contributions_figure(p, view="lines")


# ------------------------------------------------------------------ one drawing: builders call the probe figures
# Each builder must give exactly the figure the probe module draws for the same result, sized by
# figure_layout.fit_figure, so a notebook's figure and the report's or app's cannot drift apart.


def test_layer_accuracy_builder_is_the_probe_figure():
    from probekit.probes.linear import LayerProbeResult

    p = demo_result()
    res = LayerProbeResult(**p["result"])
    for show in (("train", "controls"), [], ["controls"]):
        (want,) = res.figures(show=show, model=p["model"])
        assert results.layer_accuracy_figure(p, show=show).to_plotly_json() == fit_figure(want).to_plotly_json()


def test_ast_builder_is_the_probe_figure():
    from probekit.probes.ast_probe import ASTProbeResult

    p = ast_result(snippets=False)
    res = ASTProbeResult(**p["result"])
    (want,) = res.figures(metric="f1", published=p["published"], best_layer="5")
    assert results.ast_layer_figure(p, published=True).to_plotly_json() == fit_figure(want).to_plotly_json()
    (want,) = res.figures(metric="recall", best_layer="5")
    assert results.ast_layer_figure(p, metric="recall").to_plotly_json() == fit_figure(want).to_plotly_json()


def test_dark_matter_builders_are_the_probe_figures():
    from probekit.probes.dark_matter import FVUSplitAcrossWidths, error_norm_scatter

    p = dark_matter_result()
    split = FVUSplitAcrossWidths(**p["fvu_split"])
    for mode in ("stacked", "total"):
        (want,) = split.figures(mode=mode, hook=p["hook"])
        assert results.fvu_split_figure(p, mode=mode).to_plotly_json() == fit_figure(want).to_plotly_json()
    sc = p["scatter"]
    want = error_norm_scatter(sc["actual"], sc["predicted"], hover_text=sc["hover"], diagonal=False,
                              title="Per-token ‖e‖ predicted from x, SAE width 512 (held-out tokens)")
    assert results.error_scatter_figure(p, diagonal=False).to_plotly_json() == fit_figure(want).to_plotly_json()


def test_linearscope_builders_are_the_probe_figures():
    from probekit.probes.linearscope_transformer import TokenContributions

    lm = linearscope_lm()
    tc = TokenContributions(**lm["contributions"])
    for view in ("heatmap", "bars"):
        (want,) = tc.figures(view=view, prompt=lm["prompt"])
        assert results.token_contributions_figure(lm, view=view).to_plotly_json() == fit_figure(want).to_plotly_json()
    digit = linearscope_digit()
    from probekit.probes.linearscope import LinearScopeResult

    o = digit["one"]  # built by hand here, not through the adapter under test
    one = LinearScopeResult(input=np.asarray(o["input"]), logits=np.asarray(o["logits"]), bias=np.asarray(o["bias"]),
                            matrix=np.asarray(o["matrix"]), predicted=o["predicted"], target=o["target"],
                            label=o["label"], singular_values=np.zeros(0), left_singular_vectors=np.zeros((10, 0)),
                            right_singular_vectors=np.zeros((0, 64)), reconstruction_rel_error=0.0)
    assert results.digit_rows_figure(digit, index=4).to_plotly_json() == one.digit_rows_figure(index=4).to_plotly_json()
    assert results.bias_share_figure(digit).to_plotly_json() == fit_figure(one.bias_share_figure(test_mean=-0.02)).to_plotly_json()
