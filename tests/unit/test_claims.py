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


def _dm_tokens(seed=1, n_docs=40, per_doc=25, d=6):
    """Hand-made held-out tokens: error vectors e (with a non-zero mean), their linear part, ‖e‖² predictions."""
    rng = np.random.default_rng(seed)
    doc = np.repeat(np.arange(n_docs), per_doc)
    e = rng.normal(0.7, 1.0, (doc.size, d)) * rng.gamma(3.0, 0.5, (doc.size, 1))
    lin = e * 0.7 + rng.normal(0, 0.4, e.shape)                    # its linear prediction from x
    sq = (e ** 2).sum(1)
    sq_hat = sq + rng.normal(0, 0.5, doc.size)                     # predicted ‖e‖²
    nrm_hat = np.sqrt(sq) + rng.normal(0, 0.1, doc.size)           # predicted ‖e‖
    return doc, e, lin, sq, sq_hat, nrm_hat


def _dm_payload(doc, e, lin, sq, sq_hat, nrm_hat, *, new=True):
    n_docs = int(doc.max()) + 1
    sums = lambda v: np.bincount(doc, weights=v, minlength=n_docs).tolist()  # noqa: E731
    per = dict(width=64, doc=list(range(n_docs)), n_tokens=sums(np.ones(doc.size)), norm=sums(np.sqrt(sq)),
               norm_sq=sums(sq), norm_sse=sums((np.sqrt(sq) - nrm_hat) ** 2),
               nonlinear_sq=sums(((e - lin) ** 2).sum(1)))
    if new:
        per.update(norm_sq_sse=sums((sq - sq_hat) ** 2), norm_pow4=sums(sq ** 2),
                   error_sum=np.stack([np.bincount(doc, weights=e[:, j], minlength=n_docs) for j in range(e.shape[1])],
                                      1).tolist())
    return dict(kind="dark_matter", model="m", decomposition={"64": dict(r2_error_vector=0.0, r2_error_norm_sq=0.0)},
                sae_metrics={"64": dict(fvu=0.2)}, per_document=per)


def test_dark_matter_rows_are_methods_targets_checked_against_token_level_sklearn():
    """dm_norm_r2 is R² of ‖e‖² (METHODS §3), dm_vector_r2 the centred R² of e; both match sklearn on the tokens
    and resample documents; ‖e‖ stays as a secondary number."""
    from sklearn.metrics import r2_score

    doc, e, lin, sq, sq_hat, nrm_hat = _dm_tokens()
    rows = _by_key(claim_rows(_dm_payload(doc, e, lin, sq, sq_hat, nrm_hat)))
    norm = rows["dm_norm_r2"].estimate
    assert "‖e‖²" in rows["dm_norm_r2"].claim.metric
    assert norm.value == pytest.approx(r2_score(sq, sq_hat), abs=1e-10) and norm.n == 40 and norm.unit == "documents"
    assert norm.low < norm.value < norm.high
    assert rows["dm_norm_r2"].extra["r2_norm"].value == pytest.approx(r2_score(np.sqrt(sq), nrm_hat), abs=1e-10)
    assert "target ‖e‖ instead of ‖e‖²" in rows["dm_norm_r2"].reason
    vec = rows["dm_vector_r2"].estimate
    centred = r2_score(e, lin, multioutput="variance_weighted")   # 1 − Σ‖e − lin‖² / Σ‖e − ē‖²
    uncentred = 1 - ((e - lin) ** 2).sum() / (e ** 2).sum()
    assert vec.value == pytest.approx(centred, abs=1e-10) and abs(centred - uncentred) > 0.01
    assert vec.low < vec.value < vec.high and vec.n == 40
    # documents are the unit: duplicating every token inside its document leaves the CI as it was
    twice = np.repeat(np.arange(doc.size), 2)
    rows2 = _by_key(claim_rows(_dm_payload(doc[twice], e[twice], lin[twice], sq[twice], sq_hat[twice], nrm_hat[twice])))
    assert rows2["dm_vector_r2"].estimate.low == pytest.approx(vec.low, abs=1e-9)
    assert rows2["dm_norm_r2"].estimate.high == pytest.approx(norm.high, abs=1e-9)
    assert rows["dm_norm_r2_bos"].verdict == "not assessed" and "norm_question" in rows["dm_norm_r2_bos"].reason


def test_dark_matter_rows_of_an_older_payload_say_what_they_are():
    """Sums of ‖e‖ only and no Σe: the ‖e‖² claim is not assessed (never the ‖e‖ number under its name) and the
    vector share falls back to the uncentred form with that stated in the row."""
    doc, e, lin, sq, sq_hat, nrm_hat = _dm_tokens()
    p = _dm_payload(doc, e, lin, sq, sq_hat, nrm_hat, new=False)
    rows = _by_key(claim_rows(p))
    assert rows["dm_norm_r2"].verdict == "not assessed" and "‖e‖²" in rows["dm_norm_r2"].reason
    vec = rows["dm_vector_r2"]
    assert vec.estimate.value == pytest.approx(1 - ((e - lin) ** 2).sum() / (e ** 2).sum())
    assert vec.reason.startswith("uncentred share")
    p.pop("per_document")
    assert {r.verdict for r in claim_rows(p)} == {"not assessed"}


def test_dark_matter_estimates_are_points_without_sums_and_cis_with_them():
    from probekit import results
    from probekit.claims import dark_matter_estimates

    doc, e, lin, sq, sq_hat, nrm_hat = _dm_tokens(n_docs=35)
    p = _dm_payload(doc, e, lin, sq, sq_hat, nrm_hat)
    rng = np.random.default_rng(3)
    sse, sst = rng.uniform(1, 2, 35), rng.uniform(5, 8, 35)
    nll = {k: rng.uniform(a, a + 1, 35) * 20 for k, a in (("clean", 2), ("zero", 8), ("sae", 3), ("lin", 2.5),
                                                            ("nl", 3.5))}
    n_tok = np.r_[0, np.full(34, 20)]                                 # a one-token document has no target
    for k in nll:
        nll[k][0] = 0.0
    p.update(fvu_per_document=dict(sst=sst.tolist(), sse={"64": sse.tolist()}),
             ce={"64": dict(ce_recovered=0.5, ce_linear=2.0, ce_nonlinear=2.5)},
             ce_per_document=dict(n_tokens=n_tok.tolist(), nll_clean=nll["clean"].tolist(),
                                  nll_zero=nll["zero"].tolist(),
                                  widths={"64": dict(nll_sae=nll["sae"].tolist(), nll_linear=nll["lin"].tolist(),
                                                     nll_nonlinear=nll["nl"].tolist())}))
    est = dark_matter_estimates(p)
    assert est["width 64: FVU"].value == pytest.approx(sse.sum() / sst.sum()) and est["width 64: FVU"].n == 35
    z, c, s = nll["zero"].sum(), nll["clean"].sum(), nll["sae"].sum()
    rec = est["width 64: CE recovered"]
    assert rec.value == pytest.approx((z - s) / (z - c)) and rec.n == 34 and rec.low < rec.value < rec.high
    d = est["width 64: CE(x̂ + nonlinear) − CE(x̂ + linear), nats"]
    assert d.value == pytest.approx((nll["nl"].sum() - nll["lin"].sum()) / n_tok.sum()) and d.excludes_zero
    head = results.headline(p)
    assert head["width 64: CE recovered"] == rec.value and head["width 64: CE recovered, 95% CI"] == rec.format()
    # an older payload: the run's numbers stand, each labelled as a point value without a CI
    old = dict(kind="dark_matter", model="m", decomposition={"64": dict(r2_error_vector=0.4, r2_error_norm_sq=0.8)},
               sae_metrics={"64": dict(fvu=0.2)}, ce={"64": dict(ce_recovered=0.9)})
    head = results.headline(old)
    why = "not assessed: the payload has no per-document sums for this number (point value)"
    assert head == {"width 64: FVU": 0.2, "width 64: FVU, 95% CI": why,
                    "width 64: R²(e | x)": 0.4, "width 64: R²(e | x), 95% CI": why,
                    "width 64: R²(‖e‖² | x)": 0.8, "width 64: R²(‖e‖² | x), 95% CI": why,
                    "width 64: CE recovered": 0.9, "width 64: CE recovered, 95% CI": why}
