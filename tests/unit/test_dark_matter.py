"""SAE dark matter: decomposition on planted errors, degenerate cases, pursuit, per-token scaling, earlier layer."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from probekit.probes.dark_matter import (
    DarkMatterResult,
    earlier_layer_prediction,
    error_decomposition,
    fvu_split_across_widths,
    gradient_pursuit,
    per_token_scaling,
    pursuit_refit,
)


class TopKSAE:
    """Stand-in SAE: tied random unit-norm dictionary, TopK activation (the interface probekit's SAE has)."""

    def __init__(self, d_in=16, d_sae=64, k=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(d_sae, d_in, generator=g)
        self.W_dec = W / W.norm(dim=1, keepdim=True)
        self.W_enc = self.W_dec.T.clone()
        self.b_enc = torch.zeros(d_sae)
        self.b_dec = 0.1 * torch.randn(d_in, generator=g)
        self.cfg = SimpleNamespace(d_in=d_in, d_sae=d_sae, architecture="topk", k=k)

    def encode(self, x):
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        v, i = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, i, v.relu())

    def decode(self, f):
        return f @ self.W_dec + self.b_dec

    def __call__(self, x):
        return self.decode(self.encode(x))


class PlantedSAE:
    """x̂ = x − e with a chosen error function ``e = err(x)`` (codes are x itself)."""

    def __init__(self, err):
        self.err = err

    def encode(self, x):
        return x

    def decode(self, f):
        return f - self.err(f)


def _batches(x, bs):
    return [x[i:i + bs] for i in range(0, len(x), bs)]


def test_planted_linear_fraction_is_recovered():
    d, n_tr, n_te, sigma = 16, 12000, 6000, 0.7
    g = torch.Generator().manual_seed(0)
    A = 0.3 * torch.randn(d, d, generator=g)
    sae = PlantedSAE(lambda x: x @ A + sigma * torch.randn(x.shape, generator=g))
    x = torch.randn(n_tr + n_te, d, generator=g)
    res = error_decomposition(sae, _batches(x[:n_tr], 1000), _batches(x[n_tr:], 777))
    # x ~ N(0, I): Var(xA) = ‖A‖_F², Var(ε) = d σ², so R² = ‖A‖² / (‖A‖² + d σ²)
    lin, noise = float(A.pow(2).sum()), d * sigma ** 2
    assert res.r2_error_vector == pytest.approx(lin / (lin + noise), abs=0.01)
    assert res.r2_error_vector_train == pytest.approx(lin / (lin + noise), abs=0.01)
    # FVU split over Σ‖x − x̄‖² ≈ n d
    assert res.fvu_linear == pytest.approx(lin / d, rel=0.05)
    assert res.fvu_nonlinear == pytest.approx(noise / d, rel=0.05)
    assert res.fvu == pytest.approx(res.fvu_linear + res.fvu_nonlinear + res.fvu_cross, rel=1e-9)
    assert abs(res.fvu_cross) < 0.01 * res.fvu
    assert (res.n_train, res.n_test, res.d_in, res.fit_intercept) == (n_tr, n_te, d, False)
    assert res.error_norm.shape == (n_te,) and res.nonlinear_norm.shape == (n_te,)
    assert torch.allclose(res.estimator.coef_.float(), A, atol=0.05)


def test_norm_regression_and_intercept_on_topk_sae_with_dict_batches():
    sae = TopKSAE()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6000, 16, generator=g) * 2 + 0.5
    hook = "blocks.3.hook_resid_post"
    batches = [{hook: b, "rows": torch.arange(len(b))} for b in _batches(x, 500)]
    res = error_decomposition(sae, batches[:8], batches[8:], hook=hook, fit_intercept=True, label="topk")
    e = x[4000:] - sae(x[4000:])
    sst = (x[4000:] - x[4000:].mean(0)).pow(2).sum()
    assert res.fvu == pytest.approx(float(e.pow(2).sum() / sst), rel=1e-5)
    assert res.l0 == pytest.approx(4.0)
    assert 0 < res.r2_error_vector < 1 and 0 < res.r2_error_norm_sq < 1 and 0 < res.r2_error_norm < 1
    assert res.error_norm_pred.shape == (2000,)
    assert res.fvu == pytest.approx(res.fvu_linear + res.fvu_nonlinear + res.fvu_cross, rel=1e-9)
    d = res.to_dict()
    json.dumps(d)
    assert "estimator" not in d and "error_norm" not in d and d["label"] == "topk"
    figs = res.figures(hover_text=[f"tok{i}" for i in range(2000)], max_points=300)
    assert len(figs) == 3 and len(figs[2].data[0].x) == 300 and figs[2].data[0].text[0] == "tok0"
    with pytest.raises(ValueError, match="hook"):
        error_decomposition(sae, batches[:2], batches[2:4])


def test_perfect_sae_gives_zero_error_without_dividing_by_zero():
    sae = PlantedSAE(lambda x: torch.zeros_like(x))
    x = torch.randn(800, 8, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = error_decomposition(sae, _batches(x[:500], 128), _batches(x[500:], 128))
    assert res.fvu == 0 and res.fvu_linear == 0 and res.fvu_nonlinear == 0 and res.fvu_cross == 0
    assert np.isnan(res.r2_error_vector) and np.isnan(res.r2_error_norm_sq) and np.isnan(res.r2_error_norm)
    assert any("no variance" in n for n in res.notes)
    json.dumps(res.to_dict())  # NaN survives as a float


def test_fvu_is_centred_offset_invariant():
    sae = TopKSAE(seed=3)
    x = torch.randn(3000, 16, generator=torch.Generator().manual_seed(3))
    res0 = error_decomposition(sae, _batches(x[:2000], 512), _batches(x[2000:], 512), keep_per_token=False)
    c = 50.0 * torch.ones(16)
    shifted = TopKSAE(seed=3)
    shifted.b_dec = sae.b_dec + c  # same error on x + c
    xs = x + c
    res1 = error_decomposition(shifted, _batches(xs[:2000], 512), _batches(xs[2000:], 512),
                               fit_intercept=True, keep_per_token=False)
    res0i = error_decomposition(sae, _batches(x[:2000], 512), _batches(x[2000:], 512), fit_intercept=True)
    assert res1.fvu == pytest.approx(res0.fvu, rel=1e-4)
    about_zero = float((x[2000:] - sae(x[2000:])).pow(2).sum() / xs[2000:].pow(2).sum())
    assert about_zero < 0.05 * res1.fvu  # the uncentred definition would be far off
    # with an intercept the whole decomposition is offset invariant
    assert res1.r2_error_vector == pytest.approx(res0i.r2_error_vector, abs=1e-4)
    assert res1.fvu_nonlinear == pytest.approx(res0i.fvu_nonlinear, rel=1e-3)


def test_gradient_pursuit_recovers_planted_sparse_codes():
    g = torch.Generator().manual_seed(4)
    d_in, d_sae, n, k = 64, 256, 50, 3
    W = torch.randn(d_sae, d_in, generator=g, dtype=torch.float64)
    W /= W.norm(dim=1, keepdim=True)
    b = torch.randn(d_in, generator=g, dtype=torch.float64)
    support = torch.stack([torch.randperm(d_sae, generator=g)[:k] for _ in range(n)])
    vals = (1 + torch.rand(n, k, generator=g, dtype=torch.float64)) * torch.where(
        torch.rand(n, k, generator=g) < 0.5, -1.0, 1.0).double()
    codes = torch.zeros(n, d_sae, dtype=torch.float64).scatter(1, support, vals)
    x = codes @ W + b
    res = gradient_pursuit(x, W, 40, b, chunk_size=25)
    assert (res.x_hat - x).abs().max() < 1e-5
    dense = res.dense(d_sae)
    found = dense.abs() > 1e-3
    assert torch.equal(found, codes != 0)
    assert torch.allclose(dense[found], codes[codes != 0], atol=1e-5)
    assert torch.equal(torch.sort(res.indices[:, :k]).values, torch.sort(support).values)  # first k picks
    # orthonormal atoms: exact after exactly k steps, and a per-token step count is honoured
    Q = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))[0].T  # rows orthonormal
    xo = codes[:, :d_in] @ Q
    kk = (codes[:, :d_in] != 0).sum(-1)
    res_o = gradient_pursuit(xo, Q, kk)
    assert (res_o.x_hat - xo).abs().max() < 1e-10
    assert torch.equal((res_o.indices >= 0).sum(-1), kk)
    partial = gradient_pursuit(x, W, torch.ones(n, dtype=torch.long), b)
    assert (partial.indices >= 0).sum() == n and (partial.x_hat - x).norm() > 1e-2


def test_pursuit_refit_runs_with_sae_l0():
    sae = TopKSAE(d_in=16, d_sae=48, k=3, seed=5)
    x = torch.randn(1500, 16, generator=torch.Generator().manual_seed(5))
    res = pursuit_refit(sae, _batches(x[:1000], 256), _batches(x[1000:], 256))
    assert res.l0 == pytest.approx(3.0) and res.label == "gradient pursuit"
    assert 0 < res.fvu < 1 and np.isfinite(res.r2_error_vector)


def test_per_token_scaling_planted():
    g = torch.Generator().manual_seed(6)
    n = 4000
    e1 = torch.rand(n, generator=g, dtype=torch.float64) * 2 + 1
    nl1 = torch.rand(n, generator=g, dtype=torch.float64)
    noise = torch.randn(n, generator=g, dtype=torch.float64) * 0.3
    e2 = 0.5 * e1 + 0.2            # exactly affine in e1
    e3 = 0.8 * e1 + noise          # R² = 0.64 var(e1) / (0.64 var(e1) + 0.09)
    e4 = e1 + 2.0 * nl1            # exact with the nonlinear norm as second regressor
    vec = torch.randn(n, 5, generator=g, dtype=torch.float64)
    errors = {16: e1[:, None] * vec / vec.norm(dim=1, keepdim=True), 32: e2, 64: e3, 128: e4}  # (n, d) or (n,)
    res = per_token_scaling(errors, {16: nl1, 32: nl1, 64: nl1, 128: nl1})
    assert res.widths == [16, 32, 64, 128] and res.n_tokens == n
    np.testing.assert_allclose(np.diag(res.r2), 1.0, atol=1e-12)
    assert res.r2[0, 1] == pytest.approx(1.0, abs=1e-12) and res.r2[1, 0] == pytest.approx(1.0, abs=1e-12)
    v = 0.64 * float(e1.var())
    assert res.r2[0, 2] == pytest.approx(v / (v + 0.09), abs=0.02)
    assert res.r2[0, 3] < 0.9 and res.r2_with_nonlinear[0, 3] == pytest.approx(1.0, abs=1e-10)
    assert res.gain[0, 3] > 0.1 and abs(res.gain[0, 1]) < 1e-10
    figs = res.figures()
    assert len(figs) == 2 and np.asarray(figs[0].data[0].z).shape == (4, 4)
    json.dumps(res.to_dict())
    with pytest.raises(ValueError, match="same tokens"):
        per_token_scaling({1: e1, 2: e1[:10]})


def test_earlier_layer_recovers_planted_dependence():
    g = torch.Generator().manual_seed(7)
    d, n = 8, 6000
    B = torch.randn(d, d, generator=g) * 0.5
    x_prev = torch.randn(n, d, generator=g)
    x = x_prev * x_prev.abs()                      # layer l: a nonlinear function of layer l − 1
    # the SAE's error is linear in x_prev = sign(x) sqrt|x|, but not in x
    sae = PlantedSAE(lambda z: (z.sign() * z.abs().sqrt()) @ B)
    batches = [{"x": x[i:i + 700], "x_prev": x_prev[i:i + 700]} for i in range(0, n, 700)]
    res = earlier_layer_prediction(sae, batches[:6], batches[6:])
    assert res.sets == ["x", "previous layer", "x + previous layer"]
    assert res.r2["x"] < 0.95
    assert res.r2["previous layer"] > 0.9999 and res.r2["x + previous layer"] > 0.9999
    assert res.nonlinear_reduction["previous layer"] > 0.999 and res.nonlinear_reduction["x"] == 0
    assert res.n_train == 4200 and res.n_test == 1800
    json.dumps(res.to_dict())
    assert len(res.figures()) == 1
    with pytest.raises(ValueError, match="exactly linear"):
        earlier_layer_prediction(sae, batches[:1], batches[1:2], regressor_sets={"bad": ["x", "x_hat"]})


def _fake(lin, nl, cross=0.0):
    return DarkMatterResult(n_train=1, n_test=1, d_in=1, fit_intercept=False, fvu=lin + nl + cross, fvu_linear=lin,
                            fvu_nonlinear=nl, fvu_cross=cross, r2_error_vector=0.5, r2_error_vector_train=0.5,
                            r2_error_norm_sq=0.9, r2_error_norm=0.9)


def test_fvu_split_across_widths_definition():
    res = fvu_split_across_widths({4096: _fake(0.10, 0.08, 0.001), 1024: _fake(0.20, 0.09), 16384: _fake(0.05, 0.08)})
    assert res.widths == [1024, 4096, 16384] and res.reference_width == 16384
    np.testing.assert_allclose(res.absent, [0.15, 0.05, 0.0])
    np.testing.assert_allclose(res.linear, [0.05, 0.05, 0.05])
    np.testing.assert_allclose(np.add.reduce([res.absent, res.linear, res.nonlinear, res.cross]), res.fvu)
    assert len(res.figures()[0].data) == 4
    json.dumps(res.to_dict())
    with pytest.raises(ValueError):
        fvu_split_across_widths({1: _fake(0.1, 0.1)})


def test_fvu_split_figure_modes_and_sources():
    from probekit.probes.dark_matter import fvu_split_figure

    res = fvu_split_across_widths({1024: _fake(0.20, 0.09), 16384: _fake(0.05, 0.08, 0.01)})
    (fig,) = res.figures(hook="blocks.2.hook_resid_post")
    np.testing.assert_allclose([list(t.y) for t in fig.data], [[0.15, 0.0], [0.05, 0.05], [0.09, 0.08], [0.0, 0.01]])
    assert list(fig.data[0].x) == ["1024", "16384"]
    assert "blocks.2.hook_resid_post" in fig.layout.title.text and "width 16384" in fig.layout.title.text
    (total,) = res.figures(mode="total")
    assert [t.name for t in total.data] == ["FVU"] and list(total.data[0].y) == pytest.approx([0.29, 0.14])
    assert "absent" not in total.layout.title.text
    by_label = fvu_split_figure({"a": _fake(0.1, 0.2, 0.03), "b": _fake(0.3, 0.1)})
    assert [t.name for t in by_label.data] == ["linear error", "nonlinear error", "cross term (held out)"]
    assert [list(t.y) for t in by_label.data] == [[0.1, 0.3], [0.2, 0.1], [0.03, 0.0]]
    assert list(fvu_split_figure({"a": _fake(0.1, 0.2)}, mode="total").data[0].y) == pytest.approx([0.3])
    with pytest.raises(ValueError, match="mode must be one of"):
        res.figures(mode="grouped")


def test_r2_bars_and_error_scatter_options():
    from probekit.probes.dark_matter import error_norm_scatter, r2_bars_figure

    fig = r2_bars_figure({128: _fake(0.1, 0.1), 256: _fake(0.1, 0.1)}, xaxis_title="SAE width")
    assert list(fig.data[0].x) == ["128", "256"] and list(fig.data[1].y) == [0.9, 0.9]
    assert fig.layout.xaxis.title.text == "SAE width"
    actual, pred = [0.1, 0.7, 0.3], [0.2, 0.5, 0.9]
    sc = error_norm_scatter(actual, pred, hover_text=["a", "b", "c"])
    assert list(sc.data[0].x) == actual and list(sc.data[0].y) == pred  # float64 kept: the given values
    assert [t.name for t in sc.data] == ["tokens", "y = x"] and list(sc.data[1].x) == [0, 0.9]
    bare = error_norm_scatter(actual, pred, diagonal=False, max_points=2)
    assert [t.name for t in bare.data] == ["tokens"] and list(bare.data[0].x) == [0.1, 0.3]
