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
    P, Vc, Vu, bc, bu = (torch.from_numpy(a) for a in (probe.P_, probe.Vc_, probe.Vu_, probe.bc_, probe.bu_))
    ci = {v: i for i, v in enumerate(probe.c_labels_)}
    ui = {v: i for i, v in enumerate(probe.u_labels_)}
    batch = _collate(X, [(np.asarray(d, float), c, u) for d, c, u in golds], list(range(6)), ci, ui, torch.device("cpu"))
    want = _layer_losses(P[:, :, :2], Vc[:, :2], Vu[:, :2], bc, bu, batch, 5.0) + _layer_losses(
        P, Vc, Vu, bc, bu, batch, 5.0)
    assert torch.allclose(probe._loss(P, Vc, Vu, batch, bc, bu), want)
    assert not torch.allclose(want, _layer_losses(P, Vc, Vu, bc, bu, batch, 5.0))
    assert probe.evaluate(X, golds, k=2).k == 2
    with pytest.raises(ValueError):
        probe.evaluate(X, golds, k=7)
    with pytest.raises(ValueError):
        ASTProbe(k=6, matryoshka_ks=(8,), progress=False).fit(X, golds, X, golds)


def test_batch_gather_matches_naive_padding(gold_tuples):
    from probekit.probes.ast_probe import PackedLeaves, _Batches

    golds = gold_tuples[:7]
    X = [torch.randn(3, len(u), 5) for _, _, u in golds]
    ci = {v: i for i, v in enumerate(sorted({x for _, c, _ in golds for x in c}))}
    ui = {v: i for i, v in enumerate(sorted({x for _, _, u in golds for x in u}))}
    idx = [5, 0, 3]
    packed = PackedLeaves.from_list(X)
    batch = _Batches(packed, [(np.asarray(d, float), c, u) for d, c, u in golds], ci, ui)(idx)
    N = max(X[i].shape[1] for i in idx)
    assert batch["H"].shape == (3, 3, N, 5)
    for b, i in enumerate(idx):  # independent: pad each snippet by hand
        d, c, u = golds[i]
        n = len(u)
        assert torch.equal(batch["H"][:, b, :n], X[i])
        assert not batch["H"][:, b, n:].any()
        assert batch["d"][b, : n - 1].tolist() == [float(v) for v in d]
        assert batch["bmask"][b].tolist() == [j < n - 1 for j in range(N - 1)]
        assert batch["c"][b, : n - 1].tolist() == [ci[v] for v in c]
        assert batch["u"][b, :n].tolist() == [ui[v] for v in u]
        assert (batch["u"][b, n:] == -100).all() and (batch["c"][b, n - 1 :] == -100).all()
    assert torch.equal(packed.snippet(3), X[3])
    assert torch.equal(packed.snippets(2, 5).snippet(1), X[3])
    with pytest.raises(ValueError, match="lengths sum"):
        PackedLeaves(torch.zeros(1, 4, 2), [2, 3])


def test_batched_fit_equals_separate_layer_fits(gold_tuples):
    from probekit.probes.ast_probe import PackedLeaves

    X, _ = _planted(gold_tuples[:60], seed=3)
    packed = PackedLeaves.from_list(X)
    tr, va = packed.snippets(0, 45), packed.snippets(45, 60)
    kw = dict(k=4, lr=1e-2, epochs=4, patience=2, batch_size=8, progress=False)
    joint = ASTProbe(**kw).fit(tr, gold_tuples[:45], va, gold_tuples[45:60])
    for layer in range(2):
        alone = ASTProbe(**kw).fit(tr.layers([layer]), gold_tuples[:45], va.layers([layer]), gold_tuples[45:60])
        np.testing.assert_allclose(alone.P_[0], joint.P_[layer], atol=1e-5)
        np.testing.assert_allclose(alone.bu_[0], joint.bu_[layer], atol=1e-5)
        assert alone.history_["best_epoch"][0] == joint.history_["best_epoch"][layer]


def test_bias_lets_the_unary_head_learn_a_prior():
    # u is EMPTY on 95% of leaves, independent of the (centred) inputs: only a bias can predict it
    rng = np.random.default_rng(0)
    X, y = [], []
    for _ in range(120):
        n = int(rng.integers(4, 12))
        X.append(torch.tensor(rng.standard_normal((1, n, 6)), dtype=torch.float32))
        u = [EMPTY if rng.random() < 0.95 else "identifier" for _ in range(n)]
        y.append((rng.integers(1, 4, n - 1), [EMPTY] * (n - 1), u))
    kw = dict(k=4, lr=2e-2, epochs=15, patience=15, batch_size=16, progress=False)
    with_b = ASTProbe(**kw).fit(X[:80], y[:80], X[80:100], y[80:100]).evaluate(X[100:], y[100:])
    without = ASTProbe(bias=False, **kw).fit(X[:80], y[:80], X[80:100], y[80:100]).evaluate(X[100:], y[100:])
    assert with_b.u_accuracy[0] > 0.9, with_b.u_accuracy
    assert without.u_accuracy[0] < with_b.u_accuracy[0] - 0.1, (without.u_accuracy, with_b.u_accuracy)


def test_per_label_recall_counts_constituents_independently(gold_tuples):
    from probekit.probes.ast_probe import per_label_recall
    from probekit.probes.ast_tree import constituents, tuple_to_tree

    golds = gold_tuples[:15]
    preds = [(np.asarray(d, float)[::-1].copy(), c, u) for d, c, u in golds]  # reversed order: some misses
    rec, sup = per_label_recall(preds, golds)
    hit, n = {}, {}
    for (pd, pc, pu), (gd, gc, gu) in zip(preds, golds):
        lv = [str(j) for j in range(len(gu))]
        g = constituents(tuple_to_tree(gd, gc, gu, lv))
        p = constituents(tuple_to_tree(pd, pc, pu, lv))
        for lab, span in g:
            n[lab] = n.get(lab, 0) + 1
            hit[lab] = hit.get(lab, 0) + ((lab, span) in p)
    assert sup == n
    assert rec == pytest.approx({lab: hit[lab] / n[lab] for lab in n})
    assert min(rec.values()) < 1.0
    assert per_label_recall(golds, golds)[0] == {lab: 1.0 for lab in n}


def _hand_ast_result() -> ASTProbeResult:
    return ASTProbeResult(layers=["embed", "3"], precision=[0.4, 0.6], recall=[0.3, 0.5], f1=[0.35, 0.55],
                          c_accuracy=[0.7, 0.9], u_accuracy=[0.95, 0.99], d_order_accuracy=[0.6, 0.8],
                          orthogonality=[0.0, 0.0], k=8, n_snippets=4, controls={"random-init model": [0.3, 0.32]})


def test_figure_metric_controls_published_and_best_layer():
    res = _hand_ast_result()
    (fig,) = res.figures(controls={"layer 0": [0.35]}, published={"codebert": 0.75}, best_layer="3")
    assert [t.name for t in fig.data] == ["AST-Probe constituent F1", "random-init model", "layer 0",
                                          "published codebert"]
    assert list(fig.data[0].y) == [0.35, 0.55] and list(fig.data[2].y) == [0.35, 0.35]  # one value: constant
    assert list(fig.data[3].y) == [0.75, 0.75] and "best by validation: 3" in fig.layout.title.text
    (c,) = res.figures(metric="c_accuracy", published={"codebert": 0.75})
    assert len(c.data) == 1 and list(c.data[0].y) == [0.7, 0.9]  # control and published lines only with F1
    assert c.layout.yaxis.title.text == "c accuracy" and "best by validation" not in c.layout.title.text
    (bare,) = res.figures(show_controls=False)
    assert len(bare.data) == 1
    with pytest.raises(ValueError, match="metric must be one of"):
        res.figures(metric="accuracy")
