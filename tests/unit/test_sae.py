"""SAE: TopK sparsity, decoder norm, centred FVU, SAELens format, CE splicing, training, exact resume, aux loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from probekit.cache import ActivationCache
from probekit.capture import CaptureConfig
from probekit.device_cache import DeviceCache
from probekit.probes import sae as sae_mod
from probekit.probes.sae import (SAE, SAEConfig, ce_recovered, ce_recovered_many, dead_fraction, explained_variance,
                                 fvu, l0, lm_logits, load_sae, sae_metrics, save_sae, splice, train_sae)
from tests.conftest import TEXTS

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture
def one_thread():
    """Tiny matmuls are slower with 2 threads on a shared 2-core box; restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sparse_data(n: int, seed: int = 0, d_in: int = 32, n_feat: int = 64, active: int = 3):
    """x = sparse codes @ unit dictionary: ``(n, d_in)`` and the dictionary ``(n_feat, d_in)``."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_feat, d_in, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    idx = torch.rand(n, n_feat, generator=g).argsort(1)[:, :active]
    codes = torch.zeros(n, n_feat).scatter(1, idx, torch.rand(n, active, generator=g) * 2 + 0.5)
    return codes @ D, D


# ------------------------------------------------------------------------------------------------ config / model


def test_config_validation_names_field():
    with pytest.raises(ValueError, match="architecture.*relu.*topk.*jumprelu.*gated"):
        SAEConfig(d_in=4, d_sae=8, architecture="batchtopk")
    with pytest.raises(ValueError, match=r"SAEConfig\.k"):
        SAEConfig(d_in=4, d_sae=8, k=9)
    with pytest.raises(ValueError, match="total_tokens or epochs"):
        SAEConfig(d_in=4, d_sae=8, k=2, total_tokens=100, epochs=2)
    with pytest.raises(ValueError, match="dtype"):
        SAEConfig(d_in=4, d_sae=8, k=2, dtype="int8")
    assert SAEConfig(d_in=64, d_sae=8, k=2).aux_k == 8  # default min(d_sae, d_in // 2)


def test_topk_exactly_k_and_at_most_k():
    sae = SAE(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=3))
    x = torch.randn(5, 7, 8)  # any leading dims
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive -> exactly k
        assert sae.encode(x).shape == (5, 7, 16)
        assert ((sae.encode(x) != 0).sum(-1) == 3).all()
        sae.b_enc.fill_(-100.0)
        sae.b_enc[:2] = 100.0  # only 2 latents can be positive -> exactly those 2 (< k)
        f = sae.encode(x)
        assert ((f != 0).sum(-1) == 2).all() and (f[..., 2:] == 0).all()
        sae.b_enc.zero_()  # generic: the non-zeros are the largest pre-activations
        pre, f = sae.pre_acts(x), sae.encode(x)
        assert ((f != 0).sum(-1) <= 3).all()
        kth = pre.topk(3, dim=-1).values[..., -1:]
        assert torch.equal(f != 0, (pre >= kth) & (pre > 0))
        assert sae(x).shape == x.shape


def test_decoder_rows_unit_norm_after_training(one_thread):
    x = torch.randn(512, 16) * 3 + 1
    cfg = SAEConfig(d_in=16, d_sae=48, architecture="relu", l1_coefficient=1e-2, lr=1e-2, batch_size=64, epochs=1)
    init = SAE(cfg).W_dec.detach().clone()
    sae = train_sae(cfg, x, progress=False)
    assert not torch.allclose(sae.W_dec, init)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(48), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_training_loss_and_grads_match_dense_reference(arch):
    """The training path (addmm, TopK decoded by embedding_bag) against the textbook dense formulas, by autograd."""
    cfg = SAEConfig(d_in=12, d_sae=40, architecture=arch, k=5, aux_k=6, l1_coefficient=0.3, dtype="float64", seed=2)
    sae = SAE(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = torch.randn(30, 12, generator=g, dtype=torch.float64)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True
    got = sae.loss(x, dead)
    grads = torch.autograd.grad(got["total"], list(sae.parameters()))

    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    pre = (x - b_dec) @ W_enc + b_enc
    if arch == "relu":
        f = pre.clamp_min(0)
    else:
        kth = pre.topk(5, dim=-1).values[:, -1:]
        f = torch.where(pre >= kth, pre, torch.zeros_like(pre)).clamp_min(0)
    x_hat = f @ W_dec + b_dec
    mse = ((x_hat - x) ** 2).sum(-1).mean()
    if arch == "relu":
        want = mse + 0.3 * f.abs().sum(-1).mean()
    else:
        masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
        kth_dead = masked.topk(6, dim=-1).values[:, -1:]
        z = torch.where(dead & (pre >= kth_dead), pre, torch.zeros_like(pre)).clamp_min(0)
        aux = ((z @ W_dec - (x - x_hat).detach()) ** 2).sum(-1).mean()
        assert aux > 0
        want = mse + cfg.aux_coefficient * aux
    torch.testing.assert_close(got["mse"], mse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["total"], want, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, torch.autograd.grad(want, list(sae.parameters()))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_aux_loss_zero_without_dead_nonzero_with_dead():
    sae = SAE(SAEConfig(d_in=8, d_sae=32, architecture="topk", k=2, aux_k=4))
    x = torch.randn(64, 8)
    none_dead = torch.zeros(32, dtype=torch.bool)
    assert float(sae.loss(x, none_dead)["aux"]) == 0.0
    assert float(sae.loss(x)["aux"]) == 0.0
    dead = none_dead.clone()
    dead[10:20] = True
    out = sae.loss(x, dead)
    assert out["aux"].item() > 0
    torch.testing.assert_close(out["total"], out["mse"] + sae.cfg.aux_coefficient * out["aux"])
    out["total"].backward()  # the aux term reaches the dead latents' encoder columns
    assert sae.W_enc.grad[:, 10:20].abs().sum() > 0


# ------------------------------------------------------------------------------------------------ metrics


def test_fvu_centred_and_matches_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 12, generator=g, dtype=torch.float64) * 0.5
    sae = SAE(SAEConfig(d_in=12, d_sae=24, architecture="topk", k=4, dtype="float64"))
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
        x_hat = sae(x)
    xn, xh = x.numpy(), x_hat.numpy()
    ref = ((xn - xh) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
    assert fvu(x, x_hat) == pytest.approx(ref, rel=1e-12)
    assert explained_variance(x, x_hat) == pytest.approx(1 - ref, rel=1e-12)
    m = sae_metrics(sae, [x[:100], x[100:250], x[250:]])  # streaming, uneven batches
    assert m.fvu == pytest.approx(ref, rel=1e-9) and m.n_tokens == 300
    assert m.l0 == pytest.approx(l0(sae.encode(x)))
    # a constant offset on x and on b_dec shifts x̂ by the same c: the centred FVU is unchanged...
    c = torch.full((12,), 50.0, dtype=torch.float64)
    with torch.no_grad():
        sae.b_dec += c
        x_hat_c = sae(x + c)
    torch.testing.assert_close(x_hat_c, x_hat + c)
    assert fvu(x + c, x_hat_c) == pytest.approx(ref, rel=1e-9)
    assert sae_metrics(sae, x + c).fvu == pytest.approx(ref, rel=1e-9)
    # ...while the uncentred version (about zero, SAELens #659) changes
    uncentred = lambda a, b: float(((a - b) ** 2).sum() / (a**2).sum())  # noqa: E731
    assert abs(uncentred(x + c, x_hat_c) - uncentred(x, x_hat)) > 0.1 * ref


def test_dead_fraction():
    sae = SAE(SAEConfig(d_in=4, d_sae=8, architecture="relu"))
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)
        sae.b_enc[:3] = 1e3
    x = torch.randn(50, 4)
    assert dead_fraction(sae, x) == pytest.approx(5 / 8)
    assert dead_fraction(sae, [{"h": x[:20], "rows": torch.arange(20)}, {"h": x[20:], "rows": torch.arange(30)}]) \
        == pytest.approx(5 / 8)


# ------------------------------------------------------------------------------------------------ SAELens format


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_save_load_round_trip(tmp_path, arch):
    cfg = SAEConfig(d_in=12, d_sae=40, architecture=arch, k=5, hook_name=HOOK, model_name="tiny", seed=3)
    sae = SAE(cfg)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    save_sae(sae, tmp_path / "sae")
    raw = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert raw["architecture"] == ("standard" if arch == "relu" else "topk")
    assert raw["d_in"] == 12 and raw["d_sae"] == 40 and raw["hook_name"] == HOOK
    assert raw["normalize_activations"] == "none" and raw["apply_b_dec_to_input"] is True
    back = load_sae(tmp_path / "sae", expected_d_in=12, hook_name=HOOK)
    for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, key), getattr(sae, key)), key
    assert back.cfg == cfg
    assert not list((tmp_path / "sae").glob("*.tmp"))


def test_load_refuses_wrong_d_in_and_missing_pieces(tmp_path):
    save_sae(SAE(SAEConfig(d_in=12, d_sae=24, hook_name=HOOK, k=4)), tmp_path / "a")
    with pytest.raises(ValueError, match=r"d_in=12.*d_in=64"):
        load_sae(tmp_path / "a", expected_d_in=64, hook_name=HOOK)
    (tmp_path / "b").mkdir()
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sae(tmp_path / "b")
    (tmp_path / "b" / "cfg.json").write_text(json.dumps({"d_in": 12, "d_sae": 24}))
    save_file({"W_enc": torch.zeros(12, 24), "b_enc": torch.zeros(24), "W_dec": torch.zeros(24, 12)},
              str(tmp_path / "b" / "sae_weights.safetensors"))
    with pytest.raises(KeyError, match="b_dec"):
        load_sae(tmp_path / "b")


def test_load_older_saelens_keys(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(10, 30, generator=g), "b_enc": torch.randn(30, generator=g),
         "W_dec": torch.randn(30, 10, generator=g), "b_dec": torch.randn(10, generator=g)}
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "d_in": 10, "d_sae": 30, "hook_point": "blocks.0.hook_resid_pre", "hook_point_layer": 0,
        "architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4},
        "dtype": "float32", "device": "cpu", "model_name": "gpt2", "finetuning_scaling_factor": False}))
    sae = load_sae(tmp_path, expected_d_in=10)
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 4
    assert sae.cfg.hook_name == "blocks.0.hook_resid_pre" and sae.cfg.model_name == "gpt2"
    for k, v in w.items():
        assert torch.equal(getattr(sae, k), v)
    # SAELens 6 layout: hook and model under "metadata", k at top level
    (tmp_path / "cfg.json").write_text(json.dumps({
        "d_in": 10, "d_sae": 30, "architecture": "topk", "k": 2, "dtype": "float32", "device": "cpu",
        "metadata": {"hook_name": "blocks.3.hook_resid_post", "model_name": "m"}}))
    sae = load_sae(tmp_path)
    assert sae.cfg.k == 2 and sae.cfg.hook_name == "blocks.3.hook_resid_post"


# ------------------------------------------------------------------------------------------------ splicing / CE


@pytest.fixture(scope="module")
def tokens(tiny_llama):
    _, tok = tiny_llama
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()  # the batch has padding to mask out
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("prefer_plain", [True, False], ids=["plain", "bridge"])
def test_ce_identity_and_zero_splice(tiny_llama, tokens, prefer_plain):
    bridge, _ = tiny_llama
    r = ce_recovered(bridge, [tokens], HOOK, lambda a: a.clone(), prefer_plain=prefer_plain)
    assert abs(r.ce_sae - r.ce_clean) < 1e-6 and abs(r.kl_sae) < 1e-6
    assert r.ce_recovered == pytest.approx(1.0, abs=1e-6)
    assert r.ce_zero > r.ce_clean and r.kl_zero > 0
    assert r.n_tokens == int((tokens[1][:, :-1] * tokens[1][:, 1:]).sum())
    with torch.no_grad():  # clean CE is the model's own next-token CE, padding masked out
        logits = bridge(tokens[0], attention_mask=tokens[1], return_type="logits")
        valid = (tokens[1][:, :-1] * tokens[1][:, 1:]).bool()
        ref = torch.nn.functional.cross_entropy(logits[:, :-1][valid].double(), tokens[0][:, 1:][valid])
    assert r.ce_clean == pytest.approx(float(ref), abs=1e-6)


def test_ce_padding_masked(tiny_llama, tokens):
    """A padded batch gives the token-weighted mean of the per-document results."""
    bridge, _ = tiny_llama
    sae = SAE(SAEConfig(d_in=64, d_sae=128, k=8, hook_name=HOOK))
    ids, mask = tokens
    whole = ce_recovered(bridge, [(ids, mask)], HOOK, sae)
    parts = [ce_recovered(bridge, [ids[i : i + 1, : int(mask[i].sum())]], HOOK, sae) for i in range(len(ids))]
    n = sum(p.n_tokens for p in parts)
    assert whole.n_tokens == n
    for key in ("ce_clean", "ce_sae", "ce_zero", "kl_sae"):
        assert getattr(whole, key) == pytest.approx(sum(getattr(p, key) * p.n_tokens for p in parts) / n, abs=1e-5)
    assert whole.kl_sae > 0 and np.isfinite(whole.ce_recovered)


def test_ce_many_equals_separate_calls_and_shares_clean_and_zero(tiny_llama, tokens, monkeypatch):
    """One clean and one zero forward per batch serve every replacement; results match separate calls."""
    bridge, _ = tiny_llama
    ids, mask = tokens
    sae = SAE(SAEConfig(d_in=64, d_sae=128, k=8, hook_name=HOOK))
    reps = {"sae": sae, "half": lambda a: 0.5 * a, "flip": lambda a: a.flip(-1)}
    batches = [(ids[:2], mask[:2]), (ids[2:], mask[2:])]
    n_batches = len(batches)

    forwards, zero_splices, rep_calls = [0], [0], {k: 0 for k in reps}
    real_logits, real_splice = sae_mod.lm_logits, sae_mod.splice

    def counting_logits(*a, **kw):
        forwards[0] += 1
        return real_logits(*a, **kw)

    def counting_splice(model, hook_name, fn, **kw):
        zero_splices[0] += fn is torch.zeros_like
        return real_splice(model, hook_name, fn, **kw)

    def counted(k):
        def g(a):
            rep_calls[k] += 1
            return reps[k](a)
        return g

    monkeypatch.setattr(sae_mod, "lm_logits", counting_logits)
    monkeypatch.setattr(sae_mod, "splice", counting_splice)
    # a generator: read once
    many = ce_recovered_many(bridge, (b for b in batches), HOOK, {k: counted(k) for k in reps})
    assert forwards[0] == n_batches * (2 + len(reps))  # clean + zero once per batch, plus one per replacement
    assert zero_splices[0] == n_batches and all(c == n_batches for c in rep_calls.values())
    assert list(many) == list(reps)

    forwards[0] = zero_splices[0] = 0
    separate = {k: ce_recovered(bridge, batches, HOOK, f) for k, f in reps.items()}
    assert forwards[0] == 3 * n_batches * len(reps) and zero_splices[0] == n_batches * len(reps)
    for k in reps:
        a, b = many[k].to_dict(), separate[k].to_dict()
        assert a["n_tokens"] == b["n_tokens"] == int((mask[:, :-1] * mask[:, 1:]).sum())
        for key in ("ce_clean", "ce_sae", "ce_zero", "ce_recovered", "kl_sae", "kl_zero"):
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-9), (k, key)
    assert many["half"].ce_sae != many["flip"].ce_sae
    with pytest.raises(ValueError, match="at least one"):
        ce_recovered_many(bridge, batches, HOOK, {})


def test_ce_many_per_document_sums_are_each_sequence_alone_and_pool_to_the_means(tiny_llama, tokens):
    """Per-sequence sums in input order: each equals that sequence run alone (unpadded); their totals over the
    target tokens are the pooled means, with no extra forwards (the counts are checked above)."""
    import json

    bridge, _ = tiny_llama
    ids, mask = tokens
    sae = SAE(SAEConfig(d_in=64, d_sae=128, k=8, hook_name=HOOK))
    reps = {"sae": sae, "half": lambda a: 0.5 * a}
    many = ce_recovered_many(bridge, [(ids[:2], mask[:2]), (ids[2:], mask[2:])], HOOK, reps)
    for k, f in reps.items():
        per = many[k].per_document
        assert set(per) == {"nll_clean", "nll_zero", "nll_sae", "kl_sae", "kl_zero", "n_tokens"}
        assert all(len(v) == len(ids) for v in per.values())
        for i in range(len(ids)):
            alone = ce_recovered(bridge, [ids[i : i + 1, : int(mask[i].sum())]], HOOK, f)
            assert per["n_tokens"][i] == alone.n_tokens
            for col, attr in (("nll_clean", "ce_clean"), ("nll_zero", "ce_zero"), ("nll_sae", "ce_sae"),
                              ("kl_sae", "kl_sae"), ("kl_zero", "kl_zero")):
                assert per[col][i] == pytest.approx(getattr(alone, attr) * alone.n_tokens, rel=1e-5, abs=1e-6)
        n = per["n_tokens"].sum()
        r = many[k]
        assert n == r.n_tokens
        assert per["nll_sae"].sum() / n == pytest.approx(r.ce_sae, rel=1e-12)
        assert per["kl_sae"].sum() / n == pytest.approx(r.kl_sae, rel=1e-12)
        z, c, s = per["nll_zero"].sum(), per["nll_clean"].sum(), per["nll_sae"].sum()
        assert (z - s) / (z - c) == pytest.approx(r.ce_recovered, rel=1e-12)
        d = json.loads(json.dumps(r.to_dict()))
        assert d["per_document"]["n_tokens"] == per["n_tokens"].tolist() and d["ce_sae"] == r.ce_sae


def test_splice_plain_module_and_shape_check(tiny_llama, tokens):
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 4)
    with splice(net, "1", torch.zeros_like) as m:
        assert torch.equal(m(x), net[2].bias.expand(3, 2))
    assert not torch.equal(net(x), net[2].bias.expand(3, 2))  # hook removed on exit
    bridge, _ = tiny_llama
    with pytest.raises(ValueError, match="shape"):
        with splice(bridge, HOOK, lambda a: a[..., :3]) as m:
            lm_logits(m, *tokens)


# ------------------------------------------------------------------------------------------------ training


def test_topk_recovers_sparse_dictionary(one_thread):
    x, D = sparse_data(8192, seed=0)
    cfg = SAEConfig(d_in=32, d_sae=128, architecture="topk", k=3, lr=5e-3, batch_size=128, epochs=6,
                    dead_steps=20, aux_k=16, seed=0)
    sae = train_sae(cfg, x, progress=False)
    m = sae_metrics(sae, x)
    assert m.fvu < 0.1
    assert m.l0 <= 3
    cos = (D @ sae.W_dec.detach().T).max(1).values  # best latent per true feature (both unit norm)
    assert float((cos > 0.9).float().mean()) >= 0.8


@pytest.fixture(scope="module")
def tiny_run(tiny_llama, tmp_path_factory):
    bridge, _ = tiny_llama
    docs = [t * 3 for t in TEXTS] * 2
    cfg = CaptureConfig(hooks=[HOOK], batch_size=4, max_length=128, progress=False)
    return ActivationCache(tmp_path_factory.mktemp("sae-cache")).capture(bridge, docs, cfg)


def test_train_from_device_cache(tiny_run, one_thread):
    dc = DeviceCache(tiny_run, device="cpu", budget_gb=1.0)
    calls = []
    orig = dc.batches

    def spy(*a, **kw):
        calls.append(kw)
        return orig(*a, **kw)

    dc.batches = spy
    n = tiny_run.n_rows
    train_rows = np.arange(0, n - 64)
    cfg = SAEConfig(d_in=64, d_sae=128, k=8, lr=3e-3, batch_size=32, epochs=3, hook_name=HOOK, seed=1)
    sae = train_sae(cfg, dc, rows=train_rows, progress=False)
    assert calls and all(c["shuffle"] and c["rows"] is train_rows for c in calls)
    assert [c["seed"] for c in calls] == [1, 2, 3]  # one call per epoch, seeded seed + epoch
    assert sae.train_state_["step"] == 3 * (len(train_rows) // 32)
    held_out = tiny_run.load(HOOK, slice(n - 64, n)).float()
    base = SAE(cfg)
    with torch.no_grad():
        base.b_dec.copy_(tiny_run.load(HOOK).float().mean(0))
    assert sae_metrics(sae, held_out).fvu < sae_metrics(base, held_out).fvu
    batches = dc.batches(HOOK, 50, rows=slice(n - 64, n), dtype=torch.float32)
    assert sae_metrics(sae, batches).fvu == pytest.approx(sae_metrics(sae, held_out).fvu, rel=1e-6)


class _Boom(Exception):
    pass


@pytest.mark.parametrize("kind", ["tensor", "cache"])
def test_resume_is_bitwise_identical(tmp_path, tiny_run, kind, one_thread):
    if kind == "tensor":
        source, bs = sparse_data(640, seed=1)[0] + 0.5, 64  # 10 steps per epoch
        cfg = SAEConfig(d_in=32, d_sae=64, k=3, lr=5e-3, lr_warmup_steps=4, lr_decay_fraction=0.3, batch_size=bs,
                        epochs=3, dead_steps=3, aux_k=8, seed=7)
    else:
        source = DeviceCache(tiny_run, device="cpu", budget_gb=1e-9)  # streamed path
        cfg = SAEConfig(d_in=64, d_sae=96, k=4, lr=5e-3, lr_warmup_steps=4, lr_decay_fraction=0.3, batch_size=40,
                        epochs=3, dead_steps=3, aux_k=8, seed=7, hook_name=HOOK)
    full = train_sae(cfg, source, progress=False)
    total = full.train_state_["step"]
    assert total > 12

    ck = tmp_path / "ck"
    half = train_sae(cfg, source, checkpoint_dir=ck, checkpoint_every=4, max_steps=total // 2 + 1, progress=False)
    assert half.train_state_["step"] == total // 2 + 1
    assert not torch.equal(half.W_dec, full.W_dec)

    def boom(step, stats):  # a crash two steps after the next periodic checkpoint
        if step == (total // 2 + 1) // 4 * 4 + 6:
            raise _Boom

    with pytest.raises(_Boom):
        train_sae(cfg, source, checkpoint_dir=ck, checkpoint_every=4, callback=boom, progress=False)
    resumed = train_sae(cfg, source, checkpoint_dir=ck, checkpoint_every=4, progress=False)
    assert resumed.train_state_["step"] == total
    for name, p in full.named_parameters():
        assert torch.equal(p, dict(resumed.named_parameters())[name]), name
    assert torch.equal(full.train_state_["steps_since_fired"], resumed.train_state_["steps_since_fired"])
    ckpts = sorted(p.name for p in ck.iterdir())
    assert ckpts[-1] == f"step_{total:010d}" and len(ckpts) <= 2 and not any(p.startswith(".tmp") for p in ckpts)

    other = SAEConfig(**{**cfg.to_dict(), "lr": 1e-3})
    with pytest.raises(ValueError, match="different cfg"):
        train_sae(other, source, checkpoint_dir=ck, progress=False)
