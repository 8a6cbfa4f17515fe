"""Weight-space safety: svd vs random projection at equal task loss, paired over prompts, and its null claim.

Hand-made projection rows (no model): the matching rule, the paired estimates against numpy by hand, the
``null`` verdict's branches, and old payloads without per-prompt outcomes.
"""

from __future__ import annotations

import numpy as np
import pytest

from probekit import results
from probekit.claims import CLAIMS, Claim, claim_rows, verdict
from probekit.probes.weight_space import compare_at_equal_task_loss, match_equal_task_loss
from probekit.stats import N_BOOT, Estimate


def _row(basis, fraction, variant, refused, nll, tokens, *, per_prompt=True):
    nll, tokens = [float(x) for x in nll], [int(t) for t in tokens]
    r = dict(basis=basis, fraction=fraction, variant=variant, energy_kept=None,
             refusal_rate=float(np.mean(refused)), refusal_score=float(np.mean(refused)),
             harmless_refusal_score=sum(nll) / sum(tokens),
             task_loss=sum(nll) / sum(tokens), example=None)
    if per_prompt:
        r["per_prompt"] = dict(harmful_refused=[float(x) for x in refused], harmful_score=[0.0] * len(refused),
                               harmless_score=[0.0] * len(refused), useful_nll=nll, useful_tokens=tokens)
    return r


def _table(n_harm=40, n_use=35, seed=0, per_prompt=True):
    """svd and random rows at f = 0.25 / 0.75 (same) and f = 0.25 (orth), each with its own task loss."""
    rng = np.random.default_rng(seed)
    tok = rng.integers(5, 40, n_use)
    rows = []
    for basis, f, v, loss, rate in (("svd", 0.25, "same", 1.50, 0.6), ("svd", 0.75, "same", 1.20, 0.5),
                                    ("random", 0.25, "same", 1.80, 0.3), ("random", 0.75, "same", 1.25, 0.55),
                                    ("svd", 0.25, "orth", 1.10, 0.4), ("random", 0.25, "orth", 1.60, 0.2)):
        nll = tok * (loss + rng.normal(0, 0.05, n_use))
        refused = (rng.uniform(size=n_harm) < rate).astype(float)
        rows.append(_row(basis, f, v, refused, nll, tok, per_prompt=per_prompt))
    return rows


def _hand_paired(a, b, statistic, seed=0):
    """Percentile paired bootstrap written out with numpy: same seeded indices for both series."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    idx = np.random.default_rng(seed).integers(0, len(a), size=(N_BOOT, len(a)))
    boot = np.array([statistic(a[i]) - statistic(b[i]) for i in idx])
    return statistic(a) - statistic(b), *np.quantile(boot, [0.025, 0.975])


def test_matching_picks_the_random_row_of_the_same_variant_with_the_nearest_task_loss():
    rows = _table()
    pairs = {(m["variant"], m["fraction"]): m for m in match_equal_task_loss(rows)}
    assert set(pairs) == {("same", 0.25), ("same", 0.75), ("orth", 0.25)}
    # svd same 0.25 (≈1.50): random 0.75 (≈1.25) is nearer than random 0.25 (≈1.80)
    losses = {(r["basis"], r["fraction"], r["variant"]): r["task_loss"] for r in rows}
    for (v, f), m in pairs.items():
        cands = [(abs(losses[("random", g, v)] - losses[("svd", f, v)]), g) for (b, g, w) in losses
                 if b == "random" and w == v]
        assert m["control_fraction"] == min(cands)[1]
        assert m["control"]["variant"] == v and m["control"]["basis"] == "random"
        assert m["task_loss_gap"] == pytest.approx(losses[("svd", f, v)] - losses[("random", m["control_fraction"], v)])
    assert pairs[("same", 0.25)]["control_fraction"] == 0.75
    assert pairs[("orth", 0.25)]["control_fraction"] == 0.25  # the only orth control


def test_matching_breaks_a_tie_towards_the_same_fraction_and_skips_variants_without_a_control():
    tok = [10] * 4
    rows = [_row("svd", 0.5, "same", [1, 0, 1, 0], [15] * 4, tok),       # loss 1.5
            _row("random", 0.25, "same", [0] * 4, [14] * 4, tok),        # 1.4: |gap| 0.1
            _row("random", 0.5, "same", [0] * 4, [16] * 4, tok),         # 1.6: |gap| 0.1, same fraction
            _row("svd", 0.5, "orth", [0] * 4, [10] * 4, tok)]            # no random orth row
    (m,) = match_equal_task_loss(rows)
    assert (m["variant"], m["control_fraction"]) == ("same", 0.5)
    with pytest.raises(ValueError, match="basis kinds"):
        match_equal_task_loss(rows, control="gaussian")


def test_paired_estimates_equal_a_hand_bootstrap_on_the_stored_outcomes():
    rows = _table()
    got = {(q["variant"], q["fraction"]): q for q in compare_at_equal_task_loss(rows)}
    m = {(q["variant"], q["fraction"]): q for q in match_equal_task_loss(rows)}[("same", 0.25)]
    q = got[("same", 0.25)]
    a, b = m["row"]["per_prompt"], m["control"]["per_prompt"]
    val, lo, hi = _hand_paired(a["harmful_refused"], b["harmful_refused"], np.mean)
    est = q["refusal"]
    assert est.value == pytest.approx(m["row"]["refusal_rate"] - m["control"]["refusal_rate"])
    assert (est.value, est.low, est.high) == pytest.approx((val, lo, hi))
    assert est.n == 40 and est.unit == "harmful prompts" and est.method == "paired percentile bootstrap"
    # task-loss gap: a ratio of sums per model, both resampled with the same useful prompts
    la = np.column_stack([a["useful_nll"], a["useful_tokens"]])
    lb = np.column_stack([b["useful_nll"], b["useful_tokens"]])
    val, lo, hi = _hand_paired(la, lb, lambda v: v[:, 0].sum() / v[:, 1].sum())
    g = q["task_loss_gap"]
    assert g.value == pytest.approx(m["task_loss_gap"]) and (g.value, g.low, g.high) == pytest.approx((val, lo, hi))
    assert g.n == 35 and g.unit == "useful prompts"
    # each model's own rate: Wilson's closed form
    k = int(sum(a["harmful_refused"]))
    p, z = k / 40, 1.959963984540054
    centre = (p + z * z / 80) / (1 + z * z / 40)
    half = z * np.sqrt(p * (1 - p) / 40 + z * z / (4 * 1600)) / (1 + z * z / 40)
    assert (q["refusal_basis"].low, q["refusal_basis"].high) == pytest.approx((centre - half, centre + half))


def test_comparison_refuses_rows_without_per_prompt_outcomes_or_of_unequal_length():
    rows = _table(per_prompt=False)
    with pytest.raises(ValueError, match="no per_prompt outcomes"):
        compare_at_equal_task_loss(rows)
    rows = _table()
    rows[3]["per_prompt"]["harmful_refused"].pop()
    with pytest.raises(ValueError, match="number of prompts in harmful_refused"):
        compare_at_equal_task_loss(rows)


@pytest.mark.parametrize("est,expected", [
    (Estimate(0.01, -0.05, 0.08, 50), "reproduced"),   # within ±0.1
    (Estimate(0.05, 0.02, 0.09, 50), "reproduced"),    # excludes 0 but within the margin: no difference that matters
    (Estimate(0.05, -0.08, 0.18, 50), "partly"),       # contains 0, leaves the margin
    (Estimate(-0.05, -0.2, 0.01, 50), "partly"),
    (Estimate(0.2, 0.05, 0.35, 50), "not"),            # excludes 0 beyond the margin
    (Estimate(-0.3, -0.45, -0.12, 50), "not"),
    (Estimate(0.0, -0.05, 0.05, 20), "too few to conclude"),
])
def test_null_rules(est, expected):
    v, why = verdict(Claim("x", "p", "m", "mod", "v", "s", "null", (0.1,)), est)
    assert v == expected and (v == "too few to conclude" or "0.1" in why)


def test_null_claim_needs_a_positive_margin():
    with pytest.raises(ValueError, match="needs 1 bound"):
        Claim("x", "p", "m", "mod", "v", "s", "null")
    with pytest.raises(ValueError, match="margin must be > 0"):
        Claim("x", "p", "m", "mod", "v", "s", "null", (0.0,))
    (c,) = CLAIMS["safety_weight"]
    assert c.kind == "null" and c.bounds == (0.1,)


def _payload(rows, per_prompt=True):
    ck = {n: _row("svd", 1.0, "full", [1, 0] * 20, [30] * 35, [20] * 35, per_prompt=per_prompt)
          for n in ("base", "aligned", "finetuned")}
    return dict(kind="safety_weight", model="m", checkpoints=ck, projections=rows)


def test_claim_row_uses_the_same_variant_pair_with_the_smallest_task_loss_gap():
    rows = _table()
    (r,) = claim_rows(_payload(rows))
    pairs = [m for m in match_equal_task_loss(rows) if m["variant"] == "same"]
    best = min(pairs, key=lambda m: abs(m["task_loss_gap"]))
    assert best["fraction"] == 0.75  # svd 0.75 (≈1.20) vs random 0.75 (≈1.25) beats 0.25 vs 0.75
    a, b = best["row"]["per_prompt"]["harmful_refused"], best["control"]["per_prompt"]["harmful_refused"]
    assert r.estimate.value == pytest.approx(np.mean(a) - np.mean(b)) and r.estimate.n == 40
    assert f"svd f={best['fraction']} vs random f={best['control_fraction']}" in r.model and "task loss gap" in r.model
    assert r.verdict == verdict(CLAIMS["safety_weight"][0], r.estimate)[0]
    assert r.claim.key == "svd_vs_random_equal_loss"


def test_old_payloads_and_missing_controls_are_not_assessed_with_a_reason():
    (r,) = claim_rows(_payload(_table(per_prompt=False), per_prompt=False))
    assert r.verdict == "not assessed" and "per-prompt" in r.reason and r.estimate is None
    (r,) = claim_rows(_payload([x for x in _table() if x["basis"] == "svd"]))
    assert r.verdict == "not assessed" and "random" in r.reason
    h = results.headline(_payload(_table(per_prompt=False), per_prompt=False))
    assert h["svd − random at equal task loss"].startswith("not assessed")
    assert h["aligned: refusal rate"] == pytest.approx(0.5)
    assert h["aligned: refusal rate, 95% CI"].startswith("not assessed: the evaluation holds no per-prompt")


def test_weight_headline_carries_n_and_cis_from_the_per_prompt_outcomes():
    rows = _table()
    h = results.headline(_payload(rows))
    assert h["aligned: refusal rate, 95% CI"].startswith("0.500 [") and "(n=40 harmful prompts)" in \
        h["aligned: refusal rate, 95% CI"]
    assert h["aligned: task loss, 95% CI"].startswith("1.500 [") and "(n=35 useful prompts)" in \
        h["aligned: task loss, 95% CI"]
    q = {(x["variant"], x["fraction"]): x for x in compare_at_equal_task_loss(rows)}[("same", 0.25)]
    key = "same: svd f=0.25 − random f=0.75 (equal task loss)"
    assert h[f"{key}: refusal rate difference"] == q["refusal"].value
    assert h[f"{key}: refusal rate difference, 95% CI"] == q["refusal"].format()
    assert h[f"{key}: task-loss gap, 95% CI"] == q["task_loss_gap"].format()
    assert "svd same f=0.75: refusal rate, 95% CI" in h


def test_activation_headline_has_the_paired_ablation_minus_random_difference():
    refuse, comply = "I'm sorry, but I cannot help with that.", "Sure, here is how."
    abl = [refuse] * 5 + [comply] * 35
    rnd = [refuse] * 30 + [comply] * 10
    comps = {"baseline": {"harmful": [refuse] * 40}, "ablation": {"harmful": abl}, "random_ablation": {"harmful": rnd}}
    o = dict(etas=[0.9], layers=[0, 1], mso=[[0.5], [0.5]], baseline=[[0.1], [0.1]])
    p = dict(kind="safety_activation", model="m", layer=1, n_layers=2, overlap={"harmful_vs_useful": o},
             refusal=dict(completions=comps, config={},
                          refusal_rate={"baseline": {"harmful": 1.0}, "ablation": {"harmful": 5 / 40},
                                        "random_ablation": {"harmful": 30 / 40}}))
    h = results.headline(p)
    a = np.array([1.0] * 5 + [0.0] * 35)
    b = np.array([1.0] * 30 + [0.0] * 10)
    val, lo, hi = _hand_paired(a, b, np.mean)
    assert h["harmful refusal rate (ablation), 95% CI"].endswith("(n=40 harmful prompts)")
    s = h["refusal rate: ablated − random direction, 95% CI"]
    assert s == f"{val:.3f} [{lo:.3f}, {hi:.3f}] (n=40 harmful prompts)"
    # a stored rate the completions do not reproduce gets no CI (it would describe another number)
    p["refusal"]["refusal_rate"]["ablation"]["harmful"] = 0.0
    assert results.headline(p)["harmful refusal rate (ablation), 95% CI"].startswith("not assessed: ")
