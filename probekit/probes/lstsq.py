"""Least squares by streamed normal equations, and streamed R².

``StreamedLeastSquares`` solves ``W* = argmin_W ‖Y − X W − 1 bᵀ‖²`` (``b`` only with ``fit_intercept=True``) in
one pass over any number of rows: :meth:`~StreamedLeastSquares.partial_fit` adds one batch to running sums in
float64 on the batch's device (CPU or CUDA), and the solution is a Cholesky solve of the ``(d_x, d_x)`` Gram
matrix. Memory is ``O(d_x (d_x + d_y))`` whatever the number of rows, so it reads activations straight from the
cache (``DeviceCache.batches``) without ever holding the full matrix.

Numerics
--------
- Every batch is cast to float64 before its products are formed, so float32/bf16 activations are accumulated
  exactly as a float64 solver would see them.
- Sums are taken about a *shift* (the mean of the first batch), not about zero. The centred Gram matrix
  ``Σ (x − x̄)(x − x̄)ᵀ`` is then a difference of small numbers, not of two huge ones, which matters for residual
  streams whose means are large next to their spread; the raw Gram matrix (no intercept) is rebuilt exactly
  from the shifted sums.
- Solve: Cholesky of ``A = Gram + alpha · (tr(Gram) / d_x) · I`` (``alpha`` is a *relative* ridge, default 0).
  **Fallback, stated:** when the Cholesky factorisation fails, or its pivots say ``A`` is numerically singular
  (``(min diag L / max diag L)² ≤ rcond``, i.e. ``X`` has a direction with singular value below about
  ``sqrt(rcond)`` of the largest), the solution is ``pinv(A) B`` with the symmetric pseudo-inverse at relative
  cut-off ``rcond``: the *minimum-norm* least-squares solution (the one ``torch.linalg.lstsq`` with driver
  ``gelsd`` returns). A ``RuntimeWarning`` says so and ``solver_`` is ``"pinv"``.

R² (pinned definition)
----------------------
"Fraction of variance explained", pooled over output dimensions::

    R² = 1 − Σ_i ‖y_i − ŷ_i‖² / Σ_i ‖y_i − ȳ‖²

with ``ȳ`` the mean of the *evaluated* rows (centred, as :func:`sklearn.metrics.r2_score`). This is
``r2_score(..., multioutput="variance_weighted")`` exactly whenever every output has non-zero variance
(variance-weighting the per-output ``1 − sse_k / sst_k`` by ``sst_k`` gives ``1 − Σ sse / Σ sst``). Per-output
R² (``1 − sse_k / sst_k``) is ``multioutput="raw_values"``. Degenerate denominators follow scikit-learn's
``force_finite`` convention: a zero-variance target scores 1.0 if predicted exactly, else 0.0; but for the
pooled value the error of constant outputs is *kept* (scikit-learn's weighting drops it).

Example
-------
>>> import torch
>>> from probekit.probes.lstsq import StreamedLeastSquares
>>> X, W = torch.randn(1000, 8), torch.randn(8, 3)
>>> Y = X @ W + 0.01 * torch.randn(1000, 3)
>>> est = StreamedLeastSquares(fit_intercept=False).fit((X[i:i + 300], Y[i:i + 300]) for i in range(0, 1000, 300))
>>> est.coef_.shape, est.n_samples_seen_
(torch.Size([8, 3]), 1000)
>>> est.score(X, Y) > 0.99
True
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError

__all__ = ["StreamedLeastSquares", "R2Accumulator", "R2Score"]

_F64 = torch.float64


def _as_tensor(a: Any, name: str, device: torch.device | None = None) -> torch.Tensor:
    """``a`` as a float64 tensor on ``device`` (default: its own), 1-D or 2-D."""
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be real numbers, got dtype {t.dtype}")
    if t.ndim not in (1, 2):
        raise ValueError(f"{name} must be 1-D or 2-D (n_samples[, n_columns]); got shape {tuple(t.shape)}. "
                         "Flatten leading dims first, e.g. x.reshape(-1, x.shape[-1]).")
    return t.to(device=device if device is not None else t.device, dtype=_F64, non_blocking=True)


def _as_xy(X: Any, Y: Any, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    X = _as_tensor(X, "X", device)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n_samples, n_features); got shape {tuple(X.shape)}")
    Y = _as_tensor(Y, "Y", X.device)
    y1d = Y.ndim == 1
    if y1d:
        Y = Y[:, None]
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y have different numbers of rows: {X.shape[0]} vs {Y.shape[0]}")
    return X, Y, y1d


def _iter_xy(data: Any, Y: Any) -> Iterable[tuple[Any, Any]]:
    """``(X, Y)`` as one batch, or an iterable of ``(X, Y)`` batches when ``Y`` is None."""
    if Y is not None:
        return [(data, Y)]
    if isinstance(data, (torch.Tensor, np.ndarray)):
        raise TypeError("Y is missing: pass fit(X, Y) or an iterable of (X, Y) batches")
    return data


# ----------------------------------------------------------------------------------------------- R²


@dataclass(frozen=True)
class R2Score:
    """Streamed R² of one evaluation set (see the module docstring for the definition).

    Attributes
    ----------
    r2 : float
        Pooled ``1 − Σ sse / Σ sst`` (``nan`` for an empty set).
    r2_per_output : numpy.ndarray, shape (d_y,)
        ``1 − sse_k / sst_k`` per output (scikit-learn's ``force_finite`` convention at ``sst_k = 0``).
    sse, sst : numpy.ndarray, shape (d_y,), float64
        Residual and centred total sums of squares per output.
    n_samples : int
    """

    r2: float
    r2_per_output: np.ndarray
    sse: np.ndarray
    sst: np.ndarray
    n_samples: int

    def to_dict(self) -> dict[str, Any]:
        return {"r2": float(self.r2), "r2_per_output": self.r2_per_output.tolist(), "sse": self.sse.tolist(),
                "sst": self.sst.tolist(), "n_samples": int(self.n_samples)}


def _r2(sse: float, sst: float) -> float:
    if sst > 0:
        return 1.0 - sse / sst
    return 1.0 if sse == 0 else 0.0


class R2Accumulator:
    """One-pass R²: ``update(y, y_pred)`` per batch, then :meth:`result`.

    Keeps per-output ``Σ (y − ŷ)²``, ``Σ (y − c)`` and ``Σ (y − c)²`` in float64 (``c`` = mean of the first batch,
    so the centred total ``Σ (y − ȳ)² = Σ (y − c)² − n (ȳ − c)²`` does not cancel catastrophically).
    """

    def __init__(self) -> None:
        self.n = 0
        self._c: torch.Tensor | None = None

    def update(self, y: Any, y_pred: Any) -> "R2Accumulator":
        """Add one batch: ``y``, ``y_pred`` of shape (b, d_y) or (b,)."""
        y = _as_tensor(y, "y", self._c.device if self._c is not None else None)
        p = _as_tensor(y_pred, "y_pred", y.device)
        if y.ndim == 1:
            y = y[:, None]
        if p.ndim == 1:
            p = p[:, None]
        if y.shape != p.shape:
            raise ValueError(f"y and y_pred shapes differ: {tuple(y.shape)} vs {tuple(p.shape)}")
        if self._c is None:
            if y.shape[0] == 0:
                return self
            self._c = y.mean(0)
            self._s = torch.zeros_like(self._c)
            self._ss = torch.zeros_like(self._c)
            self._sse = torch.zeros_like(self._c)
        elif y.shape[1] != self._c.shape[0]:
            raise ValueError(f"y has {y.shape[1]} outputs, earlier batches had {self._c.shape[0]}")
        yc = y - self._c
        self._s += yc.sum(0)
        self._ss += (yc * yc).sum(0)
        self._sse += ((y - p) ** 2).sum(0)
        self.n += y.shape[0]
        return self

    def result(self) -> R2Score:
        if self._c is None:
            e = np.zeros(0)
            return R2Score(float("nan"), e, e, e, 0)
        m = self._s / self.n
        sst = (self._ss - self.n * m * m).clamp_min(0).cpu().numpy()
        sse = self._sse.cpu().numpy()
        per = np.array([_r2(a, b) for a, b in zip(sse, sst)])
        return R2Score(_r2(float(sse.sum()), float(sst.sum())), per, sse, sst, self.n)


# ----------------------------------------------------------------------------------------------- estimator


class StreamedLeastSquares(BaseEstimator):
    """Multi-output least squares ``Y ≈ X W + b`` by streamed normal equations.

    Parameters
    ----------
    fit_intercept : bool, default True
        Fit ``b`` (``intercept_``); otherwise ``b = 0``.
    alpha : float, default 0.0
        Relative ridge: ``alpha · tr(G) / d_x`` is added to the diagonal of the Gram matrix ``G`` (centred when
        ``fit_intercept``). The intercept is not penalised.
    rcond : float, default 1e-12
        Relative eigenvalue cut-off of ``G`` below which it counts as singular (see the module docstring).

    Attributes
    ----------
    coef_ : torch.Tensor, shape (d_x, d_y), float64
        ``W*``; on the device of the data.
    intercept_ : torch.Tensor, shape (d_y,), float64
        ``b`` (zeros when ``fit_intercept=False``).
    n_samples_seen_ : int
    n_features_in_ : int
        ``d_x``.
    n_targets_ : int
        ``d_y``.
    solver_ : {"cholesky", "pinv"}
        How the last solution was computed.
    train_r2_ : float
        Pooled R² on the accumulated (training) rows, from the sums alone.
    train_r2_per_output_ : numpy.ndarray, shape (d_y,)

    Notes
    -----
    ``fit_intercept``, ``alpha`` and ``rcond`` only enter the solve, which runs lazily on first access to a
    fitted attribute after new data; changing them with ``set_params`` re-solves from the same sums.
    Accumulators live on the device of the first batch; later batches are moved there. Not thread-safe.
    """

    def __init__(self, *, fit_intercept: bool = True, alpha: float = 0.0, rcond: float = 1e-12):
        self.fit_intercept = fit_intercept
        self.alpha = alpha
        self.rcond = rcond

    # ---------------------------------------------------------------------------------- accumulation

    def reset(self) -> "StreamedLeastSquares":
        """Forget all accumulated rows."""
        for k in ("n_samples_seen_", "n_features_in_", "n_targets_", "_acc", "_sol", "_y1d"):
            self.__dict__.pop(k, None)
        return self

    def partial_fit(self, X: Any, Y: Any) -> "StreamedLeastSquares":
        """Add one batch of rows.

        Parameters
        ----------
        X : tensor or array, shape (b, d_x)
        Y : tensor or array, shape (b, d_y) or (b,)
            A 1-D ``Y`` makes :meth:`predict` return 1-D.

        Raises
        ------
        ValueError
            If ``d_x`` or ``d_y`` differ from earlier batches, or the row counts of ``X`` and ``Y`` differ.
        """
        acc = getattr(self, "_acc", None)
        X, Y, y1d = _as_xy(X, Y, acc["cx"].device if acc is not None else None)
        if acc is None:
            if X.shape[0] == 0:
                return self
            acc = self._acc = {"cx": X.mean(0), "cy": Y.mean(0)}
            dx, dy = X.shape[1], Y.shape[1]
            for k, shape in (("sx", (dx,)), ("sy", (dy,)), ("sxx", (dx, dx)), ("sxy", (dx, dy)), ("syy", (dy,))):
                acc[k] = torch.zeros(shape, dtype=_F64, device=X.device)
            self.n_samples_seen_, self.n_features_in_, self.n_targets_, self._y1d = 0, dx, dy, y1d
        elif X.shape[1] != self.n_features_in_ or Y.shape[1] != self.n_targets_:
            raise ValueError(f"partial_fit: batch has X of width {X.shape[1]} and Y of width {Y.shape[1]}, but "
                             f"earlier batches had {self.n_features_in_} and {self.n_targets_}; call reset() "
                             "to start a new fit")
        xc, yc = X - acc["cx"], Y - acc["cy"]
        acc["sx"] += xc.sum(0)
        acc["sy"] += yc.sum(0)
        acc["sxx"].addmm_(xc.T, xc)
        acc["sxy"].addmm_(xc.T, yc)
        acc["syy"] += (yc * yc).sum(0)
        self.n_samples_seen_ += X.shape[0]
        self.__dict__.pop("_sol", None)
        return self

    def fit(self, X: Any, Y: Any = None) -> "StreamedLeastSquares":
        """Fit from scratch: ``fit(X, Y)``, or ``fit(batches)`` with an iterable of ``(X, Y)`` batches.

        Parameters
        ----------
        X : tensor or array, shape (n, d_x); or iterable of (X_b, Y_b)
        Y : tensor or array, shape (n, d_y) or (n,); None with an iterable of batches

        Returns
        -------
        self
        """
        self.reset()
        for xb, yb in _iter_xy(X, Y):
            self.partial_fit(xb, yb)
        if getattr(self, "_acc", None) is None:
            raise ValueError("fit: no rows were given")
        self._solve()
        return self

    # ---------------------------------------------------------------------------------- solve

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(G, B, yy, x_mean, y_mean)``: Gram ``(d_x, d_x)``, cross ``(d_x, d_y)``, ``Σ y_k²`` ``(d_y,)``,
        centred about the means when ``fit_intercept``, raw (about zero) otherwise."""
        a, n = self._acc, self.n_samples_seen_
        mx, my = a["sx"] / n, a["sy"] / n  # means of the shifted data
        if self.fit_intercept:
            G = a["sxx"] - n * torch.outer(mx, mx)
            B = a["sxy"] - n * torch.outer(mx, my)
            yy = a["syy"] - n * my * my
        else:
            cx, cy, sx, sy = a["cx"], a["cy"], a["sx"], a["sy"]
            G = a["sxx"] + torch.outer(cx, sx) + torch.outer(sx, cx) + n * torch.outer(cx, cx)
            B = a["sxy"] + torch.outer(cx, sy) + torch.outer(sx, cy) + n * torch.outer(cx, cy)
            yy = a["syy"] + 2 * cy * sy + n * cy * cy
        return G, B, yy, a["cx"] + mx, a["cy"] + my

    def _solve(self) -> dict[str, Any]:
        key = (self.fit_intercept, float(self.alpha), float(self.rcond))
        sol = getattr(self, "_sol", None)
        if sol is not None and sol["key"] == key:
            return sol
        if getattr(self, "_acc", None) is None:
            raise NotFittedError("StreamedLeastSquares is not fitted yet: call fit or partial_fit first")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        G, B, yy, xm, ym = self._stats()
        d = G.shape[0]
        A = G.clone()
        scale = float(torch.diagonal(G).sum()) / d
        if self.alpha:
            A.diagonal().add_(self.alpha * scale)
        L, info = torch.linalg.cholesky_ex(A)
        diag = torch.diagonal(L)
        ok = int(info) == 0 and scale > 0 and float((diag.min() / diag.max()) ** 2) > self.rcond
        if ok:
            W, solver = torch.cholesky_solve(B, L), "cholesky"
        else:
            warnings.warn(f"StreamedLeastSquares: the {d}x{d} Gram matrix is singular or numerically rank "
                          f"deficient (relative cut-off rcond={self.rcond:g}); solved with its pseudo-inverse, "
                          "giving the minimum-norm least-squares solution", RuntimeWarning, stacklevel=3)
            W, solver = torch.linalg.pinv(A, hermitian=True, rtol=self.rcond) @ B, "pinv"
        b = ym - xm @ W if self.fit_intercept else torch.zeros_like(ym)
        # training SSE from the sums: Σ y² − 2 wᵀB + wᵀ G w per output (G without the ridge)
        sse = (yy - 2 * (W * B).sum(0) + (W * (G @ W)).sum(0)).clamp_min(0)
        sst = self._acc["syy"] - self.n_samples_seen_ * (self._acc["sy"] / self.n_samples_seen_) ** 2
        sse_np, sst_np = sse.cpu().numpy(), sst.clamp_min(0).cpu().numpy()
        sol = {"key": key, "coef": W, "intercept": b, "solver": solver,
               "train_r2": _r2(float(sse_np.sum()), float(sst_np.sum())),
               "train_r2_per_output": np.array([_r2(a, c) for a, c in zip(sse_np, sst_np)])}
        self._sol = sol
        return sol

    @property
    def coef_(self) -> torch.Tensor:
        return self._solve()["coef"]

    @property
    def intercept_(self) -> torch.Tensor:
        return self._solve()["intercept"]

    @property
    def solver_(self) -> str:
        return self._solve()["solver"]

    @property
    def train_r2_(self) -> float:
        return self._solve()["train_r2"]

    @property
    def train_r2_per_output_(self) -> np.ndarray:
        return self._solve()["train_r2_per_output"]

    # ---------------------------------------------------------------------------------- predict / score

    def predict(self, X: Any) -> torch.Tensor:
        """``X W* + b``, computed in float64.

        Parameters
        ----------
        X : tensor or array, shape (n, d_x)

        Returns
        -------
        torch.Tensor, shape (n, d_y) (or (n,) when fitted on a 1-D ``Y``), on ``X``'s device; float64, or
        ``X``'s dtype when ``X`` is a floating tensor.
        """
        sol = self._solve()
        out_dtype = X.dtype if isinstance(X, torch.Tensor) and X.is_floating_point() else _F64
        Xt = _as_tensor(X, "X")
        if Xt.ndim != 2 or Xt.shape[1] != self.n_features_in_:
            raise ValueError(f"X must have shape (n, {self.n_features_in_}); got {tuple(Xt.shape)}")
        W, b = sol["coef"].to(Xt.device), sol["intercept"].to(Xt.device)
        P = torch.addmm(b, Xt, W)
        if self._y1d:
            P = P[:, 0]
        return P.to(out_dtype)

    def score_batches(self, batches: Iterable[tuple[Any, Any]]) -> R2Score:
        """Streamed R² over an iterable of ``(X, Y)`` batches (one pass; pooled and per output).

        Returns
        -------
        R2Score
        """
        acc = R2Accumulator()
        for xb, yb in batches:
            X, Y, _ = _as_xy(xb, yb, None)
            acc.update(Y, self.predict(X).reshape(Y.shape))
        return acc.result()

    def score(self, X: Any, Y: Any = None) -> float:
        """Pooled, centred R² ``1 − Σ‖y − ŷ‖² / Σ‖y − ȳ‖²`` on ``(X, Y)`` or on an iterable of batches.

        Equal to ``sklearn.metrics.r2_score(Y, ŷ, multioutput="variance_weighted")`` when no output is constant.
        Per-output values: ``score_batches(...).r2_per_output``.
        """
        return self.score_batches(_iter_xy(X, Y)).r2
