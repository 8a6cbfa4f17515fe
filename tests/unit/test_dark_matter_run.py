"""End-to-end plumbing of `probekit dark-matter run` on a tiny random model (numbers are not the point)."""

from __future__ import annotations

import json

import pytest
import torch

from probekit.cli import main


def test_dark_matter_command_writes_every_analysis(tiny_dir, tmp_path, monkeypatch):
    from probekit.dark_matter_run import _keep_first
    from probekit.probes import sae as sae_mod
    from probekit.probes.sae import ce_recovered, load_sae

    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path / "cache"))
    seen = {}
    many = sae_mod.ce_recovered_many

    def recording(model, token_batches, hook_name, replacements, **kw):  # keep what the run evaluated CE on
        if len(replacements) == 1:  # the test's own ce_recovered below
            return many(model, token_batches, hook_name, replacements, **kw)
        seen.update(model=model, batches=list(token_batches), hook=hook_name, keys=sorted(replacements),
                    replacements=dict(replacements))
        return many(model, seen["batches"], hook_name, replacements, **kw)

    monkeypatch.setattr(sae_mod, "ce_recovered_many", recording)
    out = tmp_path / "dm"
    args = ["dark-matter", "run", "--model", str(tiny_dir["llama"]), "--layer", "2", "--expansions", "1,2,3",
            "--k", "4", "--epochs", "2", "--batch-size", "64", "--n-code", "14", "--n-text", "8",
            "--max-length", "64", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    p = json.loads((out / "dark_matter.json").read_text())
    d = 64
    assert p["widths"] == [d, 2 * d, 3 * d] and p["hook"] == "blocks.2.hook_resid_post"
    assert p["n_documents"] == {"code": 14, "text": 8}
    for w in map(str, p["widths"]):
        m, dec, ce = p["sae_metrics"][w], p["decomposition"][w], p["ce"][w]
        assert m["l0"] <= 4 + 1e-9 and 0 <= m["fvu"]
        # the split sums to the FVU of the same held-out tokens
        assert dec["fvu_linear"] + dec["fvu_nonlinear"] + dec["fvu_cross"] == pytest.approx(dec["fvu"], rel=1e-6)
        assert dec["fvu"] == pytest.approx(m["fvu"], rel=1e-4)
        assert {"ce_clean", "ce_sae", "ce_zero", "ce_linear", "ce_nonlinear"} <= set(ce)
        sae = load_sae(out / "saes" / f"blocks.2.hook_resid_post-{w}", expected_d_in=d)
        assert sae.cfg.d_sae == int(w)
        # each width's CE is its own SAE's (one shared clean/zero pass must not mix the widths up)
        alone = ce_recovered(seen["model"], seen["batches"], seen["hook"], _keep_first(sae.eval(), "cpu"))
        assert ce["ce_sae"] == pytest.approx(alone.ce_sae, rel=1e-5)
        assert ce["ce_clean"] == pytest.approx(alone.ce_clean, rel=1e-9)
        # x̂ + linear error and x̂ + nonlinear error sum to x̂ + x after position 0: both splices hold this
        # width's SAE and the same W*, b
        x = torch.randn(2, 5, d)
        both = seen["replacements"][f"{w}/linear"](x) + seen["replacements"][f"{w}/nonlinear"](x)
        with torch.no_grad():
            assert torch.allclose(both[:, 1:], sae(x[:, 1:]) + x[:, 1:], atol=1e-4)
        assert torch.equal(both[:, 0], 2 * x[:, 0])
    assert seen["keys"] == sorted(f"{w}/{k}" for w in p["widths"] for k in ("sae", "linear", "nonlinear"))
    assert len({p["ce"][str(w)]["ce_sae"] for w in p["widths"]}) == 3
    assert len(p["per_token_scaling"]["r2"]) == 3
    assert "x̂ (SAE output)" in p["earlier_layer"]["r2"]
    assert (out / "dark_matter.html").stat().st_size > 100_000
    # a rerun reuses the capture and the finished SAE checkpoints
    runs = {r.name for r in (tmp_path / "cache" / "runs").iterdir()}
    assert main(args) == 0
    assert {r.name for r in (tmp_path / "cache" / "runs").iterdir()} == runs
    assert json.loads((out / "dark_matter.json").read_text())["sae_metrics"] == p["sae_metrics"]


def test_dark_matter_result_file_draws_every_figure(tiny_dir, tmp_path, monkeypatch):
    from probekit import results

    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "dm"
    assert main(["dark-matter", "run", "--model", str(tiny_dir["llama"]), "--layer", "1", "--expansions", "1,2,3",
                 "--k", "4", "--epochs", "1", "--batch-size", "64", "--n-code", "10", "--n-text", "4",
                 "--max-length", "48", "--no-progress", "--out", str(out)]) == 0
    payload = results.load(out / "dark_matter.json")
    figs = results.figures(payload)
    # FVU split, R² bars, CE bars, scatter, 2 scaling heatmaps, earlier layer
    assert len(figs) == 7
    sc = payload["scatter"]
    assert len(sc["actual"]) == len(sc["predicted"]) == len(sc["hover"]) > 0
    assert all("[" in h for h in sc["hover"])  # token in context
    head = results.headline(payload)
    assert head[f"width {payload['widths'][0]}: FVU"] == payload["sae_metrics"][str(payload["widths"][0])]["fvu"]
