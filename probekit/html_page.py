"""One self-contained HTML page of plotly figures (plotly.js inlined once, so it opens offline)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_figures_page"]


def write_figures_page(path: str | Path, figures: Sequence[Any], *, title: str = "probekit",
                       default_height: int = 520) -> Path:
    """Write ``figures`` one below the other into ``path``.

    A figure without an explicit layout height gets ``default_height`` pixels: a page of several divs would
    otherwise give each one the full window height. The figures are not modified.
    """
    path = Path(path)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"]
    for i, fig in enumerate(figures):
        if fig.layout.height is None:
            fig = type(fig)(fig)  # copy: leave the caller's figure as it was
            fig.update_layout(height=default_height)
        parts.append(fig.to_html(full_html=False, include_plotlyjs=i == 0))
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
