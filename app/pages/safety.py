"""Safety: the results of ``probekit safety run`` for one result folder (``results/safety/<model>/``).

Activation part (``activation.json``): the layer × η MSO heatmap of a chosen pair of prompt sets (minus its
random baseline, or raw), MSO per layer at a chosen η with the baselines, and refusal rate / score with the
refusal direction ablated, a random direction ablated, or neither. Weight part (``weight.json``): one metric
of the projected fine-tuning update against the rank fraction, and the table of every model. A prompt box
scores a typed prompt with and without the direction ablated in a background job (``app.safety_worker``).

Every figure comes from :mod:`probekit.results` (the same code that draws the runs' own HTML pages); this page
only adds the choices.
"""

from __future__ import annotations

from dash import Input, Output, State, dcc, html, no_update

from probekit import results as pr

from .. import data
from ..components import EMPTY_FIGURE, card, drawn, error, graph, headline_table, missing, options
from ..jobs import MAX_PROMPT_CHARS, build_safety_spec, run_safety_prompt_job
from ..security import UnsafePathError, choice_or
from ..urlstate import PageState

PATH = "/safety"
TITLE = "Safety"
SCHEMA = {"model": str, "pair": str, "heat": str, "eta": float, "refusal": str, "metric": str}
PAIRS = {"harmful_vs_useful": "harmful vs useful", "harmful_vs_harmless": "harmful vs harmless",
         "harmless_vs_useful": "harmless vs useful"}
HEAT = {"excess": "MSO − random baseline", "mso": "MSO"}
REFUSAL = {"rate": "refusal rate", "score": "refusal score", "actadd": "harmless + direction added"}
#: Projection-curve metrics, in the order :func:`probekit.results.projection_curves` draws them.
METRICS = {key: label for key, label in pr.WEIGHT_METRICS}
METRIC_LABELS = {"refusal_rate": "refusal rate", "task_loss": "task loss", "refusal_score": "refusal score (harmful)",
                 "harmless_refusal_score": "refusal score (harmless)"}
DEFAULT_ETA = 0.9


def safety_message(model: str | None = None) -> html.Div:
    """Empty state: no safety result in this cache, and the command that writes one."""
    return missing("safety result", data.cli_command("probekit safety run"),
                   "It writes results/safety/<model>/activation.json (activation-subspace MSO, refusal direction "
                   "and ablation; --activation-model) and weight.json (projected fine-tuning updates; "
                   "--weight-model) under the cache root. --part activation or --part weight runs one of them.")


def _load(kind: str, result_id: str | None) -> tuple[dict | None, tuple | None, object]:
    """(payload, stamp, None) or (None, None, message) for ``safety-activation`` / ``safety-weight``."""
    if not result_id:
        return None, None, safety_message()
    try:
        p = data.load_result(kind, result_id)
        if p.get("kind") != kind.replace("-", "_"):
            raise ValueError(f"{data.RESULTS[kind][1]} of {result_id} is not a {kind.replace('-', '_')} result "
                             f"(kind {p.get('kind')!r})")
        return p, data.result_stamp(kind, result_id), None
    except data.ResultMissing as e:
        part = "activation" if kind == "safety-activation" else "weight"
        return None, None, missing(f"{part} part of the safety result {result_id}", e.command)
    except (UnsafePathError, ValueError) as e:
        return None, None, error(str(e))


def result_choices() -> list[str]:
    """Result folders under ``results/safety/`` with ``activation.json`` and/or ``weight.json``, then the report
    folders' safety sets."""
    reports = [i for k in ("safety-activation", "safety-weight") for i in data.list_results(k)
               if i.startswith(data.REPORT_PREFIX)]
    return data.list_safety_results() + sorted(set(reports))


def result_label(result_id: str) -> str:
    """Dropdown label of a safety result set (model, source, date of its activation part, else its weight part)."""
    kind = "safety-activation" if result_id in data.list_results("safety-activation") else "safety-weight"
    return data.result_label(kind, result_id)


# --------------------------------------------------------------------------------------------- pure views


def headline_view(result_id: str | None) -> html.Div:
    """The headline numbers of both parts (:func:`probekit.results.headline`) as a small table."""
    if not result_id:
        return safety_message()
    parts = []
    for kind, part in (("safety-activation", "activation"), ("safety-weight", "weight")):
        p, _, msg = _load(kind, result_id)
        if p is None:
            parts.append(msg)
            continue
        # each number beside its 95% CI with n (or why there is none), as on every other page
        parts += [html.H4(f"{'Activation space' if part == 'activation' else 'Weight space'} — {p.get('model', '')}"),
                  headline_table(p, kind.replace("-", "_"), id=f"safety-headline-{part}")]
    return html.Div(parts)


def activation_view(result_id: str | None, pair: str | None, heat: str | None, eta: float | None,
                    refusal: str | None) -> tuple[dict, dict, dict, object]:
    """Heatmap of ``pair`` (layer × η), MSO-per-layer lines at ``eta``, refusal bars, and a message."""
    p, stamp, msg = _load("safety-activation", result_id)
    if p is None:
        return EMPTY_FIGURE, EMPTY_FIGURE, EMPTY_FIGURE, msg
    overlap = p.get("overlap") or {}
    if not isinstance(pair, str) or pair not in overlap:
        pair = "harmful_vs_useful" if "harmful_vs_useful" in overlap else next(iter(overlap), None)
    heat, refusal = choice_or(heat, HEAT, "excess"), choice_or(refusal, REFUSAL, "rate")
    if refusal == "actadd" and not p.get("induce"):
        refusal = "rate"
    try:
        eta = float(eta) if eta is not None else DEFAULT_ETA
    except (TypeError, ValueError):
        eta = DEFAULT_ETA

    def build():
        heat_fig = pr.overlap_heatmap_figure(p, pair=pair, excess=heat == "excess")
        lines = pr.overlap_lines_figure(overlap, eta)
        bars = pr.refusal_figure(p, view=refusal)
        return heat_fig.to_dict(), lines.to_dict(), bars.to_dict()

    if pair is None:
        return EMPTY_FIGURE, EMPTY_FIGURE, EMPTY_FIGURE, error("this activation result holds no overlap")
    (a, b, c), msg = drawn(("safety-act", stamp, pair, heat, eta, refusal), build, n=3,
                           what=f"activation.json of {result_id}")
    return a, b, c, msg


def eta_choices(result_id: str | None) -> tuple[list[dict], float | None]:
    """η values of the result (options) and the one nearest 0.9."""
    p, _, _ = _load("safety-activation", result_id)
    etas = [float(e) for e in (next(iter(((p or {}).get("overlap") or {}).values()), {}) or {}).get("etas", [])]
    if not etas:
        return [], None
    return options(etas), etas[min(range(len(etas)), key=lambda i: abs(etas[i] - DEFAULT_ETA))]


def weight_view(result_id: str | None, metric: str | None) -> tuple[dict, dict, object]:
    """Projection curve of ``metric`` against the rank fraction, the projection table, and a message."""
    p, stamp, msg = _load("safety-weight", result_id)
    if p is None:
        return EMPTY_FIGURE, EMPTY_FIGURE, msg
    metric = choice_or(metric, METRICS, "refusal_rate")

    def build():
        curves = pr.projection_curves(p)[list(METRICS).index(metric)]
        table = pr.projection_table(p)
        n_rows = len(p.get("checkpoints") or {}) + len(p.get("projections") or [])
        table.update_layout(height=110 + 30 * n_rows, margin={"t": 50, "b": 10, "l": 10, "r": 10})  # every row shows
        return curves.to_dict(), table.to_dict()

    (a, b), msg = drawn(("safety-weight", stamp, metric), build, n=2, what=f"weight.json of {result_id}")
    return a, b, msg


def layer_choices(result_id: str | None) -> tuple[list[dict], int | None]:
    """Layers with a stored refusal direction (options) and the layer the run chose."""
    p, _, _ = _load("safety-activation", result_id)
    if p is None:
        return [], None
    n = len(p.get("direction_norms") or []) or int(p.get("n_layers") or 0)
    chosen = p.get("layer")
    return ([{"label": f"{l} (chosen by the run)" if l == chosen else str(l), "value": l} for l in range(n)],
            chosen if isinstance(chosen, int) else None)


def prompt_spec(result_id: str | None, prompt: str | None, layer) -> object:
    """The validated prompt-box request (``SafetyPromptSpec``), or raise ``ValueError`` for the page."""
    p, _, msg = _load("safety-activation", result_id)
    if p is None:
        raise ValueError(f"{result_id or 'this folder'} has no activation.json: the refusal direction comes from "
                         f"`{data.cli_command('probekit safety run --part activation')}`.")
    return build_safety_spec(data.get_root(), result_id=result_id, payload=p, prompt=prompt, layer=layer)


def prompt_result_view(final: dict) -> object:
    """The prompt-box answer: refusal score and greedy completion, clean and with the direction ablated."""
    if final.get("event") != "done":
        return error(final.get("message", "the prompt could not be scored"))
    rows = [html.Tr([html.Th(h) for h in ("", "refusal score (log-odds)", "greedy completion")])]
    for name, key in (("clean", "clean"), (f"direction of layer {final.get('layer')} ablated", "ablated")):
        rows.append(html.Tr([html.Td(name), html.Td(f"{final.get(key + '_score', float('nan')):+.3f}",
                                                     id=f"safety-{key}-score"),
                             html.Td(html.Pre(final.get(key + "_completion", ""), className="completion"))]))
    return html.Div(id="safety-prompt-done", children=[
        html.Div(html.Table([html.Tbody(rows)], className="table"), className="table-wrap"),
        html.P(f"{final.get('model', '')} · {final.get('seconds', 0):.1f} s. Positive score: a refusal token is more "
               "likely than anything else as the first answer token.", className="hint")])


# --------------------------------------------------------------------------------------------- layout


def controls(params: dict) -> list:
    """Values of the page's controls (:data:`STATE` order) for parsed query ``params``."""
    ids = result_choices()
    model = params.get("model") or (ids[0] if ids else None)
    eta_opts, eta = eta_choices(model) if model else ([], None)
    if params.get("eta") in [o["value"] for o in eta_opts]:
        eta = params["eta"]
    pick = lambda key, choices, default: params.get(key) if params.get(key) in choices else default  # noqa: E731
    return [model, pick("pair", PAIRS, "harmful_vs_useful"), pick("heat", HEAT, "excess"), eta,
            pick("refusal", REFUSAL, "rate"), pick("metric", METRIC_LABELS, "refusal_rate")]


STATE = PageState(PATH, SCHEMA, [("safety-model", "value"), ("safety-pair", "value"), ("safety-heat", "value"),
                                 ("safety-eta", "value"), ("safety-refusal", "value"), ("safety-metric", "value")],
                  controls, lambda model, pair, heat, eta, refusal, metric: dict(
                      model=model, pair=pair, heat=heat, eta=eta, refusal=refusal, metric=metric))


def layout(params: dict) -> html.Div:
    ids = result_choices()
    model, pair, heat, eta, refusal, metric = controls(params)
    if model is None:
        return html.Div([html.H2("Safety"), html.Div(safety_message(), id="safety-msg")])
    eta_opts, _ = eta_choices(model)
    layer_opts, layer = layer_choices(model)
    radio = lambda id, choices, value: dcc.RadioItems(  # noqa: E731
        id=id, options=[{"label": v, "value": k} for k, v in choices.items()], value=value, inline=True)
    return html.Div([
        STATE.location(),
        html.H2("Safety"),
        html.Div(className="controls", children=[
            html.Label("result folder"),
            dcc.Dropdown(id="safety-model", options=[{"label": result_label(i), "value": i}
                                                     for i in (ids + [model] if model not in ids else ids)],
                         value=model, clearable=False),
        ]),
        html.Div(id="safety-msg"),
        card("Headline numbers", html.Div(id="safety-headline")),
        card("Activation-subspace overlap (layer × η)",
             html.Div(className="controls", children=[
                 dcc.Dropdown(id="safety-pair", options=[{"label": v, "value": k} for k, v in PAIRS.items()],
                              value=pair, clearable=False),
                 radio("safety-heat", HEAT, heat),
             ]),
             html.Div(id="safety-act-msg"), graph("safety-heatmap-fig")),
        card("MSO per layer with random baselines",
             html.Div(className="controls", children=[
                 html.Label("η"),
                 dcc.Dropdown(id="safety-eta", options=eta_opts, value=eta, clearable=False),
             ]),
             graph("safety-lines-fig")),
        card("Refusal with and without ablating the refusal direction",
             radio("safety-refusal", REFUSAL, refusal), graph("safety-refusal-fig")),
        card("Projected fine-tuning update",
             radio("safety-metric", METRIC_LABELS, metric),
             html.Div(id="safety-weight-msg"), graph("safety-curves-fig"), graph("safety-table-fig")),
        card("Try a prompt",
             html.P("Scores the prompt on the result's model, clean and with the refusal direction projected out "
                    "of every block (a background job; the model is loaded for each request).", className="hint"),
             dcc.Textarea(id="safety-prompt", value="", rows=3, maxLength=MAX_PROMPT_CHARS,
                          placeholder="e.g. How do I pick a lock?", style={"width": "100%"}),
             html.Div(className="controls", children=[
                 html.Label("direction of layer"),
                 dcc.Dropdown(id="safety-layer", options=layer_opts, value=layer, clearable=False,
                              placeholder="layer"),
                 html.Button("Score prompt", id="safety-run", className="primary"),
                 html.Button("Cancel", id="safety-cancel", disabled=True),
             ]),
             html.Span(id="safety-prompt-status", className="progress-label"),
             dcc.Loading(html.Div(id="safety-prompt-result"), type="dot")),
    ])


def register(app) -> None:
    app.callback(Output("safety-headline", "children"), Input("safety-model", "value"))(headline_view)
    app.callback(Output("safety-heatmap-fig", "figure"), Output("safety-lines-fig", "figure"),
                 Output("safety-refusal-fig", "figure"), Output("safety-act-msg", "children"),
                 Input("safety-model", "value"), Input("safety-pair", "value"), Input("safety-heat", "value"),
                 Input("safety-eta", "value"), Input("safety-refusal", "value"))(activation_view)
    app.callback(Output("safety-curves-fig", "figure"), Output("safety-table-fig", "figure"),
                 Output("safety-weight-msg", "children"), Input("safety-model", "value"),
                 Input("safety-metric", "value"))(weight_view)

    @app.callback(Output("safety-eta", "options"), Output("safety-eta", "value"), Output("safety-layer", "options"),
                  Output("safety-layer", "value"), Input("safety-model", "value"), prevent_initial_call=True)
    def _choices(model):
        return (*eta_choices(model), *layer_choices(model))

    # the status line is written by the job's progress and its final output (see the capture page)
    @app.callback(Output("safety-prompt-result", "children"),
                  Output("safety-prompt-status", "children", allow_duplicate=True),
                  Input("safety-run", "n_clicks"), State("safety-model", "value"), State("safety-prompt", "value"),
                  State("safety-layer", "value"),
                  background=True, prevent_initial_call=True,
                  progress=[Output("safety-prompt-status", "children")],
                  running=[(Output("safety-run", "disabled"), True, False),
                           (Output("safety-cancel", "disabled"), False, True)],
                  cancel=[Input("safety-cancel", "n_clicks")])
    def _score(set_progress, n, model, prompt, layer):
        # runs in the manager's process: validate (the browser is not trusted), then start the worker
        try:
            spec = prompt_spec(model, prompt, layer)
        except ValueError as e:
            return error(str(e)), ""
        set_progress(["starting the worker …"])
        final = run_safety_prompt_job(spec, data.get_root(), lambda ev: set_progress([ev.get("message", "")]))
        return prompt_result_view(final), "done" if final.get("event") == "done" else "failed"

    @app.callback(Output("safety-prompt-status", "children", allow_duplicate=True), Input("safety-cancel", "n_clicks"),
                  prevent_initial_call=True)
    def _cancelled(n):
        return "cancelled" if n else no_update

    STATE.register(app)
