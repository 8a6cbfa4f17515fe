"""LinearScope on an image-to-image CNN: copy, move and template (METHODS.md §4, second finding).

For an image-to-image network (input and output ``h × w``) row ``p`` of ``A(x)`` is the input image of weights
that output pixel ``p`` reads; ``b(x)`` is the part of the output that does not depend on ``x`` linearly. The
paper describes *copy-move* (an output region copies a, possibly shifted, input region) and *template creation*
(output structure coming from ``b``). Per test patch ``x`` (float64, ``A`` by LinearScope's forward passes):

- **copy share**: the share of a row's energy ``Σ_q A_pq²`` within the ``(2r+1)²`` window centred on ``p``
  itself, averaged over rows (random rows: about ``(2r+1)² / (h w)``);
- **best window**: for offsets ``δ`` with ``‖δ‖∞ ≤ max_shift``, the window centred on ``p + δ`` (clipped at the
  border) holding the most row energy; **move fraction**: the share of rows that are concentrated elsewhere —
  their best window holds at least half their energy while their own window holds less than half (rows that
  read a shifted region; diffuse rows, such as random ones, are neither copies nor moves). Rows that are exactly
  zero (the output pixel reads no input) are left out of these three means;
- **diagonal gain**: the mean of ``A_pp`` (1 for an exact copy);
- **template share**: ``‖b‖² / ‖y‖²`` with ``y = f(x)`` (can exceed 1 when ``A x`` and ``b`` cancel), and
  ``‖b‖² / ‖y − x‖²``, the template's size against the change the network makes;
- PSNR of the output (clamped to [0, 1]) and of the input against the clean patch.

Every number is a mean over test patches with a 95% bootstrap interval (:mod:`probekit.stats`); comparisons with
random rows are paired over the same patches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..stats import N_BOOT, Estimate, bootstrap_ci, paired_difference
from .linearscope import LinearScope

__all__ = ["analyze_i2i", "I2IAnalysisResult", "window_energy"]

UNIT = "test patches"


def window_energy(E: np.ndarray, r: int) -> np.ndarray:
    """Energy in the ``(2r+1)²`` window centred on every pixel (zero outside the image).

    Parameters
    ----------
    E : ndarray of shape (m, h, w), non-negative
    r : int ≥ 0

    Returns
    -------
    ndarray of shape (m, h, w)
    """
    m, h, w = E.shape
    P = np.pad(E, ((0, 0), (r + 1, r), (r + 1, r)))
    C = P.cumsum(1).cumsum(2)
    k = 2 * r + 1
    return C[:, k:, k:] - C[:, :-k, k:] - C[:, k:, :-k] + C[:, :-k, :-k]


def _row_measures(A: np.ndarray, shape: tuple[int, int], r: int, max_shift: int) -> dict[str, float]:
    h, w = shape
    n = h * w
    E = (A ** 2).reshape(n, h, w)
    total = E.sum(axis=(1, 2))
    keep = np.flatnonzero(total > 0)  # a row of zeros reads nothing: no place to copy from
    if len(keep) == 0:
        raise ValueError("A(x) is zero: the output does not depend on the input at this x")
    S = window_energy(E[keep], r) / total[keep, None, None]
    pi, pj = np.divmod(keep, w)
    n = len(keep)
    own = S[np.arange(n), pi, pj]
    best = own.copy()
    for di in range(-max_shift, max_shift + 1):
        for dj in range(-max_shift, max_shift + 1):
            qi, qj = pi + di, pj + dj
            ok = (qi >= 0) & (qi < h) & (qj >= 0) & (qj < w)
            v = np.full(n, -1.0)
            v[ok] = S[np.flatnonzero(ok), qi[ok], qj[ok]]
            best = np.maximum(best, v)
    moved = (own < 0.5) & (best >= 0.5)
    return {"copy_share": float(own.mean()), "best_window_share": float(best.mean()),
            "move_fraction": float(moved.mean()), "diagonal_gain": float(np.diag(A).mean())}


@dataclass
class I2IAnalysisResult:
    """Copy, move and template measures of an image-to-image CNN on ``n`` test patches (module docstring).

    Attributes
    ----------
    shape : (h, w)
    window, max_shift : int
    measures : dict name -> ndarray (n,)
        ``copy_share``, ``best_window_share``, ``move_fraction``, ``diagonal_gain``, their ``random_*``
        counterparts for Gaussian random rows, ``template_share``, ``template_vs_change``.
    psnr : dict ``"network"``/``"input"`` -> ndarray (n,)
    jacobian_max_abs_diff : float
        ``max |A − J|`` over patches (float64 autograd Jacobian).
    example : dict
        ``index``, ``input``, ``clean``, ``output``, ``bias`` (images) and ``matrix`` (A) of one patch.
    """

    shape: tuple[int, int]
    window: int
    max_shift: int
    measures: dict[str, np.ndarray]
    psnr: dict[str, np.ndarray]
    jacobian_max_abs_diff: float
    example: dict[str, Any]
    seed: int = 0
    n_boot: int = N_BOOT
    model_info: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.psnr["network"])

    def estimates(self) -> dict[str, Estimate]:
        """Every measure with its interval, the paired differences against random rows and the PSNR gain."""
        ci = lambda v: bootstrap_ci(v, n_boot=self.n_boot, seed=self.seed, unit=UNIT)  # noqa: E731
        diff = lambda a, b: paired_difference(a, b, n_boot=self.n_boot, seed=self.seed, unit=UNIT)  # noqa: E731
        M = self.measures
        out = {k: ci(v) for k, v in M.items()}
        for k in ("copy_share", "best_window_share", "move_fraction"):
            out[f"{k}-random"] = diff(M[k], M[f"random_{k}"])
        out["psnr_network_db"] = ci(self.psnr["network"])
        out["psnr_input_db"] = ci(self.psnr["input"])
        out["psnr_gain_db"] = diff(self.psnr["network"], self.psnr["input"])
        return out

    def to_dict(self) -> dict[str, Any]:
        def lst(a):
            return np.asarray(a, dtype=np.float64).tolist()

        return {"shape": list(self.shape), "window": self.window, "max_shift": self.max_shift, "n": self.n,
                "seed": self.seed, "n_boot": self.n_boot, "model_info": self.model_info,
                "measures": {k: lst(v) for k, v in self.measures.items()},
                "psnr": {k: lst(v) for k, v in self.psnr.items()},
                "jacobian_max_abs_diff": self.jacobian_max_abs_diff,
                "example": {k: (lst(v) if isinstance(v, np.ndarray) else v) for k, v in self.example.items()},
                "estimates": {k: v.to_dict() for k, v in self.estimates().items()}}

    def figures(self) -> list[Any]:
        """The example patch with its template b, rows of A around a grid of pixels, the measures with CIs."""
        import plotly.graph_objects as go

        from .linearscope_sr_figures import heatmap_grid

        ex = self.example
        h, w = self.shape
        imgs = [np.asarray(ex[k]) for k in ("input", "clean", "output")]
        fig1 = heatmap_grid(imgs, ["input x (noisy)", "clean", "f(x) = A(x)x + b(x)"], 3,
                            f"Test patch {ex['index']}", "intensity", diverging=False, size=240)
        fig1.update_layout(coloraxis={"cmin": 0, "cmax": 1})
        fig2 = heatmap_grid([np.asarray(ex["bias"])], ["b(x)"], 1, f"Template b(x), patch {ex['index']}: share "
                            f"‖b‖²/‖y‖² = {float(self.measures['template_share'][ex['index']]):.3f}", "b(x)", size=300)
        A = np.asarray(ex["matrix"])
        pts = [(i, j) for i in (2, h // 2, h - 3) for j in (2, w // 2, w - 3)]
        fig3 = heatmap_grid([A[i * w + j].reshape(h, w) for i, j in pts], [f"output ({i},{j})" for i, j in pts], 3,
                            f"Rows of A(x), patch {ex['index']}: the input weights each output pixel reads",
                            "∂y_out/∂x_in")
        est = self.estimates()
        names = ["copy_share", "random_copy_share", "best_window_share", "move_fraction", "diagonal_gain",
                 "template_share", "template_vs_change"]
        fig4 = go.Figure(go.Bar(x=names, y=[est[k].value for k in names],
                                error_y={"type": "data", "symmetric": False,
                                         "array": [est[k].high - est[k].value for k in names],
                                         "arrayminus": [est[k].value - est[k].low for k in names]}))
        g = est["psnr_gain_db"]
        fig4.update_layout(title=f"Copy, move, template (mean, 95% CI, n={self.n} {UNIT}); denoising gain "
                                 f"{g.value:+.2f} dB [{g.low:+.2f}, {g.high:+.2f}]",
                           xaxis_title="measure", yaxis_title="value (shares in [0, 1])", template="plotly_white")
        return [fig1, fig2, fig3, fig4]


def analyze_i2i(model: nn.Module, x: torch.Tensor, clean: torch.Tensor, *, window: int = 1, max_shift: int = 4,
                seed: int = 0, n_boot: int = N_BOOT, example: int = 0,
                model_info: dict | None = None) -> I2IAnalysisResult:
    """Copy/move/template measures of an image-to-image network on test patches (module docstring).

    Parameters
    ----------
    model : nn.Module
        ``(N, 1, h, w) -> (N, 1, h, w)``, LinearScope-supported.
    x : Tensor of shape (n, 1, h, w)
        Inputs, one per unit.
    clean : Tensor of shape (n, 1, h, w)
        Targets, for PSNR.
    window, max_shift : int
        Window radius ``r`` and the largest offset searched for the best window.
    """
    from ..sr_cnn import psnr as psnr_fn

    if x.dim() != 4 or x.shape[1] != 1 or clean.shape != x.shape:
        raise ValueError(f"need x and clean of one shape (n, 1, h, w); got {tuple(x.shape)} and {tuple(clean.shape)}")
    if window < 0 or max_shift < 2 * window + 1:
        raise ValueError(f"need window ≥ 0 and max_shift ≥ 2·window + 1 (a non-overlapping window to move to); got "
                         f"window={window}, max_shift={max_shift}")
    n, h, w = x.shape[0], x.shape[2], x.shape[3]
    if not 0 <= example < n:
        raise ValueError(f"example={example} is not a patch index in [0, {n})")
    scope = LinearScope(model, dtype=torch.float64)
    net64 = scope.model
    X = x.double()
    with torch.no_grad():
        out = net64(X)
    names = ["copy_share", "best_window_share", "move_fraction", "diagonal_gain"]
    M = {k: np.empty(n) for k in names + [f"random_{k}" for k in names] + ["template_share", "template_vs_change"]}
    jac = 0.0
    ex: dict[str, Any] = {}
    for i in range(n):
        xi = X[i]
        A_t = scope.matrix(xi)
        J = torch.autograd.functional.jacobian(lambda z: net64(z[None])[0], xi, vectorize=True).reshape(A_t.shape)
        jac = max(jac, float((A_t - J).abs().max()))
        A, b = A_t.numpy(), scope.bias(xi).numpy()
        y = out[i].reshape(-1).numpy()
        R = np.random.default_rng([seed, i]).standard_normal(A.shape)
        for prefix, mat in (("", A), ("random_", R)):
            for k, v in _row_measures(mat, (h, w), window, max_shift).items():
                M[prefix + k][i] = v
        M["template_share"][i] = (b @ b) / (y @ y)
        change = y - xi.reshape(-1).numpy()
        M["template_vs_change"][i] = (b @ b) / max(change @ change, np.finfo(float).tiny)
        if i == example:
            ex = {"index": i, "input": xi[0].numpy().copy(), "clean": clean[i, 0].double().numpy(),
                  "output": out[i, 0].numpy().copy(), "bias": b.reshape(h, w), "matrix": A.copy()}
    psnr = {"network": psnr_fn(out.clamp(0, 1), clean), "input": psnr_fn(x.clamp(0, 1), clean)}
    return I2IAnalysisResult(shape=(h, w), window=window, max_shift=max_shift, measures=M, psnr=psnr,
                             jacobian_max_abs_diff=jac, example=ex, seed=seed, n_boot=n_boot,
                             model_info=dict(model_info or {}))
