"""Home: the cache browser. Models, capture runs (config, hooks, rows, size, verify, delete with a
confirmation) and the result sets under ``results/``."""

from __future__ import annotations

from dash import ALL, MATCH, Input, Output, State, callback_context, dcc, html, no_update

from .. import data
from ..components import card, error, info, missing
from ..security import UnsafePathError, check_run_id

PATH = "/"
TITLE = "Cache"
SCHEMA: dict = {}
#: Result kinds → the page that shows them (``None``: only the file links).
PAGE_OF = {"demo": "/layers", "ast-probe": "/ast-probe", "dark-matter": "/dark-matter", "linearscope": "/linearscope",
           "safety": "/safety"}


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def runs_table(runs: list[dict]) -> html.Div:
    """Table of runs with a verify and a delete button per run (or how to make one when there is none)."""
    if not runs:
        return missing("capture run", data.cli_command(
            "probekit capture --model smollm2-135m --stdlib-functions 20 --hooks blocks.5.hook_resid_post"),
            "or use the Capture page.")
    head = html.Tr([html.Th(h) for h in ("run", "model", "hooks", "rows", "size", "dtype", "complete", "", "")])
    body = []
    for r in runs:
        rid = r["run_id"]
        hooks = r["hooks"]
        hook_text = ", ".join(hooks[:4]) + (f" … (+{len(hooks) - 4})" if len(hooks) > 4 else "")
        body.append(html.Tr([
            html.Td(html.Code(rid[:12], title=rid)),
            html.Td(r["model"][-48:], title=r["model"]),
            html.Td(hook_text, title="\n".join(hooks)) if not r["error"] else html.Td(error(r["error"])),
            html.Td(f"{r['rows']:,}"), html.Td(_mib(r["bytes"])), html.Td(r["dtype"] or ""),
            html.Td("yes" if r["complete"] else "partial"),
            html.Td([html.Button("verify", id={"type": "verify-run", "run": rid}, className="small"),
                     dcc.Loading(html.Span(id={"type": "verify-result", "run": rid}), type="dot")]),
            html.Td(html.Button("delete", id={"type": "delete-run", "run": rid}, className="small danger")),
        ]))
    return html.Div(html.Table([html.Thead(head), html.Tbody(body)], className="table"), className="table-wrap")


def verify_run(run_id: str) -> html.Span:
    """Re-hash every file of a run (sha256); a short verdict for the page."""
    try:
        problems = data.open_run(check_run_id(run_id)).verify()
    except Exception as e:
        return html.Span(f"error: {e}", className="bad")
    if not problems:
        return html.Span("✓ verified", className="good")
    return html.Span(f"✗ {len(problems)} corrupt file(s): " + "; ".join(problems[:3]), className="bad")


def confirm_message(run_id: str) -> str:
    return f"Delete run {run_id}? Its activation files are removed from disk; this cannot be undone."


def delete_run(run_id: str) -> object:
    """Remove a run (exact id, inside the cache root); a message for the page."""
    from probekit.cache import ActivationCache

    try:
        check_run_id(run_id)
        data.open_run(run_id)  # exists, inside the root, a real run
        removed = ActivationCache(data.get_root()).rm(run_id)
    except Exception as e:
        return error(f"Not deleted: {e}")
    data.clear_caches()
    return info(f"Deleted run {run_id} ({removed.name}).")


def results_list() -> html.Div:
    """Result sets found under ``results/``: a link to the page and to each standalone file."""
    files = data.result_files()
    if not files:
        return missing("results", data.cli_command("probekit demo"), "Every probe writes its JSON and HTML under "
                       "results/; the pages here read them.")
    rows = []
    for f in files:
        page = PAGE_OF.get(f["kind"])
        model = f["id"].split("/digits-cnn")[0]
        href = f"{page}?model={model}" if page and f["id"] and f["kind"] != "linearscope" else page
        rows.append(html.Tr([html.Td(f["kind"]), html.Td(f["id"]),
                             html.Td(html.A(f["file"], href=f"/files/results/{f['rel']}", target="_blank")),
                             html.Td(_mib(f["bytes"])), html.Td(dcc.Link("open page", href=href) if href else "")]))
    head = html.Tr([html.Th(h) for h in ("kind", "set", "file", "size", "")])
    return html.Div(html.Table([html.Thead(head), html.Tbody(rows)], className="table"), className="table-wrap")


def models_list() -> html.Div:
    rows = [html.Tr([html.Td(m["value"]), html.Td("ready" if m["ready"] else "not fetched"),
                     html.Td(html.Code(m["hint"]) if m["hint"] else "")]) for m in data.model_choices()]
    return html.Div(html.Table([html.Thead(html.Tr([html.Th("model"), html.Th("status"), html.Th("fetch")])),
                                html.Tbody(rows)], className="table"), className="table-wrap")


def layout(params: dict) -> html.Div:
    return html.Div([
        html.H2("Cache"),
        html.P(["Cache root: ", html.Code(str(data.get_root()))]),
        card("Capture runs", html.Div(id="home-status"), html.Div(runs_table(data.list_runs()), id="home-runs")),
        card("Results", results_list()),
        card("Models", models_list()),
        dcc.ConfirmDialog(id="home-confirm"),
        dcc.Store(id="home-pending"),
    ])


def register(app) -> None:
    @app.callback(Output({"type": "verify-result", "run": MATCH}, "children"),
                  Input({"type": "verify-run", "run": MATCH}, "n_clicks"), prevent_initial_call=True)
    def _verify(n):
        tid = callback_context.triggered_id
        return verify_run(tid["run"]) if n and isinstance(tid, dict) else no_update

    @app.callback(Output("home-confirm", "displayed"), Output("home-confirm", "message"),
                  Output("home-pending", "data"), Input({"type": "delete-run", "run": ALL}, "n_clicks"),
                  prevent_initial_call=True)
    def _ask(clicks):
        tid = callback_context.triggered_id
        if not isinstance(tid, dict) or not any(clicks or []):
            return no_update, no_update, no_update
        try:
            rid = check_run_id(tid.get("run"))
        except UnsafePathError:
            return False, "", None
        return True, confirm_message(rid), rid

    @app.callback(Output("home-status", "children"), Output("home-runs", "children"),
                  Input("home-confirm", "submit_n_clicks"), State("home-pending", "data"), prevent_initial_call=True)
    def _delete(n, rid):
        if not n or not rid:
            return no_update, no_update
        return delete_run(rid), runs_table(data.list_runs())
