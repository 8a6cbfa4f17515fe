"""Latent statistics against a brute-force computation on a tiny run: firing rates, histograms, top-k
examples with context, quantile examples, logit effects, neighbours and the token index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probekit.latents import LatentStatsConfig, compute_latent_stats, latent_record, load_latent_stats
from tests.browser.fixture_cache import write_views


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    info = write_views(root)
    from probekit.cache import Run
    from probekit.probes.sae import load_sae

    run = Run(root / "runs" / info["view_run_id"])
    sae = load_sae(info["sae_dir"])
    g = torch.Generator().manual_seed(5)
    info["fixture_latents_dir"] = info["latents_dir"]  # written with position 0 excluded
    info["latents_dir"] = compute_latent_stats(  # every row: what the brute-force tests below compare against
        run, sae, info["view_hook"], LatentStatsConfig(out=str(root / "plain"), top_k=5, context=4, n_bins=10),
        tokenizer=__import__("probekit.testing", fromlist=["byte_tokenizer"]).byte_tokenizer(),
        unembed=torch.randn(sae.cfg.d_in, 40, generator=g), progress=False)
    return dict(root=root, run=run, sae=sae, **info)


def _dense(run, sae, hook):
    x = run.load(hook).float()
    with torch.no_grad():
        return sae.encode(x).numpy()


def test_firing_rates_histograms_and_top_examples_equal_brute_force(views):
    run, sae, hook = views["run"], views["sae"], views["view_hook"]
    index, a, names = load_latent_stats(views["latents_dir"])
    F = _dense(run, sae, hook)
    meta = {k: v.numpy() for k, v in run.meta_tensors(["doc_index", "position", "token_id"]).items()}
    where = {(int(d), int(p)): r for r, (d, p) in enumerate(zip(meta["doc_index"], meta["position"]))}
    n, S = F.shape
    assert index["n_rows"] == n and index["d_sae"] == S
    fired = (F > 0).sum(0)
    assert len(set(fired.tolist())) > 3, "the fixture SAE should give varied firing rates"
    np.testing.assert_array_equal(a["firing_count"], fired)
    np.testing.assert_allclose(a["mean_act"], F.mean(0), rtol=1e-5, atol=1e-6)
    K, c, B = 5, 4, 10
    for i in range(S):
        nz = F[:, i][F[:, i] > 0]
        if len(nz):
            np.testing.assert_array_equal(a["hist_counts"][i], np.histogram(nz, bins=B, range=(0, nz.max()))[0])
            assert a["hist_counts"][i].sum() == len(nz)
        else:
            assert a["hist_counts"][i].sum() == 0
        # top-k: python sort of (−value, row)
        ranked = sorted((-F[r, i], r) for r in range(n) if F[r, i] > 0)[:K]
        rec = latent_record(index, a, i)
        assert [e["row"] for e in rec["top"]] == [r for _, r in ranked]
        np.testing.assert_allclose([e["act"] for e in rec["top"]], [-v for v, _ in ranked], rtol=1e-6)
        for e in rec["top"]:
            d, p = int(meta["doc_index"][e["row"]]), int(meta["position"][e["row"]])
            assert (e["doc"], e["pos"]) == (d, p)
            window = range(p - c, p + c + 1)
            want_tok = [int(meta["token_id"][where[(d, q)]]) if (d, q) in where else -1 for q in window]
            want_act = [float(F[where[(d, q)], i]) if (d, q) in where else 0.0 for q in range(p - c, p + c + 1)]
            assert e["tokens"] == want_tok
            np.testing.assert_allclose(e["acts"], want_act, rtol=1e-6, atol=1e-7)
            assert e["acts"][c] == pytest.approx(e["act"])
        # quantile examples: every pick lies in its equal-count group of the sorted non-zero activations
        srt = np.sort(nz)
        for e in rec["q"]:
            b = e["bin"]
            lo, hi = (b * len(srt)) // 5, ((b + 1) * len(srt)) // 5
            assert srt[lo] - 1e-6 <= e["act"] <= srt[hi - 1] + 1e-6
    assert {"top_ctx_tokens", "token_top_latents"} <= set(a)
    assert names and all(isinstance(v, str) for v in names.values())


def test_neighbours_logits_and_token_index_equal_brute_force(views):
    run, sae = views["run"], views["sae"]
    index, a, _ = load_latent_stats(views["latents_dir"])
    W = sae.W_dec.detach().numpy().astype(np.float64)
    Wn = W / np.linalg.norm(W, axis=1, keepdims=True)
    cos = Wn @ Wn.T
    np.fill_diagonal(cos, -np.inf)
    for i in range(W.shape[0]):
        want = np.argsort(-cos[i], kind="stable")[:8]
        np.testing.assert_allclose(a["neighbour_cos"][i], cos[i, want], rtol=1e-5, atol=1e-6)
    F = _dense(run, sae, views["view_hook"])
    tok = run.meta_tensors(["token_id"])["token_id"].numpy()
    for j, t in enumerate(a["token_ids"]):
        rows = tok == t
        assert a["token_count"][j] == rows.sum()
        mean = F[rows].mean(0)
        nz = np.flatnonzero(mean > 0)
        want = nz[np.lexsort((nz, -mean[nz]))][:10]
        got = a["token_top_latents"][j][a["token_top_latents"][j] >= 0]
        assert got.tolist() == want.tolist()
        np.testing.assert_allclose(a["token_top_mean"][j][:len(got)], mean[want], rtol=1e-5)
    assert index["logit_effects"] and "final norm" in index["logit_note"]
    assert a["logit_pos_vals"].shape == (W.shape[0], 10)
    assert (np.diff(a["logit_pos_vals"], axis=1) <= 1e-6).all()
    assert (np.diff(a["logit_neg_vals"], axis=1) >= -1e-6).all()


def test_logit_effects_equal_decoder_times_unembedding(views, tmp_path):
    run, sae = views["run"], views["sae"]
    g = torch.Generator().manual_seed(7)
    W_U = torch.randn(sae.cfg.d_in, 50, generator=g)
    out = compute_latent_stats(run, sae, views["view_hook"], LatentStatsConfig(out=str(tmp_path / "o"), n_logits=3),
                               unembed=W_U, progress=False)
    _, a, names = load_latent_stats(out)
    eff = sae.W_dec.detach().double().numpy() @ W_U.double().numpy()
    np.testing.assert_array_equal(a["logit_pos_ids"], np.argsort(-eff, axis=1)[:, :3])
    np.testing.assert_array_equal(a["logit_neg_ids"], np.argsort(eff, axis=1)[:, :3])
    np.testing.assert_allclose(a["logit_neg_vals"], np.sort(eff, axis=1)[:, :3], rtol=1e-5, atol=1e-5)
    assert names == {}


def test_bad_inputs_name_the_problem(views, tmp_path):
    from probekit.probes.sae import SAE, SAEConfig

    with pytest.raises(ValueError, match="top_k"):
        LatentStatsConfig(out="x", top_k=0)
    with pytest.raises(KeyError, match="no hook"):
        compute_latent_stats(views["run"], views["sae"], "blocks.9.hook_resid_post",
                             LatentStatsConfig(out=str(tmp_path / "a")), progress=False)
    wrong = SAE(SAEConfig(d_in=8, d_sae=4, architecture="relu"))
    with pytest.raises(ValueError, match="another hook or model"):
        compute_latent_stats(views["run"], wrong, views["view_hook"], LatentStatsConfig(out=str(tmp_path / "b")),
                             progress=False)
    with pytest.raises(MemoryError, match="max_nonzero"):
        compute_latent_stats(views["run"], views["sae"], views["view_hook"],
                             LatentStatsConfig(out=str(tmp_path / "c"), max_nonzero=5, chunk_rows=8), progress=False)
    with pytest.raises(IndexError):
        index, a, _ = load_latent_stats(views["latents_dir"])
        latent_record(index, a, index["d_sae"])


def test_excluded_positions_equal_brute_force(views, tmp_path):
    run, sae, hook = views["run"], views["sae"], views["view_hook"]
    out = compute_latent_stats(run, sae, hook, LatentStatsConfig(out=str(tmp_path / "x"), top_k=5, context=4,
                                                                 n_bins=10, exclude_positions=(0,)), progress=False)
    index, a, _ = load_latent_stats(out)
    F = _dense(run, sae, hook)
    meta = {k: v.numpy() for k, v in run.meta_tensors(["position", "token_id"]).items()}
    keep = meta["position"] != 0
    F[~keep] = 0.0
    assert index["n_rows"] == keep.sum() < index["n_rows_run"]
    np.testing.assert_array_equal(a["firing_count"], (F > 0).sum(0))
    np.testing.assert_allclose(a["mean_act"], F[keep].mean(0), rtol=1e-5, atol=1e-6)
    for i in range(F.shape[1]):
        nz = F[:, i][F[:, i] > 0]
        if len(nz):
            np.testing.assert_array_equal(a["hist_counts"][i], np.histogram(nz, bins=10, range=(0, nz.max()))[0])
        want = [r for _, r in sorted((-F[r, i], r) for r in range(len(F)) if F[r, i] > 0)[:5]]
        got = latent_record(index, a, i)["top"]
        assert [e["row"] for e in got] == want
        assert all(e["pos"] != 0 for e in got)
    bos = run.meta_tensors(["token_id"])["token_id"][0].item()  # every document starts with BOS
    assert bos not in a["token_ids"].tolist()
    counts = dict(zip(a["token_ids"].tolist(), a["token_count"].tolist()))
    for t, c in counts.items():
        assert c == int(((meta["token_id"] == t) & keep).sum())
