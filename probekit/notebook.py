"""Plotly figures in notebooks that show everywhere: interactive where JavaScript runs, a PNG where it does not.

A figure's display output (one mime bundle) carries

- ``application/vnd.plotly.v1+json``: the interactive figure for JupyterLab, VS Code and nteract;
- ``text/html``: a ``<div>`` holding the PNG as an ``<img>`` plus a script that loads plotly.js from its CDN and
  replaces the image with the interactive figure. nbconvert HTML renders this entry; where scripts do not run
  (a sanitising viewer, an untrusted notebook) or plotly.js cannot be fetched (offline), the image stays;
- ``image/png``: the same static image, for viewers that render images only;
- ``text/plain``: a one-line description.

The PNG is rendered by kaleido (1.x), which drives a local Chrome/Chromium; nothing is downloaded. The browser is
found like the browser tests find theirs: ``$PROBEKIT_CHROMIUM``, ``$BROWSER_PATH``, ``/usr/bin/chromium``, then
``chromium`` / ``chromium-browser`` / ``google-chrome`` on ``PATH``. Without kaleido or a browser the figure still
shows interactively and a warning says what to install; ``image=False`` turns the image off on purpose.

    from probekit.notebook import setup
    setup()        # fig.show() and a figure as a cell's value now display the bundle above
"""

from __future__ import annotations

import atexit
import base64
import html
import json
import os
import shutil
import threading
import uuid
import warnings
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
from plotly.io.base_renderers import MimetypeRenderer
from plotly.offline import get_plotlyjs_version

RENDERER = "probekit"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
INSTALL_HINT = ("the static image of a figure needs kaleido>=1 (`pip install kaleido`, part of `.[dev]`) and a "
                "Chrome/Chromium: `apt-get install -y chromium` (Debian/Ubuntu) or set PROBEKIT_CHROMIUM to a "
                "Chromium binary")

_server_lock = threading.Lock()
_server_started = False
_warned = False


def chromium_path() -> str | None:
    """Path of a Chrome/Chromium binary for kaleido, or None when none is found (the search order is above).

    Raises RuntimeError when ``$PROBEKIT_CHROMIUM`` is set but names no file (a typo should not pick another one).
    """
    named = os.environ.get("PROBEKIT_CHROMIUM")
    if named and not Path(named).is_file():
        raise RuntimeError(f"PROBEKIT_CHROMIUM={named!r} is not a file: point it at a Chromium binary or unset it")
    for cand in (named, os.environ.get("BROWSER_PATH"), "/usr/bin/chromium",
                 shutil.which("chromium"), shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if cand and Path(cand).is_file():
            return cand
    return None


def _ensure_server() -> None:
    """Start kaleido's browser once per process: a fresh browser per figure costs seconds each."""
    global _server_started
    with _server_lock:
        if _server_started:
            return
        import kaleido

        path = chromium_path()
        if path is None:
            raise RuntimeError("no Chrome/Chromium found; " + INSTALL_HINT)
        kaleido.start_sync_server(path=path, silence_warnings=True)
        atexit.register(kaleido.stop_sync_server, silence_warnings=True)
        _server_started = True


def figure_png(fig: go.Figure | dict, *, width: int | None = None, height: int | None = None,
               scale: float = 1.0) -> bytes:
    """The figure as PNG bytes, rendered by kaleido in the local Chromium (layout size, else 700 × 500).

    Raises RuntimeError naming what to install when kaleido or a browser is missing.
    """
    try:
        import kaleido  # noqa: F401  (the check only)
    except ImportError as e:
        raise RuntimeError("kaleido is not installed; " + INSTALL_HINT) from e
    from kaleido.errors import JavascriptError

    _ensure_server()
    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                # plotly passes its (empty) kaleido options on every call; the running server has them already
                warnings.filterwarnings("ignore", message="The kopts argument is ignored", category=UserWarning)
                return pio.to_image(fig, format="png", width=width, height=height, scale=scale)
        except JavascriptError:
            # on a loaded machine kaleido can call into its page before the page's scripts have run
            # ("kaleido_scopes is not defined"); the same figure then renders on a second try
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _title(fig_dict: dict) -> str:
    title = (fig_dict.get("layout") or {}).get("title") or {}
    text = title.get("text") if isinstance(title, dict) else title
    return str(text) if text else "plotly figure"


def _html(fig_json: str, png_b64: str | None, title: str) -> str:
    """The text/html entry: the image in a div, replaced by the interactive figure once plotly.js has loaded."""
    div_id = "probekit-fig-" + uuid.uuid4().hex
    cdn = f"https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js"  # the version this plotly bundles
    body = (f'<img class="probekit-static" src="data:image/png;base64,{png_b64}" alt="{html.escape(title)}" '
            'style="max-width:100%">' if png_b64 else f'<p class="probekit-static">{html.escape(title)}</p>')
    # "</" would end the <script> element early: JSON allows the escaped form
    data = fig_json.replace("</", "<\\/")
    return f"""<div id="{div_id}" class="probekit-figure">{body}</div>
<script type="text/javascript">
(function () {{
  var fig = {data};
  function draw(Plotly) {{
    var el = document.getElementById("{div_id}");
    if (!el || !Plotly) return;
    var img = el.querySelector(".probekit-static");
    var holder = document.createElement("div");
    el.appendChild(holder);
    Plotly.newPlot(holder, fig.data, fig.layout, Object.assign({{responsive: true}}, fig.config || {{}}))
      .then(function () {{ if (img) img.remove(); }});
  }}
  if (window.Plotly) {{ draw(window.Plotly); return; }}
  if (typeof window.requirejs === "function") {{
    window.requirejs.config({{paths: {{plotly: "{cdn[:-3]}"}}}});
    // plotly.js 3 defines no AMD module: it sets window.Plotly once loaded
    window.requirejs(["plotly"], function (P) {{ draw(P || window.Plotly); }}, function () {{}});
    return;
  }}
  var s = document.createElement("script");
  s.src = "{cdn}"; s.charset = "utf-8";
  s.onload = function () {{ draw(window.Plotly); }};
  document.head.appendChild(s);
}})();
</script>"""


def figure_bundle(fig: go.Figure | dict, *, image: bool = True) -> dict:
    """The mime bundle described in the module docstring; ``image=False`` leaves out the PNG.

    A missing kaleido or browser gives a warning (once per process) and a bundle without the PNG.
    """
    global _warned
    fig_dict = fig.to_dict() if isinstance(fig, go.Figure) else dict(fig)
    fig_json = pio.to_json(fig_dict, validate=False)
    png = None
    if image:
        try:
            png = figure_png(fig_dict)
        except RuntimeError as e:
            if not _warned:
                warnings.warn(f"figures are shown without their static image: {e}", RuntimeWarning, stacklevel=3)
                _warned = True
    png_b64 = base64.b64encode(png).decode("ascii") if png is not None else None
    title = _title(fig_dict)
    bundle = {PLOTLY_MIME: json.loads(fig_json), "text/html": _html(fig_json, png_b64, title),
              "text/plain": f"<plotly figure: {title}>"}
    if png_b64 is not None:
        bundle["image/png"] = png_b64
    return bundle


class FallbackRenderer(MimetypeRenderer):
    """A plotly renderer that emits :func:`figure_bundle`."""

    def __init__(self, image: bool = True):
        self.image = image

    def to_mimebundle(self, fig_dict):
        return figure_bundle(fig_dict, image=self.image)


def setup(image: bool = True) -> None:
    """Make ``fig.show()`` (and a figure left as a cell's value) display :func:`figure_bundle`."""
    pio.renderers[RENDERER] = FallbackRenderer(image=image)
    pio.renderers.default = RENDERER


def show(fig: go.Figure, image: bool = True) -> None:
    """Display one figure's bundle in the running notebook, whatever the default renderer."""
    from IPython.display import display

    display(figure_bundle(fig, image=image), raw=True)
