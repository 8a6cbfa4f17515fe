"""Small layout pieces shared by the pages: messages for missing results and errors, figure cards."""

from __future__ import annotations

from dash import dcc, html

EMPTY_FIGURE = {"data": [], "layout": {"template": "plotly_white", "xaxis": {"visible": False},
                                       "yaxis": {"visible": False}, "height": 200}}


def missing(what: str, command: str, note: str | None = None) -> html.Div:
    """A box saying that a result does not exist yet and the exact command that writes it."""
    return html.Div(className="notice missing", children=[
        html.Strong(f"No {what} yet."), " Produce it with:",
        html.Pre(command, className="command"),
        html.P(note) if note else None,
    ])


def error(message: str) -> html.Div:
    """A red box with an error message (never a stack trace)."""
    return html.Div(str(message), className="notice error", role="alert")


def drawn(key: tuple, build, *, n: int = 1, what: str = "this result"):
    """``(data.memo(key, build), None)``; when the payload lacks something a figure reads (an older or incomplete
    result file), ``n`` empty figures and an error naming what failed instead of a failed callback."""
    from . import data

    try:
        return data.memo(key, build), None
    except (KeyError, TypeError, ValueError, IndexError) as e:
        empty = EMPTY_FIGURE if n == 1 else (EMPTY_FIGURE,) * n
        return empty, error(f"{what} cannot be drawn ({type(e).__name__}: {e}); it may come from an older or "
                            "incomplete run: re-run the command that wrote it.")


def info(message) -> html.Div:
    return html.Div(message, className="notice info")


def card(title: str, *children, id: str | None = None) -> html.Section:
    kw = {"id": id} if id else {}
    return html.Section(className="card", children=[html.H3(title), *children], **kw)


def graph(id: str, *, scroll: bool = False) -> dcc.Loading:
    """A figure container. Its height is the figure's own (every builder sets one that fits its content; see
    :func:`probekit.figure_layout.fit_figure`); ``scroll``: a figure wider than the page (a long AST tree)
    scrolls sideways instead of being squeezed."""
    g = dcc.Graph(id=id, figure=EMPTY_FIGURE, config={"displaylogo": False})
    return dcc.Loading(html.Div(g, className="graph-scroll") if scroll else g, type="dot")


def options(values, labels=None) -> list[dict]:
    labels = labels or values
    return [{"label": str(lab), "value": v} for v, lab in zip(values, labels)]


def _number(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"
    return "" if v is None else str(v)


def headline_table(payload: dict, kind: str, *, id: str) -> html.Div:
    """A result's headline numbers (:func:`probekit.results.headline`): each value beside its 95% CI with n (or
    why there is none), and "too few to conclude" in a number's place below the minimum n. ``kind`` names the
    result kind of a payload that does not carry one; a payload a headline cannot be read from gives an error box."""
    from probekit import results as pr

    try:
        rows = pr.headline_rows(pr.headline({**payload, "kind": payload.get("kind", kind)}))
    except (KeyError, TypeError, ValueError, IndexError) as e:
        return error(f"the headline numbers cannot be read ({type(e).__name__}: {e}); the result may come from an "
                     "older or incomplete run: re-run the command that wrote it.")
    head = html.Tr([html.Th("figure"), html.Th("value"), html.Th("95% CI (n)")])
    body = [html.Tr([html.Td(k), html.Td(_number(v)), html.Td(ci)]) for k, v, ci in rows]
    return html.Div(html.Table([html.Thead(head), html.Tbody(body)], className="table", id=id),
                    className="table-wrap")
