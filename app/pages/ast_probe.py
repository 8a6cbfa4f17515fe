"""AST-Probe: F1 (or another score) per layer with controls, F1 vs k (separate fits and Matryoshka),
recall per non-terminal at a chosen layer, and a snippet picker drawing gold vs predicted trees."""

from __future__ import annotations

from dash import Input, Output, dcc, html

from probekit import results as pr
from probekit.probes.ast_figures import f1_vs_k_figure, per_label_recall_figure, tree_comparison_figure

from .. import data
from ..components import EMPTY_FIGURE, card, drawn, error, graph, headline_table, info, missing, options
from ..security import UnsafePathError, check_index, choice_or, text_or_none
from ..urlstate import PageState

PATH = "/ast-probe"
TITLE = "AST-Probe"
SCHEMA = {"model": str, "metric": str, "controls": bool, "curves": str, "layer": str, "snippet": int}
METRICS = dict(pr.AST_METRICS)
CURVES = {"both": "separate + Matryoshka", "separate": "separate fits", "matryoshka": "Matryoshka prefixes"}


def rerun_command(p: dict, result_id: str) -> str:
    """The command that rewrites result set ``result_id`` (model, size and output folder of the old run)."""
    cfg = p.get("config") or {}
    model = str(p.get("model") or cfg.get("model") or result_id.split("/")[0])
    cmd = f"probekit ast-probe --model {model}"
    if cfg.get("n_functions"):
        cmd += f" --n-functions {int(cfg['n_functions'])}"
    if p.get("language", "python") != "python":
        cmd += f" --language {p['language']}"
    default = model.replace("/", "--") + ("" if p.get("language", "python") == "python" else f"/{p['language']}")
    if result_id != default:
        cmd += f" --out {data.get_root() / 'results' / 'ast-probe' / result_id}"
    return data.cli_command(cmd)


def _load(model: str | None) -> tuple[dict | None, tuple | None, object]:
    """(payload, stamp, None) or (None, None, message component)."""
    model = model or data.DEFAULT_MODEL
    try:
        return data.load_result("ast-probe", model), data.result_stamp("ast-probe", model), None
    except data.ResultMissing as e:
        return None, None, missing("AST-Probe result for " + model, e.command)
    except (UnsafePathError, ValueError) as e:
        return None, None, error(str(e))


# --------------------------------------------------------------------------------------------- pure views


def headline_view(model: str | None) -> object:
    """The headline numbers of the result (layer chosen on validation, F1 with 95% CIs over test snippets, the
    paired differences to layer 0 and to the random-init model, n) or why they cannot be shown."""
    p, _, msg = _load(model)
    return msg if p is None else headline_table(p, "ast_probe", id="ast-headline-table")


def layer_view(model: str | None, metric: str | None, controls: list | None) -> tuple[dict, object]:
    """Score per layer (``metric``), with the control F1 curves when ``metric`` is F1 and asked for."""
    p, stamp, msg = _load(model)
    if p is None:
        return EMPTY_FIGURE, msg
    metric = choice_or(metric, METRICS, "f1")
    show = bool(controls)

    def build() -> dict:
        return pr.ast_layer_figure(p, metric=metric, controls=show, published=show).to_dict()

    return drawn(("ast-layer", stamp, metric, show), build, what=f"ast_probe.json of {model}")


def k_view(model: str | None, curves: str | None) -> tuple[dict, object]:
    """F1 against subspace size k at the best layer: separate fits, Matryoshka prefixes, or both."""
    p, stamp, msg = _load(model)
    if p is None:
        return EMPTY_FIGURE, msg
    sweep = p.get("k_sweep")
    if not sweep:
        return EMPTY_FIGURE, missing("k sweep in this result", rerun_command(p, model or data.DEFAULT_MODEL),
                                     "The run skips the sweep only with --k-sweep none.")
    curves = choice_or(curves, CURVES, "both")

    def build() -> dict:
        ks = sweep["ks"]
        sep = sweep.get("separate_f1")
        mat = sweep.get("matryoshka_f1")
        if curves == "matryoshka" and mat:
            sep, mat = mat, None
            title = f"Matryoshka prefixes: F1 vs k at layer {sweep.get('layer')}"
        else:
            mat = mat if curves == "both" else None
            title = f"F1 vs k at layer {sweep.get('layer')}"
        r = p.get("result") or {}
        ctrl = {"layer 0 (embeddings)": r["f1"][0]} if r.get("f1") else None
        fig = f1_vs_k_figure(ks, sep, mat, d_model=max(ks), controls=ctrl, title=title)
        if curves == "matryoshka":
            fig.data[0].name, fig.data[0].line.dash = "Matryoshka prefixes", "dash"
        return fig.to_dict()

    return drawn(("ast-k", stamp, curves), build, what=f"the k sweep of {model}")


def recall_view(model: str | None, layer: str | None) -> tuple[dict, object, list, str | None]:
    """Recall per non-terminal at ``layer`` (default: best by validation); also the layer options."""
    p, stamp, msg = _load(model)
    if p is None:
        return EMPTY_FIGURE, msg, [], None
    r = p.get("result") or {}
    layers = [str(v) for v in r.get("layers", [])]
    recalls = r.get("label_recall") or []
    if not layers or len(recalls) != len(layers):
        return EMPTY_FIGURE, missing("recall per label in this result", rerun_command(p, model or data.DEFAULT_MODEL)), options(layers), None
    layer = layer if layer in layers else str(p.get("best_layer_by_validation", layers[-1]))
    layer = layer if layer in layers else layers[-1]
    i = layers.index(layer)

    def build() -> dict:
        support = r.get("label_support") or None
        if support and set(recalls[i]) - set(support):
            support = None
        return per_label_recall_figure(recalls[i], support, title=f"Recall per non-terminal, layer {layer}").to_dict()

    fig, msg = drawn(("ast-recall", stamp, layer), build, what=f"recall per label at layer {layer}")
    return fig, msg, options(layers), layer


def snippet_options(model: str | None) -> list[dict]:
    """Options of the snippet picker: one per test snippet (doc id and F1), when the result has them."""
    p, _, _ = _load(model)
    snippets = (p or {}).get("test_snippets") or []
    return [{"label": f"{i}: {s.get('doc_id', '?')} (F1 {s.get('f1', float('nan')):.2f}, {len(s.get('leaves', []))} leaves)",
             "value": i} for i, s in enumerate(snippets)]


def tree_view(model: str | None, snippet: int | None, layer: str | None = None) -> tuple[dict, object]:
    """Gold vs predicted tree of one test snippet at ``layer`` (mismatches in red), from ``test_snippets`` in the
    JSON: ``pred_by_layer[layer]``, or ``pred`` (the best layer's) when the result stores no other layer."""
    p, stamp, msg = _load(model)
    if p is None:
        return EMPTY_FIGURE, msg
    snippets = p.get("test_snippets")
    if not snippets:
        ts = p.get("tree_snippet") or {}
        note = (f"This result was written before per-snippet trees were saved (its drawn snippet: "
                f"{ts.get('doc_id', '?')}, F1 {ts.get('f1', float('nan')):.3f}; see ast_probe.html). Re-run to add "
                "the field test_snippets = [{doc_id, leaves, f1, gold: [d, c, u], pred: [d, c, u]}] at the best layer.")
        return EMPTY_FIGURE, missing("per-snippet trees in this result", rerun_command(p, model or data.DEFAULT_MODEL), note)
    try:
        i = check_index(0 if snippet is None else snippet, "snippet")
        layer = text_or_none(layer, "the layer")  # a dict would fail the lookup in pred_by_layer below
    except ValueError as e:
        return EMPTY_FIGURE, error(str(e))
    if not 0 <= i < len(snippets):
        return EMPTY_FIGURE, error(f"snippet {i} is outside the {len(snippets)} test snippets")
    best = str(p.get("best_layer_by_validation"))
    by_layer = snippets[i].get("pred_by_layer") or {}
    drawn_layer, note = (layer, None) if layer in by_layer else (best, None)
    if layer not in by_layer and layer not in (None, best):
        note = info(f"This result stores predicted trees at layer {best} only (the best by validation); the tree "
                    f"below is layer {best}'s, not layer {layer}'s. Re-run the probe to store every layer's: "
                    f"{rerun_command(p, model or data.DEFAULT_MODEL)}")

    def build() -> dict:
        s = snippets[i]
        pred = by_layer.get(drawn_layer) or s["pred"]
        return tree_comparison_figure(s["leaves"], s["gold"], pred,
                                      title=f"{s.get('doc_id', i)} — layer {drawn_layer}").to_dict()

    fig, msg = drawn(("ast-tree", stamp, i, drawn_layer), build, what=f"snippet {i}")
    return fig, msg or note


# --------------------------------------------------------------------------------------------- layout


def controls(params: dict) -> list:
    """Values of the page's controls (:data:`STATE` order) for parsed query ``params``."""
    ids = data.list_results("ast-probe")
    model = params.get("model") or (data.DEFAULT_MODEL if data.DEFAULT_MODEL in ids else (ids[0] if ids else data.DEFAULT_MODEL))
    snips = snippet_options(model)
    _, _, _, layer = recall_view(model, params.get("layer"))
    return [model, params.get("metric") if params.get("metric") in METRICS else "f1",
            [] if params.get("controls") is False else ["on"],
            params.get("curves") if params.get("curves") in CURVES else "both", layer,
            params.get("snippet", 0 if snips else None)]


STATE = PageState(PATH, SCHEMA, [("ast-model", "value"), ("ast-metric", "value"), ("ast-controls", "value"),
                                 ("ast-curves", "value"), ("ast-layer", "value"), ("ast-snippet", "value")],
                  controls, lambda model, metric, ctrl, curves, layer, snippet: dict(
                      model=model, metric=metric, controls=bool(ctrl), curves=curves, layer=layer, snippet=snippet))


def layout(params: dict) -> html.Div:
    ids = data.list_results("ast-probe")
    model, metric, ctrl, curves, layer, snippet = controls(params)
    snips = snippet_options(model)
    # options present from the start: a dropdown whose value is not among its options drops the value
    _, _, layer_opts, _ = recall_view(model, layer)
    return html.Div([
        STATE.location(),
        html.H2("AST-Probe"),
        html.Div(className="controls", children=[
            html.Label("result set"),
            dcc.Dropdown(id="ast-model", options=data.result_options("ast-probe", ids, model),
                         value=model, clearable=False),
        ]),
        card("Headline numbers", dcc.Loading(html.Div(id="ast-headline"), type="dot")),
        card("Score per layer",
             html.Div(className="controls", children=[
                 dcc.Dropdown(id="ast-metric", options=[{"label": v, "value": k} for k, v in METRICS.items()],
                              value=metric, clearable=False),
                 dcc.Checklist(id="ast-controls", options=[{"label": "controls", "value": "on"}],
                               value=ctrl, inline=True),
             ]),
             html.Div(id="ast-layer-msg"), graph("ast-layer-fig")),
        card("F1 vs subspace size k",
             dcc.RadioItems(id="ast-curves", options=[{"label": v, "value": k} for k, v in CURVES.items()],
                            value=curves, inline=True),
             html.Div(id="ast-k-msg"), graph("ast-k-fig")),
        card("Recall per non-terminal and the predicted tree at a layer",
             html.Div(className="controls", children=[
                 html.Label("layer"),
                 dcc.Dropdown(id="ast-layer", options=layer_opts, value=layer, clearable=False, placeholder="layer"),
             ]),
             html.Div(id="ast-recall-msg"), graph("ast-recall-fig")),
        card("Gold vs predicted tree (at the layer above)",
             dcc.Dropdown(id="ast-snippet", options=snips, value=snippet, placeholder="test snippet"),
             html.Div(id="ast-tree-msg"), graph("ast-tree-fig", scroll=True)),
    ])


def register(app) -> None:
    app.callback(Output("ast-headline", "children"), Input("ast-model", "value"))(headline_view)
    app.callback(Output("ast-layer-fig", "figure"), Output("ast-layer-msg", "children"), Input("ast-model", "value"),
                 Input("ast-metric", "value"), Input("ast-controls", "value"))(layer_view)
    app.callback(Output("ast-k-fig", "figure"), Output("ast-k-msg", "children"), Input("ast-model", "value"),
                 Input("ast-curves", "value"))(k_view)
    app.callback(Output("ast-recall-fig", "figure"), Output("ast-recall-msg", "children"),
                 Output("ast-layer", "options"), Output("ast-layer", "value"),
                 Input("ast-model", "value"), Input("ast-layer", "value"))(recall_view)
    app.callback(Output("ast-snippet", "options"), Input("ast-model", "value"),
                 prevent_initial_call=True)(snippet_options)
    app.callback(Output("ast-tree-fig", "figure"), Output("ast-tree-msg", "children"), Input("ast-model", "value"),
                 Input("ast-snippet", "value"), Input("ast-layer", "value"))(tree_view)
    STATE.register(app)
