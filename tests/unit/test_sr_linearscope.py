"""LinearScope on the super-resolution CNN: exactness against autograd, the bases, the energy measures, the run."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from probekit.image_bases import (best_k_fraction, dct_basis, detail_fraction, effective_support, random_basis,
                                  wavelet_basis, wavelet_subbands)
from probekit.probes.linearscope import LinearScope
from probekit.probes.linearscope_sr import SRAnalysisResult, analyze_sr
from probekit.sr_cnn import SRCNN, degrade, sr_patches, train_sr_cnn, upsample_baseline

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_net(seed: int = 0, width: int = 8) -> SRCNN:
    """An SRCNN whose residual branch is not zero (the class zero-initialises its last conv)."""
    torch.manual_seed(seed)
    net = SRCNN(width)
    torch.nn.init.normal_(net.body[4].weight, std=0.3)
    torch.nn.init.normal_(net.body[4].bias, std=0.1)
    return net.eval()


@pytest.fixture(scope="module")
def patches():
    return sr_patches("test", 6, seed=3)


# -- LinearScope of the SR network is exact ---------------------------------------------------------------------


def test_matrix_equals_autograd_jacobian_float64(patches):
    net = _random_net()
    scope = LinearScope(net, dtype=torch.float64)
    net64 = scope.model
    for x in patches[0][:3].double():
        A = scope.matrix(x)
        J = torch.autograd.functional.jacobian(lambda z: net64(z[None])[0], x).reshape(256, 64)
        assert A.shape == (256, 64)
        assert float((A - J).abs().max()) <= 1e-10
        # the residual branch matters: A is not plain bilinear upsampling, and the ReLUs take both decisions
        up = torch.nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        B = torch.autograd.functional.jacobian(lambda z: up(z[None])[0], x).reshape(256, 64)
        assert float((A - B).abs().max()) > 1e-3
        z = net64.body[0](x[None])
        assert 0 < float((z > 0).double().mean()) < 1


def test_y1_at_x0_is_output_and_bias_is_y1_at_zero(patches):
    net = _random_net(1)
    scope = LinearScope(net, dtype=torch.float64)
    x = patches[0][0].double()
    y0, y1 = scope.forward_pair(x, x)
    f = scope.model(x[None])[0]
    assert torch.allclose(y1, f, atol=1e-12, rtol=0) and torch.allclose(y0, f, atol=1e-12, rtol=0)
    _, y_zero = scope.forward_pair(x, torch.zeros_like(x))
    b = scope.bias(x)
    assert torch.equal(b, y_zero.reshape(-1))
    # independent: for a ReLU network b = f(x) − J x (FullGrad's bias term)
    J = torch.autograd.functional.jacobian(lambda z: scope.model(z[None])[0], x).reshape(256, 64)
    assert float((b - (f.reshape(-1) - J @ x.reshape(-1))).abs().max()) <= 1e-12
    assert float(b.abs().max()) > 1e-3  # a real bias term, not a vacuous zero


# -- bases and energy measures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 8), (16, 16)])
@pytest.mark.parametrize("kind", ["haar", "db2", "dct", "random"])
def test_bases_are_orthonormal(shape, kind):
    n = shape[0] * shape[1]
    B = {"haar": lambda: wavelet_basis(shape, "haar"), "db2": lambda: wavelet_basis(shape, "db2"),
         "dct": lambda: dct_basis(shape), "random": lambda: random_basis(n, 5)}[kind]()
    assert B.shape == (n, n)
    np.testing.assert_allclose(B.T @ B, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(B @ B.T, np.eye(n), atol=1e-12)


@pytest.mark.parametrize("wavelet", ["haar", "db2"])
def test_wavelet_basis_gives_pywt_coefficients(wavelet):
    import pywt

    img = np.random.default_rng(0).standard_normal((16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # db2 at full depth: periodised coarse levels (documented)
        c = pywt.wavedec2(img, wavelet, mode="periodization", level=4)
    ref = np.concatenate([c[0].ravel()] + [d.ravel() for lvl in c[1:] for d in lvl])
    np.testing.assert_allclose(wavelet_basis((16, 16), wavelet) @ img.ravel(), ref, atol=1e-12)
    band = wavelet_subbands((16, 16), wavelet)
    assert c[0].size == 1 and band[0] == 0 and band[-3 * 64:].min() == 1  # the constant first, finest details last
    np.testing.assert_allclose(wavelet_basis((16, 16), wavelet)[0], np.full(256, 1 / 16), atol=1e-12)


def test_haar_top_k_energy_by_hand():
    # one 2×2 Haar step of [[4, 2], [2, 0]]: approximation (4+2+2+0)/2 = 4, details (4+2−2−0)/2 = 2,
    # (4−2+2−0)/2 = 2, (4−2−2+0)/2 = 0: energies 16, 4, 4, 0 of 24
    B = wavelet_basis((2, 2), "haar")
    c2 = (B @ np.array([4.0, 2.0, 2.0, 0.0])) ** 2
    np.testing.assert_allclose(np.sort(c2)[::-1], [16, 4, 4, 0], atol=1e-12)
    np.testing.assert_allclose(best_k_fraction(c2, [0, 1, 2, 3, 4]), [0, 16 / 24, 20 / 24, 1, 1], atol=1e-12)
    # a 4×4 image constant on 2×2 blocks has no finest-scale detail; a finest Haar atom is all detail
    blocks = np.kron(np.array([[1.0, -2.0], [3.0, 0.5]]), np.ones((2, 2)))
    assert detail_fraction(blocks.ravel(), (4, 4)) == pytest.approx(0.0, abs=1e-12)
    atom = np.kron(np.eye(2), np.array([[1.0, -1.0], [1.0, -1.0]]))
    assert detail_fraction(atom.ravel(), (4, 4)) == pytest.approx(1.0)


def test_detail_fraction_matches_pywt_and_support_closed_forms():
    import pywt

    V = np.random.default_rng(1).standard_normal((5, 64))
    ref = []
    for v in V:
        cA, (cH, cV, cD) = pywt.dwt2(v.reshape(8, 8), "haar", mode="periodization")
        ref.append((cH ** 2).sum() + (cV ** 2).sum() + (cD ** 2).sum())
    np.testing.assert_allclose(detail_fraction(V, (8, 8)), np.array(ref) / (V ** 2).sum(1), atol=1e-12)
    e = np.zeros(64)
    e[7] = 3.0
    assert effective_support(e) == pytest.approx(1 / 64)
    assert effective_support(np.full(64, -2.0)) == pytest.approx(1.0)
    cosine = np.cos(2 * np.pi * 3 * np.arange(64) / 64)
    assert effective_support(cosine) == pytest.approx(2 / 3)


def test_best_k_fraction_rejects_bad_input():
    with pytest.raises(ValueError, match="non-negative"):
        best_k_fraction([1.0, -1.0], 1)
    with pytest.raises(ValueError, match="k must lie"):
        best_k_fraction([1.0, 2.0], 3)
    with pytest.raises(ValueError, match="divisible"):
        wavelet_basis((6, 6), "haar", level=2)
    with pytest.raises(ValueError, match="unknown wavelet"):
        wavelet_basis((8, 8), "nope")


# -- training and data --------------------------------------------------------------------------------------------


def test_training_is_seeded():
    a, info_a = train_sr_cnn(seed=0, steps=15, n_train=128, width=4)
    b, info_b = train_sr_cnn(seed=0, steps=15, n_train=128, width=4)
    c, _ = train_sr_cnn(seed=1, steps=15, n_train=128, width=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert info_a == info_b
    assert float(sa["body.4.weight"].abs().max()) > 0  # it trained away from the zero start


def test_patches_are_seeded_textured_and_train_test_disjoint():
    from probekit.sr_cnn import _band_starts

    lr, hr = sr_patches("test", 8, seed=2)
    lr2, hr2 = sr_patches("test", 8, seed=2)
    assert torch.equal(hr, hr2) and torch.equal(lr, degrade(hr))
    assert lr.shape == (8, 1, 8, 8) and hr.shape == (8, 1, 16, 16)
    assert float(hr.flatten(1).std(1).min()) >= 0.05
    cols = {split: {c + d for c in _band_starts(split, 320, 16) for d in range(16)} for split in ("train", "test")}
    assert cols["train"] and cols["test"] and not cols["train"] & cols["test"]
    with pytest.raises(ValueError, match="split"):
        sr_patches("val", 2)


def test_upsample_baseline_is_torch_interpolate():
    lr = torch.rand(2, 1, 4, 4)
    up = upsample_baseline(lr, "bicubic")
    ref = torch.nn.functional.interpolate(lr, scale_factor=2, mode="bicubic", align_corners=False).clamp(0, 1)
    assert torch.equal(up, ref)
    assert torch.equal(upsample_baseline(lr, "nearest"), lr.repeat_interleave(2, -1).repeat_interleave(2, -2))


# -- the analysis ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_result(patches):
    lr, hr = patches
    return analyze_sr(_random_net(2), lr, hr, ks=(1, 4, 8), k_headline=4, n_boot=200, example=1)


def test_analysis_svd_energy_is_the_closed_form(small_result):
    r = small_result
    A = np.asarray(r.example["matrix"])
    s2 = np.linalg.svd(A, compute_uv=False) ** 2
    want = np.cumsum(s2)[[0, 3, 7]] / s2.sum()
    np.testing.assert_allclose(r.energy["operator_out"]["svd"][1], want, atol=1e-10)
    # the operator-energy definition applied to the (completed) left singular basis gives the same numbers
    U = np.linalg.svd(A)[0]
    np.testing.assert_allclose(best_k_fraction(((U.T @ A) ** 2).sum(1), [1, 4, 8]), want, atol=1e-10)
    # and no basis beats the SVD (Eckart–Young)
    for b in ("haar", "db2", "dct", "random"):
        assert np.all(r.energy["operator_out"][b] <= r.energy["operator_out"]["svd"] + 1e-12)
    assert r.jacobian_max_abs_diff <= 1e-10 and r.reconstruction_max_abs_err <= 1e-10


def test_analysis_image_energy_by_hand(small_result, patches):
    r = small_result
    ex = r.example
    y = np.asarray(ex["output"]).ravel()
    yc = y - y.mean()
    U = np.asarray(ex["left"])
    np.testing.assert_allclose(r.energy["image"]["svd"][1, 1], ((U[:, :4].T @ yc) ** 2).sum() / (yc @ yc), atol=1e-12)
    c2 = np.sort((wavelet_basis((16, 16), "haar") @ yc) ** 2)[::-1]
    np.testing.assert_allclose(r.energy["image"]["haar"][1], np.cumsum(c2)[[0, 3, 7]] / c2.sum(), atol=1e-12)
    assert np.asarray(ex["hr"]) == pytest.approx(patches[1][1, 0].double().numpy())


def test_bilinear_network_is_perfectly_local_and_has_no_template(patches):
    lr, hr = patches
    net = SRCNN(4)  # zero last conv: exactly bilinear upsampling
    r = analyze_sr(net, lr[:2], hr[:2], ks=(1, 8), k_headline=8, n_boot=100)
    np.testing.assert_allclose(r.likeness["rows_window"], 1.0, atol=1e-12)
    np.testing.assert_allclose(r.likeness["cols_window"], 1.0, atol=1e-12)
    np.testing.assert_allclose(r.likeness["template_share"], 0.0, atol=1e-20)
    assert float(r.likeness["random_rows_window"].mean()) < 0.3
    np.testing.assert_allclose(r.psnr["network"], r.psnr["bilinear"], atol=1e-6)


def test_headline_carries_n_and_intervals_and_too_few(small_result):
    h = small_result.headline()
    assert h["psnr_gain_vs_bicubic_db"].n == 6 and h["psnr_gain_vs_bicubic_db"].too_small
    for est in h.values():
        assert est.low <= est.value <= est.high
    v = small_result.verdict
    assert {"energy_like_wavelets", "localised", "oscillating", "wavelet_sparse", "claim_holds"} <= set(v)
    assert v["claim_holds"] == (v["energy_like_wavelets"] and v["localised"] and v["oscillating"]
                                and v["wavelet_sparse"])
    assert "too few to conclude" in v["text"]


def test_result_round_trips_and_figures_are_titled(small_result):
    d = json.loads(json.dumps(small_result.to_dict()))
    back = SRAnalysisResult.from_dict(d)
    np.testing.assert_array_equal(back.energy["image"]["db2"], small_result.energy["image"]["db2"])
    assert back.headline()["operator_energy_k4_haar"] == small_result.headline()["operator_energy_k4_haar"]
    figs = small_result.figures()
    assert len(figs) == 8
    for fig in figs:
        assert fig.layout.title.text
        heat = [t for t in fig.data if t.type == "heatmap"]
        if heat:
            lay = fig.layout.to_plotly_json()
            axes = {t.coloraxis for t in heat}
            assert all(lay[ca]["colorbar"]["title"]["text"] for ca in axes), fig.layout.title.text
        else:
            assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text


def test_analysis_rejects_bad_input(patches):
    lr, hr = patches
    with pytest.raises(ValueError, match="k_headline"):
        analyze_sr(_random_net(), lr, hr, ks=(1, 2), k_headline=4)
    with pytest.raises(ValueError, match="ks must be"):
        analyze_sr(_random_net(), lr, hr, ks=(8, 128), k_headline=8)
    with pytest.raises(ValueError, match="need lr"):
        analyze_sr(_random_net(), lr, hr[:, :, :8])
    with pytest.raises(ValueError, match="not to the ×2 shape"):
        analyze_sr(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, padding=1)), lr, hr)


def test_config_validation_names_the_key():
    from probekit.linearscope_sr_run import SRAnalysisConfig

    with pytest.raises(ValueError, match="SRAnalysisConfig.lr_size"):
        SRAnalysisConfig(lr_size=6)
    with pytest.raises(ValueError, match="SRAnalysisConfig.k_headline"):
        SRAnalysisConfig(k_headline=3)
    with pytest.raises(ValueError, match="SRAnalysisConfig.n_test"):
        SRAnalysisConfig(n_test=0)


def test_run_end_to_end_tiny(tmp_path, monkeypatch):
    from probekit.linearscope_sr_run import RESULT_KIND, SRAnalysisConfig, run_sr_analysis

    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path / "cache"))
    cfg = SRAnalysisConfig(n_test=4, steps=10, width=4, ks=(1, 8), k_headline=8, n_boot=100,
                           out=str(tmp_path / "out"))
    res = run_sr_analysis(cfg)
    payload = json.loads((tmp_path / "out" / "sr-cnn.json").read_text())
    assert payload["kind"] == RESULT_KIND and payload["n"] == 4
    assert payload["headline"]["operator_energy_k8_haar"]["too_small"] is True
    assert payload["jacobian_max_abs_diff"] <= 1e-10
    assert (tmp_path / "out" / "sr-cnn.html").stat().st_size > 10_000
    assert (tmp_path / "cache" / "models" / "sr-cnn" / "model.safetensors").is_file()
    assert res.model_info["steps"] == 10


# -- image-to-image: copy, move, template ----------------------------------------------------------------------------


def test_window_energy_is_a_box_sum():
    from probekit.probes.linearscope_i2i import window_energy

    E = np.random.default_rng(0).random((2, 5, 6))
    S = window_energy(E, 1)
    for m, i, j in ((0, 0, 0), (1, 2, 3), (0, 4, 5), (1, 4, 0)):
        assert S[m, i, j] == pytest.approx(E[m, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].sum())


def _shift_net(di: int, dj: int, size: int = 8):
    """A linear image-to-image map that copies the input shifted by (di, dj) (zeros flow in), plus a bias."""
    k = 2 * max(abs(di), abs(dj)) + 1
    conv = torch.nn.Conv2d(1, 1, k, padding=k // 2)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, k // 2 + di, k // 2 + dj] = 1.0
        conv.bias.fill_(0.5)
    return torch.nn.Sequential(conv, torch.nn.ReLU())


def test_copy_move_and_template_on_known_maps():
    from probekit.probes.linearscope_i2i import analyze_i2i

    x = torch.rand(3, 1, 8, 8)
    copy = analyze_i2i(_shift_net(0, 0), x, x, n_boot=100)  # y = relu(x + 0.5) = x + 0.5 on [0, 1]
    np.testing.assert_allclose(copy.measures["copy_share"], 1.0)
    np.testing.assert_allclose(copy.measures["move_fraction"], 0.0)
    np.testing.assert_allclose(copy.measures["diagonal_gain"], 1.0)
    y = x.double().reshape(3, -1) + 0.5
    np.testing.assert_allclose(copy.measures["template_share"], 16.0 / (y ** 2).sum(1).numpy(), rtol=1e-12)
    moved = analyze_i2i(_shift_net(3, 0), x, x, n_boot=100)  # output (i, j) reads input (i + 3, j)
    # the last 3 output lines read zero padding (zero rows, left out); every other row reads only a pixel 3 lines away
    np.testing.assert_allclose(moved.measures["diagonal_gain"], 0.0)
    np.testing.assert_allclose(moved.measures["move_fraction"], 1.0)
    np.testing.assert_allclose(moved.measures["copy_share"], 0.0)
    np.testing.assert_allclose(moved.measures["best_window_share"], 1.0)
    near = analyze_i2i(_shift_net(1, 1), x, x, n_boot=100)  # a shift inside the own window is a copy, not a move
    np.testing.assert_allclose(near.measures["move_fraction"], 0.0)
    assert moved.jacobian_max_abs_diff <= 1e-12 and copy.jacobian_max_abs_diff <= 1e-12
    assert moved.estimates()["move_fraction-random"].n == 3


def test_analyze_i2i_rejects_bad_input():
    from probekit.probes.linearscope_i2i import analyze_i2i

    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="max_shift"):
        analyze_i2i(_shift_net(0, 0), x, x, window=2, max_shift=3)
    with pytest.raises(ValueError, match="one shape"):
        analyze_i2i(_shift_net(0, 0), x, x[:, :, :4])


def test_i2i_run_end_to_end_tiny_and_seeded(tmp_path, monkeypatch):
    from probekit.denoise_cnn import train_denoise_cnn
    from probekit.linearscope_i2i_run import RESULT_KIND, I2IAnalysisConfig, run_i2i_analysis

    a, _ = train_denoise_cnn(seed=0, steps=5, n_train=64, width=4)
    b, _ = train_denoise_cnn(seed=0, steps=5, n_train=64, width=4)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path / "cache"))
    res = run_i2i_analysis(I2IAnalysisConfig(n_test=3, steps=5, width=4, n_boot=50, out=str(tmp_path / "out")))
    payload = json.loads((tmp_path / "out" / "denoise-cnn.json").read_text())
    assert payload["kind"] == RESULT_KIND and payload["n"] == 3
    assert payload["estimates"]["copy_share"]["too_small"] is True
    assert res.jacobian_max_abs_diff <= 1e-10
    assert len(res.figures()) == 4 and (tmp_path / "out" / "denoise-cnn.html").is_file()
    with pytest.raises(ValueError, match="I2IAnalysisConfig.max_shift"):
        I2IAnalysisConfig(window=2, max_shift=4)


def test_cli_names_a_bad_k(capsys):
    from probekit.cli import main

    assert main(["linearscope-sr", "--k", "3"]) == 2
    assert "SRAnalysisConfig.k_headline=3" in capsys.readouterr().err
