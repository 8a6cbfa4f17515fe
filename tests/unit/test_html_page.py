"""probekit.html_page: one offline page of plotly figures."""

from __future__ import annotations

import plotly.graph_objects as go

from probekit.html_page import write_figures_page


def test_page_inlines_plotly_once_and_sizes_figures(tmp_path):
    a = go.Figure(go.Scatter(x=[1, 2], y=[3, 4]))
    b = go.Figure(go.Bar(x=["p"], y=[1]), layout={"height": 900})
    path = write_figures_page(tmp_path / "p.html", [a, b], title="t <1>")
    text = path.read_text()
    assert text.count("* plotly.js v") == 1  # the bundle once, for both figures
    assert text.count("Plotly.newPlot") == 2
    assert '"height":520' in text.replace(" ", "") and '"height":900' in text.replace(" ", "")
    assert "<title>t &lt;1&gt;</title>" in text
    assert a.layout.height is None  # the caller's figure is untouched


def test_directory_mode_shares_one_bundle(tmp_path):
    import pytest

    figs = [go.Figure(go.Scatter(x=[1], y=[2]))]
    p1 = write_figures_page(tmp_path / "a.html", figs, plotlyjs="directory")
    js = tmp_path / "plotly.min.js"
    before = js.stat().st_mtime_ns
    p2 = write_figures_page(tmp_path / "b.html", figs, plotlyjs="directory")
    assert js.stat().st_mtime_ns == before  # written once, not per page
    assert "* plotly.js v" in js.read_text()[:2000]
    for p in (p1, p2):
        text = p.read_text()
        assert 'src="plotly.min.js"' in text and "* plotly.js v" not in text
    with pytest.raises(ValueError, match="plotlyjs"):
        write_figures_page(tmp_path / "c.html", figs, plotlyjs="cdn")
