"""The norm-predictability sweep: R² against scikit-learn, the BOS mechanism, and document-level CIs."""

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.metrics import r2_score

from probekit.probes.dark_matter_norms import (NormSelection, norm_predictability, r2_from_doc_sums,
                                               sae_error_sq)


def _corpus(n_docs=60, tokens=(8, 20), d=6, seed=0, bos_scale=0.0):
    """Tokens of ``n_docs`` documents: x (n, d), ‖e‖² (n,) partly linear in x, doc, pos, test mask, domains."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(*tokens, size=n_docs)
    doc = np.repeat(np.arange(n_docs), lens)
    pos = np.concatenate([np.arange(k) for k in lens])
    x = rng.normal(size=(len(doc), d))
    err = 1.0 + 0.3 * x[:, 0] ** 2 + 0.2 * x[:, 1] + 0.5 * rng.random(len(doc))  # weakly linear in x
    if bos_scale:
        x[pos == 0, 2] += bos_scale                # the BOS token sits far out on one direction ...
        err[pos == 0] += 20 * bos_scale            # ... and carries a huge error norm
    err = np.clip(err, 0.05, None)
    test = np.zeros(n_docs, dtype=bool)
    test[rng.permutation(n_docs)[: n_docs // 3]] = True
    domain = np.where(np.arange(n_docs) % 2 == 0, "code", "text")
    return x, err, doc, pos, test, domain


def test_r2_matches_sklearn_linear_regression_with_and_without_bias_and_ridge():
    x, err, doc, pos, test, _ = _corpus()
    sels = [NormSelection("all", min_position=0), NormSelection("nobias", min_position=0, fit_intercept=False),
            NormSelection("ridge", min_position=0, alpha=0.1), NormSelection("norm", min_position=0, target="norm")]
    res = norm_predictability(x, err, doc, pos, test, selections=sels, n_boot=50)
    tr, te = ~test[doc], test[doc]
    for name, model, y in (("all", LinearRegression(), err), ("nobias", LinearRegression(fit_intercept=False), err),
                           ("norm", LinearRegression(), np.sqrt(err))):
        model.fit(x[tr], y[tr])
        assert res[name].r2.value == pytest.approx(r2_score(y[te], model.predict(x[te])), abs=1e-9)
        assert res[name].r2_train == pytest.approx(r2_score(y[tr], model.predict(x[tr])), abs=1e-9)
    # relative ridge: alpha · tr(centred Gram) / d on the diagonal, intercept unpenalised
    xc = x[tr] - x[tr].mean(0)
    ridge = Ridge(alpha=0.1 * np.trace(xc.T @ xc) / x.shape[1]).fit(x[tr], err[tr])
    assert res["ridge"].r2.value == pytest.approx(r2_score(err[te], ridge.predict(x[te])), abs=1e-9)
    assert res["all"].n_test_tokens == te.sum() and res["all"].n_train_tokens == tr.sum()


def test_r2_from_doc_sums_equals_pooled_r2():
    rng = np.random.default_rng(1)
    y, y_hat = rng.normal(size=50), rng.normal(size=50)
    g = rng.integers(0, 7, size=50)
    sums = np.array([[np.sum(g == k), y[g == k].sum(), (y[g == k] ** 2).sum(), ((y - y_hat)[g == k] ** 2).sum()]
                     for k in range(7)])
    assert r2_from_doc_sums(sums) == pytest.approx(r2_score(y, y_hat), abs=1e-12)
    assert np.isnan(r2_from_doc_sums(np.array([[3, 3.0, 3.0, 0.0]])))  # constant target: undefined


def test_huge_norm_bos_tokens_inflate_r2_of_squared_norm():
    x, err, doc, pos, test, _ = _corpus(bos_scale=8.0, seed=2)
    sels = [NormSelection("BOS excluded"), NormSelection("BOS included", min_position=0),
            NormSelection("BOS included, ‖e‖", min_position=0, target="norm")]
    res = norm_predictability(x, err, doc, pos, test, selections=sels, n_boot=300)
    excl, incl = res["BOS excluded"], res["BOS included"]
    # without BOS only the weak linear part is there to find; with it, one far-out token per document dominates
    # both Σ(y − ȳ)² and what a linear map explains
    assert excl.r2.value < 0.3
    assert incl.r2.value > 0.75
    assert incl.diff_vs_reference.excludes_zero and incl.diff_vs_reference.low > 0.5
    assert incl.n_test_tokens == excl.n_test_tokens + test.sum()


def test_one_held_out_outlier_decides_r2_and_the_share_shows_it():
    # a secondary sink: one token of one held-out document far out in x, with a huge ‖e‖² the training
    # documents never show; a linear map cannot extrapolate to it, and it holds most of Σ(y − ȳ)²
    x, _, doc, pos, test, _ = _corpus(seed=8)
    err = 4.0 + x[:, 0] + 0.5 * x[:, 1] + 0.3 * np.random.default_rng(8).random(len(x))  # linear in x
    i = np.nonzero(test[doc] & (pos == 1))[0][0]
    x[i, 3] += 50.0
    err[i] = 500.0
    sels = [NormSelection("ref"), NormSelection("positions ≥ 2", min_position=2),
            NormSelection("top 1% dropped", drop_top=0.01)]
    res = norm_predictability(x, err, doc, pos, test, selections=sels, n_boot=300)
    y = err[test[doc] & (pos >= 1)]
    dev = (y - y.mean()) ** 2
    assert res["ref"].max_token_share == pytest.approx(dev.max() / dev.sum())
    assert res["ref"].max_token_share > 0.9 and res["ref"].max_doc_share >= res["ref"].max_token_share
    assert res["ref"].r2.value < 0.1
    assert res["positions ≥ 2"].r2.value > 0.8 and res["positions ≥ 2"].max_token_share < 0.1
    assert res["top 1% dropped"].r2.value > 0.8
    assert res["positions ≥ 2"].diff_vs_reference.value > 0.7


def test_ci_resamples_documents_not_tokens():
    x, err, doc, pos, test, _ = _corpus(seed=3)
    sel = NormSelection("all", min_position=0)
    res = norm_predictability(x, err, doc, pos, test, selections=[sel], n_boot=200, seed=5)
    est = res["all"].r2
    assert est.n == test.sum() and est.unit == "documents"
    # independent computation: refit with sklearn, resample whole held-out documents, pool their tokens
    tr = ~test[doc]
    y_hat = LinearRegression().fit(x[tr], err[tr]).predict(x)
    docs = np.nonzero(test)[0]
    idx = np.random.default_rng(5).integers(0, len(docs), size=(200, len(docs)))
    boot = []
    for draw in idx:
        rows = np.concatenate([np.nonzero(doc == docs[i])[0] for i in draw])
        boot.append(r2_score(err[rows], y_hat[rows]))
    lo, hi = np.quantile(boot, [0.025, 0.975])
    assert est.low == pytest.approx(lo, abs=1e-9) and est.high == pytest.approx(hi, abs=1e-9)
    assert est.low < est.value < est.high


def test_domain_outliers_and_train_subset():
    x, err, doc, pos, test, domain = _corpus(seed=4)
    err = err.copy()
    outlier = np.nonzero(pos == 3)[0][:4]
    err[outlier] = 1e4
    sels = [NormSelection("ref"), NormSelection("code", domain="code"), NormSelection("drop", drop_top=0.01),
            NormSelection("few", max_train_tokens=40)]
    res = norm_predictability(x, err, doc, pos, test, doc_domain=domain, selections=sels, n_boot=50)
    code_docs = (domain == "code") & test
    assert res["code"].r2.n == code_docs.sum()
    assert res["code"].n_test_tokens == int(((domain[doc] == "code") & test[doc] & (pos >= 1)).sum())
    thr = np.quantile(err[(pos >= 1) & ~test[doc]], 0.99)
    assert res["drop"].n_test_tokens == int(((pos >= 1) & test[doc] & (err <= thr)).sum())
    assert res["drop"].n_test_tokens < res["ref"].n_test_tokens
    assert res["few"].n_train_tokens == 40 and res["few"].tokens_per_dim == pytest.approx(40 / x.shape[1])
    d = json.loads(json.dumps(res.to_dict()))
    assert d["rows"][1]["diff_vs_reference"]["unit"] == "documents" and d["rows"][0]["diff_vs_reference"] is None
    assert "| code |" in res.table()


def test_figure_has_titled_axes_and_ci_error_bars():
    x, err, doc, pos, test, _ = _corpus(seed=6)
    res = norm_predictability(x, err, doc, pos, test, selections=[NormSelection("a"), NormSelection(
        "b", min_position=0)], n_boot=50)
    fig = res.figure()
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text and fig.layout.title.text
    bars = fig.data[0].error_x
    assert bars.array[0] == pytest.approx(res.rows[0].r2.high - res.rows[0].r2.value)
    assert bars.arrayminus[1] == pytest.approx(res.rows[1].r2.value - res.rows[1].r2.low)


def test_bad_input_names_the_problem():
    x, err, doc, pos, test, _ = _corpus(seed=7)
    with pytest.raises(ValueError, match="doc_domain"):
        norm_predictability(x, err, doc, pos, test, selections=[NormSelection("c", domain="code")])
    with pytest.raises(ValueError, match="error_sq has"):
        norm_predictability(x, err[:-1], doc, pos, test)
    with pytest.raises(ValueError, match="target 'log'"):
        z = err.copy()
        z[5] = 0
        norm_predictability(x, z, doc, pos, test, selections=[NormSelection("l", min_position=0, target="log")])
    with pytest.raises(ValueError, match="domain must be one of"):
        NormSelection("x", domain="prose")
    with pytest.raises(ValueError, match="unique"):
        norm_predictability(x, err, doc, pos, test, selections=[NormSelection("a"), NormSelection("a")])
    with pytest.raises(ValueError, match="max_position"):
        NormSelection("m", min_position=4, max_position=2)


def test_sae_error_sq_matches_direct_computation():
    torch.manual_seed(0)
    enc, dec = torch.nn.Linear(5, 9), torch.nn.Linear(9, 5)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = enc, dec

        def encode(self, x):
            return torch.relu(self.enc(x))

        def decode(self, f):
            return self.dec(f)

    x = torch.randn(23, 5)
    want = ((x - dec(torch.relu(enc(x)))) ** 2).sum(-1).double()
    assert torch.allclose(sae_error_sq(Tiny(), x, batch_size=4), want, atol=1e-5)
