"""Attention: per-layer, per-head attention patterns of a text, as a heatmap and a token-to-token view.

The text is a cached document (its token ids re-run through the run's model) or your own text; the model runs
once in a background job (``app.forward_worker`` with eager attention) that stores every layer's pattern, so
changing the layer or head afterwards is instant. Heatmap rows are query positions (the attending token),
columns key positions; in the token-to-token view, hovering a token colours every other token by the attention
the hovered token pays to it (``app/assets/attention.js``).
"""

from __future__ import annotations

import json

from dash import Input, Output, State, dcc, html

from probekit.cache import CacheError

from .. import data, viewdata
from ..components import EMPTY_FIGURE, card, error, graph, info, options
from ..security import UnsafePathError, check_run_id
from ..tokenspans import visible
from ..urlstate import PageState
from ..view_jobs import MAX_TEXT_CHARS, build_forward_spec, forward_button

PATH = "/attention"
TITLE = "Attention"
SCHEMA = {"source": str, "run": str, "doc": int, "fwd": str, "layer": int, "head": int}
SOURCES = {"cached": "a cached document", "typed": "your own text"}
MEAN = -1  # head value: the mean over heads


def _labels(tokens: list[str]) -> list[str]:
    return [f"{i}: {visible(t).replace(chr(10), '')}" for i, t in enumerate(tokens)]


def pattern(fid: str | None, layer, head):
    """``(info, (n, n) array, head label)`` of one layer and head (``MEAN``: the mean over heads)."""
    inf, arrays = viewdata.load_forward(fid)
    key = f"attn.{int(layer)}"
    if key not in arrays:
        raise ValueError(f"the forward result has no attention for layer {layer} (layers 0..{inf['n_layers'] - 1})")
    a = arrays[key].astype("float32")
    if int(head) == MEAN:
        return inf, a.mean(0), "mean over heads"
    if not 0 <= int(head) < a.shape[0]:
        raise ValueError(f"head {head} is outside 0..{a.shape[0] - 1}")
    return inf, a[int(head)], f"head {int(head)}"


def heatmap_view(fid, layer, head) -> tuple[dict, object, object]:
    """The heatmap, the token-to-token view, and a message."""
    if not fid:
        return EMPTY_FIGURE, None, info("Choose a text and press Compute: the model runs once in a background job.")
    if layer is None or head is None:
        return EMPTY_FIGURE, None, info("Choose a layer and a head.")
    try:
        inf, a, what = pattern(fid, layer, head)
    except Exception as e:
        return EMPTY_FIGURE, None, error(str(e))
    labels = _labels(inf["tokens"])
    n = len(labels)
    axis = dict(type="category", automargin=True)
    # a plain plotly dict: graph_objects validation of an n×n heatmap costs more than the rest of the request
    fig = dict(data=[dict(type="heatmap", z=a.round(4).tolist(), x=labels, y=labels, colorscale="Blues", zmin=0,
                          zmax=float(a.max() or 1), colorbar=dict(title=dict(text="attention weight", side="right")),
                          hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.3f}<extra></extra>")],
               layout=dict(height=int(min(1000, 260 + 14 * n)), plot_bgcolor="#fff", paper_bgcolor="#fff",
                           title=dict(text=f"Layer {int(layer)}, {what}: attention of each query token to "
                                           "each key token"),
                           xaxis=dict(title=dict(text="key token (attended to)"), tickangle=-60, **axis),
                           yaxis=dict(title=dict(text="query token (attending)"), autorange="reversed", **axis),
                           margin=dict(t=60, l=120, b=120, r=20)))
    spans = [html.Span(visible(t), className="attn-tok", title=f"position {i} · {t!r}",
                       **{"data-attn": json.dumps([round(float(v), 4) for v in a[i]]), "data-pos": str(i)})
             for i, t in enumerate(inf["tokens"])]
    t2t = html.Div([html.P("Hover a token: the others are coloured by the attention it pays to them "
                           "(darker = more); the hovered token is outlined.", className="hint"),
                    html.Div(spans, className="token-text attn-text", id="attn-text")])
    return fig, t2t, None


def layer_head_choices(fid: str | None, layer, head):
    try:
        arrays = viewdata.load_forward(fid)[1] if fid else {}
    except Exception:  # a missing or hostile forward id offers no choices
        arrays = {}
    n_layers = sum(1 for k in arrays if k.startswith("attn."))
    n_heads = int(arrays["attn.0"].shape[0]) if "attn.0" in arrays else 0
    layer = layer if isinstance(layer, int) and 0 <= layer < n_layers else (0 if n_layers else None)
    head = head if isinstance(head, int) and (head == MEAN or 0 <= head < n_heads) else (0 if n_heads else None)
    hopts = [{"label": "mean over heads", "value": MEAN}] + options(list(range(n_heads))) if n_heads else []
    return options(list(range(n_layers))), layer, hopts, head


def controls(params: dict) -> list:
    """Values of the page's controls (:data:`STATE` order) for parsed query ``params``."""
    runs = [r for r in data.list_runs() if not r["error"]]
    run_ids = [r["run_id"] for r in runs]
    source = params.get("source") if params.get("source") in SOURCES else ("cached" if runs else "typed")
    run = params.get("run") if params.get("run") in run_ids else (run_ids[-1] if run_ids else None)
    docs = data.run_documents(run) if run else []
    doc = params.get("doc") if params.get("doc") in docs else (docs[0] if docs else None)
    fid = params.get("fwd")
    _, layer, _, head = layer_head_choices(fid, params.get("layer"), params.get("head"))
    return [source, run, doc, fid, layer, head]


def _query(source, run, doc, fid, layer, head) -> dict:
    return dict(source=source, run=run if source == "cached" else None, doc=doc if source == "cached" else None,
                fwd=fid, layer=layer, head=head)


STATE = PageState(PATH, SCHEMA, [("attn-source", "value"), ("attn-run", "value"), ("attn-doc", "value"),
                                 ("attn-fid", "data"), ("attn-layer", "value"), ("attn-head", "value")],
                  controls, _query)


def layout(params: dict) -> html.Div:
    runs = [r for r in data.list_runs() if not r["error"]]
    source, run, doc, fid, layer, head = controls(params)
    docs = data.run_documents(run) if run else []
    lopts, layer, hopts, head = layer_head_choices(fid, layer, head)
    models = [m for m in data.model_choices() if m["ready"]]
    return html.Div([
        STATE.location(),
        html.H2("Attention"),
        card("Text", dcc.RadioItems(id="attn-source", options=[{"label": v, "value": k} for k, v in SOURCES.items()],
                                    value=source, inline=True),
             html.Div(id="attn-cached", className="controls", children=[
                 html.Label("run"),
                 dcc.Dropdown(id="attn-run", value=run, clearable=False, placeholder="no runs in this cache",
                              options=[{"label": f"{r['run_id'][:12]} · {r['model']}", "value": r["run_id"]}
                                       for r in runs]),
                 html.Label("document"),
                 dcc.Dropdown(id="attn-doc", options=options(docs[:2000]), value=doc, clearable=False),
             ], style={} if source == "cached" else {"display": "none"}),
             html.Div(id="attn-typed", children=[
                 dcc.Textarea(id="attn-text-in", value="", rows=3, maxLength=MAX_TEXT_CHARS,
                              placeholder="def add(a, b):\n    return a + b", style={"width": "100%"}),
                 html.Div(className="controls", children=[
                     html.Label("model"),
                     dcc.Dropdown(id="attn-model", options=[{"label": m["label"], "value": m["value"]} for m in models],
                                  value=models[0]["value"] if models else None, placeholder="no model fetched"),
                 ]),
             ], style={} if source == "typed" else {"display": "none"}),
             html.Div(className="controls", children=[
                 html.Button("Compute", id="attn-go", className="primary"),
                 html.Span(id="attn-status", className="progress-label")]),
             dcc.Store(id="attn-fid", data=fid)),
        card("Pattern", html.Div(className="controls", children=[
            html.Label("layer"), dcc.Dropdown(id="attn-layer", options=lopts, value=layer, clearable=False),
            html.Label("head"), dcc.Dropdown(id="attn-head", options=hopts, value=head, clearable=False),
        ]), html.Div(id="attn-msg"), graph("attn-heat-fig")),
        card("Token to token", dcc.Loading(html.Div(id="attn-t2t"), type="dot")),
    ])


def register(app) -> None:
    @app.callback(Output("attn-cached", "style"), Output("attn-typed", "style"), Input("attn-source", "value"))
    def _source(source):
        return ({} if source == "cached" else {"display": "none"}), ({} if source == "typed" else {"display": "none"})

    @app.callback(Output("attn-doc", "options"), Output("attn-doc", "value"), Input("attn-run", "value"),
                  State("attn-doc", "value"), prevent_initial_call=True)
    def _docs(run, doc):
        try:
            docs = data.run_documents(check_run_id(run)) if run else []
        except (UnsafePathError, ValueError, CacheError):  # a hostile or vanished run id lists nothing
            docs = []
        return options(docs[:2000]), doc if doc in docs else (docs[0] if docs else None)

    @app.callback(Output("attn-layer", "options"), Output("attn-layer", "value"), Output("attn-head", "options"),
                  Output("attn-head", "value"), Input("attn-fid", "data"), State("attn-layer", "value"),
                  State("attn-head", "value"), prevent_initial_call=True)
    def _choices(fid, layer, head):
        return layer_head_choices(fid, layer, head)

    app.callback(Output("attn-heat-fig", "figure"), Output("attn-t2t", "children"), Output("attn-msg", "children"),
                 Input("attn-fid", "data"), Input("attn-layer", "value"), Input("attn-head", "value"))(heatmap_view)

    @app.callback(Output("attn-fid", "data"), Output("attn-status", "children"), Input("attn-go", "n_clicks"),
                  State("attn-source", "value"), State("attn-run", "value"), State("attn-doc", "value"),
                  State("attn-model", "value"), State("attn-text-in", "value"), prevent_initial_call=True,
                  background=True, progress=[Output("attn-status", "children")],
                  running=[(Output("attn-go", "disabled"), True, False)])
    def _go(set_progress, n, source, run, doc, model, text):
        def build():
            if source != "cached":
                return build_forward_spec(data.get_root(), model=model, text=text, attention=True)
            if not run or doc is None:
                raise ValueError("Choose a run and a document.")
            r = data.open_run(run)
            m = r.meta_tensors(["doc_index", "position", "token_id"])
            sel = (m["doc_index"] == int(doc)).nonzero().flatten()
            ids = m["token_id"][sel][m["position"][sel].argsort()].tolist()
            return build_forward_spec(data.get_root(), model=str(r.config.get("key", {}).get("model", "")),
                                      token_ids=ids, attention=True, source=f"run {run[:12]} document {doc}")

        return forward_button(set_progress, data.get_root(), build)

    STATE.register(app)
