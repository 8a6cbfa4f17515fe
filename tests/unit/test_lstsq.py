"""StreamedLeastSquares against torch.linalg.lstsq and scikit-learn; streamed R² against r2_score."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score

from probekit.probes.lstsq import R2Accumulator, StreamedLeastSquares


def _data(n=1003, dx=12, dy=5, offset=30.0, seed=0):
    """float32 X with a large common offset (as residual streams have) and a noisy affine Y."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, dx, generator=g) * torch.linspace(0.5, 3, dx) + offset
    W = torch.randn(dx, dy, generator=g)
    Y = X @ W + 2.0 + 0.5 * torch.randn(n, dy, generator=g)
    return X.float(), Y.float()


def _batches(X, Y, bs):
    return [(X[i:i + bs], Y[i:i + bs]) for i in range(0, len(X), bs)]


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("bs", [97, 250, 1003])  # 97 and 250 do not divide 1003
def test_no_intercept_matches_torch_lstsq(bs):
    X, Y = _data()
    est = StreamedLeastSquares(fit_intercept=False).fit(_batches(X, Y, bs))
    ref = torch.linalg.lstsq(X.double(), Y.double(), driver="gelsd").solution
    assert est.solver_ == "cholesky" and est.n_samples_seen_ == 1003
    assert est.coef_.dtype == torch.float64 and est.coef_.shape == (12, 5)
    assert _rel(est.coef_, ref) < 1e-6
    assert torch.all(est.intercept_ == 0)
    skl = LinearRegression(fit_intercept=False).fit(X.double().numpy(), Y.double().numpy())
    assert _rel(est.coef_, skl.coef_.T) < 1e-6


@pytest.mark.parametrize("bs", [64, 333])
def test_intercept_matches_sklearn(bs):
    X, Y = _data(seed=1)
    est = StreamedLeastSquares(fit_intercept=True).fit(_batches(X, Y, bs))
    skl = LinearRegression().fit(X.double().numpy(), Y.double().numpy())
    assert _rel(est.coef_, skl.coef_.T) < 1e-6
    assert _rel(est.intercept_, skl.intercept_) < 1e-6
    # the same as lstsq on [X, 1]
    ref = torch.linalg.lstsq(torch.cat([X.double(), torch.ones(len(X), 1, dtype=torch.float64)], 1),
                             Y.double(), driver="gelsd").solution
    assert _rel(est.coef_, ref[:-1]) < 1e-6 and _rel(est.intercept_, ref[-1]) < 1e-6
    # partial_fit in pieces == fit
    inc = StreamedLeastSquares()
    for xb, yb in _batches(X, Y, bs):
        inc.partial_fit(xb, yb)
    assert torch.allclose(inc.coef_, est.coef_, rtol=1e-10, atol=1e-12)
    # predict: float32 in, float32 out; equals sklearn's prediction
    P = est.predict(X)
    assert P.dtype == torch.float32 and P.shape == Y.shape
    assert _rel(est.predict(X.double()), skl.predict(X.double().numpy())) < 1e-6


def test_r2_matches_sklearn_and_pooled_formula():
    X, Y = _data(seed=2)
    Xtr, Ytr, Xte, Yte = X[:700], Y[:700], X[700:], Y[700:]
    Yte = Yte * torch.tensor([1.0, 3.0, 0.2, 1.0, 5.0])  # unequal output variances: weighting matters
    Ytr = Ytr * torch.tensor([1.0, 3.0, 0.2, 1.0, 5.0])
    est = StreamedLeastSquares().fit(_batches(Xtr, Ytr, 128))
    res = est.score_batches(_batches(Xte, Yte, 41))
    pred = est.predict(Xte.double()).numpy()
    yt = Yte.double().numpy()
    # the pooled definition 1 − Σ‖y − ŷ‖² / Σ‖y − ȳ‖² ...
    pooled = 1 - ((yt - pred) ** 2).sum() / ((yt - yt.mean(0)) ** 2).sum()
    assert res.r2 == pytest.approx(pooled, rel=1e-9)
    # ... is sklearn's variance_weighted, and not its uniform average
    assert res.r2 == pytest.approx(r2_score(yt, pred, multioutput="variance_weighted"), rel=1e-9)
    assert abs(res.r2 - r2_score(yt, pred, multioutput="uniform_average")) > 1e-4
    np.testing.assert_allclose(res.r2_per_output, r2_score(yt, pred, multioutput="raw_values"), rtol=1e-9)
    assert est.score(Xte, Yte) == pytest.approx(res.r2, rel=1e-12)
    assert res.n_samples == 303
    # training R² from the sums alone equals the R² of the predictions on the training rows
    assert est.train_r2_ == pytest.approx(est.score(Xtr, Ytr), rel=1e-9)
    np.testing.assert_allclose(est.train_r2_per_output_, est.score_batches([(Xtr, Ytr)]).r2_per_output, rtol=1e-8)


def test_r2_accumulator_degenerate_outputs_follow_force_finite():
    y = torch.tensor([[1.0, 2.0], [1.0, 3.0], [1.0, 4.0]])
    acc = R2Accumulator().update(y, y)
    assert acc.result().r2 == 1.0 and list(acc.result().r2_per_output) == [1.0, 1.0]
    p = y.clone()
    p[:, 0] = 0.0
    np.testing.assert_array_equal(R2Accumulator().update(y, p).result().r2_per_output,
                                  r2_score(y.numpy(), p.numpy(), multioutput="raw_values"))
    assert np.isnan(R2Accumulator().result().r2)


def test_rank_deficient_gives_min_norm_solution_with_warning():
    X, Y = _data(n=400, dx=6, offset=0.0, seed=3)
    Xd = torch.cat([X, X[:, :2]], 1)  # two duplicated columns: rank 6 of 8
    est = StreamedLeastSquares(fit_intercept=False)
    with pytest.warns(RuntimeWarning, match="pseudo-inverse"):
        est.fit(_batches(Xd, Y, 150))
        coef = est.coef_
    assert est.solver_ == "pinv"
    ref = torch.linalg.pinv(Xd.double()) @ Y.double()  # minimum-norm least squares
    assert _rel(coef, ref) < 1e-6
    assert torch.allclose(coef[:2], coef[6:], rtol=1e-6)  # the norm is split evenly over the duplicates
    # a tiny relative ridge makes it solvable by Cholesky and changes predictions only slightly
    ridge = StreamedLeastSquares(fit_intercept=False, alpha=1e-8).fit(_batches(Xd, Y, 150))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ridge.solver_ == "cholesky"
    assert _rel(ridge.predict(Xd.double()), Xd.double() @ ref) < 1e-5


def test_constant_column_with_intercept_is_rank_deficient():
    X, Y = _data(n=300, dx=4, seed=4)
    X[:, 2] = 7.0
    est = StreamedLeastSquares()
    with pytest.warns(RuntimeWarning):
        est.fit(X, Y)
        assert est.solver_ == "pinv"
    skl = LinearRegression().fit(X.double().numpy(), Y.double().numpy())
    assert _rel(est.predict(X.double()), skl.predict(X.double().numpy())) < 1e-6


def test_mismatched_widths_raise():
    est = StreamedLeastSquares()
    est.partial_fit(torch.randn(10, 4), torch.randn(10, 2))
    with pytest.raises(ValueError, match="width 5"):
        est.partial_fit(torch.randn(10, 5), torch.randn(10, 2))
    with pytest.raises(ValueError, match="Y of width 3"):
        est.partial_fit(torch.randn(10, 4), torch.randn(10, 3))
    with pytest.raises(ValueError, match="rows"):
        est.partial_fit(torch.randn(10, 4), torch.randn(9, 2))
    with pytest.raises(ValueError, match="shape"):
        est.predict(torch.randn(3, 5))


def test_not_fitted_and_1d_target_and_set_params():
    est = StreamedLeastSquares()
    assert not hasattr(est, "coef_")
    X, Y = _data(n=200, dx=3, dy=1, seed=5)
    est.fit(X.numpy(), Y[:, 0].numpy())  # numpy in, 1-D target
    assert est.predict(X).shape == (200,)
    skl = LinearRegression(fit_intercept=False).fit(X.double().numpy(), Y[:, 0].double().numpy())
    est.set_params(fit_intercept=False)  # re-solves from the same sums
    assert _rel(est.coef_[:, 0], skl.coef_) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    X, Y = _data(seed=6)
    cpu = StreamedLeastSquares().fit(_batches(X, Y, 100))
    gpu = StreamedLeastSquares().fit(_batches(X.cuda(), Y.cuda(), 100))
    assert gpu.coef_.is_cuda and gpu.predict(X.cuda()).is_cuda
    assert _rel(gpu.coef_.cpu(), cpu.coef_) < 1e-9
    assert gpu.score(X.cuda(), Y.cuda()) == pytest.approx(cpu.score(X, Y), rel=1e-9)
