"""Unit tests for probekit.probes.ast_probe (AST-Probe estimator and scoring)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles

from probekit.probes.ast_probe import ASTProbe, ASTProbeResult, pairwise_rank_loss, score_ast_predictions
from probekit.probes.ast_tree import EMPTY, code_to_tuple

D = 48
K_STAR = 8  # planted subspace: 6 dims for the path (d and c), 2 for u
MAX_LEAVES = 40


@pytest.fixture(scope="module")
def gold_tuples():
    from probekit.data.code import iter_stdlib_functions

    out = []
    for s in iter_stdlib_functions(max_functions=150):
        _, d, c, u = code_to_tuple(s.source)
        n = min(len(u), MAX_LEAVES)
        if n >= 3:
            out.append((d[: n - 1], c[: n - 1], u[:n]))
    return out


def _planted(gold, seed=0):
    """Leaf vectors with the tuple planted in an 8-dim subspace Q[:, :8] (layer 0), noise (layer 1)."""
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.standard_normal((D, D)))[0]
    c_vocab = sorted({v for d, c, u in gold for v in c})
    u_vocab = sorted({v for d, c, u in gold for v in u})
    A = rng.standard_normal((len(c_vocab), 6))
    A /= np.linalg.norm(A, axis=1, keepdims=True)  # one step direction per c label
    ang = 2 * np.pi * np.arange(len(u_vocab)) / len(u_vocab)
    Bu = 0.5 * np.stack([np.cos(ang), np.sin(ang)], 1)  # one offset per u label
    a_of = {v: A[i] for i, v in enumerate(c_vocab)}
    b_of = {v: Bu[i] for i, v in enumerate(u_vocab)}
    X = []
    for d, c, u in gold:
        n = len(u)
        z = np.zeros((n, D))
        steps = np.stack([np.sqrt(2.0 * di) * a_of[ci] for di, ci in zip(d, c)])
        z[1:, :6] = np.cumsum(steps, 0)
        z[:, 6:8] = np.stack([b_of[v] for v in u])
        z[:, K_STAR:] = rng.standard_normal((n, D - K_STAR))
        layer0 = z @ Q.T
        layer1 = rng.standard_normal((n, D))
        X.append(torch.tensor(np.stack([layer0, layer1]), dtype=torch.float32))
    return X, Q[:, :K_STAR]


@pytest.fixture(scope="module")
def fitted(gold_tuples):
    X, basis = _planted(gold_tuples)
    n = len(X)
    tr, va, te = slice(0, n - 40), slice(n - 40, n - 20), slice(n - 20, n)
    probe = ASTProbe(k=K_STAR, lr=2e-2, epochs=40, patience=8, batch_size=8, progress=False)
    probe.fit(X[tr], gold_tuples[tr], X[va], gold_tuples[va])
    return probe, X[te], gold_tuples[te], basis


def test_planted_subspace_recovered(fitted):
    probe, Xte, yte, basis = fitted
    res = probe.evaluate(Xte, yte)
    assert res.f1[0] > 0.9, res.to_dict()
    assert res.f1[1] < res.f1[0] - 0.3, res.to_dict()
    assert res.d_order_accuracy[0] > 0.95
    cos = np.cos(subspace_angles(probe.P_[0], basis))
    assert cos.min() > 0.95, cos


def test_orthogonality_after_training(fitted):
    probe = fitted[0]
    assert probe.P_.shape == (2, D, K_STAR)
    # The planted layer's probe is (nearly) orthonormal. On pure noise the
    # distance hinge pushes the scale of P up against lambda (about 0.2 here),
    # which is why METHODS asks to check this per layer.
    assert probe.orthogonality_[0] < 0.05, probe.orthogonality_
    assert probe.orthogonality_.shape == (2,)
    assert probe.c_labels_[0] == "<unk>" and EMPTY in probe.c_labels_


def test_result_json_and_figure(fitted):
    probe, Xte, yte, _ = fitted
    res = probe.evaluate(Xte, yte, controls={"layer 0": [0.3]})
    d = json.loads(json.dumps(res.to_dict()))
    assert d["layers"] == ["0", "1"] and d["k"] == K_STAR
    (fig,) = res.figures()
    assert len(fig.data) == 2


def test_gold_as_prediction_scores_one(gold_tuples):
    golds = gold_tuples[:20]
    s = score_ast_predictions(golds, golds)
    assert s == {k: 1.0 for k in s}

    class GoldProbe(ASTProbe):
        def predict(self, X, *, k=None):
            return [list(golds), [(-np.asarray(d, float), c, u) for d, c, u in golds]]

    p = GoldProbe()
    p.P_ = np.zeros((2, 4, 2), np.float32)
    X = [torch.zeros(2, len(u), 4) for _, _, u in golds]
    res = p.evaluate(X, golds)
    assert res.f1[0] == 1.0 and res.c_accuracy[0] == 1.0 and res.u_accuracy[0] == 1.0
    assert res.d_order_accuracy[0] == 1.0
    assert res.f1[1] < 1.0 and res.d_order_accuracy[1] == 0.0  # reversed order is caught


def test_rank_loss_hand_example():
    # snippet 0: d = [2, 1, 2] -> pairs (0,1), (2,1); snippet 1: d = [3, 1] (+pad) -> pair (0,1)
    d = torch.tensor([[2.0, 1.0, 2.0], [3.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    d_hat = torch.tensor([[0.5, 0.0, 3.0], [1.0, 1.5, -9.0]])
    # hinges: 1-(0.5-0)=0.5, 1-(3-0)=0 -> 0, 1-(1-1.5)=1.5; padded entry ignored
    loss = pairwise_rank_loss(d_hat, d, mask)
    assert loss.item() == pytest.approx((0.5 + 0.0 + 1.5) / 3)
    # leading layer dim
    two = pairwise_rank_loss(torch.stack([d_hat, d_hat + 0.0]), d, mask)
    assert two.shape == (2,) and torch.allclose(two, loss.expand(2))


def test_matryoshka_loss_is_sum_over_prefixes(gold_tuples):
    from probekit.probes.ast_probe import _collate, _layer_losses

    golds = gold_tuples[:6]
    X = [torch.randn(2, len(u), 12) for _, _, u in golds]
    probe = ASTProbe(k=6, epochs=1, batch_size=4, matryoshka_ks=(2, 6), progress=False)
    probe.fit(X, golds, X, golds)
    P, Vc, Vu = (torch.from_numpy(a) for a in (probe.P_, probe.Vc_, probe.Vu_))
    ci = {v: i for i, v in enumerate(probe.c_labels_)}
    ui = {v: i for i, v in enumerate(probe.u_labels_)}
    batch = _collate(X, [(np.asarray(d, float), c, u) for d, c, u in golds], list(range(6)), ci, ui, torch.device("cpu"))
    want = _layer_losses(P[:, :, :2], Vc[:, :2], Vu[:, :2], batch, 5.0) + _layer_losses(P, Vc, Vu, batch, 5.0)
    assert torch.allclose(probe._loss(P, Vc, Vu, batch), want)
    assert not torch.allclose(want, _layer_losses(P, Vc, Vu, batch, 5.0))
    assert probe.evaluate(X, golds, k=2).k == 2
    with pytest.raises(ValueError):
        probe.evaluate(X, golds, k=7)
    with pytest.raises(ValueError):
        ASTProbe(k=6, matryoshka_ks=(8,), progress=False).fit(X, golds, X, golds)
