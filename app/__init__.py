"""probekit's Dash app: a browser over the activation cache and the probe results.

Start it with ``probekit app`` (http://127.0.0.1:8050). It reads the same files the library writes under the
cache root, never runs a model inside a request (captures go to a background worker process), and opens files
only through :func:`app.security.safe_path`.

>>> from app import create_app                       # doctest: +SKIP
>>> create_app("cache").run(host="127.0.0.1", port=8050)   # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from . import data

__all__ = ["create_app"]


def create_app(cache_root: str | Path | None = None, *, jobs_dir: str | Path | None = None,
               extra_hosts: tuple[str, ...] = (), reports=None):
    """Build the Dash app serving ``cache_root`` (default ``$PROBEKIT_CACHE`` or ``./cache``).

    Parameters
    ----------
    cache_root : str or Path, optional
        The cache root to browse; every file the app opens lies inside it.
    jobs_dir : str or Path, optional
        Folder of the background-job store (diskcache); a fresh temporary folder by default.
    extra_hosts : tuple of str, optional
        Host names besides 127.0.0.1, localhost, [::1] and the bound address under which the app is opened
        (``myhost.lan`` when served on a LAN); any other Host header is refused (:mod:`app.security`).
    reports : list of str or Path, optional
        Report folders (each holding ``<name>/`` folders of ``probekit report``) whose results the pages also
        show; default ``./reports`` when it exists.

    Returns
    -------
    dash.Dash
    """
    import dash
    import diskcache
    import flask
    from dash import Input, Output, State, dcc, html

    from .pages import PAGES
    from .security import RESULT_PAGE_CSP, UnsafePathError, install_guards
    from .urlstate import parse_query

    _warm_imports()
    root = data.set_root(cache_root)
    data.set_reports(reports)
    data.clear_caches()
    manager = dash.DiskcacheManager(diskcache.Cache(str(jobs_dir or tempfile.mkdtemp(prefix="probekit-app-jobs-"))))
    app = dash.Dash(__name__, title="probekit", suppress_callback_exceptions=True,
                    background_callback_manager=manager, assets_folder=str(Path(__file__).parent / "assets"),
                    meta_tags=[{"name": "viewport", "content": "width=device-width, initial-scale=1"}])
    install_guards(app.server, inline_hashes=app.csp_hashes, extra_hosts=extra_hosts, callbacks=app.callback_map)
    routes = {p.PATH: p for p in PAGES}
    app.layout = html.Div(className="shell", children=[
        dcc.Location(id="url", refresh=False),
        html.Header(className="top", children=[
            html.Span("probekit", className="brand"),
            html.Nav([dcc.Link(p.TITLE, href=p.PATH, className="nav-link") for p in PAGES]),
        ]),
        html.Main(id="page", className="page"),
    ])

    @app.callback(Output("page", "children"), Input("url", "pathname"), State("url", "search"))
    def _route(pathname, search):
        page = routes.get(pathname or "/") if isinstance(pathname, (str, type(None))) else None
        if page is None:
            return html.Div([html.H2("Not found"), html.P(f"No page {pathname!r}."), dcc.Link("Home", href="/")])
        try:
            return page.layout(parse_query(search, page.SCHEMA))
        except Exception as e:  # a broken file shows in the page, not as a stack trace
            return html.Div([html.H2(page.TITLE), html.Div(f"This page could not be built: {e}",
                                                           className="notice error")])

    for p in PAGES:
        p.register(app)

    @app.server.route("/files/results/<path:rel>")
    def _result_file(rel):
        # the standalone result pages (JSON/HTML) written by the probes, and the plotly.js bundle they link to
        if data.is_plotly_bundle(rel, root):  # from the installed plotly, never a file of the cache
            from plotly.offline import get_plotlyjs

            return flask.Response(get_plotlyjs(), mimetype="text/javascript")
        try:
            path = data.result_file_path(rel, root)
        except (UnsafePathError, OSError):  # OSError: a name too long for the file system, like a missing file
            flask.abort(404)
        resp = flask.send_file(path, mimetype="text/html" if path.suffix == ".html" else "application/json")
        if path.suffix == ".html":  # its inline plotly scripts run in a sandbox, not as the app's origin
            resp.headers["Content-Security-Policy"] = RESULT_PAGE_CSP
        return resp

    return app


def _warm_imports() -> None:
    """Import what callbacks import lazily, once, before the server starts its threads: plotly imports pandas
    on first use and two threads importing it at once see a half-initialised module."""
    import datasets  # noqa: F401  (run metadata)
    import pandas  # noqa: F401
    import plotly.graph_objects as go
    import transformers  # noqa: F401  (tokenizers of the token view)

    import probekit.cache  # noqa: F401

    go.Figure(layout={"template": "plotly_white"}).to_dict()
