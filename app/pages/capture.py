"""Capture: choose a model, a dataset and hooks; the capture runs as a background job (Dash background
callback on a disk-cache manager, in another process) with a live progress bar and a cancel button."""

from __future__ import annotations

import difflib

from dash import Input, Output, State, dcc, html, no_update

from .. import data
from ..components import card, error, info, options
from ..jobs import DOC_SEPARATOR, build_spec, parse_hooks, progress_percent, run_capture_job
from ..security import UnsafePathError, check_hook, text_or_none
from ..urlstate import PageState

PATH = "/capture"
TITLE = "Capture"
SCHEMA = {"model": str, "dataset": str, "n": int, "hooks": str}
DEFAULT_HOOKS = "blocks.0.hook_resid_post"


# --------------------------------------------------------------------------------------------- pure views


def progress_step(event: dict) -> list:
    """Bar value (percent, as text) and label for one worker event: loading the model is step 1 of 2 (its own
    label, bar at 0), capturing step 2 (tokens done / total as the capture counts them)."""
    if event.get("event") == "status":
        msg = event.get("message", "")
        step = "Step 1 of 2" if msg.startswith("loading") else "Step 2 of 2"
        return ["0", f"{step}: {msg} …"]
    done, total = int(event.get("done", 0)), int(event.get("total") or 0)
    pct = progress_percent(done, total)
    return [f"{pct:.0f}", f"Step 2 of 2: capturing, {pct:.0f}% ({done:,} / {total:,} tokens)"]


def check_hooks(model: str | None, hooks: str | None) -> list[str]:
    """The typed hooks, each checked against the model's hook names (known from its config, no weights loaded);
    raises ``ValueError`` naming every unknown hook with close matches. Nothing is checked without a model."""
    wanted = parse_hooks(hooks)
    if not model or not wanted:
        return wanted
    try:
        known = data.model_hook_names(model)
    except (FileNotFoundError, UnsafePathError):
        return wanted  # build_spec says what is wrong with the model
    bad = [h for h in wanted if h not in set(known)]
    if bad:
        hints = []
        for h in bad:
            close = difflib.get_close_matches(h, known, n=3, cutoff=0.6)
            hints.append(f"{h!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ValueError(f"Unknown hook{'s' if len(bad) > 1 else ''} for {model}: {'; '.join(hints)}. Pick hooks "
                         f"from the list above ({len(known):,} names, in layer order).")
    return wanted


def hook_options(model: str | None) -> list[dict]:
    """The hook picker's options: the model's hook names in layer order (none without a ready model, or for a
    value that is no model name)."""
    if not model or not isinstance(model, str):
        return []
    try:
        return options(data.model_hook_names(model))
    except (FileNotFoundError, UnsafePathError, ValueError, OSError):
        return []


def final_view(final: dict) -> tuple[object, str, str]:
    """Result area, bar value and label once the job has ended (``done`` or ``error``)."""
    if final.get("event") == "done":
        href = f"/layers?run={final['run_id']}"
        return (html.Div(className="notice info", id="capture-done", children=[
            f"Done: run {final['run_id']} with {final.get('rows', 0):,} rows × {len(final.get('hooks', []))} hooks "
            f"in {final.get('seconds', 0):.1f} s. ", dcc.Link("Open it on the Layers page", href=href), "."]),
            "100", "100%")
    return error(final.get("message", "the capture failed")), "0", "failed"


def cancelled_view() -> tuple[object, str, str]:
    return (info("Capture cancelled; committed shards stay in the cache and a re-run of the same capture resumes."),
            "0", "cancelled")


def model_options() -> list[dict]:
    return [{"label": m["label"], "value": m["value"], "disabled": not m["ready"]} for m in data.model_choices()]


def controls(params: dict) -> list:
    """Values of the page's controls (:data:`STATE` order) for parsed query ``params``."""
    ready = [m["value"] for m in model_options() if not m["disabled"]]
    model = params.get("model") if params.get("model") in ready else (ready[0] if ready else None)
    return [model, params.get("dataset") if params.get("dataset") in ("stdlib", "texts") else "stdlib",
            params.get("n", 10), params.get("hooks", DEFAULT_HOOKS)]


STATE = PageState(PATH, SCHEMA, [("capture-model", "value"), ("capture-dataset", "value"), ("capture-n", "value"),
                                 ("capture-hooks", "value")], controls,
                  lambda model, dataset, n, hooks: dict(model=model, dataset=dataset, n=n, hooks=hooks))


def layout(params: dict) -> html.Div:
    models = model_options()
    model, dataset, n, hooks = controls(params)
    return html.Div([
        STATE.location(),
        html.H2("Capture"),
        card("What to capture",
             html.Div(className="form", children=[
                 html.Label("model"),
                 dcc.Dropdown(id="capture-model", options=models, value=model, placeholder="model"),
                 html.Label("dataset"),
                 dcc.RadioItems(id="capture-dataset", options=[{"label": "stdlib functions", "value": "stdlib"},
                                                               {"label": "pasted texts", "value": "texts"}],
                                value=dataset, inline=True),
                 html.Label("number of functions"),
                 dcc.Input(id="capture-n", type="number", min=1, max=2000, value=n),
                 html.Label(f"texts (documents separated by a line '{DOC_SEPARATOR}')"),
                 dcc.Textarea(id="capture-texts", value="", rows=5),
                 html.Label("add a hook (the model's hook names, in layer order; type to search)"),
                 dcc.Dropdown(id="capture-hook-pick", options=hook_options(model), value=None,
                              placeholder="search the model's hooks …"),
                 html.Label("hooks (space or comma separated)"),
                 dcc.Input(id="capture-hooks", type="text", value=hooks, debounce=True),
                 html.Label("positions / dtype / max length"),
                 html.Div(className="controls", children=[
                     dcc.Dropdown(id="capture-positions", options=["all", "last"], value="all", clearable=False),
                     dcc.Dropdown(id="capture-dtype", options=["float32", "bfloat16", "float16"], value="float32",
                                  clearable=False),
                     dcc.Input(id="capture-maxlen", type="number", min=8, max=4096, value=256),
                 ]),
             ]),
             html.Div(className="controls", children=[
                 html.Button("Start capture", id="capture-start", className="primary"),
                 html.Button("Cancel", id="capture-cancel", disabled=True),
             ]),
             html.Div(id="capture-error"),
             html.Div(className="progress-row", children=[
                 html.Progress(id="capture-bar", value="0", max="100"),
                 html.Span(id="capture-bar-label", className="progress-label"),
             ]),
             html.Div(id="capture-result")),
    ])


def register(app) -> None:
    # The bar is written directly by the job's progress and final outputs: a callback that listened to a
    # store written by a running background callback would wait until the job ended.
    @app.callback(Output("capture-result", "children"), Output("capture-bar", "value", allow_duplicate=True),
                  Output("capture-bar-label", "children", allow_duplicate=True), Input("capture-start", "n_clicks"),
                  State("capture-model", "value"), State("capture-dataset", "value"), State("capture-n", "value"),
                  State("capture-texts", "value"), State("capture-hooks", "value"),
                  State("capture-positions", "value"), State("capture-dtype", "value"),
                  State("capture-maxlen", "value"),
                  background=True, prevent_initial_call=True,
                  progress=[Output("capture-bar", "value"), Output("capture-bar-label", "children")],
                  running=[(Output("capture-start", "disabled"), True, False),
                           (Output("capture-cancel", "disabled"), False, True)],
                  cancel=[Input("capture-cancel", "n_clicks")])
    def _run(set_progress, n, model, dataset, n_functions, texts, hooks, positions, dtype, max_length):
        # runs in the manager's process: validate again (the browser is not trusted), then start the worker
        try:
            spec = build_spec(data.get_root(), model=model, hooks=hooks, dataset=dataset, n_functions=n_functions,
                              texts=texts, positions=positions, dtype=dtype, max_length=max_length)
            check_hooks(model, hooks)  # before any worker starts or any weights load
        except ValueError as e:
            return final_view(dict(event="error", message=str(e)))
        set_progress(["0", "Step 1 of 2: starting the worker …"])
        return final_view(run_capture_job(spec, data.get_root(), lambda ev: set_progress(progress_step(ev))))

    @app.callback(Output("capture-result", "children", allow_duplicate=True),
                  Output("capture-bar", "value", allow_duplicate=True),
                  Output("capture-bar-label", "children", allow_duplicate=True),
                  Input("capture-cancel", "n_clicks"), prevent_initial_call=True)
    def _cancelled(n):
        return cancelled_view() if n else (no_update, no_update, no_update)

    @app.callback(Output("capture-error", "children"), Input("capture-model", "value"),
                  Input("capture-dataset", "value"), Input("capture-n", "value"), Input("capture-texts", "value"),
                  Input("capture-hooks", "value"))
    def _check(model, dataset, n_functions, texts, hooks):
        try:
            build_spec(data.get_root(), model=model, hooks=hooks, dataset=dataset, n_functions=n_functions,
                       texts=texts)
            check_hooks(model, hooks)
        except ValueError as e:
            return error(str(e))
        return None

    app.callback(Output("capture-hook-pick", "options"), Input("capture-model", "value"),
                 prevent_initial_call=True)(hook_options)

    @app.callback(Output("capture-hooks", "value", allow_duplicate=True), Output("capture-hook-pick", "value"),
                  Input("capture-hook-pick", "value"), State("capture-hooks", "value"), prevent_initial_call=True)
    def _pick(hook, hooks):
        try:  # a picked value is one hook name; a hostile one (a list, a dict, 'a b') changes nothing
            hook, hooks = check_hook(hook) if hook else None, text_or_none(hooks, "hooks")
        except ValueError:
            return no_update, no_update
        if not hook:
            return no_update, no_update
        have = (hooks or "").replace(",", " ").split()
        return " ".join(have if hook in have else have + [hook]), None

    STATE.register(app)
