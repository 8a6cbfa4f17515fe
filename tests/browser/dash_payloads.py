"""What the Dash renderer posts to ``/_dash-update-component``, built by hand for the security tests, and a
snapshot of a cache tree to show that a refused request changed nothing."""

from __future__ import annotations

from pathlib import Path


def callback_key(callbacks, fragment: str) -> str:
    """The one key of ``callbacks`` (``dash.Dash.callback_map``, or ``/_dash-dependencies`` by output) holding
    ``fragment`` (``"home-status.children"``)."""
    keys = [k for k in callbacks if fragment in k]
    assert len(keys) == 1, (fragment, keys)
    return keys[0]


def payload(callbacks, key: str, values: dict | None = None, changed: str | None = None) -> dict:
    """The body the renderer posts for callback ``key``; ``values`` maps ``"id.prop"`` to a value (None if absent).

    ``callbacks[key]`` holds the callback's ``inputs`` and ``state`` lists of ``{"id", "property"}``.
    """
    cb, values = callbacks[key], values or {}

    def slot(d):
        return {"id": d["id"], "property": d["property"], "value": values.get(f"{d['id']}.{d['property']}")}

    multi = key.startswith("..")
    outs = [{"id": o.rsplit(".", 1)[0], "property": o.rsplit(".", 1)[1].split("@")[0]}
            for o in (key[2:-2].split("...") if multi else [key])]
    first = cb["inputs"][0]
    return {"output": key, "outputs": outs if multi else outs[0], "inputs": [slot(d) for d in cb["inputs"]],
            "state": [slot(d) for d in cb["state"]],
            "changedPropIds": [changed or f"{first['id']}.{first['property']}"]}


def post(client, body: dict, **headers):
    """POST ``body`` to the callback endpoint through a Flask test ``client``, as the renderer does."""
    import json

    return client.post("/_dash-update-component", data=json.dumps(body), content_type="application/json",
                       headers=headers)


def job_bodies(callbacks, run_id: str) -> dict[str, dict]:
    """A valid request to each state-changing callback: delete ``run_id``, start a capture, score a prompt."""
    return {
        "delete": payload(callbacks, callback_key(callbacks, "home-status.children"),
                          {"home-confirm.submit_n_clicks": 1, "home-pending.data": run_id}),
        "capture": payload(callbacks, callback_key(callbacks, "capture-result.children..."),
                           {"capture-start.n_clicks": 1, "capture-model.value": "models/tiny-llama",
                            "capture-dataset.value": "texts", "capture-texts.value": "def f(x):\n    return x",
                            "capture-hooks.value": "blocks.0.hook_resid_post", "capture-positions.value": "all",
                            "capture-dtype.value": "float32", "capture-maxlen.value": 64}),
        "safety": payload(callbacks, callback_key(callbacks, "safety-prompt-result.children"),
                          {"safety-run.n_clicks": 1, "safety-model.value": "tiny-llama", "safety-prompt.value": "hi",
                           "safety-layer.value": 0}),
    }


def tree(root) -> dict:
    """Every path under ``root`` with its size and mtime (files) — what 'nothing changed' compares."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.name == "server.log":
            continue
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns) if p.is_file() else None
    return out
