"""Result files → figures and headline numbers: the one reader shared by the runs, the reports and notebooks.

Every run writes a JSON payload with a ``kind`` (``layer_probes``, ``ast_probe``, ``dark_matter``,
``linearscope_digits``, ``linearscope_lm``). :func:`figures` rebuilds its plotly figures from that payload alone
and :func:`headline` picks the few numbers a summary table shows, so a figure looks the same wherever it is
drawn and nothing is recomputed to draw it.

Public API
----------
RESULT_KINDS
load
find
figures
headline
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RESULT_KINDS", "load", "find", "figures", "headline"]

RESULT_KINDS = ("layer_probes", "ast_probe", "dark_matter", "linearscope_digits", "linearscope_lm")


def load(path: str | Path) -> dict[str, Any]:
    """Read one result JSON; a file without a known ``kind`` is refused with the kinds listed."""
    payload = json.loads(Path(path).read_text())
    kind = payload.get("kind") if isinstance(payload, dict) else None
    if kind not in RESULT_KINDS:
        raise ValueError(f"{path}: not a probekit result (kind {kind!r}; expected one of {RESULT_KINDS})")
    return payload


def find(root: str | Path | None = None) -> list[Path]:
    """Result JSON files under ``root`` (default ``<cache root>/results``), sorted by path."""
    from .paths import results_dir

    base = Path(root) if root is not None else results_dir()
    out = []
    for p in sorted(base.rglob("*.json")):
        try:
            load(p)
        except (ValueError, OSError):
            continue
        out.append(p)
    return out


def _build(cls, d: dict[str, Any], arrays: tuple[str, ...] = ()):
    """A result dataclass from its ``to_dict`` form (array fields back to numpy)."""
    names = {f.name for f in fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    for a in arrays:
        if kw.get(a) is not None:
            kw[a] = np.asarray(kw[a], dtype=float)
    return cls(**kw)


def _layer_probe_figures(p: dict) -> list:
    from .probes.linear import LayerProbeResult

    res = _build(LayerProbeResult, p["result"])
    fig = res.figures()[0]
    fig.update_layout(title=f"{p['model']}: linear probe accuracy per layer — {res.task}")
    return [fig]


def _ast_figures(p: dict) -> list:
    from .probes.ast_figures import f1_vs_k_figure, per_label_recall_figure, tree_comparison_figure
    from .probes.ast_probe import ASTProbeResult

    res = _build(ASTProbeResult, p["result"])
    figs = res.figures()
    best = p.get("best_layer_by_validation", res.best_layer)
    li = res.layers.index(best)
    sweep = p.get("k_sweep")
    if sweep:
        figs.append(f1_vs_k_figure(sweep["ks"], sweep["separate_f1"], sweep["matryoshka_f1"],
                                   d_model=sweep["ks"][-1], controls={"layer 0 (embeddings)": res.f1[0]},
                                   title=f"F1 vs k at layer {sweep['layer']}"))
    if res.label_recall:
        figs.append(per_label_recall_figure(res.label_recall[li], res.label_support,
                                            title=f"Recall per non-terminal, layer {best}"))
    snips, pick = p.get("test_snippets"), p.get("tree_snippet")
    if snips and pick is not None:
        s = snips[pick["index"]]
        figs.append(tree_comparison_figure(s["leaves"], s["gold"], s["pred"], title=f"{s['doc_id']} — layer {best}"))
    return figs


def _dark_matter_figures(p: dict) -> list:
    import plotly.graph_objects as go

    from .probes.dark_matter import (DarkMatterResult, EarlierLayerResult, FVUSplitAcrossWidths,
                                     PerTokenScalingResult, error_norm_scatter, r2_bars_figure)

    figs = _build(FVUSplitAcrossWidths, p["fvu_split"]).figures()
    figs.append(r2_bars_figure({w: _build(DarkMatterResult, d) for w, d in p["decomposition"].items()}))
    ce = p["ce"]
    fig = go.Figure()
    for label, key in [("clean", "ce_clean"), ("x̂", "ce_sae"), ("x̂ + linear error", "ce_linear"),
                       ("x̂ + nonlinear error", "ce_nonlinear"), ("zero ablation", "ce_zero")]:
        fig.add_trace(go.Bar(x=list(ce), y=[v[key] for v in ce.values()], name=label))
    fig.update_layout(barmode="group", template="plotly_white", xaxis_title="SAE width", yaxis_title="CE (nats)",
                      title="Next-token CE with each reconstruction spliced in")
    fig.update_xaxes(type="category")
    figs.append(fig)
    sc = p.get("scatter")
    if sc:
        figs.append(error_norm_scatter(sc["actual"], sc["predicted"], hover_text=sc.get("hover"),
                                       title=f"‖e‖ predicted from x, width {sc['width']} (held-out tokens)"))
    figs += _build(PerTokenScalingResult, p["per_token_scaling"], ("r2", "r2_with_nonlinear", "gain")).figures()
    figs += _build(EarlierLayerResult, p["earlier_layer"]).figures()
    return figs


def _linearscope_digit_figures(p: dict) -> list:
    from .probes.linearscope import DatasetBiasShare, LinearScopeResult

    arrays = ("input", "logits", "bias", "matrix", "singular_values", "left_singular_vectors",
              "right_singular_vectors")
    one = _build(LinearScopeResult, p["one"], arrays)
    one.input = one.input.reshape(p["one"]["in_shape"])
    return one.figures() + _build(DatasetBiasShare, p["test_set"]).figures()


def _linearscope_lm_figures(p: dict) -> list:
    from .probes.linearscope_transformer import TokenContributions

    return _build(TokenContributions, p["contributions"]).figures()


_FIGURES = {"layer_probes": _layer_probe_figures, "ast_probe": _ast_figures, "dark_matter": _dark_matter_figures,
            "linearscope_digits": _linearscope_digit_figures, "linearscope_lm": _linearscope_lm_figures}


def figures(payload: dict[str, Any]) -> list[Any]:
    """The plotly figures of one result payload (see the module docstring)."""
    kind = payload.get("kind")
    if kind not in _FIGURES:
        raise ValueError(f"no figures for result kind {kind!r}; expected one of {RESULT_KINDS}")
    return _FIGURES[kind](payload)


def headline(payload: dict[str, Any]) -> dict[str, Any]:
    """The summary-table numbers of one result payload (flat dict of str -> number or str)."""
    kind = payload.get("kind")
    if kind == "layer_probes":
        r = payload["result"]
        i = int(np.argmax(r["test_score"]))
        return {"best layer": r["layers"][i], "best test accuracy": r["test_score"][i],
                "embedding accuracy": r["test_score"][0], "majority baseline": r["majority_baseline"],
                "token-identity control": r.get("token_identity_control")}
    if kind == "ast_probe":
        r, rnd = payload["result"], payload.get("random_init")
        i = int(np.nanargmax(r["f1"]))
        out = {"best layer": r["layers"][i], "best F1": r["f1"][i], "layer 0 (embeddings) F1": r["f1"][0]}
        if rnd:
            out["best random-init F1"] = float(np.nanmax(rnd["f1"]))
        if payload.get("k_sweep"):
            out["best k (separate fits)"] = payload["k_sweep"]["best_k_separate"]
            out["max |Matryoshka − separate|"] = payload["k_sweep"]["max_abs_gap"]
        return out
    if kind == "dark_matter":
        out: dict[str, Any] = {}
        for w, d in payload["decomposition"].items():
            m = payload["sae_metrics"][w]
            out[f"width {w}: FVU"] = m["fvu"]
            out[f"width {w}: R²(e | x)"] = d["r2_error_vector"]
            out[f"width {w}: R²(‖e‖² | x)"] = d["r2_error_norm_sq"]
            out[f"width {w}: CE recovered"] = payload["ce"][w]["ce_recovered"]
        return out
    if kind == "linearscope_digits":
        t = payload["test_set"]
        return {"mean bias share (predicted class)": t["mean_share_predicted"],
                "mean |b| / (|b| + |Ax|)": t["mean_abs_fraction"], "test accuracy": payload.get("test_accuracy")}
    if kind == "linearscope_lm":
        rec = payload["reconstruction"]
        return {f"reconstruction error ({dt})": v["relative_error"] for dt, v in rec.items()}
    raise ValueError(f"no headline for result kind {kind!r}; expected one of {RESULT_KINDS}")
