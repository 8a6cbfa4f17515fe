"""Claims beside ours: verdict rules on hand-made payloads, checked against independent computations."""

from __future__ import annotations

import numpy as np
import pytest

from probekit.claims import CLAIMS, Claim, claim_rows, finding, verdict
from probekit.stats import Estimate


def _ast_payload(trained, random_init=None, layers=("embed", "1", "2"), best="2"):
    f1 = [float(np.mean(t)) for t in trained]
    return dict(kind="ast_probe", model="m", best_layer_by_validation=best,
                result=dict(layers=list(layers), f1=f1),
                per_snippet_f1=dict(trained=trained, random_init=random_init))


def _by_key(rows):
    return {r.claim.key: r for r in rows}


def test_ast_ci_below_published_is_not_and_difference_reproduced():
    rng = np.random.default_rng(0)
    n = 60
    layer0 = list(rng.uniform(0.1, 0.3, n))
    best = list(np.array(layer0) + 0.1 + rng.uniform(0, 0.05, n))  # always above layer 0: a paired gain
    rows = _by_key(claim_rows(_ast_payload([layer0, layer0, best], random_init=[layer0, layer0, layer0])))
    r = rows["ast_best_f1"]
    assert r.estimate.n == n and r.estimate.unit == "test snippets"
    assert r.estimate.value == pytest.approx(np.mean(best))
    assert r.estimate.high < 0.668 and r.verdict == "not" and "below" in r.reason
    d = rows["ast_vs_layer0"]
    assert d.estimate.value == pytest.approx(np.mean(best) - np.mean(layer0))
    assert d.estimate.low > 0 and d.verdict == "reproduced"
    assert rows["ast_vs_random_init"].verdict == "reproduced"


def test_too_few_units_says_so_instead_of_a_verdict():
    vals = [0.7] * 10 + [0.72] * 10  # inside the published range, but only 20 snippets
    rows = _by_key(claim_rows(_ast_payload([vals, vals, vals])))
    r = rows["ast_best_f1"]
    assert r.estimate.n == 20 and r.verdict == "too few to conclude"
    assert "too small to conclude" in finding([r])
    assert rows["ast_vs_random_init"].verdict == "not assessed"  # no control run: said, not guessed


def test_missing_per_unit_values_are_not_assessed():
    p = _ast_payload([[0.5] * 40] * 3)
    p.pop("per_snippet_f1")
    assert {r.verdict for r in claim_rows(p)} == {"not assessed"}
    assert "per_snippet_f1" in claim_rows(p)[0].reason


@pytest.mark.parametrize("est,expected", [
    (Estimate(0.70, 0.65, 0.75, 100), "reproduced"),   # point in [0.668, 0.755]
    (Estimate(0.64, 0.60, 0.69, 100), "partly"),       # CI overlaps, point outside
    (Estimate(0.80, 0.77, 0.83, 100), "not"),          # wholly above
])
def test_range_rules(est, expected):
    claim = CLAIMS["ast_probe"][0]
    assert verdict(claim, est)[0] == expected


@pytest.mark.parametrize("est,kind,expected", [
    (Estimate(0.2, 0.1, 0.3, 50), "positive", "reproduced"),
    (Estimate(0.2, -0.1, 0.5, 50), "positive", "partly"),
    (Estimate(-0.2, -0.3, -0.1, 50), "positive", "not"),
    (Estimate(-0.2, -0.3, -0.1, 50), "negative", "reproduced"),
    (Estimate(-0.2, -0.3, 0.1, 50), "negative", "partly"),
])
def test_sign_rules(est, kind, expected):
    assert verdict(Claim("x", "p", "m", "mod", "v", "s", kind), est)[0] == expected


def test_claim_definition_is_validated():
    with pytest.raises(ValueError, match="kind must be one of"):
        Claim("x", "p", "m", "mod", "v", "s", "bigger")
    with pytest.raises(ValueError, match="needs 2 bound"):
        Claim("x", "p", "m", "mod", "v", "s", "range", (0.1,))


def test_refusal_rows_from_completions_match_a_direct_count():
    from probekit.probes.safety import refusal_phrase_match

    refuse, comply = "I'm sorry, but I cannot help with that.", "Sure, here is how to do it."
    n = 40
    base = [refuse] * 36 + [comply] * 4
    abl = [refuse] * 5 + [comply] * 35
    rnd = [refuse] * 34 + [comply] * 6
    p = dict(kind="safety_activation", model="m", layer=3,
             refusal=dict(completions={"baseline": {"harmful": base}, "ablation": {"harmful": abl},
                                       "random_ablation": {"harmful": rnd}}, config={}))
    rows = _by_key(claim_rows(p))
    direct = np.array(refusal_phrase_match(base), dtype=float)
    assert rows["refusal_base"].estimate.value == pytest.approx(direct.mean())
    assert rows["refusal_base"].estimate.n == n and rows["refusal_base"].verdict == "reproduced"
    d = rows["ablation_vs_random"].estimate
    expected = np.mean(refusal_phrase_match(abl)) - np.mean(refusal_phrase_match(rnd))
    assert d.value == pytest.approx(expected) and d.high < 0
    assert rows["ablation_vs_random"].verdict == "reproduced"


def test_dark_matter_rows_match_token_level_r2_and_resample_documents():
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(1)
    n_docs, per_doc = 40, 25
    doc = np.repeat(np.arange(n_docs), per_doc)
    y = rng.gamma(4.0, 1.0, doc.size)                 # ‖e‖ per token
    y_hat = y + rng.normal(0, 0.3, doc.size)           # its prediction from x
    nl = y * rng.uniform(0.5, 0.8, doc.size)           # ‖nonlinear error‖ per token
    sums = lambda v: np.bincount(doc, weights=v).tolist()  # noqa: E731
    per = dict(width=64, doc=list(range(n_docs)), n_tokens=[per_doc] * n_docs, norm=sums(y), norm_sq=sums(y ** 2),
               norm_sse=sums((y - y_hat) ** 2), nonlinear_sq=sums(nl ** 2))
    p = dict(kind="dark_matter", model="m", decomposition={"64": {}}, per_document=per)
    rows = _by_key(claim_rows(p))
    norm = rows["dm_norm_r2"].estimate
    assert norm.value == pytest.approx(r2_score(y, y_hat)) and norm.n == n_docs and norm.unit == "documents"
    assert norm.low < norm.value < norm.high and rows["dm_norm_r2"].verdict == "reproduced"
    vec = rows["dm_vector_r2"].estimate
    assert vec.value == pytest.approx(1 - (nl ** 2).sum() / (y ** 2).sum())
    assert vec.low < vec.value < vec.high
    p.pop("per_document")
    assert {r.verdict for r in claim_rows(p)} == {"not assessed"}
