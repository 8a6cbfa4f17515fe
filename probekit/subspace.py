"""Subspace toolkit shared by the probes: bases, principal angles, mode subspace overlap, ranks.

Every function takes torch tensors on any device (CPU or CUDA) and returns tensors on the same device.
Decompositions run in float64 (singular values near a threshold, cosines near 1 and energy sums need it);
bases come back in the input's floating dtype unless a function says otherwise. Vectors are *columns*:
a set of ``n`` vectors in ``R^D`` is a ``(D, n)`` matrix and an orthonormal basis is ``(D, k)``.

Definitions (``shared/METHODS.md`` §2)
--------------------------------------
energy basis
    Left singular vectors of ``X`` (uncentred by default), the smallest ``k`` with
    ``sum_{i<=k} s_i^2 >= eta * sum_i s_i^2``.
rank-fraction basis
    Top ``k`` left singular vectors of ``V (m, n)`` with ``k = max(1, floor(f * min(m, n) + 1/2))``
    (rounding half up).
MSO
    ``||Qa^T Qb||_F^2 / min(ka, kb)``, the mean squared cosine of the ``min(ka, kb)`` principal angles.
    Random baseline ``max(ka, kb) / D``: the exact expectation for independent uniformly random subspaces,
    since ``E ||Qa^T Qb||_F^2 = ka kb / D``.
Marchenko–Pastur rank (beyond the paper)
    Number of singular values above the noise bulk edge ``sigma (sqrt(D) + sqrt(n))`` plus a Tracy–Widom
    margin, with ``sigma`` estimated from the median singular value (see :func:`mp_rank`).

Example
-------
>>> import torch
>>> from probekit.subspace import energy_basis, mso, mso_random_baseline
>>> X = torch.randn(64, 200)
>>> Qa = energy_basis(X[:, :100], 0.5).basis
>>> Qb = energy_basis(X[:, 100:], 0.5).basis
>>> float(mso(Qa, Qb)) > 0                                  # doctest: +SKIP
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = [
    "EnergyBasis",
    "RankFractionBasis",
    "MPBasis",
    "orthonormalize",
    "projector",
    "energy_basis",
    "rank_fraction_k",
    "rank_fraction_basis",
    "randomized_range_svd",
    "principal_angles",
    "mso",
    "mso_random_baseline",
    "mp_median",
    "mp_noise_sigma",
    "mp_threshold",
    "mp_rank",
    "mp_basis",
]

# Relative slack when comparing a cumulative energy with eta: s_i^2 of hand-built spectra is not exact
# (sqrt(3)**2 = 2.9999999999999996), and a k that flips on the last bit is not a different subspace.
_ENERGY_RTOL = 1e-10

# Upper 1% point of the Tracy-Widom (beta=1) law: the largest noise eigenvalue exceeds the bulk edge by
# more than this many TW scale units in about 1% of pure-noise matrices.
TW1_Q99 = 2.02


# ------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class EnergyBasis:
    """Result of :func:`energy_basis`.

    Attributes
    ----------
    basis : torch.Tensor
        Orthonormal columns, shape ``(D, k)``, dtype of the input.
    k : int
        Number of columns.
    singular_values : torch.Tensor
        All singular values of the (centred or not) data, descending, float64, shape ``(min(D, n),)``.
    energy : torch.Tensor
        Cumulative energy fractions ``cumsum(s^2) / sum(s^2)``, float64, shape ``(min(D, n),)``.
    eta : float
    centered : bool
    """

    basis: torch.Tensor
    k: int
    singular_values: torch.Tensor
    energy: torch.Tensor
    eta: float
    centered: bool


@dataclass(frozen=True)
class RankFractionBasis:
    """Result of :func:`rank_fraction_basis`.

    Attributes
    ----------
    basis : torch.Tensor
        Top-``k`` left singular vectors, shape ``(m, k)``, dtype of the input.
    k : int
    singular_values : torch.Tensor
        The top ``k`` singular values (estimates when randomized), float64, shape ``(k,)``.
    method : str
        ``"exact"`` or ``"randomized"``.
    """

    basis: torch.Tensor
    k: int
    singular_values: torch.Tensor
    method: str


@dataclass(frozen=True)
class MPBasis:
    """Result of :func:`mp_basis`.

    Attributes
    ----------
    basis : torch.Tensor
        Left singular vectors above the threshold, shape ``(D, k)``, dtype of the input.
    k : int
    singular_values : torch.Tensor
        All singular values, descending, float64, shape ``(min(D, n),)``.
    sigma : float
        Noise standard deviation per entry (given or estimated).
    edge : float
        Bulk edge ``sigma (sqrt(D) + sqrt(n))``.
    threshold : float
        Edge plus the Tracy–Widom margin; singular values above it count.
    """

    basis: torch.Tensor
    k: int
    singular_values: torch.Tensor
    sigma: float
    edge: float
    threshold: float


# ------------------------------------------------------------------------------------------- helpers


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.float64


def _check_matrix(X: torch.Tensor, name: str) -> None:
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(X).__name__}.")
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (D, n) with vectors as columns, got shape {tuple(X.shape)}.")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(X.shape)}).")


def _thin_svd64(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and singular values of ``X`` in float64: ``(D, r)``, ``(r,)``, r = min(D, n)."""
    U, S, _ = torch.linalg.svd(X.to(torch.float64), full_matrices=False)
    return U, S


def orthonormalize(A: torch.Tensor, *, rtol: float | None = None) -> torch.Tensor:
    """Orthonormal basis of the column space of ``A``.

    Parameters
    ----------
    A : torch.Tensor
        Shape ``(..., D, k)``; leading dimensions are a batch (only when ``rtol`` is None).
    rtol : float or None
        None: reduced QR, keeping all ``k`` columns (assumes full column rank; signs fixed so that the
        R factor has a non-negative diagonal). A float: SVD, keeping the left singular vectors with
        ``s > rtol * s_max`` (drops dependent columns; 2-D input only).

    Returns
    -------
    torch.Tensor
        Shape ``(..., D, k)`` (QR) or ``(D, r)`` (SVD), dtype of ``A``.
    """
    if A.ndim < 2:
        raise ValueError(f"A must have shape (..., D, k), got {tuple(A.shape)}.")
    out = _out_dtype(A)
    if rtol is None:
        Q, R = torch.linalg.qr(A.to(torch.float64), mode="reduced")
        sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        return (Q * sign.unsqueeze(-2)).to(out)
    _check_matrix(A, "A")
    U, S = _thin_svd64(A)
    keep = S > rtol * S[0] if S.numel() and S[0] > 0 else torch.zeros_like(S, dtype=torch.bool)
    return U[:, keep].to(out)


def projector(Q: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector ``Q Q^T`` onto the span of an orthonormal basis.

    Parameters
    ----------
    Q : torch.Tensor
        Orthonormal columns, shape ``(..., D, k)``.

    Returns
    -------
    torch.Tensor
        Shape ``(..., D, D)``, dtype of ``Q``.
    """
    return Q @ Q.transpose(-1, -2)


# ------------------------------------------------------------------------------------------- bases


def energy_basis(X: torch.Tensor, eta: float, *, centered: bool = False) -> EnergyBasis:
    """Orthonormal basis of the span of ``X``'s columns holding a fraction ``eta`` of their energy.

    Parameters
    ----------
    X : torch.Tensor
        The vectors as columns, shape ``(D, n)``.
    eta : float
        Energy fraction in ``(0, 1]``.
    centered : bool
        False (default, as in the paper): decompose ``X`` itself, so a common offset (the mean vector)
        counts as energy and usually becomes the first direction. True: subtract the mean column first,
        so the basis describes the spread around the mean and ignores the offset.

    Returns
    -------
    EnergyBasis
        ``k`` is the smallest integer with ``sum_{i<=k} s_i^2 >= eta * sum_i s_i^2`` (relative slack
        1e-10); ``basis`` has shape ``(D, k)``. All-zero data gives ``k = 0``.
    """
    _check_matrix(X, "X")
    if not (0.0 < float(eta) <= 1.0):
        raise ValueError(f"eta must be in (0, 1], got {eta}.")
    Xd = X.to(torch.float64)
    if centered:
        Xd = Xd - Xd.mean(dim=1, keepdim=True)
    U, S = _thin_svd64(Xd)
    e = S.square()
    total = e.sum()
    if total <= 0:
        return EnergyBasis(U[:, :0].to(_out_dtype(X)), 0, S, torch.zeros_like(S), float(eta), centered)
    energy = torch.cumsum(e, 0) / total
    reached = energy >= float(eta) * (1.0 - _ENERGY_RTOL)
    k = int(torch.nonzero(reached)[0, 0].item()) + 1 if bool(reached.any()) else S.numel()
    return EnergyBasis(U[:, :k].to(_out_dtype(X)), k, S, energy, float(eta), centered)


def rank_fraction_k(shape: tuple[int, int] | torch.Size, f: float) -> int:
    """``k = max(1, floor(f * min(m, n) + 1/2))`` for a matrix of shape ``(m, n)`` (rounds half up).

    Parameters
    ----------
    shape : (m, n)
    f : float
        Rank fraction in ``(0, 1]``.
    """
    if not (0.0 < float(f) <= 1.0):
        raise ValueError(f"rank fraction f must be in (0, 1], got {f}.")
    r = min(int(shape[0]), int(shape[1]))
    return max(1, min(r, int(math.floor(float(f) * r + 0.5))))


def randomized_range_svd(
    A: torch.Tensor, k: int, *, oversample: int = 10, n_iter: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` left singular vectors and values by a seeded randomized range finder.

    Halko, Martinsson & Tropp (2011), algorithm 4.4: ``Y = (A A^T)^q A Omega`` with a Gaussian
    ``Omega (n, k + p)``, re-orthonormalised after every product (plain powers lose the small directions
    to rounding), then an exact SVD of the small ``Q^T A``. Costs ``O(m n (k + p) (2 q + 2))`` instead of
    ``O(m n min(m, n))``. Runs in float64 on ``A``'s device with its own generator, so the result does not
    depend on (or change) the global RNG.

    Parameters
    ----------
    A : torch.Tensor
        Shape ``(m, n)``.
    k : int
        Number of singular triplets wanted, ``1 <= k <= min(m, n)``.
    oversample : int
        Extra random columns ``p``.
    n_iter : int
        Power iterations ``q``.
    seed : int

    Returns
    -------
    U : torch.Tensor
        Shape ``(m, k)``, float64.
    S : torch.Tensor
        Shape ``(k,)``, float64, descending.
    """
    _check_matrix(A, "A")
    m, n = A.shape
    if not 1 <= k <= min(m, n):
        raise ValueError(f"k must be in [1, {min(m, n)}], got {k}.")
    Ad = A.to(torch.float64)
    ell = min(k + max(0, int(oversample)), min(m, n))
    gen = torch.Generator(device=A.device).manual_seed(int(seed))
    omega = torch.randn(n, ell, generator=gen, device=A.device, dtype=torch.float64)
    Q, _ = torch.linalg.qr(Ad @ omega)
    for _ in range(int(n_iter)):
        W, _ = torch.linalg.qr(Ad.T @ Q)
        Q, _ = torch.linalg.qr(Ad @ W)
    Ub, S, _ = torch.linalg.svd(Q.T @ Ad, full_matrices=False)
    return (Q @ Ub)[:, :k], S[:k]


def rank_fraction_basis(
    V: torch.Tensor,
    f: float,
    *,
    method: str = "auto",
    oversample: int = 10,
    n_iter: int = 4,
    seed: int = 0,
) -> RankFractionBasis:
    """Top-``k`` left singular vectors of ``V`` with ``k = rank_fraction_k(V.shape, f)``.

    Parameters
    ----------
    V : torch.Tensor
        Shape ``(m, n)``, e.g. an alignment update ``W_aligned - W_base``.
    f : float
        Rank fraction in ``(0, 1]`` (a fraction of ``min(m, n)``, not of the energy).
    method : {"auto", "exact", "randomized"}
        ``"auto"`` uses :func:`randomized_range_svd` when ``min(m, n) >= 256`` and
        ``k + oversample <= min(m, n) / 4``: then the range finder's ``(2 q + 2)`` passes over ``k + p``
        columns cost less than a full SVD, whose price does not depend on ``k``. Otherwise the exact SVD.
    oversample, n_iter, seed
        Passed to :func:`randomized_range_svd`.

    Returns
    -------
    RankFractionBasis
        ``basis`` has shape ``(m, k)``.
    """
    _check_matrix(V, "V")
    k = rank_fraction_k(V.shape, f)
    r = min(V.shape)
    if method == "auto":
        method = "randomized" if (r >= 256 and k + oversample <= r / 4) else "exact"
    if method == "exact":
        U, S = _thin_svd64(V)
        U, S = U[:, :k], S[:k]
    elif method == "randomized":
        U, S = randomized_range_svd(V, k, oversample=oversample, n_iter=n_iter, seed=seed)
    else:
        raise ValueError(f"method must be 'auto', 'exact' or 'randomized', got {method!r}.")
    return RankFractionBasis(U.to(_out_dtype(V)), k, S, method)


# ------------------------------------------------------------------------------------------- angles


def principal_angles(Qa: torch.Tensor, Qb: torch.Tensor) -> torch.Tensor:
    """Principal angles between the spans of two orthonormal bases, in radians, ascending.

    Cosines are the singular values of ``Qa^T Qb``; for angles below 45 degrees the sines (singular values
    of the part of one basis outside the other) are used instead, since ``arccos`` near 1 loses half the
    digits (the same scheme as ``scipy.linalg.subspace_angles``).

    Parameters
    ----------
    Qa : torch.Tensor
        Orthonormal columns, shape ``(..., D, ka)``.
    Qb : torch.Tensor
        Orthonormal columns, shape ``(..., D, kb)``; batch dimensions broadcast with ``Qa``'s.

    Returns
    -------
    torch.Tensor
        Shape ``(..., min(ka, kb))``, float64, ascending, in ``[0, pi/2]``.
    """
    if Qa.shape[-2] != Qb.shape[-2]:
        raise ValueError(f"bases live in different spaces: D={Qa.shape[-2]} vs D={Qb.shape[-2]}.")
    A = Qa.to(torch.float64)
    B = Qb.to(torch.float64)
    if A.shape[-1] < B.shape[-1]:  # the sine formula needs the wider basis first
        A, B = B, A
    C = A.transpose(-1, -2) @ B  # (..., ka, kb), ka >= kb
    cos = torch.linalg.svdvals(C).clamp(0.0, 1.0)  # descending -> angles ascending
    resid = B - A @ C  # the part of span(B) outside span(A)
    sin = torch.linalg.svdvals(resid).flip(-1).clamp(0.0, 1.0)  # ascending
    small = cos.square() >= 0.5
    return torch.where(small, torch.arcsin(sin), torch.arccos(cos))


def mso(Qa: torch.Tensor, Qb: torch.Tensor) -> torch.Tensor:
    """Mode subspace overlap ``||Qa^T Qb||_F^2 / min(ka, kb)``.

    Equals the mean of ``cos^2`` of the principal angles: 1 when one span contains the other, 0 when
    they are orthogonal.

    Parameters
    ----------
    Qa : torch.Tensor
        Orthonormal columns, shape ``(..., D, ka)``.
    Qb : torch.Tensor
        Orthonormal columns, shape ``(..., D, kb)``.

    Returns
    -------
    torch.Tensor
        Shape ``(...)`` (0-d for 2-D inputs), float64.
    """
    if Qa.shape[-2] != Qb.shape[-2]:
        raise ValueError(f"bases live in different spaces: D={Qa.shape[-2]} vs D={Qb.shape[-2]}.")
    ka, kb = Qa.shape[-1], Qb.shape[-1]
    if min(ka, kb) == 0:
        raise ValueError("MSO is undefined for an empty basis (k = 0).")
    C = Qa.to(torch.float64).transpose(-1, -2) @ Qb.to(torch.float64)
    return C.square().sum(dim=(-2, -1)) / min(ka, kb)


def mso_random_baseline(ka: int, kb: int, D: int) -> float:
    """Expected MSO of two independent uniformly random subspaces: ``max(ka, kb) / D``.

    ``E[(Qa^T Qb)_{ij}^2] = 1 / D`` for each of the ``ka kb`` entries, so
    ``E ||Qa^T Qb||_F^2 / min(ka, kb) = ka kb / (D min(ka, kb)) = max(ka, kb) / D``.
    """
    if not (1 <= ka <= D and 1 <= kb <= D):
        raise ValueError(f"need 1 <= ka, kb <= D, got ka={ka}, kb={kb}, D={D}.")
    return max(ka, kb) / D


# ------------------------------------------------------------------------------------------- Marchenko–Pastur


@lru_cache(maxsize=256)
def mp_median(beta: float) -> float:
    """Median of the Marchenko–Pastur law with aspect ratio ``beta`` in ``(0, 1]`` and unit variance.

    The law is that of the eigenvalues of ``Y Y^T / n`` for ``Y (p, n)`` with i.i.d. unit-variance entries,
    ``beta = p / n``; support ``[(1 - sqrt(beta))^2, (1 + sqrt(beta))^2]``. Computed by quadrature of the
    density on a grid clustered at both edges (where it has square-root behaviour); accurate to ~1e-7.
    """
    beta = float(beta)
    if not (0.0 < beta <= 1.0):
        raise ValueError(f"beta must be in (0, 1], got {beta}.")
    a, b = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    t = np.linspace(0.0, math.pi, 200_001)
    x = a + (b - a) * (1 - np.cos(t)) / 2  # Chebyshev-like clustering at a and b
    dxdt = (b - a) * np.sin(t) / 2
    dens = np.sqrt(np.clip((b - x) * (x - a), 0.0, None)) / (2 * math.pi * beta * np.maximum(x, 1e-300))
    g = dens * dxdt
    cdf = np.concatenate([[0.0], np.cumsum((g[1:] + g[:-1]) / 2 * np.diff(t))])
    cdf /= cdf[-1]  # for beta = 1 the density's 1/x pole at a = 0 is integrable; normalise away the error
    return float(np.interp(0.5, cdf, x))


def mp_noise_sigma(S: torch.Tensor, shape: tuple[int, int]) -> float:
    """Per-entry noise standard deviation from the median singular value.

    For a ``(D, n)`` noise matrix with i.i.d. entries of variance ``sigma^2``, with ``p = min(D, n)``,
    ``N = max(D, n)`` and ``beta = p / N``, the ``p`` squared singular values divided by ``N`` follow
    ``sigma^2`` times the Marchenko–Pastur law, so ``median(s)^2 = N sigma^2 mp_median(beta)`` and
    ``sigma_hat = median(s) / sqrt(N mp_median(beta))`` (Gavish & Donoho 2014). A few spikes above the
    bulk move the median only by a few ranks, which biases ``sigma_hat`` slightly *up* (conservative).

    Parameters
    ----------
    S : torch.Tensor
        All ``min(D, n)`` singular values, shape ``(p,)``.
    shape : (D, n)
    """
    D, n = int(shape[0]), int(shape[1])
    p, N = min(D, n), max(D, n)
    if S.numel() != p:
        raise ValueError(f"need all {p} singular values of a {D}x{n} matrix, got {S.numel()}.")
    med = float(torch.median(S.to(torch.float64)).item())  # lower median for even p, as torch defines it
    return med / math.sqrt(N * mp_median(p / N))


def mp_threshold(sigma: float, shape: tuple[int, int], *, tw_quantile: float = TW1_Q99) -> tuple[float, float]:
    """Bulk edge and detection threshold for singular values of a ``(D, n)`` noise matrix.

    Edge ``sigma (sqrt(D) + sqrt(n))``. The largest noise eigenvalue ``s_1^2 / sigma^2`` is
    ``mu + s TW`` with ``mu = (sqrt(D) + sqrt(n))^2`` and ``s = (sqrt(D) + sqrt(n)) (1/sqrt(D) +
    1/sqrt(n))^(1/3)`` (Johnstone 2001); the threshold is ``sigma sqrt(mu + tw_quantile s)``.

    Returns
    -------
    edge, threshold : float
    """
    D, n = int(shape[0]), int(shape[1])
    root = math.sqrt(D) + math.sqrt(n)
    scale = root * (1 / math.sqrt(D) + 1 / math.sqrt(n)) ** (1 / 3)
    return sigma * root, sigma * math.sqrt(root**2 + tw_quantile * scale)


def mp_basis(
    X: torch.Tensor, *, sigma: float | None = None, tw_quantile: float = TW1_Q99
) -> MPBasis:
    """Basis of the singular directions of ``X`` that stand above the Marchenko–Pastur noise bulk.

    Spiked model: ``X = signal + noise`` with i.i.d. noise entries of standard deviation ``sigma``. Pure
    noise has its singular values below ``sigma (sqrt(D) + sqrt(n))`` up to Tracy–Widom fluctuations; a
    direction counts as signal when its singular value exceeds :func:`mp_threshold` (the edge plus
    ``tw_quantile`` TW scale units, ~1% false positives per matrix at the default when ``sigma`` is known).

    Parameters
    ----------
    X : torch.Tensor
        Shape ``(D, n)``, vectors as columns (uncentred; centre beforehand if the mean is not signal).
    sigma : float or None
        Known noise level; None estimates it with :func:`mp_noise_sigma` (median singular value matched
        to the median of the Marchenko–Pastur law).
    tw_quantile : float
        Margin above the edge in Tracy–Widom scale units (default: its 99th percentile, 2.02).

    Returns
    -------
    MPBasis
        ``basis`` of shape ``(D, k)``.
    """
    _check_matrix(X, "X")
    U, S = _thin_svd64(X)
    sig = mp_noise_sigma(S, tuple(X.shape)) if sigma is None else float(sigma)
    if sig < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}.")
    edge, thr = mp_threshold(sig, tuple(X.shape), tw_quantile=tw_quantile)
    k = int((S > thr).sum().item())
    return MPBasis(U[:, :k].to(_out_dtype(X)), k, S, sig, edge, thr)


def mp_rank(X: torch.Tensor, *, sigma: float | None = None, tw_quantile: float = TW1_Q99) -> int:
    """Number of singular values of ``X (D, n)`` above the Marchenko–Pastur bulk edge (see :func:`mp_basis`)."""
    return mp_basis(X, sigma=sigma, tw_quantile=tw_quantile).k
