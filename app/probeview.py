"""Probes on your text: a saved layer probe of the demo result applied to typed text, its confusion matrix and its
misclassified test tokens in context.

The demo (``probekit demo``) saves beside ``results/demo/<model>/layer_probes.json`` each layer's probe and the
test predictions (:mod:`probekit.probes.layer_probe_files`). Typed text comes from the forward job of the Tokens
page (``app.forward_worker``: every ``blocks.<l>.hook_resid_post`` and ``hook_embed``), so no model runs in a request.
The typed-text activations are float32 while the demo fitted on its bfloat16 cache: predictions can differ from
the cached ones on tokens near a decision boundary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from probekit.probes.layer_probe_files import load_layer_probe, load_probe_index, load_test_predictions

from . import data, viewdata

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
           "#dbdb8d", "#9edae5"]


def class_colour(k: int, alpha: float = 0.55) -> str:
    """Background colour of class id ``k`` (a 20-colour qualitative palette, cycled)."""
    h = PALETTE[int(k) % len(PALETTE)].lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r}, {g}, {b}, {alpha:.2f})"


def folder(model: str) -> Path:
    """The demo result folder of ``model`` (checked: inside the cache root or a report folder)."""
    return data.result_path("demo", model).parent


def _stamp(p: Path) -> tuple:
    return (str(p), p.stat().st_mtime_ns) if p.is_file() else (str(p), 0)


def index(model: str) -> dict:
    f = folder(model)
    return data.memo(("probe-index", _stamp(f / "probes.json")), lambda: load_probe_index(f))


def layers(model: str | None) -> list[str]:
    """Layers with a saved probe (``[]`` when none or on a bad model id)."""
    try:
        return list(index(model)["layers"]) if model else []
    except Exception:
        return []


def probe(model: str, layer: str):
    f = folder(model)
    return data.memo(("probe", _stamp(f / "probes.json"), layer), lambda: load_layer_probe(f, layer))


def typed_predictions(model: str, layer: str, fid: str) -> dict:
    """The probe of ``layer`` on the forward result ``fid``.

    Returns ``{"tokens", "pred" (n,) class ids, "proba" (n,) probability of the predicted class, "labels",
    "hook"}``; ``pred`` is ``probe.predict`` of the forward's activations at the probe's hook.
    """
    idx = index(model)
    if layer not in idx["layers"]:
        raise ValueError(f"no saved probe for layer {str(layer)[:40]!r} of {model}")
    hook = idx["layers"][layer]["hook"]
    src = viewdata.forward_activations(fid, hook)
    p = probe(model, layer)
    if src["x"].shape[1] != p.n_features_in_:
        raise ValueError(f"the typed text's {hook} has {src['x'].shape[1]} features but the probe of layer {layer} "
                         f"reads {p.n_features_in_}: run the text through the demo's model ({model}).")
    pred = p.predict(src["x"])
    proba = p.predict_proba(src["x"])
    col = np.searchsorted(p.classes_, pred)
    return dict(tokens=src["tokens"], pred=pred.astype(np.int64), proba=proba[np.arange(len(pred)), col],
                labels=idx["labels"], hook=hook)


def stored_predictions(model: str) -> dict:
    f = folder(model)
    return data.memo(("probe-test", _stamp(f / "test_predictions.safetensors")), lambda: load_test_predictions(f))


def confusion(model: str, layer: str) -> tuple[np.ndarray, list[str]]:
    """Counts ``C`` (K, K) with ``C[i, j]`` = test tokens of true class i predicted as j, and the K class names."""
    t = stored_predictions(model)
    labels = index(model)["labels"]
    key = f"pred.{layer}"
    if key not in t:
        raise ValueError(f"no test predictions for layer {str(layer)[:40]!r} of {model}")
    k = len(labels)
    c = np.zeros((k, k), dtype=np.int64)
    np.add.at(c, (t["y_true"], t[key]), 1)
    return c, labels


def misclassified(model: str, layer: str, *, context: int = 6, limit: int = 100) -> list[dict]:
    """Up to ``limit`` misclassified test tokens of ``layer``: ``{"doc", "position", "left", "token", "right",
    "true", "pred"}`` with ``context`` decoded tokens either side (ids as ``#id`` without a tokenizer)."""
    t = stored_predictions(model)
    labels = index(model)["labels"]
    key = f"pred.{layer}"
    if key not in t:
        raise ValueError(f"no test predictions for layer {str(layer)[:40]!r} of {model}")
    wrong = np.flatnonzero(t["y_true"] != t[key])[:limit]
    payload = data.load_result("demo", model)
    tfolder = data.tokenizer_folder(str(payload.get("model", model)))
    tok = data.tokenizer(tfolder) if tfolder is not None else None

    def text(ids) -> str:
        ids = [int(i) for i in ids]
        return tok.decode(ids) if tok is not None else " ".join(f"#{i}" for i in ids)

    cdoc, cpos, cid = t["ctx.doc"], t["ctx.position"], t["ctx.token_id"]
    rows = []
    for i in wrong:
        d, p = int(t["doc"][i]), int(t["position"][i])
        sel = cdoc == d
        pos, ids = cpos[sel], cid[sel]
        order = np.argsort(pos, kind="stable")
        pos, ids = pos[order], ids[order]
        j = int(np.searchsorted(pos, p))
        rows.append(dict(doc=d, position=p, left=text(ids[max(0, j - context):j]), token=text([t["token_id"][i]]),
                         right=text(ids[j + 1:j + 1 + context]), true=labels[int(t["y_true"][i])],
                         pred=labels[int(t[key][i])]))
    return rows


def confusion_figure(c: np.ndarray, labels: list[str], layer: str, model: str) -> dict:
    """Heatmap of the row-normalised confusion matrix (rows: true class, sums to 1); counts on hover.

    Classes without a test token are left out.
    """
    import plotly.graph_objects as go

    keep = np.flatnonzero((c.sum(axis=1) + c.sum(axis=0)) > 0)
    c = c[np.ix_(keep, keep)]
    names = [labels[i] for i in keep]
    rows = c.sum(axis=1, keepdims=True)
    z = np.divide(c, rows, out=np.zeros(c.shape), where=rows > 0)
    acc = float(np.trace(c) / max(c.sum(), 1))
    fig = go.Figure(go.Heatmap(
        z=z.tolist(), x=names, y=names, customdata=c.tolist(), colorscale="Blues", zmin=0, zmax=1,
        colorbar={"title": {"text": "fraction of the<br>true class"}},
        hovertemplate="true %{y}<br>predicted %{x}<br>%{customdata} tokens (%{z:.1%} of the row)<extra></extra>"))
    fig.update_layout(title=f"{model}: confusion matrix of the layer-{layer} probe on the test tokens "
                            f"(accuracy {acc:.3f}, n={int(c.sum())})",
                      xaxis_title="predicted class", yaxis_title="true class", template="plotly_white",
                      height=max(420, 24 * len(names) + 220), margin={"l": 160, "b": 140, "t": 60})
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category", tickangle=-45)
    return fig.to_dict()
