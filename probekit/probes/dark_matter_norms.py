"""How predictable the SAE error norm is, and which choice of tokens, target or regression decides it.

METHODS.md §3 asks for the R² of ``‖e‖²`` regressed on ``x`` (published > 0.9; ``e = x − x̂``). That one number
depends on choices the paper leaves implicit; :func:`norm_predictability` recomputes it under a list of
:class:`NormSelection` settings, each differing from a reference in one choice, on the same activations and
SAE errors:

- token selection: the first positions (position 0 is the BOS / attention-sink token, whose norm is
  far larger than any other's) left out or kept; code only, prose only or both; a cap on tokens per document;
- the target: ``‖e‖²``, ``‖e‖`` or ``log ‖e‖``; the largest ``‖e‖²`` dropped or kept;
- the regression: with or without an intercept, ridge or OLS, how many training tokens.

Pinned definitions
------------------
- The regression ``y ~ x`` is fitted on tokens of the *training* documents (streamed normal equations in
  float64, :class:`~probekit.probes.lstsq.StreamedLeastSquares`) and scored on tokens of the *held-out*
  documents. R² is pooled and centred on the held-out tokens: ``1 − Σ(y − ŷ)² / Σ(y − ȳ)²``, ``ȳ`` their mean.
- 95% CI: percentile bootstrap over held-out **documents** (METHODS §5; tokens of a document are not
  independent). Each resample recomputes the pooled R², ``ȳ`` included, from per-document sums
  ``(n_d, Σy, Σy², Σ(y − ŷ)²)``. The fitted map is held fixed: the interval covers the choice of held-out
  documents, not the refit on other training documents (stated).
- Differences from the reference setting are paired bootstraps over the held-out documents of either
  setting (a document a setting leaves empty contributes zero to its sums).
- ``drop_top = q``: tokens whose ``‖e‖²`` exceeds the ``1 − q`` quantile of the *training* tokens' ``‖e‖²``
  are left out of training and scoring (the threshold never looks at held-out tokens).
- ``max_train_tokens``: a seeded random subset of the training tokens (the train R² is on that subset).

Example
-------
>>> from probekit.probes.dark_matter_norms import norm_predictability, sae_error_sq      # doctest: +SKIP
>>> res = norm_predictability(x, sae_error_sq(sae, x), doc, pos, is_test_doc, doc_domain=kinds)  # doctest: +SKIP
>>> print(res.table())                                                                   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..stats import Estimate, N_BOOT, bootstrap_ci, paired_difference
from .lstsq import StreamedLeastSquares

__all__ = ["DEFAULT_SELECTIONS", "NormSelection", "NormSweepResult", "NormSweepRow", "norm_predictability",
           "r2_from_doc_sums", "sae_error_sq"]

TARGETS = ("sq", "norm", "log")
TARGET_LABELS = {"sq": "‖e‖²", "norm": "‖e‖", "log": "log ‖e‖"}
DOMAINS = ("mixed", "code", "text")


@dataclass(frozen=True)
class NormSelection:
    """One way of computing the R² of the error norm from ``x``.

    Parameters
    ----------
    name : str
        Label in tables and figures.
    min_position : int, default 1
        Tokens at positions ``< min_position`` are left out (1: BOS excluded, as in the dark-matter run; 0: kept).
    max_position : int or None
        Tokens at positions ``>= max_position`` are left out (caps the tokens per document).
    domain : {"mixed", "code", "text"}
        Documents of one kind only, or both.
    target : {"sq", "norm", "log"}
        Regress ``‖e‖²``, ``‖e‖`` or ``log ‖e‖``.
    drop_top : float in [0, 1)
        Fraction of the largest training ``‖e‖²`` whose threshold removes tokens (module docstring).
    fit_intercept : bool, default True
    alpha : float, default 0
        Relative ridge of :class:`~probekit.probes.lstsq.StreamedLeastSquares` (0: OLS).
    max_train_tokens : int or None
        Fit on a seeded random subset of this many training tokens.
    """

    name: str
    min_position: int = 1
    max_position: int | None = None
    domain: str = "mixed"
    target: str = "sq"
    drop_top: float = 0.0
    fit_intercept: bool = True
    alpha: float = 0.0
    max_train_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.min_position < 0:
            raise ValueError(f"NormSelection {self.name!r}: min_position must be >= 0, got {self.min_position}")
        if self.max_position is not None and self.max_position <= self.min_position:
            raise ValueError(f"NormSelection {self.name!r}: max_position ({self.max_position}) must exceed "
                             f"min_position ({self.min_position})")
        if self.domain not in DOMAINS:
            raise ValueError(f"NormSelection {self.name!r}: domain must be one of {DOMAINS}, got {self.domain!r}")
        if self.target not in TARGETS:
            raise ValueError(f"NormSelection {self.name!r}: target must be one of {TARGETS}, got {self.target!r}")
        if not 0 <= self.drop_top < 1:
            raise ValueError(f"NormSelection {self.name!r}: drop_top must lie in [0, 1), got {self.drop_top}")
        if self.alpha < 0:
            raise ValueError(f"NormSelection {self.name!r}: alpha must be >= 0, got {self.alpha}")
        if self.max_train_tokens is not None and self.max_train_tokens < 2:
            raise ValueError(f"NormSelection {self.name!r}: max_train_tokens must be >= 2, got "
                             f"{self.max_train_tokens}")


#: The dark-matter run's choice first (the reference), then one change at a time.
DEFAULT_SELECTIONS: tuple[NormSelection, ...] = (
    NormSelection("run default: ‖e‖², BOS excluded, code + prose, OLS + bias"),
    NormSelection("BOS (position 0) included", min_position=0),
    NormSelection("positions ≥ 4", min_position=4),
    NormSelection("first 64 tokens per document", max_position=64),
    NormSelection("code only", domain="code"),
    NormSelection("prose only", domain="text"),
    NormSelection("target ‖e‖", target="norm"),
    NormSelection("target log ‖e‖", target="log"),
    NormSelection("top 0.1% of ‖e‖² dropped", drop_top=0.001),
    NormSelection("no intercept", fit_intercept=False),
    NormSelection("ridge (alpha 0.01)", alpha=0.01),
    NormSelection("5,000 training tokens", max_train_tokens=5000),
    NormSelection("BOS included, target ‖e‖", min_position=0, target="norm"),
)


def r2_from_doc_sums(sums: np.ndarray) -> float:
    """Pooled centred R² from per-document sums.

    Parameters
    ----------
    sums : array (n_docs, 4)
        Columns ``n_d, Σ y, Σ y², Σ (y − ŷ)²`` of each document (rows of zeros are allowed).

    Returns ``1 − SSE / SST`` with ``SST = Σy² − (Σy)²/n``; nan when the target has no variance.
    """
    s = np.asarray(sums, dtype=np.float64).sum(axis=0)
    n, sy, syy, sse = s
    sst = syy - sy * sy / n if n > 0 else 0.0
    return float(1.0 - sse / sst) if sst > 0 else float("nan")


def sae_error_sq(sae: Any, x: Any, *, batch_size: int = 4096) -> torch.Tensor:
    """``‖x − decode(encode(x))‖²`` per row, float64, shape (n,), computed in batches (``x`` (n, d_in))."""
    x = torch.as_tensor(x)
    dev = next(iter(sae.parameters())).device if hasattr(sae, "parameters") else x.device
    out = []
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            xb = x[s:s + batch_size].to(dev, torch.float32)
            out.append((xb - sae.decode(sae.encode(xb))).double().pow(2).sum(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@dataclass
class NormSweepRow:
    """The held-out R² of one :class:`NormSelection`.

    Attributes
    ----------
    selection : NormSelection
    r2 : Estimate
        Held-out pooled R² with its 95% CI over held-out documents (``n`` = documents).
    r2_train : float
        R² on the training tokens it was fitted on (train ≫ test shows over-fitting).
    diff_vs_reference : Estimate or None
        Paired bootstrap of ``r2 − r2(reference)`` over held-out documents (None for the reference itself).
    n_train_tokens, n_test_tokens, n_train_docs : int
    tokens_per_dim : float
        Training tokens per regressor (``n_train_tokens / d_in``).
    max_token_share, max_doc_share : float
        The largest share of the held-out ``Σ(y − ȳ)²`` that one token (one document) holds: near 1, R² is
        decided by that token (document) alone.
    """

    selection: NormSelection
    r2: Estimate
    r2_train: float
    diff_vs_reference: Estimate | None
    n_train_tokens: int
    n_test_tokens: int
    n_train_docs: int
    tokens_per_dim: float
    max_token_share: float = float("nan")
    max_doc_share: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return dict(selection=asdict(self.selection), r2=self.r2.to_dict(), r2_train=_num(self.r2_train),
                    diff_vs_reference=None if self.diff_vs_reference is None else self.diff_vs_reference.to_dict(),
                    n_train_tokens=self.n_train_tokens, n_test_tokens=self.n_test_tokens,
                    n_train_docs=self.n_train_docs, tokens_per_dim=round(self.tokens_per_dim, 2),
                    max_token_share=_num(self.max_token_share), max_doc_share=_num(self.max_doc_share))


def _num(v: float) -> float | None:
    return None if not np.isfinite(v) else float(v)


@dataclass
class NormSweepResult:
    """R² of the error norm from ``x`` under each selection; ``rows[0]`` is the reference.

    Attributes
    ----------
    rows : list of NormSweepRow
    d_in : int
    label : str
        What the errors come from (e.g. ``"SmolLM2-135M L15, 1,152-latent TopK SAE"``).
    notes : list of str
    """

    rows: list[NormSweepRow]
    d_in: int
    label: str = ""
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> NormSweepRow:
        for r in self.rows:
            if r.selection.name == name:
                return r
        raise KeyError(f"no selection named {name!r}; have {[r.selection.name for r in self.rows]}")

    def to_dict(self) -> dict[str, Any]:
        return dict(kind="dark_matter_norms", label=self.label, d_in=self.d_in, notes=list(self.notes),
                    rows=[r.to_dict() for r in self.rows])

    def table(self, digits: int = 3) -> str:
        """A Markdown table: selection, held-out R² [95% CI] (n documents), difference vs reference, train R²."""
        f = f"{{:.{digits}f}}"
        lines = ["| selection | held-out R² [95% CI] | Δ vs reference [95% CI] | train R² | train tokens / dim | "
                 "top token / document share of Σ(y − ȳ)² |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            d = "—" if r.diff_vs_reference is None else (
                f"{f.format(r.diff_vs_reference.value)} [{f.format(r.diff_vs_reference.low)}, "
                f"{f.format(r.diff_vs_reference.high)}]")
            lines.append(f"| {r.selection.name} | {r.r2.format(digits)} | {d} | {f.format(r.r2_train)} | "
                         f"{r.tokens_per_dim:.0f} | {r.max_token_share:.2f} / {r.max_doc_share:.2f} |")
        return "\n".join(lines)

    def figure(self) -> Any:
        """Plotly: held-out R² per selection with 95% CIs over documents as error bars, train R² as markers."""
        import plotly.graph_objects as go

        names = [r.selection.name for r in self.rows]
        v = np.array([r.r2.value for r in self.rows])
        lo = np.array([r.r2.low for r in self.rows])
        hi = np.array([r.r2.high for r in self.rows])
        fig = go.Figure(go.Scatter(
            x=v.tolist(), y=names, mode="markers", name="held out (95% CI over documents)",
            error_x=dict(type="data", symmetric=False, array=(hi - v).tolist(), arrayminus=(v - lo).tolist()),
            text=[f"n = {r.r2.n} documents, {r.n_test_tokens} tokens" for r in self.rows],
            hovertemplate="%{y}<br>R² %{x:.3f}<br>%{text}<extra></extra>"))
        fig.add_trace(go.Scatter(x=[r.r2_train for r in self.rows], y=names, mode="markers",
                                 marker=dict(symbol="x"), name="training tokens"))
        title = "How predictable the SAE error norm is from x, by choice"
        fig.update_layout(template="plotly_white", title=title + (f" — {self.label}" if self.label else ""),
                          xaxis_title="R² of the norm target from x", yaxis_title="selection (one change from the "
                          "first row)", height=max(360, 40 * len(names) + 160))
        fig.update_yaxes(autorange="reversed")
        return fig


def _target(err_sq: np.ndarray, target: str) -> np.ndarray:
    if target == "sq":
        return err_sq
    if target == "norm":
        return np.sqrt(err_sq)
    if np.any(err_sq <= 0):
        raise ValueError(f"target 'log' needs ‖e‖² > 0 on every selected token; {int((err_sq <= 0).sum())} "
                         "token(s) have zero error: use target 'norm' or drop them")
    return 0.5 * np.log(err_sq)


def _doc_sums(y: np.ndarray, y_hat: np.ndarray, doc_pos: np.ndarray, n_units: int) -> np.ndarray:
    """(n_units, 4) per-document ``n, Σy, Σy², Σ(y − ŷ)²``; ``doc_pos`` maps each token to its unit slot."""
    out = np.zeros((n_units, 4))
    out[:, 0] = np.bincount(doc_pos, minlength=n_units)
    out[:, 1] = np.bincount(doc_pos, weights=y, minlength=n_units)
    out[:, 2] = np.bincount(doc_pos, weights=y * y, minlength=n_units)
    out[:, 3] = np.bincount(doc_pos, weights=(y - y_hat) ** 2, minlength=n_units)
    return out


def norm_predictability(x: Any, error_sq: Any, doc: Any, position: Any, is_test_doc: Any, *,
                        doc_domain: Sequence[str] | None = None,
                        selections: Sequence[NormSelection] = DEFAULT_SELECTIONS, n_boot: int = N_BOOT,
                        seed: int = 0, chunk_size: int = 8192, label: str = "") -> NormSweepResult:
    """R² of the SAE error norm from ``x`` on held-out documents, once per selection (module docstring).

    Parameters
    ----------
    x : tensor or array (n_tokens, d_in)
        The SAE's input activations (any float dtype; regressions run in float64).
    error_sq : tensor or array (n_tokens,)
        ``‖e‖² = ‖x − x̂‖²`` per token (e.g. :func:`sae_error_sq`).
    doc, position : int arrays (n_tokens,)
        Document index (0 … n_docs − 1) and position within the document of each token.
    is_test_doc : bool array (n_docs,)
        Held-out documents.
    doc_domain : sequence of str (n_docs,), optional
        ``"code"`` or ``"text"`` per document; needed by selections with ``domain != "mixed"``.
    selections : sequence of NormSelection
        The first is the reference the others are compared with (paired over documents).

    Returns
    -------
    NormSweepResult
    """
    X = torch.as_tensor(x)
    if X.ndim != 2:
        raise ValueError(f"x must be (n_tokens, d_in), got shape {tuple(X.shape)}")
    n, d_in = X.shape
    err = torch.as_tensor(error_sq).double().cpu().numpy().reshape(-1)
    doc = np.asarray(doc).reshape(-1).astype(np.int64)
    pos = np.asarray(position).reshape(-1).astype(np.int64)
    test_doc = np.asarray(is_test_doc, dtype=bool).reshape(-1)
    for name, a in (("error_sq", err), ("doc", doc), ("position", pos)):
        if len(a) != n:
            raise ValueError(f"{name} has {len(a)} entries for {n} tokens in x")
    if not np.all(np.isfinite(err)) or np.any(err < 0):
        raise ValueError("error_sq must be finite and >= 0 (squared error norms)")
    if n == 0 or doc.min() < 0 or doc.max() >= len(test_doc):
        raise ValueError(f"doc indices must lie in [0, {len(test_doc)}) (one is_test_doc entry per document)")
    if not selections:
        raise ValueError("selections is empty: give at least the reference selection")
    names = [s.name for s in selections]
    if len(set(names)) != len(names):
        raise ValueError(f"selection names must be unique, got {names}")
    domain = None if doc_domain is None else np.asarray(list(doc_domain))
    if domain is not None and len(domain) != len(test_doc):
        raise ValueError(f"doc_domain has {len(domain)} entries for {len(test_doc)} documents")
    if domain is None and any(s.domain != "mixed" for s in selections):
        raise ValueError("selections with domain 'code'/'text' need doc_domain (one 'code'/'text' per document)")

    test_tok = test_doc[doc]
    test_docs = np.nonzero(test_doc)[0]
    slot = np.full(len(test_doc), -1)
    slot[test_docs] = np.arange(len(test_docs))
    rng = np.random.default_rng(seed)
    notes: list[str] = []
    fits: list[tuple[NormSweepRow, np.ndarray]] = []
    for s in selections:
        keep = pos >= s.min_position
        if s.max_position is not None:
            keep &= pos < s.max_position
        if s.domain != "mixed":
            keep &= domain[doc] == s.domain
        tr = np.nonzero(keep & ~test_tok)[0]
        if s.drop_top and len(tr):
            thr = np.quantile(err[tr], 1 - s.drop_top)
            keep &= err <= thr
            tr = np.nonzero(keep & ~test_tok)[0]
        te = np.nonzero(keep & test_tok)[0]
        if s.max_train_tokens is not None and len(tr) > s.max_train_tokens:
            tr = np.sort(rng.choice(tr, s.max_train_tokens, replace=False))
        if len(tr) < 2 or len(te) < 2:
            raise ValueError(f"selection {s.name!r} leaves {len(tr)} training and {len(te)} held-out tokens: "
                             "too few to fit and score a regression")
        if len(tr) <= d_in:
            notes.append(f"{s.name}: {len(tr)} training tokens for {d_in} regressors: under-determined, the "
                         "minimum-norm solution is used")
        y = _target(err, s.target)
        est = StreamedLeastSquares(fit_intercept=s.fit_intercept, alpha=s.alpha)
        for i in range(0, len(tr), chunk_size):
            rows = torch.as_tensor(tr[i:i + chunk_size])
            est.partial_fit(X[rows].double(), torch.as_tensor(y[tr[i:i + chunk_size]]))
        y_hat = np.concatenate([est.predict(X[torch.as_tensor(te[i:i + chunk_size])].double()).cpu().numpy()
                                .reshape(-1) for i in range(0, len(te), chunk_size)])
        sums = _doc_sums(y[te], y_hat, slot[doc[te]], len(test_docs))
        used = sums[:, 0] > 0
        dev = (y[te] - y[te].mean()) ** 2
        doc_dev = np.bincount(slot[doc[te]], weights=dev, minlength=len(test_docs))
        sst = dev.sum()
        r2 = bootstrap_ci(sums[used], r2_from_doc_sums, n_boot=n_boot, seed=seed, unit="documents")
        row = NormSweepRow(selection=s, r2=r2, r2_train=float(est.train_r2_), diff_vs_reference=None,
                           n_train_tokens=len(tr), n_test_tokens=len(te),
                           n_train_docs=int(len(np.unique(doc[tr]))), tokens_per_dim=len(tr) / d_in,
                           max_token_share=float(dev.max() / sst) if sst > 0 else float("nan"),
                           max_doc_share=float(doc_dev.max() / sst) if sst > 0 else float("nan"))
        fits.append((row, sums))
    ref_sums = fits[0][1]
    for row, sums in fits[1:]:
        both = (sums[:, 0] > 0) | (ref_sums[:, 0] > 0)
        row.diff_vs_reference = paired_difference(sums[both], ref_sums[both], r2_from_doc_sums, n_boot=n_boot,
                                                  seed=seed, unit="documents")
    return NormSweepResult(rows=[r for r, _ in fits], d_in=int(d_in), label=label, notes=notes)

