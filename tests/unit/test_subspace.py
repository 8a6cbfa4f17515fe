"""Subspace toolkit: angles and MSO against scipy, energy / rank-fraction bases, Marchenko–Pastur rank."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from probekit.subspace import (
    energy_basis,
    mp_basis,
    mp_median,
    mp_noise_sigma,
    mp_rank,
    mp_threshold,
    mso,
    mso_random_baseline,
    orthonormalize,
    principal_angles,
    projector,
    randomized_range_svd,
    rank_fraction_basis,
    rank_fraction_k,
)

DTYPES = [torch.float32, torch.float64]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand_basis(D: int, k: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return orthonormalize(torch.randn(D, k, generator=_gen(seed), dtype=torch.float64)).to(dtype)


def _scipy_angles(Qa: torch.Tensor, Qb: torch.Tensor) -> np.ndarray:
    return np.sort(scipy.linalg.subspace_angles(Qa.double().numpy(), Qb.double().numpy()))


def _constructed_pair(D: int, angles: list[float], extra_a: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bases with known principal angles: b_i = cos t_i e_i + sin t_i e_{k+i}; Qa adds extra_a more e's."""
    k = len(angles)
    E = torch.eye(D, dtype=torch.float64)
    t = torch.tensor(angles, dtype=torch.float64)
    Qb = E[:, :k] * torch.cos(t) + E[:, k : 2 * k] * torch.sin(t)
    Qa = torch.cat([E[:, :k], E[:, 2 * k : 2 * k + extra_a]], dim=1)
    return Qa, Qb


# ------------------------------------------------------------------------------------------- angles & MSO


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,ka,kb,seed", [(20, 4, 4, 0), (50, 7, 3, 1), (30, 2, 9, 2), (12, 12, 5, 3)])
def test_principal_angles_and_mso_match_scipy_on_random_subspaces(dtype, D, ka, kb, seed):
    Qa, Qb = _rand_basis(D, ka, seed, dtype), _rand_basis(D, kb, seed + 100, dtype)
    ours = principal_angles(Qa, Qb)
    ref = _scipy_angles(Qa, Qb)
    assert ours.shape == (min(ka, kb),) and ours.dtype == torch.float64
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(ours.numpy(), ref, atol=tol)
    assert torch.all(ours[1:] >= ours[:-1])  # ascending
    # MSO is the mean squared cosine of the angles, and symmetric.
    np.testing.assert_allclose(float(mso(Qa, Qb)), np.mean(np.cos(ref) ** 2), atol=tol)
    np.testing.assert_allclose(float(mso(Qb, Qa)), float(mso(Qa, Qb)), atol=1e-12)


@pytest.mark.parametrize("extra_a", [0, 3])
def test_constructed_angles_recovered_including_tiny_ones(extra_a):
    angles = [1e-9, 1e-4, 0.3, 0.9, math.pi / 2 - 1e-3]
    Qa, Qb = _constructed_pair(24, angles, extra_a)
    ours = principal_angles(Qa, Qb).numpy()
    np.testing.assert_allclose(ours, sorted(angles), rtol=1e-6, atol=1e-15)
    # scipy re-orthonormalises its inputs first, which rounds the 1e-9 angle to 0; agree to 1e-8.
    np.testing.assert_allclose(ours, _scipy_angles(Qa, Qb), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(float(mso(Qa, Qb)), np.mean(np.cos(angles) ** 2), atol=1e-12)


def test_mso_self_is_one_orthogonal_is_zero_and_nested_is_one():
    Q = _rand_basis(40, 6, 0)
    assert float(mso(Q, Q)) == pytest.approx(1.0, abs=1e-12)
    E = torch.eye(40, dtype=torch.float64)
    assert float(mso(E[:, :5], E[:, 5:12])) == pytest.approx(0.0, abs=1e-15)
    # a subspace inside a larger one overlaps fully (MSO divides by the smaller k)
    assert float(mso(E[:, :3], E[:, :10])) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(principal_angles(E[:, :5], E[:, 5:12]).numpy(), np.full(5, math.pi / 2))


def test_batched_angles_and_mso_match_loop():
    Qa = torch.stack([_rand_basis(16, 4, s) for s in range(3)])
    Qb = torch.stack([_rand_basis(16, 2, s + 10) for s in range(3)])
    batched_m, batched_a = mso(Qa, Qb), principal_angles(Qa, Qb)
    assert batched_m.shape == (3,) and batched_a.shape == (3, 2)
    for i in range(3):
        assert float(batched_m[i]) == pytest.approx(float(mso(Qa[i], Qb[i])), abs=1e-12)
        np.testing.assert_allclose(batched_a[i].numpy(), principal_angles(Qa[i], Qb[i]).numpy(), atol=1e-12)


@pytest.mark.parametrize("ka,kb,D", [(5, 5, 40), (2, 10, 50)])
def test_random_baseline_matches_simulation(ka, kb, D):
    # Mean over 200 independent random pairs. The baseline is the exact expectation, so the mean differs
    # from it only by sampling noise: accept 4 standard errors (estimated from the draws themselves;
    # a false alarm has probability < 1e-4), and check the standard error is small against the baseline
    # so the test has power (max(ka, kb)/D vs e.g. ka*kb/D^2 or 1/D would be rejected).
    g = _gen(ka * 1000 + kb)
    Qa = orthonormalize(torch.randn(200, D, ka, generator=g, dtype=torch.float64))  # batched QR
    Qb = orthonormalize(torch.randn(200, D, kb, generator=g, dtype=torch.float64))
    vals = mso(Qa, Qb).numpy()
    base = mso_random_baseline(ka, kb, D)
    se = vals.std(ddof=1) / math.sqrt(len(vals))
    assert se < 0.1 * base
    assert abs(vals.mean() - base) < 4 * se
    assert base == max(ka, kb) / D


def test_projector_is_idempotent_symmetric_with_trace_k():
    Q = _rand_basis(10, 3, 0)
    P = projector(Q)
    torch.testing.assert_close(P @ P, P)
    torch.testing.assert_close(P, P.T)
    assert float(torch.trace(P)) == pytest.approx(3.0)


def test_orthonormalize_qr_and_rank_dropping():
    A = torch.randn(12, 4, generator=_gen(0))
    Q = orthonormalize(A)
    assert Q.dtype == torch.float32 and Q.shape == (12, 4)
    torch.testing.assert_close(Q.T @ Q, torch.eye(4), atol=1e-5, rtol=0)
    assert float(mso(Q, A.double())) > 0  # sanity: same span as A
    np.testing.assert_allclose(principal_angles(Q, orthonormalize(A.double(), rtol=1e-12)).numpy(), 0, atol=1e-5)
    A64 = A.double()
    dep = torch.cat([A64, A64[:, :2] @ torch.randn(2, 3, generator=_gen(1), dtype=torch.float64)], dim=1)
    assert orthonormalize(dep, rtol=1e-10).shape == (12, 4)  # rank 4 from 7 columns


# ------------------------------------------------------------------------------------------- energy basis


def _with_singular_values(s: list[float], D: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    U = _rand_basis(D, len(s), seed)
    V = _rand_basis(n, len(s), seed + 1)
    return U @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ V.T, U


@pytest.mark.parametrize("dtype", DTYPES)
def test_energy_basis_k_is_smallest_reaching_eta(dtype):
    # squared singular values 4, 3, 2, 1 (total 10): cumulative energy 0.4, 0.7, 0.9, 1.0
    X, U = _with_singular_values([2.0, math.sqrt(3), math.sqrt(2), 1.0], D=30, n=20)
    X = X.to(dtype)
    expect = {0.01: 1, 0.4: 1, 0.41: 2, 0.7: 2, 0.71: 3, 0.9: 3, 0.95: 4, 1.0: 4}
    for eta, k in expect.items():
        res = energy_basis(X, eta)
        assert res.k == k, (eta, res.k)
        assert res.basis.shape == (30, k) and res.basis.dtype == dtype
        # the basis spans the top-k singular directions
        assert float(mso(res.basis, U[:, :k])) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(energy_basis(X, 0.5).energy[:4].numpy(), [0.4, 0.7, 0.9, 1.0], atol=1e-6)


def test_energy_basis_centred_vs_uncentred_on_offset_data():
    # 100 points = a large offset along e0 plus spread in span(e1, e2).
    D, n = 10, 100
    g = _gen(3)
    X = torch.zeros(D, n, dtype=torch.float64)
    X[0] = 10.0
    X[1:3] = torch.randn(2, n, generator=g, dtype=torch.float64)
    e0 = torch.eye(D, dtype=torch.float64)[:, :1]
    unc = energy_basis(X, 0.5)
    cen = energy_basis(X, 0.5, centered=True)
    # Uncentred: the offset carries ~97% of the energy and is the first direction.
    assert unc.k == 1 and float(mso(unc.basis, e0)) > 0.99
    # Centred: the offset is removed; the basis lies in the spread plane, orthogonal to e0.
    assert float(mso(cen.basis, e0)) < 1e-6
    assert energy_basis(X, 0.999).k == 3 and energy_basis(X, 0.999, centered=True).k == 2


def test_energy_basis_rejects_bad_eta_and_handles_zero_data():
    with pytest.raises(ValueError, match="eta"):
        energy_basis(torch.randn(4, 3), 0.0)
    assert energy_basis(torch.zeros(4, 3), 0.5).k == 0


# ------------------------------------------------------------------------------------------- rank fraction


def test_rank_fraction_k_rule():
    assert rank_fraction_k((100, 40), 0.25) == 10
    assert rank_fraction_k((40, 100), 0.25) == 10
    assert rank_fraction_k((10, 30), 0.25) == 3  # 2.5 rounds half up
    assert rank_fraction_k((10, 30), 0.01) == 1  # at least one
    assert rank_fraction_k((10, 30), 1.0) == 10
    assert rank_fraction_k((576, 1536), 0.99) == 570
    with pytest.raises(ValueError):
        rank_fraction_k((5, 5), 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rank_fraction_randomized_matches_exact_with_spectral_gap(dtype):
    m, n, k = 300, 260, 5
    # 5 strong directions (singular values 50..30) over a flat floor of 1: a clear gap after k
    s = [50.0, 45.0, 40.0, 35.0, 30.0] + [1.0] * 100
    V, U = _with_singular_values(s, m, n, seed=7)
    V = V.to(dtype)
    f = k / min(m, n)
    auto = rank_fraction_basis(V, f)
    exact = rank_fraction_basis(V, f, method="exact")
    assert auto.method == "randomized" and exact.method == "exact"  # 5 + 10 <= 260 / 4 and min >= 256
    assert auto.k == exact.k == k and auto.basis.shape == (m, k) and auto.basis.dtype == dtype
    ang = principal_angles(auto.basis, exact.basis)
    assert float(ang.max()) < 1e-4
    assert float(principal_angles(exact.basis, U[:, :k]).max()) < 1e-4
    np.testing.assert_allclose(auto.singular_values.numpy(), s[:k], rtol=1e-5)
    # A large k falls back to the exact SVD.
    assert rank_fraction_basis(V, 0.5).method == "exact"


def test_randomized_svd_is_seeded_and_leaves_global_rng_alone():
    A = torch.randn(60, 40, generator=_gen(0), dtype=torch.float64)
    state = torch.get_rng_state()
    U1, _ = randomized_range_svd(A, 3, seed=1)
    assert torch.equal(state, torch.get_rng_state())
    U2, _ = randomized_range_svd(A, 3, seed=1)
    assert torch.equal(U1, U2)


# ------------------------------------------------------------------------------------------- Marchenko–Pastur


def test_mp_median_known_value_and_simulation():
    # beta = 1: the median of the quarter-circle-like MP law is 0.6528 (Gavish & Donoho 2014, mu_1).
    assert mp_median(1.0) == pytest.approx(0.6528, abs=2e-4)
    rng = np.random.default_rng(0)
    Y = rng.standard_normal((150, 600))
    ev = np.linalg.eigvalsh(Y @ Y.T / 600)
    assert np.median(ev) == pytest.approx(mp_median(0.25), rel=0.03)


def _spiked(D: int, n: int, rank: int, strength: float, sigma: float, seed: int) -> torch.Tensor:
    """sigma * noise + rank orthogonal spikes with singular values strength * edge."""
    g = _gen(seed)
    noise = sigma * torch.randn(D, n, generator=g, dtype=torch.float64)
    U = orthonormalize(torch.randn(D, rank, generator=g, dtype=torch.float64))
    V = orthonormalize(torch.randn(n, rank, generator=g, dtype=torch.float64))
    edge = sigma * (math.sqrt(D) + math.sqrt(n))
    s = torch.linspace(strength, 1.5 * strength, rank, dtype=torch.float64) * edge
    return U @ torch.diag(s) @ V.T + noise


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,n,rank", [(100, 100, 3), (200, 60, 5), (40, 300, 2), (150, 400, 8)])
def test_mp_rank_recovers_planted_rank(dtype, D, n, rank):
    for seed in range(3):
        X = _spiked(D, n, rank, strength=2.0, sigma=0.7, seed=seed).to(dtype)
        assert mp_rank(X) == rank, (D, n, rank, seed)
        assert mp_rank(X, sigma=0.7) == rank
        res = mp_basis(X)
        assert res.basis.shape == (D, rank) and res.basis.dtype == dtype
        assert res.sigma == pytest.approx(0.7, rel=0.08)
        assert res.edge < res.threshold < float(res.singular_values[rank - 1])


def test_mp_rank_is_zero_on_pure_noise_for_most_seeds():
    # The threshold sits at the Tracy-Widom 99th percentile; with sigma estimated a few percent of
    # matrices may still show one spurious direction. Demand at least 18 of 20.
    zeros = 0
    for seed in range(20):
        D, n = [(80, 80), (120, 40), (30, 150)][seed % 3]
        X = 2.5 * torch.randn(D, n, generator=_gen(seed), dtype=torch.float64)
        zeros += mp_rank(X) == 0
    assert zeros >= 18


def test_mp_noise_sigma_and_threshold_formulas():
    X = 3.0 * torch.randn(120, 50, generator=_gen(5), dtype=torch.float64)
    S = torch.linalg.svdvals(X)
    assert mp_noise_sigma(S, (120, 50)) == pytest.approx(3.0, rel=0.05)
    edge, thr = mp_threshold(1.0, (100, 25))
    assert edge == pytest.approx(15.0)
    assert thr > edge
    # the largest noise singular value sits near the edge
    assert float(S[0]) == pytest.approx(3.0 * (math.sqrt(120) + math.sqrt(50)), rel=0.05)
