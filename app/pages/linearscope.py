"""LinearScope: pick a digit → the input, the class rows of A(x) as images and the bias share b_k / y_k;
pick a prompt result → each token's exact contribution to the predicted logit beside gradient × input."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from dash import Input, Output, dcc, html
from plotly.subplots import make_subplots

from .. import data
from ..components import EMPTY_FIGURE, card, error, graph, missing, options
from ..security import UnsafePathError
from ..urlstate import encode_query

PATH = "/linearscope"
TITLE = "LinearScope"
SCHEMA = {"digit": int, "model": str, "view": str}
VIEWS = {"bars": "bars", "heatmap": "heatmap"}


def digit_view(digit: int | None) -> tuple[dict, dict, object]:
    """Input + class-row images of A, and the bias share per class, for ``digits-cnn/digit-<i>.json``."""
    i = int(digit) if digit is not None else 0
    try:
        p = data.load_result("linearscope-digits", "digits-cnn", index=i)
        stamp = data.result_stamp("linearscope-digits", "digits-cnn", index=i)
    except data.ResultMissing as e:
        return EMPTY_FIGURE, EMPTY_FIGURE, missing(f"LinearScope result for test digit {i}", e.command)
    except (UnsafePathError, ValueError) as e:
        return EMPTY_FIGURE, EMPTY_FIGURE, error(str(e))

    def build():
        one = p["one"]
        side = int(round(np.sqrt(np.asarray(one["input"]).size)))
        A = np.asarray(one["matrix"], dtype=float)
        n_cls = A.shape[0]
        fig = make_subplots(rows=2, cols=6, subplot_titles=["input"] + [f"row {k}" for k in range(n_cls)],
                            horizontal_spacing=0.02, vertical_spacing=0.12)
        fig.add_trace(go.Heatmap(z=np.asarray(one["input"], float).reshape(side, side)[::-1].tolist(), colorscale="gray_r",
                                 showscale=False, name="input"), row=1, col=1)
        lim = float(np.abs(A).max()) or 1.0
        for k in range(n_cls):
            r, c = divmod(k + 1, 6)
            fig.add_trace(go.Heatmap(z=A[k].reshape(side, side)[::-1].tolist(), zmin=-lim, zmax=lim, colorscale="RdBu",
                                     showscale=k == 0, name=f"class {k}"), row=r + 1, col=c + 1)
        fig.update_xaxes(visible=False)
        fig.update_yaxes(visible=False, scaleanchor="x")
        fig.update_layout(title=f"Digit {i}: label {one.get('label')}, predicted {one.get('predicted')} — "
                                "class rows of A(x) (y = A x + b exactly)", template="plotly_white", height=420)
        share = go.Figure(go.Bar(x=[str(k) for k in range(len(one["bias_share"]))], y=one["bias_share"],
                                 marker_color=["#d62728" if k == one.get("predicted") else "#1f77b4"
                                               for k in range(len(one["bias_share"]))]))
        ts = p.get("test_set") or {}
        share.update_layout(title=f"Bias share b_k / y_k per class (red: predicted); test-set mean at the predicted "
                                  f"class {ts.get('mean_share_predicted', float('nan')):+.3f}",
                            xaxis_title="class", yaxis_title="b_k / y_k", template="plotly_white")
        return fig.to_dict(), share.to_dict()

    a, b = data.memo(("ls-digit", stamp), build)
    return a, b, None


def prompt_view(model: str | None, view: str | None) -> tuple[dict, object]:
    """Per-token contributions to the predicted next-token logit (LinearScope vs gradient × input)."""
    model = model or data.DEFAULT_MODEL
    view = view if view in VIEWS else "bars"
    try:
        p = data.load_result("linearscope-lm", model)
        stamp = data.result_stamp("linearscope-lm", model)
    except data.ResultMissing as e:
        return EMPTY_FIGURE, missing(f"LinearScope prompt result for {model}", e.command)
    except (UnsafePathError, ValueError) as e:
        return EMPTY_FIGURE, error(str(e))

    def build():
        c = p["contributions"]
        toks = [f"{i}:{t}" for i, t in enumerate(c["tokens"])]
        title = (f"{p.get('prompt', '')!r} → {c.get('target')!r}: logit {c.get('logit', 0):.2f} = "
                 f"Σ LinearScope + b ({c.get('bias', 0):.2f})")
        if view == "bars":
            fig = go.Figure([go.Bar(x=toks, y=c["linearscope"], name="LinearScope (exact)"),
                             go.Bar(x=toks, y=c["grad_x_input"], name="gradient × input")])
            fig.update_layout(barmode="group", yaxis_title="contribution to the logit")
        else:
            z = [c["linearscope"], c["grad_x_input"]]
            lim = float(np.nanmax(np.abs(z))) or 1.0
            fig = go.Figure(go.Heatmap(z=z, x=toks, y=["LinearScope", "gradient × input"], colorscale="RdBu",
                                       zmin=-lim, zmax=lim))
        fig.update_layout(title=title, template="plotly_white", xaxis_title="token")
        fig.update_xaxes(type="category")
        return fig.to_dict()

    return data.memo(("ls-prompt", stamp, view), build), None


def digit_label(i: int) -> str:
    """``"#12 (class 3)"`` for a computed digit (its true class read from the file), ``"#12 (not computed)"``."""
    try:
        one = data.load_result("linearscope-digits", "digits-cnn", index=i).get("one")
    except data.ResultMissing:
        return f"#{i} (not computed)"
    except (UnsafePathError, ValueError, OSError):
        return f"#{i}"
    label = one.get("label") if isinstance(one, dict) else None
    return f"#{i} (class {label})" if isinstance(label, int) and not isinstance(label, bool) else f"#{i}"


def digit_options(selected: int | None = None) -> tuple[list[dict], int]:
    """The picker's options (every computed digit, plus ``selected`` when it is not one) and its value."""
    digits = [int(d) for d in data.list_results("linearscope-digits")]
    digit = selected if selected is not None else (digits[0] if digits else 0)
    values = digits if digit in digits else digits + [digit]
    return options(values, [digit_label(d) for d in values]), digit


def layout(params: dict) -> html.Div:
    lms = data.list_results("linearscope-lm")
    digit_opts, digit = digit_options(params.get("digit"))
    model = params.get("model") or (lms[0] if lms else data.DEFAULT_MODEL)
    return html.Div([
        html.H2("LinearScope"),
        card("Digits CNN",
             dcc.Dropdown(id="ls-digit", options=digit_opts, value=digit, clearable=False),
             html.Div(id="ls-digit-msg"), graph("ls-rows-fig"), graph("ls-share-fig")),
        card("Token contributions to a logit",
             html.Div(className="controls", children=[
                 dcc.Dropdown(id="ls-model", options=options(lms + [model] if model not in lms else lms), value=model, clearable=False),
                 dcc.RadioItems(id="ls-view", options=[{"label": v, "value": k} for k, v in VIEWS.items()],
                                value=params.get("view") if params.get("view") in VIEWS else "bars", inline=True),
             ]),
             html.Div(id="ls-prompt-msg"), graph("ls-prompt-fig")),
    ])


def register(app) -> None:
    app.callback(Output("ls-rows-fig", "figure"), Output("ls-share-fig", "figure"), Output("ls-digit-msg", "children"),
                 Input("ls-digit", "value"))(digit_view)
    app.callback(Output("ls-prompt-fig", "figure"), Output("ls-prompt-msg", "children"), Input("ls-model", "value"),
                 Input("ls-view", "value"))(prompt_view)

    @app.callback(Output("url", "search", allow_duplicate=True), Input("ls-digit", "value"), Input("ls-model", "value"),
                  Input("ls-view", "value"), prevent_initial_call=True)
    def _url(digit, model, view):
        return encode_query(dict(digit=digit, model=model, view=view))
