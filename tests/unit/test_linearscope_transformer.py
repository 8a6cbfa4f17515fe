"""TransformerLinearScope on tiny random-init decoders: exact reconstruction, linearity, transpose, bias."""

from __future__ import annotations

import pytest
import torch

from probekit.models import load_model, plain_model
from probekit.probes.linearscope_transformer import LinearScopeError, TransformerLinearScope


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def scope_and_ids(request, tiny_dir):
    bridge, tok = load_model(str(tiny_dir[request.param]))
    if request.param == "qwen2":  # HF initialises biases to zero; give the value biases something to carry
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in plain_model(bridge).model.layers:
                layer.self_attn.v_proj.bias.copy_(torch.randn(layer.self_attn.v_proj.bias.shape, generator=g))
    ids = tok("def f(x):\n    return x * 2", return_tensors="pt")["input_ids"][0]
    return request.param, TransformerLinearScope(bridge, dtype=torch.float64), ids, tok


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_probe_stream_at_x0_reproduces_the_network(tiny_dir, dtype, tol):
    bridge, tok = load_model(str(tiny_dir["llama"]))
    ids = tok("import os\nx = os.sep", return_tensors="pt")["input_ids"][0]
    rec = TransformerLinearScope(bridge, dtype=dtype).reconstruction(ids)
    assert rec["relative_error"] <= tol
    # the real stream is the network: it matches HF's own forward (fp32 parts of HF bound the fp64 case)
    assert rec["hf_relative_error"] <= (1e-5 if dtype == torch.float32 else 1e-6)


def test_linear_in_x1_and_transpose_consistent(scope_and_ids):
    arch, s, ids, _ = scope_and_ids
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x0 = s.embed(ids)
        dec = s.decisions(x0)
        b = s.bias(dec, x0)
        u, v = (torch.randn(x0.shape, generator=g, dtype=torch.float64) for _ in range(2))
        Au, Av = s.apply(dec, u, b), s.apply(dec, v, b)
        torch.testing.assert_close(s.apply(dec, 2.5 * u - 0.7 * v, b), 2.5 * Au - 0.7 * Av, rtol=1e-10, atol=1e-10)
        batched = s.apply(dec, torch.stack([u, v]), b)  # leading batch dims
        torch.testing.assert_close(batched[1], Av, rtol=1e-12, atol=1e-12)
    w = torch.randn(b.shape[-1], generator=g, dtype=torch.float64)
    ATw = s.apply_transpose(dec, x0, w, position=-1)
    torch.testing.assert_close(w @ Au[-1], (ATw * u).sum(), rtol=1e-10, atol=1e-10)  # <w, A u> = <Aᵀw, u>
    # y = A x0 + b, and without any model bias b = 0 (Llama); Qwen2 has q/k/v biases
    y = s.apply(dec, x0, b) + b
    torch.testing.assert_close(y, dec["logits"], rtol=1e-12, atol=1e-12)
    if arch == "llama":
        assert b.abs().max() == 0
    else:
        assert b.abs().max() > 0


def test_frozen_decisions_differ_from_the_jacobian(scope_and_ids):
    """A is not the Jacobian (norm scales and patterns are frozen): the two must differ for a real net."""
    _, s, ids, _ = scope_and_ids
    x0 = s.embed(ids).detach()
    with torch.no_grad():
        dec = s.decisions(x0)
    w = torch.zeros(dec["logits"].shape[-1], dtype=torch.float64)
    w[3] = 1
    row = s.apply_transpose(dec, x0, w)
    xg = x0.clone().requires_grad_(True)
    (jac_row,) = torch.autograd.grad(s.decisions(xg)["logits"][-1, 3], xg)
    assert not torch.allclose(row, jac_row, rtol=1e-3, atol=1e-6)


def test_token_contributions_add_up_to_the_logit(scope_and_ids):
    _, s, ids, tok = scope_and_ids
    tc = s.token_contributions(ids, target_id=40, tokenizer=tok)
    assert len(tc.linearscope) == len(ids) == len(tc.grad_x_input)
    assert abs(sum(tc.linearscope) + tc.bias - tc.logit) < 1e-10 * max(1.0, abs(tc.logit))
    assert tc.figures()[0].data[0].type == "heatmap"


def test_unsupported_layout_is_named():
    net = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(LinearScopeError, match="Sequential.*no config.model_type"):
        TransformerLinearScope(net)


def test_lanczos_singular_values_match_the_dense_matrix(tiny_dir):
    bridge, tok = load_model(str(tiny_dir["llama"]))
    s = TransformerLinearScope(bridge, dtype=torch.float64)
    ids = tok("a = 1", return_tensors="pt")["input_ids"][0]
    x0 = s.embed(ids)
    with torch.no_grad():
        dec = s.decisions(x0)
        b = s.bias(dec, x0)
        T, D = x0.shape
        basis = torch.eye(T * D, dtype=torch.float64).reshape(T * D, T, D)
        A = s.apply(dec, basis, b)[:, -1, :].T  # (V, T*D): column j = A e_j, built by one batched forward
    torch.testing.assert_close(s.matrix(ids, chunk_size=7), A, rtol=1e-12, atol=1e-12)
    # rows by the transposed interpreter agree with the columns
    w = torch.zeros(A.shape[0], dtype=torch.float64)
    w[11] = 1
    torch.testing.assert_close(s.apply_transpose(dec, x0, w).reshape(-1), A[11], rtol=1e-12, atol=1e-12)
    U, S, Vt = s.svd(ids, k=3)
    torch.testing.assert_close(S, torch.linalg.svdvals(A)[:3], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close((A @ Vt.reshape(3, -1).T).abs(), (U * S).abs(), rtol=1e-6, atol=1e-8)


def test_linearscope_command_writes_json_and_html(tiny_dir, tmp_path, monkeypatch):
    import json

    from probekit.cli import main

    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["linearscope", "--model", str(tiny_dir["llama"]), "--prompt", "x = 1", "--out", str(out)]) == 0
    lm = json.loads((out / tiny_dir["llama"].as_posix().replace("/", "--") / "token-contributions.json").read_text())
    assert lm["reconstruction"]["float64"]["relative_error"] <= 1e-12
    c = lm["contributions"]
    assert abs(sum(c["linearscope"]) + c["bias"] - c["logit"]) < 1e-9
    digits = json.loads((out / "digits-cnn" / "digit-0.json").read_text())
    assert 0.9 < digits["test_accuracy"] <= 1 and digits["test_set"]["n"] > 400
    page = (out / "digits-cnn" / "digit-0.html").read_text()
    assert 'src="plotly.min.js"' in page and "Plotly.newPlot" in page  # shared bundle, not inlined
    assert len(page) < 1_000_000 < (out / "digits-cnn" / "plotly.min.js").stat().st_size
    assert main(["linearscope", "--digit-index", "100000", "--skip-lm", "--out", str(out)]) == 2


def test_token_contributions_figure_views():
    import numpy as np

    from probekit.probes.linearscope_transformer import TokenContributions

    tc = TokenContributions(tokens=["a", "b", "a"], target="c", logit=2.5, bias=0.5, linearscope=[1.0, -3.0, 4.0],
                            grad_x_input=[0.5, 2.0, -1.0])
    (heat,) = tc.figures()
    assert heat.data[0].type == "heatmap" and list(heat.data[0].x) == ["0:a", "1:b", "2:a"]
    assert np.allclose(heat.data[0].z, [tc.linearscope, tc.grad_x_input])
    assert (heat.data[0].zmin, heat.data[0].zmax) == (-4.0, 4.0)
    assert heat.layout.title.text.startswith("'c': logit 2.50")
    (bars,) = tc.figures(view="bars", prompt="a b a")
    assert [t.type for t in bars.data] == ["bar", "bar"] and list(bars.data[1].y) == tc.grad_x_input
    assert bars.layout.title.text.startswith("'a b a' → 'c'")
    with pytest.raises(ValueError, match="view must be one of"):
        tc.figures(view="lines")


def test_check_support_reads_a_bridge(tiny_llama, tiny_bert):
    from probekit.probes.linearscope_transformer import check_support

    assert check_support(tiny_llama[0]) is None  # the bridge's HF model is what is checked
    assert check_support(tiny_bert[0]) is None
