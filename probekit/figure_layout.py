"""Figure sizes that fit their content: one rule for every single-plot figure the runs, reports and app draw.

A figure drawn without a height takes its container's (in the app, whatever the previous figure left), and a
legend put below the plot with a negative ``y`` falls off a short figure. :func:`fit_figure` gives a figure an
explicit height from what it shows and puts its legend inside it, right of the plot:

* top margin 80 px with a title (40 without), bottom 70 px plus room for rotated category tick labels;
* the plot area at least ``min_plot_px`` (340) high, at least 22 px per legend entry, per category of a
  horizontal bar chart and 14 px per heat-map row, and at least 1.6 × the margins (so it is ≥ 60 % of the
  figure's height);
* the legend vertical, anchored at the plot's top right.

Figures with several subplots or a table size themselves (their builders know their grid) and are left alone.

>>> import plotly.graph_objects as go
>>> fig = fit_figure(go.Figure(go.Bar(x=["a", "b"], y=[1, 2]), layout={"title": "t"}))
>>> fig.layout.height, fig.layout.margin.t, fig.layout.margin.b
(490, 80, 70)
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["fit_figure", "MIN_PLOT_PX"]

MIN_PLOT_PX = 340
_TOP_TITLE, _TOP_BARE, _BOTTOM = 80, 40, 70
_PX_PER_ENTRY, _PX_PER_HEAT_ROW = 22, 14
_CHAR_PX = 6.5  # tick-label font of the default template (12 px), average glyph width


def _shows_in_legend(fig: Any) -> int:
    traces = list(fig.data)
    if fig.layout.showlegend is False:
        return 0
    shown = [t for t in traces if t.showlegend is not False and getattr(t, "name", None)]
    if len(traces) == 1 and traces[0].showlegend is not True:
        return 0  # plotly draws no legend for a lone trace
    return len(shown)


def _tick_room(fig: Any) -> int:
    """Extra bottom margin for rotated category tick labels of the x axis (px)."""
    ax = fig.layout.xaxis
    angle = ax.tickangle if isinstance(ax.tickangle, (int, float)) else 0
    if not angle:
        return 0
    labels = ax.ticktext or [v for t in fig.data for v in (getattr(t, "x", None) or []) if isinstance(v, str)]
    longest = max((len(str(v)) for v in labels), default=0)
    return int(min(220, _CHAR_PX * longest * abs(math.sin(math.radians(angle)))))


def fit_figure(fig: Any, *, min_plot_px: int = MIN_PLOT_PX) -> Any:
    """Set ``fig``'s height, top/bottom margins and legend position from its content (in place; returns it).

    Parameters
    ----------
    fig : plotly.graph_objects.Figure
        A single-plot figure; one with subplots (``xaxis2``) or a table is returned unchanged.
    min_plot_px : int
        Least height of the plot area in pixels.

    Returns
    -------
    plotly.graph_objects.Figure
        ``fig``; its ``layout.height`` is the larger of the computed height and any height it already had.
    """
    lay = fig.layout
    if "xaxis2" in lay or any(t.type == "table" for t in fig.data):
        return fig
    top = _TOP_TITLE if lay.title.text else _TOP_BARE
    bottom = _BOTTOM + _tick_room(fig)
    n_legend = _shows_in_legend(fig)
    plot = max(min_plot_px, math.ceil(1.6 * (top + bottom)), _PX_PER_ENTRY * n_legend + 20)
    for t in fig.data:
        if t.type == "heatmap" and t.z is not None:
            plot = max(plot, _PX_PER_HEAT_ROW * len(t.z))
        if t.type == "bar" and t.orientation == "h" and t.y is not None:
            plot = max(plot, _PX_PER_ENTRY * len(t.y))
    height = max(top + plot + bottom, lay.height or 0)
    fig.update_layout(height=height, margin={"t": top, "b": bottom})
    if n_legend:
        fig.update_layout(legend={"orientation": "v", "x": 1.02, "xanchor": "left", "y": 1.0, "yanchor": "top"})
    return fig
