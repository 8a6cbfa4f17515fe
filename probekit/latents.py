"""Per-latent statistics of an SAE over a cache run: what the latent pages of the app show.

One streaming pass over the run's rows at the SAE's hook encodes every token, keeps the non-zero latent
activations (sparse: 12 bytes each), and then writes, per latent ``i``:

* **firing rate**: fraction of rows with ``f_i > 0``;
* **histogram**: ``n_bins`` equal-width bins over ``[0, max_i]`` of the *non-zero* activations of ``i``
  (``numpy.histogram`` semantics: the last bin is closed);
* **top-k examples**: the ``top_k`` rows with the largest ``f_i`` (ties: lower row first), each with the
  token ids of ``±context`` positions of the same document and the activation of ``i`` on each of them
  (``-1`` / 0 where the window leaves the document);
* **quantile examples**: the non-zero activations of ``i`` sorted ascending and split into ``n_quantiles``
  groups of equal count; from each group ``per_quantile`` evenly spaced ranks (deterministic), with context;
* **logit effects** (needs ``unembed``, ``(d_in, vocab)``): ``W_dec[i] @ W_U``, the ``n_logits`` most positive
  and most negative tokens. *Approximation*: this is the direct path from the hook to the logits only; it
  ignores the final norm's scale (and its weight when ``unembed`` is not pre-multiplied by it) and every
  layer after the hook, as in Neuronpedia's and SAEDashboard's logit tables;
* **neighbours**: the ``n_neighbours`` latents with the largest cosine between decoder rows (self excluded).

A token index answers "which latents fire most on ``def``": for every token id present in the run, its count
and the ``top_latents_per_token`` latents by mean activation over that token's rows (zeros included).

Output folder (no pickle): ``latents.json`` (config, run id, hook, SAE folder, shapes, the approximation note)
and ``latents.safetensors`` (the arrays named in :data:`ARRAYS`), plus ``tokens.json`` (decoded strings of
every token id the arrays mention) when a tokenizer is given.

>>> from probekit.latents import LatentStatsConfig, compute_latent_stats   # doctest: +SKIP
>>> cfg = LatentStatsConfig(out="results/latents/x")                          # doctest: +SKIP
>>> compute_latent_stats(run, sae, "blocks.3.hook_resid_post", cfg)              # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

INDEX_FILE = "latents.json"
ARRAYS_FILE = "latents.safetensors"
TOKENS_FILE = "tokens.json"
LOGIT_NOTE = ("Logit effects are W_dec[i] @ W_U: the direct path from the hook to the logits. They ignore the "
              "final norm's scale and every layer after the hook, so they are an approximation of what the "
              "latent does to the output.")
#: Arrays of ``latents.safetensors`` (``S`` = d_sae, ``K`` = top_k, ``C`` = 2·context+1, ``Q`` = n_quantiles ·
#: per_quantile, ``B`` = n_bins, ``L`` = n_logits, ``N`` = n_neighbours, ``U`` = distinct token ids, ``T`` =
#: top_latents_per_token).
ARRAYS = {
    "firing_count": "(S,) int64", "max_act": "(S,) float32", "mean_act": "(S,) float32 over all rows",
    "hist_counts": "(S, B) int64", "top_act": "(S, K) float32 (0 = none)", "top_row": "(S, K) int64 (-1 = none)",
    "top_doc": "(S, K) int64", "top_pos": "(S, K) int64", "top_ctx_tokens": "(S, K, C) int64 (-1 = outside)",
    "top_ctx_acts": "(S, K, C) float32", "q_act": "(S, Q) float32", "q_row": "(S, Q) int64 (-1 = none)",
    "q_bin": "(S, Q) int64", "q_doc": "(S, Q) int64", "q_pos": "(S, Q) int64", "q_ctx_tokens": "(S, Q, C) int64",
    "q_ctx_acts": "(S, Q, C) float32", "logit_pos_ids": "(S, L) int64", "logit_pos_vals": "(S, L) float32",
    "logit_neg_ids": "(S, L) int64", "logit_neg_vals": "(S, L) float32", "neighbour_ids": "(S, N) int64",
    "neighbour_cos": "(S, N) float32", "token_ids": "(U,) int64", "token_count": "(U,) int64",
    "token_top_latents": "(U, T) int64", "token_top_mean": "(U, T) float32",
}


@dataclass
class LatentStatsConfig:
    """What :func:`compute_latent_stats` keeps per latent, and where it writes.

    Parameters
    ----------
    out : folder of the results (created).
    top_k : top-activating examples per latent.
    context : tokens of context on each side of an example.
    n_bins : histogram bins over ``[0, max]`` of the non-zero activations.
    n_quantiles, per_quantile : equal-count groups of the non-zero activations, and examples from each.
    n_logits : most positive / most negative logit effects kept.
    n_neighbours : nearest latents by decoder cosine.
    top_latents_per_token : latents kept per token id in the search index.
    exclude_positions : positions left out of every statistic (``(0,)``: the BOS token, whose activations are
        often orders of magnitude larger and would dominate top examples and colour scales). Excluded rows still
        show in the context windows, with activation 0. Firing rates and means are over the kept rows.
    chunk_rows : rows encoded at once.
    max_nonzero : the most non-zero activations kept in memory (12 bytes each); more raises ``MemoryError``.
    """

    out: str
    top_k: int = 20
    context: int = 8
    n_bins: int = 40
    n_quantiles: int = 5
    per_quantile: int = 4
    n_logits: int = 10
    n_neighbours: int = 8
    top_latents_per_token: int = 10
    exclude_positions: tuple[int, ...] = ()
    chunk_rows: int = 4096
    max_nonzero: int = 200_000_000

    def __post_init__(self) -> None:
        if not self.out:
            raise ValueError("LatentStatsConfig.out: name the output folder")
        for name in ("top_k", "n_bins", "n_quantiles", "per_quantile", "n_logits", "n_neighbours",
                     "top_latents_per_token", "chunk_rows", "max_nonzero"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"LatentStatsConfig.{name} must be a positive integer, got {v!r}")
        self.exclude_positions = tuple(int(p) for p in self.exclude_positions)
        if any(p < 0 for p in self.exclude_positions):
            raise ValueError("LatentStatsConfig.exclude_positions must be positions >= 0, got "
                             f"{self.exclude_positions}")
        if not isinstance(self.context, int) or not 0 <= self.context <= 256:
            raise ValueError(f"LatentStatsConfig.context must be an integer in [0, 256], got {self.context!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------- pieces


def encode_nonzero(run, sae, hook: str, *, chunk_rows: int = 4096, max_nonzero: int = 200_000_000,
                   progress: bool = False, on_progress=None,
                   keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stream the run's rows at ``hook`` through ``sae.encode`` once; keep the non-zero activations of the rows
    where ``keep`` (``(n_rows,)`` bool, default all) is true.

    Returns
    -------
    latent : (nnz,) int64, row : (nnz,) int64, value : (nnz,) float32
        Sorted by latent, then row.
    row_sum : (d_sae,) float64
        Sum of each latent over all rows (zeros included), for the mean.
    """
    n, d_sae = run.n_rows, int(sae.cfg.d_sae)
    lat, rows, vals = [], [], []
    total = 0
    row_sum = np.zeros(d_sae, np.float64)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"encoding {hook}", unit="row")
    with torch.inference_mode():
        for start in range(0, n, chunk_rows):
            stop = min(n, start + chunk_rows)
            x = run.load(hook, slice(start, stop)).float().flatten(1)
            f = sae.encode(x.to(sae.W_dec.device)).float().cpu()
            if keep is not None:
                f[torch.from_numpy(~keep[start:stop])] = 0.0
            row_sum += f.sum(0, dtype=torch.float64).numpy()
            r, c = torch.nonzero(f > 0, as_tuple=True)
            total += len(r)
            if total > max_nonzero:
                raise MemoryError(f"more than max_nonzero={max_nonzero:,} non-zero activations after {stop:,} of "
                                  f"{n:,} rows: raise LatentStatsConfig.max_nonzero (12 bytes each) or use fewer rows")
            lat.append(c.numpy().astype(np.int64))
            rows.append(r.numpy().astype(np.int64) + start)
            vals.append(f[r, c].numpy().astype(np.float32))
            if bar is not None:
                bar.update(stop - start)
            if on_progress is not None:
                on_progress(stop, n)
    if bar is not None:
        bar.close()
    lat = np.concatenate(lat) if lat else np.zeros(0, np.int64)
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    vals = np.concatenate(vals) if vals else np.zeros(0, np.float32)
    order = np.lexsort((rows, lat))
    return lat[order], rows[order], vals[order], row_sum


class _Context:
    """Windows of ``±context`` positions around a row, within its document, from the run's metadata."""

    def __init__(self, doc: np.ndarray, pos: np.ndarray, tok: np.ndarray, context: int):
        self.doc, self.pos, self.tok, self.c = doc, pos, tok, context
        span = int(pos.max()) + 1 if len(pos) else 1
        self.span = span
        self.key = doc * span + pos
        self.order = np.argsort(self.key, kind="stable")
        self.sorted_key = self.key[self.order]

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """``(len(rows), 2c+1)`` row indices of the window, ``-1`` outside the document (or not captured)."""
        offs = np.arange(-self.c, self.c + 1)
        want_pos = self.pos[rows][:, None] + offs[None, :]
        want = self.doc[rows][:, None] * self.span + want_pos
        i = np.clip(np.searchsorted(self.sorted_key, want), 0, len(self.sorted_key) - 1)
        ok = (self.sorted_key[i] == want) & (want_pos >= 0) & (want_pos < self.span)
        return np.where(ok, self.order[i], -1)


def _examples(rows: np.ndarray, ctx: _Context, lat_rows: np.ndarray, lat_vals: np.ndarray):
    """Context tokens and this latent's activations on them for example ``rows`` (no -1 in ``rows``)."""
    win = ctx.rows(rows)
    toks = np.where(win >= 0, ctx.tok[np.maximum(win, 0)], -1)
    i = np.clip(np.searchsorted(lat_rows, win), 0, max(len(lat_rows) - 1, 0))
    hit = (win >= 0) & (len(lat_rows) > 0) & (lat_rows[i] == win) if len(lat_rows) else np.zeros(win.shape, bool)
    acts = np.where(hit, lat_vals[i] if len(lat_vals) else 0.0, 0.0).astype(np.float32)
    return toks, acts


def logit_effects(w_dec: torch.Tensor, unembed: torch.Tensor, n: int, *, chunk: int = 1024):
    """Top ``n`` positive and negative entries of ``W_dec @ W_U`` per latent.

    ``w_dec`` (d_sae, d_in), ``unembed`` (d_in, vocab) -> four arrays ``(d_sae, n)``: positive ids and values,
    negative ids and values (most negative first).
    """
    out = [[], [], [], []]
    w_u = unembed.float()
    for s in range(0, w_dec.shape[0], chunk):
        eff = w_dec[s:s + chunk].float() @ w_u
        pv, pi = eff.topk(min(n, eff.shape[1]), dim=1)
        nv, ni = (-eff).topk(min(n, eff.shape[1]), dim=1)
        for lst, t in zip(out, (pi, pv, ni, -nv)):
            lst.append(t)
    return [torch.cat(x).numpy() for x in out]


def decoder_neighbours(w_dec: torch.Tensor, n: int, *, chunk: int = 1024):
    """``(d_sae, n)`` ids and cosines of the nearest other latents by decoder-row cosine."""
    w = w_dec.float()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = min(n, max(w.shape[0] - 1, 0))
    ids, cos = [], []
    for s in range(0, w.shape[0], chunk):
        c = w[s:s + chunk] @ w.T
        c[torch.arange(c.shape[0]), torch.arange(s, s + c.shape[0])] = -float("inf")
        v, i = c.topk(n, dim=1)
        ids.append(i)
        cos.append(v)
    return torch.cat(ids).numpy(), torch.cat(cos).numpy()


def token_index(lat: np.ndarray, rows: np.ndarray, vals: np.ndarray, tok: np.ndarray, d_sae: int, top: int):
    """For each distinct token id: row count and the ``top`` latents by mean activation over its rows.

    Returns ``token_ids (U,)``, ``token_count (U,)``, ``top_latents (U, T)`` (-1 pad), ``top_mean (U, T)``.
    """
    uniq, tok_idx, count = np.unique(tok, return_inverse=True, return_counts=True)
    key = tok_idx[rows].astype(np.int64) * d_sae + lat
    ukey, inv = np.unique(key, return_inverse=True)
    sums = np.bincount(inv, weights=vals.astype(np.float64), minlength=len(ukey))
    u_of, l_of = ukey // d_sae, ukey % d_sae
    mean = sums / count[u_of]
    t = min(top, d_sae)
    top_lat = np.full((len(uniq), t), -1, np.int64)
    top_mean = np.zeros((len(uniq), t), np.float32)
    order = np.lexsort((l_of, -mean, u_of))  # per token: mean descending, then latent id
    u_sorted = u_of[order]
    starts = np.searchsorted(u_sorted, np.arange(len(uniq)))
    rank = np.arange(len(order)) - starts[u_sorted]
    keep = rank < t
    top_lat[u_sorted[keep], rank[keep]] = l_of[order][keep]
    top_mean[u_sorted[keep], rank[keep]] = mean[order][keep]
    return uniq.astype(np.int64), count.astype(np.int64), top_lat, top_mean


# --------------------------------------------------------------------------------------------- job


def compute_latent_stats(run, sae, hook: str, cfg: LatentStatsConfig, *, tokenizer=None,
                         unembed: torch.Tensor | None = None, progress: bool = True, on_progress=None,
                         provenance: dict | None = None) -> Path:
    """Write the per-latent statistics of ``sae`` over ``run`` at ``hook`` to ``cfg.out``; return the folder.

    Parameters
    ----------
    run : probekit.cache.Run
        Its rows at ``hook`` have ``d_in`` features (flattened).
    sae : probekit.probes.sae.SAE
        Only ``encode``, ``W_dec`` and ``cfg.d_sae`` are used.
    hook : str
        Hook name of the run the SAE reads.
    cfg : LatentStatsConfig
    tokenizer : optional; its ``decode`` names the token ids in ``tokens.json``.
    unembed : (d_in, vocab) tensor, optional
        The unembedding ``W_U``; without it no logit effects are written.
    on_progress : callable(done_rows, total_rows), optional
    provenance : dict, optional
        Extra JSON-safe fields recorded in ``latents.json`` (e.g. the SAE folder).
    """
    from safetensors.numpy import save_file

    t0 = time.perf_counter()
    if hook not in run.hooks:
        raise KeyError(f"run {run.run_id} has no hook {hook!r}; it holds {', '.join(run.hooks)}")
    d_in = int(np.prod(run.shape(hook)[1:])) if len(run.shape(hook)) > 1 else 1
    w_dec = sae.W_dec.detach().float().cpu()
    d_sae = int(sae.cfg.d_sae)
    if w_dec.shape != (d_sae, d_in):
        raise ValueError(f"the SAE decodes to {tuple(w_dec.shape)[1]} features but {hook} of run {run.run_id} has "
                         f"{d_in}: this SAE was trained on another hook or model")
    if unembed is not None and unembed.shape[0] != d_in:
        raise ValueError(f"unembed has shape {tuple(unembed.shape)}; expected ({d_in}, vocab)")
    meta = run.meta_tensors(["doc_index", "position", "token_id"])
    doc, pos, tok = (meta[k].numpy().astype(np.int64) for k in ("doc_index", "position", "token_id"))
    keep = ~np.isin(pos, np.asarray(cfg.exclude_positions, np.int64)) if cfg.exclude_positions else None
    n = run.n_rows if keep is None else int(keep.sum())
    lat, rows, vals, row_sum = encode_nonzero(run, sae, hook, chunk_rows=cfg.chunk_rows, max_nonzero=cfg.max_nonzero,
                                              progress=progress, on_progress=on_progress, keep=keep)
    ctx = _Context(doc, pos, tok, cfg.context)
    C, K, Q = 2 * cfg.context + 1, cfg.top_k, cfg.n_quantiles * cfg.per_quantile
    a: dict[str, np.ndarray] = {
        "firing_count": np.bincount(lat, minlength=d_sae).astype(np.int64),
        "max_act": np.zeros(d_sae, np.float32), "mean_act": (row_sum / max(n, 1)).astype(np.float32),
        "hist_counts": np.zeros((d_sae, cfg.n_bins), np.int64),
        "top_act": np.zeros((d_sae, K), np.float32), "top_row": np.full((d_sae, K), -1, np.int64),
        "top_ctx_tokens": np.full((d_sae, K, C), -1, np.int64), "top_ctx_acts": np.zeros((d_sae, K, C), np.float32),
        "q_act": np.zeros((d_sae, Q), np.float32), "q_row": np.full((d_sae, Q), -1, np.int64),
        "q_bin": np.full((d_sae, Q), -1, np.int64),
        "q_ctx_tokens": np.full((d_sae, Q, C), -1, np.int64), "q_ctx_acts": np.zeros((d_sae, Q, C), np.float32),
    }
    bounds = np.searchsorted(lat, np.arange(d_sae + 1))
    for i in range(d_sae):
        lo, hi = bounds[i], bounds[i + 1]
        if hi == lo:
            continue
        r, v = rows[lo:hi], vals[lo:hi]
        vmax = float(v.max())
        a["max_act"][i] = vmax
        a["hist_counts"][i] = np.histogram(v, bins=cfg.n_bins, range=(0.0, vmax))[0]
        top = np.lexsort((r, -v))[:K]
        k = len(top)
        a["top_act"][i, :k], a["top_row"][i, :k] = v[top], r[top]
        a["top_ctx_tokens"][i, :k], a["top_ctx_acts"][i, :k] = _examples(r[top], ctx, r, v)
        asc = np.lexsort((r, v))
        m = len(asc)
        picks, bins = [], []
        for b in range(cfg.n_quantiles):
            s, e = (b * m) // cfg.n_quantiles, ((b + 1) * m) // cfg.n_quantiles
            if e <= s:
                continue
            ranks = np.unique(np.linspace(s, e - 1, min(cfg.per_quantile, e - s)).round().astype(np.int64))
            picks.append(asc[ranks])
            bins.append(np.full(len(ranks), b))
        picks, bins = np.concatenate(picks), np.concatenate(bins)
        q = len(picks)
        a["q_act"][i, :q], a["q_row"][i, :q], a["q_bin"][i, :q] = v[picks], r[picks], bins
        a["q_ctx_tokens"][i, :q], a["q_ctx_acts"][i, :q] = _examples(r[picks], ctx, r, v)
    for name in ("top", "q"):
        rr = a[f"{name}_row"]
        a[f"{name}_doc"] = np.where(rr >= 0, doc[np.maximum(rr, 0)], -1)
        a[f"{name}_pos"] = np.where(rr >= 0, pos[np.maximum(rr, 0)], -1)
    a["neighbour_ids"], a["neighbour_cos"] = decoder_neighbours(w_dec, cfg.n_neighbours)
    if unembed is not None:
        (a["logit_pos_ids"], a["logit_pos_vals"], a["logit_neg_ids"],
         a["logit_neg_vals"]) = logit_effects(w_dec, unembed.detach().cpu(), cfg.n_logits)
    (a["token_ids"], a["token_count"], a["token_top_latents"],
     a["token_top_mean"]) = token_index(lat, rows, vals, tok if keep is None else np.where(keep, tok, -1), d_sae,
                                        cfg.top_latents_per_token)
    if keep is not None and (a["token_ids"] == -1).any():  # the excluded rows' pseudo-token
        sel = a["token_ids"] != -1
        for k in ("token_ids", "token_count", "token_top_latents", "token_top_mean"):
            a[k] = a[k][sel]

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in a.items()}
    tmp = out / f".{ARRAYS_FILE}.tmp"
    save_file(arrays, str(tmp))
    os.replace(tmp, out / ARRAYS_FILE)
    if tokenizer is not None:
        ids = set(np.unique(a["token_ids"]).tolist())
        for k in ("top_ctx_tokens", "q_ctx_tokens", "logit_pos_ids", "logit_neg_ids"):
            if k in a:
                ids |= set(np.unique(a[k]).tolist())
        ids.discard(-1)
        names = {str(t): tokenizer.decode([int(t)]) for t in sorted(ids)}
        _write_json(out / TOKENS_FILE, names)
    index: dict[str, Any] = dict(
        kind="latent_stats", run_id=run.run_id, hook=hook, model=str(run.config.get("key", {}).get("model", "")),
        d_sae=d_sae, d_in=d_in, n_rows=int(n), n_rows_run=int(run.n_rows), n_docs=int(len(np.unique(doc))),
        nonzero=int(len(lat)),
        config=cfg.to_dict(), logit_effects=unembed is not None, logit_note=LOGIT_NOTE,
        tokens_decoded=tokenizer is not None, seconds=round(time.perf_counter() - t0, 3),
        arrays=ARRAYS, **(provenance or {}))
    _write_json(out / INDEX_FILE, index)  # last: a folder with latents.json is complete
    return out


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- reading


def load_latent_stats(folder: str | Path) -> tuple[dict, dict[str, np.ndarray], dict[str, str]]:
    """``(index, arrays, token_names)`` of a folder written by :func:`compute_latent_stats`."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    if not (folder / INDEX_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {INDEX_FILE}: not a latent-statistics folder (or still being "
                                "written)")
    index = json.loads((folder / INDEX_FILE).read_text())
    arrays = load_file(str(folder / ARRAYS_FILE))
    names = json.loads((folder / TOKENS_FILE).read_text()) if (folder / TOKENS_FILE).is_file() else {}
    return index, arrays, names


def latent_record(index: dict, arrays: dict[str, np.ndarray], i: int) -> dict:
    """Everything about latent ``i`` as plain Python values (what a latent page shows)."""
    if not 0 <= int(i) < int(index["d_sae"]):
        raise IndexError(f"latent {i} is outside 0..{index['d_sae'] - 1}")
    i = int(i)
    n = max(int(index["n_rows"]), 1)
    rec = dict(latent=i, firing_rate=float(arrays["firing_count"][i]) / n, firing_count=int(arrays["firing_count"][i]),
               max_act=float(arrays["max_act"][i]), mean_act=float(arrays["mean_act"][i]),
               hist_counts=arrays["hist_counts"][i].tolist(), n_bins=int(index["config"]["n_bins"]),
               context=int(index["config"]["context"]))
    for name in ("top", "q"):
        keep = arrays[f"{name}_row"][i] >= 0
        rec[name] = [dict(act=float(act), row=int(r), doc=int(d), pos=int(p), bin=int(b),
                          tokens=t.tolist(), acts=[float(x) for x in ac])
                     for act, r, d, p, b, t, ac in zip(
                         arrays[f"{name}_act"][i][keep], arrays[f"{name}_row"][i][keep], arrays[f"{name}_doc"][i][keep],
                         arrays[f"{name}_pos"][i][keep],
                         arrays["q_bin"][i][keep] if name == "q" else np.zeros(int(keep.sum()), np.int64),
                         arrays[f"{name}_ctx_tokens"][i][keep], arrays[f"{name}_ctx_acts"][i][keep])]
    rec["neighbours"] = [dict(latent=int(j), cos=float(c))
                         for j, c in zip(arrays["neighbour_ids"][i], arrays["neighbour_cos"][i])]
    if "logit_pos_ids" in arrays:
        rec["logits_pos"] = [dict(token=int(t), value=float(v))
                             for t, v in zip(arrays["logit_pos_ids"][i], arrays["logit_pos_vals"][i])]
        rec["logits_neg"] = [dict(token=int(t), value=float(v))
                             for t, v in zip(arrays["logit_neg_ids"][i], arrays["logit_neg_vals"][i])]
    return rec
