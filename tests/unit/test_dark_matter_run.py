"""End-to-end plumbing of `probekit dark-matter run` on a tiny random model (numbers are not the point)."""

from __future__ import annotations

import json

import pytest

from probekit.stats import Estimate
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
    # FVU split, R² bars, CE bars, scatter, 2 scaling heatmaps, earlier layer, the norm question
    assert len(figs) == 8
    sc = payload["scatter"]
    assert len(sc["actual"]) == len(sc["predicted"]) == len(sc["hover"]) > 0
    assert all("[" in h for h in sc["hover"])  # token in context
    head = results.headline(payload)
    fvu = head[f"width {payload['widths'][0]}: FVU, 95% CI"]  # a document-bootstrap CI around the run's FVU
    assert fvu.startswith(f"{payload['sae_metrics'][str(payload['widths'][0])]['fvu']:.3f} [")


def test_dark_matter_cis_resample_documents_and_their_points_are_the_runs_numbers(tiny_dir, tmp_path, monkeypatch):
    """Every headline CI is a document bootstrap whose point is the run's pooled number, recomputed from the
    stored per-document sums: FVU per width, the centred R² of e (Σe per document), R²(‖e‖² | x) and R²(‖e‖ | x),
    CE recovered and the x̂ + nonlinear vs x̂ + linear CE difference; the norm question runs on the same
    held-out documents with position 0 in and out, and each number reaches the claims and the headline."""
    import numpy as np

    from probekit import results
    from probekit.claims import claim_rows, dark_matter_estimates

    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "dm"
    assert main(["dark-matter", "run", "--model", str(tiny_dir["llama"]), "--layer", "1", "--expansions", "1,2,3",
                 "--k", "4", "--epochs", "1", "--batch-size", "64", "--n-code", "16", "--n-text", "8",
                 "--max-length", "40", "--ce-docs", "4", "--no-progress", "--out", str(out)]) == 0
    p = results.load(out / "dark_matter.json")
    n_test = round(0.2 * 24)
    wl = str(p["widths"][-1])
    per, dec = p["per_document"], p["decomposition"][wl]
    assert per["width"] == int(wl) and len(per["doc"]) == n_test and sum(per["n_tokens"]) == dec["n_test"]
    assert np.asarray(per["error_sum"]).shape == (n_test, 64)
    est = dark_matter_estimates(p)
    # centred R² of e by hand from the sums (numpy), and through the bootstrap's own statistic
    E, n = np.asarray(per["error_sum"]).sum(0), sum(per["n_tokens"])
    by_hand = 1 - sum(per["nonlinear_sq"]) / (sum(per["norm_sq"]) - E @ E / n)
    assert by_hand == pytest.approx(dec["r2_error_vector"], abs=1e-9)
    r2e = est[f"width {wl}: R²(e | x)"]
    assert r2e.value == pytest.approx(dec["r2_error_vector"], abs=1e-9)
    assert r2e.n == n_test and r2e.unit == "documents" and r2e.low <= r2e.value <= r2e.high
    assert est[f"width {wl}: R²(‖e‖² | x)"].value == pytest.approx(dec["r2_error_norm_sq"], abs=1e-9)
    assert est[f"width {wl}: R²(‖e‖ | x)"].value == pytest.approx(dec["r2_error_norm"], abs=1e-9)
    # the narrower widths' R²s carry CIs too (computed by the run from their own per-document sums)
    for w in map(str, p["widths"][:-1]):
        d = p["decomposition"][w]
        for key, run_value in (("R²(e | x)", d["r2_error_vector"]), ("R²(‖e‖² | x)", d["r2_error_norm_sq"])):
            e = est[f"width {w}: {key}"]
            assert isinstance(e, Estimate) and e.n == n_test and e.value == pytest.approx(run_value, abs=1e-9)
    for w in map(str, p["widths"]):
        fvu = est[f"width {w}: FVU"]
        assert fvu.value == pytest.approx(p["sae_metrics"][w]["fvu"], rel=1e-9) and fvu.n == n_test
        assert fvu.low <= fvu.value <= fvu.high
        ce, cw = p["ce"][w], p["ce_per_document"]["widths"][w]
        rec = est[f"width {w}: CE recovered"]
        assert rec.value == pytest.approx(ce["ce_recovered"], rel=1e-12) and rec.n == 4
        diff = est[f"width {w}: CE(x̂ + nonlinear) − CE(x̂ + linear), nats"]
        assert diff.value == pytest.approx(ce["ce_nonlinear"] - ce["ce_linear"], rel=1e-12, abs=1e-12)
        assert diff.method == "paired percentile bootstrap" and diff.n == 4
        assert sum(cw["nll_sae"]) / sum(p["ce_per_document"]["n_tokens"]) == pytest.approx(ce["ce_sae"], rel=1e-12)
    # the per-document sums are of distinct held-out documents, the CE ones of the first ce_docs of them
    assert len(set(per["doc"])) == n_test and set(p["ce_per_document"]["doc"]) <= set(per["doc"])
    # the norm question: the run's choice reproduces the decomposition's R²(‖e‖² | x); BOS kept adds the
    # position-0 tokens of the same documents
    nq = p["norm_question"]
    ref, bos = nq["rows"][0], nq["rows"][1]
    assert ref["r2"]["value"] == pytest.approx(dec["r2_error_norm_sq"], abs=1e-6)
    assert ref["r2"]["n"] == bos["r2"]["n"] == n_test and ref["n_test_tokens"] == dec["n_test"]
    assert bos["n_test_tokens"] == dec["n_test"] + n_test and bos["selection"]["min_position"] == 0
    assert [r["selection"]["target"] for r in nq["rows"]] == ["sq", "sq", "sq", "norm"]
    assert p["per_document_seconds"] >= nq["seconds"] > 0
    rows = {r.claim.key: r for r in claim_rows(p)}
    assert rows["dm_norm_r2"].estimate == est[f"width {wl}: R²(‖e‖² | x)"]
    assert rows["dm_vector_r2"].estimate == r2e
    assert rows["dm_norm_r2_bos"].estimate.value == bos["r2"]["value"]
    assert "paired over documents" in rows["dm_norm_r2_bos"].reason
    head = results.headline(p)
    assert head[f"width {wl}: R²(e | x), 95% CI"] == r2e.format()
    assert "n=" in head[f"width {p['widths'][0]}: FVU, 95% CI"]
    assert head["norm question: BOS (position 0) included, 95% CI"].startswith(f"{bos['r2']['value']:.3f} [")
    titles = [f.layout.title.text for f in results.figures(p)]
    assert any(t.startswith("How predictable the SAE error norm is") for t in titles)
    # the CE bars and the widest SAE's R² bars carry their CIs as error bars
    from probekit.stats import bootstrap_ratio

    cp = p["ce_per_document"]
    x_hat = next(t for t in results.ce_figure(p).data if t.name == "x̂")
    ci = bootstrap_ratio(cp["widths"][wl]["nll_sae"], cp["n_tokens"], unit="documents")
    assert x_hat.y[-1] == pytest.approx(ci.value, rel=1e-12)
    assert x_hat.error_y.array[-1] == pytest.approx(ci.high - ci.value)
    assert x_hat.error_y.arrayminus[-1] == pytest.approx(ci.value - ci.low)
    r2_bars = results.error_r2_figure(p).data[0]
    assert r2_bars.error_y.array[-1] == pytest.approx(r2e.high - r2e.value)
    narrow = est[f"width {p['widths'][0]}: R²(e | x)"]  # every width's bar carries its CI
    assert r2_bars.error_y.array[0] == pytest.approx(narrow.high - narrow.value)


def test_norm_question_off_skips_the_sweep_and_the_claim_says_why(tiny_dir, tmp_path, monkeypatch):
    from probekit import results
    from probekit.claims import claim_rows
    from probekit.dark_matter_run import DarkMatterRunConfig, run_dark_matter
    from probekit.probes import dark_matter_norms

    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path / "cache"))

    def refuse(*a, **kw):
        raise AssertionError("norm_question: False must not run the sweep")

    monkeypatch.setattr(dark_matter_norms, "norm_predictability", refuse)
    p = run_dark_matter(DarkMatterRunConfig(model=str(tiny_dir["llama"]), layer=1, expansions=(1, 2, 3), k=4,
                                            epochs=1, batch_size=64, n_code=10, n_text=4, max_length=32, ce_docs=3,
                                            norm_question=False, progress=False, out=str(tmp_path / "dm")))
    assert p["norm_question"] is None and p["config"]["norm_question"] is False
    rows = {r.claim.key: r for r in claim_rows(p)}
    assert rows["dm_norm_r2_bos"].verdict == "not assessed" and "norm_question" in rows["dm_norm_r2_bos"].reason
    assert rows["dm_norm_r2"].estimate is not None
    assert not any(k.startswith("norm question") for k in results.headline(p))
    assert len(results.figures(p)) == 7
