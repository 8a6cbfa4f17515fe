"""Layers: per-layer linear-probe accuracy (demo result), the saved probe of one layer on your text (per-token
predicted classes, confusion matrix, misclassified test tokens in context; :mod:`app.probeview`), activation
statistics per hook of a run, and a token view with per-token activation norms coloured on the text."""

from __future__ import annotations

import math

from dash import Input, Output, State, dcc, html

from probekit import results as pr

from .. import data, probeview
from ..components import EMPTY_FIGURE, card, drawn, error, graph, headline_table, info, missing, options
from ..security import UnsafePathError, check_index, choice_or
from ..tokenspans import visible
from ..urlstate import PageState
from ..view_jobs import MAX_TEXT_CHARS, build_forward_spec, forward_button

PATH = "/layers"
TITLE = "Layers"
SCHEMA = {"model": str, "show": list, "run": str, "stat": str, "hook": str, "doc": int, "probe": str, "fwd": str}
SHOW = {"train": "train accuracy", "controls": "controls (majority, token identity, random features)"}
STATS = dict(pr.HOOK_STATS)


# --------------------------------------------------------------------------------------------- pure views


def accuracy_view(model: str | None, show: list[str] | None) -> tuple[dict, object]:
    """Figure of test accuracy per layer from ``results/demo/<model>/layer_probes.json`` and a message.

    Returns ``(figure dict, None)`` or ``(empty figure, message component)`` when the result is missing.
    """
    model = model or data.DEFAULT_MODEL
    show = sorted({s for s in show if isinstance(s, str)} & set(SHOW)) if isinstance(show, list) else []
    try:
        stamp = data.result_stamp("demo", model)
        payload = data.load_result("demo", model)
    except data.ResultMissing as e:
        return EMPTY_FIGURE, missing("layer-probe result for " + model, e.command)
    except (UnsafePathError, ValueError) as e:
        return EMPTY_FIGURE, error(str(e))
    return drawn(("demo-fig", stamp, tuple(show)), lambda: pr.layer_accuracy_figure(payload, show=show).to_dict(),
                 what=f"layer_probes.json of {model}")


def headline_view(model: str | None) -> object:
    """The demo result's headline numbers (best layer, its accuracy and the embedding layer's with 95% CIs over
    test functions, the paired difference, the controls, n) or why they cannot be shown."""
    model = model or data.DEFAULT_MODEL
    try:
        payload = data.load_result("demo", model)
    except data.ResultMissing as e:
        return missing("layer-probe result for " + model, e.command)
    except (UnsafePathError, ValueError) as e:
        return error(str(e))
    return headline_table(payload, "layer_probes", id="layers-headline-table")


def run_options() -> list[dict]:
    """Dropdown options for the runs of the cache (complete and readable ones)."""
    return [{"label": f"{r['run_id'][:12]} · {r['model'][-40:]} · {len(r['hooks'])} hooks · {r['rows']:,} rows",
             "value": r["run_id"]} for r in data.list_runs() if not r["error"]]


def stats_view(run_id: str | None, stat: str | None) -> tuple[dict, object]:
    """Bar chart of one statistic per hook for a run (bounded row sample), and a message or ``None``."""
    if not run_id:
        if not data.list_runs():
            return EMPTY_FIGURE, missing("capture run", data.cli_command(
                "probekit capture --model smollm2-135m --stdlib-functions 20 --hooks "
                "blocks.0.hook_resid_post blocks.5.hook_resid_post"), "or use the Capture page.")
        return EMPTY_FIGURE, info("Choose a run.")
    stat = choice_or(stat, STATS, "mean_norm")
    try:
        s = data.run_hook_stats(run_id)
    except Exception as e:  # invalid id, corrupt run: shown in the page
        return EMPTY_FIGURE, error(str(e))
    return pr.hook_stats_figure(s, stat=stat, run_id=run_id).to_dict(), None


def token_choices(run_id: str | None, hook: str | None, doc: int | None) -> tuple[list, str | None, list, int | None]:
    """Hook and document options of a run, keeping the current choices when they are valid."""
    if not run_id:
        return [], None, [], None
    try:
        run = data.open_run(run_id)
        hooks = sorted(run.hooks, key=data.hook_order_key)
        docs = data.run_documents(run_id)
    except Exception:
        return [], None, [], None
    hook = hook if hook in hooks else (hooks[-1] if hooks else None)
    doc = doc if doc in docs else (docs[0] if docs else None)
    return options(hooks), hook, options(docs[:2000]), doc


def token_view(run_id: str | None, hook: str | None, doc: int | None) -> list:
    """Spans of the document's tokens, background opacity ∝ activation norm at ``hook`` (hover: value)."""
    if not run_id or not hook or doc is None:
        return [info("Choose a run, a hook and a document.")]
    try:
        tv = data.token_values(run_id, hook, check_index(doc, "document"))
    except Exception as e:
        return [error(str(e))]
    vals = [v for v in tv["values"] if math.isfinite(v)]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    spans = []
    for t, v, pos in zip(tv["tokens"], tv["values"], tv["positions"]):
        a = 0.0 if hi <= lo or not math.isfinite(v) else (v - lo) / (hi - lo)
        spans.append(html.Span(t, className="tok", title=f"position {pos}: ‖x‖ = {v:.3f}",
                               style={"backgroundColor": f"rgba(214, 39, 40, {0.08 + 0.8 * a:.3f})"}))
    note = None if tv["decoded"] else info("No tokenizer for this run's model inside the cache root: "
                                           "tokens are shown as ids.")
    legend = html.Div(f"‖x‖ at {hook}: min {lo:.2f} (light) … max {hi:.2f} (dark)", className="legend")
    return [legend, note, html.Div(spans, className="token-text", id="token-text")]


def probe_layer_choices(model: str | None, layer: str | None) -> tuple[list, str | None]:
    """Layers with a saved probe for the demo result ``model``, keeping ``layer`` when it is one of them."""
    layers = probeview.layers(model) if isinstance(model, str) else []
    return options(layers), (layer if layer in layers else (layers[-1] if layers else None))


def _no_layer(model) -> list:
    """Why no layer is chosen: the result has no saved probes (named), or none is picked yet."""
    try:
        probeview.index(model)
    except Exception as e:
        return [error(str(e))] if isinstance(model, str) and model else [info("Choose a layer-probe result.")]
    return [info("Choose a layer with a saved probe.")]


def probe_text_view(model: str | None, layer: str | None, fid: str | None) -> list:
    """Typed text coloured by the probe's predicted class (hover: class and its probability), with a legend."""
    if not isinstance(model, str) or not isinstance(layer, str):
        return _no_layer(model)
    if not fid:
        return [info("Type text and press Run: the model runs once in a background job.")]
    try:
        r = probeview.typed_predictions(model, layer, fid)
    except Exception as e:  # a missing forward, another model's text: shown in the page
        return [error(str(e))]
    labels = r["labels"]
    spans = [html.Span(visible(t), className="tok", title=f"position {i} · token {t!r} · predicted "
                       f"{labels[int(k)]} (p = {p:.3f})", style={"backgroundColor": probeview.class_colour(k)},
                       **{"data-label": labels[int(k)]})
             for i, (t, k, p) in enumerate(zip(r["tokens"], r["pred"], r["proba"]))]
    seen = sorted(set(int(k) for k in r["pred"]))
    key = html.Div(className="legend", children=[html.Strong(f"predicted class at {r['hook']}: ")] + [
        html.Span(visible(labels[k]), className="tok",
                  style={"backgroundColor": probeview.class_colour(k), "marginRight": "0.4em"})
        for k in seen])
    return [key, html.Div(spans, className="token-text", id="layers-probe-tokens")]


def probe_test_view(model: str | None, layer: str | None) -> tuple[dict, list]:
    """Confusion-matrix figure and the misclassified-tokens table of the probe of ``layer``."""
    if not isinstance(model, str) or not isinstance(layer, str):
        return EMPTY_FIGURE, _no_layer(model)
    try:
        c, labels = probeview.confusion(model, layer)
        rows = probeview.misclassified(model, layer)
    except Exception as e:
        return EMPTY_FIGURE, [error(str(e))]
    fig = probeview.confusion_figure(c, labels, layer, model)
    head = html.Tr([html.Th(h) for h in ("document", "position", "context (token highlighted)", "true", "predicted")])
    body = [html.Tr([html.Td(r["doc"]), html.Td(r["position"]),
                     html.Td(html.Code([visible(r["left"]), html.Mark(visible(r["token"])), visible(r["right"])])),
                     html.Td(r["true"]), html.Td(r["pred"])]) for r in rows]
    cap = html.Caption(f"{len(rows)} misclassified test tokens (at most 100 shown), in document order")
    return fig, [html.Table([cap, html.Thead(head), html.Tbody(body)], id="layers-probe-wrong",
                            className="table")]


# --------------------------------------------------------------------------------------------- layout


def controls(params: dict) -> list:
    """Values of the page's controls (:data:`STATE` order) for parsed query ``params``."""
    models = data.list_results("demo")
    model = params.get("model") or (models[0] if models else data.DEFAULT_MODEL)
    show = [s for s in params.get("show", ["controls"]) if s in SHOW]
    runs = [r["value"] for r in run_options()]
    run = params.get("run") if params.get("run") in runs else (runs[0] if runs else None)
    stat = params.get("stat") if params.get("stat") in STATS else "mean_norm"
    _, hook, _, doc = token_choices(run, params.get("hook"), params.get("doc"))
    _, layer = probe_layer_choices(model, params.get("probe"))
    return [model, show, run, stat, hook, doc, layer, params.get("fwd")]


def _query(model, show, run, stat, hook, doc, probe=None, fwd=None) -> dict:
    # an empty checklist is written as "none" so that it does not read back as the default
    return dict(model=model, show=list(show or []) or ["none"], run=run, stat=stat, hook=hook, doc=doc,
                probe=probe, fwd=fwd if isinstance(fwd, str) else None)


STATE = PageState(PATH, SCHEMA, [("layers-model", "value"), ("layers-show", "value"), ("layers-run", "value"),
                                 ("layers-stat", "value"), ("layers-hook", "value"), ("layers-doc", "value"),
                                 ("layers-probe-layer", "value"), ("layers-probe-fid", "data")],
                  controls, _query)


def layout(params: dict) -> html.Div:
    models = data.list_results("demo")
    runs = run_options()
    model, show, run, stat, hook, doc, layer, fid = controls(params)
    hook_opts, _, doc_opts, _ = token_choices(run, hook, doc)
    layer_opts, _ = probe_layer_choices(model, layer)
    ready = [m for m in data.model_choices() if m["ready"]]
    fwd_model = next((m["value"] for m in ready if m["value"] in (model, f"models/{model}")),
                     ready[0]["value"] if ready else None)
    return html.Div([
        STATE.location(),
        html.H2("Layers"),
        card("Linear-probe accuracy per layer",
             html.Div(className="controls", children=[
                 dcc.Dropdown(id="layers-model", options=data.result_options("demo", models, model),
                              value=model, clearable=False),
                 dcc.Checklist(id="layers-show", options=[{"label": v, "value": k} for k, v in SHOW.items()],
                               value=show, inline=True),
             ]),
             html.Div(id="layers-acc-msg"), graph("layers-acc-fig"),
             dcc.Loading(html.Div(id="layers-headline"), type="dot")),
        card("Probe of one layer: your text, confusion matrix, errors",
             html.Div(className="controls", children=[
                 html.Label("layer"),
                 dcc.Dropdown(id="layers-probe-layer", options=layer_opts, value=layer, clearable=False,
                              placeholder="no saved probes (probekit demo saves them)"),
             ]),
             dcc.Textarea(id="layers-probe-text", value="", rows=3, maxLength=MAX_TEXT_CHARS,
                          placeholder="def add(a, b):\n    return a + b", style={"width": "100%"}),
             html.Div(className="controls", children=[
                 html.Label("model"),
                 dcc.Dropdown(id="layers-probe-model", value=fwd_model, placeholder="no model fetched",
                              options=[{"label": m["label"], "value": m["value"]} for m in ready]),
                 html.Button("Run", id="layers-probe-go", className="primary"),
                 html.Span(id="layers-probe-status", className="progress-label"),
             ]),
             dcc.Store(id="layers-probe-fid", data=fid),
             dcc.Loading(html.Div(id="layers-probe-view"), type="dot"),
             graph("layers-probe-confusion"),
             html.Div(id="layers-probe-errors")),
        card("Activation statistics per hook",
             html.Div(className="controls", children=[
                 dcc.Dropdown(id="layers-run", options=runs, value=run, placeholder="run"),
                 dcc.RadioItems(id="layers-stat", options=[{"label": v, "value": k} for k, v in STATS.items()],
                                value=stat, inline=True),
             ]),
             html.Div(id="layers-stats-msg"), graph("layers-stats-fig")),
        card("Token view",
             html.Div(className="controls", children=[
                 dcc.Dropdown(id="layers-hook", options=hook_opts, value=hook, placeholder="hook"),
                 dcc.Dropdown(id="layers-doc", options=doc_opts, value=doc, placeholder="document"),
             ]),
             dcc.Loading(html.Div(id="layers-tokens"), type="dot")),
    ])


def register(app) -> None:
    app.callback(Output("layers-headline", "children"), Input("layers-model", "value"))(headline_view)
    app.callback(Output("layers-acc-fig", "figure"), Output("layers-acc-msg", "children"),
                 Input("layers-model", "value"), Input("layers-show", "value"))(accuracy_view)
    app.callback(Output("layers-probe-layer", "options"), Output("layers-probe-layer", "value"),
                 Input("layers-model", "value"), State("layers-probe-layer", "value"),
                 prevent_initial_call=True)(probe_layer_choices)
    app.callback(Output("layers-probe-view", "children"), Input("layers-model", "value"),
                 Input("layers-probe-layer", "value"), Input("layers-probe-fid", "data"))(probe_text_view)
    app.callback(Output("layers-probe-confusion", "figure"), Output("layers-probe-errors", "children"),
                 Input("layers-model", "value"), Input("layers-probe-layer", "value"))(probe_test_view)

    @app.callback(Output("layers-probe-fid", "data"), Output("layers-probe-status", "children"),
                  Input("layers-probe-go", "n_clicks"), State("layers-probe-model", "value"),
                  State("layers-probe-text", "value"), prevent_initial_call=True, background=True,
                  progress=[Output("layers-probe-status", "children")],
                  running=[(Output("layers-probe-go", "disabled"), True, False)])
    def _go(set_progress, n, model, text):
        # the same forward as the Tokens page (every resid_post), plus hook_embed for the embedding probe
        return forward_button(set_progress, data.get_root(), lambda: build_forward_spec(
            data.get_root(), model=model, text=text, hooks=["hook_embed"], all_resid=True))

    app.callback(Output("layers-stats-fig", "figure"), Output("layers-stats-msg", "children"),
                 Input("layers-run", "value"), Input("layers-stat", "value"))(stats_view)
    app.callback(Output("layers-hook", "options"), Output("layers-hook", "value"),
                 Output("layers-doc", "options"), Output("layers-doc", "value"),
                 Input("layers-run", "value"), State("layers-hook", "value"),
                 State("layers-doc", "value"), prevent_initial_call=True)(token_choices)
    app.callback(Output("layers-tokens", "children"), Input("layers-run", "value"), Input("layers-hook", "value"),
                 Input("layers-doc", "value"))(token_view)

    STATE.register(app)
