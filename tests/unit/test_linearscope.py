"""Unit tests for probekit.probes.linearscope and probekit.digits_cnn (CPU, seconds)."""

from __future__ import annotations

import json

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from torch import nn

from probekit.digits_cnn import DigitsCNN, digits_cnn_path, digits_split, load_digits_cnn, train_digits_cnn
from probekit.probes.linearscope import (
    LinearScope,
    LinearScopeError,
    LinearScopeResult,
    pair_forward,
)

# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return digits_split(0)


@pytest.fixture(scope="module")
def cnn():
    model, acc = train_digits_cnn(seed=0, epochs=15)
    assert acc > 0.95
    return model


class RuleResidual(nn.Module):
    """Residual block handled by a user rule (forward also has a pointwise op the rule must mirror)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.GELU())

    def forward(self, x):
        return self.body(x) + x


def residual_rule(m, z0, z1):
    a0, a1 = pair_forward(m.body, z0, z1)
    return a0 + z0, a1 + z1


class TracedResidual(nn.Module):
    """Residual block with no rule: interpreted through torch.fx (children + linear glue)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.act = nn.SiLU()
        self.norm = nn.InstanceNorm2d(c, affine=True)

    def forward(self, x):
        return self.norm(self.act(self.conv(x)) + 0.5 * x)


class Head(nn.Module):
    """Composite module with functional ops and a view using the runtime batch size (fx path)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16 * 2 * 2, 12)
        self.ln = nn.LayerNorm(12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        h = x.view(x.size(0), -1)
        h = torch.tanh(self.ln(self.fc1(h)))
        return self.fc2(h)


def _randomise_bn(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.3)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
        if isinstance(m, (nn.LayerNorm, nn.InstanceNorm2d)) and getattr(m, "weight", None) is not None:
            m.weight.data.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
            m.bias.data.copy_(0.3 * torch.randn(m.bias.shape, generator=g))


def make_zoo(seed: int = 0) -> nn.Module:
    """Random net using every supported module type; input (N, 3, 8, 8), output (N, 5)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.LeakyReLU(0.1),
        # Sigmoid's gain sigmoid(z)/z is unbounded near z = 0, so it amplifies any rounding already in z1;
        # placed where z1 == z0 bit for bit, fp32 stays within 1e-5 (fp64 is exact anywhere).
        nn.Sigmoid(),
        RuleResidual(8),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Tanh(),
        TracedResidual(8),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Dropout(0.5),
        Head(),
    )
    _randomise_bn(net)
    return net.eval()


RULES = {RuleResidual: residual_rule}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------
# reproduction: y1(x1 = x0) == f(x0)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_reproduces_digits_cnn(cnn, digits, dtype, tol):
    scope = LinearScope(cnn, dtype=dtype)
    ref_net = DigitsCNN().to(dtype).eval()  # the network itself, in the same precision
    ref_net.load_state_dict(cnn.state_dict())
    with torch.no_grad():
        ref = ref_net(digits[1][:16].to(dtype))
    for i in range(16):
        x0 = digits[1][i]
        y0, y1 = scope.forward_pair(x0, x0)
        assert _rel(y1, ref[i]) <= tol
        assert _rel(y0, ref[i]) <= tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_reproduces_zoo(dtype, tol):
    net = make_zoo()
    scope = LinearScope(net, dtype=dtype, rules=RULES)
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = net.to(dtype)(x.to(dtype))  # the network itself, in the same precision
    for i in range(len(x)):
        y0, y1 = scope.forward_pair(x[i], x[i])
        assert _rel(y1, ref[i]) <= tol
        assert _rel(y0, ref[i]) <= tol
    # and A x0 + b reproduces it too
    x0 = x[0]
    A, b = scope.matrix(x0), scope.bias(x0)
    assert _rel(A @ x0.to(dtype).reshape(-1) + b, ref[0]) <= 10 * tol


def test_reproduction_detects_a_wrong_rule():
    """The reproduction check can fail: treating ReLU as the identity breaks it."""
    net = make_zoo()
    x0 = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(4))
    bad = LinearScope(net, dtype=torch.float64, rules={**RULES, nn.ReLU: lambda m, z0, z1: (m(z0), z1)})
    y0, y1 = bad.forward_pair(x0, x0)
    assert _rel(y1, y0) > 1e-6


# ---------------------------------------------------------------------------
# linearity in x1 with biases zeroed
# ---------------------------------------------------------------------------


def _zero_biases(net: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias"):
                p.zero_()
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.zero_()
    return net


def test_linear_with_biases_zeroed():
    net = _zero_biases(make_zoo())
    scope = LinearScope(net, dtype=torch.float64, rules=RULES)
    g = torch.Generator().manual_seed(5)
    x0, u, v = (torch.randn(3, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    a, c = 1.7, -0.6
    _, yu = scope.forward_pair(x0, u)
    _, yv = scope.forward_pair(x0, v)
    _, yuv = scope.forward_pair(x0, a * u + c * v)
    assert _rel(yuv, a * yu + c * yv) < 1e-12
    assert float(scope.bias(x0).abs().max()) < 1e-14
    # with biases on, y1 is affine but not linear: the same identity fails by about b
    full = LinearScope(make_zoo(), dtype=torch.float64, rules=RULES)
    _, yu = full.forward_pair(x0, u)
    _, yv = full.forward_pair(x0, v)
    _, yuv = full.forward_pair(x0, a * u + c * v)
    assert _rel(yuv, a * yu + c * yv) > 1e-6
    assert _rel(yuv, a * (yu - full.bias(x0)) + c * (yv - full.bias(x0)) + full.bias(x0)) < 1e-12


def test_decision_centering_moves_mean_into_bias():
    net = _zero_biases(make_zoo())
    x0 = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    dec = LinearScope(net, dtype=torch.float64, rules=RULES, norm_centering="decision")
    y0, y1 = dec.forward_pair(x0, x0)
    assert _rel(y1, y0) < 1e-12  # still reproduces f(x0)
    assert float(dec.bias(x0).abs().max()) > 1e-6  # but is no longer linear with biases zeroed


# ---------------------------------------------------------------------------
# A against autograd; transposes; batched vs loop; svds
# ---------------------------------------------------------------------------


def test_matrix_equals_jacobian_for_relu_maxpool_cnn(cnn, digits):
    scope = LinearScope(cnn, dtype=torch.float64)
    ref = DigitsCNN().double()
    ref.load_state_dict({k: v.double() for k, v in cnn.state_dict().items()})
    ref.eval()
    for i in range(3):
        x0 = digits[1][i].double()
        J = torch.autograd.functional.jacobian(lambda x: ref(x[None])[0], x0).reshape(10, -1)
        A = scope.matrix(x0)
        assert A.shape == (10, 64)
        assert torch.allclose(A, J, rtol=0, atol=1e-12 * float(J.abs().max()))
        b = scope.bias(x0)
        with torch.no_grad():
            f = ref(x0[None])[0]
        assert torch.allclose(b, f - J @ x0.reshape(-1), rtol=0, atol=1e-12 * float(f.abs().max()))


def test_transpose_and_batched_matrix(cnn, digits):
    net = make_zoo()
    for scope, x0 in [
        (LinearScope(cnn, dtype=torch.float64), digits[1][7]),
        (LinearScope(net, dtype=torch.float64, rules=RULES), torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(7))),
    ]:
        A = scope.matrix(x0)
        A_loop = scope.matrix_loop(x0)
        assert torch.allclose(A, A_loop, rtol=0, atol=1e-12)
        A_small_chunks = scope.matrix(x0, chunk_size=5)
        assert torch.allclose(A, A_small_chunks, rtol=0, atol=1e-12)
        # rows from the transposed interpreter (autograd backward with frozen decisions)
        At = scope.matrix(x0, method="rows")
        assert torch.allclose(At, A, rtol=0, atol=1e-12)
        u = torch.randn(A.shape[0], dtype=torch.float64)
        v = torch.randn(A.shape[1], dtype=torch.float64)
        assert torch.allclose(scope.apply_transpose(x0, u), A.T @ u, atol=1e-12)
        assert torch.allclose(scope.apply(x0, v), A @ v, atol=1e-12)
        # batched products
        U = torch.randn(3, A.shape[0], dtype=torch.float64)
        assert torch.allclose(scope.apply_transpose(x0, U), U @ A, atol=1e-12)


def test_svds_matches_svdvals(cnn, digits):
    scope = LinearScope(cnn, dtype=torch.float64)
    x0 = digits[1][11]
    U, S, Vt = scope.svd(x0, k=5)
    A = scope.matrix(x0)
    ref = torch.linalg.svdvals(A).numpy()[:5]
    np.testing.assert_allclose(S, ref, rtol=1e-8)
    assert U.shape == (10, 5) and Vt.shape == (5, 64)
    np.testing.assert_allclose(np.abs(U[:, 0] @ A.numpy() @ Vt[0]), S[0], rtol=1e-8)
    with pytest.raises(ValueError, match="k must be"):
        scope.svd(x0, k=10)


def test_float32_scope_close_to_float64(cnn, digits):
    x0 = digits[1][2]
    A32 = LinearScope(cnn).matrix(x0)
    A64 = LinearScope(cnn, dtype=torch.float64).matrix(x0)
    assert A32.dtype == torch.float32 and A64.dtype == torch.float64
    assert _rel(A32.double(), A64) < 1e-5
    assert next(cnn.parameters()).dtype == torch.float32  # caller's model untouched


# ---------------------------------------------------------------------------
# unsupported modules
# ---------------------------------------------------------------------------


def test_unsupported_leaf_raises_naming_it():
    net = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.LSTM(4, 4)))
    with pytest.raises(LinearScopeError, match=r"'1\.1'.*LSTM"):
        LinearScope(net)


def test_unsupported_softmax_and_unruled_custom_module():
    with pytest.raises(LinearScopeError, match="Softmax"):
        LinearScope(nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=-1)))

    class Square(nn.Module):  # a leaf with no rule: must not be treated as linear
        def forward(self, x):
            return x * x

    with pytest.raises(LinearScopeError, match=r"'1'.*Square"):
        LinearScope(nn.Sequential(nn.Linear(4, 3), Square()))


def test_fx_rejects_nonlinear_glue():
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) * self.b(x)  # bilinear

    class Exp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return torch.exp(self.a(x))

    x = torch.randn(4)
    with pytest.raises(LinearScopeError, match="product of two input-dependent"):
        LinearScope(Gate()).forward_pair(x, x)
    with pytest.raises(LinearScopeError, match="exp"):
        LinearScope(Exp()).forward_pair(x, x)


def test_subclass_overriding_forward_does_not_inherit_rule():
    class Weird(nn.ReLU):
        def forward(self, x):
            return x.abs()

    with pytest.raises(LinearScopeError, match="Weird"):
        LinearScope(nn.Sequential(nn.Linear(3, 3), Weird()))


# ---------------------------------------------------------------------------
# analyses
# ---------------------------------------------------------------------------


def test_class_votes_bias_share_and_result(cnn, digits):
    scope = LinearScope(cnn, dtype=torch.float64)
    x0 = digits[1][0].double()
    A = scope.matrix(x0)
    y = scope.output(x0)
    for k in (0, 3):
        votes = scope.class_votes(x0, k)
        assert votes.shape == (1, 8, 8)
        assert torch.allclose(votes.reshape(-1), A[k], atol=1e-12)
        assert torch.isclose((votes * x0).sum() + scope.bias(x0)[k], y[k], atol=1e-10)
    share = scope.bias_share(x0)
    assert torch.allclose(share, (y - A @ x0.reshape(-1)) / y, atol=1e-10)

    res = scope.analyze(x0, label=int(digits[3][0]), k=3)
    assert isinstance(res, LinearScopeResult)
    assert res.reconstruction_rel_error < 1e-12
    assert res.target == res.predicted == int(y.argmax())
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    assert len(d["singular_values"]) == 3 and d["in_shape"] == [1, 8, 8]
    figs = res.figures()
    assert figs and all(isinstance(f, go.Figure) for f in figs)


def test_dataset_bias_share_matches_per_input(cnn, digits):
    scope = LinearScope(cnn, dtype=torch.float64)
    X, y = digits[1][:40], digits[3][:40]
    ds = scope.dataset_bias_share(X, y, batch_size=16)
    shares = []
    for i in range(len(X)):
        out = scope.output(X[i])
        c = int(out.argmax())
        shares.append(float(scope.bias_share(X[i])[c]))
    assert ds.n == 40
    assert ds.mean_share_predicted == pytest.approx(np.mean(shares), rel=1e-10)
    assert sum(ds.per_class_count) == 40
    json.dumps(ds.to_dict(), allow_nan=False)
    assert isinstance(ds.figures()[0], go.Figure)


# ---------------------------------------------------------------------------
# digits CNN cache
# ---------------------------------------------------------------------------


def test_load_digits_cnn_caches_safetensors(tmp_path, monkeypatch, digits):
    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path))
    m1 = load_digits_cnn(epochs=2)
    path = digits_cnn_path()
    assert path.is_file() and str(path).startswith(str(tmp_path))
    assert path.parent.name == "digits-cnn"
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temp files left
    mtime = path.stat().st_mtime_ns
    m2 = load_digits_cnn(epochs=2)
    assert path.stat().st_mtime_ns == mtime  # loaded, not retrained
    with torch.no_grad():
        assert torch.equal(m1(digits[1][:8]), m2(digits[1][:8]))
    assert m2.test_accuracy == pytest.approx(m1.test_accuracy)
    # deterministic training
    m3, acc3 = train_digits_cnn(seed=0, epochs=2)
    with torch.no_grad():
        assert torch.equal(m3(digits[1][:8]), m1(digits[1][:8]))


# ---------------------------------------------------------------------------
# probekit linearscope: several digits in one run
# ---------------------------------------------------------------------------


def test_linearscope_command_writes_several_digits(cnn, digits, tmp_path, monkeypatch, capsys):
    from probekit import results
    from probekit.cli import main
    from probekit.linearscope_run import LinearScopeRunConfig

    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("probekit.digits_cnn.load_digits_cnn", lambda: cnn)  # trained once, by the fixture
    y = [int(v) for v in digits[3]]
    per_class = sorted(y.index(c) for c in range(10))

    def written(out):
        got = {int(p.stem.removeprefix("digit-")): json.loads(p.read_text())
               for p in (out / "digits-cnn").glob("digit-*.json")}
        assert all((out / "digits-cnn" / f"digit-{i}.html").is_file() for i in got)
        return got

    # default: the first test digit of each class
    many = written(_run(main, tmp_path / "default", []))
    assert sorted(many) == per_class and sorted(y[i] for i in many) == list(range(10))
    # --digits plus --digit-index: the union
    more = written(_run(main, tmp_path / "list", ["--digits", "5, 12", "--digit-index", "3"]))
    assert sorted(more) == [3, 5, 12]
    for i, p in {**many, **more}.items():
        assert p["kind"] == "linearscope_digits" and p["one"]["label"] == y[i]
        assert p["test_set"] == many[per_class[0]]["test_set"]  # computed once, the same in every file
    # each file equals a single-digit run for that index (the old --digit-index behaviour: one file)
    for i in (3, 12, per_class[-1]):
        single = written(_run(main, tmp_path / f"single-{i}", ["--digit-index", str(i)]))
        assert list(single) == [i]
        assert single[i] == {**many, **more}[i]
        figs = results.figures(single[i])
        assert figs and all(f.to_json() for f in figs)
    # bad values are refused with exit code 2, naming the problem
    for bad in (["--digits", "1,x"], ["--digits", "100000"], ["--digits", "-1"], ["--digit-index", "-2"]):
        assert main(["linearscope", "--skip-lm", "--out", str(tmp_path / "bad"), *bad]) == 2
    assert not (tmp_path / "bad" / "digits-cnn").exists()
    assert LinearScopeRunConfig(digits=[4, 1]).digits == (4, 1)
    assert LinearScopeRunConfig(digits="per-class").digits == "per-class"
    with pytest.raises(ValueError, match="per-class"):
        LinearScopeRunConfig(digits=[])


def _run(main, out, args):
    assert main(["linearscope", "--skip-lm", "--out", str(out), *args]) == 0
    return out


def _hand_scope_result(n_cls: int = 3) -> LinearScopeResult:
    rng = np.random.default_rng(0)
    x = rng.random((1, 2, 2))
    A = rng.normal(size=(n_cls, 4))
    bias = np.array([1.0, -2.0, 0.5, 3.0][:n_cls])
    logits = A @ x.ravel() + bias
    return LinearScopeResult(input=x, logits=logits, bias=bias, matrix=A, predicted=1, target=1, label=0,
                             singular_values=np.zeros(0), left_singular_vectors=np.zeros((n_cls, 0)),
                             right_singular_vectors=np.zeros((0, 4)), reconstruction_rel_error=0.0)


def test_bias_share_figure_marks_predicted_and_names_the_test_mean():
    res = _hand_scope_result()
    fig = res.bias_share_figure(test_mean=-0.125)
    assert np.allclose(list(fig.data[0].y), res.bias / res.logits)
    assert list(fig.data[0].marker.color) == ["#1f77b4", "#d62728", "#1f77b4"]  # class 1 predicted
    assert "-0.125" in fig.layout.title.text and "test-set" not in res.bias_share_figure().layout.title.text
    assert any(f.to_json() == fig.to_json() for f in res.figures(test_mean_share=-0.125))  # the same bars


def test_digit_rows_figure_draws_the_input_and_every_row():
    res = _hand_scope_result(n_cls=4)
    fig = res.digit_rows_figure(index=7)
    assert [t.name for t in fig.data] == ["input", "class 0", "class 1", "class 2", "class 3"]
    assert np.allclose(fig.data[0].z, res.input[0][::-1])  # rows flipped: heatmaps draw row 0 at the bottom
    assert np.allclose(fig.data[3].z, res.matrix[2].reshape(2, 2)[::-1])
    lim = np.abs(res.matrix).max()
    assert fig.data[1].zmax == pytest.approx(lim) and fig.data[1].zmin == pytest.approx(-lim)
    assert fig.layout.title.text.startswith("Digit 7: label 0, predicted 1")
    tall = res.digit_rows_figure(cols=2)  # 5 images on a 2-wide grid: 3 rows
    assert tall.layout.height == 120 + 250 * 3 and tall.layout.title.text.startswith("Test digit:")
