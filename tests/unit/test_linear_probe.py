"""Unit tests for probekit.probes.linear (synthetic data, runs in seconds)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.linear_model import LogisticRegression, Ridge

from probekit.probes.linear import (
    LayerProbeResult,
    LinearProbe,
    fit_layer_probes,
    group_train_test_split,
)


def _planted_binary(n: int = 2000, d: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal(d)
    w_hat = w / np.linalg.norm(w)
    y = (X @ w > 0).astype(np.int64)
    return X, y, w_hat


def _split(n: int, frac: float = 0.75) -> tuple[slice, slice]:
    k = int(n * frac)
    return slice(0, k), slice(k, n)


# ---------------------------------------------------------------------------
# LinearProbe: logistic
# ---------------------------------------------------------------------------


def test_planted_direction_is_found_and_projecting_it_out_removes_it():
    X, y, w_hat = _planted_binary()
    tr, te = _split(len(y))
    probe = LinearProbe().fit(X[tr], y[tr])
    assert probe.score(X[te], y[te]) > 0.95
    assert probe.coef_.shape == (1, X.shape[1])
    assert probe.intercept_.shape == (1,)
    # The learned direction should be the planted one.
    cos = probe.coef_[0] @ w_hat / np.linalg.norm(probe.coef_[0])
    assert cos > 0.9

    # Remove the planted direction: the label becomes unpredictable.
    X_perp = (X - np.outer(X @ w_hat, w_hat)).astype(np.float32)
    acc_perp = LinearProbe().fit(X_perp[tr], y[tr]).score(X_perp[te], y[te])
    chance = max(np.mean(y[te]), 1 - np.mean(y[te]))
    assert abs(acc_perp - 0.5) < 0.1
    assert acc_perp < chance + 0.05


def test_multiclass_string_labels_and_predict_proba():
    rng = np.random.default_rng(1)
    n, d, k = 2000, 32, 4
    X = rng.standard_normal((n, d)).astype(np.float32)
    W = rng.standard_normal((d, k))
    names = np.array(["noun", "verb", "adj", "det"])
    y = names[np.argmax(X @ W, axis=1)]
    tr, te = _split(n)

    probe = LinearProbe().fit(X[tr], y[tr])
    assert list(probe.classes_) == sorted(names)
    assert probe.coef_.shape == (k, d)
    assert probe.score(X[te], y[te]) > 0.85
    assert set(probe.predict(X[te])) <= set(names)

    proba = probe.predict_proba(X[te])
    assert proba.shape == (n - tr.stop, k)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    assert (proba >= 0).all()
    # argmax of proba and predict agree.
    np.testing.assert_array_equal(probe.classes_[proba.argmax(axis=1)], probe.predict(X[te]))


def test_torch_bfloat16_inputs_match_numpy():
    X, y, _ = _planted_binary(n=1200, d=32, seed=2)
    tr, te = _split(len(y))
    acc_np = LinearProbe().fit(X[tr], y[tr]).score(X[te], y[te])
    Xt = torch.from_numpy(X).to(torch.bfloat16)
    probe = LinearProbe().fit(Xt[tr], torch.from_numpy(y[tr]))
    acc_t = probe.score(Xt[te], torch.from_numpy(y[te]))
    assert acc_t > 0.93
    assert abs(acc_t - acc_np) < 0.03


@pytest.mark.parametrize("n_classes", [2, 3])
def test_matches_sklearn_logistic_regression(n_classes):
    # Same objective as sklearn with C = 1/alpha, so the solutions should agree.
    rng = np.random.default_rng(3)
    n, d = 800, 12
    X = rng.standard_normal((n, d)).astype(np.float32)
    W = rng.standard_normal((d, n_classes))
    y = np.argmax(X @ W + rng.gumbel(size=(n, n_classes)), axis=1)
    tr, te = _split(n)
    alpha = 2.0

    ours = LinearProbe(alpha=alpha, standardize=False, max_iter=500, tol=1e-6).fit(X[tr], y[tr])
    ref = LogisticRegression(C=1.0 / alpha, max_iter=2000, tol=1e-8).fit(X[tr].astype(np.float64), y[tr])

    assert ours.coef_.shape == ref.coef_.shape
    assert abs(ours.score(X[te], y[te]) - ref.score(X[te], y[te])) <= 0.01
    assert np.mean(ours.predict(X[te]) == ref.predict(X[te])) > 0.98
    assert np.corrcoef(ours.coef_.ravel(), ref.coef_.ravel())[0, 1] > 0.99
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=0.02 * np.abs(ref.coef_).max())
    np.testing.assert_allclose(ours.predict_proba(X[te]), ref.predict_proba(X[te]), atol=0.02)


def test_standardize_handles_huge_feature_scales():
    X, y, _ = _planted_binary(n=2000, d=64, seed=4)
    tr, te = _split(len(y))
    base = LinearProbe().fit(X[tr], y[tr]).score(X[te], y[te])

    X_big = X.copy()
    X_big[:, 0] *= 1e4  # carries signal (w has a component on it), huge scale
    X_big[:, 1] = X_big[:, 1] * 1e4 + 5e4  # huge scale and offset
    probe = LinearProbe().fit(X_big[tr], y[tr])
    acc = probe.score(X_big[te], y[te])
    assert acc > 0.95
    assert acc >= base - 0.02
    np.testing.assert_allclose(probe.scale_[:2], X_big[tr][:, :2].std(axis=0), rtol=1e-3)
    # coef_ is in input space: the decision function is X @ coef_.T + intercept_.
    logits = X_big[te].astype(np.float64) @ probe.coef_.T + probe.intercept_
    np.testing.assert_allclose(logits, probe.decision_function(X_big[te]), rtol=1e-3, atol=1e-2)


# ---------------------------------------------------------------------------
# LinearProbe: ridge
# ---------------------------------------------------------------------------


def test_ridge_recovers_linear_target_and_matches_sklearn():
    rng = np.random.default_rng(5)
    n, d = 1500, 40
    X = rng.standard_normal((n, d)).astype(np.float32) * rng.uniform(0.5, 3, d).astype(np.float32)
    w = rng.standard_normal(d)
    y = X @ w + 3.0 + 0.05 * rng.standard_normal(n)
    tr, te = _split(n)

    probe = LinearProbe(kind="ridge", alpha=1.0).fit(X[tr], y[tr])
    assert probe.score(X[te], y[te]) > 0.99
    assert probe.predict(X[te]).shape == (n - tr.stop,)
    assert probe.coef_.shape == (1, d)

    raw = LinearProbe(kind="ridge", alpha=10.0, standardize=False).fit(X[tr], y[tr])
    ref = Ridge(alpha=10.0).fit(X[tr], y[tr])
    np.testing.assert_allclose(raw.coef_[0], ref.coef_, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(raw.intercept_[0], ref.intercept_, rtol=1e-3, atol=1e-4)

    with pytest.raises(AttributeError) as err:
        probe.predict_proba(X[te])
    # The explanation travels as the chained cause (shown in the traceback).
    assert "kind='logistic'" in str(err.value) + str(err.value.__cause__)
    assert not hasattr(probe, "predict_proba")
    assert hasattr(LinearProbe(), "predict_proba")


def test_ridge_multi_output():
    rng = np.random.default_rng(6)
    X = rng.standard_normal((600, 10)).astype(np.float32)
    Y = X @ rng.standard_normal((10, 3))
    probe = LinearProbe(kind="ridge", alpha=1e-3).fit(X, Y)
    assert probe.coef_.shape == (3, 10)
    assert probe.predict(X).shape == (600, 3)
    assert probe.score(X, Y) > 0.999


# ---------------------------------------------------------------------------
# sklearn conventions
# ---------------------------------------------------------------------------


def test_clone_and_get_params_round_trip():
    probe = LinearProbe(kind="ridge", alpha=3.0, standardize=False, max_iter=7, random_state=1)
    params = probe.get_params()
    assert params == {
        "kind": "ridge",
        "alpha": 3.0,
        "standardize": False,
        "max_iter": 7,
        "tol": 1e-4,
        "random_state": 1,
    }
    X, y, _ = _planted_binary(n=200, d=8)
    probe.fit(X, y.astype(float))
    c = clone(probe)
    assert c.get_params() == params
    assert not hasattr(c, "coef_")
    assert LinearProbe(**params).get_params() == params
    assert c.set_params(kind="logistic").kind == "logistic"
    with pytest.raises(TypeError):
        LinearProbe("ridge")  # keyword-only


def test_fit_returns_self():
    X, y, _ = _planted_binary(n=200, d=8)
    probe = LinearProbe()
    assert probe.fit(X, y) is probe


# ---------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    X, y, _ = _planted_binary(n=200, d=8)
    with pytest.raises(ValueError, match="rows"):
        LinearProbe().fit(X, y[:-1])
    with pytest.raises(ValueError, match="single class"):
        LinearProbe().fit(X, np.zeros(len(X), dtype=int))
    X_nan = X.copy()
    X_nan[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        LinearProbe().fit(X_nan, y)
    with pytest.raises(ValueError, match="kind"):
        LinearProbe(kind="svm").fit(X, y)
    with pytest.raises(ValueError, match="continuous"):
        LinearProbe().fit(X, X[:, 0])
    with pytest.raises(ValueError, match="2-D"):
        LinearProbe().fit(X[:, 0], y)
    with pytest.raises(ValueError, match="alpha"):
        LinearProbe(alpha=-1.0).fit(X, y)
    with pytest.raises(NotFittedError):
        LinearProbe().predict(X)
    probe = LinearProbe().fit(X, y)
    with pytest.raises(ValueError, match="features"):
        probe.predict(X[:, :4])


def test_convergence_warning_when_max_iter_too_small():
    X, y, _ = _planted_binary(n=500, d=16)
    with pytest.warns(ConvergenceWarning, match="max_iter"):
        LinearProbe(alpha=1e-3, max_iter=2).fit(X, y)


# ---------------------------------------------------------------------------
# group split
# ---------------------------------------------------------------------------


def test_group_split_disjoint_deterministic_and_complete():
    rng = np.random.default_rng(7)
    groups = rng.integers(0, 50, size=3000)
    tr, te = group_train_test_split(groups, test_size=0.2, seed=0)

    assert set(groups[tr]).isdisjoint(set(groups[te]))
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])), np.arange(len(groups)))
    assert 0.1 < len(te) / len(groups) < 0.35

    tr2, te2 = group_train_test_split(groups, test_size=0.2, seed=0)
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(te, te2)
    _, te3 = group_train_test_split(groups, test_size=0.2, seed=1)
    assert not np.array_equal(te, te3)

    # String ids and torch tensors work too.
    names = np.array([f"doc{g}" for g in groups])
    tr_s, te_s = group_train_test_split(names, seed=0)
    assert set(names[tr_s]).isdisjoint(set(names[te_s]))
    tr_t, _ = group_train_test_split(torch.from_numpy(groups), seed=0)
    np.testing.assert_array_equal(tr_t, tr)


def test_group_split_needs_two_groups():
    with pytest.raises(ValueError, match="2 distinct groups"):
        group_train_test_split(np.zeros(10, dtype=int))
    # With exactly two groups each side gets one, whatever test_size says.
    tr, te = group_train_test_split(np.array([0] * 5 + [1] * 5), test_size=0.9)
    assert len(tr) == 5 and len(te) == 5
    with pytest.raises(ValueError, match="test_size"):
        group_train_test_split(np.arange(10), test_size=1.5)


# ---------------------------------------------------------------------------
# layer sweep
# ---------------------------------------------------------------------------


def _synthetic_layers(n: int = 1500, d: int = 24, seed: int = 8):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(30), n // 30)
    y = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    means = rng.standard_normal((3, d)) * 1.5
    feats = {
        "L0": rng.standard_normal((n, d)).astype(np.float32),
        "L1": (rng.standard_normal((n, d)) + means[y]).astype(np.float32),  # carries y
        "L2": torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32)).to(torch.bfloat16),
    }
    return feats, y, groups


def test_fit_layer_probes_finds_the_signal_layer():
    feats, y, groups = _synthetic_layers()
    # Token ids that fully determine the label: the token-identity control
    # should then be near-perfect.
    token_ids = y * 10 + np.random.default_rng(0).integers(0, 5, size=len(y))
    res = fit_layer_probes(feats, y, groups, token_ids=token_ids, task="toy pos", progress=False)

    assert isinstance(res, LayerProbeResult)
    assert res.layers == ["L0", "L1", "L2"]
    assert res.n_train + res.n_test == len(y)
    assert res.n_classes == 3
    assert res.metric == "accuracy"
    assert res.best_layer == "L1"
    signal = res.test_score[1]
    assert signal > 0.9
    assert signal > res.majority_baseline + 0.3
    assert signal > res.random_feature_control[1] + 0.3
    # Noise layers are no better than the controls.
    for i in (0, 2):
        assert res.test_score[i] < res.majority_baseline + 0.1
    # Random control is computed once per feature width and shared.
    assert len(set(res.random_feature_control)) == 1
    assert 0.3 < res.majority_baseline < 0.7
    assert res.token_identity_control is not None and res.token_identity_control > 0.99

    d = res.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["task"] == "toy pos"
    figs = res.figures()
    assert len(figs) == 1 and all(isinstance(f, go.Figure) for f in figs)
    names = {t.name for t in figs[0].data}
    assert {"majority baseline", "random-feature control", "token-identity control"} <= names
    assert "toy pos" in figs[0].layout.title.text
    assert figs[0].layout.xaxis.title.text and figs[0].layout.yaxis.title.text


def test_fit_layer_probes_token_control_without_token_info():
    feats, y, groups = _synthetic_layers()
    # Token ids unrelated to y: token identity should not beat the majority much.
    token_ids = np.random.default_rng(1).integers(0, 200, size=len(y))
    res = fit_layer_probes({"L1": feats["L1"]}, y, groups, token_ids=token_ids, progress=False)
    assert res.token_identity_control < res.majority_baseline + 0.05
    # The random-feature control carries no information even for a signal layer.
    assert res.random_feature_control[0] < res.majority_baseline + 0.1
    assert res.test_score[0] > res.random_feature_control[0] + 0.3
    res_no_tok = fit_layer_probes({"L1": feats["L1"]}, y, groups, progress=False)
    assert res_no_tok.token_identity_control is None
    assert json.dumps(res_no_tok.to_dict())
    assert len(res_no_tok.figures()[0].data) == 4  # no token-identity trace


def test_fit_layer_probes_ridge_and_errors():
    rng = np.random.default_rng(9)
    n, d = 900, 16
    groups = np.repeat(np.arange(30), n // 30)
    X = rng.standard_normal((n, d)).astype(np.float32)
    target = X @ rng.standard_normal(d)
    res = fit_layer_probes(
        {"a": X, "b": rng.standard_normal((n, d))}, target, groups, kind="ridge", progress=False
    )
    assert res.metric == "r2" and res.n_classes is None
    assert res.test_score[0] > 0.99
    assert res.test_score[1] < 0.2
    assert res.majority_baseline < 0.05
    assert json.dumps(res.to_dict())

    with pytest.raises(ValueError, match="rows"):
        fit_layer_probes({"a": X[:-1]}, target, groups, kind="ridge", progress=False)
    with pytest.raises(ValueError, match="rows"):
        fit_layer_probes({"a": X}, target[:-1], groups, kind="ridge", progress=False)
    with pytest.raises(ValueError, match="kind"):
        fit_layer_probes({"a": X}, target, groups, kind="lasso", progress=False)


def test_fit_layer_probes_same_split_for_every_layer():
    feats, y, groups = _synthetic_layers()
    # Two identical layers must get identical scores (same split, deterministic fit).
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # easy data must converge
        res = fit_layer_probes({"x": feats["L1"], "y": feats["L1"].copy()}, y, groups, progress=False)
    assert res.test_score[0] == res.test_score[1]
    assert res.train_score[0] == res.train_score[1]


def test_fit_layer_probes_emits_one_summary_convergence_warning():
    feats, y, groups = _synthetic_layers()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit_layer_probes(feats, y, groups, max_iter=1, progress=False)
    conv = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    assert len(conv) == 1
    assert "3/3 layers" in str(conv[0].message)


def _hand_result(**kw) -> LayerProbeResult:
    base = dict(task="toy", kind="logistic", metric="accuracy", layers=["embed", "0", "1"],
                train_score=[0.6, 0.9, 0.95], test_score=[0.5, 0.8, 0.7], majority_baseline=0.3,
                random_feature_control=[0.31, 0.32, 0.33], token_identity_control=0.45, n_train=10, n_test=5)
    return LayerProbeResult(**{**base, **kw})


def test_layer_figure_show_selects_the_curves():
    res = _hand_result()
    (fig,) = res.figures()
    assert [t.name for t in fig.data] == ["test accuracy", "train accuracy", "random-feature control",
                                          "majority baseline", "token-identity control"]
    assert list(fig.data[0].y) == [0.5, 0.8, 0.7] and list(fig.data[1].y) == [0.6, 0.9, 0.95]
    assert list(fig.data[2].y) == [0.31, 0.32, 0.33] and list(fig.data[3].y) == [0.3] * 3
    assert list(fig.data[4].y) == [0.45] * 3 and fig.layout.yaxis.range == (0, 1.02)
    (only,) = res.figures(show=[])
    assert [t.name for t in only.data] == ["test accuracy"]
    (train,) = res.figures(show=["train"])
    assert [list(t.y) for t in train.data] == [[0.5, 0.8, 0.7], [0.6, 0.9, 0.95]]
    (ctl,) = _hand_result(token_identity_control=None).figures(show=["controls"])
    assert [t.name for t in ctl.data] == ["test accuracy", "random-feature control", "majority baseline"]


def test_layer_figure_model_title_and_ridge_labels():
    (fig,) = _hand_result().figures(model="tiny")
    assert fig.layout.title.text.startswith("tiny: Linear probe accuracy per layer") and "toy" in fig.layout.title.text
    (ridge,) = _hand_result(kind="ridge", metric="r2").figures()
    assert [t.name for t in ridge.data][:2] == ["test R²", "train R²"] and "train-mean baseline" in {
        t.name for t in ridge.data}
    assert ridge.layout.yaxis.range is None and not ridge.layout.title.text.startswith(":")
