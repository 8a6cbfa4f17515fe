"""Orthonormal bases of small images and how much energy their best atoms capture.

A basis of ``h × w`` images is an orthonormal matrix ``B`` of shape ``(N, N)``, ``N = h w``: row ``j`` is atom ``j``
(an image, flattened in C order) and ``c = B v`` are the coefficients of an image ``v``. Bases:

- :func:`wavelet_basis`: 2-D discrete wavelet transform (PyWavelets ``wavedec2``) with ``mode="periodization"``,
  the mode in which an orthogonal wavelet (Haar, Daubechies ``dbN``) gives an orthonormal transform of an image
  whose sides are divisible by ``2**level``. Checked: ``B Bᵀ = I`` to 1e-10 or a ``ValueError`` names the case.
  Default level: the full depth, the largest ``L`` with both sides divisible by ``2**L`` (4 on 16×16, 3 on 8×8),
  for every wavelet, so that Haar and db2 bases differ only in their filters (one approximation atom, the
  constant). Deviation, stated: for db2 this is deeper than ``pywt.dwt_max_level`` (2 on 16×16); with
  periodization the filter then wraps around the image at the coarse levels — the transform stays orthonormal
  (checked), the coarse atoms are periodic.
- :func:`dct_basis`: the 2-D orthonormal DCT-II (a global, Fourier-type basis: the foil for "wavelet-like").
- :func:`random_basis`: a Haar-distributed random orthonormal basis (QR of a Gaussian matrix, signs fixed).

Energy measures (``E(v) = ‖v‖²``; all fractions in [0, 1]):

- :func:`best_k_fraction`: the share of total energy in the ``k`` largest of a set of non-negative energies
  (best ``k``-term approximation when the energies are squared coefficients in an orthonormal basis).
- :func:`effective_support`: participation ratio ``(Σ v²)² / Σ v⁴`` over ``N`` — about 1/3 for a Gaussian random
  vector, 2/3 for a plane wave ``cos``, ``4 / N`` for a finest-scale Haar atom: small means localised.
- :func:`detail_fraction`: the share of ``‖v‖²`` in the finest-scale (level-1) detail subbands of a one-level
  Haar transform: 0 for images constant on 2×2 blocks, 1 for a finest Haar detail atom, 3/4 on average for white
  noise; high means the vector oscillates at the pixel scale.

Example
-------
>>> B = wavelet_basis((4, 4), "haar")
>>> np.allclose(B @ B.T, np.eye(16))
True
>>> float(best_k_fraction((B @ np.ones(16)) ** 2, 1))      # a constant image is one Haar atom
1.0
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

__all__ = ["wavelet_basis", "wavelet_subbands", "dct_basis", "random_basis", "best_k_fraction", "effective_support",
           "detail_fraction"]

_ORTHO_TOL = 1e-10


def _check_shape(shape) -> tuple[int, int]:
    if len(shape) != 2 or any(not isinstance(s, (int, np.integer)) or s < 1 for s in shape):
        raise ValueError(f"shape must be (h, w) with positive ints, got {shape!r}")
    return int(shape[0]), int(shape[1])


@lru_cache(maxsize=32)
def _wavelet(shape: tuple[int, int], wavelet: str, level: int | None) -> tuple[np.ndarray, np.ndarray]:
    import pywt

    h, w = shape
    try:
        wav = pywt.Wavelet(wavelet)
    except ValueError as e:
        raise ValueError(f"unknown wavelet {wavelet!r} (PyWavelets names: 'haar', 'db2', 'db4', …): {e}") from None
    if not wav.orthogonal:
        raise ValueError(f"wavelet {wavelet!r} is not orthogonal; an orthonormal basis needs e.g. 'haar' or 'dbN'")
    if level is None:
        level = 0
        while h % 2 ** (level + 1) == 0 and w % 2 ** (level + 1) == 0:
            level += 1
    if level < 1 or h % 2**level or w % 2**level:
        raise ValueError(f"a {h}×{w} image needs sides divisible by 2**level for an orthonormal {wavelet!r} "
                         f"transform at level {level}")
    n = h * w
    B = np.empty((n, n))
    band = None
    for j in range(n):
        e = np.zeros(n)
        e[j] = 1.0
        with warnings.catch_warnings():  # "level too high: boundary effects" — expected, see the module docstring
            warnings.simplefilter("ignore", UserWarning)
            coeffs = pywt.wavedec2(e.reshape(h, w), wav, mode="periodization", level=level)
        parts = [coeffs[0].ravel()] + [d.ravel() for details in coeffs[1:] for d in details]
        B[:, j] = np.concatenate(parts)  # column j: coefficients of pixel j, i.e. B = analysis operator
        if band is None:
            # 0 for the approximation, else the detail level (level = coarsest, 1 = finest)
            sizes = [coeffs[0].size] + [d.size for details in coeffs[1:] for d in details]
            levels = [0] + [level - i for i in range(level) for _ in range(3)]
            band = np.repeat(levels, sizes)
    err = float(np.abs(B @ B.T - np.eye(n)).max())
    if err > _ORTHO_TOL:
        raise ValueError(f"the {wavelet!r} level-{level} transform of {h}×{w} images is not orthonormal "
                         f"(max |B Bᵀ − I| = {err:.1e})")
    B.setflags(write=False)
    band.setflags(write=False)
    return B, band


def wavelet_basis(shape: tuple[int, int], wavelet: str = "haar", level: int | None = None) -> np.ndarray:
    """Orthonormal 2-D wavelet basis of ``shape`` images (periodization mode).

    Returns
    -------
    ndarray of shape (N, N), N = h w (read-only)
        Row ``j`` is atom ``j``; ``B @ v`` are ``wavedec2``'s coefficients of image ``v`` in the order
        approximation, then per level from coarsest to finest the horizontal, vertical, diagonal details.
    """
    return _wavelet(_check_shape(shape), wavelet, level)[0]


def wavelet_subbands(shape: tuple[int, int], wavelet: str = "haar", level: int | None = None) -> np.ndarray:
    """Per atom of :func:`wavelet_basis`: 0 for approximation atoms, else the detail level (1 = finest). (N,)."""
    return _wavelet(_check_shape(shape), wavelet, level)[1]


@lru_cache(maxsize=8)
def _dct(shape: tuple[int, int]) -> np.ndarray:
    from scipy.fft import dct

    h, w = shape
    B = np.kron(dct(np.eye(h), norm="ortho", axis=0), dct(np.eye(w), norm="ortho", axis=0))
    B.setflags(write=False)
    return B


def dct_basis(shape: tuple[int, int]) -> np.ndarray:
    """Orthonormal 2-D DCT-II basis of ``shape`` images, ``(N, N)``; row ``j`` an atom (a separable cosine)."""
    return _dct(_check_shape(shape))


def random_basis(n: int, seed: int | Sequence[int] = 0) -> np.ndarray:
    """Random orthonormal ``(n, n)`` basis, uniform (Haar measure): QR of a seeded Gaussian, R's diagonal made > 0.

    ``seed`` is anything ``np.random.default_rng`` takes (an int, or a list such as ``[seed, unit index]``).
    """
    import torch

    g = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, n)))
    q, r = torch.linalg.qr(g)  # torch's QR: numpy's (OpenBLAS) is ~70× slower on a busy 2-core box
    return (q * torch.sign(torch.diagonal(r))).T.numpy()


def best_k_fraction(energies, k) -> np.ndarray:
    """Share of ``energies.sum(-1)`` in the ``k`` largest entries along the last axis.

    Parameters
    ----------
    energies : array (..., N), non-negative
    k : int or sequence of int, each in [0, N]

    Returns
    -------
    ndarray of shape (...) for an int ``k``, (..., len(k)) for a sequence; NaN where the total is 0.
    """
    e = np.asarray(energies, dtype=np.float64)
    if np.any(e < 0):
        raise ValueError("energies must be non-negative (squared coefficients or norms)")
    ks = np.atleast_1d(np.asarray(k))
    if np.any(ks < 0) or np.any(ks > e.shape[-1]):
        raise ValueError(f"k must lie in [0, {e.shape[-1]}], got {k!r}")
    csum = np.concatenate([np.zeros(e.shape[:-1] + (1,)), np.cumsum(-np.sort(-e, axis=-1), axis=-1)], axis=-1)
    total = csum[..., -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = csum[..., ks.astype(int)] / total
    return out[..., 0] if np.ndim(k) == 0 else out


def effective_support(V) -> np.ndarray:
    """Participation ratio over length of each row of ``V`` (N,) or (m, N): ``(Σ v²)² / (N Σ v⁴)`` in (0, 1]."""
    v2 = np.atleast_2d(np.asarray(V, dtype=np.float64)) ** 2
    out = v2.sum(-1) ** 2 / (v2.shape[-1] * (v2 ** 2).sum(-1))
    return out if np.ndim(V) > 1 else out[0]


def detail_fraction(V, shape: tuple[int, int]) -> np.ndarray:
    """Share of each row's energy in the finest Haar detail subbands (one level), rows of ``V`` ``(m, h w)``.

    Closed form of the one-level Haar split: on each 2×2 block the approximation coefficient is the block sum / 2,
    so the detail energy is the block's energy minus ``(block sum)² / 4``.
    """
    h, w = _check_shape(shape)
    if h % 2 or w % 2:
        raise ValueError(f"detail_fraction needs even sides, got {h}×{w}")
    X = np.atleast_2d(np.asarray(V, dtype=np.float64)).reshape(-1, h // 2, 2, w // 2, 2)
    total = (X ** 2).sum(axis=(1, 2, 3, 4))
    approx = (X.sum(axis=(2, 4)) ** 2 / 4).sum(axis=(1, 2))
    out = 1.0 - approx / total
    return out if np.ndim(V) > 1 else out[0]
