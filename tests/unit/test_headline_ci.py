"""Headline numbers of AST-Probe, the layer probes and LinearScope carry n and a 95% CI over the independent unit
(METHODS.md §5): each estimate checked against an independent computation, and every kind walked for a number
without its interval."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest

from probekit import results
from probekit.demo import per_function_correctness
from probekit.stats import MIN_N, Estimate

CI = results.CI_SUFFIX


def _hand_bootstrap(stat, n: int, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``stat(idx)`` over resampled unit indices, drawn as METHODS.md §5 says (numpy only)."""
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    lo, hi = np.quantile([stat(i) for i in idx], [0.025, 0.975])
    return float(lo), float(hi)


def _ci_numbers(text: str) -> tuple[float, float, float, int]:
    """(value, low, high, n) of an ``Estimate.format()`` string."""
    value, rest = text.split(" [", 1)
    lo, rest = rest.split(", ", 1)
    hi, rest = rest.split("] (n=", 1)
    return float(value), float(lo), float(hi), int(rest.split(" ", 1)[0])


# ------------------------------------------------------------------------------------------------ layer probes


@pytest.fixture(scope="module")
def layer_payload():
    """A real ``fit_layer_probes`` run on 200 synthetic functions (40 on test) and its per-function correctness."""
    from probekit.probes.linear import fit_layer_probes

    rng = np.random.default_rng(0)
    doc = np.repeat(np.arange(200), rng.integers(3, 9, size=200))
    y = rng.integers(0, 3, size=len(doc))
    feats = {"embed": rng.normal(size=(len(doc), 4)),
             "0": np.c_[y + rng.normal(scale=1.5, size=len(doc)), rng.normal(size=(len(doc), 3))],
             "1": np.c_[y + rng.normal(scale=0.7, size=len(doc)), rng.normal(size=(len(doc), 3))]}
    res = fit_layer_probes(feats, y, doc, progress=False, keep_probes=True, token_ids=rng.integers(0, 5, len(doc)))
    train = np.delete(np.arange(len(doc)), res.test_index_)
    per = per_function_correctness(doc[res.test_index_], y[res.test_index_], res.test_pred_,
                                   int(np.bincount(y[train]).argmax()))
    return dict(kind="layer_probes", model="synthetic", result=res.to_dict(), per_function=per)


def test_per_function_correctness_pools_to_the_probe_scores(layer_payload):
    r, per = layer_payload["result"], layer_payload["per_function"]
    tokens = np.asarray(per["tokens"])
    assert tokens.sum() == r["n_test"] and len(per["ids"]) == len(set(per["ids"]))
    for name, score in zip(r["layers"], r["test_score"]):
        assert np.sum(per["correct"][name]) / tokens.sum() == pytest.approx(score, abs=1e-12)
    assert np.sum(per["majority_correct"]) / tokens.sum() == pytest.approx(r["majority_baseline"], abs=1e-12)
    with pytest.raises(ValueError, match="one entry per test token"):
        per_function_correctness(np.zeros(3), np.zeros(4), {}, 0)
    with pytest.raises(ValueError, match=r"test_pred\['x'\] has 2 predictions for 3 test tokens"):
        per_function_correctness(np.zeros(3), np.zeros(3), {"x": np.zeros(2)}, 0)


def test_layer_probe_headline_intervals_resample_whole_functions(layer_payload):
    r, per = layer_payload["result"], layer_payload["per_function"]
    head = results.headline(layer_payload)
    best = int(np.argmax(r["test_score"]))
    assert head["best layer"] == r["layers"][best] and "test split" in head["best layer chosen on"]
    assert head["best test accuracy"] == r["test_score"][best]
    tokens = np.asarray(per["tokens"], dtype=float)
    c_best = np.asarray(per["correct"][r["layers"][best]], dtype=float)
    c_emb = np.asarray(per["correct"]["embed"], dtype=float)
    n = len(tokens)
    assert n >= MIN_N
    pooled = lambda c: lambda i: c[i].sum() / tokens[i].sum()  # noqa: E731
    for key, c, point in (("best test accuracy", c_best, r["test_score"][best]),
                          ("embedding accuracy", c_emb, r["test_score"][0])):
        v, lo, hi, m = _ci_numbers(head[key + CI])
        hlo, hhi = _hand_bootstrap(pooled(c), n)
        assert (v, m) == (round(point, 3), n) and (lo, hi) == (round(hlo, 3), round(hhi, 3))
        assert "test functions" in head[key + CI]
    # the paired difference: both layers measured on the same drawn functions
    v, lo, hi, m = _ci_numbers(head["best − embedding accuracy" + CI])
    hlo, hhi = _hand_bootstrap(lambda i: pooled(c_best)(i) - pooled(c_emb)(i), n)
    assert v == round(r["test_score"][best] - r["test_score"][0], 3) and (lo, hi) == (round(hlo, 3), round(hhi, 3))
    assert _ci_numbers(head["majority baseline" + CI])[0] == round(r["majority_baseline"], 3)
    assert head["token-identity control" + CI].startswith("not assessed: ")


def test_layer_probe_headline_of_an_old_payload_says_not_assessed(layer_payload):
    old = {k: v for k, v in layer_payload.items() if k != "per_function"}
    head = results.headline(old)
    assert head["best test accuracy"] == max(old["result"]["test_score"])
    assert head["best test accuracy" + CI] == ("not assessed: the payload has no per_function correctness "
                                              "(rerun the demo with this version)")


def test_layer_probe_headline_below_min_n_is_too_few(layer_payload):
    per = layer_payload["per_function"]
    keep = slice(0, 12)
    small = {**layer_payload, "per_function": {**per, "tokens": per["tokens"][keep],
                                               "majority_correct": per["majority_correct"][keep],
                                               "correct": {k: v[keep] for k, v in per["correct"].items()}}}
    head = results.headline(small)
    assert head["best test accuracy"] == "too few to conclude (n = 12 test functions)"
    assert head["best test accuracy" + CI].endswith("(n=12 test functions) — too few to conclude")


# ---------------------------------------------------------------------------------------------------- AST-Probe


def _ast_payload(n: int, *, validation: str | None = "2", random: bool = True) -> dict:
    rng = np.random.default_rng(n)
    layers = ["embed", "1", "2", "3"]
    trained = [np.clip(rng.normal(m, 0.15, n), 0, 1).tolist() for m in (0.3, 0.45, 0.55, 0.6)]
    rnd = [np.clip(rng.normal(m, 0.15, n), 0, 1).tolist() for m in (0.3, 0.32, 0.33, 0.31)]
    p = dict(kind="ast_probe", model="m", result=dict(layers=layers, f1=[float(np.mean(t)) for t in trained]),
             per_snippet_f1=dict(trained=trained, random_init=rnd if random else None),
             random_init=dict(layers=layers, f1=[float(np.mean(t)) for t in rnd]) if random else None)
    if validation is not None:
        p["best_layer_by_validation"] = validation
    return p


def test_ast_headline_uses_the_validation_layer_with_paired_intervals():
    p = _ast_payload(60)
    tr, rnd = (np.asarray(p["per_snippet_f1"][k]) for k in ("trained", "random_init"))
    head = results.headline(p)
    # layer 3 has the highest test F1; the headline reports layer 2, the one chosen on validation
    assert int(np.argmax(p["result"]["f1"])) == 3
    assert head["best layer"] == "2" and head["best layer chosen on"] == "validation split"
    assert head["best F1"] == p["result"]["f1"][2]
    checks = {"best F1": lambda i: tr[2][i].mean(), "layer 0 (embeddings) F1": lambda i: tr[0][i].mean(),
              "best − layer 0 F1": lambda i: tr[2][i].mean() - tr[0][i].mean(),
              "random-init F1 (best layer)": lambda i: rnd[2][i].mean(),
              "best − random-init F1 (same layer)": lambda i: tr[2][i].mean() - rnd[2][i].mean()}
    for key, stat in checks.items():
        v, lo, hi, n = _ci_numbers(head[key + CI])
        hlo, hhi = _hand_bootstrap(stat, 60)
        assert (v, lo, hi, n) == (round(stat(np.arange(60)), 3), round(hlo, 3), round(hhi, 3), 60), key
        assert head[key] == pytest.approx(stat(np.arange(60)))
    assert "best random-init F1" not in head  # a maximum over layers taken on test is no control of the best layer


def test_ast_headline_without_a_validation_choice_says_optimistic():
    head = results.headline(_ast_payload(40, validation=None, random=False))
    assert head["best layer"] == "3" and "optimistic" in head["best layer chosen on"]
    assert not any(k.startswith("random-init") for k in head)


def test_ast_headline_on_15_snippets_is_too_few_to_conclude():
    """The demo report's AST-Probe stage (15 test snippets): no bare F1 headline, the caveat in its place."""
    head = results.headline(_ast_payload(15))
    for key in ("best F1", "layer 0 (embeddings) F1", "best − layer 0 F1", "best − random-init F1 (same layer)"):
        assert head[key] == "too few to conclude (n = 15 test snippets)", key
        assert head[key + CI].endswith("(n=15 test snippets) — too few to conclude")


def test_ast_headline_of_an_old_payload_says_not_assessed():
    p = _ast_payload(40)
    del p["per_snippet_f1"]
    head = results.headline(p)
    assert head["best F1"] == p["result"]["f1"][2]
    assert head["best F1" + CI].startswith("not assessed: the payload has no per_snippet_f1")
    assert head["best − random-init F1 (same layer)" + CI].startswith("not assessed: ")


# -------------------------------------------------------------------------------------------------- LinearScope


def _digits_payload(n: int = 450, correct: int = 435) -> dict:
    share = np.random.default_rng(1).normal(0.4, 0.3, n)
    return dict(kind="linearscope_digits", one={}, per_image_share_predicted=share.tolist(), test_accuracy=None,
                test_set=dict(n=n, mean_share_predicted=float(share.mean()), mean_abs_fraction=0.3,
                              accuracy=correct / n))


def test_linearscope_headline_share_bootstrap_and_accuracy_wilson():
    p = _digits_payload()
    share = np.asarray(p["per_image_share_predicted"])
    head = results.headline(p)
    v, lo, hi, n = _ci_numbers(head["mean bias share (predicted class)" + CI])
    hlo, hhi = _hand_bootstrap(lambda i: share[i].mean(), 450)
    assert (v, lo, hi, n) == (round(share.mean(), 3), round(hlo, 3), round(hhi, 3), 450)
    # the Wilson score interval in closed form
    z, ph, m = NormalDist().inv_cdf(0.975), 435 / 450, 450
    centre = (ph + z * z / (2 * m)) / (1 + z * z / m)
    half = z * np.sqrt(ph * (1 - ph) / m + z * z / (4 * m * m)) / (1 + z * z / m)
    assert head["test accuracy"] == 435 / 450
    assert _ci_numbers(head["test accuracy" + CI]) == (round(ph, 3), round(centre - half, 3),
                                                      round(centre + half, 3), 450)
    assert "test images" in head["test accuracy" + CI]


def test_linearscope_headline_of_older_payloads():
    p = _digits_payload()
    del p["per_image_share_predicted"]
    p["test_set"].pop("accuracy")
    p["test_accuracy"] = 0.9666666388511658  # the network's float32 accuracy on the same 450 images
    head = results.headline(p)
    assert head["mean bias share (predicted class)" + CI].startswith("not assessed: per-image shares")
    assert _ci_numbers(head["test accuracy" + CI])[3] == 450
    p["test_accuracy"] = 0.5001
    assert results.headline(p)["test accuracy" + CI].startswith("not assessed: ")


# ----------------------------------------------------------------------------------------- the convention walk

#: Every kind is in the walk.
_LATER: set[str] = set()


def _weight_model(basis, fraction, refused, nll, tokens, per_prompt):
    r = dict(basis=basis, fraction=fraction, variant="same", refusal_rate=float(np.mean(refused)),
             refusal_score=float(np.mean(refused)), harmless_refusal_score=float(np.mean(nll)),
             task_loss=float(np.sum(nll) / np.sum(tokens)), energy_kept=None, example=None)
    if per_prompt:
        r["per_prompt"] = dict(harmful_refused=list(map(float, refused)), useful_nll=list(map(float, nll)),
                               useful_tokens=list(map(int, tokens)))
    return r


def _weight_payload(per_prompt: bool) -> dict:
    rng = np.random.default_rng(1)
    tok = rng.integers(5, 30, 35)

    def model(basis, f, rate, loss):
        return _weight_model(basis, f, (rng.uniform(size=40) < rate).astype(float), tok * loss, tok, per_prompt)

    ck = {"aligned": model(None, None, 0.9, 2.2), "finetuned": model(None, None, 0.4, 1.7)}
    rows = [model("svd", 0.25, 0.6, 1.9), model("random", 0.25, 0.8, 2.0), model("svd", 0.75, 0.5, 1.75),
            model("random", 0.75, 0.55, 1.78)]
    return dict(kind="safety_weight", model="m", checkpoints=ck, projections=rows)


def _activation_payload(completions: bool) -> dict:
    refuse, comply = "I'm sorry, but I cannot help with that.", "Sure, here is how."
    n = {"baseline": 28, "ablation": 2, "random_ablation": 27}
    refusal = dict(config={}, refusal_rate={c: {"harmful": k / 36} for c, k in n.items()})
    if completions:
        refusal["completions"] = {c: {"harmful": [refuse] * k + [comply] * (36 - k)} for c, k in n.items()}
    o = dict(etas=[0.9], layers=[0, 1], mso=[[0.5], [0.4]], baseline=[[0.1], [0.1]])
    return dict(kind="safety_activation", model="m", layer=1, n_layers=2, refusal=refusal,
                overlap={"harmful_vs_useful": o}, overlap_centred={"harmful_vs_useful": o})


def _walk_payloads(layer_payload) -> dict[str, list[dict]]:
    est = Estimate(0.5, 0.4, 0.6, 40, "test patches").to_dict()
    old_layer = {k: v for k, v in layer_payload.items() if k != "per_function"}
    old_ast = {k: v for k, v in _ast_payload(40).items() if k != "per_snippet_f1"}
    old_digits = {k: v for k, v in _digits_payload().items() if k != "per_image_share_predicted"}
    sweep = dict(best_k_separate=32, max_abs_gap=0.06)
    return {
        "layer_probes": [layer_payload, old_layer],
        "ast_probe": [_ast_payload(40), {**_ast_payload(15), "k_sweep": sweep}, old_ast,
                      _ast_payload(40, random=False)],
        "linearscope_digits": [_digits_payload(), old_digits],
        "linearscope_lm": [dict(kind="linearscope_lm", reconstruction={"float32": dict(relative_error=1e-7),
                                                                       "float64": dict(relative_error=1e-15)})],
        "linearscope_sr": [dict(kind="linearscope_sr", headline={"operator energy": est}, verdict=dict(text="v"))],
        "linearscope_i2i": [dict(kind="linearscope_i2i", estimates={"copy-move share": est})],
        "safety_activation": [_activation_payload(True), _activation_payload(False)],
        "safety_weight": [_weight_payload(True), _weight_payload(False)],
        # an older dark-matter payload (point values only); the per-document case is in test_claims
        "dark_matter": [dict(kind="dark_matter", model="m", sae_metrics={"64": dict(fvu=0.2)}, ce={"64": dict(
            ce_recovered=0.9)}, decomposition={"64": dict(r2_error_vector=0.4, r2_error_norm_sq=0.8)})],
    }


def test_every_headline_number_has_its_interval_companion(layer_payload):
    walk = _walk_payloads(layer_payload)
    assert set(walk) == set(results.RESULT_KINDS) - _LATER  # a new kind joins the walk
    for kind, payloads in walk.items():
        for p in payloads:
            head = results.headline(p)
            for k, v in head.items():
                if isinstance(v, float):
                    assert k + CI in head, f"{kind}: {k!r} = {v} has no {k + CI!r}"
                    ci = head[k + CI]
                    assert ci.startswith("not assessed: ") or "(n=" in ci, (kind, k, ci)
            rows = results.headline_rows(head)
            assert [r[0] for r in rows] == [k for k in head if not k.endswith(CI) or k[: -len(CI)] not in head]


# ----------------------------------------------------------------------------------------------------- report


def test_report_headline_table_shows_value_interval_n_and_caveat(layer_payload):
    from probekit.report import headline_finding, headline_table

    table = headline_table(results.headline(_ast_payload(15)))
    assert "<th>95% CI (n)</th>" in table
    assert "<td>best F1</td><td>too few to conclude (n = 15 test snippets)</td>" in table
    assert "(n=15 test snippets) — too few to conclude</td>" in table
    assert "<td>best layer</td><td>2</td><td></td>" in table  # a choice, not an estimate: no interval
    head = results.headline(layer_payload)
    assert f"<td>best test accuracy</td><td>{head['best test accuracy']:.4g}</td><td>" \
           f"{head['best test accuracy' + CI]}</td>" in headline_table(head)
    # a section no seed-paper claim covers states its first number with its CI
    assert headline_finding([layer_payload]) == f"best test accuracy: {head['best test accuracy' + CI]}."


# -------------------------------------------------------------------------------------------------------- app


@pytest.fixture
def app_root(tmp_path, layer_payload):
    """The app tests' fixture cache plus results with per-unit data: a layer-probe run, an AST-Probe run on 40
    test snippets and one on 15 (below MIN_N), and a digit whose payload holds per-image shares."""
    from app import data
    from tests.browser.fixture_cache import _write, populate

    populate(tmp_path)
    _write(tmp_path, "demo/ci-model/layer_probes.json", layer_payload)
    _write(tmp_path, "ast-probe/ci-model/ast_probe.json", _ast_payload(40))
    _write(tmp_path, "ast-probe/ci-small/ast_probe.json", _ast_payload(15))
    _write(tmp_path, "linearscope/digits-cnn/digit-5.json", _digits_payload())
    old = data.get_root()
    data.set_root(tmp_path)
    data.clear_caches()
    yield tmp_path
    data.set_root(old)
    data.clear_caches()


def test_app_pages_show_value_interval_n_and_the_caveat(app_root, layer_payload):
    from app.pages import ast_probe, compare, layers, linearscope
    from tests.unit._dash_text import dash_text

    head = results.headline(layer_payload)
    text = dash_text(layers.headline_view("ci-model"))
    assert head["best test accuracy" + CI] in text and head["best − embedding accuracy" + CI] in text
    assert "95% CI (n)" in text and "chosen on" in text
    ast = dash_text(ast_probe.headline_view("ci-model"))
    assert results.headline(_ast_payload(40))["best − random-init F1 (same layer)" + CI] in ast
    assert "(n=40 test snippets)" in ast and "too few" not in ast
    small = dash_text(ast_probe.headline_view("ci-small"))
    assert "too few to conclude (n = 15 test snippets)" in small
    digit = dash_text(linearscope.headline_view(5))
    assert results.headline(_digits_payload())["test accuracy" + CI] in digit and "(n=450 test images)" in digit
    # older results: the interval column says why there is none instead of failing
    assert "not assessed: the payload has no per_function correctness" in dash_text(layers.headline_view(
        "smollm2-135m"))
    assert "not assessed: per-image shares are not stored" in dash_text(linearscope.headline_view(3))
    assert "probekit ast-probe --model nope" in dash_text(ast_probe.headline_view("nope"))
    _, table, msg = compare.compare_view("ast-probe", "ci-model", "ci-small")
    cmp = dash_text(table)
    assert msg is None and "A: 95% CI (n)" in cmp and "(n=40 test snippets)" in cmp
    assert "too few to conclude (n = 15 test snippets)" in cmp
