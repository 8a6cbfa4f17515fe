"""Result files → figures and headline numbers: the one reader shared by the runs, the reports and notebooks.

Every run writes a JSON payload with a ``kind`` (``layer_probes``, ``ast_probe``, ``dark_matter``,
``linearscope_digits``, ``linearscope_lm``, ``safety_activation``, ``safety_weight``). :func:`figures` rebuilds
its plotly figures from that payload alone and :func:`headline` picks the few numbers a summary table shows, so
a figure looks the same wherever it is drawn and nothing is recomputed to draw it. A figure the app also draws is
built by one public builder that both :func:`figures` and the app's page call; the page's interactive choices are
keyword parameters whose defaults give the report's figure. Where a probe module draws the figure for its result
type, the builder only turns the payload back into that result (:func:`build_result`) and calls the probe's
figure, so notebooks, reports and the app share one drawing.

Public API
----------
RESULT_KINDS
load
find
figures
headline, headline_rows, CI_SUFFIX
build_result
layer_accuracy_figure, hook_stats_figure, HOOK_STATS
ast_layer_figure, AST_METRICS
fvu_split_figure, error_r2_figure, ce_figure, error_scatter_figure, CE_SPLICES
digit_rows_figure, bias_share_figure, token_contributions_figure
overlap_heatmap_figure, overlap_lines_figure, refusal_figure, REFUSAL_VIEWS, projection_curves, projection_table,
tradeoff_figures, WEIGHT_METRICS
"""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import numpy as np

from .figure_layout import fit_figure
from .probes.ast_figures import AST_METRICS

__all__ = ["RESULT_KINDS", "WEIGHT_METRICS", "HOOK_STATS", "AST_METRICS", "CE_SPLICES", "load", "find",
           "figures", "headline", "headline_rows", "CI_SUFFIX", "build_result", "layer_accuracy_figure",
           "hook_stats_figure", "ast_layer_figure",
           "fvu_split_figure", "error_r2_figure", "ce_figure", "error_scatter_figure", "digit_rows_figure",
           "bias_share_figure", "token_contributions_figure", "overlap_heatmap_figure", "overlap_lines_figure",
           "refusal_figure", "REFUSAL_VIEWS", "projection_curves",
           "projection_table", "tradeoff_figures"]

RESULT_KINDS = ("layer_probes", "ast_probe", "dark_matter", "linearscope_digits", "linearscope_lm",
                "safety_activation", "safety_weight", "linearscope_sr", "linearscope_i2i")


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


def build_result(cls, d: dict[str, Any], arrays: tuple[str, ...] = (), *, partial: bool = False):
    """A result dataclass from its ``to_dict`` form (array fields back to numpy).

    Parameters
    ----------
    cls : dataclass type
    d : dict
        Its ``to_dict()``; keys that are not fields are ignored.
    arrays : tuple of str
        Fields turned back into float arrays.
    partial : bool
        Fields missing from ``d`` that have no default become None, so a figure that does not read them still
        draws from a hand-made or older payload (one that does read a missing field fails; the app shows that
        failure as a message).
    """
    names = {f.name for f in fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    if partial:
        for f in fields(cls):
            if f.name not in kw and f.default is MISSING and f.default_factory is MISSING:
                kw[f.name] = None
    for a in arrays:
        if kw.get(a) is not None:
            kw[a] = np.asarray(kw[a], dtype=float)
    return cls(**kw)


# --------------------------------------------------------------------------------------------- per-kind builders
# One builder per figure, shared by the report (``figures``) and the app's pages: the page's interactive choices
# are keyword parameters whose defaults give the report's figure. Figures of a probe's result type are drawn by
# the probe module; these builders adapt the payload to it.


def _fitted(builder):
    """Every figure a builder returns gets a height that fits its content and its legend inside
    (:func:`probekit.figure_layout.fit_figure`), wherever it is drawn."""
    import functools

    @functools.wraps(builder)
    def wrapper(*args, **kwargs):
        out = builder(*args, **kwargs)
        return [fit_figure(f) for f in out] if isinstance(out, list) else fit_figure(out)

    return wrapper


def _check(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, not {value!r}")


@_fitted
def layer_accuracy_figure(p: dict, *, show: tuple[str, ...] | list[str] = ("train", "controls")) -> Any:
    """Linear-probe test score per layer of a ``layer_probes`` payload (``LayerProbeResult.figures``).

    Parameters
    ----------
    p : dict
        The payload; reads ``model`` and ``result`` (``LayerProbeResult.to_dict()``: ``layers``, ``test_score``,
        ``train_score``, ``random_feature_control``, ``majority_baseline``, ``token_identity_control``,
        ``metric``, ``kind``, ``task``, ``n_train``, ``n_test``).
    show : collection of str
        ``"train"`` adds the train score; ``"controls"`` adds the random-feature curve and the constant majority
        (or train-mean) and token-identity baselines. Default: both, as in the report.
    """
    from .probes.linear import LayerProbeResult

    res = build_result(LayerProbeResult, p["result"], partial=True)
    return res.figures(show=show, model=p.get("model", ""))[0]


HOOK_STATS = (("mean_norm", "mean ‖x‖"), ("std_norm", "std of ‖x‖"), ("mean_abs", "mean |x_i|"))


@_fitted
def hook_stats_figure(stats: dict, *, stat: str = "mean_norm", run_id: str = "") -> Any:
    """Bar chart of one activation statistic per hook of a capture run.

    Parameters
    ----------
    stats : dict
        ``{"hooks": [str], "n_sampled": int, <stat>: [float] per hook}`` for each key of :data:`HOOK_STATS`.
    stat : str
        Which statistic (a key of :data:`HOOK_STATS`).
    run_id : str
        Named in the title (first 12 characters).
    """
    import plotly.graph_objects as go

    _check("stat", stat, dict(HOOK_STATS))
    label = dict(HOOK_STATS)[stat]
    fig = go.Figure(go.Bar(x=stats["hooks"], y=stats[stat], name=label))
    fig.update_layout(title=f"{label} per hook, run {run_id[:12]} ({stats['n_sampled']:,} sampled rows)",
                      template="plotly_white", yaxis_title=label, margin={"b": 140})
    fig.update_xaxes(type="category", tickangle=-45)
    return fig


@_fitted
def ast_layer_figure(p: dict, *, metric: str = "f1", controls: bool = True, published: bool = False) -> Any:
    """One AST-Probe score per layer of an ``ast_probe`` payload (``ASTProbeResult.figures``).

    Parameters
    ----------
    p : dict
        The payload; reads ``result`` (``ASTProbeResult.to_dict()``: ``layers``, one list per metric,
        ``controls`` = {name: list of F1, length n_layers or 1}, ``k``, ``n_snippets``),
        ``best_layer_by_validation`` and ``published`` = {name: F1}.
    metric : str
        Which score (a key of :data:`AST_METRICS`).
    controls : bool
        Add the control F1 curves (dashed); only with ``metric="f1"``, the controls being F1 values.
    published : bool
        Add the published F1 numbers as dotted horizontal lines; only with ``metric="f1"``.
    """
    from .probes.ast_probe import ASTProbeResult

    res = build_result(ASTProbeResult, p["result"], partial=True)
    return res.figures(metric=metric, show_controls=controls, published=p.get("published") if published else None,
                       best_layer=p.get("best_layer_by_validation"))[0]


@_fitted
def fvu_split_figure(p: dict, *, mode: str = "stacked") -> Any:
    """FVU per SAE width of a ``dark_matter`` payload, split or total (``FVUSplitAcrossWidths.figures``).

    Parameters
    ----------
    p : dict
        The payload; reads ``hook`` and ``fvu_split`` (``FVUSplitAcrossWidths.to_dict()``: ``widths``, ``fvu``,
        ``absent``, ``linear``, ``nonlinear``, ``cross``, each a list per width, and ``reference_width``).
    mode : {"stacked", "total"}
        Stacked bars of the four parts (as in the report), or one bar of the total FVU per width.
    """
    from .probes.dark_matter import FVUSplitAcrossWidths

    split = build_result(FVUSplitAcrossWidths, p["fvu_split"], partial=True)
    return split.figures(mode=mode, hook=p.get("hook"))[0]


@_fitted
def error_r2_figure(p: dict) -> Any:
    """Grouped bars per SAE width of a ``dark_matter`` payload: held-out R² of e, ‖e‖² and ‖e‖ from x
    (``dark_matter.r2_bars_figure``).

    Parameters
    ----------
    p : dict
        The payload; reads ``decomposition`` = {width: ``DarkMatterResult.to_dict()``} (``r2_error_vector``,
        ``r2_error_norm_sq``, ``r2_error_norm``), and ``per_document`` / ``error_r2_by_width`` when present: the
        bars then carry 95% CIs over held-out documents as error bars (an older payload: the widest SAE's only).
    """
    from .claims import dark_matter_estimates
    from .probes.dark_matter import DarkMatterResult, r2_bars_figure

    dec = {w: build_result(DarkMatterResult, d, partial=True) for w, d in (p.get("decomposition") or {}).items()}
    fig = r2_bars_figure(dec, xaxis_title="SAE width")
    if "error_sum" not in (p.get("per_document") or {}):
        return fig
    est = dark_matter_estimates(p)
    for trace, label in zip(fig.data, ("R²(e | x)", "R²(‖e‖² | x)", "R²(‖e‖ | x)")):
        cis = [est.get(f"width {w}: {label}") for w in dec]
        _error_bars(trace, [None if isinstance(e, float) else e for e in cis])
    every = all(e is not None and not isinstance(e, float) for tr in ("R²(e | x)", "R²(‖e‖² | x)")
                for e in (est.get(f"width {w}: {tr}") for w in dec))
    fig.update_layout(yaxis_title="R² from x (held out; 95% CI over documents"
                                  + (")" if every else ", widest SAE)"))
    return fig


def _error_bars(trace: Any, estimates: list) -> None:
    """Asymmetric error bars on a bar trace from one :class:`~probekit.stats.Estimate` (or None) per bar."""
    trace.error_y = dict(type="data", symmetric=False,
                         array=[None if e is None else e.high - e.value for e in estimates],
                         arrayminus=[None if e is None else e.value - e.low for e in estimates])
    trace.customdata = [None if e is None else e.format() for e in estimates]
    trace.hovertemplate = "%{x}: %{y:.3f}<br>%{customdata}<extra>%{fullData.name}</extra>"


CE_SPLICES = (("clean", "ce_clean"), ("x̂", "ce_sae"), ("x̂ + linear error", "ce_linear"),
              ("x̂ + nonlinear error", "ce_nonlinear"), ("zero ablation", "ce_zero"))


@_fitted
def ce_figure(p: dict) -> Any:
    """Grouped bars per SAE width of a ``dark_matter`` payload: next-token CE with each reconstruction spliced in.

    Parameters
    ----------
    p : dict
        The payload; reads ``ce`` = {width: {key: nats}} for each key of :data:`CE_SPLICES`, and
        ``ce_per_document`` when present: each bar then carries its 95% CI over the CE documents (the pooled
        per-token mean Σ NLL / Σ tokens, documents resampled) as an error bar.
    """
    import plotly.graph_objects as go

    from .stats import bootstrap_ratio

    ce = p.get("ce") or {}
    per = p.get("ce_per_document")
    fig = go.Figure()
    for name, key in CE_SPLICES:
        fig.add_trace(go.Bar(x=list(ce), y=[v.get(key) for v in ce.values()], name=name))
        if per:
            col = {"ce_clean": "nll_clean", "ce_zero": "nll_zero", "ce_sae": "nll_sae", "ce_linear": "nll_linear",
                   "ce_nonlinear": "nll_nonlinear"}[key]
            n = per["n_tokens"]
            _error_bars(fig.data[-1], [bootstrap_ratio(per[col] if col in per else per["widths"][w][col], n,
                                                       unit="documents") if w in per["widths"] else None
                                       for w in ce])
    fig.update_layout(barmode="group", template="plotly_white", xaxis_title="SAE width",
                      yaxis_title="CE (nats)" + ("; 95% CI over documents" if per else ""),
                      title="Next-token CE with each reconstruction spliced in")
    fig.update_xaxes(type="category")
    return fig


@_fitted
def error_scatter_figure(p: dict, *, diagonal: bool = True) -> Any:
    """Per held-out token, ‖e‖ predicted from x (y) against actual (x) (``dark_matter.error_norm_scatter``).

    Parameters
    ----------
    p : dict
        A ``dark_matter`` payload with ``scatter`` = {``width``, ``actual``: [float], ``predicted``: [float],
        ``hover``: [str] or absent}, an evenly spaced subset of held-out tokens, all of which are drawn.
    diagonal : bool
        Add the dashed ``y = x`` line (the report's reference; the page leaves it out).
    """
    from .probes.dark_matter import error_norm_scatter

    sc = p["scatter"]
    return error_norm_scatter(sc["actual"], sc["predicted"], hover_text=sc.get("hover"),
                              max_points=max(len(sc["actual"]), 1), diagonal=diagonal,
                              title=f"Per-token ‖e‖ predicted from x, SAE width {sc.get('width', '')} "
                                    "(held-out tokens)")


_SCOPE_ARRAYS = ("input", "logits", "bias", "matrix", "singular_values", "left_singular_vectors",
                 "right_singular_vectors")


def _scope_result(p: dict):
    """The ``LinearScopeResult`` of a ``linearscope_digits`` payload's ``one``, its input back in ``in_shape``."""
    from .probes.linearscope import LinearScopeResult

    one = build_result(LinearScopeResult, p["one"], _SCOPE_ARRAYS, partial=True)
    one.input = one.input.reshape(p["one"].get("in_shape", one.input.shape))
    return one


def digit_rows_figure(p: dict, *, index: int | None = None) -> Any:
    """A ``linearscope_digits`` payload as images: the input, then each class row of A(x)
    (``LinearScopeResult.digit_rows_figure``).

    Parameters
    ----------
    p : dict
        The payload; reads ``one`` (``LinearScopeResult.to_dict()``: ``input``, ``in_shape``, ``matrix`` of shape
        (n_classes, n_pixels), ``label``, ``predicted``).
    index : int, optional
        Test-set index of the digit, named in the title.
    """
    return _scope_result(p).digit_rows_figure(index=index)


@_fitted
def bias_share_figure(p: dict) -> Any:
    """Bars of the bias share b_k / y_k per class of one digit (predicted class in red), with the test-set mean
    (``LinearScopeResult.bias_share_figure``).

    Parameters
    ----------
    p : dict
        A ``linearscope_digits`` payload; reads ``one`` (``bias``, ``logits``, ``predicted``) and ``test_set``
        (``mean_share_predicted``).
    """
    return _scope_result(p).bias_share_figure(test_mean=(p.get("test_set") or {}).get("mean_share_predicted"))


@_fitted
def token_contributions_figure(p: dict, *, view: str = "heatmap") -> Any:
    """Each prompt token's contribution to the predicted logit: LinearScope (exact) beside gradient × input
    (``TokenContributions.figures``).

    Parameters
    ----------
    p : dict
        A ``linearscope_lm`` payload; reads ``prompt`` and ``contributions`` (``TokenContributions.to_dict()``:
        ``tokens``, ``target``, ``logit``, ``bias``, ``linearscope`` and ``grad_x_input``, one float per token).
    view : {"heatmap", "bars"}
        A two-row heatmap on a symmetric colour scale (as in the report), or grouped bars per token.
    """
    from .probes.linearscope_transformer import TokenContributions

    tc = build_result(TokenContributions, p["contributions"])
    return tc.figures(view=view, prompt=p.get("prompt", ""))[0]


def _layer_probe_figures(p: dict) -> list:
    return [layer_accuracy_figure(p)]


def _ast_figures(p: dict) -> list:
    from .probes.ast_figures import f1_vs_k_figure, per_label_recall_figure, tree_comparison_figure
    from .probes.ast_probe import ASTProbeResult

    res = build_result(ASTProbeResult, p["result"])
    figs = [ast_layer_figure(p)]
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
    from .probes.dark_matter import EarlierLayerResult, PerTokenScalingResult

    figs = [fvu_split_figure(p), error_r2_figure(p), ce_figure(p)]
    if p.get("scatter"):
        figs.append(error_scatter_figure(p))
    figs += build_result(PerTokenScalingResult, p["per_token_scaling"], ("r2", "r2_with_nonlinear", "gain")).figures()
    figs += build_result(EarlierLayerResult, p["earlier_layer"]).figures()
    if (p.get("norm_question") or {}).get("rows"):
        figs.append(norm_question_figure(p))
    return figs


@_fitted
def norm_question_figure(p: dict) -> Any:
    """Held-out R² of the widest SAE's error norm from x under each token selection of the run's norm question
    (position 0 excluded or kept, …), 95% CIs over held-out documents as error bars
    (``NormSweepResult.figure``). Reads ``norm_question`` (``NormSweepResult.to_dict``)."""
    from .probes.dark_matter_norms import NormSelection, NormSweepResult, NormSweepRow
    from .stats import Estimate

    def est(d: dict | None) -> Estimate | None:
        return None if d is None else Estimate.from_dict(d)

    def nan(v: float | None) -> float:  # to_dict writes a non-finite number as None
        return float("nan") if v is None else float(v)

    nq = p["norm_question"]
    rows = [NormSweepRow(selection=NormSelection(**r["selection"]), r2=est(r["r2"]), r2_train=nan(r["r2_train"]),
                         diff_vs_reference=est(r.get("diff_vs_reference")), n_train_tokens=r["n_train_tokens"],
                         n_test_tokens=r["n_test_tokens"], n_train_docs=r["n_train_docs"],
                         tokens_per_dim=r["tokens_per_dim"], max_token_share=nan(r.get("max_token_share")),
                         max_doc_share=nan(r.get("max_doc_share"))) for r in nq["rows"]]
    return NormSweepResult(rows=rows, d_in=nq["d_in"], label=nq.get("label", ""), notes=nq.get("notes", [])).figure()


def _linearscope_digit_figures(p: dict) -> list:
    from .probes.linearscope import DatasetBiasShare

    test_set = build_result(DatasetBiasShare, p["test_set"])
    return (_scope_result(p).figures(test_mean_share=test_set.mean_share_predicted)
            + test_set.figures())


def _linearscope_lm_figures(p: dict) -> list:
    return [token_contributions_figure(p)]


def _nearest(values: list[float], target: float) -> int:
    return int(np.argmin([abs(v - target) for v in values]))


@_fitted
def overlap_lines_figure(overlap: dict[str, dict], eta: float = 0.9) -> Any:
    """MSO per layer at the energy fraction nearest ``eta``, one line per pair of sets, with dashed baselines.

    ``overlap`` maps a pair name to an ``ActivationOverlapResult.to_dict()``.
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (name, o) in enumerate(overlap.items()):
        j = _nearest(o["etas"], eta)
        color = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"][i % 4]
        label = " vs ".join(o["names"])
        y = [np.nan if r[j] is None else r[j] for r in o["mso"]]
        fig.add_trace(go.Scatter(x=o["layers"], y=y, mode="lines+markers", name=f"{label}: MSO",
                                 line={"color": color}))
        fig.add_trace(go.Scatter(x=o["layers"], y=[r[j] for r in o["baseline"]], mode="lines",
                                 name=f"{label}: random baseline", line={"color": color, "dash": "dash"}))
    etas = next(iter(overlap.values()))["etas"]
    fig.update_layout(title=f"Activation-subspace overlap per layer at η = {etas[_nearest(etas, eta)]}",
                      xaxis_title="layer", yaxis_title="MSO", template="plotly_white", yaxis_range=[0, 1.02])
    return fig


@_fitted
def overlap_heatmap_figure(p: dict, *, pair: str = "harmful_vs_useful", excess: bool = True) -> Any:
    """Layer × η heat map of the MSO of one pair of prompt sets of a ``safety_activation`` payload
    (``ActivationOverlapResult.figures``).

    Parameters
    ----------
    p : dict
        The payload; reads ``overlap`` = {pair: ``ActivationOverlapResult.to_dict()``}.
    pair : str
        Which pair (a key of ``overlap``).
    excess : bool
        MSO minus its random baseline (as in the report), or the raw MSO.
    """
    from .probes.safety import ActivationOverlapResult

    return build_result(ActivationOverlapResult, p["overlap"][pair]).figures(excess=excess)[0]


REFUSAL_VIEWS = ("rate", "score", "actadd")


@_fitted
def refusal_figure(p: dict, *, view: str = "rate") -> Any:
    """Refusal of a ``safety_activation`` payload with the refusal direction ablated, a random one, or neither:
    the refusal rate (``"rate"``), the refusal score (``"score"``), or harmless prompts with the direction added
    (``"actadd"``, reads ``induce``) (``RefusalResult.figures``)."""
    from .probes.safety import RefusalResult

    _check("view", view, REFUSAL_VIEWS)
    if view == "actadd":
        fig = build_result(RefusalResult, p["induce"]).figures()[0]
        fig.update_layout(title=f"Harmless prompts with the layer-{p['layer']} direction added (and a random one)")
        return fig
    fig = build_result(RefusalResult, p["refusal"]).figures()[0 if view == "rate" else 1]
    fig.update_layout(title=f"{fig.layout.title.text} (layer {p['layer']} direction, test prompts)")
    return fig


def _safety_activation_figures(p: dict) -> list:
    from .probes.linear import LayerProbeResult
    from .probes.safety import ActivationOverlapResult, LayerSelection, RefusalResult

    figs = []
    for name in ("harmful_vs_useful", "harmful_vs_harmless", "harmless_vs_useful"):
        if name in p["overlap"]:
            figs += build_result(ActivationOverlapResult, p["overlap"][name]).figures()
    figs.append(overlap_lines_figure(p["overlap"]))
    centred = p.get("overlap_centred")
    if centred:
        figs += build_result(ActivationOverlapResult, centred["harmful_vs_useful"]).figures()
        f = overlap_lines_figure(centred)
        f.update_layout(title=f"{f.layout.title.text} (centred)")
        figs.append(f)
    sep = build_result(LayerProbeResult, p["separability"]).figures()[0]
    sep.update_layout(title=f"{p['model']}: harmful vs harmless, linear separability per layer (held-out)")
    figs.append(sep)
    figs += build_result(LayerSelection, p["layer_selection"]).figures()
    for f in build_result(RefusalResult, p["refusal"]).figures():
        f.update_layout(title=f"{f.layout.title.text} (layer {p['layer']} direction, test prompts)")
        figs.append(f)
    if p.get("induce"):
        f = build_result(RefusalResult, p["induce"]).figures()[0]
        f.update_layout(title=f"Harmless prompts with the layer-{p['layer']} direction added (and a random one)")
        figs.append(f)
    return figs


WEIGHT_METRICS = (("refusal_rate", "refusal rate on harmful test prompts"),
                   ("task_loss", "task loss on held-out coding requests (nats/token)"),
                   ("refusal_score", "mean refusal score, harmful prompts (log-odds)"),
                   ("harmless_refusal_score", "mean refusal score, harmless prompts (log-odds)"))


@_fitted
def projection_curves(p: dict) -> list:
    """Rank fraction → each behaviour metric, one line per (basis, variant), with the three checkpoints."""
    import plotly.graph_objects as go

    rows, ck = p["projections"], p["checkpoints"]
    dash = {"svd": "solid", "random": "dot", "randomk": "dash"}
    color = {"same": "#d62728", "orth": "#1f77b4", "opp": "#ff7f0e", "full": "#7f7f7f", "none": "#2ca02c"}
    figs = []
    for key, label in WEIGHT_METRICS:
        fig = go.Figure()
        for b in dict.fromkeys(r["basis"] for r in rows):
            for v in dict.fromkeys(r["variant"] for r in rows):
                sel = sorted((r for r in rows if r["basis"] == b and r["variant"] == v), key=lambda r: r["fraction"])
                if sel:
                    fig.add_trace(go.Scatter(x=[r["fraction"] for r in sel], y=[r[key] for r in sel],
                                             mode="lines+markers", name=f"{v}, {b} basis",
                                             line={"dash": dash.get(b, "solid"), "color": color.get(v)}))
        for name, c in (("base", "#8c564b"), ("aligned", "#2ca02c"), ("finetuned", "#7f7f7f")):
            if name in ck:
                fig.add_hline(y=ck[name][key], line_dash="dashdot", line_color=c, annotation_text=name,
                              annotation_position="top left")
        fig.update_layout(title=f"Projected fine-tuning update: {label}", xaxis_title="rank fraction f of V's "
                          "subspace", yaxis_title=label, template="plotly_white")
        figs.append(fig)
    return figs


@_fitted
def tradeoff_figures(p: dict) -> list:
    """Every model as a point: (1) task loss vs refusal rate; (2) harmless vs harmful refusal score.

    A selective safety subspace would show up in (1) as projections that keep the fine-tuned task loss with the
    aligned refusal rate, and in (2) as projections that move the harmful score without the harmless one.
    """
    import plotly.graph_objects as go

    ck, rows = p["checkpoints"], p["projections"]
    symbol = {"same": "circle", "orth": "square", "opp": "diamond", "full": "x", "none": "cross"}
    color = {"svd": "#d62728", "random": "#1f77b4", "randomk": "#2ca02c"}
    figs = []
    for (xk, xl), (yk, yl), title in (
            (("task_loss", "task loss (nats/token)"), ("refusal_rate", "refusal rate, harmful test prompts"),
             "Safety–utility trade-off of every model"),
            (("harmless_refusal_score", "refusal score, harmless prompts"),
             ("refusal_score", "refusal score, harmful prompts"),
             "Refusal on harmful vs harmless prompts (log-odds)")):
        fig = go.Figure()
        for b in dict.fromkeys(r["basis"] for r in rows):
            for v in dict.fromkeys(r["variant"] for r in rows):
                sel = [r for r in rows if r["basis"] == b and r["variant"] == v]
                if sel:
                    fig.add_trace(go.Scatter(
                        x=[r[xk] for r in sel], y=[r[yk] for r in sel], mode="markers+text",
                        text=[str(r["fraction"]) for r in sel], textposition="top center", name=f"{v}, {b}",
                        marker={"symbol": symbol.get(v, "circle"), "color": color.get(b), "size": 9}))
        fig.add_trace(go.Scatter(x=[c[xk] for c in ck.values()], y=[c[yk] for c in ck.values()],
                                 mode="markers+text", text=list(ck), textposition="bottom center",
                                 name="checkpoints", marker={"symbol": "star", "size": 14, "color": "black"}))
        fig.update_layout(title=title + " (labels: rank fraction f)", xaxis_title=xl, yaxis_title=yl,
                          template="plotly_white")
        figs.append(fig)
    return figs


def projection_table(p: dict) -> Any:
    """The projection experiment as a plotly table: one row per checkpoint and per (basis, fraction, variant)."""
    import plotly.graph_objects as go

    head = ["model", "basis", "f", "variant", "energy kept", "refusal rate", "refusal score", "harmless score",
            "task loss"]
    rows = [[n, "", "", "", "", c["refusal_rate"], c["refusal_score"], c["harmless_refusal_score"], c["task_loss"]]
            for n, c in p["checkpoints"].items()]
    rows += [["projection", r["basis"], r["fraction"], r["variant"], r.get("energy_kept"), r["refusal_rate"],
              r["refusal_score"], r["harmless_refusal_score"], r["task_loss"]] for r in p["projections"]]
    fmt = lambda x: f"{x:.3f}" if isinstance(x, float) else ("" if x is None else str(x))  # noqa: E731
    cols = [[fmt(r[i]) for r in rows] for i in range(len(head))]
    fig = go.Figure(go.Table(header={"values": head}, cells={"values": cols}))
    fig.update_layout(title=f"{p['model']}: refusal and task loss of each model", height=60 + 24 * len(rows))
    return fig


def _safety_weight_figures(p: dict) -> list:
    from .probes.weight_space import UpdateOverlapResult, WeightSpaceResult

    figs = [projection_table(p)] + projection_curves(p) + tradeoff_figures(p)
    figs += build_result(WeightSpaceResult, p["weight_space"]).figures()
    figs += build_result(UpdateOverlapResult, p["update_overlap"]).figures()
    return figs


def _linearscope_sr_figures(p: dict) -> list:
    from .probes.linearscope_sr import SRAnalysisResult

    return SRAnalysisResult.from_dict(p).figures()


def _linearscope_i2i_figures(p: dict) -> list:
    from .probes.linearscope_i2i import I2IAnalysisResult

    arr = np.asarray
    return I2IAnalysisResult(shape=tuple(p["shape"]), window=p["window"], max_shift=p["max_shift"],
                             measures={k: arr(v) for k, v in p["measures"].items()},
                             psnr={k: arr(v) for k, v in p["psnr"].items()},
                             jacobian_max_abs_diff=p["jacobian_max_abs_diff"], example=p["example"],
                             seed=p["seed"], n_boot=p["n_boot"], model_info=p.get("model_info", {})).figures()


def _estimates(d: dict) -> dict[str, str]:
    """Stored :class:`~probekit.stats.Estimate` dicts as ``value [low, high] (n=… unit)`` strings."""
    from .stats import Estimate

    return {k: Estimate.from_dict(e).format() for k, e in d.items()}


_FIGURES = {"linearscope_sr": _linearscope_sr_figures, "linearscope_i2i": _linearscope_i2i_figures,
            "layer_probes": _layer_probe_figures, "ast_probe": _ast_figures, "dark_matter": _dark_matter_figures,
            "linearscope_digits": _linearscope_digit_figures, "linearscope_lm": _linearscope_lm_figures,
            "safety_activation": _safety_activation_figures, "safety_weight": _safety_weight_figures}


def figures(payload: dict[str, Any]) -> list[Any]:
    """The plotly figures of one result payload (see the module docstring)."""
    kind = payload.get("kind")
    if kind not in _FIGURES:
        raise ValueError(f"no figures for result kind {kind!r}; expected one of {RESULT_KINDS}")
    return [fit_figure(f) for f in _FIGURES[kind](payload)]


#: Suffix of the key that carries a headline number's interval: ``"best F1"`` → ``"best F1, 95% CI"``.
CI_SUFFIX = ", 95% CI"


def _estimate_or_reason(est) -> str:
    from .stats import Estimate

    return est.format() if isinstance(est, Estimate) else f"not assessed: {est}"


def _put(out: dict[str, Any], name: str, value: Any, est) -> None:
    """``out[name]`` = the number, ``out[name + CI_SUFFIX]`` = its interval (``Estimate.format()``) or
    ``"not assessed: <why>"``; below ``min_n`` units the number's place says "too few to conclude (n = …)"."""
    from .stats import Estimate

    if isinstance(est, Estimate) and est.too_small:
        value = f"too few to conclude (n = {est.n} {est.unit})"
    out[name] = value
    out[name + CI_SUFFIX] = _estimate_or_reason(est)


def _layer_probe_headline(payload: dict[str, Any]) -> dict[str, Any]:
    from .stats import bootstrap_ratio, paired_difference

    r = payload["result"]
    i = int(np.argmax(r["test_score"]))
    out: dict[str, Any] = {"best layer": r["layers"][i],
                           # the demo has no validation split: the maximum over layers is taken on test
                           "best layer chosen on": "test split (optimistic: no validation split)"}
    per = payload.get("per_function")
    if per:  # correct / scored test tokens per function: a pooled accuracy, functions resampled whole
        unit = per.get("unit", "test functions")
        tokens = np.asarray(per["tokens"], dtype=np.float64)
        corr = {k: np.asarray(v, dtype=np.float64) for k, v in per["correct"].items()}
        best, emb = corr[r["layers"][i]], corr[r["layers"][0]]
        est = {k: bootstrap_ratio(v, tokens, unit=unit) for k, v in
               (("best", best), ("embed", emb), ("majority", np.asarray(per["majority_correct"], dtype=float)))}
        pooled = lambda rows: float(rows[:, 0].sum() / rows[:, 1].sum())  # noqa: E731
        diff = paired_difference(np.column_stack([best, tokens]), np.column_stack([emb, tokens]), pooled,
                                 unit=unit)
    else:
        why = "the payload has no per_function correctness (rerun the demo with this version)"
        est, diff = dict.fromkeys(("best", "embed", "majority"), why), why
    _put(out, "best test accuracy", r["test_score"][i], est["best"])
    _put(out, "embedding accuracy", r["test_score"][0], est["embed"])
    _put(out, "best − embedding accuracy", r["test_score"][i] - r["test_score"][0], diff)
    _put(out, "majority baseline", r["majority_baseline"], est["majority"])
    if r.get("token_identity_control") is not None:
        _put(out, "token-identity control", r["token_identity_control"],
             "per-function token-identity predictions are not stored (a stated point)")
    return out


def _ast_headline(payload: dict[str, Any]) -> dict[str, Any]:
    from .stats import bootstrap_ci, paired_difference

    r, rnd = payload["result"], payload.get("random_init")
    layers, f1 = r["layers"], r["f1"]
    chosen = payload.get("best_layer_by_validation")
    if chosen is not None and chosen in layers:
        bi, how = layers.index(chosen), "validation split"
    else:  # an older payload without the validation choice: the maximum over layers on test
        bi, how = int(np.nanargmax(f1)), "test split (optimistic: no validation choice stored)"
    out: dict[str, Any] = {"best layer": layers[bi], "best layer chosen on": how}
    per = payload.get("per_snippet_f1") or {}
    trained, rper = per.get("trained"), per.get("random_init")
    unit = "test snippets"
    why = "the payload has no per_snippet_f1 (rerun ast-probe with this version)"
    _put(out, "best F1", f1[bi], bootstrap_ci(trained[bi], unit=unit) if trained else why)
    _put(out, "layer 0 (embeddings) F1", f1[0], bootstrap_ci(trained[0], unit=unit) if trained else why)
    _put(out, "best − layer 0 F1", f1[bi] - f1[0],
         paired_difference(trained[bi], trained[0], unit=unit) if trained else why)
    if rnd:
        rf1 = rnd["f1"][bi]
        ok = bool(trained and rper)
        rwhy = why if not trained else "the payload has no per-snippet F1 of the random-init control"
        _put(out, "random-init F1 (best layer)", rf1, bootstrap_ci(rper[bi], unit=unit) if ok else rwhy)
        _put(out, "best − random-init F1 (same layer)", f1[bi] - rf1,
             paired_difference(trained[bi], rper[bi], unit=unit) if ok else rwhy)
    if payload.get("k_sweep"):
        out["best k (separate fits)"] = payload["k_sweep"]["best_k_separate"]
        _put(out, "max |Matryoshka − separate|", payload["k_sweep"]["max_abs_gap"],
             "the k sweep stores one F1 per k, not per snippet")
    return out


def _linearscope_digits_headline(payload: dict[str, Any]) -> dict[str, Any]:
    from .stats import Estimate, bootstrap_ci, wilson_interval

    t = payload["test_set"]
    out: dict[str, Any] = {}
    per = payload.get("per_image_share_predicted")
    _put(out, "mean bias share (predicted class)", t["mean_share_predicted"],
         bootstrap_ci(per, unit="test images") if per else
         "per-image shares are not stored (rerun linearscope with this version)")
    if t.get("mean_abs_fraction") is not None:
        _put(out, "mean |b| / (|b| + |Ax|)", t["mean_abs_fraction"], "per-image fractions are not stored")
    acc, n = t.get("accuracy"), t.get("n")
    if acc is None:  # older payloads: the network's own test accuracy, on the same held-out digits
        acc = payload.get("test_accuracy")
    if acc is None:
        out["test accuracy"] = None
        return out
    k = round(acc * n) if isinstance(n, int) and n > 0 else None
    if k is None or abs(acc * n - k) > 1e-3:  # a float32 mean of 0/1 is a count / n to ~1e-5
        _put(out, "test accuracy", acc, f"the accuracy {acc} is not a count of correct images out of n = {n}")
        return out
    lo, hi = wilson_interval(k, n)  # a proportion over test images: the closed-form interval
    _put(out, "test accuracy", acc, Estimate(k / n, lo, hi, n, "test images", method="Wilson score"))
    return out


def _linearscope_lm_headline(payload: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dt, v in payload["reconstruction"].items():
        _put(out, f"reconstruction error ({dt})", v["relative_error"],
             "an exactness check on one prompt, not a sample statistic")
    return out


def _safety_activation_headline(payload: dict[str, Any]) -> dict[str, Any]:
    """Refusal rates per condition (Wilson 95% CI over harmful test prompts), the claim-carrying ablated − random
    direction difference (paired over the same prompts), and the late-layer MSO means (stated points: their cells
    are layers and η values, not sampled units)."""
    from .claims import refusal_flags
    from .stats import paired_difference, proportion

    rr, o = payload["refusal"]["refusal_rate"], payload["overlap"]["harmful_vs_useful"]
    j = _nearest(o["etas"], 0.9)
    L = payload["n_layers"]
    late = [i for i, l in enumerate(o["layers"]) if 0.65 * L <= l < 0.9 * L] or list(range(len(o["layers"])))
    out: dict[str, Any] = {"refusal-direction layer": payload["layer"]}

    def rate_ci(flags: list[float] | None, rate: float, unit: str):
        if not flags:
            return "the payload holds no completions for this condition (no per-prompt outcomes)"
        # the flags must give the stored rate, else the CI would describe another number
        return (proportion(flags, unit=unit) if abs(np.mean(flags) - rate) < 1e-9
                else "the completions' phrase matches do not reproduce the stored rate")

    for c in rr:
        _put(out, f"harmful refusal rate ({c})", rr[c]["harmful"],
             rate_ci(refusal_flags(payload, c), rr[c]["harmful"], "harmful prompts"))
    abl, rnd = refusal_flags(payload, "ablation"), refusal_flags(payload, "random_ablation")
    if abl and rnd and len(abl) == len(rnd):  # the claim-carrying comparison: paired over the same prompts
        d = paired_difference(abl, rnd, unit="harmful prompts")
        _put(out, "refusal rate: ablated − random direction", d.value, d)
    if payload.get("induce"):
        rate = payload["induce"]["refusal_rate"]["actadd"]["harmless"]
        _put(out, "harmless refusal rate (actadd)", rate, rate_ci(
            refusal_flags(payload, "actadd", part="induce", prompts="harmless"), rate, "harmless prompts"))

    def cells(ov: dict, key: str) -> float:  # mean over the late layers at η ≈ 0.9; None (k = 0) skipped
        return float(np.nanmean([np.nan if ov[key][i][j] is None else ov[key][i][j] for i in late]))

    point = "a mean over layers at η ≈ 0.9 (subspaces of the training prompts), not over sampled units"
    _put(out, "MSO harmful vs useful, η≈0.9, 65–90% depth", cells(o, "mso"), point)
    _put(out, "random baseline (same cells)", cells(o, "baseline"), point)
    c = (payload.get("overlap_centred") or {}).get("harmful_vs_useful")
    if c:
        _put(out, "centred MSO harmful vs useful, same cells", cells(c, "mso"), point)
        _put(out, "centred baseline (same cells)", cells(c, "baseline"), point)
    return out


def _safety_weight_headline(payload: dict[str, Any]) -> dict[str, Any]:
    """Checkpoints' refusal rates (Wilson 95% CI over harmful prompts) and task losses (ratio bootstrap over
    useful prompts), and every svd-vs-random pair at equal task loss (paired bootstrap over the same prompts).
    A payload without per-prompt outcomes shows its point values and says why no CI is given."""
    from .probes.weight_space import compare_at_equal_task_loss
    from .stats import bootstrap_ratio, proportion

    ck, rows = payload["checkpoints"], payload["projections"]
    out: dict[str, Any] = {}
    why = "the evaluation holds no per-prompt outcomes (rerun safety weight with this version)"

    def model_numbers(name: str, c: dict) -> None:
        per = c.get("per_prompt")
        _put(out, f"{name}: refusal rate", c["refusal_rate"],
             proportion(per["harmful_refused"], unit="harmful prompts") if per else why)
        _put(out, f"{name}: task loss", c["task_loss"],
             bootstrap_ratio(per["useful_nll"], per["useful_tokens"], unit="useful prompts") if per else why)

    for n, c in ck.items():
        model_numbers(n, c)
    for r in rows:
        if r["basis"] == "svd" and r["fraction"] in (0.25, 0.75):
            model_numbers(f"svd {r['variant']} f={r['fraction']}", r)
    if rows and all(r.get("per_prompt") for r in rows):
        for q in compare_at_equal_task_loss(rows):
            head = f"{q['variant']}: svd f={q['fraction']} − random f={q['control_fraction']} (equal task loss)"
            _put(out, f"{head}: refusal rate difference", q["refusal"].value, q["refusal"])
            _put(out, f"{head}: task-loss gap", q["task_loss_gap"].value, q["task_loss_gap"])
    elif rows:
        out["svd − random at equal task loss"] = f"not assessed: {why}"
    pts = list(ck.values()) + rows
    if len(pts) >= 3:
        _put(out, "corr(harmful, harmless refusal score) over models", float(np.corrcoef(
            [q["refusal_score"] for q in pts], [q["harmless_refusal_score"] for q in pts])[0, 1]),
            "a correlation over the evaluated models, which are not sampled units (a stated point)")
    return out


def headline(payload: dict[str, Any]) -> dict[str, Any]:
    """The summary-table numbers of one result payload (flat dict of str -> number or str).

    Convention (every kind follows it): a headline number ``out[name]`` has its 95% interval under
    ``out[name + CI_SUFFIX]`` (``"<name>, 95% CI"``), the string :meth:`probekit.stats.Estimate.format` gives
    (``value [low, high] (n=… unit)``, over the independent unit of METHODS.md §5), or ``"not assessed: <why>"``
    when the payload lacks the per-unit values a CI needs. Below :data:`probekit.stats.MIN_N` units the number's
    own place holds ``"too few to conclude (n = …)"`` and the interval key still shows the number with its CI.
    Whole numbers that are choices, not estimates (a layer, k), and text stand alone. Kinds whose payload stores
    Estimates already (``linearscope_sr``, ``linearscope_i2i``) give each as one formatted string.
    """
    kind = payload.get("kind")
    if kind == "layer_probes":
        return _layer_probe_headline(payload)
    if kind == "ast_probe":
        return _ast_headline(payload)
    if kind == "dark_matter":  # 95% CIs over held-out documents where the payload has per-document sums
        from .claims import dark_matter_estimates

        out: dict[str, Any] = {}
        for k, v in dark_matter_estimates(payload).items():
            if isinstance(v, float):  # an older payload, or a width without per-document sums: say so
                _put(out, k, v, "the payload has no per-document sums for this number (point value)")
            else:
                _put(out, k, v.value, v)
        return out
    if kind == "linearscope_digits":
        return _linearscope_digits_headline(payload)
    if kind == "linearscope_lm":
        return _linearscope_lm_headline(payload)
    if kind == "safety_activation":
        return _safety_activation_headline(payload)
    if kind == "safety_weight":
        return _safety_weight_headline(payload)
    if kind == "linearscope_sr":  # every number with its 95% interval over test patches, and the verdict
        return {**_estimates(payload["headline"]), "verdict": payload["verdict"]["text"]}
    if kind == "linearscope_i2i":
        return _estimates(payload["estimates"])
    raise ValueError(f"no headline for result kind {kind!r}; expected one of {RESULT_KINDS}")


def headline_rows(head: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """``(name, value, "value [low, high] (n=… unit)" or "not assessed: …" or "")`` per headline number, each
    number beside its ``"<name>, 95% CI"`` companion (:func:`headline`'s convention), in the dict's order: the one
    pairing the report's tables and the app's pages show."""
    rows = []
    for k, v in head.items():
        if k.endswith(CI_SUFFIX):
            base = k[: -len(CI_SUFFIX)]
            if base not in head:  # an interval without a bare number (older kinds' naming): its own row
                rows.append((base, "", str(v)))
            continue
        ci = head.get(k + CI_SUFFIX)
        rows.append((k, v, "" if ci is None else str(ci)))
    return rows
