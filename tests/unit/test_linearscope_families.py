"""TransformerLinearScope across decoder families: exact against each family's own HF forward, or refused up front.

Each family is a tiny random-init HF model (2 layers, float64, eager attention) whose every parameter is perturbed
(norm weights off 1, biases off 0) so that a wrong norm form, a missing bias or a missing soft-cap shows. Checks:
(1) the interpreter's real stream is the HF forward (≤ 1e-6 relative in float64; HF keeps softmax, rotary tables
and some norms in float32); (2) A, built column by column from the probe stream, equals the autograd Jacobian of
the model with its decisions detached (≤ 1e-10); (3) with every bias zeroed, the probe stream is linear and b = 0.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

from probekit.probes.linearscope import LinearScopeError
from probekit.probes.linearscope_transformer import SUPPORTED_FAMILIES, TransformerLinearScope, check_support
from probekit.testing import FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")

_COMMON = dict(vocab_size=53, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
               max_position_embeddings=32)
WINDOW = 4  # shorter than the prompt: sliding-window layers must mask
ENCODERS = ("bert", "roberta")
ADDITIVE = ("bias", "wpe.weight", "position_embeddings.weight", "token_type_embeddings.weight")  # constants → b


def _config(family: str):
    c = _COMMON
    if family == "gpt2":
        return T.GPT2Config(vocab_size=53, n_embd=16, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                            eos_token_id=0)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(**c, rotary_pct=0.5, use_parallel_residual=True, bos_token_id=0, eos_token_id=0)
    if family == "gpt_neox_sequential":
        return T.GPTNeoXConfig(**c, rotary_pct=1.0, use_parallel_residual=False, bos_token_id=0, eos_token_id=0)
    if family == "gptj":
        return T.GPTJConfig(vocab_size=53, n_embd=16, n_layer=2, n_head=4, rotary_dim=2, n_positions=32,
                            bos_token_id=0, eos_token_id=0)
    if family == "llama":
        return T.LlamaConfig(**c, num_key_value_heads=2)
    if family == "mistral":
        return T.MistralConfig(**c, num_key_value_heads=2, sliding_window=WINDOW)
    if family == "qwen2":
        return T.Qwen2Config(**c, num_key_value_heads=2)
    if family == "qwen3":
        return T.Qwen3Config(**c, num_key_value_heads=2, head_dim=4)
    if family == "gemma":
        return T.GemmaConfig(**c, num_key_value_heads=2, head_dim=4, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if family == "gemma2":
        return T.Gemma2Config(**c, num_key_value_heads=2, head_dim=4, sliding_window=WINDOW, query_pre_attn_scalar=8,
                              attn_logit_softcapping=0.5, final_logit_softcapping=0.5, pad_token_id=0,
                              bos_token_id=0, eos_token_id=0)
    if family == "gemma3":
        return T.Gemma3TextConfig(**c, num_key_value_heads=2, head_dim=4, sliding_window=WINDOW,
                                  layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=8,
                                  final_logit_softcapping=0.5, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if family == "phi3":
        return T.Phi3Config(**c, num_key_value_heads=2, partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=0,
                            eos_token_id=0)
    if family == "olmo2":
        return T.Olmo2Config(**c, num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if family == "phi":
        return T.PhiConfig(**c, partial_rotary_factor=0.5, qk_layernorm=True, pad_token_id=0, bos_token_id=0,
                           eos_token_id=0)
    if family == "bert":
        return T.BertConfig(**c, pad_token_id=0)
    if family == "roberta":
        return T.RobertaConfig(**c, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    raise KeyError(family)


def tiny(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    cfg = _config(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    auto = T.AutoModelForMaskedLM if family in ENCODERS else T.AutoModelForCausalLM
    m = auto.from_config(cfg, attn_implementation="eager").to(torch.float64).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():  # every norm weight off 1 (Gemma: off 0), every bias off 0
            p.add_(0.15 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


IDS = torch.tensor([3, 17, 5, 40, 22, 9, 31, 3, 12])  # 9 tokens > WINDOW
EXACT = ["gpt2", "gpt_neox", "gpt_neox_sequential", "gptj", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
         "gemma3", "phi3", "olmo2", "phi", "bert", "roberta"]


# the families of the README's architecture table (probekit.testing.FAMILIES) get a "linearscope" cell
TABLE_FAMILIES = set(FAMILIES)


@pytest.fixture(scope="module", params=EXACT)
def family_scope(request):
    m = tiny(request.param)
    return request.param, m, TransformerLinearScope(m, dtype=torch.float64)


def test_real_stream_is_the_hf_forward(family_scope, record_capability):
    """Fails on the Llama-only interpreter for Gemma (relative error ≈ 1), Gemma 2 and Qwen3 (silently wrong maps)."""
    family, m, s = family_scope
    if family in TABLE_FAMILIES:
        record_capability(family, "linearscope", note="exact")
    rec = s.reconstruction(IDS)
    assert rec["hf_relative_error"] <= 1e-6, (family, rec)
    assert rec["relative_error"] <= 1e-12, (family, rec)
    with torch.no_grad():  # the same check, computed here from the HF model directly
        hf = m(input_ids=IDS[None]).logits[0]
        y1 = s.linear_stream(s.decisions(s.embed(IDS)), s.embed(IDS))
    assert ((y1 - hf).norm() / hf.norm()).item() <= 1e-6


def test_matrix_is_the_jacobian_with_decisions_detached(family_scope, record_capability):
    family, m, s = family_scope
    if family in TABLE_FAMILIES:
        record_capability(family, "linearscope", note="exact")
    ids = IDS[:6]
    x0 = s.embed(ids).detach()
    A = s.matrix(ids, position=-1, chunk_size=40)  # (V, T·D) from probe-stream columns
    J = torch.autograd.functional.jacobian(lambda x: s.detached_forward(x)[-1], x0)  # (V, T, D)
    assert J.abs().max() > 0
    torch.testing.assert_close(A, J.reshape(A.shape), rtol=1e-10, atol=1e-10)
    # and it is not the plain Jacobian: the decisions depend on the input
    Jfull = torch.autograd.functional.jacobian(lambda x: s.decisions(x)["logits"][-1], x0)
    assert not torch.allclose(J, Jfull, rtol=1e-4, atol=1e-8), family
    # the real stream has the HF model's derivative too, not only its value (autograd through transformers)
    Jhf = torch.autograd.functional.jacobian(lambda x: m(inputs_embeds=x[None]).logits[0, -1], x0)
    assert ((Jfull - Jhf).norm() / Jhf.norm()).item() <= 1e-6, family


def test_linear_in_x1_with_biases_zeroed(family_scope):
    family, _, _ = family_scope
    m = tiny(family)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(ADDITIVE):  # GPT-2's and BERT's positions are additive constants
                p.zero_()
    s = TransformerLinearScope(m, dtype=torch.float64)
    x0 = s.embed(IDS)
    g = torch.Generator().manual_seed(0)
    u, v = (torch.randn(x0.shape, generator=g, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        dec = s.decisions(x0)
        assert s.bias(dec, x0).abs().max() == 0, family
        y = s.linear_stream(dec, torch.stack([u, v, 2.5 * u - 0.7 * v]))
    torch.testing.assert_close(y[2], 2.5 * y[0] - 0.7 * y[1], rtol=1e-10, atol=1e-10)


def test_token_contributions_add_up(family_scope):
    family, _, s = family_scope
    tc = s.token_contributions(IDS, target_id=7)
    assert abs(sum(tc.linearscope) + tc.bias - tc.logit) < 1e-10 * max(1.0, abs(tc.logit)), family


def test_decision_centering_freezes_the_layernorm_mean():
    """``norm_centering="decision"`` also takes the LayerNorm mean from x⁰: still exact, the map changes, and the
    mean's share moves into b (nonzero even with every bias zeroed)."""
    m = tiny("gpt2")
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(ADDITIVE):
                p.zero_()
    probe = TransformerLinearScope(m, dtype=torch.float64)
    frozen = TransformerLinearScope(m, dtype=torch.float64, norm_centering="decision")
    assert frozen.reconstruction(IDS)["hf_relative_error"] <= 1e-6
    x0 = frozen.embed(IDS)
    with torch.no_grad():
        assert frozen.bias(frozen.decisions(x0), x0).abs().max() > 0
        assert probe.bias(probe.decisions(x0), x0).abs().max() == 0
    J = torch.autograd.functional.jacobian(lambda x: frozen.detached_forward(x)[-1], x0[:5])
    torch.testing.assert_close(frozen.matrix(IDS[:5]), J.reshape(J.shape[0], -1), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="norm_centering"):
        TransformerLinearScope(m, norm_centering="mean")


def test_supported_families_table_matches_the_tests():
    for fam in ("gpt2", "gpt_neox", "gptj", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                "phi3", "olmo2", "phi", "bert", "roberta"):
        assert SUPPORTED_FAMILIES[fam] == "exact", fam
    assert SUPPORTED_FAMILIES["gemma3"].startswith("refused")
    assert check_support(tiny("gemma2")) is None


def test_unsupported_models_are_refused_before_any_computation():
    with pytest.raises(LinearScopeError, match="model_type 't5'.*no TransformerLinearScope rules"):
        TransformerLinearScope(T.T5ForConditionalGeneration(T.T5Config(vocab_size=53, d_model=16, d_kv=4,
                                                                           d_ff=24, num_layers=1, num_heads=2)))
    with pytest.raises(LinearScopeError, match="no cls.*BertForMaskedLM"):  # a bare encoder has no logits
        check_support(T.BertModel(_config("bert")))
    with pytest.raises(LinearScopeError, match="Sequential"):
        check_support(torch.nn.Sequential(torch.nn.Linear(3, 3)))


def test_encoder_attends_both_ways():
    """BERT's first token reads the last one (no causal mask): its row of A has a nonzero block there."""
    s = TransformerLinearScope(tiny("bert"))
    A = s.matrix(IDS[:5], position=0).reshape(-1, 5, 16)
    assert A[:, 4].abs().max() > 1e-3


def test_unknown_activation_is_refused_naming_the_module():
    m = tiny("gpt2", activation_function="quick_gelu")
    with pytest.raises(LinearScopeError, match=r"transformer\.h\.0\.mlp\.act.*QuickGELU"):
        TransformerLinearScope(m)


def test_unknown_rope_type_is_refused_naming_the_config_field():
    m = tiny("llama")
    m.config.rope_parameters = dict(m.config.rope_parameters, rope_type="dynamic", factor=2.0)
    with pytest.raises(LinearScopeError, match="rope_parameters.*dynamic"):
        TransformerLinearScope(m)


def test_extra_parametrised_module_is_refused_naming_it():
    m = tiny("llama")
    m.model.layers[1].self_attn.extra_norm = torch.nn.LayerNorm(16).to(torch.float64)
    with pytest.raises(LinearScopeError, match=r"model\.layers\.1\.self_attn\.extra_norm"):
        TransformerLinearScope(m)


def test_unknown_norm_form_is_refused_naming_the_module():
    m = tiny("llama")

    class OddNorm(torch.nn.Module):  # RMSNorm-shaped, but squares the weight: neither w·x/rms nor (1+w)·x/rms
        def __init__(self, w):
            super().__init__()
            self.weight = torch.nn.Parameter(w)
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return self.weight**2 * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    m.model.layers[0].post_attention_layernorm = OddNorm(m.model.layers[0].post_attention_layernorm.weight.data)
    with pytest.raises(LinearScopeError, match=r"model\.layers\.0\.post_attention_layernorm.*OddNorm"):
        TransformerLinearScope(m)


def test_reconstruction_check_runs_on_every_call_and_raises():
    """A wrong interpretation (here: a doubled attention scale) is caught by the per-call check, never returned."""
    m = tiny("qwen3")
    s = TransformerLinearScope(m, dtype=torch.float64)
    s.blocks[1].attn.scaling *= 2
    x0 = s.embed(IDS)
    for call in (lambda: s.decisions(x0), lambda: s.matrix(IDS[:3]), lambda: s.token_contributions(IDS, 5),
                 lambda: s.svd(IDS[:3], k=2)):
        with pytest.raises(LinearScopeError, match="differs from the model's own forward"):
            call()


def test_sliding_window_longer_prompt_still_exact_and_masked():
    """Mistral, a 4-token window, a 9-token prompt: each layer reaches 3 positions back, two layers 6, so the last
    logit's row of A is zero on positions 0–1 and nonzero on 2–8 (a full causal mask would reach all 9)."""
    m = tiny("mistral")
    s = TransformerLinearScope(m, dtype=torch.float64)
    assert s.reconstruction(IDS)["hf_relative_error"] <= 1e-6
    A = s.matrix(IDS).reshape(-1, len(IDS), 16)
    reach = A.abs().amax(dim=(0, 2))
    assert (reach[:2] == 0).all() and (reach[2:] > 0).all()


def test_sdpa_loaded_model_is_exact_and_keeps_its_attention_setting():
    """Mistral loaded with SDPA: the reference forward runs eager (the arithmetic the rules follow), the map is
    exact, and the model's attention setting is left as it was."""
    m = tiny("mistral")
    m.set_attn_implementation("sdpa")
    s = TransformerLinearScope(m)
    assert s.reconstruction(IDS)["hf_relative_error"] <= 1e-6
    assert m.config._attn_implementation == "sdpa"
    with torch.no_grad():
        sdpa = m(input_ids=IDS[None]).logits[0]
        assert ((s.decisions(s.embed(IDS))["logits"] - sdpa).norm() / sdpa.norm()).item() <= 1e-6


@pytest.mark.parametrize("family,rope", [
    ("llama", dict(rope_type="llama3", factor=2.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8)),
    ("llama", dict(rope_type="linear", factor=3.0)),
    ("qwen2", dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=16)),
])
def test_static_rope_scalings_are_exact(family, rope):
    m = tiny(family, rope_parameters=dict(rope_theta=10000.0, **rope))
    s = TransformerLinearScope(m)
    assert s.reconstruction(IDS)["hf_relative_error"] <= 1e-6


def test_gemma3_scaled_global_rope_is_exact():
    """Gemma 3's global layers use another base and a linear scaling (as the released models do)."""
    m = tiny("gemma3", rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=10000.0),
                                        "full_attention": dict(rope_type="linear", rope_theta=1e6, factor=8.0)})
    assert TransformerLinearScope(m).reconstruction(IDS)["hf_relative_error"] <= 1e-6


def test_bfloat16_model_is_accepted_and_interpreted_in_float64():
    m = tiny("gemma2").to(torch.bfloat16)
    s = TransformerLinearScope(m, dtype=torch.float64)
    assert next(m.parameters()).dtype == torch.bfloat16  # the caller's model is not converted
    assert s.reconstruction(IDS)["hf_relative_error"] <= 1e-6  # against the float64 copy's own forward
