"""Tokens as coloured text: the robust colour scale and the spans that the token view and the latent pages share.

A token's text is shown with its whitespace visible (``·`` for a space, ``→`` for a tab, ``⏎`` before a line
break), its background coloured by a value, and its value and decoded text on hover.

Colour scale (:func:`robust_scale`): tokens that would dominate it are *excluded* and greyed: the first token
of a document (BOS, the usual attention sink) and, for non-negative quantities such as ‖x‖, any token whose
value exceeds ``SINK_FACTOR`` × the median of the others (the "massive activations" of Sun et al., 2024). The
remaining values set the range: ``[0, max]`` for non-negative quantities (white → red), ``[−m, m]`` with
``m = max |v|`` for signed ones (blue → white → red).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dash import html

SINK_FACTOR = 5.0
GREY = "rgba(160, 160, 160, 0.35)"


def visible(text: str) -> str:
    """``text`` with whitespace drawn: space ``·``, tab ``→``, newline ``⏎`` followed by the line break."""
    return text.replace(" ", "·").replace("\t", "→").replace("\r", "").replace("\n", "⏎\n")


@dataclass
class Scale:
    lo: float
    hi: float
    signed: bool
    excluded: list[bool]

    def colour(self, v: float, excluded: bool = False) -> str:
        """Background colour of value ``v`` (grey when excluded or not finite)."""
        if excluded or not math.isfinite(v):
            return GREY
        if self.signed:
            m = max(abs(self.lo), abs(self.hi), 1e-12)
            a = max(-1.0, min(1.0, v / m))
            return f"rgba(214, 39, 40, {0.85 * a:.3f})" if a >= 0 else f"rgba(31, 119, 180, {-0.85 * a:.3f})"
        span = self.hi - self.lo
        a = 0.0 if span <= 0 else max(0.0, min(1.0, (v - self.lo) / span))
        return f"rgba(214, 39, 40, {0.04 + 0.86 * a:.3f})"


def robust_scale(values: list[float], *, exclude_sinks: bool = True, first_is_bos: bool = True,
                 signed: bool | None = None) -> Scale:
    """The colour scale of ``values`` with BOS/sink tokens excluded (see the module docstring).

    Parameters
    ----------
    values : list of float, one per token in position order.
    exclude_sinks : whether to exclude position 0 and massive values from the range.
    first_is_bos : whether position 0 is a BOS token (excluded when ``exclude_sinks``).
    signed : force a diverging (True) or sequential (False) scale; by default signed when any value < 0.
    """
    n = len(values)
    fin = [v if math.isfinite(v) else float("nan") for v in values]
    excluded = [False] * n
    if exclude_sinks and n > 1:
        if first_is_bos:
            excluded[0] = True
        rest = sorted(v for i, v in enumerate(fin) if not excluded[i] and math.isfinite(v))
        if rest and rest[0] >= 0:
            med = rest[len(rest) // 2]
            for i, v in enumerate(fin):
                if math.isfinite(v) and med > 0 and v > SINK_FACTOR * med:
                    excluded[i] = True
    kept = [v for i, v in enumerate(fin) if not excluded[i] and math.isfinite(v)]
    if not kept:
        kept = [v for v in fin if math.isfinite(v)] or [0.0]
    if signed is None:
        signed = min(kept) < 0
    lo, hi = (min(kept), max(kept)) if signed else (0.0 if min(kept) >= 0 else min(kept), max(kept))
    return Scale(lo=lo, hi=hi, signed=signed, excluded=excluded)


def token_spans(tokens: list[str], values: list[float], scale: Scale, *, label: str = "value",
                id: str | None = None, highlight: int | None = None, positions: list[int] | None = None) -> html.Div:
    """One ``span.tok`` per token, coloured by ``scale``; hover shows position, decoded token and value.

    ``highlight`` outlines one token (the example's own token on a latent page).
    """
    spans = []
    for i, (t, v) in enumerate(zip(tokens, values)):
        ex = scale.excluded[i] if i < len(scale.excluded) else False
        pos = positions[i] if positions else i
        note = " (excluded from the colour scale)" if ex else ""
        title = f"position {pos} · token {t!r} · {label} = {v:.4g}{note}"
        cls = "tok tok-excluded" if ex else "tok"
        if highlight == i:
            cls += " tok-focus"
        spans.append(html.Span(visible(t), className=cls, title=title,
                               style={"backgroundColor": scale.colour(v, ex)}, **{"data-value": f"{v:.6g}"}))
    kw = {"id": id} if id else {}
    return html.Div(spans, className="token-text", **kw)


def legend(scale: Scale, label: str) -> html.Div:
    """A colour bar with its range and what is greyed."""
    if scale.signed:
        m = max(abs(scale.lo), abs(scale.hi))
        grad = "linear-gradient(90deg, rgba(31,119,180,.85), #fff, rgba(214,39,40,.85))"
        ends = (f"{-m:.3g}", f"{m:.3g}")
    else:
        grad, ends = "linear-gradient(90deg, rgba(214,39,40,.04), rgba(214,39,40,.9))", (f"{scale.lo:.3g}",
                                                                                        f"{scale.hi:.3g}")
    n_ex = sum(scale.excluded)
    return html.Div(className="legend token-legend", children=[
        html.Strong(label), " ", html.Span(ends[0]),
        html.Span(className="colourbar", style={"background": grad}), html.Span(ends[1]),
        html.Span(f" · {n_ex} token{'s' if n_ex != 1 else ''} greyed (BOS / attention sink), outside the scale"
                  if n_ex else ""),
    ])
