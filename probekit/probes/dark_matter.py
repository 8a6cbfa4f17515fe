"""SAE dark matter: how much of a sparse autoencoder's error is a linear function of its input.

Engels, Riggs, Tegmark, "Decomposing the dark matter of sparse autoencoders" (TMLR 2025); METHODS.md §3.

For activations ``x`` (n, d_in), an SAE reconstruction ``x̂`` and its error ``e = x − x̂``:

- ``W* = argmin_W Σ ‖e − x W‖²`` by least squares on *training* tokens (no bias, as published;
  ``fit_intercept=True`` offers one), in one streamed pass (:class:`~probekit.probes.lstsq.StreamedLeastSquares`);
- on *held-out* tokens: linear error ``x W*``, nonlinear error ``e − x W*``; the fraction of error variance that is
  linearly predictable, ``R²(e | x)``; and the norm prediction ``R²(‖e‖² | x)`` (plus ``R²(‖e‖ | x)`` for context).

Pinned definitions (stated where METHODS leaves room)
-----------------------------------------------------
- R² is pooled and centred: ``1 − Σ_i ‖y_i − ŷ_i‖² / Σ_i ‖y_i − ȳ‖²`` with ``ȳ`` the held-out mean
  (:mod:`probekit.probes.lstsq`). It is ``nan`` when the target has no variance on the held-out tokens (e.g. a
  perfect SAE has ``e = 0``: there is nothing to explain); fractions of FVU are then 0, never ``0/0``.
- The norm regressions are ordinary linear regressions of the *scalar* ``‖e‖²`` (and ``‖e‖``) on ``x`` **with**
  an intercept, whatever ``fit_intercept`` says for the vector regression.
- FVU (METHODS §3): ``Σ ‖x − x̂‖² / Σ ‖x − x̄‖²``, centred about the held-out mean ``x̄``, so it is invariant to a
  common offset of ``x`` and ``x̂``.
- FVU split on held-out tokens, all over ``S = Σ ‖x − x̄‖²``::

      FVU = Σ‖xW*‖²/S  +  Σ‖e − xW*‖²/S  +  2 Σ⟨xW*, e − xW*⟩/S
            (linear)      (nonlinear)       (cross)

  On the training tokens the cross term is exactly zero (the least-squares residual is orthogonal to every
  column of ``x``, hence to ``xW*``); on held-out tokens it is small but not zero and is reported explicitly
  (``fvu_cross``) rather than folded into either part. With ``fit_intercept=True`` the linear error is
  ``xW* + b`` and the same holds.
- "Absent features" across widths (:func:`fvu_split_across_widths`): the part of the *linear* error that the
  largest SAE no longer makes, ``max(lin_w − lin_ref, 0)`` with ``ref`` the widest SAE. The paper's argument is
  that features a small SAE has not learned are read out linearly from ``x`` (so they sit in the linear error)
  and that the nonlinear error barely changes with width; the bars are then
  ``FVU_w = absent_w + (lin_w − absent_w) + nonlin_w + cross_w``, which sums exactly.

Batches: every function takes iterables that yield ``x`` tensors (b, d_in), or dicts from
:meth:`probekit.device_cache.DeviceCache.batches` with ``hook=`` naming the key. Each iterable is read once.
Held-out batches must come in a fixed order (``shuffle=False``) when per-token values are compared across SAEs.

The SAE is duck-typed: ``encode(x) -> f`` (..., d_sae), ``decode(f) -> x̂``, ``W_dec`` (d_sae, d_in) with unit-norm
rows, ``b_dec`` (d_in,), ``cfg.d_in``, ``cfg.d_sae``.

Example
-------
>>> from probekit.probes.dark_matter import error_decomposition                    # doctest: +SKIP
>>> res = error_decomposition(sae, dc.batches(hook, 4096, rows=train_rows),       # doctest: +SKIP
...                           dc.batches(hook, 4096, rows=test_rows), hook=hook)
>>> res.r2_error_vector, res.r2_error_norm_sq                                       # doctest: +SKIP
(0.5…, 0.9…)
>>> res.figures(hover_text=token_strings)                                           # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..jsonsafe import json_safe
from .lstsq import R2Accumulator, StreamedLeastSquares

__all__ = [
    "DarkMatterResult",
    "EarlierLayerResult",
    "FVUSplitAcrossWidths",
    "PerTokenScalingResult",
    "PursuitResult",
    "earlier_layer_prediction",
    "error_decomposition",
    "error_norm_scatter",
    "fvu_split_across_widths",
    "fvu_split_figure",
    "gradient_pursuit",
    "per_token_scaling",
    "pursuit_refit",
    "r2_bars_figure",
    "sae_reconstruct",
]

Reconstruct = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]


# ----------------------------------------------------------------------------------------------- helpers


def _x_of(batch: Any, hook: str | None) -> torch.Tensor:
    """The (b, d) float activations of one batch (a tensor, or a dict with ``hook``)."""
    if isinstance(batch, Mapping):
        if hook is None:
            raise ValueError(f"batches are dicts (keys {sorted(map(str, batch))}); pass hook= to pick one")
        batch = batch[hook]
    x = torch.as_tensor(batch)
    if x.ndim != 2:
        raise ValueError(f"expected x of shape (b, d_in), got {tuple(x.shape)}")
    return x if x.is_floating_point() and x.dtype != torch.bfloat16 and x.dtype != torch.float16 else x.float()


def _r2_or_nan(sse: float, sst: float) -> float:
    """R² with a zero-variance target reported as ``nan`` (undefined) instead of scikit-learn's 1/0."""
    return 1.0 - sse / sst if sst > 0 else float("nan")


def _ratio(a: float, b: float) -> float:
    """``a / b``; 0 when both are 0 (no error at all), nan when only ``b`` is."""
    if b > 0:
        return a / b
    return 0.0 if a == 0 else float("nan")


def _sq(t: torch.Tensor) -> float:
    return float(t.double().pow(2).sum())


def sae_reconstruct(sae: Any) -> Reconstruct:
    """``x -> (x̂, l0)`` for a duck-typed SAE: ``x̂ = decode(encode(x))``, ``l0`` (b,) the active latents per token."""

    # An SAE that normalises each input token (SAELens "layer_norm", "constant_norm_rescale") needs x to decode.
    takes_x = "x" in inspect.signature(sae.decode).parameters

    @torch.no_grad()
    def f(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = sae.encode(x)
        x_hat = sae.decode(codes, x=x) if takes_x else sae.decode(codes)
        return x_hat.to(x.dtype), (codes != 0).sum(-1)

    return f


class _MomentsX:
    """Streamed ``Σ ‖x − x̄‖²`` (shifted sums, as in R2Accumulator)."""

    def __init__(self) -> None:
        self.acc = R2Accumulator()

    def update(self, x: torch.Tensor) -> None:
        self.acc.update(x, x)

    def sst(self) -> float:
        r = self.acc.result()
        return float(r.sst.sum()) if r.n_samples else 0.0


# ----------------------------------------------------------------------------------------------- decomposition


@dataclass
class DarkMatterResult:
    """The linear / nonlinear decomposition of one SAE's error on held-out tokens.

    Attributes
    ----------
    n_train, n_test, d_in : int
    fit_intercept : bool
        Whether the vector regression ``e ~ x`` had a bias.
    fvu : float
        ``Σ ‖e‖² / Σ ‖x − x̄‖²`` on held-out tokens.
    fvu_linear, fvu_nonlinear, fvu_cross : float
        The split ``fvu = fvu_linear + fvu_nonlinear + fvu_cross`` (module docstring).
    r2_error_vector : float
        Pooled R² of ``e`` from ``x`` on held-out tokens: the fraction of error variance linearly predictable.
    r2_error_vector_train : float
        The same on the training tokens (from the normal-equation sums): an over-fitting check.
    r2_error_norm_sq, r2_error_norm : float
        R² of the scalar ``‖e‖²`` (and ``‖e‖``) from ``x`` with an intercept, held out.
    l0 : float or None
        Mean active latents per held-out token (None when the reconstruction does not report it).
    label : str
    notes : list of str
        Degenerate cases met (no error variance, ...).
    error_norm, error_norm_pred, nonlinear_norm : torch.Tensor, shape (n_test,), or None
        Per held-out token ``‖e‖``, its linear prediction from ``x``, and ``‖e − xW*‖`` (kept when
        ``keep_per_token``; not in :meth:`to_dict`).
    estimator : StreamedLeastSquares or None
        The fitted ``e ~ x`` regression (``coef_`` is ``W*``; not in :meth:`to_dict`).
    """

    n_train: int
    n_test: int
    d_in: int
    fit_intercept: bool
    fvu: float
    fvu_linear: float
    fvu_nonlinear: float
    fvu_cross: float
    r2_error_vector: float
    r2_error_vector_train: float
    r2_error_norm_sq: float
    r2_error_norm: float
    l0: float | None = None
    label: str = ""
    notes: list[str] = field(default_factory=list)
    error_norm: torch.Tensor | None = field(default=None, repr=False)
    error_norm_pred: torch.Tensor | None = field(default=None, repr=False)
    nonlinear_norm: torch.Tensor | None = field(default=None, repr=False)
    estimator: StreamedLeastSquares | None = field(default=None, repr=False)

    _ARRAYS = ("error_norm", "error_norm_pred", "nonlinear_norm", "estimator")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe scalars (per-token arrays and the estimator are left out)."""
        d = {k: v for k, v in asdict(self).items() if k not in self._ARRAYS}
        return json_safe(d)

    def _repr_html_(self) -> str:
        from ..html_page import html_table

        rows = [{"": "FVU (held out)", "value": self.fvu}, {"": "  linear error", "value": self.fvu_linear},
                {"": "  nonlinear error", "value": self.fvu_nonlinear}, {"": "  cross term", "value": self.fvu_cross},
                {"": "R² of e from x", "value": self.r2_error_vector}, {"": "R² of ‖e‖² from x",
                                                                        "value": self.r2_error_norm_sq},
                {"": "R² of ‖e‖ from x", "value": self.r2_error_norm}]
        return html_table(rows, caption=f"SAE dark matter {self.label} ({self.n_train} train / {self.n_test} "
                                        "held-out tokens)")

    def figures(self, hover_text: Sequence[str] | None = None, max_points: int = 5000) -> list[Any]:
        """Plotly figures: the FVU split, the R² bars, and (with per-token values) ‖e‖ predicted vs actual.

        Parameters
        ----------
        hover_text : sequence of str, length n_test, optional
            Shown on hover in the scatter (e.g. token strings with context).
        max_points : int
            The scatter shows an evenly spaced subset of at most this many tokens.
        """
        figs = [fvu_split_figure({self.label or "SAE": self}), r2_bars_figure({self.label or "SAE": self})]
        if self.error_norm is not None and self.error_norm_pred is not None:
            figs.append(error_norm_scatter(self.error_norm, self.error_norm_pred, hover_text=hover_text,
                                           max_points=max_points, title=f"‖e‖ predicted from x {self.label}"))
        return figs


def _decompose(reconstruct: Reconstruct, train_batches: Iterable[Any], test_batches: Iterable[Any], *,
               fit_intercept: bool, hook: str | None, keep_per_token: bool, label: str) -> DarkMatterResult:
    vec = StreamedLeastSquares(fit_intercept=fit_intercept)
    nrm = StreamedLeastSquares(fit_intercept=True)  # [‖e‖², ‖e‖] ~ x, always with an intercept
    d_in = None
    with torch.no_grad():
        for b in train_batches:
            x = _x_of(b, hook)
            e = x - reconstruct(x)[0]
            sq = e.double().pow(2).sum(-1)
            vec.partial_fit(x, e)
            nrm.partial_fit(x, torch.stack([sq, sq.sqrt()], 1))
            d_in = x.shape[1]
        if d_in is None:
            raise ValueError("error_decomposition: the training batches were empty")

        mom, r2e, r2n = _MomentsX(), R2Accumulator(), R2Accumulator()
        e_sq = lin_sq = nl_sq = cross = 0.0
        l0_sum, l0_n = 0.0, 0
        per: dict[str, list[torch.Tensor]] = {"error_norm": [], "error_norm_pred": [], "nonlinear_norm": []}
        for b in test_batches:
            x = _x_of(b, hook)
            x_hat, l0 = reconstruct(x)
            e = (x - x_hat).double()
            lin = vec.predict(x.double())
            nl = e - lin
            sq = e.pow(2).sum(-1)
            norms_pred = nrm.predict(x.double())
            mom.update(x)
            r2e.update(e, lin)
            r2n.update(torch.stack([sq, sq.sqrt()], 1), norms_pred)
            e_sq += float(sq.sum())
            lin_sq += _sq(lin)
            nl_sq += _sq(nl)
            cross += 2 * float((lin * nl).sum())
            if l0 is not None:
                l0_sum += float(l0.double().sum())
                l0_n += l0.numel()
            if keep_per_token:
                per["error_norm"].append(sq.sqrt().float().cpu())
                per["error_norm_pred"].append(norms_pred[:, 1].float().cpu())
                per["nonlinear_norm"].append(nl.norm(dim=-1).float().cpu())

    sst_x = mom.sst()
    if mom.acc.n == 0:
        raise ValueError("error_decomposition: the held-out batches were empty")
    re, rn = r2e.result(), r2n.result()
    notes = []
    if sst_x == 0:
        notes.append("x has no variance on the held-out tokens: FVU and its parts are undefined (nan)")
    if float(re.sst.sum()) == 0:
        notes.append("the SAE error has no variance on the held-out tokens (e.g. a perfect reconstruction): "
                     "R² of e is undefined (nan)")
    if float(rn.sst[0]) == 0:
        notes.append("‖e‖² is constant on the held-out tokens: its R² is undefined (nan)")
    return DarkMatterResult(
        n_train=vec.n_samples_seen_, n_test=mom.acc.n, d_in=d_in, fit_intercept=fit_intercept,
        fvu=_ratio(e_sq, sst_x), fvu_linear=_ratio(lin_sq, sst_x), fvu_nonlinear=_ratio(nl_sq, sst_x),
        fvu_cross=_ratio(cross, sst_x),
        r2_error_vector=_r2_or_nan(float(re.sse.sum()), float(re.sst.sum())),
        r2_error_vector_train=(vec.train_r2_ if float(vec._acc["syy"].sum()) > 0 else float("nan")),
        r2_error_norm_sq=_r2_or_nan(float(rn.sse[0]), float(rn.sst[0])),
        r2_error_norm=_r2_or_nan(float(rn.sse[1]), float(rn.sst[1])),
        l0=(l0_sum / l0_n if l0_n else None), label=label, notes=notes,
        estimator=vec, **{k: (torch.cat(v) if keep_per_token else None) for k, v in per.items()},
    )


def error_decomposition(sae: Any, train_batches: Iterable[Any], test_batches: Iterable[Any], *,
                        fit_intercept: bool = False, hook: str | None = None, keep_per_token: bool = True,
                        reconstruct: Reconstruct | None = None, label: str = "") -> DarkMatterResult:
    """Linear / nonlinear decomposition of an SAE's error (METHODS §3 "Decomposition").

    Parameters
    ----------
    sae : SAE-like
        ``encode``/``decode`` as in the module docstring (unused when ``reconstruct`` is given).
    train_batches, test_batches : iterable of tensor (b, d_in) or of dict
        Training tokens (to fit ``W*``) and held-out tokens (to evaluate); one pass each. Split by document.
    fit_intercept : bool, default False
        Bias in ``e ~ x`` (the published fit has none). The norm regressions always have one.
    hook : str, optional
        Key of ``x`` when batches are dicts (``DeviceCache.batches``).
    keep_per_token : bool, default True
        Keep per-token ``‖e‖``, predicted ``‖e‖`` and ``‖e − xW*‖`` (3 floats per held-out token).
    reconstruct : callable ``x -> (x̂, l0 or None)``, optional
        Replaces the SAE's own reconstruction (used by :func:`pursuit_refit`).
    label : str

    Returns
    -------
    DarkMatterResult
    """
    rec = reconstruct if reconstruct is not None else sae_reconstruct(sae)
    return _decompose(rec, train_batches, test_batches, fit_intercept=fit_intercept, hook=hook,
                      keep_per_token=keep_per_token, label=label)


# ----------------------------------------------------------------------------------------------- widths


@dataclass
class FVUSplitAcrossWidths:
    """FVU of SAEs of several widths split into absent features, linear and nonlinear error.

    Attributes
    ----------
    widths : list of int, ascending
    fvu, absent, linear, nonlinear, cross : list of float
        ``fvu = absent + linear + nonlinear + cross`` per width; ``absent = max(lin_w − lin_ref, 0)``,
        ``linear = lin_w − absent`` (module docstring).
    reference_width : int
    """

    widths: list[int]
    fvu: list[float]
    absent: list[float]
    linear: list[float]
    nonlinear: list[float]
    cross: list[float]
    reference_width: int

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))

    def figures(self, *, mode: str = "stacked", hook: str | None = None) -> list[Any]:
        """One plotly figure: the FVU per width, stacked into its parts or as a total (:func:`fvu_split_figure`).

        Parameters
        ----------
        mode : {"stacked", "total"}
        hook : str, optional
            Named in the title.
        """
        return [fvu_split_figure(self, mode=mode, hook=hook)]


def fvu_split_across_widths(results_by_width: Mapping[int, DarkMatterResult], *,
                            reference_width: int | None = None) -> FVUSplitAcrossWidths:
    """Split each width's FVU into "absent features", linear and nonlinear error.

    Definition (METHODS leaves it open): ``absent_w = max(lin_w − lin_ref, 0)``, the linearly predictable error
    that the reference SAE (default the widest) no longer makes: features the smaller dictionary lacks, which the
    paper argues are linear in ``x``. The remaining linear error is ``lin_w − absent_w``; the nonlinear error and
    the held-out cross term are as measured. By construction ``absent_ref = 0``.

    Parameters
    ----------
    results_by_width : mapping of int -> DarkMatterResult
        At least two widths, evaluated on the same held-out tokens.
    reference_width : int, optional
        Width whose linear error counts as "not absent" (default: the largest).
    """
    if len(results_by_width) < 2:
        raise ValueError("fvu_split_across_widths needs results for at least two widths")
    widths = sorted(results_by_width)
    ref = max(widths) if reference_width is None else reference_width
    if ref not in results_by_width:
        raise ValueError(f"reference_width {ref} is not among the widths {widths}")
    lin_ref = results_by_width[ref].fvu_linear
    out: dict[str, list[float]] = {k: [] for k in ("fvu", "absent", "linear", "nonlinear", "cross")}
    for w in widths:
        r = results_by_width[w]
        absent = max(r.fvu_linear - lin_ref, 0.0)
        for k, v in (("fvu", r.fvu), ("absent", absent), ("linear", r.fvu_linear - absent),
                     ("nonlinear", r.fvu_nonlinear), ("cross", r.fvu_cross)):
            out[k].append(v)
    return FVUSplitAcrossWidths(widths=widths, reference_width=ref, **out)


@dataclass
class PerTokenScalingResult:
    """How well one SAE's per-token error norm predicts another's.

    Attributes
    ----------
    widths : list of int
    r2 : numpy.ndarray, shape (k, k)
        ``r2[i, j]``: R² of ``‖e_j‖ ~ a + b ‖e_i‖`` over tokens (in-sample, 2 parameters).
    r2_with_nonlinear : numpy.ndarray, shape (k, k) or None
        ``‖e_j‖ ~ a + b ‖e_i‖ + c ‖nonlinear_i‖``.
    gain : numpy.ndarray, shape (k, k) or None
        ``r2_with_nonlinear − r2``.
    n_tokens : int
    """

    widths: list[int]
    r2: np.ndarray
    r2_with_nonlinear: np.ndarray | None
    gain: np.ndarray | None
    n_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))

    def figures(self) -> list[Any]:
        """Plotly heatmaps of ``r2`` (and of ``r2_with_nonlinear``)."""
        import plotly.graph_objects as go

        labels = [str(w) for w in self.widths]
        figs = []
        for name, m in (("‖e_i‖", self.r2), ("‖e_i‖ + ‖nonlinear_i‖", self.r2_with_nonlinear)):
            if m is None:
                continue
            fig = go.Figure(go.Heatmap(z=m, x=labels, y=labels, zmin=0, zmax=1, colorscale="Viridis",
                                       colorbar={"title": {"text": "R² (held out)"}},
                                       text=np.round(m, 3), texttemplate="%{text}",
                                       hovertemplate="from %{y} to %{x}: R² %{z:.4f}<extra></extra>"))
            fig.update_layout(title=f"R² of ‖e_j‖ predicted from {name} per token", template="plotly_white",
                              xaxis_title="predicted width j", yaxis_title="predictor width i")
            fig.update_xaxes(type="category")
            fig.update_yaxes(type="category")
            figs.append(fig)
        return figs


def _norms(t: Any) -> torch.Tensor:
    t = torch.as_tensor(t).double()
    return t.norm(dim=-1) if t.ndim == 2 else t.reshape(-1)


def _fit_r2(X: torch.Tensor, y: torch.Tensor) -> float:
    est = StreamedLeastSquares(fit_intercept=True).fit(X, y)
    r = est.score_batches([(X, y)])
    return _r2_or_nan(float(r.sse.sum()), float(r.sst.sum()))


def per_token_scaling(errors_by_width: Mapping[int, Any],
                      nonlinear_by_width: Mapping[int, Any] | None = None) -> PerTokenScalingResult:
    """R² matrix of predicting ``‖e_j‖`` from ``‖e_i‖`` per token across SAE widths (METHODS §3 "Follow-ups").

    Parameters
    ----------
    errors_by_width : mapping of int -> tensor, shape (n, d_in) or (n,)
        Per-token errors (norms are taken) or their norms, the same ``n`` tokens in the same order for every width.
    nonlinear_by_width : mapping of int -> tensor, shape (n, d_in) or (n,), optional
        Per-token nonlinear errors (or norms, e.g. ``DarkMatterResult.nonlinear_norm``); adds ``‖nonlinear_i‖`` as
        a second regressor.

    Returns
    -------
    PerTokenScalingResult
        In-sample fits with an intercept (2–3 parameters over ``n`` tokens, so in-sample ≈ held out). Constant
        targets give ``nan``.
    """
    widths = sorted(errors_by_width)
    if len(widths) < 2:
        raise ValueError("per_token_scaling needs at least two widths")
    norms = {w: _norms(errors_by_width[w]) for w in widths}
    n = {len(v) for v in norms.values()}
    if len(n) != 1:
        raise ValueError(f"every width needs the same tokens; got token counts {sorted(n)}")
    k = len(widths)
    r2 = np.full((k, k), np.nan)
    r2nl = np.full((k, k), np.nan) if nonlinear_by_width is not None else None
    for i, wi in enumerate(widths):
        xi = norms[wi][:, None]
        xi_nl = None
        if nonlinear_by_width is not None:
            if wi not in nonlinear_by_width:
                raise ValueError(f"nonlinear_by_width lacks width {wi}")
            xi_nl = torch.cat([xi, _norms(nonlinear_by_width[wi])[:, None]], 1)
        for j, wj in enumerate(widths):
            r2[i, j] = _fit_r2(xi, norms[wj])
            if xi_nl is not None:
                r2nl[i, j] = _fit_r2(xi_nl, norms[wj])
    return PerTokenScalingResult(widths=widths, r2=r2, r2_with_nonlinear=r2nl,
                                 gain=None if r2nl is None else r2nl - r2, n_tokens=n.pop())


# ----------------------------------------------------------------------------------------------- pursuit


@dataclass
class PursuitResult:
    """Greedy gradient-pursuit codes.

    Attributes
    ----------
    x_hat : torch.Tensor, shape (n, d_in)
        ``codes @ W_dec + b_dec``.
    indices : torch.Tensor, shape (n, T), long
        Atom chosen at each step; ``-1`` where the token had stopped, or re-chose an atom already in its support.
    values : torch.Tensor, shape (n, T)
        Final coefficient of that atom (0 where ``indices`` is -1).
    n_steps : torch.Tensor, shape (n,), long
    """

    x_hat: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    n_steps: torch.Tensor

    def dense(self, d_sae: int) -> torch.Tensor:
        """Codes as a dense (n, d_sae) tensor."""
        out = torch.zeros(self.indices.shape[0], d_sae, dtype=self.values.dtype, device=self.values.device)
        keep = self.indices >= 0
        rows = torch.arange(len(out), device=out.device)[:, None].expand_as(self.indices)
        out[rows[keep], self.indices[keep]] = self.values[keep]
        return out


def gradient_pursuit(x: torch.Tensor, W_dec: torch.Tensor, n_steps: int | torch.Tensor,
                     b_dec: torch.Tensor | None = None, *, chunk_size: int = 1024) -> PursuitResult:
    """Re-encode ``x`` with a fixed dictionary by greedy gradient pursuit (Blumensath & Davies 2008).

    Per token, starting from ``r = x − b_dec`` and empty support ``S``, each step: add the atom with the largest
    ``|⟨r, W_dec[i]⟩|`` to ``S``; take the gradient of ``½‖r‖²`` with respect to the codes on ``S``
    (``g = W_dec[S] r``), and step along it with the exact line-search step
    ``a = ‖g‖² / ‖g W_dec[S]‖²``; ``r ← r − a g W_dec[S]``. Codes are signed (no non-negativity).

    Parameters
    ----------
    x : torch.Tensor, shape (n, d_in)
    W_dec : torch.Tensor, shape (d_sae, d_in)
        Dictionary atoms as rows (unit norm for an SAE; any norm works).
    n_steps : int or torch.Tensor, shape (n,)
        Steps per token, e.g. the SAE's L0 on that token (``(sae.encode(x) != 0).sum(-1)``).
    b_dec : torch.Tensor, shape (d_in,), optional
    chunk_size : int
        Tokens per chunk (memory ``chunk_size × d_sae``).

    Returns
    -------
    PursuitResult
    """
    n, d_in = x.shape
    if W_dec.ndim != 2 or W_dec.shape[1] != d_in:
        raise ValueError(f"W_dec must be (d_sae, {d_in}); got {tuple(W_dec.shape)}")
    dt = torch.promote_types(x.dtype, torch.float32)
    D = W_dec.to(x.device, dt)
    steps = torch.as_tensor(n_steps, device=x.device).long().expand(n).clone()
    T = int(steps.max()) if n else 0
    b = torch.zeros(d_in, dtype=dt, device=x.device) if b_dec is None else b_dec.to(x.device, dt)
    x_hat = torch.empty(n, d_in, dtype=dt, device=x.device)
    indices = torch.full((n, T), -1, dtype=torch.long, device=x.device)
    values = torch.zeros(n, T, dtype=dt, device=x.device)
    for s in range(0, n, chunk_size):
        xs, st = x[s:s + chunk_size].to(dt), steps[s:s + chunk_size]
        m = len(xs)
        r = xs - b
        codes = torch.zeros(m, D.shape[0], dtype=dt, device=x.device)
        support = torch.zeros_like(codes, dtype=torch.bool)
        rows = torch.arange(m, device=x.device)
        for t in range(T):
            active = st > t
            if not bool(active.any()):
                break
            corr = r @ D.T                                           # (m, d_sae)
            pick = corr.abs().argmax(-1)
            new = active & ~support[rows, pick]
            indices[s + rows[new], t] = pick[new]
            support[rows[active], pick[active]] = True
            g = torch.where(support & active[:, None], corr, torch.zeros((), dtype=dt, device=x.device))
            dr = g @ D                                               # (m, d_in): change of x̂ per unit step
            den = dr.pow(2).sum(-1)
            a = torch.where(den > 0, g.pow(2).sum(-1) / den.clamp_min(torch.finfo(dt).tiny), 0.0)
            codes += a[:, None] * g
            r -= a[:, None] * dr
        x_hat[s:s + m] = codes @ D + b
        idx = indices[s:s + m]
        values[s:s + m] = torch.where(idx >= 0, codes.gather(1, idx.clamp_min(0)), 0.0)
    return PursuitResult(x_hat=x_hat.to(x.dtype), indices=indices, values=values, n_steps=steps)


def pursuit_refit(sae: Any, train_batches: Iterable[Any], test_batches: Iterable[Any], *,
                  fit_intercept: bool = False, hook: str | None = None, chunk_size: int = 1024,
                  keep_per_token: bool = True, label: str = "gradient pursuit") -> DarkMatterResult:
    """The decomposition again, with ``x̂`` from :func:`gradient_pursuit` on the SAE's decoder.

    Each token gets as many pursuit steps as the SAE's L0 on it (``(sae.encode(x) != 0).sum(-1)``). Compare
    ``fvu_nonlinear`` with :func:`error_decomposition`'s on the same batches (published: pursuit reduces the
    nonlinear error only slightly).
    """

    @torch.no_grad()
    def rec(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        l0 = (sae.encode(x) != 0).sum(-1)
        return gradient_pursuit(x, sae.W_dec, l0, sae.b_dec, chunk_size=chunk_size).x_hat, l0

    return _decompose(rec, train_batches, test_batches, fit_intercept=fit_intercept, hook=hook,
                      keep_per_token=keep_per_token, label=label)


# ----------------------------------------------------------------------------------------------- earlier layer


@dataclass
class EarlierLayerResult:
    """Predicting the SAE error at layer l from several sets of regressors.

    Attributes
    ----------
    sets : list of str
        Names of the regressor sets; ``"x"`` (this layer's input alone) is the baseline.
    regressors : dict of str -> list of str
    r2 : dict of str -> float
        Pooled held-out R² of ``e`` per set.
    fvu_nonlinear : dict of str -> float
        ``Σ ‖e − ê_set‖² / Σ ‖x − x̄‖²`` per set.
    nonlinear_reduction : dict of str -> float
        ``1 − fvu_nonlinear[set] / fvu_nonlinear["x"]``: the share of the baseline nonlinear error removed.
    n_train, n_test : int
    """

    sets: list[str]
    regressors: dict[str, list[str]]
    r2: dict[str, float]
    fvu_nonlinear: dict[str, float]
    nonlinear_reduction: dict[str, float]
    n_train: int
    n_test: int

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))

    def figures(self) -> list[Any]:
        import plotly.graph_objects as go

        fig = go.Figure(go.Bar(x=self.sets, y=[self.r2[s] for s in self.sets], name="R² of e"))
        fig.add_trace(go.Bar(x=self.sets, y=[self.nonlinear_reduction[s] for s in self.sets],
                             name="nonlinear error removed"))
        fig.update_layout(barmode="group", template="plotly_white", yaxis_title="fraction",
                          xaxis_title="regressors", title="SAE error predicted from earlier-layer regressors")
        return [fig]


def earlier_layer_prediction(sae: Any, train_batches: Iterable[Mapping[str, Any]],
                             test_batches: Iterable[Mapping[str, Any]], *, x_key: str = "x",
                             prev_key: str = "x_prev", regressor_sets: Mapping[str, Sequence[str]] | None = None,
                             fit_intercept: bool = False) -> EarlierLayerResult:
    """Predict the layer-l SAE error ``e = x − x̂`` from earlier-layer activations (concatenated regressors).

    Parameters
    ----------
    sae : SAE-like
        The layer-l SAE (its input is ``batch[x_key]``).
    train_batches, test_batches : iterable of dict
        Each batch maps ``x_key`` -> (b, d_in) and ``prev_key`` (and any other regressor) -> (b, d_k), rows
        aligned (e.g. ``DeviceCache.batches([prev_hook, hook], ...)`` with ``x_key=hook, prev_key=prev_hook``).
        The name ``"x_hat"`` refers to this layer's SAE output.
    regressor_sets : mapping of str -> sequence of str, optional
        Named sets of keys to concatenate. Default: ``{"x": [x_key], "previous layer": [prev_key],
        "x + previous layer": [x_key, prev_key]}``. The set ``"x"`` = ``[x_key]`` is always added (baseline).
        A set holding both ``x_key`` and ``"x_hat"`` is refused: ``e = x − x̂`` is then exactly linear.
    fit_intercept : bool, default False

    Returns
    -------
    EarlierLayerResult
    """
    sets = {"x": [x_key], "previous layer": [prev_key], "x + previous layer": [x_key, prev_key]} \
        if regressor_sets is None else {"x": [x_key], **{k: list(v) for k, v in regressor_sets.items()}}
    for name, keys in sets.items():
        if x_key in keys and "x_hat" in keys:
            raise ValueError(f"regressor set {name!r} holds both {x_key!r} and 'x_hat': e = x − x̂ is then "
                             "exactly linear in them (R² = 1 trivially)")
    rec = sae_reconstruct(sae)
    ests = {name: StreamedLeastSquares(fit_intercept=fit_intercept) for name in sets}

    def regressors(batch: Mapping[str, Any], x: torch.Tensor, x_hat: torch.Tensor, keys: Sequence[str]):
        cols = [x_hat if k == "x_hat" else (x if k == x_key else _x_of(batch[k], None).to(x.device)) for k in keys]
        return torch.cat([c.double() for c in cols], 1)

    with torch.no_grad():
        for b in train_batches:
            x = _x_of(b, x_key)
            x_hat = rec(x)[0]
            e = x - x_hat
            for name, keys in sets.items():
                ests[name].partial_fit(regressors(b, x, x_hat, keys), e)
        mom = _MomentsX()
        accs = {name: R2Accumulator() for name in sets}
        for b in test_batches:
            x = _x_of(b, x_key)
            x_hat = rec(x)[0]
            e = (x - x_hat).double()
            mom.update(x)
            for name, keys in sets.items():
                accs[name].update(e, ests[name].predict(regressors(b, x, x_hat, keys)))
    sst_x = mom.sst()
    res = {name: a.result() for name, a in accs.items()}
    r2 = {k: _r2_or_nan(float(r.sse.sum()), float(r.sst.sum())) for k, r in res.items()}
    nl = {k: _ratio(float(r.sse.sum()), sst_x) for k, r in res.items()}
    red = {k: (1.0 - v / nl["x"] if nl["x"] > 0 else float("nan")) for k, v in nl.items()}
    return EarlierLayerResult(sets=list(sets), regressors=sets, r2=r2, fvu_nonlinear=nl, nonlinear_reduction=red,
                              n_train=ests["x"].n_samples_seen_, n_test=mom.acc.n)


# ----------------------------------------------------------------------------------------------- figures


def fvu_split_figure(results: Mapping[str, DarkMatterResult] | FVUSplitAcrossWidths, *, mode: str = "stacked",
                     hook: str | None = None) -> Any:
    """Bars of the FVU per SAE, split into its parts (stacked) or as one total bar.

    Parameters
    ----------
    results : mapping of str -> DarkMatterResult, or FVUSplitAcrossWidths
        A mapping gives one bar per label, split into ``fvu_linear``, ``fvu_nonlinear`` and ``fvu_cross`` (total:
        ``fvu``). A :class:`FVUSplitAcrossWidths` gives one bar per width, split into ``absent``, ``linear``,
        ``nonlinear`` and ``cross`` (total: ``fvu``), the reference width named in the title.
    mode : {"stacked", "total"}
        Stacked bars of the parts, or one bar of the total FVU per SAE.
    hook : str, optional
        The hook the SAEs read, named in the title.
    """
    import plotly.graph_objects as go

    if mode not in ("stacked", "total"):
        raise ValueError(f"mode must be one of ['stacked', 'total'], not {mode!r}")
    if isinstance(results, FVUSplitAcrossWidths):
        x = [str(w) for w in results.widths]
        parts = [("absent features", results.absent), ("linear error", results.linear),
                 ("nonlinear error", results.nonlinear), ("cross term (held out)", results.cross)]
        total, xaxis = list(results.fvu), "SAE width (latents)"
        title = "SAE error split across widths"
        note = f" (absent = linear error above width {results.reference_width})"
    else:
        x = list(results)
        rs = list(results.values())
        parts = [(name, [getattr(r, attr) for r in rs])
                 for name, attr in (("linear error", "fvu_linear"), ("nonlinear error", "fvu_nonlinear"),
                                    ("cross term (held out)", "fvu_cross"))]
        total, xaxis = [r.fvu for r in rs], "SAE"
        title, note = "SAE error: linear and nonlinear parts", " (held-out tokens)"
    fig = go.Figure()
    for name, ys in parts if mode == "stacked" else [("FVU", total)]:
        fig.add_trace(go.Bar(x=x, y=list(ys), name=name))
    if hook:
        title += f" at {hook}"
    if mode == "stacked":  # the note explains the parts, which the total bar does not show
        title += note
    fig.update_layout(barmode="relative", template="plotly_white", xaxis_title=xaxis,
                      yaxis_title="fraction of variance unexplained", title=title)
    fig.update_xaxes(type="category")  # widths are labels, not positions on a number line
    return fig


def r2_bars_figure(results: Mapping[str, DarkMatterResult], *, xaxis_title: str = "SAE") -> Any:
    """Grouped bars: R² of the error vector, of ‖e‖² and of ‖e‖ from ``x``, per labelled result.

    Parameters
    ----------
    results : mapping of str -> DarkMatterResult
        Reads ``r2_error_vector``, ``r2_error_norm_sq`` and ``r2_error_norm`` of each; the keys label the bars.
    xaxis_title : str
        What the labels are (e.g. ``"SAE width"``).
    """
    import plotly.graph_objects as go

    x = [str(k) for k in results]
    fig = go.Figure()
    for name, attr in (("error vector e", "r2_error_vector"), ("‖e‖²", "r2_error_norm_sq"),
                       ("‖e‖", "r2_error_norm")):
        fig.add_trace(go.Bar(x=x, y=[getattr(r, attr) for r in results.values()], name=name))
    fig.update_layout(barmode="group", template="plotly_white", yaxis_title="R² from x (held out)",
                      xaxis_title=xaxis_title, title="How much of the SAE error is linearly predictable")
    fig.update_xaxes(type="category")
    fig.update_yaxes(range=[0, 1])
    return fig


def error_norm_scatter(actual: Any, predicted: Any, *, hover_text: Sequence[str] | None = None,
                       max_points: int = 5000, title: str = "‖e‖ predicted from x", diagonal: bool = True) -> Any:
    """Scatter of per-token ``‖e‖`` predicted (y) against actual (x), with caller-supplied hover text.

    Parameters
    ----------
    actual, predicted : tensor, array or list, shape (n,)
        Kept in float64, so the plotted values are the given ones.
    hover_text : sequence of str, length n, optional
    max_points : int
        Evenly spaced subset shown when ``n`` is larger.
    title : str
    diagonal : bool
        Add the dashed ``y = x`` reference line.
    """
    import plotly.graph_objects as go

    a = torch.as_tensor(actual, dtype=torch.float64).detach().cpu().numpy()
    p = torch.as_tensor(predicted, dtype=torch.float64).detach().cpu().numpy()
    if hover_text is not None and len(hover_text) != len(a):
        raise ValueError(f"hover_text has {len(hover_text)} entries for {len(a)} tokens")
    idx = np.unique(np.linspace(0, len(a) - 1, min(len(a), max_points)).round().astype(int)) if len(a) else []
    text = [str(hover_text[i]) for i in idx] if hover_text is not None else None
    # plain lists: plotly would otherwise ship float arrays base64-encoded to the app
    fig = go.Figure(go.Scattergl(x=a[idx].tolist(), y=p[idx].tolist(), mode="markers",
                                 marker={"size": 4, "opacity": 0.5},
                                 text=text, hovertemplate="%{text}<br>‖e‖ = %{x:.3f}<br>predicted %{y:.3f}"
                                 "<extra></extra>" if text else None, name="tokens"))
    if diagonal:
        hi = float(max(a.max(initial=0), p.max(initial=0))) or 1.0
        fig.add_trace(go.Scatter(x=[0, hi], y=[0, hi], mode="lines", line={"dash": "dash"}, name="y = x"))
    fig.update_layout(template="plotly_white", xaxis_title="‖e‖", yaxis_title="‖e‖ predicted from x",
                      title=title)
    return fig
