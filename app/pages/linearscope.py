"""LinearScope: pick a digit → the input, the class rows of A(x) as images and the bias share b_k / y_k;
pick a prompt result → each token's exact contribution to the predicted logit beside gradient × input."""

from __future__ import annotations

from dash import Input, Output, dcc, html

from probekit import results as pr

from .. import data
from ..components import EMPTY_FIGURE, card, drawn, error, graph, headline_table, missing, options
from ..security import UnsafePathError, check_index, choice_or
from ..urlstate import PageState

PATH = "/linearscope"
TITLE = "LinearScope"


def _digit(v: str):
    """A digit choice: a test index of the cache's digits (int) or a report's digit set (``report:<name>/<i>``)."""
    if v.isdigit():
        return int(v)
    if v.startswith(data.REPORT_PREFIX):
        return v
    raise ValueError(v)


SCHEMA = {"digit": _digit, "model": str, "view": str}
VIEWS = {"bars": "bars", "heatmap": "heatmap"}


def _digit_result(digit: int | str | None):
    """(payload, stamp, index, None) of a digit choice, or (None, None, index, message)."""
    i = None
    try:
        if isinstance(digit, str) and digit.startswith(data.REPORT_PREFIX):
            tail = digit.rsplit("/", 1)[-1]
            rid, idx, i = digit, None, int(tail) if tail.isdigit() else None
        else:
            i = check_index(0 if digit is None else digit, "digit")
            rid, idx = "digits-cnn", i
        p = data.load_result("linearscope-digits", rid, index=idx)
        return p, data.result_stamp("linearscope-digits", rid, index=idx), i, None
    except data.ResultMissing as e:
        return None, None, i, missing(f"LinearScope result for test digit {i}", e.command)
    except (UnsafePathError, ValueError) as e:
        return None, None, i, error(str(e))


def headline_view(digit: int | str | None) -> object:
    """The test-set headline numbers of the digits CNN (bias share with its 95% CI over test images, test
    accuracy with its Wilson interval, n) or why they cannot be shown."""
    p, _, _, msg = _digit_result(digit)
    return msg if p is None else headline_table(p, "linearscope_digits", id="ls-headline-table")


def digit_view(digit: int | str | None) -> tuple[dict, dict, object]:
    """Input + class-row images of A, and the bias share per class, for ``digits-cnn/digit-<i>.json`` (an int
    ``digit``) or a report's digit (``report:<name>/<i>``)."""
    p, stamp, i, msg = _digit_result(digit)
    if p is None:
        return EMPTY_FIGURE, EMPTY_FIGURE, msg

    def build():
        return pr.digit_rows_figure(p, index=i).to_dict(), pr.bias_share_figure(p).to_dict()

    (a, b), msg = drawn(("ls-digit", stamp), build, n=2, what=f"digit-{i}.json")
    return a, b, msg


def prompt_view(model: str | None, view: str | None) -> tuple[dict, object]:
    """Per-token contributions to the predicted next-token logit (LinearScope vs gradient × input)."""
    model = model or data.DEFAULT_MODEL
    view = choice_or(view, VIEWS, "bars")
    try:
        p = data.load_result("linearscope-lm", model)
        stamp = data.result_stamp("linearscope-lm", model)
    except data.ResultMissing as e:
        return EMPTY_FIGURE, missing(f"LinearScope prompt result for {model}", e.command)
    except (UnsafePathError, ValueError) as e:
        return EMPTY_FIGURE, error(str(e))

    def build():
        return pr.token_contributions_figure(p, view=view).to_dict()

    return drawn(("ls-prompt", stamp, view), build, what=f"token-contributions.json of {model}")


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


def digit_options(selected: int | str | None = None) -> tuple[list[dict], int | str]:
    """The picker's options (every computed digit of the cache, plus ``selected`` when it is not one, then every
    report's digits) and its value."""
    digits = [int(d) for d in data.list_cache_results("linearscope-digits")]
    reports = [d for d in data.list_results("linearscope-digits") if d.startswith(data.REPORT_PREFIX)]
    digit = selected if selected is not None else (digits[0] if digits else (reports[0] if reports else 0))
    values = digits if digit in digits or digit in reports else digits + [digit]
    labels = [digit_label(d) for d in values] + [data.result_label("linearscope-digits", r) for r in reports]
    return options(values + reports, labels), digit


def controls(params: dict) -> list:
    """Values of the page's controls (:data:`STATE` order) for parsed query ``params``."""
    lms = data.list_results("linearscope-lm")
    _, digit = digit_options(params.get("digit"))
    return [digit, params.get("model") or (lms[0] if lms else data.DEFAULT_MODEL),
            params.get("view") if params.get("view") in VIEWS else "bars"]


STATE = PageState(PATH, SCHEMA, [("ls-digit", "value"), ("ls-model", "value"), ("ls-view", "value")], controls,
                  lambda digit, model, view: dict(digit=digit, model=model, view=view))


def layout(params: dict) -> html.Div:
    lms = data.list_results("linearscope-lm")
    digit, model, view = controls(params)
    digit_opts, _ = digit_options(digit)
    return html.Div([
        STATE.location(),
        html.H2("LinearScope"),
        card("Digits CNN",
             dcc.Dropdown(id="ls-digit", options=digit_opts, value=digit, clearable=False),
             html.Div(id="ls-digit-msg"), graph("ls-rows-fig"), graph("ls-share-fig"),
             html.H4("Test set"), dcc.Loading(html.Div(id="ls-headline"), type="dot")),
        card("Token contributions to a logit",
             html.Div(className="controls", children=[
                 dcc.Dropdown(id="ls-model", options=data.result_options("linearscope-lm", lms, model),
                              value=model, clearable=False),
                 dcc.RadioItems(id="ls-view", options=[{"label": v, "value": k} for k, v in VIEWS.items()],
                                value=view, inline=True),
             ]),
             html.Div(id="ls-prompt-msg"), graph("ls-prompt-fig")),
    ])


def register(app) -> None:
    app.callback(Output("ls-headline", "children"), Input("ls-digit", "value"))(headline_view)
    app.callback(Output("ls-rows-fig", "figure"), Output("ls-share-fig", "figure"), Output("ls-digit-msg", "children"),
                 Input("ls-digit", "value"))(digit_view)
    app.callback(Output("ls-prompt-fig", "figure"), Output("ls-prompt-msg", "children"), Input("ls-model", "value"),
                 Input("ls-view", "value"))(prompt_view)
    STATE.register(app)
