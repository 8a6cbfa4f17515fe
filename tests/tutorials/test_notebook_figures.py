"""probekit.notebook in this process: the figure bundle's entries, the PNG's content, the HTML's escaping, and
the warning when no browser can draw the image."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest
from PIL import Image

from probekit import notebook


def _png(bundle) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(bundle["image/png"]))).convert("RGB"))


def _red_bar(**layout) -> go.Figure:
    fig = go.Figure(go.Bar(x=["a"], y=[1.0], marker_color="#ff0000"))
    fig.update_layout(title="one red bar", xaxis_title="class", yaxis_title="count", **layout)
    return fig


def test_bundle_entries_and_png_content(chromium_for_figures):
    fig = _red_bar(width=400, height=300, margin=dict(l=50, r=10, t=40, b=40))
    b = notebook.figure_bundle(fig)
    assert set(b) == {notebook.PLOTLY_MIME, "text/html", "image/png", "text/plain"}
    assert b[notebook.PLOTLY_MIME] == json.loads(pio.to_json(fig))
    img = _png(b)
    assert img.shape == (300, 400, 3)  # the layout's size at scale 1
    # the bar fills the plot area's width (one category) and its full height (y from 0 to its value, padded 5%):
    # plot area = (400 - 60) × (300 - 80) pixels
    red = (img[..., 0] > 240) & (img[..., 1] < 30) & (img[..., 2] < 30)
    plot_area = 340 * 220
    assert 0.6 * plot_area < red.sum() < plot_area
    assert f'src="data:image/png;base64,{b["image/png"]}"' in b["text/html"]


def test_default_size_and_html_escaping(chromium_for_figures):
    fig = go.Figure(go.Scatter(x=[0, 1], y=[1, 0], name="</script><b>x</b>"))
    fig.update_layout(title="a </script> title & more", xaxis_title="x", yaxis_title="y")
    b = notebook.figure_bundle(fig)
    assert _png(b).shape == (500, 700, 3)  # plotly's default 700 × 500
    html = b["text/html"]
    assert html.count("</script>") == 1, "the figure's text ended the script element early"
    assert 'alt="a &lt;/script&gt; title &amp; more"' in html
    # the embedded figure is still the same JSON once the escaped "<\/" is read back
    data = html[html.index("var fig = ") + len("var fig = "):html.index(";\n  function draw")]
    assert json.loads(data) == json.loads(pio.to_json(fig.to_plotly_json(), validate=False))


def test_image_false_leaves_the_png_out():
    b = notebook.figure_bundle(_red_bar(), image=False)
    assert "image/png" not in b and "data:image" not in b["text/html"]
    assert notebook.PLOTLY_MIME in b


def test_no_browser_warns_with_the_hint_and_keeps_the_figure(monkeypatch):
    monkeypatch.setattr(notebook, "_server_started", False)
    monkeypatch.setattr(notebook, "_warned", False)
    monkeypatch.setattr(notebook, "chromium_path", lambda: None)
    with pytest.warns(RuntimeWarning, match="PROBEKIT_CHROMIUM"):
        b = notebook.figure_bundle(_red_bar())
    assert "image/png" not in b and notebook.PLOTLY_MIME in b
    with pytest.raises(RuntimeError, match="apt-get install -y chromium"):
        notebook.figure_png(_red_bar())


def test_setup_makes_it_plotlys_default_renderer(chromium_for_figures, monkeypatch):
    monkeypatch.setattr(pio.renderers, "default", pio.renderers.default)
    notebook.setup()
    assert pio.renderers.default == notebook.RENDERER
    bundle = _red_bar()._repr_mimebundle_()
    assert {"image/png", notebook.PLOTLY_MIME, "text/html"} <= set(bundle)


def test_a_wrong_probekit_chromium_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("PROBEKIT_CHROMIUM", str(tmp_path / "no-such-chromium"))
    with pytest.raises(RuntimeError, match="PROBEKIT_CHROMIUM=.*no-such-chromium.*is not a file"):
        notebook.chromium_path()
