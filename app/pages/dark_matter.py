"""Dark matter: the FVU of SAEs of several widths split into absent / linear / nonlinear error, R² bars,
next-token CE with each reconstruction spliced in, and a per-token scatter when the result holds one."""

from __future__ import annotations

from dash import Input, Output, dcc, html

from probekit import results as pr

from .. import data
from ..components import EMPTY_FIGURE, card, drawn, error, graph, headline_table, info, missing
from ..security import UnsafePathError, choice_or
from ..urlstate import PageState
from . import latents

PATH = "/dark-matter"
TITLE = "Dark matter"
SCHEMA = {"model": str, "fvu": str, "width": str}
FVU_MODES = {"stacked": "stacked split", "total": "total FVU only"}
#: Field the per-token scatter reads (written by ``probekit dark-matter run``):
#: ``{"width", "actual", "predicted", "hover"}`` for an evenly spaced subset of held-out tokens.
PER_TOKEN_FIELD = "scatter"


def _load(model):
    model = model or data.DEFAULT_MODEL
    try:
        return data.load_result("dark-matter", model), data.result_stamp("dark-matter", model), None
    except data.ResultMissing as e:
        return None, None, missing("dark-matter result for " + model, e.command,
                                   "It trains TopK SAEs of several widths on one residual stream (minutes on a GPU).")
    except (UnsafePathError, ValueError) as e:
        return None, None, error(str(e))


def figures_view(model: str | None, fvu_mode: str | None) -> tuple[dict, dict, dict, object]:
    """FVU split, R² bars and CE bars, plus one message (or ``None``)."""
    p, stamp, msg = _load(model)
    if p is None:
        return EMPTY_FIGURE, EMPTY_FIGURE, EMPTY_FIGURE, msg
    mode = choice_or(fvu_mode, FVU_MODES, "stacked")

    def build():
        return (pr.fvu_split_figure(p, mode=mode).to_dict(), pr.error_r2_figure(p).to_dict(),
                pr.ce_figure(p).to_dict())

    (f1, f2, f3), msg = drawn(("dm-figs", stamp, mode), build, n=3, what=f"dark_matter.json of {model}")
    return f1, f2, f3, msg


def headline_view(model: str | None) -> object:
    """The headline numbers (FVU, R² of e and of ‖e‖², CE recovered, the norm question), each beside its 95% CI
    over held-out documents and n, or why a number has none; or why the result cannot be shown."""
    p, _, msg = _load(model)
    return msg if p is None else headline_table(p, "dark_matter", id="dm-headline-table")


def scatter_view(model: str | None) -> tuple[dict, object]:
    """‖e‖ predicted from x against actual, per held-out token, hover = the token in context."""
    p, stamp, msg = _load(model)
    if p is None:
        return EMPTY_FIGURE, None
    pt = p.get(PER_TOKEN_FIELD)
    if not pt or not pt.get("actual"):
        return EMPTY_FIGURE, info("This result holds no per-token values (field scatter = {width, actual, "
                                  "predicted, hover}); rerun `probekit dark-matter run` to add them.")

    def build():
        return pr.error_scatter_figure(p, diagonal=False).to_dict()

    return drawn(("dm-scatter", stamp), build, what=f"the per-token scatter of {model}")


def controls(params: dict) -> list:
    """Values of the page's controls (:data:`STATE` order) for parsed query ``params``."""
    ids = data.list_results("dark-matter")
    model = params.get("model") or (ids[0] if ids else data.DEFAULT_MODEL)
    return [model, params.get("fvu") if params.get("fvu") in FVU_MODES else "stacked"]


STATE = PageState(PATH, SCHEMA, [("dm-model", "value"), ("dm-fvu", "value")], controls,
                  lambda model, fvu: dict(model=model, fvu=fvu))


def layout(params: dict) -> html.Div:
    ids = data.list_results("dark-matter")
    model, fvu = controls(params)
    return html.Div([
        STATE.location(),
        html.H2("Dark matter"),
        html.Div(className="controls", children=[
            dcc.Dropdown(id="dm-model", options=data.result_options("dark-matter", ids, model),
                         value=model, clearable=False),
            dcc.RadioItems(id="dm-fvu", options=[{"label": v, "value": k} for k, v in FVU_MODES.items()],
                           value=fvu, inline=True),
        ]),
        html.Div(id="dm-msg"),
        card("Headline numbers (95% CI over held-out documents)", dcc.Loading(html.Div(id="dm-headline"),
                                                                          type="dot")),
        card("FVU split by width", graph("dm-fvu-fig")),
        card("R² of the error from x", graph("dm-r2-fig")),
        card("CE with splices", graph("dm-ce-fig")),
        card("Per-token scatter", html.Div(id="dm-scatter-msg"), graph("dm-scatter-fig")),
        card("SAE latent pages", latents.sae_links(model)),
    ])


def register(app) -> None:
    app.callback(Output("dm-fvu-fig", "figure"), Output("dm-r2-fig", "figure"), Output("dm-ce-fig", "figure"),
                 Output("dm-msg", "children"), Input("dm-model", "value"), Input("dm-fvu", "value"))(figures_view)
    app.callback(Output("dm-headline", "children"), Input("dm-model", "value"))(headline_view)
    app.callback(Output("dm-scatter-fig", "figure"), Output("dm-scatter-msg", "children"),
                 Input("dm-model", "value"))(scatter_view)
    STATE.register(app)
