"""One HTML page of plotly figures that opens offline: plotly.js inlined once, or shared from a file beside it."""

from __future__ import annotations

import html
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["html_table", "write_figures_page"]


def write_figures_page(path: str | Path, figures: Sequence[Any], *, title: str = "probekit",
                       default_height: int = 520, plotlyjs: str = "inline") -> Path:
    """Write ``figures`` one below the other into ``path``.

    A figure without an explicit layout height gets ``default_height`` pixels: a page of several divs would
    otherwise give each one the full window height. The figures are not modified.

    ``plotlyjs="inline"`` embeds plotly.js (~3.5 MB) so the page stands alone; ``"directory"`` writes
    ``plotly.min.js`` once beside the page and links to it, for a folder of many pages (keep them together).
    """
    # what the first figure embeds: the bundle itself, or a <script src="plotly.min.js">
    first = {"inline": True, "directory": "directory"}.get(plotlyjs)
    if first is None:
        raise ValueError(f"plotlyjs must be 'inline' or 'directory', got {plotlyjs!r}")
    path = Path(path)
    if plotlyjs == "directory":
        _write_plotlyjs(path.parent)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"]
    for i, fig in enumerate(figures):
        if fig.layout.height is None:
            fig = type(fig)(fig)  # copy: leave the caller's figure as it was
            fig.update_layout(height=default_height)
        parts.append(fig.to_html(full_html=False, include_plotlyjs=first if i == 0 else False))
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _write_plotlyjs(folder: Path) -> None:
    """``folder/plotly.min.js`` (the installed plotly's bundle), written atomically unless already the same."""
    from plotly.offline import get_plotlyjs

    js = get_plotlyjs().encode("utf-8")
    dest = folder / "plotly.min.js"
    if dest.is_file() and dest.stat().st_size == len(js) and dest.read_bytes() == js:
        return
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".plotly-", suffix=".tmp")  # unique: writers may race
    with os.fdopen(fd, "wb") as f:
        f.write(js)
    os.replace(tmp, dest)


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
