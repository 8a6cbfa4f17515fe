"""Home: the cache browser. Models, capture runs (config, hooks, rows, size, verify, delete with a
confirmation) and the index of every result set (the cache's ``results/`` and the report folders)."""

from __future__ import annotations

from dash import ALL, MATCH, Input, Output, State, callback_context, dcc, html, no_update

from .. import data
from ..components import card, error, info, missing
from ..security import UnsafePathError, check_run_id

PATH = "/"
TITLE = "Cache"
SCHEMA: dict = {}


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def model_text(model: str) -> str:
    """A run's model as the table shows it; a folder that no longer exists (an older run's temporary copy) says so
    rather than passing for a model name."""
    from pathlib import Path

    p = Path(model)
    if p.is_absolute() and not p.exists():
        return f"{p.name} (folder gone: {model[-48:]})"
    return model[-48:]


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
            html.Td(model_text(r["model"]), title=r["model"]),
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


#: Index kind -> what the probe column calls it.
PROBE_NAMES = {"demo": "layer probes", "ast-probe": "AST-Probe", "dark-matter": "dark matter",
               "linearscope-lm": "LinearScope (prompt)", "linearscope-digits": "LinearScope (digit)",
               "safety-activation": "safety (activation)", "safety-weight": "safety (weight)"}
#: Index kind -> the page that shows it and the query key naming the set.
SET_PAGE = {"demo": ("/layers", "model"), "ast-probe": ("/ast-probe", "model"),
            "dark-matter": ("/dark-matter", "model"), "linearscope-lm": ("/linearscope", "model"),
            "linearscope-digits": ("/linearscope", "digit"), "safety-activation": ("/safety", "model"),
            "safety-weight": ("/safety", "model")}


def _config_text(cfg: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in cfg.items() if k not in ("out", "progress") and v not in (None, "", [], {}))


def results_list() -> html.Div:
    """The result index: every result set of the cache's ``results/`` and of the report folders, with its
    model, probe, source, date and config, a link to the page that shows it and (cache sets) its files."""
    from urllib.parse import urlencode

    sets = data.result_index()
    if not sets:
        return missing("results", data.cli_command("probekit demo"), "Every probe writes its JSON and HTML under "
                       "results/ (and `probekit report CONFIG` under reports/<name>/, shown here with "
                       "`probekit app --reports reports`); the pages here read them.")
    files = {f["rel"]: f for f in data.result_files()}
    root_results = data.get_root() / "results"
    rows = []
    for st in sets:
        page, key = SET_PAGE[st.kind]
        href = f"{page}?{urlencode({key: st.id})}"
        rel = None
        if st.source == "cache" and st.path.resolve().is_relative_to(root_results.resolve()):
            rel = str(st.path.resolve().relative_to(root_results.resolve()))
        html_rel = rel[:-5] + ".html" if rel else None
        links = ([html.A(st.path.name, href=f"/files/results/{rel}", target="_blank")] if rel in files
                 else [st.path.name])
        if html_rel in files:
            links += [" · ", html.A("page", href=f"/files/results/{html_rel}", target="_blank")]
        cfg = _config_text(st.config)
        short = cfg[:40] + ("…" if len(cfg) > 40 else "")
        rows.append(html.Tr([html.Td(PROBE_NAMES[st.kind]), html.Td(st.id), html.Td(st.model), html.Td(st.source),
                             html.Td(st.date),
                             html.Td(html.Details([html.Summary(short), html.Code(cfg)]) if cfg else ""),
                             html.Td(links), html.Td(dcc.Link("open", href=href))]))
    head = html.Tr([html.Th(h) for h in ("probe", "set", "model", "source", "date", "config", "file", "")])
    return html.Div(html.Table([html.Thead(head), html.Tbody(rows)], className="table", id="result-index"),
                    className="table-wrap")


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
        html.P(["Report folders: ", html.Code(", ".join(str(r) for r in data.get_reports()) or "none "
                                                "(probekit app --reports DIR)")]),
        card("Result sets", results_list()),
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
