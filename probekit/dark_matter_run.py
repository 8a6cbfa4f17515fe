"""``probekit dark-matter run``: SAEs of several widths on one residual stream, and the dark matter of their error.

Pipeline (METHODS.md §3):

1. Tokens: stdlib functions (code) and pydoc Language Reference chunks (English prose), split by document into
   train and test.
2. Capture ``blocks.{l-1}.hook_resid_post`` and ``blocks.{l}.hook_resid_post`` for every token into the
   activation cache (content-addressed: reruns reuse it; a killed capture resumes).
3. One TopK SAE per width, trained from the cache's device tier (block-shuffled minibatches, checkpoints, exact
   resume), saved in SAELens' folder format.
4. Per width, on held-out tokens: FVU / L0 / dead fraction; CE-loss recovered and KL with x̂ spliced in; the
   error decomposition (W* by streamed normal equations on the training tokens); CE with x̂ + linear error and
   x̂ + nonlinear error spliced in. Across widths: the FVU split and per-token scaling. For one width: gradient
   pursuit re-encoding and the earlier-layer regressions.

5. Per held-out document (the unit of every CI, METHODS.md §5), float64 sums: FVU numerator and denominator per
   width; for the widest SAE Σe (a d-vector), Σ‖e‖², Σ‖e‖⁴, Σ‖nonlinear error‖² and the norm regressions'
   squared residuals; per CE document the NLL under each splice. The norm question: R²(‖e‖² | x) of the widest
   SAE with position 0 left out (the run's choice) and kept, from position 4, and with target ‖e‖
   (:func:`probekit.probes.dark_matter_norms.norm_predictability`).

Stated choices: position 0 of every document (the BOS / attention-sink token, whose norm is far larger than
any other's) is left out of SAE training and every metric, and the splices leave it untouched; activations
are stored in the cache as bfloat16 and converted to float32 for training and analysis.

Results (JSON, SAE folders, one plotly HTML page) go to ``<cache root>/results/dark-matter/<model>/``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .models import DEFAULT_MODEL
from .html_page import write_figures_page
from .paths import results_dir
from .results import figures as result_figures

PUBLISHED = dict(error_vector_linear_fraction=0.5, error_norm_linear_fraction=0.9)


@dataclass
class DarkMatterRunConfig:
    """Settings of the offline dark-matter run; defaults fit a CPU in well under an hour.

    ``expansions`` are SAE widths as multiples of the residual width (d_sae = e · d_model).
    """

    model: str = DEFAULT_MODEL
    layer: int | None = None  # None: the middle block
    expansions: tuple[int, ...] = (2, 4, 8)
    k: int = 32
    epochs: int = 3
    batch_size: int = 1024
    lr: float = 1e-3
    dead_steps: int = 100  # a latent silent for this many steps feeds the TopK auxiliary loss (short runs here)
    n_code: int = 500
    n_text: int = 300
    max_length: int = 256
    test_fraction: float = 0.2
    ce_docs: int = 64  # test documents for the CE splices (each splice costs a full forward over them)
    pursuit_tokens: int = 6000
    pursuit_width_index: int = 0  # which width gets gradient pursuit and the earlier-layer regressions
    norm_question: bool = True  # R²(‖e‖² | x) of the widest SAE under a few token selections (BOS in / out, …)
    cache_dtype: str = "bfloat16"
    device: str | None = None
    budget_gb: float = 4.0
    seed: int = 0
    out: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.expansions or min(self.expansions) < 1:
            raise ValueError(f"expansions must be positive integers, got {self.expansions}")
        if len(self.expansions) < 3:
            raise ValueError("per-token scaling needs at least 3 SAE widths: give >= 3 expansions")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must lie in (0, 1), got {self.test_fraction}")
        if self.n_code + self.n_text < 10:
            raise ValueError("need at least 10 documents (n_code + n_text)")
        if not 0 <= self.pursuit_width_index < len(self.expansions):
            raise ValueError(f"pursuit_width_index must index expansions (0..{len(self.expansions) - 1})")


def run_documents(cfg: DarkMatterRunConfig, tok) -> tuple[list[list[int]], list[str], list[str]]:
    """Token ids, kind ("code"/"text") and id of every document."""
    from .capture import tokenize
    from .data.code import iter_stdlib_functions
    from .data.text import iter_pydoc_paragraphs

    code = iter_stdlib_functions(max_functions=cfg.n_code, seed=cfg.seed) if cfg.n_code else []
    text = iter_pydoc_paragraphs(max_docs=cfg.n_text, seed=cfg.seed) if cfg.n_text else []
    texts = [s.source for s in code] + [d.text for d in text]
    kinds = ["code"] * len(code) + ["text"] * len(text)
    ids = [s.doc_id for s in code] + [d.doc_id for d in text]
    docs = tokenize(tok, texts, max_length=cfg.max_length)
    return docs, kinds, ids


def split_documents(n: int, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean (n,) mask of test documents (a seeded random subset)."""
    rng = np.random.default_rng(seed)
    test = np.zeros(n, dtype=bool)
    test[rng.permutation(n)[: max(1, int(round(test_fraction * n)))]] = True
    return test


def _keep_first(fn, device):
    """Splice ``fn`` on positions ≥ 1 only (position 0 is outside the SAE's training distribution)."""
    def g(a: torch.Tensor) -> torch.Tensor:
        out = a.clone()
        out[:, 1:] = fn(a[:, 1:].to(device, torch.float32)).to(a.device, a.dtype)
        return out
    return g


def _token_batches(docs: list[list[int]], pad_id: int, batch_size: int = 8):
    for i in range(0, len(docs), batch_size):
        part = docs[i : i + batch_size]
        P = max(len(d) for d in part)
        ids = torch.full((len(part), P), pad_id, dtype=torch.long)
        mask = torch.zeros((len(part), P), dtype=torch.long)
        for b, d in enumerate(part):
            ids[b, : len(d)] = torch.as_tensor(d)
            mask[b, : len(d)] = 1
        yield ids, mask


def _hover(tok, token_ids: np.ndarray, doc: np.ndarray, pos: np.ndarray, rows: np.ndarray, width: int = 6):
    """'…context [token]' strings for rows (rows of one document are contiguous and in position order)."""
    pieces = tok.convert_ids_to_tokens([int(t) for t in token_ids])
    out = []
    for r in rows:
        lo = r
        while lo > 0 and r - lo < width and doc[lo - 1] == doc[r] and pos[lo - 1] == pos[lo] - 1:
            lo -= 1
        ctx = "".join(pieces[lo:r]).replace("Ġ", " ").replace("Ċ", "⏎")
        out.append(f"…{ctx}[{pieces[r].replace('Ġ', ' ').replace('Ċ', '⏎')}]")
    return out


def _scatter(res, hover: list[str], width: int, max_points: int = 3000) -> dict[str, Any]:
    """An evenly spaced subset of held-out tokens for the ‖e‖ scatter (kept in the JSON with its hover text)."""
    n = len(res.error_norm)
    idx = np.unique(np.linspace(0, n - 1, min(n, max_points)).round().astype(int))
    return dict(width=width, actual=[round(float(res.error_norm[i]), 4) for i in idx],
                predicted=[round(float(res.error_norm_pred[i]), 4) for i in idx], hover=[hover[i] for i in idx])


def _splices(w: int, sae, W: torch.Tensor, b: torch.Tensor, device) -> dict:
    """The three CE splices of one width, keyed ``"<w>/sae"``, ``"<w>/linear"``, ``"<w>/nonlinear"``: x̂,
    x̂ + linear error (x̂ + xW* + b) and x̂ + nonlinear error (x̂ + (e − xW* − b) = x − xW* − b). A function, so
    each width's closures hold that width's SAE and W*."""
    return {f"{w}/sae": _keep_first(sae, device),
            f"{w}/linear": _keep_first(lambda a: sae(a) + a @ W + b, device),
            f"{w}/nonlinear": _keep_first(lambda a: a - a @ W - b, device)}


def _rows(batch) -> torch.Tensor:
    """The (b, d) activations of one batch: a DeviceCache batch dict of one hook, or the tensor itself."""
    return next(iter(batch.values())) if isinstance(batch, dict) else batch


def _doc_slots(doc_of_token: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
    """Sorted document ids and, per token, its slot among them (a long tensor for ``index_add_``)."""
    ids, inv = np.unique(np.asarray(doc_of_token), return_inverse=True)
    return ids, torch.as_tensor(inv.reshape(-1), dtype=torch.long)


def _per_document(sae, vec, train_batches, test_batches, doc_of_token: np.ndarray, width: int) -> dict:
    """Per held-out document float64 sums for the widest SAE (the unit of the CIs, METHODS.md §5).

    Recomputes ``e = x − x̂`` and the linear error ``xW*`` exactly as :func:`error_decomposition` does (same
    batches, same reconstruction, the run's fitted ``vec``), so the pooled sums reproduce its held-out numbers;
    the norm regressions ``[‖e‖², ‖e‖] ~ x`` (with an intercept) are refitted on the same training tokens in
    one streamed pass. Per document (in sorted ``doc`` order): ``n_tokens``; ``norm``, ``norm_sq``, ``norm_pow4``
    (Σ‖e‖, Σ‖e‖², Σ‖e‖⁴); ``norm_sse`` and ``norm_sq_sse`` (Σ of the squared residuals of ‖e‖ and ‖e‖² from x);
    ``nonlinear_sq`` (Σ‖e − xW*‖²); ``error_sum`` (Σe, one d-vector per document: the centred R² of e needs it).

    Parameters
    ----------
    train_batches, test_batches : iterables of DeviceCache batch dicts ``{hook: (b, d)}`` or of (b, d) tensors
    doc_of_token : int array (n_test,), the document of each held-out token in batch order
    """
    from .probes.dark_matter import sae_reconstruct
    from .probes.lstsq import StreamedLeastSquares

    rec = sae_reconstruct(sae)
    nrm = StreamedLeastSquares(fit_intercept=True)
    with torch.no_grad():
        for b in train_batches:
            x = _rows(b)
            sq = (x - rec(x)[0]).double().pow(2).sum(-1)
            nrm.partial_fit(x, torch.stack([sq, sq.sqrt()], 1))
        ids, slot = _doc_slots(doc_of_token)
        n_docs, start = len(ids), 0
        cols = {k: torch.zeros(n_docs, dtype=torch.float64)
                for k in ("n_tokens", "norm", "norm_sq", "norm_pow4", "norm_sse", "norm_sq_sse", "nonlinear_sq")}
        e_sum = None
        for b in test_batches:
            x = _rows(b)
            e = (x - rec(x)[0]).double()
            nl = e - vec.predict(x.double())
            sq = e.pow(2).sum(-1)
            pred = nrm.predict(x.double())
            s = slot[start:start + len(x)].to(x.device)
            start += len(x)
            if e_sum is None:
                e_sum = torch.zeros(n_docs, e.shape[1], dtype=torch.float64, device=x.device)
            e_sum.index_add_(0, s, e)
            for k, v in (("n_tokens", torch.ones_like(sq)), ("norm", sq.sqrt()), ("norm_sq", sq),
                         ("norm_pow4", sq * sq), ("norm_sq_sse", (sq - pred[:, 0]) ** 2),
                         ("norm_sse", (sq.sqrt() - pred[:, 1]) ** 2), ("nonlinear_sq", nl.pow(2).sum(-1))):
                cols[k] = cols[k].to(x.device).index_add_(0, s, v)
    if start != len(doc_of_token):
        raise ValueError(f"the held-out batches gave {start} tokens for {len(doc_of_token)} document labels")
    out: dict = dict(width=width, doc=ids.tolist(), sums_dtype="float64")
    out.update({k: v.cpu().tolist() for k, v in cols.items()})
    out["n_tokens"] = [int(v) for v in out["n_tokens"]]
    out["error_sum"] = e_sum.cpu().tolist()
    return out


def _fvu_per_document(saes: dict, test_batches_of, doc_of_token: np.ndarray) -> dict:
    """Per held-out document float64 sums of FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² for every width, as
    :func:`~probekit.probes.sae.sae_metrics` computes them (x̂ in float32, the difference in float64).

    ``sst`` is each document's Σ‖x − x̄‖² about the mean x̄ of *all* held-out tokens (so the pooled ratio is the
    run's FVU; a bootstrap then holds x̄ at the held-out mean: stated). ``sse[w]`` is Σ‖x − x̂‖² of width ``w``.
    ``test_batches_of()`` returns a fresh iterable of held-out batches in ``doc_of_token`` order.
    """
    ids, slot = _doc_slots(doc_of_token)
    n_docs = len(ids)
    sx = sxx = None
    n = 0
    for b in test_batches_of():  # Σx and Σ‖x‖² per document: Σ_d‖x − x̄‖² = Σ‖x‖² − 2x̄·Σx + n_d‖x̄‖²
        xd = _rows(b).double()
        s = slot[n:n + len(xd)].to(xd.device)
        n += len(xd)
        if sx is None:
            sx = torch.zeros(n_docs, xd.shape[1], dtype=torch.float64, device=xd.device)
            sxx = torch.zeros(n_docs, dtype=torch.float64, device=xd.device)
        sx.index_add_(0, s, xd)
        sxx.index_add_(0, s, xd.pow(2).sum(-1))
    counts = torch.as_tensor(np.bincount(slot.numpy(), minlength=n_docs), dtype=torch.float64, device=sx.device)
    xbar = sx.sum(0) / n
    sst = sxx - 2 * sx @ xbar + counts * xbar.pow(2).sum()
    sse = {}
    with torch.no_grad():
        for w, sae in saes.items():
            acc = torch.zeros(n_docs, dtype=torch.float64, device=sx.device)
            start = 0
            for b in test_batches_of():
                x = _rows(b)
                x_hat = sae.decode(sae.encode(x), x=x)
                s = slot[start:start + len(x)].to(x.device)
                start += len(x)
                acc.index_add_(0, s, (x.double() - x_hat.double()).pow(2).sum(-1))
            sse[str(w)] = acc.cpu().tolist()
    return dict(doc=ids.tolist(), n_tokens=counts.cpu().long().tolist(), sst=sst.cpu().tolist(), sse=sse,
                centre="mean of all held-out tokens", sums_dtype="float64")


def _ce_per_document(ces: dict, widths: list[int], doc_ids: list[int]) -> dict:
    """Per CE document (a held-out document, in the order the splices saw them) the NLL / KL sums of
    :func:`~probekit.probes.sae.ce_recovered_many`: shared clean and zero columns once, then per width those of
    x̂, x̂ + linear error and x̂ + nonlinear error."""
    first = ces[f"{widths[0]}/sae"].per_document
    out: dict = dict(doc=list(doc_ids), n_tokens=np.asarray(first["n_tokens"]).astype(int).tolist(),
                     nll_clean=np.asarray(first["nll_clean"]).tolist(), nll_zero=np.asarray(first["nll_zero"]).tolist(),
                     kl_zero=np.asarray(first["kl_zero"]).tolist(), widths={})
    for w in widths:
        cols = {}
        for k in ("sae", "linear", "nonlinear"):
            per = ces[f"{w}/{k}"].per_document
            cols[f"nll_{k}"] = np.asarray(per["nll_sae"]).tolist()
            cols[f"kl_{k}"] = np.asarray(per["kl_sae"]).tolist()
        out["widths"][str(w)] = cols
    return out


#: The norm question's selections: the run's choice first (the reference), then one change each.
NORM_QUESTION = (("run's choice: ‖e‖², position 0 (BOS) excluded", dict(min_position=1)),
                 ("BOS (position 0) included", dict(min_position=0)),
                 ("first 4 positions excluded", dict(min_position=4)),
                 ("target ‖e‖ (BOS excluded)", dict(min_position=1, target="norm")))


def _norm_question(dc, hook: str, sae, doc: np.ndarray, pos: np.ndarray, is_test: np.ndarray, kinds: list[str],
                   label: str, seed: int) -> dict:
    """R²(‖e‖² | x) of ``sae`` under :data:`NORM_QUESTION` on every token (position 0 included), with 95% CIs
    over held-out documents (:func:`~probekit.probes.dark_matter_norms.norm_predictability`); its ``to_dict``
    plus ``seconds``, or ``{"error": why}`` when a selection leaves too few tokens."""
    from .probes.dark_matter_norms import NormSelection, norm_predictability, sae_error_sq

    t0 = time.perf_counter()
    rows = np.arange(len(doc))
    x = torch.cat([b[hook].cpu() for b in dc.batches(hook, 4096, rows=rows, dtype=torch.float32)])
    err = sae_error_sq(sae, x)
    try:
        res = norm_predictability(x, err, doc, pos, is_test, doc_domain=kinds, seed=seed, label=label,
                                  selections=[NormSelection(n, **kw) for n, kw in NORM_QUESTION])
    except ValueError as exc:
        return dict(error=f"norm question not assessed: {exc}")
    return {**res.to_dict(), "seconds": round(time.perf_counter() - t0, 2)}


def run_dark_matter(cfg: DarkMatterRunConfig = DarkMatterRunConfig()) -> dict[str, Any]:
    """Train the SAEs and run every analysis; write ``dark_matter.json`` and ``dark_matter.html``."""
    from .cache import ActivationCache
    from .capture import CaptureConfig
    from .device_cache import DeviceCache
    from .models import load_model
    from .probes.dark_matter import (earlier_layer_prediction, error_decomposition, fvu_split_across_widths,
                                     per_token_scaling, pursuit_refit)
    from .probes.sae import SAEConfig, ce_recovered_many, sae_metrics, save_sae, train_sae
    from .claims import error_r2_estimates

    t0 = time.perf_counter()
    say = print
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bridge, tok = load_model(cfg.model)
    n_layers, d_model = bridge.cfg.n_layers, bridge.cfg.d_model
    layer = n_layers // 2 if cfg.layer is None else cfg.layer
    if not 1 <= layer < n_layers:
        raise ValueError(f"layer must lie in [1, {n_layers - 1}] (the previous layer is needed too), got {layer}")
    hook, prev = f"blocks.{layer}.hook_resid_post", f"blocks.{layer - 1}.hook_resid_post"
    docs, kinds, doc_ids = run_documents(cfg, tok)
    is_test = split_documents(len(docs), cfg.test_fraction, cfg.seed)
    run = ActivationCache().capture(bridge, docs, CaptureConfig(hooks=[prev, hook], positions="all", batch_size=8,
                                                                max_length=cfg.max_length, dtype=cfg.cache_dtype,
                                                                progress=cfg.progress))
    meta = run.meta_tensors(["doc_index", "position", "token_id"])
    doc, pos, token_id = (meta[c].numpy() for c in ("doc_index", "position", "token_id"))
    real = pos > 0
    train_rows = np.nonzero(real & ~is_test[doc])[0]
    test_rows = np.nonzero(real & is_test[doc])[0]
    say(f"[probekit dark-matter] {cfg.model} layer {layer}: {len(docs)} documents "
        f"({kinds.count('code')} code, {kinds.count('text')} text), {len(train_rows)} train / {len(test_rows)} "
        f"test tokens; device {device}")
    dc = DeviceCache(run, device=device, budget_gb=cfg.budget_gb)
    out = Path(cfg.out) if cfg.out else results_dir() / "dark-matter" / cfg.model.replace("/", "--")
    out.mkdir(parents=True, exist_ok=True)
    bs = 4096

    def batches(rows, hooks=hook, shuffle=False):
        return dc.batches(hooks, bs, rows=rows, shuffle=shuffle, dtype=torch.float32)

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    test_docs = [docs[i] for i in np.nonzero(is_test)[0][: cfg.ce_docs]]
    widths = [e * d_model for e in cfg.expansions]
    saes, metrics, decomp, ce, splices = {}, {}, {}, {}, {}
    for w in widths:
        scfg = SAEConfig(d_in=d_model, d_sae=w, architecture="topk", k=cfg.k, lr=cfg.lr, batch_size=cfg.batch_size,
                         epochs=cfg.epochs, dead_steps=cfg.dead_steps, seed=cfg.seed, device=device,
                         hook_name=hook, model_name=cfg.model)
        sae = train_sae(scfg, dc, hook=hook, rows=train_rows, checkpoint_dir=out / "checkpoints" / str(w),
                        checkpoint_every=200, progress=cfg.progress)
        sae.eval()
        save_sae(sae, out / "saes" / f"{hook}-{w}")
        saes[w] = sae
        with torch.no_grad():
            metrics[w] = sae_metrics(sae, batches(test_rows), hook=hook).to_dict()
            res = error_decomposition(sae, batches(train_rows), batches(test_rows), hook=hook, label=f"{w}")
        decomp[w] = res
        W = torch.as_tensor(res.estimator.coef_, dtype=torch.float32, device=sae.W_dec.device)
        b = torch.as_tensor(res.estimator.intercept_, dtype=torch.float32, device=sae.W_dec.device)  # 0 unless fitted
        splices.update(_splices(w, sae, W, b, device))
        say(f"[probekit dark-matter] width {w}: FVU {metrics[w]['fvu']:.3f}, L0 {metrics[w]['l0']:.1f}, "
            f"dead {metrics[w]['dead_fraction']:.3f}; R²(e|x) {res.r2_error_vector:.3f}, "
            f"R²(‖e‖²|x) {res.r2_error_norm_sq:.3f}")

    # one clean and one zero-ablated forward per batch serve every width's three splices
    ces = ce_recovered_many(bridge, _token_batches(test_docs, pad_id), hook, splices)
    for w in widths:
        base, lin, nonlin = ({k: v for k, v in ces[f"{w}/{k}"].to_dict().items() if k != "per_document"}
                             for k in ("sae", "linear", "nonlinear"))
        ce[str(w)] = {**base, "ce_linear": lin["ce_sae"], "ce_nonlinear": nonlin["ce_sae"],
                      "kl_linear": lin["kl_sae"], "kl_nonlinear": nonlin["kl_sae"]}
        say(f"[probekit dark-matter] width {w}: CE recovered {base['ce_recovered']:.3f} on {base['n_tokens']} "
            f"tokens; CE x̂ {base['ce_sae']:.3f}, + linear error {lin['ce_sae']:.3f}, "
            f"+ nonlinear error {nonlin['ce_sae']:.3f} (clean {base['ce_clean']:.3f})")

    split = fvu_split_across_widths(decomp)
    scaling = per_token_scaling({w: decomp[w].error_norm for w in widths},
                                {w: decomp[w].nonlinear_norm for w in widths})
    wp = widths[cfg.pursuit_width_index]
    rng = np.random.default_rng(cfg.seed)
    sub_tr = np.sort(rng.choice(train_rows, min(cfg.pursuit_tokens, len(train_rows)), replace=False))
    sub_te = np.sort(rng.choice(test_rows, min(cfg.pursuit_tokens // 4, len(test_rows)), replace=False))
    with torch.no_grad():
        plain_sub = error_decomposition(saes[wp], batches(sub_tr), batches(sub_te), hook=hook, label=f"{wp} SAE")
        pursuit = pursuit_refit(saes[wp], batches(sub_tr), batches(sub_te), hook=hook, label=f"{wp} pursuit")
        earlier = earlier_layer_prediction(
            saes[wp], batches(train_rows, [prev, hook]), batches(test_rows, [prev, hook]), x_key=hook,
            prev_key=prev, regressor_sets={"previous layer": [prev], "x + previous layer": [hook, prev],
                                           "x̂ (SAE output)": ["x_hat"], "x̂ + previous layer": ["x_hat", prev]})
    say(f"[probekit dark-matter] width {wp}: nonlinear FVU {plain_sub.fvu_nonlinear:.4f} (SAE encoder) vs "
        f"{pursuit.fvu_nonlinear:.4f} (gradient pursuit); earlier-layer nonlinear error removed "
        f"{ {k: round(v, 3) for k, v in earlier.nonlinear_reduction.items()} }")

    # per-document sums for the CIs, and the norm question (timed: they add passes over the cached tokens)
    t_doc = time.perf_counter()
    wl = widths[-1]
    with torch.no_grad():
        per_doc = _per_document(saes[wl], decomp[wl].estimator, batches(train_rows), batches(test_rows),
                                doc[test_rows], wl)
        fvu_doc = _fvu_per_document(saes, lambda: batches(test_rows), doc[test_rows])
        # the narrower widths' R² CIs from their own sums (the sums are not kept: Σe is d floats per document)
        r2_by_width = {str(w): {k: e.to_dict() for k, e in error_r2_estimates(_per_document(
            saes[w], decomp[w].estimator, batches(train_rows), batches(test_rows), doc[test_rows], w)).items()}
            for w in widths[:-1]}
        norm_q = (_norm_question(dc, hook, saes[wl], doc, pos, is_test, kinds, f"{cfg.model} layer {layer}, "
                                 f"{wl}-latent TopK SAE", cfg.seed) if cfg.norm_question else None)
    ce_doc = _ce_per_document(ces, widths, [int(i) for i in np.nonzero(is_test)[0][: cfg.ce_docs]])
    doc_seconds = round(time.perf_counter() - t_doc, 2)
    if norm_q is not None and "rows" in norm_q:
        r0, r1 = norm_q["rows"][0]["r2"], norm_q["rows"][1]["r2"]
        say(f"[probekit dark-matter] norm question, width {wl}: R²(‖e‖² | x) {r0['value']:.3f} "
            f"[{r0['low']:.3f}, {r0['high']:.3f}] BOS excluded vs {r1['value']:.3f} [{r1['low']:.3f}, "
            f"{r1['high']:.3f}] BOS included (n = {r0['n']} documents)")
    say(f"[probekit dark-matter] per-document sums and the norm question: {doc_seconds:.1f} s")

    hover = _hover(tok, token_id, doc, pos, test_rows)
    payload = dict(per_document=per_doc, fvu_per_document=fvu_doc, ce_per_document=ce_doc,
        error_r2_by_width=r2_by_width,
        norm_question=norm_q, per_document_seconds=doc_seconds,
        kind="dark_matter", model=cfg.model, layer=layer, hook=hook, previous_hook=prev, config=asdict(cfg),
        device=device, cache_run=run.run_id, n_documents=dict(code=kinds.count("code"), text=kinds.count("text")),
        n_tokens=dict(train=int(len(train_rows)), test=int(len(test_rows))), widths=widths,
        sae_metrics={str(w): metrics[w] for w in widths},
        decomposition={str(w): decomp[w].to_dict() for w in widths}, fvu_split=split.to_dict(), ce=ce,
        per_token_scaling=scaling.to_dict(),
        pursuit=dict(width=wp, sae=plain_sub.to_dict(), pursuit=pursuit.to_dict()), earlier_layer=earlier.to_dict(),
        scatter=_scatter(decomp[widths[-1]], hover, widths[-1]),
        published=PUBLISHED, seconds=round(time.perf_counter() - t0, 1))
    (out / "dark_matter.json").write_text(json.dumps(payload, indent=2, default=float))
    figs = result_figures(payload)
    write_figures_page(out / "dark_matter.html", figs, title=f"SAE dark matter — {cfg.model}")
    say(f"[probekit dark-matter] wrote {out / 'dark_matter.json'} and dark_matter.html "
        f"({time.perf_counter() - t0:.0f} s)")
    return payload
