"""The demo: which layers of a code-reading LM linearly encode the syntax around each token?

On the default offline model (SmolLM2-135M-Instruct), capture the residual stream after the embedding and
after every block for a few hundred real functions from the CPython standard library, label every token with
the tree-sitter node type of its parent (``parameters``, ``argument_list``, ``binary_operator`` …), fit one
logistic probe per layer (train/test split by function), and write a per-layer accuracy plot (HTML) and the
figures (JSON) under ``<cache root>/results/demo/<model>/``.

Controls: majority class, a probe on random features (no information), and token identity (the most frequent
label of the token id on the training split) — a syntactic label that token identity alone predicts is not
evidence of a syntactic representation.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .cache import ActivationCache
from .capture import CaptureConfig
from .data.code import encode_labels, iter_stdlib_functions, label_vocabulary, token_syntax_labels
from .models import DEFAULT_MODEL, load_model
from .paths import results_dir
from .probes.layer_probe_files import save_layer_probes
from .probes.linear import fit_layer_probes


@dataclass
class DemoConfig:
    """Settings of the demo; the defaults finish in a few minutes on 2 CPU cores."""

    model: str = DEFAULT_MODEL
    n_functions: int = 200
    max_length: int = 192
    batch_size: int = 8
    top_k_labels: int = 20
    alpha: float = 1.0
    max_iter: int = 100
    seed: int = 0
    out: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.n_functions < 10:
            raise ValueError("n_functions must be at least 10 so the by-function split has a test side")
        if self.max_length < 8:
            raise ValueError("max_length must be at least 8 tokens")


def per_function_correctness(doc: np.ndarray, y_true: np.ndarray, test_pred: dict[str, np.ndarray],
                             majority_class: int) -> dict:
    """Correct and scored test tokens per function: the per-unit data of the accuracy CIs (METHODS.md §5).

    Tokens of one function are not independent, so the headline's intervals resample whole functions and pool
    (Σ correct / Σ tokens over the drawn functions); the pooled value is the probe's test accuracy.

    Parameters
    ----------
    doc : ndarray (n_test,)
        The function (document index) of each test token.
    y_true : ndarray (n_test,)
        Its label.
    test_pred : dict of layer name -> ndarray (n_test,)
        Each layer's probe prediction for the same tokens.
    majority_class : int
        The train split's most frequent label (the majority baseline's constant prediction).

    Returns
    -------
    dict
        ``unit``, ``ids`` (n_functions,), ``tokens`` (n_functions,), ``correct`` = {layer: (n_functions,)} and
        ``majority_correct`` (n_functions,), functions in ascending id order.
    """
    from .stats import cluster_sums

    doc, y_true = np.asarray(doc).reshape(-1), np.asarray(y_true).reshape(-1)
    if doc.shape != y_true.shape:
        raise ValueError(f"doc and y_true must have one entry per test token, got {doc.shape} and {y_true.shape}")
    correct = {}
    for name, pred in test_pred.items():
        pred = np.asarray(pred).reshape(-1)
        if pred.shape != y_true.shape:
            raise ValueError(f"test_pred[{name!r}] has {pred.shape[0]} predictions for {y_true.shape[0]} test tokens")
        ids, sums, counts = cluster_sums(pred == y_true, doc)
        correct[str(name)] = [int(v) for v in sums]
    ids, maj, counts = cluster_sums(y_true == majority_class, doc)
    return dict(unit="test functions", ids=[int(i) for i in ids], tokens=[int(c) for c in counts],
                correct=correct, majority_correct=[int(v) for v in maj])


def run_demo(cfg: DemoConfig = DemoConfig()) -> dict:
    """Run the demo; return ``{"json": path, "html": path, "result": dict}``."""
    t0 = time.perf_counter()
    say = print
    say(f"[probekit demo] loading {cfg.model} …")
    bridge, tok = load_model(cfg.model)
    n_layers = bridge.cfg.n_layers

    say(f"[probekit demo] reading {cfg.n_functions} functions from the Python standard library …")
    snippets = iter_stdlib_functions(max_functions=cfg.n_functions, seed=cfg.seed)
    enc = tok([s.source for s in snippets], truncation=True, max_length=cfg.max_length,
              return_offsets_mapping=True)
    docs = [list(ids) for ids in enc["input_ids"]]
    labels = [token_syntax_labels(s.source, off) for s, off in zip(snippets, enc["offset_mapping"])]
    vocab = label_vocabulary(labels, top_k=cfg.top_k_labels)

    hooks = ["hook_embed"] + [f"blocks.{l}.hook_resid_post" for l in range(n_layers)]
    say(f"[probekit demo] capturing {len(hooks)} residual-stream sites for {sum(map(len, docs)):,} tokens "
        "into the activation cache …")
    t_cap = time.perf_counter()
    run = ActivationCache().capture(bridge, docs, CaptureConfig(hooks=hooks, positions="all",
                                                                batch_size=cfg.batch_size,
                                                                max_length=cfg.max_length, dtype="bfloat16",
                                                                progress=cfg.progress))
    cap_seconds = time.perf_counter() - t_cap
    say(f"[probekit demo] run {run.run_id[:12]}: {run.n_rows:,} rows, {run.nbytes() / 2**20:,.0f} MiB "
        f"({cap_seconds:.0f} s; a second demo run reuses it)")

    meta = run.meta_tensors()
    doc_idx, pos = meta["doc_index"].numpy(), meta["position"].numpy()
    row_labels = [labels[d][p] for d, p in zip(doc_idx, pos)]
    y = encode_labels(row_labels, vocab)
    keep = y >= 0  # special and whitespace-only tokens carry no syntax label
    names = {"hook_embed": "embed", **{f"blocks.{l}.hook_resid_post": str(l) for l in range(n_layers)}}
    rows = np.flatnonzero(keep)
    features = {names[h]: run.load(h, rows) for h in hooks}

    say(f"[probekit demo] fitting {len(features)} per-layer probes on {int(keep.sum()):,} tokens, "
        f"{len(vocab)} labels …")
    result = fit_layer_probes(features, y[keep], doc_idx[keep], kind="logistic", alpha=cfg.alpha,
                              max_iter=cfg.max_iter, seed=cfg.seed, token_ids=meta["token_id"].numpy()[keep],
                              task="parent node type of each token (tree-sitter)", progress=cfg.progress,
                              keep_probes=True)

    out = Path(cfg.out) if cfg.out else results_dir() / "demo" / cfg.model.replace("/", "--")
    out.mkdir(parents=True, exist_ok=True)
    payload = dict(
        kind="layer_probes",
        model=cfg.model,
        config=asdict(cfg),
        labels=vocab,
        n_functions=len(snippets),
        capture=dict(run=run.run_id, rows=run.n_rows, tokens=int(sum(map(len, docs))),
                     seconds=round(cap_seconds, 2)),
        result=result.to_dict(),
        seconds_total=round(time.perf_counter() - t0, 1),
    )
    # the fitted probes and their test predictions, for the app's "probes on your text" view
    test_rows = rows[result.test_index_]
    train_rows = np.delete(rows, result.test_index_)
    payload["per_function"] = per_function_correctness(
        doc_idx[test_rows], y[test_rows], result.test_pred_, int(np.bincount(y[train_rows]).argmax()))
    tok_ids = meta["token_id"].numpy()
    in_test = np.isin(doc_idx, np.unique(doc_idx[test_rows]))
    save_layer_probes(out, result.probes_, labels=vocab, hooks={v: k for k, v in names.items()},
                      test=dict(doc=doc_idx[test_rows], position=pos[test_rows], token_id=tok_ids[test_rows],
                                y_true=y[test_rows]),
                      test_pred=result.test_pred_,
                      context=dict(doc=doc_idx[in_test], position=pos[in_test], token_id=tok_ids[in_test]))
    json_path, html_path = out / "layer_probes.json", out / "layer_probes.html"
    json_path.write_text(json.dumps(payload, indent=2))
    from .results import figures, headline

    fig = figures(payload)[0]  # the report's and the app's figure of this payload
    fig.write_html(str(html_path), include_plotlyjs=True)  # inline plotly.js: the page works offline

    h = headline(payload)  # every number with its 95% CI over test functions
    say(f"[probekit demo] best layer {h['best layer']} (chosen on test, optimistic): test accuracy "
        f"{h['best test accuracy, 95% CI']}; embedding {h['embedding accuracy, 95% CI']}; best − embedding "
        f"{h['best − embedding accuracy, 95% CI']}; majority {h['majority baseline, 95% CI']}; token identity "
        f"{result.token_identity_control:.3f} (point)")
    say(f"[probekit demo] wrote {html_path}")
    say(f"[probekit demo] wrote {json_path}")
    say(f"[probekit demo] done in {time.perf_counter() - t0:.0f} s")
    return dict(json=str(json_path), html=str(html_path), result=payload)
