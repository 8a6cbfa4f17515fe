"""Linear probes on cached activations, and a per-layer probing sweep.

The probes follow scikit-learn estimator conventions (keyword-only constructor
arguments stored verbatim, ``fit`` returns ``self``, fitted attributes end in
``_``) so they work with :func:`sklearn.base.clone`, grid search and pipelines.

The logistic probe is fitted with full-batch L-BFGS in torch rather than with
:class:`sklearn.linear_model.LogisticRegression`: on the main workload (about
20k tokens x 576 features x 20 classes, 2 CPU cores) scikit-learn's lbfgs takes
4-7 s per fit on random data and far longer on real residual streams, which is
too slow for a 31-layer sweep. The torch solver minimises the same objective as
scikit-learn with ``C = 1 / alpha``, in whitened coordinates so that it needs
fewer iterations.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted

from ..jsonsafe import json_safe

__all__ = [
    "LinearProbe",
    "LayerProbeResult",
    "fit_layer_probes",
    "group_train_test_split",
    "load_probe",
    "save_probe",
]

ProbeKind = Literal["logistic", "ridge"]
_KINDS = ("logistic", "ridge")


# ---------------------------------------------------------------------------
# input conversion / validation
# ---------------------------------------------------------------------------


def _to_numpy(a: Any) -> np.ndarray:
    """Convert a tensor / array-like to numpy without copying when possible."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        # numpy has no bfloat16/float16 matmul worth using; go through float32.
        if a.is_floating_point() and a.dtype != torch.float64:
            a = a.to(torch.float32)
        return a.numpy()
    return np.asarray(a)


def _check_X(X: Any, *, name: str = "X") -> np.ndarray:
    """Return ``X`` as a C-contiguous finite float32 array of shape (n, d)."""
    X = _to_numpy(X)
    if X.dtype == object or not (
        np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.bool_)
    ):
        # ml_dtypes' bfloat16 is not np.number but converts fine.
        try:
            X = X.astype(np.float32)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{name} must be numeric (got dtype {X.dtype}); pass a float array or tensor."
            ) from exc
    if X.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D with shape (n_samples, n_features); got shape {X.shape}. "
            "Flatten the leading dims first, e.g. X.reshape(-1, X.shape[-1])."
        )
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {X.shape}); need at least one row and one column.")
    X = np.ascontiguousarray(X, dtype=np.float32)
    finite = np.isfinite(X)
    if not finite.all():
        bad_rows = int((~finite.all(axis=1)).sum())
        raise ValueError(
            f"{name} contains NaN or inf in {bad_rows} row(s); drop or impute them first, "
            f"e.g. keep = np.isfinite({name}).all(axis=1)."
        )
    return X


def _check_1d(a: Any, *, name: str) -> np.ndarray:
    a = _to_numpy(a)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D with shape (n_samples,); got shape {a.shape}.")
    return a


def _check_lengths(n: int, **arrays: np.ndarray | None) -> None:
    for name, a in arrays.items():
        if a is not None and len(a) != n:
            raise ValueError(
                f"{name} has {len(a)} rows but X has {n}; they must be aligned row-for-row "
                "(one label / group / token id per activation row)."
            )


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}.")


def _encode_labels(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(classes, y_idx)`` for classification labels ``y`` of shape (n,)."""
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all():
            raise ValueError("y contains NaN or inf; drop those rows before fitting.")
        if not np.all(y == np.round(y)):
            raise ValueError(
                "y looks continuous (non-integer floats) but kind='logistic' expects class "
                "labels; use kind='ridge' for regression targets or cast labels to int."
            )
    classes, y_idx = np.unique(y, return_inverse=True)
    return classes, y_idx.reshape(-1).astype(np.int64)


def _r2(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """R^2 averaged uniformly over outputs (scikit-learn's ``r2_score`` default)."""
    y_true = np.asarray(y_true, dtype=np.float64).reshape(len(y_true), -1)
    y_pred = np.asarray(y_pred, dtype=np.float64).reshape(len(y_pred), -1)
    ss_res = ((y_true - y_pred) ** 2).sum(axis=0)
    ss_tot = ((y_true - y_true.mean(axis=0)) ** 2).sum(axis=0)
    # Constant targets: perfect prediction scores 1, anything else 0 (as sklearn).
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(ss_tot > 0, 1.0 - ss_res / ss_tot, np.where(ss_res == 0, 1.0, 0.0))
    return float(r2.mean())


# ---------------------------------------------------------------------------
# solvers
# ---------------------------------------------------------------------------


def _fit_logistic_lbfgs(
    X: np.ndarray,
    y_idx: np.ndarray,
    n_classes: int,
    *,
    alpha: float,
    max_iter: int,
    tol: float,
) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Fit L2-penalised softmax regression with full-batch L-BFGS.

    Minimises ``mean_i logloss_i + alpha / (2 n) * ||W||^2`` (intercept not
    penalised), which is scikit-learn's ``C * sum_i logloss_i + ||W||^2 / 2``
    divided by ``C * n`` with ``C = 1 / alpha``. Binary problems use a single
    logit, as scikit-learn does, so ``coef`` has one row.

    L-BFGS runs in whitened coordinates ``W = P V`` with
    ``P = (Cov(X) + eps I)^(-1/2)``. This is an exact change of variables (same
    objective, same optimum) that removes the feature correlations which make
    residual-stream problems ill-conditioned, so far fewer iterations are needed.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features), float32
    y_idx : ndarray of shape (n_samples,), int64 in ``[0, n_classes)``
    n_classes : int

    Returns
    -------
    W : ndarray of shape (n_features, n_outputs)
    b : ndarray of shape (n_outputs,)
    n_iter : int
    grad_max : float
        Max-abs gradient of the objective w.r.t. ``(W, b)`` at the solution.
    """
    n, d = X.shape
    binary = n_classes == 2
    k = 1 if binary else n_classes
    counts = np.bincount(y_idx, minlength=n_classes).astype(np.float64)
    prior = np.log(np.maximum(counts, 0.5) / n)
    # Start the intercept at the class log-priors: the optimum for W = 0, so the
    # first iterations are spent on W rather than on learning the base rates.
    b0 = np.array([prior[1] - prior[0]]) if binary else prior - prior.mean()
    reg = alpha / (2.0 * n)

    # Centre internally (an exact reparametrisation of the intercept) so the
    # intercept decouples from W and the whitening below sees the covariance.
    mu = X.mean(axis=0, dtype=np.float64)
    Xc = X - mu.astype(np.float32) if np.abs(mu).max() > 0 else X
    cov = torch.from_numpy(Xc).T.matmul(torch.from_numpy(Xc)).double() / n
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp_min(0)
    # eps ~ the penalty's curvature keeps P bounded in directions the data does
    # not span (and with alpha=0 a tiny floor avoids division by zero).
    eps = 2 * reg + 1e-6 * float(evals.mean()) + 1e-12
    P = ((evecs * (evals + eps).rsqrt()) @ evecs.T).float()

    # inference_mode(False) + enable_grad: callers often hold activations under
    # torch.inference_mode(), where autograd would otherwise be off.
    with torch.inference_mode(False), torch.enable_grad():
        Xt = torch.from_numpy(Xc)
        target = torch.from_numpy(y_idx)
        target = target.to(torch.float32) if binary else target
        V = torch.zeros(d, k, dtype=torch.float32, requires_grad=True)
        b = torch.tensor(b0, dtype=torch.float32, requires_grad=True)

        def objective(W: torch.Tensor) -> torch.Tensor:
            logits = torch.addmm(b, Xt, W)
            if binary:
                loss = F.binary_cross_entropy_with_logits(logits[:, 0], target)
            else:
                loss = F.cross_entropy(logits, target)
            return loss + reg * W.pow(2).sum() if reg > 0 else loss

        opt = torch.optim.LBFGS(
            [V, b],
            lr=1.0,
            max_iter=max_iter,
            max_eval=2 * max_iter + 20,
            # Convergence is decided in the closure (below), not on the
            # whitened gradient L-BFGS sees.
            tolerance_grad=0.0,
            # Absolute change in a float32 O(1) loss; smaller is round-off.
            tolerance_change=1e-7,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            W = P @ V
            W.retain_grad()
            loss = objective(W)
            loss.backward()
            # Stop on scikit-learn's criterion, max |grad| w.r.t. the original
            # weights: the whitened gradient is much smaller along high-variance
            # directions and would stop L-BFGS early. Zeroing the gradient
            # L-BFGS sees makes its own optimality test fire at this point.
            if max(float(W.grad.abs().max()), float(b.grad.abs().max())) <= tol:
                V.grad.zero_()
                b.grad.zero_()
            return loss

        opt.step(closure)
        n_iter = int(opt.state[V].get("n_iter", 0))

        W = (P @ V).detach().requires_grad_(True)
        b.grad = None
        objective(W).backward()
        grad_max = max(float(W.grad.abs().max()), float(b.grad.abs().max()))
        W64 = W.detach().numpy().astype(np.float64)
        b64 = b.detach().numpy().astype(np.float64) - mu @ W64
        return W64, b64, n_iter, grad_max


def _fit_ridge_closed_form(X: np.ndarray, Y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Solve ``min ||Y - X W - b||^2 + alpha ||W||^2`` (scikit-learn's Ridge objective).

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    Y : ndarray of shape (n_samples, n_outputs)

    Returns
    -------
    W : ndarray of shape (n_features, n_outputs)
    b : ndarray of shape (n_outputs,)
    """
    # float64 normal equations: d is small (hundreds), so this is cheap and
    # avoids float32 round-off in X^T X when features have large dynamic range.
    X64 = X.astype(np.float64)
    x_mean = X64.mean(axis=0)
    y_mean = Y.mean(axis=0)
    Xc = X64 - x_mean
    gram = Xc.T @ Xc
    gram[np.diag_indices_from(gram)] += alpha
    rhs = Xc.T @ (Y - y_mean)
    try:
        W = np.linalg.solve(gram, rhs)
    except np.linalg.LinAlgError:
        # Only reachable with alpha == 0 and collinear features.
        W = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    b = y_mean - x_mean @ W
    return W, b


# ---------------------------------------------------------------------------
# estimator
# ---------------------------------------------------------------------------


class LinearProbe(BaseEstimator):
    """Linear probe: multinomial logistic regression or ridge regression.

    Parameters
    ----------
    kind : {"logistic", "ridge"}, default="logistic"
        ``"logistic"`` for class labels (L2-penalised softmax regression, a
        single logit for two classes), ``"ridge"`` for real-valued targets.
    alpha : float, default=1.0
        L2 regularisation strength (>= 0). For ``"logistic"`` this is
        scikit-learn's ``1 / C``; for ``"ridge"`` it is scikit-learn's Ridge
        ``alpha``. With ``standardize=True`` the penalty acts on the weights
        of the z-scored features.
    standardize : bool, default=True
        Z-score each feature with training mean and std before fitting.
        Residual streams of pre-norm LMs have a few dimensions that are orders
        of magnitude larger than the rest; without this they dominate both the
        penalty and the optimiser's conditioning.
    max_iter : int, default=100
        Maximum L-BFGS iterations (logistic only).
    tol : float, default=1e-4
        Stop when the max-abs gradient of the per-sample averaged objective
        w.r.t. the (standardized-space) weights and intercept falls below this,
        as scikit-learn's lbfgs ``tol`` (logistic only).
    random_state : int or None, default=None
        Unused by the current solvers, which are deterministic (zero-initialised
        L-BFGS, closed-form ridge); accepted so sweep code can pass one
        uniformly.

    Attributes
    ----------
    coef_ : ndarray of shape (n_outputs, n_features)
        Weights in the *input* feature space, so the decision function is
        ``X @ coef_.T + intercept_``. ``n_outputs`` is 1 for binary logistic,
        ``n_classes`` for multiclass, the number of targets for ridge.
        Multiply by ``scale_`` to get weights on the standardized features.
    intercept_ : ndarray of shape (n_outputs,)
    classes_ : ndarray of shape (n_classes,)
        Sorted class labels (logistic only).
    mean_ : ndarray of shape (n_features,)
        Training feature means (zeros when ``standardize=False``).
    scale_ : ndarray of shape (n_features,)
        Training feature stds, 1 for constant features (ones when
        ``standardize=False``).
    n_features_in_ : int
    n_iter_ : int
        L-BFGS iterations run (0 for ridge).

    Examples
    --------
    >>> probe = LinearProbe(kind="logistic", alpha=1.0).fit(X_train, y_train)
    >>> probe.score(X_test, y_test)
    """

    def __init__(
        self,
        *,
        kind: ProbeKind = "logistic",
        alpha: float = 1.0,
        standardize: bool = True,
        max_iter: int = 100,
        tol: float = 1e-4,
        random_state: int | None = None,
    ) -> None:
        self.kind = kind
        self.alpha = alpha
        self.standardize = standardize
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state

    # -- fitting -----------------------------------------------------------

    def fit(self, X: Any, y: Any) -> LinearProbe:
        """Fit the probe.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
            Any float dtype (bfloat16/float16 are converted to float32).
        y : array-like or torch.Tensor
            Class labels of shape (n_samples,) for ``"logistic"``; targets of
            shape (n_samples,) or (n_samples, n_outputs) for ``"ridge"``.

        Returns
        -------
        self : LinearProbe
        """
        _check_kind(self.kind)
        if not (isinstance(self.alpha, numbers.Real) and self.alpha >= 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a finite float >= 0, got {self.alpha!r}.")
        X = _check_X(X)
        n, d = X.shape
        y = _to_numpy(y)
        _check_lengths(n, y=y)

        if self.standardize:
            # torch's var_mean is a stable one-pass float32 reduction; numpy's
            # float64 std would materialise a float64 copy of X (slow at 20k x 576).
            var_t, mean_t = torch.var_mean(torch.from_numpy(X), dim=0, correction=0)
            mean, std = mean_t.double().numpy(), var_t.double().sqrt().numpy()
            # Constant features: leave them unscaled (as StandardScaler does);
            # "constant" = zero, or below float32 resolution of the feature's mean.
            std = np.where((std > 0) & (std > 1e-6 * np.abs(mean)), std, 1.0)
            Xs = ((X - mean.astype(np.float32)) / std.astype(np.float32)).astype(np.float32, copy=False)
        else:
            mean, std, Xs = np.zeros(d), np.ones(d), X

        if self.kind == "logistic":
            y = _check_1d(y, name="y")
            classes, y_idx = _encode_labels(y)
            if len(classes) < 2:
                raise ValueError(
                    f"y has a single class ({classes[0]!r}); a classifier needs at least 2. "
                    "Check the labels, or the train split if you split by group."
                )
            if not (isinstance(self.max_iter, (int, np.integer)) and self.max_iter >= 1):
                raise ValueError(f"max_iter must be an int >= 1, got {self.max_iter!r}.")
            W, b, n_iter, grad_max = _fit_logistic_lbfgs(
                Xs, y_idx, len(classes), alpha=float(self.alpha), max_iter=int(self.max_iter), tol=float(self.tol)
            )
            if n_iter >= self.max_iter and grad_max > self.tol:
                warnings.warn(
                    f"LinearProbe L-BFGS did not converge in max_iter={self.max_iter} iterations "
                    f"(max |grad| = {grad_max:.2g} > tol = {self.tol:g}); increase max_iter or alpha.",
                    ConvergenceWarning,
                    stacklevel=2,
                )
            self.classes_ = classes
            self.n_iter_ = n_iter
            self._y_1d = True
        else:
            if y.ndim not in (1, 2):
                raise ValueError(f"y must have shape (n_samples,) or (n_samples, n_outputs); got {y.shape}.")
            try:
                Y = y.astype(np.float64).reshape(n, -1)
            except (TypeError, ValueError) as exc:
                raise TypeError(
                    f"kind='ridge' needs numeric targets, got dtype {y.dtype}; "
                    "use kind='logistic' for class labels."
                ) from exc
            if not np.isfinite(Y).all():
                raise ValueError("y contains NaN or inf; drop those rows before fitting.")
            W, b = _fit_ridge_closed_form(Xs, Y, float(self.alpha))
            self._y_1d = y.ndim == 1
            self.n_iter_ = 0

        # Fold the standardisation into the weights so coef_ lives in input space.
        self.coef_ = (W / std[:, None]).T
        self.intercept_ = b - (mean / std) @ W
        self.mean_ = mean
        self.scale_ = std
        self.n_features_in_ = d
        return self

    # -- inference ---------------------------------------------------------

    def _validate_for_predict(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "coef_")
        X = _check_X(X)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features but the probe was fitted on {self.n_features_in_}; "
                "pass activations from the same layer/hook as in fit."
            )
        return X

    def decision_function(self, X: Any) -> np.ndarray:
        """Raw linear outputs (logits for logistic, predictions for ridge).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_outputs)
        """
        X = self._validate_for_predict(X)
        # Re-standardise exactly as in fit instead of using coef_ directly: with
        # float32 inputs and features of scale 1e4, X @ coef_ + intercept_ loses
        # precision to cancellation.
        Xs = (X - self.mean_.astype(np.float32)) / self.scale_.astype(np.float32)
        W_std = (self.coef_ * self.scale_).T.astype(np.float32)
        b_std = self.intercept_ + self.mean_ @ self.coef_.T
        return (Xs @ W_std).astype(np.float64) + b_std

    def predict(self, X: Any) -> np.ndarray:
        """Predict class labels (logistic) or targets (ridge).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,), or (n_samples, n_outputs) for
        multi-output ridge.
        """
        scores = self.decision_function(X)
        if self.kind == "ridge":
            return scores[:, 0] if self._y_1d else scores
        if scores.shape[1] == 1:
            return self.classes_[(scores[:, 0] > 0).astype(np.int64)]
        return self.classes_[scores.argmax(axis=1)]

    def _check_proba(self) -> bool:
        if self.kind != "logistic":
            raise AttributeError(
                f"predict_proba is only available for kind='logistic' (this probe is kind={self.kind!r}); "
                "use predict() for ridge outputs."
            )
        return True

    # available_if: hasattr(probe, "predict_proba") is False for ridge, as
    # scikit-learn's meta-estimators (e.g. for ROC scoring) expect.
    @available_if(_check_proba)
    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (logistic only).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
            Columns follow ``classes_``; rows sum to 1.
        """
        scores = self.decision_function(X)
        if scores.shape[1] == 1:
            p1 = 1.0 / (1.0 + np.exp(-scores[:, 0]))
            return np.stack([1.0 - p1, p1], axis=1)
        scores = scores - scores.max(axis=1, keepdims=True)
        e = np.exp(scores)
        return e / e.sum(axis=1, keepdims=True)

    def score(self, X: Any, y: Any) -> float:
        """Accuracy (logistic) or R^2 averaged over outputs (ridge).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, n_features)
        y : array-like or torch.Tensor of shape (n_samples,) or (n_samples, n_outputs)

        Returns
        -------
        float
        """
        y = _to_numpy(y)
        pred = self.predict(X)
        _check_lengths(len(pred), y=y)
        if self.kind == "logistic":
            return float(np.mean(pred == _check_1d(y, name="y")))
        return _r2(y, pred)


# ---------------------------------------------------------------------------
# saving (safetensors, never pickle)
# ---------------------------------------------------------------------------

_FORMAT = "probekit.LinearProbe/1"


def save_probe(probe: LinearProbe, path: Any) -> None:
    """Write a fitted probe to ``path`` (safetensors): weights, intercept, standardisation and classes.

    Tensors: ``coef`` (n_outputs, d) and ``intercept`` (n_outputs,) float64 in input space, ``mean`` and
    ``scale`` (d,) float64 (the standardisation :meth:`LinearProbe.decision_function` re-applies), and for
    logistic probes with numeric labels ``classes`` (n_classes,). The constructor parameters, ``n_iter_`` and
    non-numeric class labels (as JSON) go into the file's string metadata.
    """
    import json

    from safetensors.numpy import save_file

    check_is_fitted(probe, "coef_")
    tensors = {k: np.ascontiguousarray(getattr(probe, k + "_"), dtype=np.float64)
               for k in ("coef", "intercept", "mean", "scale")}
    meta = {"format": _FORMAT, "params": json.dumps(json_safe(probe.get_params())),
            "n_iter": str(int(probe.n_iter_)), "y_1d": str(bool(probe._y_1d))}
    if probe.kind == "logistic":
        classes = np.asarray(probe.classes_)
        if np.issubdtype(classes.dtype, np.number) or np.issubdtype(classes.dtype, np.bool_):
            tensors["classes"] = np.ascontiguousarray(classes)
        else:
            meta["classes_json"] = json.dumps([str(c) for c in classes])
    save_file(tensors, str(path), metadata=meta)


def load_probe(path: Any) -> LinearProbe:
    """Read a probe written by :func:`save_probe`; it predicts exactly as the saved one.

    Raises ``ValueError`` naming the file when it is not a saved probe.
    """
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a saved LinearProbe (metadata format {meta.get('format')!r}, "
                             f"expected {_FORMAT!r}); write it with probekit.probes.linear.save_probe.")
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    missing = {"coef", "intercept", "mean", "scale"} - set(arrays)
    if missing:
        raise ValueError(f"{path} lacks the tensor(s) {sorted(missing)}; write it again with save_probe.")
    probe = LinearProbe(**json.loads(meta["params"]))
    # fit leaves coef_ Fortran-ordered (a transpose); keep that layout so that BLAS sums in the same order and
    # the loaded probe's outputs are bit-identical to the fitted one's.
    probe.coef_, probe.intercept_ = np.asfortranarray(arrays["coef"]), arrays["intercept"]
    probe.mean_, probe.scale_ = arrays["mean"], arrays["scale"]
    probe.n_features_in_ = int(probe.coef_.shape[1])
    probe.n_iter_ = int(meta.get("n_iter", 0))
    probe._y_1d = meta.get("y_1d", "True") == "True"
    if probe.kind == "logistic":
        if "classes" in arrays:
            probe.classes_ = arrays["classes"]
        elif "classes_json" in meta:
            probe.classes_ = np.asarray(json.loads(meta["classes_json"]))
        else:
            raise ValueError(f"{path} is a logistic probe without classes; write it again with save_probe.")
    return probe


# ---------------------------------------------------------------------------
# splitting
# ---------------------------------------------------------------------------


def group_train_test_split(
    groups: Any, *, test_size: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices so that no group (e.g. document id) is on both sides.

    Tokens of one document are strongly correlated; letting a document sit on
    both sides of the split inflates test scores.

    Groups are shuffled with ``seed`` and moved to the test side until it holds
    at least ``test_size`` of the rows, keeping at least one group per side.

    Parameters
    ----------
    groups : array-like or torch.Tensor of shape (n_samples,)
        Group id of each row (any hashable/sortable dtype).
    test_size : float, default=0.2
        Target fraction of *rows* in the test split, in (0, 1).
    seed : int, default=0

    Returns
    -------
    train_idx : ndarray of shape (n_train,), int64, sorted
    test_idx : ndarray of shape (n_test,), int64, sorted
    """
    groups = _check_1d(groups, name="groups")
    if not 0.0 < float(test_size) < 1.0:
        raise ValueError(f"test_size must be a fraction in (0, 1), got {test_size!r}.")
    uniq, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    if len(uniq) < 2:
        raise ValueError(
            f"group_train_test_split needs at least 2 distinct groups, got {len(uniq)}; "
            "pass a per-row document id (not a constant)."
        )
    order = np.random.default_rng(seed).permutation(len(uniq))
    cum = np.cumsum(counts[order])
    target = float(test_size) * len(groups)
    # Smallest prefix of shuffled groups covering the target, clipped so that
    # both sides keep at least one group.
    n_test_groups = int(np.searchsorted(cum, target, side="left")) + 1
    n_test_groups = min(max(n_test_groups, 1), len(uniq) - 1)
    is_test_group = np.zeros(len(uniq), dtype=bool)
    is_test_group[order[:n_test_groups]] = True
    is_test = is_test_group[inv]
    return np.flatnonzero(~is_test).astype(np.int64), np.flatnonzero(is_test).astype(np.int64)


# ---------------------------------------------------------------------------
# layer sweep
# ---------------------------------------------------------------------------


@dataclass
class LayerProbeResult:
    """Scores of one linear probe per layer, with controls.

    Attributes
    ----------
    task : str
        Name of the probed property.
    kind : str
        ``"logistic"`` or ``"ridge"``.
    metric : str
        ``"accuracy"`` (logistic) or ``"r2"`` (ridge); all scores use it.
    layers : list of str, length n_layers
    train_score, test_score : list of float, length n_layers
    majority_baseline : float
        Test score of predicting the train majority class (ridge: the train mean).
    random_feature_control : list of float, length n_layers
        Test score of the same probe trained on iid Gaussian features of the
        same shape (fixed seed): what the probe achieves with no information.
    token_identity_control : float or None
        Test score of predicting each test token's most frequent train label
        given its token id (ridge: its mean train target), falling back to the
        majority; how much of the label is token identity. None if no
        ``token_ids`` were given.
    n_train, n_test : int
    n_classes : int or None
        None for ridge.
    alpha : float
    seed : int
    """

    task: str
    kind: str
    metric: str
    layers: list[str]
    train_score: list[float]
    test_score: list[float]
    majority_baseline: float
    random_feature_control: list[float]
    token_identity_control: float | None = None
    n_train: int = 0
    n_test: int = 0
    n_classes: int | None = None
    alpha: float = 1.0
    seed: int = 0

    @property
    def best_layer(self) -> str:
        """Name of the layer with the highest test score."""
        return self.layers[int(np.argmax(self.test_score))]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (python floats/ints/str/lists/None only)."""
        return json_safe(asdict(self))

    def __repr__(self) -> str:
        return (f"LayerProbeResult(task={self.task!r}, kind={self.kind!r}, best_layer={self.best_layer!r}, "
                f"best_test={max(self.test_score):.3f}, n_train={self.n_train}, n_test={self.n_test})")

    def _repr_html_(self) -> str:
        from probekit.html_page import html_table

        rows = [{"layer": l, f"test {self.metric}": te, f"train {self.metric}": tr, "random features": rf}
                for l, te, tr, rf in zip(self.layers, self.test_score, self.train_score, self.random_feature_control)]
        extra = f"majority {self.majority_baseline:.3f}"
        if self.token_identity_control is not None:
            extra += f", token identity {self.token_identity_control:.3f}"
        return html_table(rows, caption=f"{self.task} ({extra})")

    def figures(self, *, show: Sequence[str] = ("train", "controls"), model: str = "") -> list[Any]:
        """One plotly line figure: test score per layer, with the chosen extra curves.

        Reads ``layers``, ``test_score``, ``train_score``, ``random_feature_control``, ``majority_baseline``,
        ``token_identity_control`` (skipped when None), ``metric``, ``kind``, ``task``, ``n_train``, ``n_test``.

        Parameters
        ----------
        show : collection of str
            ``"train"`` adds the train score; ``"controls"`` adds the random-feature curve and the constant
            majority (ridge: train-mean) and token-identity baselines. Default: both.
        model : str
            Model name put in front of the title (the result itself does not record it).

        Returns
        -------
        list of plotly.graph_objects.Figure
        """
        import plotly.graph_objects as go

        x = [str(l) for l in self.layers]
        label = "accuracy" if self.metric == "accuracy" else "R²"
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=x, y=list(self.test_score), mode="lines+markers", name=f"test {label}"))
        if "train" in show:
            fig.add_trace(go.Scatter(x=x, y=list(self.train_score), mode="lines", name=f"train {label}",
                                     line={"dash": "dot"}, opacity=0.5))
        if "controls" in show:
            if self.random_feature_control:
                fig.add_trace(go.Scatter(x=x, y=list(self.random_feature_control), mode="lines",
                                         name="random-feature control", line={"dash": "dash", "color": "gray"}))
            # constant baselines as traces (not shapes) so they appear in the legend
            majority = "majority baseline" if self.kind == "logistic" else "train-mean baseline"
            for name, value, line in ((majority, self.majority_baseline, {"dash": "dash", "color": "black"}),
                                      ("token-identity control", self.token_identity_control,
                                       {"dash": "dashdot", "color": "firebrick"})):
                if value is not None:
                    fig.add_trace(go.Scatter(x=x, y=[value] * len(x), mode="lines", name=name, line=line))
        title = f"Linear probe {label} per layer ({self.kind})"
        if model:
            title = f"{model}: {title}"
        if self.task:
            title += f" — {self.task}"
        fig.update_layout(title=f"{title}  (n_train={self.n_train}, n_test={self.n_test})", xaxis_title="layer",
                          yaxis_title=f"test {label}", template="plotly_white",
                          legend={"orientation": "h", "y": -0.25}, margin={"t": 60})
        fig.update_xaxes(type="category")
        if self.metric == "accuracy":  # R² has no upper range worth fixing
            fig.update_yaxes(range=[0, 1.02])
        return [fig]


def _token_identity_predict(
    tok_train: np.ndarray, y_train: np.ndarray, tok_test: np.ndarray, *, kind: str, n_classes: int
) -> np.ndarray:
    """Predict test targets from token id alone, fitted on the train split.

    ``y_train`` is class indices (logistic) or a float array of shape
    (n_train, n_outputs) (ridge). Unseen test tokens get the train majority /
    train mean.
    """
    uniq, tr_inv = np.unique(tok_train, return_inverse=True)
    tr_inv = tr_inv.reshape(-1)
    pos = np.searchsorted(uniq, tok_test)
    pos_c = np.minimum(pos, len(uniq) - 1)
    seen = uniq[pos_c] == tok_test
    if kind == "logistic":
        counts = np.zeros((len(uniq), n_classes), dtype=np.int64)
        np.add.at(counts, (tr_inv, y_train), 1)
        per_token = counts.argmax(axis=1)  # ties -> lowest class index
        fallback = np.bincount(y_train, minlength=n_classes).argmax()
        return np.where(seen, per_token[pos_c], fallback)
    sums = np.zeros((len(uniq), y_train.shape[1]))
    np.add.at(sums, tr_inv, y_train)
    per_token = sums / np.bincount(tr_inv, minlength=len(uniq))[:, None]
    return np.where(seen[:, None], per_token[pos_c], y_train.mean(axis=0))


def fit_layer_probes(
    features: Mapping[Any, Any],
    y: Any,
    groups: Any,
    *,
    kind: ProbeKind = "logistic",
    alpha: float = 1.0,
    standardize: bool = True,
    max_iter: int = 100,
    test_size: float = 0.2,
    seed: int = 0,
    token_ids: Any | None = None,
    task: str = "",
    progress: bool = True,
    keep_probes: bool = False,
) -> LayerProbeResult:
    """Fit one linear probe per layer on a shared group-wise train/test split.

    Parameters
    ----------
    features : mapping of layer name -> array-like or torch.Tensor of shape (n_tokens, d)
        Activations per layer, rows aligned across layers. ``d`` may differ
        between layers. Converted to float32 one layer at a time.
    y : array-like or torch.Tensor of shape (n_tokens,)
        Class labels (logistic) or targets, shape (n_tokens,) or
        (n_tokens, n_outputs) (ridge).
    groups : array-like or torch.Tensor of shape (n_tokens,)
        Document id of each token; no document is on both sides of the split.
    kind, alpha, standardize, max_iter
        Passed to :class:`LinearProbe`.
    test_size : float, default=0.2
        Fraction of tokens (approximately, whole groups) in the test split.
    seed : int, default=0
        Seeds the split and the random-feature control.
    token_ids : array-like or torch.Tensor of shape (n_tokens,), optional
        Token id of each row; enables the token-identity control.
    task : str, default=""
        Name of the probed property (used in titles and ``to_dict``).
    progress : bool, default=True
        Show a tqdm progress bar over layers.
    keep_probes : bool, default=False
        Keep each layer's fitted probe and its test predictions on the result,
        as the attributes ``probes_`` (layer -> :class:`LinearProbe`),
        ``test_index_`` (ndarray (n_test,) of row indices into ``y``) and
        ``test_pred_`` (layer -> ndarray (n_test,) of predictions). They are
        not part of :meth:`LayerProbeResult.to_dict`.

    Returns
    -------
    LayerProbeResult
        Scores (and with ``keep_probes`` the probes and test predictions).
    """
    from tqdm.auto import tqdm

    _check_kind(kind)
    if not isinstance(features, Mapping) or len(features) == 0:
        raise ValueError("features must be a non-empty mapping {layer_name: (n_tokens, d) array}.")
    y = _to_numpy(y)
    groups = _check_1d(groups, name="groups")
    n = len(groups)
    _check_lengths(n, y=y)
    tok = None if token_ids is None else _check_1d(token_ids, name="token_ids")
    _check_lengths(n, token_ids=tok)

    train_idx, test_idx = group_train_test_split(groups, test_size=test_size, seed=seed)
    y_tr, y_te = y[train_idx], y[test_idx]

    def make_probe() -> LinearProbe:
        return LinearProbe(kind=kind, alpha=alpha, standardize=standardize, max_iter=max_iter, random_state=seed)

    # Baselines that do not depend on features.
    if kind == "logistic":
        y = _check_1d(y, name="y")
        classes, y_idx = _encode_labels(y)
        n_classes: int | None = len(classes)
        yi_tr, yi_te = y_idx[train_idx], y_idx[test_idx]
        majority = float(np.mean(yi_te == np.bincount(yi_tr, minlength=n_classes).argmax()))
        if tok is not None:
            pred = _token_identity_predict(tok[train_idx], yi_tr, tok[test_idx], kind=kind, n_classes=n_classes)
            token_ctrl: float | None = float(np.mean(pred == yi_te))
        else:
            token_ctrl = None
    else:
        n_classes = None
        Y = np.asarray(y, dtype=np.float64).reshape(n, -1)
        majority = _r2(Y[test_idx], np.broadcast_to(Y[train_idx].mean(axis=0), Y[test_idx].shape))
        if tok is not None:
            pred = _token_identity_predict(tok[train_idx], Y[train_idx], tok[test_idx], kind=kind, n_classes=0)
            token_ctrl = _r2(Y[test_idx], pred)
        else:
            token_ctrl = None

    layers: list[str] = []
    train_scores: list[float] = []
    test_scores: list[float] = []
    random_ctrl: list[float] = []
    random_cache: dict[int, float] = {}  # control depends only on d (same shape, same seed)
    kept: dict[str, LinearProbe] = {}
    test_pred: dict[str, np.ndarray] = {}

    not_converged: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        # Collect per-layer convergence warnings and emit one summary below
        # instead of one per layer.
        warnings.simplefilter("always", ConvergenceWarning)
        for name, feats in tqdm(features.items(), total=len(features), desc=f"probing {task or kind}", disable=not progress):
            X = _check_X(feats, name=f"features[{name!r}]")
            if X.shape[0] != n:
                raise ValueError(
                    f"features[{name!r}] has {X.shape[0]} rows but y/groups have {n}; "
                    "all layers must hold the same tokens in the same order."
                )
            n_warn = len(caught)
            probe = make_probe().fit(X[train_idx], y_tr)
            if any(issubclass(w.category, ConvergenceWarning) for w in caught[n_warn:]):
                not_converged.append(str(name))
            layers.append(str(name))
            train_scores.append(probe.score(X[train_idx], y_tr))
            test_scores.append(probe.score(X[test_idx], y_te))
            if keep_probes:
                kept[str(name)] = probe
                test_pred[str(name)] = probe.predict(X[test_idx])
            d = X.shape[1]
            del X
            if d not in random_cache:
                R = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
                ctrl = make_probe().fit(R[train_idx], y_tr)
                random_cache[d] = ctrl.score(R[test_idx], y_te)
                del R
            random_ctrl.append(random_cache[d])
    for w in caught:
        # Re-emit anything that is not a per-layer convergence warning.
        if not issubclass(w.category, ConvergenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not_converged:
        warnings.warn(
            f"L-BFGS hit max_iter={max_iter} before tol on {len(not_converged)}/{len(layers)} layers "
            f"({', '.join(not_converged[:5])}{', ...' if len(not_converged) > 5 else ''}); "
            "scores are usually stable by then, but raise max_iter or alpha to be sure.",
            ConvergenceWarning,
            stacklevel=2,
        )

    result = LayerProbeResult(
        task=task,
        kind=kind,
        metric="accuracy" if kind == "logistic" else "r2",
        layers=layers,
        train_score=train_scores,
        test_score=test_scores,
        majority_baseline=float(majority),
        random_feature_control=random_ctrl,
        token_identity_control=token_ctrl,
        n_train=int(len(train_idx)),
        n_test=int(len(test_idx)),
        n_classes=n_classes,
        alpha=float(alpha),
        seed=int(seed),
    )
    if keep_probes:
        result.probes_, result.test_index_, result.test_pred_ = kept, test_idx, test_pred
    return result
