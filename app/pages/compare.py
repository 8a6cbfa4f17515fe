"""Compare: two result sets of the same probe (two models, two configs) overlaid on the per-layer figure, and
their headline numbers (:func:`probekit.results.headline`) side by side with the difference B − A."""

from __future__ import annotations

from dash import Input, Output, dcc, html

from probekit import results as pr

from .. import data
from ..components import EMPTY_FIGURE, card, error, graph, info, options
from ..security import UnsafePathError
from ..urlstate import PageState

PATH = "/compare"
TITLE = "Compare"
SCHEMA = {"kind": str, "a": str, "b": str}
#: Result kinds with a per-layer curve: (label, field of ``result`` per layer, y-axis title).
KINDS = {"demo": ("per-layer syntax probes", "test_score", "test accuracy"),
         "ast-probe": ("AST-Probe", "f1", "constituent F1 (test)")}
COLOURS = ("#1f77b4", "#d62728")


def _load(kind: str, rid: str | None):
    if not rid:
        return None
    return data.load_result(kind, rid)


def compare_view(kind: str | None, a: str | None, b: str | None) -> tuple[dict, object, object]:
    """Overlay figure, headline table, message."""
    if not isinstance(kind, str) or kind not in KINDS:
        return EMPTY_FIGURE, None, info("Choose a probe.")
    if not a or not b:
        return EMPTY_FIGURE, None, info("Choose two result sets (A and B).")
    label, field, ytitle = KINDS[kind]
    try:
        pa, pb = _load(kind, a), _load(kind, b)
        traces, heads = [], []
        for name, p, colour in ((a, pa, COLOURS[0]), (b, pb, COLOURS[1])):
            r = p["result"]
            traces.append(dict(type="scatter", mode="lines+markers", name=f"{name}", x=[str(x) for x in r["layers"]],
                               y=[float(v) for v in r[field]], line=dict(color=colour),
                               hovertemplate=f"{name}<br>layer %{{x}}: %{{y:.3f}}<extra></extra>"))
            heads.append(pr.headline(p))
    except data.ResultMissing as e:
        return EMPTY_FIGURE, None, error(f"{e} {e.command}")
    except (UnsafePathError, KeyError, TypeError, ValueError) as e:
        return EMPTY_FIGURE, None, error(f"these results cannot be compared: {type(e).__name__}: {e}")
    axis = dict(gridcolor="#e5e7eb", automargin=True)
    fig = dict(data=traces, layout=dict(
        height=380, plot_bgcolor="#fff", paper_bgcolor="#fff", margin=dict(t=50, b=50, l=60, r=20),
        title=dict(text=f"{label}: {a} (A) vs {b} (B)"), legend=dict(orientation="h", y=-0.2),
        xaxis=dict(title=dict(text="layer"), type="category", **axis), yaxis=dict(title=dict(text=ytitle), **axis)))
    # each number beside its 95% CI and n (probekit.results.headline's "<name>, 95% CI" companion); B − A is a
    # difference of points: two runs need not share their test units, so it has no paired interval
    pairs = [{k: (v, ci) for k, v, ci in pr.headline_rows(h)} for h in heads]
    rows = [html.Tr([html.Th(""), html.Th(f"A: {a}"), html.Th("A: 95% CI (n)"), html.Th(f"B: {b}"),
                     html.Th("B: 95% CI (n)"), html.Th("B − A (points)")])]
    for k in dict.fromkeys([*pairs[0], *pairs[1]]):
        (va, ca), (vb, cb) = pairs[0].get(k, (None, "")), pairs[1].get(k, (None, ""))
        num = isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool)
        fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
        rows.append(html.Tr([html.Td(k), html.Td(fmt(va)), html.Td(ca), html.Td(fmt(vb)), html.Td(cb),
                             html.Td(f"{vb - va:+.3f}" if num and k != "best layer" else "")]))
    table = html.Div(html.Table([html.Tbody(rows)], className="table", id="cmp-table"), className="table-wrap")
    return fig, table, None


def controls(params: dict) -> list:
    """Values of the page's controls (:data:`STATE` order) for parsed query ``params``."""
    kind = params.get("kind") if isinstance(params.get("kind"), str) and params.get("kind") in KINDS else "demo"
    ids = data.list_results(kind)
    a = params.get("a") if params.get("a") in ids else (ids[0] if ids else None)
    b = params.get("b") if params.get("b") in ids else (ids[1] if len(ids) > 1 else a)
    return [kind, a, b]


STATE = PageState(PATH, SCHEMA, [("cmp-kind", "value"), ("cmp-a", "value"), ("cmp-b", "value")], controls,
                  lambda kind, a, b: dict(kind=kind, a=a, b=b), settle=True)


def layout(params: dict) -> html.Div:
    kind, a, b = controls(params)
    ids = data.list_results(kind)
    return html.Div([
        STATE.location(),
        html.H2("Compare"),
        html.Div(className="controls", children=[
            dcc.RadioItems(id="cmp-kind", options=[{"label": v[0], "value": k} for k, v in KINDS.items()], value=kind,
                           inline=True),
            html.Label("A"), dcc.Dropdown(id="cmp-a", options=options(ids), value=a, clearable=False),
            html.Label("B"), dcc.Dropdown(id="cmp-b", options=options(ids), value=b, clearable=False),
        ]),
        html.Div(id="cmp-msg"),
        card("Per layer", graph("cmp-fig")),
        card("Headline numbers", html.Div(id="cmp-head")),
    ])


def register(app) -> None:
    @app.callback(Output("cmp-a", "options"), Output("cmp-b", "options"), Input("cmp-kind", "value"),
                  prevent_initial_call=True)
    def _ids(kind):
        o = options(data.list_results(kind)) if isinstance(kind, str) and kind in KINDS else []
        return o, o

    app.callback(Output("cmp-fig", "figure"), Output("cmp-head", "children"), Output("cmp-msg", "children"),
                 Input("cmp-kind", "value"), Input("cmp-a", "value"), Input("cmp-b", "value"))(compare_view)

    STATE.register(app)
