"""Capture equals TransformerBridge.run_with_cache; stop-early skips later layers; module-path capture."""

from __future__ import annotations

import pytest
import torch

from probekit.capture import CaptureConfig, MemoryWriter, _select_rows, capture
from probekit.hooks import HookNameError, HookSet
from probekit.models import load_model, plain_model
from tests.conftest import TEXTS


def reference(bridge, tok, texts, names):
    """run_with_cache on the same right-padded batch: ({name: act}, mask)."""
    enc = tok(texts, padding=True, return_tensors="pt")
    _, cache = bridge.run_with_cache(enc["input_ids"], attention_mask=enc["attention_mask"],
                                     names_filter=lambda n: n in names)
    return {n: cache[n] for n in names}, enc["attention_mask"].bool(), enc["input_ids"]


def in_doc_order(res):
    """Rows sorted by (doc, position): bucketing reorders documents, the metadata records it."""
    key = res.meta["doc_index"] * 100_000 + res.meta["position"]
    return torch.argsort(key)


PLAIN_NAMES = ["hook_embed", "blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_attn_out",
               "blocks.0.hook_mlp_out", "blocks.2.hook_resid_post", "blocks.1.mlp.hook_post",
               "blocks.2.attn.hook_z", "blocks.0.ln1.hook_out", "blocks.1.ln2.hook_out", "ln_final.hook_out"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_plain_path_equals_run_with_cache(tiny_dir, arch):
    bridge, tok = load_model(str(tiny_dir[arch]))
    res = capture(bridge, TEXTS, CaptureConfig(hooks=PLAIN_NAMES, batch_size=3, progress=False))
    assert res.mechanism == "plain"
    ref, mask, ids = reference(bridge, tok, TEXTS, PLAIN_NAMES)
    order = in_doc_order(res)
    assert res.n_rows == int(mask.sum())
    assert torch.equal(res.meta["token_id"][order], ids[mask])
    for n in PLAIN_NAMES:
        got = res.acts[n][order]
        assert got.shape == ref[n][mask].shape, n
        torch.testing.assert_close(got, ref[n][mask], rtol=1e-5, atol=1e-6, msg=n)


def test_bridge_path_pattern_and_q(tiny_llama):
    bridge, tok = tiny_llama
    names = ["blocks.1.attn.hook_pattern", "blocks.0.attn.hook_q", "blocks.1.hook_resid_post"]
    cfg = CaptureConfig(hooks=names, batch_size=2, max_length=64, progress=False)
    res = capture(bridge, TEXTS, cfg)
    assert res.mechanism == "bridge"
    ref, mask, _ = reference(bridge, tok, TEXTS, names)
    order = in_doc_order(res)
    pat = ref["blocks.1.attn.hook_pattern"].movedim(2, 1)  # (batch, q, head, k)
    pat = torch.nn.functional.pad(pat, (0, 64 - pat.shape[-1]))
    torch.testing.assert_close(res.acts["blocks.1.attn.hook_pattern"][order], pat[mask])
    # each captured attention row is a distribution over keys
    torch.testing.assert_close(res.acts["blocks.1.attn.hook_pattern"].sum(-1),
                               torch.ones(res.n_rows, bridge.cfg.n_heads))
    torch.testing.assert_close(res.acts["blocks.0.attn.hook_q"][order], ref["blocks.0.attn.hook_q"][mask])


def test_encoder_capture_equals_run_with_cache(tiny_bert):
    bridge, tok = tiny_bert
    names = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post", "blocks.1.mlp.hook_post"]
    res = capture(bridge, TEXTS, CaptureConfig(hooks=names, batch_size=4, progress=False))
    ref, mask, _ = reference(bridge, tok, TEXTS, names)
    order = in_doc_order(res)
    for n in names:
        torch.testing.assert_close(res.acts[n][order], ref[n][mask], rtol=1e-5, atol=1e-6, msg=n)


def test_last_and_fixed_positions(tiny_llama):
    bridge, tok = tiny_llama
    name = "blocks.1.hook_resid_post"
    ref, mask, ids = reference(bridge, tok, TEXTS, [name])
    lengths = mask.sum(1)
    last = capture(bridge, TEXTS, CaptureConfig(hooks=[name], positions="last", progress=False))
    for row in range(last.n_rows):
        d = int(last.meta["doc_index"][row])
        assert int(last.meta["position"][row]) == lengths[d] - 1
        torch.testing.assert_close(last.acts[name][row], ref[name][d, lengths[d] - 1])
    # position 12 exists only in the longer documents: the rest are skipped and counted
    fixed = capture(bridge, TEXTS, CaptureConfig(hooks=[name], positions=[0, 12, -2], progress=False))
    expected = sum(1 + int(L > 12) + 1 for L in lengths.tolist())
    assert fixed.n_rows == expected and fixed.skipped == 3 * len(TEXTS) - expected
    for row in range(fixed.n_rows):
        d, p = int(fixed.meta["doc_index"][row]), int(fixed.meta["position"][row])
        torch.testing.assert_close(fixed.acts[name][row], ref[name][d, p])
        assert int(fixed.meta["token_id"][row]) == ids[d, p]


def test_padding_does_not_leak(tiny_llama):
    """A document's activations do not depend on what it is batched with."""
    bridge, _ = tiny_llama
    name = "blocks.2.hook_resid_post"
    alone = capture(bridge, TEXTS[1:2], CaptureConfig(hooks=[name], progress=False))
    batched = capture(bridge, TEXTS, CaptureConfig(hooks=[name], batch_size=4, progress=False))
    rows = batched.meta["doc_index"] == 1
    torch.testing.assert_close(batched.acts[name][rows], alone.acts[name], rtol=1e-5, atol=1e-5)


def count_calls(modules):
    counts = {name: 0 for name in modules}
    handles = []
    for name, m in modules.items():
        def hook(mod, args, out, name=name):
            counts[name] += 1
        handles.append(m.register_forward_hook(hook))
    return counts, handles


def test_stop_early_skips_later_layers_transformer(tiny_llama):
    bridge, _ = tiny_llama
    twin = plain_model(bridge)
    layers = {f"layer{i}": l for i, l in enumerate(twin.model.layers)}
    layers["lm_head"] = twin.lm_head
    counts, handles = count_calls(layers)
    try:
        capture(bridge, TEXTS, CaptureConfig(hooks=["blocks.0.hook_resid_post"], batch_size=2, progress=False))
    finally:
        for h in handles:
            h.remove()
    assert counts["layer0"] == 2  # two batches
    assert counts["layer1"] == counts["layer2"] == counts["lm_head"] == 0


def test_stop_early_bridge_path(tiny_llama):
    bridge, _ = tiny_llama
    counts = {"n": 0}
    h = bridge.blocks[2].register_forward_hook(lambda *a: counts.__setitem__("n", counts["n"] + 1))
    try:
        capture(bridge, TEXTS, CaptureConfig(hooks=["blocks.0.attn.hook_pattern"], progress=False))
    finally:
        h.remove()
    assert counts["n"] == 0


def make_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 10),
    ).eval()


def test_module_path_capture_and_stop_early():
    net = make_net()
    x = torch.randn(10, 1, 8, 8)
    counts, handles = count_calls({"4": net[4], "3": net[3]})
    res = capture(net, x, CaptureConfig(hooks=["1", "2"], batch_size=4, progress=False))
    for h in handles:
        h.remove()
    with torch.no_grad():
        expected1 = net[1](net[0](x))
        expected2 = net[2](expected1)
    torch.testing.assert_close(res.acts["1"], expected1)
    torch.testing.assert_close(res.acts["2"], expected2)
    assert res.meta["doc_index"].tolist() == list(range(10))
    assert counts == {"4": 0, "3": 0}  # Flatten and Linear never ran


def test_unknown_names_fail_before_compute(tiny_llama):
    bridge, _ = tiny_llama
    twin = plain_model(bridge)
    counts, handles = count_calls({"embed": twin.model.embed_tokens})
    with pytest.raises(HookNameError, match=r"blocks\.1\.hook_resid_post"):
        capture(bridge, TEXTS, CaptureConfig(hooks=["blocks.0.hook_resid_post", "blocks.1.hook_resid_pots"],
                                             progress=False))
    for h in handles:
        h.remove()
    assert counts["embed"] == 0
    with pytest.raises(HookNameError, match="features|0|1"):
        HookSet.for_module(make_net(), ["feature.0"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_storage_dtype(tiny_llama, dtype):
    bridge, _ = tiny_llama
    name = "blocks.1.hook_resid_post"
    full = capture(bridge, TEXTS, CaptureConfig(hooks=[name], progress=False))
    low = capture(bridge, TEXTS, CaptureConfig(hooks=[name], dtype=dtype, progress=False))
    assert low.acts[name].dtype == getattr(torch, dtype)
    assert torch.equal(low.acts[name], full.acts[name].to(getattr(torch, dtype)))


def test_inplace_ops_after_a_hook_do_not_rewrite_the_capture():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(inplace=True), torch.nn.Linear(8, 2)).eval()
    x = torch.randn(6, 4)
    res = capture(net, x, CaptureConfig(hooks=["0", "2"], progress=False))
    with torch.no_grad():
        torch.testing.assert_close(res.acts["0"], net[0](x))  # keeps its negative values
    assert (res.acts["0"] < 0).any()


@pytest.mark.parametrize("positions", ["all", "last", [0, -1, 5]])
def test_row_selection_builds_indices_on_the_activation_device(positions):
    """Indices are built from the CPU mask and moved to the activation's device (checked on 'meta')."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    act = torch.randn(2, 4, 3)
    cpu = _select_rows(act, 1, mask, positions, 4)
    meta = _select_rows(act.to("meta"), 1, mask, positions, 4)
    assert meta.device.type == "meta" and meta.shape == cpu.shape


def test_config_validation():
    with pytest.raises(ValueError, match="empty"):
        CaptureConfig(hooks=[])
    with pytest.raises(ValueError, match="positions"):
        CaptureConfig(hooks=["a"], positions="first")
    with pytest.raises(ValueError, match="dtype"):
        CaptureConfig(hooks=["a"], dtype="int8")
    with pytest.raises(ValueError, match="duplicates"):
        CaptureConfig(hooks=["a", "a"])


def test_memory_writer_is_default_and_custom_writer_receives_batches(tiny_llama):
    bridge, _ = tiny_llama
    seen = []

    class Spy(MemoryWriter):
        def write(self, acts, meta):
            seen.append(len(meta["doc_index"]))
            super().write(acts, meta)

    res = capture(bridge, TEXTS, CaptureConfig(hooks=["blocks.0.hook_resid_post"], batch_size=2,
                                               progress=False), writer=Spy())
    assert len(seen) == 2 and sum(seen) == res.n_rows
