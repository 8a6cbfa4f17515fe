"""The four seed papers' headline claims as data, and the rows that set each beside ours with a verdict.

A :class:`Claim` holds what a paper published (metric, model, value, source; METHODS.md §1–§4) and the test
that decides whether our number agrees with it. :func:`claim_rows` turns one result payload (the JSON a run
writes) into :class:`ClaimRow` s: ours as an :class:`~probekit.stats.Estimate` (value, 95% bootstrap CI, n
independent units, METHODS.md §5) and a verdict with its reason.

Verdicts (one per row):

- ``reproduced``: the claim's test holds on the whole 95% interval;
- ``partly``: the point estimate agrees but the interval also admits disagreement;
- ``not``: the interval lies wholly on the wrong side;
- ``too few to conclude``: fewer than :data:`~probekit.stats.MIN_N` units (the number is shown, not judged);
- ``not assessed``: the payload lacks the per-unit values a CI needs (the reason names what is missing).

The tests, per claim ``kind``:

- ``range`` ``(lo, hi)``: the published values across models. Reproduced when our interval overlaps
  ``[lo, hi]`` and its point lies inside; partly when only the interval overlaps; not when it misses.
- ``positive`` / ``negative``: a paired difference (ours − the control) with the published sign. Reproduced when
  the interval excludes 0 on that side; partly when only the point has that sign; not otherwise.
- ``at_least`` ``lo``: reproduced when the interval's low end reaches ``lo``; partly when its high end does.
- ``null`` ``margin``: a published *absence* of a difference (e.g. "no selective safety subspace"), tested as
  equivalence within ``±margin`` on a paired difference. Reproduced when the whole interval lies within
  ``[−margin, margin]`` (any difference is too small to matter, even if the interval excludes 0); partly when
  the interval contains 0 but reaches beyond the margin (no difference shown, none ruled out); not when the
  interval excludes 0 and reaches beyond the margin (a difference the paper says is absent).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .stats import MIN_N, Estimate, bootstrap_ci, bootstrap_ratio, paired_difference, proportion

__all__ = ["Claim", "ClaimRow", "CLAIMS", "VERDICTS", "verdict", "claim_rows", "dark_matter_estimates", "finding",
           "refusal_flags"]

VERDICTS = ("reproduced", "partly", "not", "too few to conclude", "not assessed")
_KINDS = ("range", "positive", "negative", "at_least", "null")


@dataclass(frozen=True)
class Claim:
    """One published headline: ``metric`` measured on ``model`` gave ``published`` (text as printed).

    ``kind`` and ``bounds`` say how our estimate is tested (module docstring); ``key`` names it in code.
    """

    key: str
    paper: str
    metric: str
    model: str
    published: str
    source: str
    kind: str
    bounds: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"claim {self.key!r}: kind must be one of {_KINDS}, got {self.kind!r}")
        need = {"range": 2, "at_least": 1, "positive": 0, "negative": 0, "null": 1}[self.kind]
        if len(self.bounds) != need:
            raise ValueError(f"claim {self.key!r}: kind {self.kind!r} needs {need} bound(s), got {self.bounds}")
        if self.kind == "null" and not self.bounds[0] > 0:
            raise ValueError(f"claim {self.key!r}: a null claim's margin must be > 0, got {self.bounds[0]}")


@dataclass
class ClaimRow:
    """A claim beside ours: ``estimate`` (None when not assessed), the ``verdict`` and its ``reason``."""

    claim: Claim
    model: str
    estimate: Estimate | None
    verdict: str
    reason: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        c = self.claim
        return dict(key=c.key, paper=c.paper, metric=c.metric, published_model=c.model, published=c.published,
                    source=c.source, ours_model=self.model,
                    ours=None if self.estimate is None else self.estimate.to_dict(),
                    verdict=self.verdict, reason=self.reason)


_AST = "AST-Probe (Hernández López et al., ASE 2022)"
_SAFETY = "Safety subspaces (ICLR 2026) and the refusal direction (Arditi et al. 2024)"
_DM = "SAE dark matter (Engels, Riggs, Tegmark, TMLR 2025)"
_LS = "LinearScope (Navarrete Michelini et al., ICCV 2019)"

#: Every headline claim the seeds report checks, by result kind (METHODS.md §1–§4).
CLAIMS: dict[str, tuple[Claim, ...]] = {
    "ast_probe": (
        Claim("ast_best_f1", _AST, "best-layer constituent F1 (Python)",
              "CodeBERT L5 / GraphCodeBERT L4 / CodeT5 L7 / CodeBERTa L4 / RoBERTa L5",
              "0.751 / 0.755 / 0.702 / 0.668 / 0.684", "METHODS.md §1, 4k test snippets", "range", (0.668, 0.755)),
        Claim("ast_vs_layer0", _AST, "best layer − layer 0 (embeddings), F1", "CodeBERT",
              "0.751 − 0.357 = +0.394", "METHODS.md §1 (controls)", "positive"),
        Claim("ast_vs_random_init", _AST, "best layer − random-init model at that layer, F1", "CodeBERT",
              "0.751 − 0.371 = +0.380", "METHODS.md §1 (controls)", "positive"),
    ),
    "safety_activation": (
        Claim("refusal_base", _SAFETY, "refusal rate on harmful prompts, no intervention", "chat models",
              "high (the model refuses)", "METHODS.md §2", "at_least", (0.5,)),
        Claim("ablation_vs_random", _SAFETY, "refusal rate: ablated direction − random direction (harmful prompts)",
              "chat models (Arditi et al.)", "large drop (< 0)", "METHODS.md §2 (refusal direction)", "negative"),
    ),
    # The paper's weight-space headline is a null: a subspace that keeps refusal keeps the task too, so V's svd
    # basis does no better than a random one once both cost the task equally. Margin 0.1 in refusal rate: a gap
    # smaller than one prompt in ten is not a "selective" subspace. The other headline (V and U overlap above the
    # random baseline) has no claim row: its MSO is a mean over weight matrices, which are not sampled units, so
    # no honest bootstrap CI exists for it.
    "safety_weight": (
        Claim("svd_vs_random_equal_loss", _SAFETY,
              "refusal rate: U projected on V's svd basis − on a random basis at equal task loss (harmful prompts)",
              "Llama-2 / Qwen chat models (CERT-Lab)", "no selective safety subspace (difference ≈ 0)",
              "METHODS.md §2 (weight space)", "null", (0.1,)),
    ),
    "dark_matter": (
        Claim("dm_norm_r2", _DM, "R²(‖e‖² | x): the squared error norm regressed on x (OLS with an intercept, "
              "fitted on training documents, pooled over held-out tokens, position 0 excluded)",
              "Gemma 2 / Llama 3.1 SAEs", "> 0.9", "METHODS.md §3", "at_least", (0.9,)),
        Claim("dm_norm_r2_bos", _DM, "R²(‖e‖² | x) with position 0 (BOS) kept in training and scoring (the norm "
              "question: the same regression on every token)", "Gemma 2 / Llama 3.1 SAEs", "> 0.9",
              "METHODS.md §3", "at_least", (0.9,)),
        Claim("dm_vector_r2", _DM, "R²(e | x): share of the error variance linearly predictable, centred, "
              "1 − Σ‖nonlinear‖² / (Σ‖e‖² − ‖Σe‖²/N)", "Gemma 2 / Llama 3.1 SAEs", "about 0.5", "METHODS.md §3",
              "range", (0.4, 0.6)),
    ),
    "linearscope_sr": (
        Claim("ls_sr_energy_vs_random", _LS, "share of ‖A(x)‖²_F on the best k Haar atoms − on k random atoms "
              "(k = 8, output side)", "SR CNNs (the paper's figures)",
              "A(x) is built from wavelet-like atoms", "METHODS.md §4 (image-to-image)", "positive"),
        Claim("ls_sr_energy_vs_dct", _LS, "the same share, best k Haar atoms − best k DCT atoms",
              "SR CNNs (the paper's figures)", "wavelet-like rather than Fourier-like",
              "METHODS.md §4 (image-to-image)", "positive"),
        Claim("ls_sr_localised", _LS, "effective support of the top-k left singular vectors of A(x) − of random "
              "vectors", "SR CNNs (the paper's figures)", "localised (smaller support)",
              "METHODS.md §4 (image-to-image)", "negative"),
        Claim("ls_sr_oscillating", _LS, "level-1 Haar detail fraction of the top-k left singular vectors − of "
              "the output images", "SR CNNs (the paper's figures)", "oscillating (more fine detail)",
              "METHODS.md §4 (image-to-image)", "positive"),
    ),
    "linearscope_i2i": (
        Claim("ls_i2i_copy", _LS, "copy: share of a row of A(x) within ±1 pixel of its own place − random rows",
              "image-to-image CNNs", "rows copy the input around the pixel", "METHODS.md §4 (image-to-image)",
              "positive"),
        Claim("ls_i2i_move", _LS, "move: fraction of rows concentrated away from their place − random rows",
              "image-to-image CNNs", "some rows copy a shifted region", "METHODS.md §4 (image-to-image)",
              "positive"),
    ),
    "linearscope_digits": (
        Claim("ls_bias_share", _LS, "bias share b_c / y_c of the predicted logit (test images)",
              "image classifiers", "classifiers lean heavily on biases (large share)", "METHODS.md §4",
              "at_least", (0.5,)),
    ),
}


def verdict(claim: Claim, est: Estimate | None, *, missing: str = "") -> tuple[str, str]:
    """(verdict, reason) of ``est`` against ``claim`` (module docstring for the rules)."""
    if est is None:
        return "not assessed", missing or "the result holds no per-unit values to build a CI from"
    if est.too_small:
        return "too few to conclude", f"n = {est.n} {est.unit} < {est.min_n}; the number is shown, not judged"
    ci = f"95% CI [{est.low:.3f}, {est.high:.3f}]"
    if claim.kind == "range":
        lo, hi = claim.bounds
        if lo <= est.value <= hi and est.high >= lo and est.low <= hi:
            return "reproduced", f"{est.value:.3f} lies in the published range [{lo}, {hi}]"
        if est.high >= lo and est.low <= hi:
            return "partly", f"{ci} overlaps the published range [{lo}, {hi}] but {est.value:.3f} lies outside"
        side = "below" if est.high < lo else "above"
        return "not", f"{ci} lies wholly {side} the published range [{lo}, {hi}]"
    if claim.kind in ("positive", "negative"):
        sign = 1 if claim.kind == "positive" else -1
        word = "above" if sign > 0 else "below"
        if (est.low > 0) if sign > 0 else (est.high < 0):
            return "reproduced", f"{ci} lies wholly {word} 0"
        if sign * est.value > 0:
            return "partly", f"the difference {est.value:+.3f} has the published sign but {ci} includes 0"
        return "not", f"the difference {est.value:+.3f} does not have the published sign ({ci})"
    if claim.kind == "null":
        (m,) = claim.bounds
        if -m <= est.low and est.high <= m:
            return "reproduced", f"{ci} lies within the margin ±{m}: no difference that matters"
        if est.low <= 0 <= est.high:
            return "partly", f"{ci} includes 0 but reaches beyond the margin ±{m}: a difference is not ruled out"
        return "not", f"{ci} excludes 0 and reaches beyond the margin ±{m}: a difference of {est.value:+.3f}"
    (lo,) = claim.bounds
    if est.low >= lo:
        return "reproduced", f"{ci} lies at or above {lo}"
    if est.high >= lo:
        return "partly", f"{ci} straddles {lo}"
    return "not", f"{ci} lies wholly below {lo}"


def _row(claim: Claim, model: str, est: Estimate | None, missing: str = "") -> ClaimRow:
    v, why = verdict(claim, est, missing=missing)
    return ClaimRow(claim, model, est, v, why)


def _ast_rows(p: dict) -> list[ClaimRow]:
    c = {cl.key: cl for cl in CLAIMS["ast_probe"]}
    model = str(p.get("model", "?"))
    per = (p.get("per_snippet_f1") or {})
    trained, rnd = per.get("trained"), per.get("random_init")
    layers = p["result"]["layers"]
    best = p.get("best_layer_by_validation", layers[int(np.nanargmax(p["result"]["f1"]))])
    bi = layers.index(best)
    missing = "the payload has no per_snippet_f1 (rerun ast-probe with this version)"
    unit = "test snippets"
    if not trained:
        return [_row(c[k], model, None, missing) for k in ("ast_best_f1", "ast_vs_layer0", "ast_vs_random_init")]
    rows = [_row(c["ast_best_f1"], f"{model}, layer {best} (chosen on validation)",
                 bootstrap_ci(trained[bi], unit=unit)),
            _row(c["ast_vs_layer0"], f"{model}, layer {best} − layer 0",
                 paired_difference(trained[bi], trained[0], unit=unit))]
    if rnd:
        rows.append(_row(c["ast_vs_random_init"], f"{model} − random-init copy, layer {best}",
                         paired_difference(trained[bi], rnd[bi], unit=unit)))
    else:
        rows.append(_row(c["ast_vs_random_init"], model, None, "the random-init control was not run "
                         "(random_control: false)"))
    return rows


def refusal_flags(p: dict, condition: str, *, part: str = "refusal", prompts: str = "harmful") -> list[float] | None:
    """Per test prompt of set ``prompts``, 1.0 when its completion under ``condition`` opens with a refusal phrase;
    ``part`` names the evaluation of the payload (``refusal``, or ``induce`` for the activation addition)."""
    from .probes.safety import refusal_phrase_match

    ev = p.get(part) or {}
    comp = ((ev.get("completions") or {}).get(condition) or {}).get(prompts)
    if not comp:
        return None
    kw = {}
    prefix = (ev.get("config") or {}).get("prefix_chars")
    if prefix is not None:
        kw["prefix_chars"] = prefix
    return [float(h) for h in refusal_phrase_match(comp, **kw)]


def _safety_rows(p: dict) -> list[ClaimRow]:
    c = {cl.key: cl for cl in CLAIMS["safety_activation"]}
    model = str(p.get("model", "?"))
    base = refusal_flags(p, "baseline")
    abl, rnd = refusal_flags(p, "ablation"), refusal_flags(p, "random_ablation")
    rows = [_row(c["refusal_base"], model, proportion(base, unit="harmful prompts") if base else None,
                 "no completions under condition 'baseline'")]
    if abl and rnd:
        rows.append(_row(c["ablation_vs_random"], f"{model}, layer {p.get('layer')} direction",
                         paired_difference(abl, rnd, unit="harmful prompts")))
    else:
        rows.append(_row(c["ablation_vs_random"], model, None,
                         "conditions 'ablation' and 'random_ablation' were not both run"))
    return rows


def _safety_weight_rows(p: dict) -> list[ClaimRow]:
    """The svd-vs-random claim on the matched pair of the ``same`` variant (the paper's "amplify" projection;
    else the first variant run) whose task-loss gap is smallest — a choice made on task loss alone, blind to
    refusal. Every pair is in :func:`probekit.results.headline`."""
    from .probes.weight_space import compare_at_equal_task_loss, match_equal_task_loss

    (cl,) = CLAIMS["safety_weight"]
    model = str(p.get("model", "?"))
    rows = p.get("projections") or []
    pairs = match_equal_task_loss(rows)
    if not pairs:
        return [_row(cl, model, None, "the run has no svd and random projections of one variant to compare")]
    variants = [v for v in ("same",) if any(q["variant"] == v for q in pairs)] or [pairs[0]["variant"]]
    sel = [q for q in pairs if q["variant"] == variants[0]]
    best = min(sel, key=lambda q: (abs(q["task_loss_gap"]), q["fraction"]))
    if not best["row"].get("per_prompt") or not best["control"].get("per_prompt"):
        return [_row(cl, model, None, "the projection rows hold no per-prompt outcomes (rerun safety weight with "
                     "this version)")]
    (cmp,) = compare_at_equal_task_loss([best["row"], best["control"]])
    g = cmp["task_loss_gap"]
    where = (f"{model}, {best['variant']}: svd f={best['fraction']} vs random f={best['control_fraction']} "
             f"(task loss gap {g.value:+.3f} [{g.low:+.3f}, {g.high:+.3f}] nats/token, n={g.n} {g.unit})")
    row = _row(cl, where, cmp["refusal"])
    row.extra["task_loss_gap"] = g
    return [row]


def _r2_from_sums(rows: np.ndarray) -> float:
    """R² from per-document columns [Σ(y − ŷ)², Σy, Σy², n] pooled over the rows."""
    sse, sy, syy, n = rows.sum(axis=0)
    sst = syy - sy * sy / n
    return float(1 - sse / sst) if sst > 0 else float("nan")


def _centred_vector_r2(rows: np.ndarray) -> float:
    """Centred R² of e from x from per-document rows [Σ‖nl‖², Σ‖e‖², n, Σe (d columns)] pooled over the rows:
    ``1 − Σ‖nl‖² / (Σ‖e‖² − ‖Σe‖²/N)`` (the error's mean is recomputed from the rows, as the run's R² does)."""
    s = rows.sum(axis=0)
    sst = s[1] - float(s[3:] @ s[3:]) / s[2]
    return float(1 - s[0] / sst) if sst > 0 else float("nan")


def error_r2_estimates(per: dict, *, unit: str = "documents") -> dict[str, Estimate]:
    """R²(e | x) (centred), R²(‖e‖² | x) and R²(‖e‖ | x) with 95% CIs over documents, from one width's
    per-document sums (``dark_matter_run``'s ``per_document`` form: ``nonlinear_sq``, ``norm``, ``norm_sq``,
    ``norm_pow4``, ``norm_sse``, ``norm_sq_sse``, ``n_tokens``, ``error_sum``). Each point is the pooled R² the
    run prints; each resample recomputes it, the means included, from the resampled documents' sums."""
    vec = np.column_stack([per["nonlinear_sq"], per["norm_sq"], per["n_tokens"],
                           np.asarray(per["error_sum"], dtype=np.float64)]).astype(np.float64)
    sq = np.column_stack([per["norm_sq_sse"], per["norm_sq"], per["norm_pow4"], per["n_tokens"]])
    nm = np.column_stack([per["norm_sse"], per["norm"], per["norm_sq"], per["n_tokens"]])
    return {"R²(e | x)": bootstrap_ci(vec, _centred_vector_r2, unit=unit),
            "R²(‖e‖² | x)": bootstrap_ci(sq.astype(np.float64), _r2_from_sums, unit=unit),
            "R²(‖e‖ | x)": bootstrap_ci(nm.astype(np.float64), _r2_from_sums, unit=unit)}


def dark_matter_estimates(p: dict) -> dict[str, Estimate | float]:
    """Every dark-matter headline number of a payload, as an :class:`Estimate` (95% CI over held-out documents,
    METHODS.md §5) where the payload has its per-document sums, else the run's point value (a float).

    Keys: ``width {w}: FVU``, ``… R²(e | x)``, ``… R²(‖e‖² | x)``, ``… R²(‖e‖ | x)``, ``… CE recovered``,
    ``… CE(x̂ + nonlinear) − CE(x̂ + linear)`` (nats; a paired bootstrap over CE documents, each series' per-token
    mean pooled per resample) and ``norm question: <selection>`` for each selection of the norm sweep. Each
    CI's point is the run's pooled number: the statistic is the same pooled ratio recomputed from the sums.
    Only the widest SAE's error-vector and norm sums are stored; the other widths' R² CIs are computed by the run
    from theirs (``error_r2_by_width``), and an older payload without them gives those R²s as points.
    FVU's resamples keep x̄ at the mean of all held-out tokens (each document's Σ‖x − x̄‖² is stored, not Σx);
    the R² of e recomputes the error's mean per resample from Σe.
    """
    unit = "documents"
    out: dict[str, Estimate | float] = {}
    per, fvu_doc, ce_doc = p.get("per_document") or {}, p.get("fvu_per_document") or {}, p.get("ce_per_document")
    for w, d in p["decomposition"].items():
        sse = (fvu_doc.get("sse") or {}).get(w)
        out[f"width {w}: FVU"] = (bootstrap_ratio(sse, fvu_doc["sst"], unit=unit) if sse
                                  else float(p["sae_metrics"][w]["fvu"]))
        widest = str(per.get("width")) == w and "error_sum" in per
        stored = (p.get("error_r2_by_width") or {}).get(w)
        if widest:
            out.update({f"width {w}: {k}": v for k, v in error_r2_estimates(per, unit=unit).items()})
        elif stored:  # computed by the run from this width's per-document sums (not stored: Σe is d floats a doc)
            out.update({f"width {w}: {k}": Estimate.from_dict(v) for k, v in stored.items()})
        else:
            out[f"width {w}: R²(e | x)"] = float(d["r2_error_vector"])
            out[f"width {w}: R²(‖e‖² | x)"] = float(d["r2_error_norm_sq"])
        cw = (ce_doc or {}).get("widths", {}).get(w)
        if cw:
            n = np.asarray(ce_doc["n_tokens"], dtype=np.float64)
            keep = n > 0  # a one-token document has no next-token target: it adds nothing to any sum
            rec = np.column_stack([ce_doc["nll_zero"], cw["nll_sae"], ce_doc["nll_clean"]])[keep]
            out[f"width {w}: CE recovered"] = bootstrap_ci(
                rec, lambda r: float((r[:, 0].sum() - r[:, 1].sum()) / (r[:, 0].sum() - r[:, 2].sum())),
                unit=unit)
            nl, lin = (np.column_stack([cw[k], n])[keep] for k in ("nll_nonlinear", "nll_linear"))
            out[f"width {w}: CE(x̂ + nonlinear) − CE(x̂ + linear), nats"] = paired_difference(
                nl, lin, lambda r: float(r[:, 0].sum() / r[:, 1].sum()), unit=unit)
        elif w in (p.get("ce") or {}):
            c = p["ce"][w]
            out[f"width {w}: CE recovered"] = float(c["ce_recovered"])
            if "ce_nonlinear" in c and "ce_linear" in c:
                out[f"width {w}: CE(x̂ + nonlinear) − CE(x̂ + linear), nats"] = float(c["ce_nonlinear"] -
                                                                                       c["ce_linear"])
    for r in (p.get("norm_question") or {}).get("rows", []):
        out[f"norm question: {r['selection']['name']}"] = Estimate.from_dict(r["r2"])
    return out


def _dark_matter_rows(p: dict) -> list[ClaimRow]:
    c = {cl.key: cl for cl in CLAIMS["dark_matter"]}
    model = str(p.get("model", "?"))
    per = p.get("per_document")
    nq = (p.get("norm_question") or {}).get("rows")
    bos = None
    if nq and len(nq) > 1 and nq[1]["selection"].get("min_position") == 0:
        bos = nq[1]
    if not per:
        w = list(p["decomposition"])[-1]
        why = "the payload has no per_document sums (rerun dark-matter with this version)"
        rows = [_row(c[k], f"{model}, widest SAE ({w})", None, why) for k in ("dm_norm_r2", "dm_vector_r2")]
        rows.insert(1, _bos_row(c["dm_norm_r2_bos"], f"{model}, widest SAE ({w})", bos))
        return rows
    w = str(per["width"])
    where = f"{model}, widest SAE ({w} latents), held-out documents"
    unit = "documents"
    # R² with documents resampled whole (the fitted map stays fixed: the CI covers the evaluation sample, not the
    # fit); each point equals the run's pooled number
    est = dark_matter_estimates(p) if ("norm_sq_sse" in per or "error_sum" in per) else {}
    if "norm_sq_sse" in per:
        norm_row = _row(c["dm_norm_r2"], where, est[f"width {w}: R²(‖e‖² | x)"])
        sec = est[f"width {w}: R²(‖e‖ | x)"]
        norm_row.extra["r2_norm"] = sec
        norm_row.reason += f"; secondary, target ‖e‖ instead of ‖e‖²: {sec.format()}"
    else:
        norm_row = _row(c["dm_norm_r2"], where, None, "the payload's per-document sums are of ‖e‖, not METHODS' "
                        "target ‖e‖² (rerun dark-matter with this version)")
        cols = np.column_stack([per["norm_sse"], per["norm"], per["norm_sq"], per["n_tokens"]]).astype(np.float64)
        norm_row.extra["r2_norm"] = bootstrap_ci(cols, _r2_from_sums, unit=unit)
    if "error_sum" in per:
        vec = _row(c["dm_vector_r2"], where, est[f"width {w}: R²(e | x)"])
    else:
        # an older payload: no per-document Σe, so only the uncentred share 1 − Σ‖nl‖²/Σ‖e‖² can be resampled
        rat = bootstrap_ratio(per["nonlinear_sq"], per["norm_sq"], unit=unit)
        est_u = Estimate(1 - rat.value, 1 - rat.high, 1 - rat.low, rat.n, unit, rat.level,
                         rat.method + ", 1 − ratio", rat.min_n)
        vec = _row(c["dm_vector_r2"], where, est_u)
        vec.reason = ("uncentred share 1 − Σ‖nl‖²/Σ‖e‖², not the centred R² (the payload has no per-document Σe; "
                      "rerun dark-matter with this version): " + vec.reason)
    return [norm_row, _bos_row(c["dm_norm_r2_bos"], where, bos), vec]


def _bos_row(claim: Claim, where: str, bos: dict | None) -> ClaimRow:
    """The norm question's BOS-included R², with its paired difference from the run's choice in the reason."""
    if bos is None:
        return _row(claim, where, None, "the payload has no norm_question (rerun dark-matter with this version, "
                                        "norm_question: true)")
    row = _row(claim, where + ", position 0 kept", Estimate.from_dict(bos["r2"]))
    if bos.get("diff_vs_reference"):
        d = Estimate.from_dict(bos["diff_vs_reference"])
        row.reason += f"; minus the run's choice (BOS excluded), paired over documents: {d.format()}"
    return row


def _linearscope_rows(p: dict) -> list[ClaimRow]:
    (cl,) = CLAIMS["linearscope_digits"]
    t = p["test_set"]
    per = p.get("per_image_share_predicted")
    if per:
        return [_row(cl, "digits CNN (probekit)", bootstrap_ci(per, unit="test images"))]
    row = _row(cl, "digits CNN (probekit)", None,
               f"point value {t['mean_share_predicted']:.3f} over {t['n']} images only: per-image shares are not "
               "stored, so no CI")
    row.extra["point"] = float(t["mean_share_predicted"])
    return [row]


def _linearscope_sr_rows(p: dict) -> list[ClaimRow]:
    """Paired differences over test patches, read from the run's stored Estimates (their per-patch arrays are in
    the payload; :class:`~probekit.probes.linearscope_sr.SRAnalysisResult` recomputes them on load)."""
    h, k = p.get("headline") or {}, p.get("k_headline", 8)
    where = f"×2 SR CNN (probekit), k = {k}, test patches"
    keys = {"ls_sr_energy_vs_random": f"operator_energy_k{k}_haar-random",
            "ls_sr_energy_vs_dct": f"operator_energy_k{k}_haar-dct",
            "ls_sr_localised": "sv_left_support-random_hr_support",
            "ls_sr_oscillating": "sv_left_detail-image_detail"}
    return [_row(c, where, Estimate.from_dict(h[keys[c.key]]) if keys[c.key] in h else None,
                 f"the payload has no headline estimate {keys[c.key]!r}") for c in CLAIMS["linearscope_sr"]]


def _linearscope_i2i_rows(p: dict) -> list[ClaimRow]:
    est = p.get("estimates") or {}
    keys = {"ls_i2i_copy": "copy_share-random", "ls_i2i_move": "move_fraction-random"}
    return [_row(c, "ReLU denoising CNN (probekit), test patches",
                 Estimate.from_dict(est[keys[c.key]]) if keys[c.key] in est else None,
                 f"the payload has no estimate {keys[c.key]!r}") for c in CLAIMS["linearscope_i2i"]]


_ROWS = {"ast_probe": _ast_rows, "safety_activation": _safety_rows, "safety_weight": _safety_weight_rows,
         "dark_matter": _dark_matter_rows,
         "linearscope_digits": _linearscope_rows, "linearscope_sr": _linearscope_sr_rows,
         "linearscope_i2i": _linearscope_i2i_rows}


def claim_rows(payload: dict[str, Any]) -> list[ClaimRow]:
    """The claim rows of one result payload; [] for a kind no seed paper makes a headline claim about."""
    fn = _ROWS.get(payload.get("kind"))
    return fn(payload) if fn else []


def finding(rows: list[ClaimRow]) -> str:
    """One sentence stating the first assessed claim's outcome with its n and CI (or why none is stated)."""
    for r in rows:
        if r.estimate is not None:
            e = r.estimate
            head = f"{r.claim.metric}: {e.value:.3f} (95% CI {e.low:.3f} to {e.high:.3f}, n = {e.n} {e.unit})"
            if e.too_small:
                return f"{head}; below {MIN_N} {e.unit} the sample is too small to conclude."
            return f"{head} on {r.model}; {r.verdict} ({r.reason})."
    if rows:
        return f"No claim could be assessed with a CI: {rows[0].reason}."
    return "No seed-paper claim applies to this result."
