"""Tokens: a text coloured token by token by a quantity you choose.

The text is a cached document (a run, a hook, a document) or your own text, run through a model as a short
background job (``app.forward_worker``; every layer's ``hook_resid_post`` is kept, so changing the hook or the
quantity afterwards is instant). Quantities (:func:`app.viewdata.quantity`): ‖x‖, one neuron, the dot product
with a saved direction (``vectors/*.safetensors``, a safety result's refusal directions), or an SAE latent.
The colour scale is robust (:mod:`app.tokenspans`): the BOS token and attention-sink tokens are greyed and left
out of it by default. Hover a token for its position, decoded text and value.
"""

from __future__ import annotations

from dash import Input, Output, State, dcc, html

from .. import data, viewdata
from ..components import card, error, info, options
from ..tokenspans import legend, robust_scale, token_spans
from ..urlstate import PageState
from ..view_jobs import MAX_TEXT_CHARS, build_forward_spec, forward_button

PATH = "/tokens"
TITLE = "Tokens"
SCHEMA = {"source": str, "run": str, "doc": int, "fwd": str, "hook": str, "qty": str, "neuron": int, "vector": str,
          "sae": str, "latent": int, "sinks": bool}
SOURCES = {"cached": "a cached document", "typed": "your own text"}


# --------------------------------------------------------------------------------------------- pure views


def source_choices(source: str | None, run: str | None, fid: str | None, hook: str | None, doc=None):
    """Hook options and value, document options and value, for the chosen source."""
    hooks, docs = [], []
    if source == "typed":
        if fid:
            try:
                hooks = viewdata.load_forward(fid)[0].get("hooks", [])
            except Exception:
                hooks = []
    elif run:
        try:
            hooks = sorted(data.open_run(run).hooks, key=data.natural_key)
            docs = data.run_documents(run)
        except Exception:
            hooks, docs = [], []
    hooks = sorted(hooks, key=data.natural_key)
    hook = hook if hook in hooks else (hooks[-1] if hooks else None)
    doc = doc if doc in docs else (docs[0] if docs else None)
    return options(hooks), hook, options(docs[:2000]), doc


def token_view(source, run, doc, fid, hook, qty, neuron, vector, sae, latent, sinks) -> list:
    """The legend and the coloured tokens, or a message naming what is missing."""
    if not hook:
        return [info("Choose a cached run and document, or type text and press Run.")]
    try:
        if source == "typed":
            if not fid:
                return [info("Type text and press Run: the model runs once in a background job.")]
            src = viewdata.forward_activations(fid, hook)
        else:
            if not run or doc is None:
                return [info("Choose a run and a document.")]
            src = viewdata.doc_activations(run, hook, int(doc))
        values, label = viewdata.quantity(src["x"], qty or "norm", neuron=neuron, vector=vector, sae=sae,
                                          latent=latent)
    except Exception as e:  # a bad choice is shown in the page, never as a failed callback
        return [error(str(e))]
    values = [float(v) for v in values]
    exclude = bool(sinks) if sinks is not None else True
    scale = robust_scale(values, exclude_sinks=exclude, signed=None if qty in ("neuron", "direction") else False)
    note = None if src["decoded"] else info(f"No tokenizer for the model {src['model']!r} inside the cache root: "
                                            "tokens are shown as ids.")
    return [legend(scale, f"{label} at {hook}"), note,
            token_spans(src["tokens"], values, scale, label=label, id="tok-text", positions=src["positions"])]


def vector_options(d: int | None = None) -> list[dict]:
    return [{"label": v["label"], "value": v["value"]} for v in viewdata.list_vectors(d=d)]


# --------------------------------------------------------------------------------------------- layout


def controls(params: dict) -> list:
    """Values of the page's controls (:data:`STATE` order) for parsed query ``params``."""
    runs = [r for r in data.list_runs() if not r["error"]]
    run_ids = [r["run_id"] for r in runs]
    source = params.get("source") if params.get("source") in SOURCES else ("cached" if runs else "typed")
    run = params.get("run") if params.get("run") in run_ids else (run_ids[-1] if run_ids else None)
    fid = params.get("fwd")
    _, hook, _, doc = source_choices(source, run, fid, params.get("hook"), params.get("doc"))
    qty = params.get("qty") if params.get("qty") in viewdata.QUANTITIES else "norm"
    return [source, run, doc, fid, hook, qty, params.get("neuron", 0), params.get("vector"), params.get("sae"),
            params.get("latent", 0), ["on"] if params.get("sinks", True) else []]


def _query(source, run, doc, fid, hook, qty, neuron, vector, sae, latent, sinks) -> dict:
    return dict(source=source, run=run if source == "cached" else None, doc=doc if source == "cached" else None,
                fwd=fid if source == "typed" else None, hook=hook, qty=qty, neuron=neuron if qty == "neuron" else None,
                vector=vector if qty == "direction" else None, sae=sae if qty == "latent" else None,
                latent=latent if qty == "latent" else None, sinks=bool(sinks))


STATE = PageState(PATH, SCHEMA, [("tok-source", "value"), ("tok-run", "value"), ("tok-doc", "value"),
                                 ("tok-fid", "data"), ("tok-hook", "value"), ("tok-qty", "value"),
                                 ("tok-neuron", "value"), ("tok-vector", "value"), ("tok-sae", "value"),
                                 ("tok-latent", "value"), ("tok-sinks", "value")], controls, _query)


def layout(params: dict) -> html.Div:
    runs = [r for r in data.list_runs() if not r["error"]]
    source, run, doc, fid, hook, qty, neuron, vector, sae, latent, sinks = controls(params)
    hook_opts, hook, doc_opts, doc = source_choices(source, run, fid, hook, doc)
    models = [m for m in data.model_choices() if m["ready"]]
    return html.Div([
        STATE.location(),
        html.H2("Tokens"),
        card("Text", dcc.RadioItems(id="tok-source", options=[{"label": v, "value": k} for k, v in SOURCES.items()],
                                    value=source, inline=True),
             html.Div(id="tok-cached", className="controls", children=[
                 html.Label("run"),
                 dcc.Dropdown(id="tok-run", value=run, clearable=False, placeholder="no runs in this cache",
                              options=[{"label": f"{r['run_id'][:12]} · {r['model']} · {r['rows']:,} rows",
                                        "value": r["run_id"]} for r in runs]),
                 html.Label("document"),
                 dcc.Dropdown(id="tok-doc", options=doc_opts, value=doc, clearable=False),
             ], style={} if source == "cached" else {"display": "none"}),
             html.Div(id="tok-typed", children=[
                 dcc.Textarea(id="tok-text-in", value="", rows=4, maxLength=MAX_TEXT_CHARS,
                              placeholder="def add(a, b):\n    return a + b", style={"width": "100%"}),
                 html.Div(className="controls", children=[
                     html.Label("model"),
                     dcc.Dropdown(id="tok-model", options=[{"label": m["label"], "value": m["value"]} for m in models],
                                  value=models[0]["value"] if models else None, placeholder="no model fetched"),
                     html.Button("Run", id="tok-go", className="primary"),
                     html.Span(id="tok-status", className="progress-label"),
                 ]),
             ], style={} if source == "typed" else {"display": "none"}),
             dcc.Store(id="tok-fid", data=fid)),
        card("Colour by", html.Div(className="controls", children=[
            html.Label("hook"),
            dcc.Dropdown(id="tok-hook", options=hook_opts, value=hook, clearable=False),
            dcc.RadioItems(id="tok-qty", options=[{"label": v, "value": k} for k, v in viewdata.QUANTITIES.items()],
                           value=qty, inline=True),
        ]), html.Div(className="controls", children=[
            html.Label("neuron"), dcc.Input(id="tok-neuron", type="number", min=0, step=1,
                                            value=neuron, style={"width": "6rem"}),
            html.Label("direction"), dcc.Dropdown(id="tok-vector", options=vector_options(), value=vector,
                                                  placeholder="a saved vector"),
            html.Label("SAE"), dcc.Dropdown(id="tok-sae", options=options(viewdata.list_sae_folders()),
                                            value=sae, placeholder="an SAE folder"),
            html.Label("latent"), dcc.Input(id="tok-latent", type="number", min=0, step=1,
                                            value=latent, style={"width": "6rem"}),
            dcc.Checklist(id="tok-sinks", options=[{"label": "grey BOS / sink tokens and leave them out of the scale",
                                                    "value": "on"}],
                          value=sinks),
        ])),
        card("Tokens", dcc.Loading(html.Div(id="tok-view"), type="dot")),
    ])


def register(app) -> None:
    @app.callback(Output("tok-cached", "style"), Output("tok-typed", "style"), Input("tok-source", "value"))
    def _source(source):
        return ({} if source == "cached" else {"display": "none"}), ({} if source == "typed" else {"display": "none"})

    @app.callback(Output("tok-hook", "options"), Output("tok-hook", "value"), Output("tok-doc", "options"),
                  Output("tok-doc", "value"), Input("tok-source", "value"), Input("tok-run", "value"),
                  Input("tok-fid", "data"), State("tok-hook", "value"), State("tok-doc", "value"),
                  prevent_initial_call=True)
    def _choices(source, run, fid, hook, doc):
        return source_choices(source, run, fid, hook, doc)

    @app.callback(Output("tok-view", "children"), Input("tok-source", "value"), Input("tok-run", "value"),
                  Input("tok-doc", "value"), Input("tok-fid", "data"), Input("tok-hook", "value"),
                  Input("tok-qty", "value"), Input("tok-neuron", "value"), Input("tok-vector", "value"),
                  Input("tok-sae", "value"), Input("tok-latent", "value"), Input("tok-sinks", "value"))
    def _view(source, run, doc, fid, hook, qty, neuron, vector, sae, latent, sinks):
        return token_view(source, run, doc, fid, hook, qty, neuron, vector, sae, latent, bool(sinks))

    @app.callback(Output("tok-fid", "data"), Output("tok-status", "children"), Input("tok-go", "n_clicks"),
                  State("tok-model", "value"), State("tok-text-in", "value"), prevent_initial_call=True,
                  background=True, progress=[Output("tok-status", "children")],
                  running=[(Output("tok-go", "disabled"), True, False)])
    def _go(set_progress, n, model, text):
        return forward_button(set_progress, data.get_root(),
                              lambda: build_forward_spec(data.get_root(), model=model, text=text, all_resid=True))

    STATE.register(app)
