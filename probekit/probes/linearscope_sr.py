"""LinearScope on a super-resolution CNN: is ``A(x)`` a wavelet-like operator? (METHODS.md §4, second finding.)

Navarrete Michelini et al. (ICCV 2019) read the columns (one per input pixel) and rows (one per output pixel) of
``A(x)`` of super-resolution and image-to-image CNNs as images, find them localised and oscillating like wavelets,
and find that the top singular vectors of ``A(x)`` form a wavelet-like basis. :func:`analyze_sr` measures that on
``n`` test patches, each its own ``x`` (the unit of every interval: a test patch, METHODS.md §5).

Per patch ``x`` (LR ``s × s``, HR output ``2s × 2s``; ``A`` is ``(4 s², s²)``, computed in float64 by LinearScope's
batched forward passes, ``A = U diag(σ) Vᵀ``):

- **Exactness.** ``max |A − J|`` with ``J`` the autograd Jacobian (equal for a ReLU network) and
  ``max |A x + b − f(x)|``.
- **PSNR** of the network (output clamped to [0, 1]) and of nearest, bilinear and bicubic upsampling.
- **Operator energy** (``operator_out``): the share of ``‖A‖²_F`` kept when the columns of ``A`` are projected on
  ``k`` atoms of an orthonormal basis of HR images, the best ``k`` atoms for that ``A``:
  ``Σ_{top-k j} ‖B_j A‖² / ‖A‖²_F``. For the SVD basis this is ``Σ_{i≤k} σ_i² / Σ σ_i²``, the optimum over all
  ``k``-dimensional subspaces (Eckart–Young), so ``svd − basis ≥ 0`` always and the question is how close a basis
  comes. Bases: Haar, Daubechies db2 (periodization, orthonormal), the 2-D DCT (a global Fourier-type foil) and a
  random orthonormal basis (drawn per patch). ``operator_in``: the same on the rows of ``A`` with LR bases.
- **Image energy** (``image``): the share of the centred output ``y − mean(y)`` (the constant is one atom of
  every wavelet basis and would dominate) captured by the first ``k`` left singular vectors of ``A(x)`` (in σ
  order, as the paper reads them) against the ``k`` largest coefficients of each basis (best ``k``-term).
  The SVD basis spans only the ``s²``-dimensional range of ``A``; ``b`` may lie partly outside it.
- **Wavelet-likeness** of the top ``k_headline`` singular vectors, rows and columns: effective support
  (participation ratio / length: small = localised) and level-1 Haar detail fraction (high = oscillating at the
  pixel scale), against Gaussian random vectors of the same size (≈ 1/3 and 3/4) drawn per patch; for rows
  (columns) also the share of energy in the ``(2r+1)²`` LR (``(4r+2)²`` HR) window around the pixel's own place.
  *Sparsity* of the top left singular vectors in each basis: the share of ``‖u_i‖²`` in its ``atoms`` largest
  coefficients (a wavelet-like vector is sparse in a wavelet basis, a Fourier-like one in the DCT).
- **Template share**: ``‖b‖² / ‖y‖²``, the output energy that does not depend on ``x`` linearly (can exceed 1
  when ``A x`` and ``b`` cancel).

The verdict (:attr:`SRAnalysisResult.verdict`) splits the claim into three paired comparisons at ``k_headline``,
each holding when its 95% paired-bootstrap interval excludes 0 in the stated direction:

1. *captures energy like wavelets*: the best Haar and db2 atoms each keep more of ``‖A‖²_F`` than random atoms
   and no less than DCT atoms (interval of wavelet − DCT not wholly below 0);
2. *localised*: the top left singular vectors have a smaller effective support than random vectors;
3. *oscillating*: their level-1 detail fraction exceeds that of the output images they build;
4. *wavelet-sparse*: they keep more energy in their ``atoms`` largest Haar or db2 coefficients than in their
   ``atoms`` largest DCT coefficients, and more than in a random basis.

These criteria are this module's operational reading of the paper's qualitative statement, not the paper's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..image_bases import (best_k_fraction, dct_basis, detail_fraction, effective_support, random_basis,
                           wavelet_basis)
from ..stats import N_BOOT, Estimate, bootstrap_ci, paired_difference
from .linearscope import LinearScope

__all__ = ["analyze_sr", "SRAnalysisResult", "BASES", "MEASURES", "UPSAMPLERS"]

#: Bases compared, in figure order; "svd" is the singular basis of each patch's own A(x).
BASES = ("svd", "haar", "db2", "dct", "random")
MEASURES = ("operator_out", "operator_in", "image")
UPSAMPLERS = ("network", "bicubic", "bilinear", "nearest")
UNIT = "test patches"


def _bases(shape: tuple[int, int], seed) -> dict[str, np.ndarray]:
    return {"haar": wavelet_basis(shape, "haar"), "db2": wavelet_basis(shape, "db2"), "dct": dct_basis(shape),
            "random": random_basis(shape[0] * shape[1], seed)}


def _window_fraction(M: np.ndarray, shape: tuple[int, int], centres: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Per row of ``M`` (m, h w): share of its energy in rows/cols ``[c + lo, c + hi]`` around ``centres`` (m, 2)."""
    h, w = shape
    E = (M ** 2).reshape(-1, h, w)
    r = np.arange(h)[None, :, None]
    c = np.arange(w)[None, None, :]
    cr, cc = centres[:, 0, None, None], centres[:, 1, None, None]
    mask = (r >= cr + lo) & (r <= cr + hi) & (c >= cc + lo) & (c <= cc + hi)
    return (E * mask).sum(axis=(1, 2)) / E.sum(axis=(1, 2))


@dataclass
class SRAnalysisResult:
    """LinearScope of a super-resolution CNN on ``n`` test patches (see the module docstring).

    Per-patch arrays have ``n`` rows; ``ks`` indexes the last axis of the energy arrays.

    Attributes
    ----------
    lr_shape, hr_shape : tuple of int
        ``(s, s)`` and ``(2s, 2s)``.
    ks : tuple of int
    k_headline : int
        The ``k`` of the headline numbers and of the wavelet-likeness of the top singular vectors.
    window : int
        Localisation radius ``r`` in LR pixels.
    psnr : dict upsampler -> ndarray (n,)
    energy : dict measure -> dict basis -> ndarray (n, len(ks))
    likeness : dict name -> ndarray (n,)
        ``{sv_left,sv_right,rows,cols,random_hr,random_lr}_{support,detail}``, ``image_detail``,
        ``{rows,cols,random_rows,random_cols}_window``, ``template_share``,
        ``sv_left_sparsity_{haar,db2,dct,random}``.
    atoms : int
        Coefficients kept in the sparsity measure.
    sv_index_detail, sv_index_support : ndarray (n, s²)
        Detail fraction / effective support of every left singular vector, by index.
    jacobian_max_abs_diff, reconstruction_max_abs_err : float
        Over all patches: ``max |A − J|`` and ``max |A x + b − f(x)|`` (float64).
    example : dict
        One patch for the figures: ``index``, ``lr``, ``hr``, ``output`` (images), ``bias`` (HR image),
        ``matrix`` (A), ``singular_values``, ``left`` (U, HR images × s²), ``right`` (Vᵀ).
    seed, n_boot : int
    model_info : dict
        What the caller knows about the network (training seed, steps, width).
    """

    lr_shape: tuple[int, int]
    hr_shape: tuple[int, int]
    ks: tuple[int, ...]
    k_headline: int
    window: int
    atoms: int
    psnr: dict[str, np.ndarray]
    energy: dict[str, dict[str, np.ndarray]]
    likeness: dict[str, np.ndarray]
    sv_index_detail: np.ndarray
    sv_index_support: np.ndarray
    jacobian_max_abs_diff: float
    reconstruction_max_abs_err: float
    example: dict[str, Any]
    seed: int = 0
    n_boot: int = N_BOOT
    model_info: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.psnr["network"])

    # -- numbers with intervals ------------------------------------------------------------------------

    def _ci(self, v) -> Estimate:
        return bootstrap_ci(v, n_boot=self.n_boot, seed=self.seed, unit=UNIT)

    def _diff(self, a, b) -> Estimate:
        return paired_difference(a, b, n_boot=self.n_boot, seed=self.seed, unit=UNIT)

    def _kcol(self, k: int) -> int:
        if k not in self.ks:
            raise ValueError(f"k={k} is not among the analysed ks {self.ks}")
        return self.ks.index(k)

    def energy_estimates(self, measure: str, k: int) -> dict[str, Estimate]:
        """Mean energy fraction per basis at ``k`` and the paired differences that carry the comparison."""
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
        j = self._kcol(k)
        e = {b: v[:, j] for b, v in self.energy[measure].items()}
        out = {b: self._ci(v) for b, v in e.items()}
        for a, b in (("svd", "haar"), ("svd", "db2"), ("svd", "dct"), ("haar", "random"), ("db2", "random"),
                     ("haar", "dct"), ("db2", "dct"), ("dct", "random")):
            out[f"{a}-{b}"] = self._diff(e[a], e[b])
        return out

    def psnr_estimates(self) -> dict[str, Estimate]:
        """Mean PSNR (dB) per upsampler and the network's paired gain over each baseline."""
        out = {u: self._ci(v) for u, v in self.psnr.items()}
        for u in UPSAMPLERS[1:]:
            out[f"network-{u}"] = self._diff(self.psnr["network"], self.psnr[u])
        return out

    def likeness_estimates(self) -> dict[str, Estimate]:
        """Wavelet-likeness means and the paired comparisons against random vectors / the output images."""
        L = self.likeness
        out = {name: self._ci(v) for name, v in L.items()}
        for a, b in (("sv_left_support", "random_hr_support"), ("sv_right_support", "random_lr_support"),
                     ("rows_support", "random_lr_support"), ("cols_support", "random_hr_support"),
                     ("sv_left_detail", "image_detail"), ("sv_left_detail", "random_hr_detail"),
                     ("sv_right_detail", "random_lr_detail"), ("rows_detail", "random_lr_detail"),
                     ("cols_detail", "random_hr_detail"), ("rows_window", "random_rows_window"),
                     ("cols_window", "random_cols_window"), ("sv_left_sparsity_haar", "sv_left_sparsity_dct"),
                     ("sv_left_sparsity_db2", "sv_left_sparsity_dct"), ("sv_left_sparsity_haar",
                                                                        "sv_left_sparsity_random"),
                     ("sv_left_sparsity_db2", "sv_left_sparsity_random"),
                     ("sv_left_sparsity_dct", "sv_left_sparsity_random")):
            out[f"{a}-{b}"] = self._diff(L[a], L[b])
        return out

    def headline(self) -> dict[str, Estimate]:
        """The numbers a summary shows, each with n and a 95% interval."""
        k = self.k_headline
        e = self.energy_estimates("operator_out", k)
        im = self.energy_estimates("image", k)
        p = self.psnr_estimates()
        L = self.likeness_estimates()
        out = {"psnr_network_db": p["network"], "psnr_bicubic_db": p["bicubic"],
               "psnr_gain_vs_bicubic_db": p["network-bicubic"], "psnr_gain_vs_bilinear_db": p["network-bilinear"]}
        for key in ("svd", "haar", "db2", "dct", "random", "svd-haar", "svd-db2", "haar-random", "db2-random",
                    "haar-dct", "db2-dct"):
            out[f"operator_energy_k{k}_{key}"] = e[key]
        for key in ("svd", "haar", "db2", "random", "svd-haar", "svd-db2"):
            out[f"image_energy_k{k}_{key}"] = im[key]
        for key in ("sv_left_support", "random_hr_support", "sv_left_support-random_hr_support", "sv_left_detail",
                    "image_detail", "sv_left_detail-image_detail", "rows_window-random_rows_window",
                    "sv_left_sparsity_haar", "sv_left_sparsity_db2", "sv_left_sparsity_dct",
                    "sv_left_sparsity_random", "sv_left_sparsity_haar-sv_left_sparsity_dct",
                    "sv_left_sparsity_db2-sv_left_sparsity_dct", "template_share"):
            out[key] = L[key]
        return out

    @property
    def verdict(self) -> dict[str, Any]:
        """The three sub-claims at ``k_headline`` (module docstring), whether each holds, and a sentence."""
        k = self.k_headline
        e = self.energy_estimates("operator_out", k)
        L = self.likeness_estimates()
        p = self.psnr_estimates()
        energy = all(e[f"{w}-random"].low > 0 and e[f"{w}-dct"].high >= 0 for w in ("haar", "db2"))
        localised = L["sv_left_support-random_hr_support"].high < 0
        oscillating = L["sv_left_detail-image_detail"].low > 0
        sp = "sv_left_sparsity_"
        sparse = (any(L[f"{sp}{w}-{sp}dct"].low > 0 for w in ("haar", "db2"))
                  and all(L[f"{sp}{w}-{sp}random"].low > 0 for w in ("haar", "db2")))
        learned = p["network-bicubic"].low > 0
        holds = energy and localised and oscillating and sparse
        f = lambda est: f"{est.value:.3f} [{est.low:.3f}, {est.high:.3f}]"  # noqa: E731
        text = (
            f"On n={self.n} {UNIT}, the network {'beats' if learned else 'does not beat'} bicubic upsampling "
            f"(PSNR gain {f(p['network-bicubic'])} dB). At k={k}, the best k Haar / db2 / DCT / random atoms keep "
            f"{e['haar'].value:.3f} / {e['db2'].value:.3f} / {e['dct'].value:.3f} / {e['random'].value:.3f} of "
            f"‖A(x)‖²_F against the SVD optimum {e['svd'].value:.3f} (Haar − DCT {f(e['haar-dct'])}, db2 − DCT "
            f"{f(e['db2-dct'])}). The top {k} left singular vectors have effective support "
            f"{f(L['sv_left_support'])} (random vectors {L['random_hr_support'].value:.3f}) and a level-1 detail "
            f"fraction {f(L['sv_left_detail'])} (the output images {L['image_detail'].value:.3f}); their "
            f"{self.atoms} largest Haar / db2 / DCT / random coefficients keep {L[sp + 'haar'].value:.3f} / "
            f"{L[sp + 'db2'].value:.3f} / {L[sp + 'dct'].value:.3f} / {L[sp + 'random'].value:.3f} of their energy "
            f"(Haar − DCT {f(L[f'{sp}haar-{sp}dct'])}). "
            f"Energy like wavelets: {'yes' if energy else 'no'}; localised: {'yes' if localised else 'no'}; "
            f"oscillating: {'yes' if oscillating else 'no'}; wavelet-sparse: {'yes' if sparse else 'no'}. "
            f"The paper's claim "
            f"{'holds' if holds else 'does not hold'} here"
            + ("." if holds else " in full.") + (" Fewer than 30 patches: too few to conclude." if self.n < 30 else "")
        )
        return {"network_beats_bicubic": learned, "energy_like_wavelets": energy, "localised": localised,
                "oscillating": oscillating, "wavelet_sparse": sparse, "claim_holds": holds, "k": k, "text": text}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: per-patch arrays as lists, estimates as dicts, the verdict."""
        def lst(a):
            return np.asarray(a, dtype=np.float64).tolist()

        return {
            "lr_shape": list(self.lr_shape), "hr_shape": list(self.hr_shape), "ks": list(self.ks),
            "k_headline": self.k_headline, "window": self.window, "atoms": self.atoms, "n": self.n, "seed": self.seed,
            "n_boot": self.n_boot, "model_info": self.model_info,
            "psnr": {u: lst(v) for u, v in self.psnr.items()},
            "energy": {m: {b: lst(v) for b, v in d.items()} for m, d in self.energy.items()},
            "likeness": {k: lst(v) for k, v in self.likeness.items()},
            "sv_index_detail": lst(self.sv_index_detail), "sv_index_support": lst(self.sv_index_support),
            "jacobian_max_abs_diff": self.jacobian_max_abs_diff,
            "reconstruction_max_abs_err": self.reconstruction_max_abs_err,
            "example": {k: (lst(v) if isinstance(v, np.ndarray) else v) for k, v in self.example.items()},
            "headline": {k: v.to_dict() for k, v in self.headline().items()},
            "energy_estimates": {m: {str(k): {b: v.to_dict() for b, v in self.energy_estimates(m, k).items()}
                                     for k in self.ks} for m in MEASURES},
            "verdict": self.verdict,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SRAnalysisResult:
        """Inverse of :meth:`to_dict` (estimates and verdict are recomputed from the per-patch arrays)."""
        arr = np.asarray
        ex = dict(d["example"])
        for key in ("lr", "hr", "output", "bias", "matrix", "singular_values", "left", "right"):
            ex[key] = arr(ex[key], dtype=np.float64)
        return cls(lr_shape=tuple(d["lr_shape"]), hr_shape=tuple(d["hr_shape"]), ks=tuple(d["ks"]),
                   k_headline=d["k_headline"], window=d["window"], atoms=d["atoms"],
                   psnr={u: arr(v) for u, v in d["psnr"].items()},
                   energy={m: {b: arr(v) for b, v in e.items()} for m, e in d["energy"].items()},
                   likeness={k: arr(v) for k, v in d["likeness"].items()},
                   sv_index_detail=arr(d["sv_index_detail"]), sv_index_support=arr(d["sv_index_support"]),
                   jacobian_max_abs_diff=d["jacobian_max_abs_diff"],
                   reconstruction_max_abs_err=d["reconstruction_max_abs_err"], example=ex, seed=d["seed"],
                   n_boot=d["n_boot"], model_info=d.get("model_info", {}))

    # -- figures ----------------------------------------------------------------------------------------

    def figures(self) -> list[Any]:
        """PSNR, energy-vs-k (operator and image), the example patch, rows, columns, singular vectors, likeness."""
        from . import linearscope_sr_figures as F

        return [F.psnr_figure(self), F.energy_figure(self, "operator_out"), F.energy_figure(self, "image"),
                F.example_figure(self), F.rows_figure(self), F.columns_figure(self),
                F.singular_vectors_figure(self), F.likeness_figure(self)]


def analyze_sr(model: nn.Module, lr: torch.Tensor, hr: torch.Tensor, *, ks=(1, 2, 4, 8, 16, 32, 64),
               k_headline: int = 8, window: int = 1, atoms: int = 4, seed: int = 0, n_boot: int = N_BOOT,
               example: int = 0, model_info: dict | None = None) -> SRAnalysisResult:
    """LinearScope analysis of a ×2 super-resolution CNN on test patches (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        Maps ``(N, 1, s, s)`` to ``(N, 1, 2s, 2s)``; a LinearScope-supported ReLU network (e.g. ``SRCNN``).
    lr : Tensor of shape (n, 1, s, s)
        Test inputs, one per unit.
    hr : Tensor of shape (n, 1, 2s, 2s)
        Their ground truth (for PSNR).
    ks : sequence of int
        Atoms / singular vectors kept, each in ``[1, s²]``.
    k_headline : int
        One of ``ks``: the ``k`` of the headline numbers and of the singular vectors' likeness measures.
    window : int
        Localisation radius ``r`` (LR pixels) of rows and columns.
    atoms : int
        Coefficients kept in the singular vectors' sparsity measure, in ``[1, 4 s²]``.
    seed : int
        Random bases / vectors (per patch ``[seed, i]``) and the bootstrap.
    example : int
        Which patch the image figures show.
    """
    from ..sr_cnn import upsample_baseline, psnr as psnr_fn

    if lr.dim() != 4 or lr.shape[1] != 1 or hr.shape != (lr.shape[0], 1, 2 * lr.shape[2], 2 * lr.shape[3]):
        raise ValueError(f"need lr (n, 1, s, s) and hr (n, 1, 2s, 2s); got {tuple(lr.shape)} and {tuple(hr.shape)}")
    n, s_h, s_w = lr.shape[0], lr.shape[2], lr.shape[3]
    lr_shape, hr_shape = (s_h, s_w), (2 * s_h, 2 * s_w)
    n_in, n_out = s_h * s_w, 4 * s_h * s_w
    ks = tuple(int(k) for k in ks)
    if not ks or any(not 1 <= k <= n_in for k in ks) or list(ks) != sorted(set(ks)):
        raise ValueError(f"ks must be increasing, distinct and in [1, {n_in}] (the rank bound of A), got {ks}")
    if k_headline not in ks:
        raise ValueError(f"k_headline={k_headline} must be one of ks={ks}")
    if not 0 <= example < n:
        raise ValueError(f"example={example} is not a patch index in [0, {n})")
    if window < 0:
        raise ValueError(f"window must be ≥ 0, got {window}")
    if not 1 <= atoms <= n_out:
        raise ValueError(f"atoms must be in [1, {n_out}], got {atoms}")

    scope = LinearScope(model, dtype=torch.float64)
    net64 = scope.model  # the scope's own float64 copy, for the autograd Jacobian
    X = lr.double()
    with torch.no_grad():
        out = net64(X)
    if out.shape != hr.shape:
        raise ValueError(f"the model maps lr {tuple(lr.shape)} to {tuple(out.shape)}, not to the ×2 shape "
                         f"{tuple(hr.shape)} of hr: analyze_sr is for ×2 super-resolution networks")
    psnr = {"network": psnr_fn(out.clamp(0, 1), hr)}
    for u in UPSAMPLERS[1:]:
        psnr[u] = psnr_fn(upsample_baseline(lr, u), hr)

    energy = {m: {b: np.empty((n, len(ks))) for b in BASES} for m in MEASURES}
    like_names = [f"{a}_{m}" for a in ("sv_left", "sv_right", "rows", "cols", "random_hr", "random_lr")
                  for m in ("support", "detail")]
    like_names += ["image_detail", "rows_window", "cols_window", "random_rows_window", "random_cols_window",
                   "template_share"] + [f"sv_left_sparsity_{b}" for b in BASES[1:]]
    like = {k: np.empty(n) for k in like_names}
    sv_detail = np.empty((n, n_in))
    sv_support = np.empty((n, n_in))
    jac_diff = rec_err = 0.0
    kk = k_headline
    # each output pixel's place on the LR grid, and each input pixel's top-left place on the HR grid
    rows_centre = np.stack(np.divmod(np.arange(n_out), hr_shape[1]), axis=1) // 2
    cols_centre = np.stack(np.divmod(np.arange(n_in), s_w), axis=1) * 2
    ex: dict[str, Any] = {}
    for i in range(n):
        x = X[i]
        A_t = scope.matrix(x)
        J = torch.autograd.functional.jacobian(lambda z: net64(z[None])[0], x, vectorize=True).reshape(n_out, n_in)
        jac_diff = max(jac_diff, float((A_t - J).abs().max()))
        b_t = scope.bias(x)
        y_t = out[i].reshape(-1)
        rec_err = max(rec_err, float((A_t @ x.reshape(-1) + b_t - y_t).abs().max()))
        A, b, y = A_t.numpy(), b_t.numpy(), y_t.numpy()
        U, S, Vt = (t.numpy() for t in torch.linalg.svd(A_t, full_matrices=False))
        s2 = S ** 2
        karr = np.array(ks)
        rng_seed = [seed, i]
        B_out, B_in = _bases(hr_shape, rng_seed + [0]), _bases(lr_shape, rng_seed + [1])
        energy["operator_out"]["svd"][i] = np.cumsum(s2)[karr - 1] / s2.sum()
        energy["operator_in"]["svd"][i] = energy["operator_out"]["svd"][i]
        yc = y - y.mean()
        energy["image"]["svd"][i] = np.cumsum((U.T @ yc) ** 2)[karr - 1] / (yc @ yc)
        for name in BASES[1:]:
            energy["operator_out"][name][i] = best_k_fraction(((B_out[name] @ A) ** 2).sum(1), ks)
            energy["operator_in"][name][i] = best_k_fraction(((A @ B_in[name].T) ** 2).sum(0), ks)
            energy["image"][name][i] = best_k_fraction((B_out[name] @ yc) ** 2, ks)
            like[f"sv_left_sparsity_{name}"][i] = best_k_fraction((B_out[name] @ U[:, :kk]).T ** 2, atoms).mean()

        rng = np.random.default_rng(rng_seed + [2])
        R_hr, R_lr = rng.standard_normal((kk, n_out)), rng.standard_normal((kk, n_in))
        R_rows, R_cols = rng.standard_normal((n_out, n_in)), rng.standard_normal((n_in, n_out))
        for prefix, V, shp in (("sv_left", U[:, :kk].T, hr_shape), ("sv_right", Vt[:kk], lr_shape),
                               ("rows", A, lr_shape), ("cols", A.T, hr_shape), ("random_hr", R_hr, hr_shape),
                               ("random_lr", R_lr, lr_shape)):
            like[f"{prefix}_support"][i] = effective_support(V).mean()
            like[f"{prefix}_detail"][i] = detail_fraction(V, shp).mean()
        like["image_detail"][i] = detail_fraction(yc, hr_shape)
        r = window
        like["rows_window"][i] = _window_fraction(A, lr_shape, rows_centre, -r, r).mean()
        like["random_rows_window"][i] = _window_fraction(R_rows, lr_shape, rows_centre, -r, r).mean()
        like["cols_window"][i] = _window_fraction(A.T, hr_shape, cols_centre, -2 * r, 2 * r + 1).mean()
        like["random_cols_window"][i] = _window_fraction(R_cols, hr_shape, cols_centre, -2 * r, 2 * r + 1).mean()
        like["template_share"][i] = (b @ b) / (y @ y)
        sv_detail[i] = detail_fraction(U.T, hr_shape)
        sv_support[i] = effective_support(U.T)
        if i == example:
            ex = {"index": i, "lr": x[0].numpy().copy(), "hr": hr[i, 0].double().numpy(),
                  "output": out[i, 0].numpy().copy(), "bias": b.reshape(hr_shape), "matrix": A.copy(),
                  "singular_values": S, "left": U, "right": Vt}
    return SRAnalysisResult(lr_shape=lr_shape, hr_shape=hr_shape, ks=ks, k_headline=k_headline, window=window,
                            atoms=atoms, psnr=psnr, energy=energy, likeness=like, sv_index_detail=sv_detail,
                            sv_index_support=sv_support, jacobian_max_abs_diff=jac_diff,
                            reconstruction_max_abs_err=rec_err, example=ex, seed=seed, n_boot=n_boot,
                            model_info=dict(model_info or {}))
