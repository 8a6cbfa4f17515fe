"""probekit.interventions on tiny random-init models of every supported family, each checked by hand.

The hand computations never use the intervention code: they edit the model itself — a copy whose leaf modules
that write into the residual stream are wrapped as ``Sequential(leaf, edit)`` — and compare logits.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
import transformers as T

from probekit.hooks import HookNameError
from probekit.interventions import (
    HF_LAYOUTS,
    activation_addition,
    activation_patching,
    directional_ablation,
    greedy_decode,
    intervene,
    lm_logits,
    logit_difference,
    record_activations,
    resolve_sites,
    splice,
)
from probekit.testing import FAMILIES as _TABLE
from probekit.testing import byte_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

D, L = 32, 2
TOK = byte_tokenizer()
V = len(TOK)
_C = dict(vocab_size=V, num_hidden_layers=L)
_ATT = dict(hidden_size=D, num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * D, **_C)

# family -> (config, class)
FAMILIES = {
    "gpt2": lambda: (T.GPT2Config(n_embd=D, n_head=4, n_layer=L, vocab_size=V, n_positions=64), T.GPT2LMHeadModel),
    "gpt_neox": lambda: (T.GPTNeoXConfig(hidden_size=D, num_attention_heads=4, intermediate_size=2 * D,
                                         rotary_pct=0.5, max_position_embeddings=64, **_C), T.GPTNeoXForCausalLM),
    "gpt_neox_sequential": lambda: (T.GPTNeoXConfig(hidden_size=D, num_attention_heads=4, intermediate_size=2 * D,
                                                    use_parallel_residual=False, max_position_embeddings=64, **_C),
                                    T.GPTNeoXForCausalLM),
    "gptj": lambda: (T.GPTJConfig(n_embd=D, n_head=4, n_layer=L, rotary_dim=4, vocab_size=V, n_positions=64),
                     T.GPTJForCausalLM),
    "llama": lambda: (T.LlamaConfig(**_ATT), T.LlamaForCausalLM),
    "mistral": lambda: (T.MistralConfig(**_ATT), T.MistralForCausalLM),
    "qwen2": lambda: (T.Qwen2Config(**_ATT), T.Qwen2ForCausalLM),
    "qwen3": lambda: (T.Qwen3Config(head_dim=8, **_ATT), T.Qwen3ForCausalLM),
    "gemma": lambda: (T.GemmaConfig(head_dim=8, **_ATT), T.GemmaForCausalLM),
    "gemma2": lambda: (T.Gemma2Config(head_dim=8, sliding_window=4, **_ATT), T.Gemma2ForCausalLM),
    "gemma3": lambda: (T.Gemma3TextConfig(head_dim=8, sliding_window=4, **_ATT), T.Gemma3ForCausalLM),
    "phi3": lambda: (T.Phi3Config(pad_token_id=0, **_ATT), T.Phi3ForCausalLM),
    "olmo2": lambda: (T.Olmo2Config(**_ATT), T.Olmo2ForCausalLM),
}

# Written here independently of probekit.interventions.HF_LAYOUTS: the embedding modules, and per block the leaf
# modules whose outputs are the attention and MLP terms added to the residual stream (dropouts are identities).
_LLAMA_HAND = (["model.embed_tokens"], "model.layers.{l}.self_attn.o_proj", "model.layers.{l}.mlp.down_proj")
_POST_HAND = (["model.embed_tokens"], "model.layers.{l}.post_attention_layernorm",
              "model.layers.{l}.post_feedforward_layernorm")
HAND = {
    "gpt2": (["transformer.wte", "transformer.wpe"], "transformer.h.{l}.attn.c_proj", "transformer.h.{l}.mlp.c_proj"),
    "gpt_neox": (["gpt_neox.embed_in"], "gpt_neox.layers.{l}.attention.dense", "gpt_neox.layers.{l}.mlp.dense_4h_to_h"),
    "gptj": (["transformer.wte"], "transformer.h.{l}.attn.out_proj", "transformer.h.{l}.mlp.fc_out"),
    "gemma2": _POST_HAND, "gemma3": _POST_HAND, "olmo2": _POST_HAND,
}
HAND["gpt_neox_sequential"] = HAND["gpt_neox"]


def _hand_layout(family):
    return HAND.get(family, _LLAMA_HAND)


@pytest.fixture(scope="module")
def models():
    """family -> (HF model, bridge booted on a copy of it), built on first use."""
    made = {}

    def get(family):
        if family not in made:
            cfg, cls = FAMILIES[family]()
            cfg.architectures = [cls.__name__]
            torch.manual_seed(0)
            hf = cls(cfg).eval()
            hf.set_attn_implementation("eager")
            from transformer_lens.model_bridge import TransformerBridge

            bridge = TransformerBridge.boot_transformers(f"tiny-{family}", hf_model=copy.deepcopy(hf), tokenizer=TOK)
            made[family] = (hf, bridge)
        return made[family]

    return get


class _Edit(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _wrap(model, path, fn):
    """Replace the leaf module at ``path`` by ``Sequential(leaf, fn)`` (in place)."""
    parent, _, child = path.rpartition(".")
    holder = model.get_submodule(parent)
    setattr(holder, child, torch.nn.Sequential(getattr(holder, child), _Edit(fn)))


def _project(r):
    rh = r / r.norm()
    return lambda x: x - (x @ rh).unsqueeze(-1) * rh


def _ids(seed=0, B=2, P=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V - 3, (B, P), generator=g)


def _direction(seed=1):
    return torch.randn(D, generator=torch.Generator().manual_seed(seed))


FAMS = list(FAMILIES)
# the families of the README architecture table (probekit.testing.FAMILIES) get interventions cells
TABLE_FAMILIES = set(_TABLE)


def test_layouts_cover_the_families():
    assert {FAMILIES[f]()[0].model_type for f in FAMS} <= set(HF_LAYOUTS)


@pytest.mark.parametrize("family", FAMS)
def test_residual_sites_match_the_bridge(models, family):
    """Every residual-stream site read on the plain HF model equals the bridge's run_with_cache value."""
    hf, bridge = models(family)
    ids = _ids()
    _, cache = bridge.run_with_cache(ids)
    names = [n for n in cache.keys()
             if re.fullmatch(r"blocks\.\d+\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)", n)]
    assert len(names) >= 4 * L
    sites, mech, run = resolve_sites(hf, names)
    assert mech == "plain" and run is hf
    _, acts = record_activations(hf, names, ids)
    for n in names:
        torch.testing.assert_close(acts[n], cache[n], rtol=1e-4, atol=1e-5, msg=f"{family} {n}")


@pytest.mark.parametrize("mechanism", ["hf", "bridge"])
@pytest.mark.parametrize("family", FAMS)
def test_directional_ablation_equals_the_hand_edited_model(models, record_capability, family, mechanism):
    """Ablating r at every resid_pre / attn_out / mlp_out equals projecting r out of each term written into the
    residual stream (embeddings and every attention and MLP output) and running the edited model unhooked."""
    if family in TABLE_FAMILIES:
        record_capability(family, "ablation")
    hf, bridge = models(family)
    r, ids = _direction(), _ids()
    hand = copy.deepcopy(hf)
    embeds, attn, mlp = _hand_layout(family)
    for path in embeds + [p.format(l=l) for l in range(L) for p in (attn, mlp)]:
        _wrap(hand, path, _project(r))
    with torch.no_grad():
        want = hand(input_ids=ids).logits
        clean = hf(input_ids=ids).logits
        model = hf if mechanism == "hf" else bridge
        with directional_ablation(model, r) as m:
            assert (m is hf) == (mechanism == "hf")
            got = lm_logits(m, ids)
    assert (want - clean).abs().max() > 1e-3  # the ablation changes the output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mechanism", ["hf", "bridge"])
@pytest.mark.parametrize("family", FAMS)
def test_activation_addition_equals_the_hand_edited_model(models, record_capability, family, mechanism):
    """alpha r added at blocks.1.hook_resid_pre (every position, then only columns 2 and 5) equals adding it to
    block 0's MLP term by hand (the residual input of block 1 is block 0's output)."""
    if family in TABLE_FAMILIES:
        record_capability(family, "addition")
    hf, bridge = models(family)
    r, ids, alpha = _direction(), _ids(), -3.0
    model = hf if mechanism == "hf" else bridge
    mlp = _hand_layout(family)[2].format(l=0)
    for positions, cols in ((None, slice(None)), ([5, 2], [2, 5])):
        hand = copy.deepcopy(hf)

        def add(x, cols=cols):
            x = x.clone()
            x[:, cols] += alpha * r
            return x

        _wrap(hand, mlp, add)
        with torch.no_grad():
            want = hand(input_ids=ids).logits
            with activation_addition(model, r, 1, alpha, positions=positions) as m:
                got = lm_logits(m, ids)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        if positions is not None:  # columns before the first edited one are untouched (causal)
            torch.testing.assert_close(got[:, :2], hf(input_ids=ids).logits[:, :2].detach())


@pytest.mark.parametrize("family", FAMS)
def test_activation_patching(models, record_capability, family):
    """Patching clean activations at every position reproduces the clean logits; at one column, the run with that
    column of block 1's residual input set to the clean one by hand; at no column, the corrupted logits."""
    if family in TABLE_FAMILIES:
        record_capability(family, "patching")
    hf, _ = models(family)
    clean, corrupt = _ids(0), _ids(0).clone()
    corrupt[:, 3] = (corrupt[:, 3] + 7) % V  # corrupted at column 3 only
    sites = [f"blocks.{l}.hook_resid_pre" for l in range(L)] + ["blocks.1.hook_resid_post"]
    good, bad = 5, 9

    def metric(z):
        return logit_difference(z, good, bad).mean()

    with torch.no_grad():
        out = hf(input_ids=clean, output_hidden_states=True)
        clean_logits, h1_clean = out.logits, out.hidden_states[1]
        out = hf(input_ids=corrupt, output_hidden_states=True)
        corrupt_logits, h1_corrupt = out.logits, out.hidden_states[1]

    res = activation_patching(hf, clean, corrupt, sites, metric=metric, positions="all", return_logits=True)
    assert res.metric.shape == (len(sites), 1) and res.positions == [None]
    for i, s in enumerate(sites):
        torch.testing.assert_close(res.logits[i, 0], clean_logits, rtol=1e-5, atol=1e-5, msg=s)
    np.testing.assert_allclose(res.metric[:, 0], float(metric(clean_logits)), rtol=1e-5, atol=1e-5)
    assert res.clean_metric == pytest.approx(float(metric(clean_logits)), abs=1e-6)
    assert res.corrupted_metric == pytest.approx(float(metric(corrupt_logits)), abs=1e-6)
    np.testing.assert_allclose(res.normalized(), 1.0, atol=1e-4)

    # per-column sweep at block 1's residual input, against the hand edit of each column
    sweep = activation_patching(hf, clean, corrupt, ["blocks.1.hook_resid_pre"], metric=metric, positions="each",
                                return_logits=True)
    assert sweep.positions == list(range(clean.shape[1]))
    for c in range(clean.shape[1]):
        hand = copy.deepcopy(hf)
        delta = h1_clean[:, c] - h1_corrupt[:, c]

        def fix(x, c=c, delta=delta):
            x = x.clone()
            x[:, c] += delta
            return x

        _wrap(hand, _hand_layout(family)[2].format(l=0), fix)
        with torch.no_grad():
            want = hand(input_ids=corrupt).logits
        torch.testing.assert_close(sweep.logits[0, c], want, rtol=1e-5, atol=1e-6)
        assert sweep.metric[0, c] == pytest.approx(float(metric(want)), abs=1e-6)
    # columns before the corruption hold the same activations in both runs: patching them changes nothing
    for c in range(3):
        torch.testing.assert_close(sweep.logits[0, c], corrupt_logits, rtol=1e-5, atol=1e-5)

    with torch.no_grad(), intervene(hf, {"blocks.1.hook_resid_pre": lambda a: a * 0}, positions=[]) as m:
        torch.testing.assert_close(lm_logits(m, corrupt), corrupt_logits)


@pytest.mark.parametrize("family", FAMS)
def test_generation_with_kv_cache_equals_recompute_under_positioned_interventions(models, record_capability, family):
    """Greedy decoding with a KV cache under an intervention limited to columns (the last prompt column on, or one
    generated column only) equals step-by-step decoding without a cache under the same intervention."""
    if family in TABLE_FAMILIES:
        record_capability(family, "generation")
    hf, _ = models(family)
    ids = _ids(3, B=2, P=6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # row 1 is left-padded
    ids[1, :2] = 0
    P, T = ids.shape[1], 5
    r = 4 * _direction(2)

    def recompute(m):
        x, mk = ids.clone(), mask.clone()
        toks = []
        for _ in range(T):
            pos = (mk.cumsum(-1) - 1).clamp(min=0)
            z = m(input_ids=x, attention_mask=mk, position_ids=pos, use_cache=False).logits[:, -1]
            nxt = z.argmax(-1)
            toks.append(nxt)
            x, mk = torch.cat([x, nxt[:, None]], 1), torch.cat([mk, torch.ones_like(mk[:, :1])], 1)
        return torch.stack(toks, 1)

    with torch.no_grad():
        plain = greedy_decode(hf, ids, mask, max_new_tokens=T)
        torch.testing.assert_close(plain, recompute(hf))
        changed = False
        for positions in (slice(P - 1, None), [P + 1], None):
            with activation_addition(hf, r, 1, 1.0, positions=positions) as m:
                got = greedy_decode(m, ids, mask, max_new_tokens=T)
                torch.testing.assert_close(got, recompute(m), msg=f"{family} positions={positions}")
            if positions == [P + 1]:
                assert torch.equal(got[:, :2], plain[:, :2])  # tokens before the edited column are unchanged
            changed |= not torch.equal(got, plain)
        assert changed  # the interventions do change the generations


def test_splice_and_intervene_errors(models):
    hf, bridge = models("gpt_neox")
    ids = _ids()
    with pytest.raises(ValueError, match="non-negative ints"):
        with intervene(hf, {"blocks.0.hook_resid_pre": lambda a: a}, positions=[-1]):
            pass
    with pytest.raises(ValueError, match="step 1"):
        with intervene(hf, {"blocks.0.hook_resid_pre": lambda a: a}, positions=slice(0, None, 2)):
            pass
    with pytest.raises(ValueError, match="no function in fns"):
        with intervene(hf, {"blocks.0.hook_resid_pre": lambda a: a}, positions={"blocks.1.hook_resid_pre": [1]}):
            pass
    with pytest.raises(HookNameError, match="in parallel"):  # Pythia blocks have no resid_mid
        with splice(hf, "blocks.0.hook_resid_mid", lambda a: a):
            pass
    with pytest.raises(HookNameError, match="no block 5"):
        with splice(hf, "blocks.5.hook_resid_pre", lambda a: a):
            pass
    with pytest.raises(HookNameError, match="load_model"):  # a bridge-only name on a plain HF model
        with splice(hf, "blocks.0.attn.hook_pattern", lambda a: a):
            pass
    with pytest.raises(HookNameError, match="Close matches"):
        with splice(bridge, "blocks.0.hook_resid_prex", lambda a: a):
            pass
    with pytest.raises(ValueError, match="must return shape"):
        with torch.no_grad(), splice(hf, "blocks.0.hook_mlp_out", lambda a: a[..., :3]) as m:
            lm_logits(m, ids)
    with pytest.raises(ValueError, match="same shape"):
        activation_patching(hf, ids, ids[:, :-1], ["blocks.0.hook_resid_pre"], metric=lambda z: 0.0)
    with pytest.raises(ValueError, match="columns in"):
        activation_patching(hf, ids, ids, ["blocks.0.hook_resid_pre"], metric=lambda z: 0.0, positions=[99])
    with pytest.raises(ValueError, match="metric"):
        activation_patching(hf, ids, ids, ["blocks.0.hook_resid_pre"])
    # hooks are gone after the errors: a plain forward equals a fresh copy's
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, copy.deepcopy(hf)(input_ids=ids).logits)


def test_plain_module_dotted_paths_and_bridge_pattern_positions(models):
    """Any nn.Module takes dotted paths; a bridge-only site (attention pattern) takes positions on its query axis."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 4)
    with splice(net, "1", torch.zeros_like) as m:
        torch.testing.assert_close(m(x), net[2].bias.expand(3, 2))
    _, bridge = models("llama")
    ids = _ids()
    name = "blocks.1.attn.hook_pattern"
    seen = []
    with torch.no_grad(), intervene(bridge, {name: lambda a: seen.append(a.shape) or a}, positions=[4]) as m:
        assert m is bridge
        lm_logits(m, ids)
    assert seen == [torch.Size([2, 4, 1, ids.shape[1]])]


def test_patching_result_figure_and_dict(models):
    hf, _ = models("llama")
    clean, corrupt = _ids(0), _ids(1)
    res = activation_patching(hf, clean, corrupt, ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"],
                              metric=lambda z: logit_difference(z, 4, 6).mean(), positions=[0, 6])
    d = res.to_dict()
    assert d["positions"] == [0, 6] and np.asarray(d["metric"]).shape == (2, 2)
    assert "2 sites x 2 positions" in repr(res)
    html = res._repr_html_()
    assert "blocks.1.hook_resid_pre" in html and f"{res.metric[1, 1]:.3g}" in html
    fig = res.figures()[0]
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text and fig.data[0].colorbar.title.text


def test_logit_difference_by_hand():
    z = torch.randn(3, 4, 10)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    got = logit_difference(z, torch.tensor([1, 2, 3]), 0, attention_mask=mask)
    want = torch.stack([z[0, 3, 1] - z[0, 3, 0], z[1, 1, 2] - z[1, 1, 0], z[2, 0, 3] - z[2, 0, 0]])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(logit_difference(z, 1, 0), z[:, -1, 1] - z[:, -1, 0])


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gemma2", "olmo2"])
def test_load_model_bridge_runs_on_its_plain_twin(models, family, tmp_path):
    """A bridge from load_model intervenes on its plain HF twin (yielded) with the bridge's site meanings: on
    Gemma 2 / OLMo 2 hook_attn_out and hook_mlp_out are the post-normed terms, not the attention/MLP outputs."""
    from probekit.models import load_model, plain_model

    hf, _ = models(family)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    TOK.save_pretrained(tmp_path)
    bridge, _ = load_model(str(tmp_path))
    twin = plain_model(bridge)
    r, ids = _direction(), _ids()
    hand = copy.deepcopy(hf)
    embeds, attn, mlp = _hand_layout(family)
    for path in embeds + [p.format(l=l) for l in range(L) for p in (attn, mlp)]:
        _wrap(hand, path, _project(r))
    with torch.no_grad():
        want = hand(input_ids=ids).logits
        with directional_ablation(bridge, r) as m:
            assert m is twin
            got = lm_logits(m, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


ENCODERS = {
    "bert": lambda: (T.BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4,
                                  intermediate_size=2 * D), T.BertForMaskedLM),
    "roberta": lambda: (T.RobertaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4,
                                        intermediate_size=2 * D, pad_token_id=1), T.RobertaForMaskedLM),
}


@pytest.mark.parametrize("family", list(ENCODERS))
def test_encoders_addition_and_patching_by_hand(family, record_capability):
    """Post-LN encoders: residual sites equal output_hidden_states; activation addition and per-column patching at
    block 1's input equal editing block 0's final LayerNorm output by hand; patching all columns gives the clean
    masked-LM logits; hook_attn_out has no plain equivalent and says where to go instead."""
    for cap in ("addition", "patching"):
        record_capability(family, cap)
    for cap in ("ablation", "generation"):  # post-LN encoders: Arditi ablation is not defined; no generation
        record_capability(family, cap, status="n/a")
    cfg, cls = ENCODERS[family]()
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    hf.set_attn_implementation("eager")
    out_ln = f"{family}.encoder.layer.0.output.LayerNorm"  # its output is block 1's residual input
    clean, corrupt = _ids(0), _ids(0).clone()
    corrupt[:, 3] = (corrupt[:, 3] + 7) % V
    with torch.no_grad():
        o = hf(input_ids=clean, output_hidden_states=True)
        clean_logits, hs = o.logits, o.hidden_states
        o = hf(input_ids=corrupt, output_hidden_states=True)
        corrupt_logits, hs_c = o.logits, o.hidden_states
    names = [f"blocks.{l}.hook_resid_{k}" for l in range(L) for k in ("pre", "post")]
    _, acts = record_activations(hf, names, clean)
    for l in range(L):
        torch.testing.assert_close(acts[f"blocks.{l}.hook_resid_pre"], hs[l])
        torch.testing.assert_close(acts[f"blocks.{l}.hook_resid_post"], hs[l + 1])

    r, alpha = _direction(), 2.0
    hand = copy.deepcopy(hf)

    def add(x):
        x = x.clone()
        x[:, [2, 5]] += alpha * r
        return x

    _wrap(hand, out_ln, add)
    with torch.no_grad():
        want = hand(input_ids=clean).logits
        with activation_addition(hf, r, 1, alpha, positions=[2, 5]) as m:
            got = lm_logits(m, clean)
    assert (want - clean_logits).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    res = activation_patching(hf, clean, corrupt, names, positions="all", return_logits=True,
                              metric=lambda z: logit_difference(z, 4, 6).mean())
    for i in range(len(names)):
        torch.testing.assert_close(res.logits[i, 0], clean_logits, rtol=1e-5, atol=1e-6)
    sweep = activation_patching(hf, clean, corrupt, ["blocks.1.hook_resid_pre"], positions=[3, 4], return_logits=True)
    for j, c in enumerate([3, 4]):
        hand = copy.deepcopy(hf)
        delta = hs[1][:, c] - hs_c[1][:, c]

        def fix(x, c=c, delta=delta):
            x = x.clone()
            x[:, c] += delta
            return x

        _wrap(hand, out_ln, fix)
        with torch.no_grad():
            torch.testing.assert_close(sweep.logits[0, j], hand(input_ids=corrupt).logits, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(sweep.logits[0, 1], corrupt_logits)  # bidirectional: column 4 saw column 3
    with pytest.raises(HookNameError, match="encoders: resid_pre/post and mlp_out"):
        with splice(hf, "blocks.0.hook_attn_out", lambda a: a):
            pass


def test_bert_bridge_sites_follow_the_bridge(tiny_bert):
    """On a BERT bridge from load_model, residual names with a module equivalent run on the plain twin and the
    others on the bridge's hook points; either way the activation is the bridge's run_with_cache value."""
    from probekit.models import plain_model

    bridge, _ = tiny_bert
    ids = _ids(P=6) % 200 + 3
    _, cache = bridge.run_with_cache(ids)
    names = [n for n in cache.keys()
             if re.fullmatch(r"blocks\.\d+\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)", n)]
    assert any("attn_out" in n for n in names)
    for n in names:
        _, mech, run = resolve_sites(bridge, [n])
        on_twin = n.endswith(("resid_pre", "resid_post", "mlp_out"))
        assert (mech, run is plain_model(bridge)) == (("plain", True) if on_twin else ("bridge", False)), n
        _, acts = record_activations(bridge, [n], ids)
        torch.testing.assert_close(acts[n], cache[n], rtol=1e-5, atol=1e-5, msg=n)
