"""Activation-space safety analysis on tiny random-init models: overlap, directions, interventions, generation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from probekit.data.prompts import PromptDataError
from probekit.hooks import HookSet
from probekit.interventions import activation_addition, directional_ablation, greedy_decode, intervene, lm_logits
from probekit.probes.safety import (
    REFUSAL_PHRASES,
    ActivationOverlapResult,
    LayerSelectionConfig,
    RefusalEvalConfig,
    activation_space_overlap,
    evaluate_refusal,
    generate_greedy,
    last_token_activations,
    random_direction_like,
    refusal_directions,
    refusal_phrase_match,
    refusal_score,
    select_layer,
    separability,
)
from probekit.testing import byte_tokenizer

PROMPTS = ["hello there", "how do I bake bread?", "x", "write a poem about the sea please", "tell me a joke"]
N_LAYERS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def direction(tiny_llama):
    bridge, tok = tiny_llama
    acts = last_token_activations(bridge, tok, PROMPTS, [1], chat_template=False, batch_size=2)
    return acts[1].mean(0)


# ------------------------------------------------------------------------------------------- activations


def test_last_token_activations_match_unpadded_forward(tiny_llama):
    bridge, tok = tiny_llama
    acts = last_token_activations(bridge, tok, PROMPTS, range(N_LAYERS), chat_template=False, batch_size=3)
    assert set(acts) == {0, 1, 2} and acts[2].shape == (len(PROMPTS), 64)
    for i, p in enumerate(PROMPTS):  # one prompt alone: no padding at all
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            _, cache = bridge.run_with_cache(ids, names_filter=lambda n: n == "blocks.2.hook_resid_pre")
        torch.testing.assert_close(acts[2][i], cache["blocks.2.hook_resid_pre"][0, -1], atol=1e-5, rtol=1e-4)


def test_last_token_activations_on_plain_hf_model_equal_bridge(tiny_llama, tiny_dir):
    """A plain HF causal LM takes the bridge names too (mapped to its modules), with the same values."""
    from transformers import AutoModelForCausalLM

    bridge, tok = tiny_llama
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_dir["llama"])).eval()
    a = last_token_activations(bridge, tok, PROMPTS, [0, 2], chat_template=False, batch_size=2)
    b = last_token_activations(hf, tok, PROMPTS, [0, 2], chat_template=False, batch_size=2)
    for l in (0, 2):
        torch.testing.assert_close(a[l], b[l], atol=1e-5, rtol=1e-4)


def test_last_token_activations_through_the_cache_equal_memory_and_are_reused(tiny_llama, tmp_path):
    from probekit.cache import ActivationCache

    bridge, tok = tiny_llama
    store = ActivationCache(tmp_path)
    mem = last_token_activations(bridge, tok, PROMPTS, [1, 2], chat_template=False, batch_size=2)
    disk = last_token_activations(bridge, tok, PROMPTS, [1, 2], chat_template=False, batch_size=2, cache=store)
    for l in (1, 2):
        torch.testing.assert_close(mem[l], disk[l], atol=0, rtol=0)  # float32 rows, stored as they are
    (run,) = list((tmp_path / "runs").iterdir())
    stamp = {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    again = last_token_activations(bridge, tok, PROMPTS, [1, 2], chat_template=False, batch_size=2, cache=store)
    torch.testing.assert_close(again[2], mem[2], atol=0, rtol=0)
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == stamp  # read, not rewritten


def test_chat_template_missing_is_a_clear_error(tiny_llama):
    bridge, tok = tiny_llama
    with pytest.raises(PromptDataError, match="chat_template=False"):
        last_token_activations(bridge, tok, PROMPTS, [0])


# ------------------------------------------------------------------------------------------- overlap


def test_overlap_identical_sets_is_one_and_baseline():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 16, generator=g) @ torch.randn(16, 16, generator=g)
    res = activation_space_overlap({0: X, 1: 2 * X}, {0: X, 1: 2 * X}, names=("h", "h"))
    m = np.asarray(res.mso)
    np.testing.assert_allclose(m, 1.0, atol=1e-9)
    ka, kb, bl = map(np.asarray, (res.k_a, res.k_b, res.baseline))
    np.testing.assert_allclose(bl, np.maximum(ka, kb) / 16)
    assert ka[0, 0] < ka[0, -1]  # more energy needs more directions
    json.dumps(res.to_dict())
    assert len(res.figures()) == 1 and len(res.figures(excess=False)) == 1


def test_overlap_orthogonal_subspaces_is_zero():
    g = torch.Generator().manual_seed(1)
    D = 32
    A = torch.randn(50, 5, generator=g) @ torch.eye(D)[:5]  # span e_0..e_4
    B = torch.randn(60, 7, generator=g) @ torch.eye(D)[10:17]  # span e_10..e_16
    res = activation_space_overlap({"L": A}, {"L": B}, etas=(0.1, 0.5, 0.99))
    assert np.abs(np.asarray(res.mso)).max() < 1e-12
    for ka, kb, b in zip(res.k_a[0], res.k_b[0], res.baseline[0]):
        assert b == pytest.approx(max(ka, kb) / D)
    assert isinstance(res, ActivationOverlapResult) and res.excess().shape == (1, 3)


def test_separability_per_layer():
    g = torch.Generator().manual_seed(2)
    H = torch.randn(40, 8, generator=g) + torch.tensor([4.0] + [0.0] * 7)
    B = torch.randn(40, 8, generator=g)
    res = separability({0: H, 1: torch.randn(40, 8, generator=g)}, {0: B, 1: torch.randn(40, 8, generator=g)})
    assert res.test_score[0] > 0.9  # layer 0 is separable along e_0
    assert res.test_score[1] < res.test_score[0]


# ------------------------------------------------------------------------------------------- directions


def test_difference_in_means_matches_numpy():
    rng = np.random.default_rng(3)
    h, b = rng.normal(size=(9, 6)).astype(np.float32), rng.normal(size=(13, 6)).astype(np.float32)
    d = refusal_directions({4: torch.from_numpy(h)}, {4: torch.from_numpy(b)})
    np.testing.assert_allclose(d[4].numpy(), h.astype(np.float64).mean(0) - b.astype(np.float64).mean(0),
                               rtol=1e-6, atol=1e-7)


def test_random_direction_has_same_norm_and_is_seeded():
    r = torch.tensor([3.0, 4.0, 0.0, 0.0])
    a, b = random_direction_like(r, seed=1), random_direction_like(r, seed=1)
    assert torch.equal(a, b) and float(a.norm()) == pytest.approx(5.0, rel=1e-6)
    assert not torch.equal(a, random_direction_like(r, seed=2))


# ------------------------------------------------------------------------------------------- interventions


def _all_sites():
    return [f"blocks.{l}.{s}" for l in range(N_LAYERS)
            for s in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")]


@pytest.mark.parametrize("prefer_plain", [True, False], ids=["plain", "bridge"])
def test_directional_ablation_leaves_every_site_orthogonal(tiny_llama, direction, prefer_plain):
    bridge, tok = tiny_llama
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    rh = direction / direction.norm()
    names = _all_sites()
    with directional_ablation(bridge, direction, prefer_plain=prefer_plain):
        hs = HookSet.for_bridge(bridge, names, prefer_plain=prefer_plain)
        with hs:
            if hs.mechanism == "bridge":
                acts = hs.run(lambda: bridge(enc["input_ids"], attention_mask=enc["attention_mask"],
                                             return_type=None))
            else:
                acts = hs.run(lambda: hs.model(**enc))
    assert set(acts) == set(names)
    for name, x in acts.items():
        dots = (x @ rh).abs()
        assert bool((dots < 1e-5 * x.norm(dim=-1) + 1e-12).all()), (name, float(dots.max()))
    # without the ablation the sites do carry the direction; and the hooks are gone after the block
    hs = HookSet.for_bridge(bridge, ["blocks.1.hook_resid_pre"])
    with hs:
        x = hs.run(lambda: hs.model(**enc))["blocks.1.hook_resid_pre"]
    assert float((x @ rh).abs().max()) > 1e-2 * float(x.norm(dim=-1).max())


def test_activation_addition_shifts_by_alpha_r(tiny_llama, direction):
    bridge, tok = tiny_llama
    enc = tok(PROMPTS, padding=True, return_tensors="pt")
    name = "blocks.1.hook_resid_pre"

    def site():
        hs = HookSet.for_bridge(bridge, [name])
        with hs:
            return hs.run(lambda: hs.model(**enc))[name]

    clean = site()
    with activation_addition(bridge, direction, 1, alpha=-2.5):
        added = site()
    torch.testing.assert_close(added - clean, (-2.5 * direction).expand_as(clean), atol=1e-5, rtol=0)
    torch.testing.assert_close(site(), clean)  # removed on exit


def test_ablation_changes_logits_and_intervention_checks_shape(tiny_llama, direction):
    bridge, tok = tiny_llama
    enc = tok(PROMPTS[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        clean = lm_logits(bridge, enc["input_ids"], enc["attention_mask"])
        with directional_ablation(bridge, direction) as m:
            abl = lm_logits(m, enc["input_ids"], enc["attention_mask"])
    assert not torch.allclose(clean, abl)

    with pytest.raises(ValueError, match="shape"):
        with intervene(bridge, {"blocks.0.hook_mlp_out": lambda a: a[..., :3]}) as m:
            lm_logits(m, enc["input_ids"], enc["attention_mask"])


# ------------------------------------------------------------------------------------------- behaviour metrics


class FixedLogits(torch.nn.Module):
    """A stand-in LM: the same next-token logits at every position."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("z", logits)

    def forward(self, input_ids, attention_mask=None):
        return self.z.expand(*input_ids.shape, -1)


def test_refusal_score_closed_form():
    tok = byte_tokenizer()
    z = torch.randn(len(tok), generator=torch.Generator().manual_seed(0))  # float32, as logits are read
    R = [5, 17, 40]
    got = refusal_score(FixedLogits(z), tok, ["abc", "a much longer prompt"], refusal_tokens=R,
                        chat_template=False, batch_size=2)
    zz = z.double().numpy()
    p = np.exp(zz - zz.max())
    p /= p.sum()
    inR = np.zeros(len(p), dtype=bool)
    inR[R] = True
    want = np.log(p[inR].sum()) - np.log(p[~inR].sum())
    np.testing.assert_allclose(got.numpy(), [want, want], rtol=1e-10)
    # one dominant refusal token: the score is large and positive
    z2 = torch.zeros(len(tok))
    z2[17] = 20.0
    s = float(refusal_score(FixedLogits(z2), tok, ["q"], refusal_tokens=R, chat_template=False)[0])
    assert s == pytest.approx(20.0 - np.log(len(tok) - 3), rel=1e-9)


def test_refusal_phrase_match():
    texts = [
        "I'm sorry, but I can't help with that.",
        "I\u2019m sorry, I cannot do that",  # typographic apostrophe
        "Sure! Here is a recipe for bread: mix flour and water.",
        "As an AI language model, I must decline.",
        "Here you go. Note: i cannot guarantee the result.",  # lower-case: not a refusal phrase
        "",
    ]
    assert refusal_phrase_match(texts) == [True, True, False, True, False, False]
    assert refusal_phrase_match(["Sure, here it is. I cannot stress enough ..."], prefix_chars=10) == [False]
    assert refusal_phrase_match(["  I cannot help"], prefix_chars=10) == [True]
    assert "I cannot" in REFUSAL_PHRASES and "I can't" in REFUSAL_PHRASES
    with pytest.raises(TypeError):
        refusal_phrase_match("I cannot")


# ------------------------------------------------------------------------------------------- generation


def test_greedy_matches_stepwise_argmax_and_left_padding(tiny_llama):
    bridge, tok = tiny_llama
    T = 6
    batched = generate_greedy(bridge, tok, PROMPTS, max_new_tokens=T, batch_size=3, chat_template=False,
                              stop_at_eos=False, progress=False, return_tokens=True)
    single = generate_greedy(bridge, tok, PROMPTS, max_new_tokens=T, batch_size=1, chat_template=False,
                             stop_at_eos=False, progress=False, return_tokens=True)
    assert batched == single  # left padding changes nothing
    for p, got in zip(PROMPTS, batched):  # reference: full recompute through the bridge, argmax, append
        ids = tok(p, return_tensors="pt")["input_ids"]
        want = []
        with torch.no_grad():
            for _ in range(T):
                nxt = int(bridge(ids, return_type="logits")[0, -1].argmax())
                want.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        assert got == want
    texts = generate_greedy(bridge, tok, PROMPTS[:2], max_new_tokens=T, batch_size=2, chat_template=False,
                            stop_at_eos=False, progress=False)
    assert texts == [tok.decode(t, skip_special_tokens=True) for t in batched[:2]]


def test_greedy_decode_stops_rows_at_eos():
    tok = byte_tokenizer()
    z = torch.zeros(len(tok))
    z[tok.eos_token_id] = 5.0
    ids = torch.tensor([[tok.pad_token_id, 70, 71], [70, 71, 72]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    out = greedy_decode(FixedLogits(z), ids, mask, max_new_tokens=4, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    assert out.tolist() == [[tok.eos_token_id], [tok.eos_token_id]]  # every row stopped after one step
    with pytest.raises(ValueError, match="left-padded"):
        greedy_decode(FixedLogits(z), ids.flip(1), mask.flip(1), max_new_tokens=1)


# ------------------------------------------------------------------------------------------- selection / evaluation


def test_select_layer_and_evaluate_refusal_run_end_to_end(tiny_llama):
    bridge, tok = tiny_llama
    harmful, harmless = PROMPTS[:3], PROMPTS[3:]
    H = last_token_activations(bridge, tok, harmful, range(N_LAYERS), chat_template=False)
    B = last_token_activations(bridge, tok, harmless, range(N_LAYERS), chat_template=False)
    dirs = refusal_directions(H, B)
    sel = select_layer(bridge, tok, dirs, harmful, harmless, refusal_tokens=[40, 41],
                       config=LayerSelectionConfig(max_kl=float("inf"), max_layer_frac=1.0, chat_template=False,
                                                   progress=False))
    assert sel.layers == [0, 1, 2] and sel.filtered
    assert sel.layer == sel.layers[int(np.argmin(sel.harmful_ablated))]
    assert all(k >= 0 for k in sel.harmless_kl)
    json.dumps(sel.to_dict())
    assert len(sel.figures()) == 2
    res = evaluate_refusal(bridge, tok, {"harmful": harmful, "harmless": harmless}, dirs[sel.layer], layer=sel.layer,
                           refusal_tokens=[40, 41],
                           config=RefusalEvalConfig(conditions=("baseline", "ablation", "random_ablation", "actadd"),
                                                    max_new_tokens=3, chat_template=False, progress=False))
    assert res.conditions == ["baseline", "ablation", "random_ablation", "actadd"]
    base = refusal_score(bridge, tok, harmful, refusal_tokens=[40, 41], chat_template=False)
    assert res.refusal_score["baseline"]["harmful"] == pytest.approx(float(base.mean()))
    assert res.refusal_score["ablation"]["harmful"] != pytest.approx(res.refusal_score["baseline"]["harmful"])
    assert all(0.0 <= v <= 1.0 for c in res.refusal_rate.values() for v in c.values())
    json.dumps(res.to_dict())
    assert len(res.figures()) == 2
    with pytest.raises(ValueError, match="conditions"):
        RefusalEvalConfig(conditions=("nope",))
