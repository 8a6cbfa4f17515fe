"""Latents: the per-latent pages of an SAE over a cache run (``results/latents/<name>/``, written by
:func:`probekit.latents.compute_latent_stats` through the job on this page or the Dark matter page's links).

A list of latents sortable by firing rate, a search by token ("which latents fire most on ``def``?"), and one
latent's page: its activation histogram, top-activating examples and examples from equal-count quantile groups
(tokens coloured by the latent's activation, hover for values), logit effects (decoder row through the
unembedding; the approximation is stated on the page) and its nearest latents by decoder cosine. Everything is
read from the precomputed arrays: a latent page only slices them.
"""

from __future__ import annotations

import numpy as np
from dash import Input, Output, State, dcc, html

from probekit.latents import latent_record

from .. import data, viewdata
from ..components import EMPTY_FIGURE, card, error, graph, info, missing, options
from ..tokenspans import Scale, legend, token_spans
from ..urlstate import PageState, encode_query
from ..view_jobs import build_latent_spec, latent_name, run_latent_job

PATH = "/latents"
TITLE = "Latents"
SCHEMA = {"result": str, "latent": int, "sort": str, "q": str, "sae": str, "run": str}
SORTS = {"rate": "firing rate", "max": "max activation", "id": "latent id"}


def _empty() -> html.Div:
    return missing("latent statistics", "open the Dark matter page and press 'latent pages' beside an SAE, "
                   "or start the job below", "The job encodes a cache run at the SAE's hook once and writes "
                   "results/latents/<name>/ (firing rates, histograms, top examples, logit effects, neighbours).")


# --------------------------------------------------------------------------------------------- pure views


def latent_list_view(result: str | None, sort: str | None, query: str | None) -> object:
    """The latent table (sorted) or, with a token ``query``, the latents firing most on that token."""
    if not result:
        return _empty()
    try:
        if query and query.strip():
            hits = viewdata.search_token(result, query)
            if not hits:
                return info(f"No token {query.strip()!r} in this run (matching ignores surrounding whitespace).")
            head = ["latent", "token", "mean activation on it", "token count"]
            rows = [[h["latent"], repr(h["token"]), f"{h['mean_act']:.3f}", h["count"]] for h in hits]
        else:
            hits = viewdata.latent_table(result, sort if sort in SORTS else "rate")
            head = ["latent", "firing rate", "max activation", "top token"]
            rows = [[h["latent"], f"{100 * h['firing_rate']:.2f} %", f"{h['max_act']:.3f}", repr(h["top_token"])]
                    for h in hits]
    except Exception as e:
        return error(f"results/latents/{result} cannot be read: {e}")
    body = [html.Tr([html.Td(html.A(str(r[0]), href=f"{PATH}{encode_query(dict(result=result, latent=r[0]))}",
                                    className="latent-link")), *[html.Td(str(c)) for c in r[1:]]]) for r in rows]
    return html.Div(html.Table([html.Thead(html.Tr([html.Th(h) for h in head])), html.Tbody(body)],
                               className="table", id="lat-table"), className="table-wrap",
                    style={"maxHeight": "420px", "overflowY": "auto"})


def _example(ex: dict, names: dict, scale: Scale, c: int, what: str) -> html.Div:
    keep = [j for j, t in enumerate(ex["tokens"]) if t >= 0]
    toks = [viewdata.token_name(names, ex["tokens"][j]) for j in keep]
    vals = [ex["acts"][j] for j in keep]
    return html.Div(className="example", children=[
        html.Span(f"{ex['act']:.3f}", className="example-act", title=f"{what} · document {ex['doc']}, "
                                                                      f"position {ex['pos']}"),
        token_spans(toks, vals, Scale(scale.lo, scale.hi, False, [False] * len(toks)), label="activation",
                    highlight=keep.index(c) if c in keep else None,
                    positions=[ex["pos"] - c + j for j in keep]),
    ])


def histogram_figure(rec: dict, hook: str) -> dict:
    """The activation histogram as a plain plotly dict (no graph_objects validation: it costs ~100 ms)."""
    n = rec["n_bins"]
    w = rec["max_act"] / n if rec["max_act"] > 0 else 1.0
    axis = dict(gridcolor="#e5e7eb", zerolinecolor="#cfd4da", automargin=True)
    return dict(data=[dict(type="bar", x=[(b + 0.5) * w for b in range(n)], y=rec["hist_counts"], width=w * 0.95,
                           marker=dict(color="#d62728"),
                           hovertemplate="activation ≈ %{x:.3f}<br>%{y} tokens<extra></extra>")],
                layout=dict(height=300, margin=dict(t=50, b=50, l=60, r=20), plot_bgcolor="#fff", paper_bgcolor="#fff",
                            title=dict(text=f"Latent {rec['latent']}: non-zero activations at {hook} "
                                            f"(firing rate {100 * rec['firing_rate']:.3g} %)"),
                            xaxis=dict(title=dict(text="activation"), **axis),
                            yaxis=dict(title=dict(text="tokens"), **axis)))


def latent_view(result: str | None, latent) -> tuple[dict, object, object, object, object, object]:
    """Histogram figure, summary, top examples, quantile examples, logit effects, neighbours (memoised per
    version of the result folder and latent)."""
    blank = (EMPTY_FIGURE, None, None, None, None, None)
    if not result:
        return blank
    if latent is None or latent == "":
        return (EMPTY_FIGURE, info("Pick a latent from the list (or type its number)."), None, None, None, None)
    try:
        stamp = viewdata.latents_stamp(result)
        return data.memo(("latent-view", stamp, int(latent)), lambda: _latent_view(result, int(latent)))
    except Exception as e:
        return (EMPTY_FIGURE, error(f"results/latents/{result} cannot be read: {e}"), None, None, None, None)


def _latent_view(result: str, latent: int):
    try:
        index, arrays, names = viewdata.load_latents(result)
        rec = latent_record(index, arrays, int(latent))
    except (IndexError, ValueError) as e:
        return (EMPTY_FIGURE, error(str(e)), None, None, None, None)
    except Exception as e:
        return (EMPTY_FIGURE, error(f"results/latents/{result} cannot be read: {e}"), None, None, None, None)
    scale = Scale(0.0, rec["max_act"], False, [])
    c = rec["context"]
    summary = html.Div([
        html.P([html.Strong(f"Latent {rec['latent']}"), f" of {index['d_sae']} · fires on {rec['firing_count']:,} of "
                f"{index['n_rows']:,} tokens ({100 * rec['firing_rate']:.3g} %) · max {rec['max_act']:.3f} · mean "
                f"{rec['mean_act']:.4f} · hook {index['hook']} · run {index['run_id'][:12]}"], id="lat-summary"),
        legend(scale, "activation"),
    ])
    top = html.Div([_example(e, names, scale, c, f"top {k + 1}") for k, e in enumerate(rec["top"])]
                   or [info("This latent never fires on this run (dead).")], className="examples", id="lat-top")
    groups = {}
    for e in rec["q"]:
        groups.setdefault(e["bin"], []).append(e)
    nq = int(index["config"]["n_quantiles"])
    quant = html.Div([html.Div([html.H4(f"quantile group {b + 1} of {nq} (by rank of the non-zero activations)"),
                                *[_example(e, names, scale, c, f"group {b + 1}") for e in es]])
                      for b, es in sorted(groups.items(), reverse=True)], className="examples", id="lat-quant")
    if "logits_pos" in rec:
        def table(items, title):
            return html.Table([html.Thead(html.Tr([html.Th(title), html.Th("effect")])), html.Tbody(
                [html.Tr([html.Td(repr(viewdata.token_name(names, it["token"]))), html.Td(f"{it['value']:+.3f}")])
                 for it in items])], className="table")
        logits = html.Div([html.P(index.get("logit_note", ""), className="hint"),
                           html.Div([table(rec["logits_pos"], "promoted tokens"),
                                     table(rec["logits_neg"], "suppressed tokens")], className="latent-grid")],
                          id="lat-logits")
    else:
        logits = info("No logit effects: the run's model was not found inside the cache root when the job ran.")
    neigh = html.Div([html.Span([html.A(str(n["latent"]),
                                        href=f"{PATH}{encode_query(dict(result=result, latent=n['latent']))}"),
                                 f" ({n['cos']:+.2f})  "]) for n in rec["neighbours"]], id="lat-neigh")
    return histogram_figure(rec, index["hook"]), summary, top, quant, logits, neigh


def _fits(run_id: str, hook: str, d_in: int) -> bool:
    """Whether the run holds ``hook`` with ``d_in`` features per row (the SAE can read it)."""
    if not hook:
        return False
    try:
        run = data.open_run(run_id)
        return hook in run.hooks and int(np.prod(run.shape(hook)[1:])) == int(d_in)
    except Exception:
        return False


def job_choices(sae: str | None) -> tuple[list, list, str | None]:
    """SAE folder options, and the runs holding the SAE's hook (options, first one)."""
    saes = viewdata.list_sae_folders()
    runs = []
    if sae in saes:
        try:
            cfg = viewdata.load_sae_folder(sae).cfg
            runs = [r for r in data.list_runs() if not r["error"] and _fits(r["run_id"], cfg.hook_name, cfg.d_in)]
        except Exception:  # an unreadable SAE folder offers no runs; the job's validation says why
            runs = []
    ropts = [{"label": f"{r['run_id'][:12]} · {r['model']} · {r['rows']:,} rows", "value": r["run_id"]} for r in runs]
    return options(saes), ropts, (ropts[0]["value"] if ropts else None)


# --------------------------------------------------------------------------------------------- layout


def controls(params: dict) -> list:
    """Values of the page's controls (:data:`STATE` order) for parsed query ``params``."""
    results = viewdata.list_latent_results()
    sae = params.get("sae")
    result = params.get("result")
    if not result and sae:
        result = latent_name(sae) if latent_name(sae) in results else None
    result = result or (results[0] if results else None)
    return [result, params.get("latent"), params.get("sort") if params.get("sort") in SORTS else "rate",
            params.get("q", ""), sae]


STATE = PageState(PATH, SCHEMA, [("lat-result", "value"), ("lat-latent", "value"), ("lat-sort", "value"),
                                 ("lat-search", "value"), ("lat-sae", "value")], controls,
                  lambda result, latent, sort, q, sae: dict(result=result, latent=latent, sort=sort, q=q, sae=sae))


def layout(params: dict) -> html.Div:
    results = viewdata.list_latent_results()
    result, latent, sort, q, sae = controls(params)
    sae_opts, run_opts, run = job_choices(sae)
    if params.get("run") in [o["value"] for o in run_opts]:
        run = params["run"]
    return html.Div([
        STATE.location(),
        html.H2("Latents"),
        html.Div(className="controls", children=[
            html.Label("latent statistics"),
            dcc.Dropdown(id="lat-result", options=options(results), value=result, clearable=False,
                         placeholder="no results yet"),
            html.Label("sort by"),
            dcc.RadioItems(id="lat-sort", options=[{"label": v, "value": k} for k, v in SORTS.items()],
                           value=sort, inline=True),
            dcc.Input(id="lat-search", type="text", value=q, debounce=True,
                      placeholder="search by token, e.g. def"),
            html.Label("latent"),
            dcc.Input(id="lat-latent", type="number", min=0, step=1, value=latent,
                      style={"width": "7rem"}),
        ]),
        html.Div(id="lat-msg", children=None if results else _empty()),
        card("Latents", dcc.Loading(html.Div(id="lat-list"), type="dot")),
        card("Latent page", html.Div(id="lat-head"), graph("lat-hist-fig"),
             html.H4("Top-activating examples"), dcc.Loading(html.Div(id="lat-top-wrap"), type="dot"),
             html.H4("Examples across the activation range"), html.Div(id="lat-quant-wrap"),
             html.H4("Logit effects"), html.Div(id="lat-logits-wrap"),
             html.H4("Nearest latents by decoder cosine"), html.Div(id="lat-neigh-wrap"), id="lat-page"),
        card("Compute latent statistics",
             html.P("Streams the run's rows at the SAE's hook through the SAE once (a background job). Position 0 "
                    "(the BOS token, an attention sink with outsized activations) is left out of the statistics.",
                    className="hint"),
             html.Div(className="controls", children=[
                 dcc.Dropdown(id="lat-sae", options=sae_opts, value=sae, placeholder="SAE folder"),
                 dcc.Dropdown(id="lat-run", options=run_opts, value=run, placeholder="cache run at its hook"),
                 html.Button("Compute", id="lat-launch", className="primary"),
                 html.Button("Cancel", id="lat-cancel", disabled=True),
             ]),
             html.Span(id="lat-job-status", className="progress-label"), html.Div(id="lat-job-result")),
    ])


def register(app) -> None:
    app.callback(Output("lat-list", "children"), Input("lat-result", "value"), Input("lat-sort", "value"),
                 Input("lat-search", "value"))(latent_list_view)

    @app.callback(Output("lat-hist-fig", "figure"), Output("lat-head", "children"), Output("lat-top-wrap", "children"),
                  Output("lat-quant-wrap", "children"), Output("lat-logits-wrap", "children"),
                  Output("lat-neigh-wrap", "children"), Input("lat-result", "value"), Input("lat-latent", "value"))
    def _latent(result, latent):
        return latent_view(result, latent)

    @app.callback(Output("lat-run", "options"), Output("lat-run", "value"), Input("lat-sae", "value"),
                  prevent_initial_call=True)
    def _runs(sae):
        _, ropts, run = job_choices(sae)
        return ropts, run

    @app.callback(Output("lat-job-result", "children"), Output("lat-job-status", "children"),
                  Input("lat-launch", "n_clicks"), State("lat-sae", "value"), State("lat-run", "value"),
                  prevent_initial_call=True, background=True,
                  progress=[Output("lat-job-status", "children")],
                  running=[(Output("lat-launch", "disabled"), True, False),
                           (Output("lat-cancel", "disabled"), False, True)],
                  cancel=[Input("lat-cancel", "n_clicks")])
    def _launch(set_progress, n, sae, run):
        try:
            spec = build_latent_spec(data.get_root(), sae=sae, run_id=run)
        except ValueError as e:
            return error(str(e)), ""
        set_progress(["starting the worker …"])

        def on(ev):
            if ev.get("event") == "progress" and ev.get("total"):
                set_progress([f"{100 * ev['done'] / ev['total']:.0f} % of {ev['total']:,} rows"])
            else:
                set_progress([ev.get("message", "")])

        final = run_latent_job(spec, data.get_root(), on)
        if final.get("event") != "done":
            return error(final.get("message", "the job failed")), "failed"
        href = f"{PATH}{encode_query(dict(result=final['name']))}"
        return html.Div(["Done in ", f"{final.get('seconds', 0):.1f} s: ", dcc.Link(f"open {final['name']}", href=href,
                                                                                    id="lat-job-link")]), "done"

    STATE.register(app)


def sae_links(model: str | None) -> html.Div:
    """For the Dark matter page: each SAE folder of ``results/dark-matter/<model>/saes/`` with a link to its latent
    pages (when computed) and to the job that computes them."""
    prefix = f"results/dark-matter/{model}/saes/"
    saes = [s for s in viewdata.list_sae_folders() if s.startswith(prefix)]
    if not saes:
        return info("This result has no saved SAEs (results/dark-matter/<model>/saes/); `probekit dark-matter run` "
                    "writes them.")
    done = set(viewdata.list_latent_results())
    rows = []
    for s in saes:
        name = latent_name(s)
        link = (html.A("latent pages", href=f"{PATH}{encode_query(dict(result=name))}", className="sae-latents")
                if name in done else html.A("compute latent pages", href=f"{PATH}{encode_query(dict(sae=s))}",
                                            className="sae-launch"))
        rows.append(html.Tr([html.Td(s[len(prefix):]), html.Td(link)]))
    return html.Table([html.Tbody(rows)], className="table", id="dm-sae-links")
