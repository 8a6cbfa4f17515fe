"""One self-contained HTML page of plotly figures (plotly.js inlined once, so it opens offline)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["html_table", "write_figures_page"]


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


def html_table(rows: Sequence[dict[str, Any]], *, caption: str | None = None, digits: int = 3) -> str:
    """A small HTML table (for ``_repr_html_`` in Jupyter): one row per dict, columns from the first row.

    Floats are rounded to ``digits`` significant digits; every cell is HTML-escaped.
    """
    def cell(v: Any) -> str:
        if isinstance(v, float):
            v = f"{v:.{digits}g}"
        return html.escape(str(v))

    cols = list(rows[0]) if rows else []
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
