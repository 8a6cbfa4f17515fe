"""The architecture matrix of issue #16: load and capture on every common family, on tiny random-init models.

Each family (GPT-2, GPT-NeoX, GPT-J, Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, OLMo 2, BERT, RoBERTa) is built
from its transformers config in the test session (``probekit.testing.make_tiny_model``: 3 layers, d_model 64,
byte tokenizer; GPT-2's tokenizer has no pad token), saved as a real HF folder, and checked:

- load from the folder, and from a Hub id resolved offline from a Hub-style cache (``HF_HUB_OFFLINE=1``);
- every capture site (resid pre/mid/post, attention and MLP outputs, MLP activations, attention patterns) at
  every layer, by both mechanisms (plain module hooks and the bridge's hook points), equal to the bridge's
  ``run_with_cache`` on each document alone (so the padded batches are checked too);
- the residual stream equal to HF ``output_hidden_states`` (an independent computation), and the bridge's
  sites consistent with each other: resid_mid = resid_pre + attn_out, resid_post = resid_mid + mlp_out
  (sequential blocks), resid_post = resid_pre + attn_out + mlp_out (parallel blocks), resid_mid =
  attn_out + mlp_out (BERT-style post-norm names); patterns are causal distributions (decoders);
- stop-early: the last block never runs when only block 0 is asked for, by either mechanism;
- padding: batched rows equal one-at-a-time rows; a tokenizer without a pad token works.

Each test records its table cell (``record_capability``); ``python -m probekit.archtable`` renders README's table.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from probekit.archtable import SITES
from probekit.capture import CaptureConfig, capture
from probekit.hooks import plain_layout
from probekit.models import load_model, plain_model
from probekit.testing import FAMILIES, make_tiny_model
from tests.conftest import TEXTS

pytestmark = pytest.mark.usefixtures("one_thread")

N_LAYERS = 3
PARALLEL = {"gpt_neox", "gptj"}  # attention and MLP read the same residual: no resid_mid
ENCODERS = {f for f, (_, _, enc) in FAMILIES.items() if enc}
FAMS = list(FAMILIES)


@pytest.fixture(scope="session")
def arch_dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("arch-models")


_LOADED: dict[str, tuple] = {}


def model(family, arch_dirs):
    """(folder, bridge, tokenizer) for ``family``, built and loaded once per session."""
    if family not in _LOADED:
        path = make_tiny_model(arch_dirs / family, arch=family, n_layers=N_LAYERS)
        bridge, tok = load_model(str(path))
        _LOADED[family] = (path, bridge, tok)
    return _LOADED[family]


def docs_of(tok):
    return [tok(t)["input_ids"][:40] for t in TEXTS]


def per_doc_reference(bridge, docs, names):
    """``run_with_cache`` on each document alone (no padding): list of {name: (pos, …)} (patterns (q, head, k))."""
    want = set(names)
    out = []
    for d in docs:
        with torch.inference_mode():
            _, cache = bridge.run_with_cache(torch.tensor([d]), names_filter=lambda n: n in want)
        out.append({n: cache[n][0].movedim(1, 0) if n.endswith("hook_pattern") else cache[n][0] for n in names})
    return out


def rows_by_doc(res, name, n_docs):
    """Capture rows regrouped per document in position order: list of (pos, …)."""
    out = []
    for d in range(n_docs):
        sel = torch.nonzero(res.meta["doc_index"] == d).flatten()
        sel = sel[torch.argsort(res.meta["position"][sel])]
        out.append(res.acts[name][sel])
    return out


# --------------------------------------------------------------------------------------------- load


@pytest.mark.parametrize("family", FAMS)
def test_load_from_folder(family, arch_dirs, record_capability):
    record_capability(family, "load")
    path, bridge, tok = model(family, arch_dirs)
    assert bridge.cfg.n_layers == N_LAYERS
    assert plain_model(bridge) is not None
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    ids = torch.tensor([docs_of(tok)[0]])
    hf = (AutoModelForMaskedLM if family in ENCODERS else AutoModelForCausalLM).from_pretrained(str(path)).eval()
    with torch.inference_mode():  # the bridge computes what a freshly loaded HF model computes
        torch.testing.assert_close(bridge(ids, return_type="logits"), hf(ids).logits, rtol=1e-4, atol=1e-4)


def hub_cache(root, repo_id, folder):
    """A Hugging Face Hub cache holding ``folder`` as ``repo_id`` at revision main (the layout hf_hub_download
    writes: models--org--name/{refs/main, snapshots/<commit>/…})."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    return root


@pytest.mark.parametrize("family", FAMS)
def test_load_hub_id_from_offline_cache(family, arch_dirs, tmp_path, monkeypatch, record_capability):
    record_capability(family, "load_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, bridge, tok = model(family, arch_dirs)
    cache = hub_cache(tmp_path / "hub", f"probekit-tiny/{family}", path)
    hub_bridge, hub_tok = load_model(f"probekit-tiny/{family}", cache_dir=str(cache))
    ids = torch.tensor([docs_of(tok)[1]])
    assert hub_tok(TEXTS[1])["input_ids"] == tok(TEXTS[1])["input_ids"]
    with torch.inference_mode():
        torch.testing.assert_close(hub_bridge(ids, return_type="logits"), bridge(ids, return_type="logits"))


def test_gpt2_lm_head_model_is_accepted(arch_dirs):
    """GPT-2's class is GPT2LMHeadModel: the loader decides by model_type, not by the class name's suffix."""
    path, bridge, _ = model("gpt2", arch_dirs)
    assert type(plain_model(bridge)).__name__ == "GPT2LMHeadModel"


def test_unsupported_model_type_is_a_clear_error(tmp_path):
    from transformers import T5Config

    from probekit.models import ModelError

    T5Config(num_layers=1, d_model=16, d_kv=4, num_heads=2, d_ff=32, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"model_type 't5'.*not supported"):
        load_model(str(tmp_path))


# --------------------------------------------------------------------------------------------- capture


def site_names(bridge, capability):
    names = [f"blocks.{l}.{SITES[capability]}" for l in range(N_LAYERS)]
    return names if all(n in bridge.hook_dict for n in names) else None


@pytest.mark.parametrize("capability", list(SITES))
@pytest.mark.parametrize("family", FAMS)
def test_capture_site_both_mechanisms_equal_run_with_cache(family, capability, arch_dirs, record_capability):
    _, bridge, tok = model(family, arch_dirs)
    names = site_names(bridge, capability)
    if names is None:  # the family has no such site (parallel blocks have no resid_mid)
        assert capability == "resid_mid" and family in PARALLEL, f"{family} lacks {SITES[capability]}"
        record_capability(family, capability, "n/a")
        return
    docs = docs_of(tok)
    ref = per_doc_reference(bridge, docs, names)
    cfg = CaptureConfig(hooks=names, batch_size=3, max_length=64, progress=False)
    mechs = []
    for mech in ("plain", "bridge"):
        try:
            res = capture(bridge, docs, cfg, mechanism=mech)
        except ValueError as e:  # no plain equivalent: allowed only for the pattern (it lives inside attention)
            assert mech == "plain" and capability == "attn_pattern", e
            continue
        mechs.append(mech)
        assert res.mechanism == mech
        for n in names:
            for d, got in enumerate(rows_by_doc(res, n, len(docs))):
                want = ref[d][n]
                if capability == "attn_pattern":  # (q, head, k): capture pads keys to max_length
                    assert torch.all(got[..., want.shape[-1]:] == 0)
                    got = got[..., : want.shape[-1]]
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{mech} {n} doc {d}")
    note = "+".join(mechs) if mechs == ["plain", "bridge"] else f"{mechs[0]} only"
    record_capability(family, capability, note=note)


@pytest.mark.parametrize("family", FAMS)
def test_residual_stream_equals_hf_hidden_states(family, arch_dirs, record_capability):
    """resid_pre/resid_post against HF ``output_hidden_states`` of the plain model (computed without hooks)."""
    record_capability(family, "resid_pre")
    record_capability(family, "resid_post")
    _, bridge, tok = model(family, arch_dirs)
    d = docs_of(tok)[2]
    names = [f"blocks.{l}.hook_resid_{w}" for l in range(N_LAYERS) for w in ("pre", "post")]
    res = capture(bridge, [d], CaptureConfig(hooks=names, progress=False), mechanism="bridge")
    with torch.inference_mode():
        hs = plain_model(bridge)(input_ids=torch.tensor([d]), output_hidden_states=True).hidden_states
    for l in range(N_LAYERS):
        torch.testing.assert_close(res.acts[f"blocks.{l}.hook_resid_pre"], hs[l][0], rtol=1e-4, atol=1e-5)
        if l < N_LAYERS - 1 or family in ENCODERS:  # decoders apply the final norm to HF's last entry
            torch.testing.assert_close(res.acts[f"blocks.{l}.hook_resid_post"], hs[l + 1][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMS)
def test_sites_add_up(family, arch_dirs, record_capability):
    """The bridge's sites are consistent with the block's algebra (an independent check of what they mean)."""
    for cap in ("attn_out", "mlp_out", "attn_pattern") + (() if family in PARALLEL else ("resid_mid",)):
        record_capability(family, cap)
    _, bridge, tok = model(family, arch_dirs)
    d = torch.tensor([docs_of(tok)[2]])
    with torch.inference_mode():
        _, c = bridge.run_with_cache(d)
    for l in range(N_LAYERS):
        pre, post = c[f"blocks.{l}.hook_resid_pre"], c[f"blocks.{l}.hook_resid_post"]
        attn, mlp = c[f"blocks.{l}.hook_attn_out"], c[f"blocks.{l}.hook_mlp_out"]
        close = dict(rtol=1e-4, atol=1e-5)
        if family in ENCODERS:  # post-norm: resid_mid is the sum entering the block's last LayerNorm
            torch.testing.assert_close(c[f"blocks.{l}.hook_resid_mid"], attn + mlp, **close)
        elif family in PARALLEL:
            torch.testing.assert_close(post, pre + attn + mlp, **close)
        else:
            mid = c[f"blocks.{l}.hook_resid_mid"]
            torch.testing.assert_close(mid, pre + attn, **close)
            torch.testing.assert_close(post, mid + mlp, **close)
        pat = c[f"blocks.{l}.attn.hook_pattern"][0]  # (head, q, k)
        torch.testing.assert_close(pat.sum(-1), torch.ones(pat.shape[:2]))
        if family not in ENCODERS:
            assert torch.all(pat.triu(1) == 0), "a decoder attends to a later token"


# --------------------------------------------------------------------------------------------- stop early, padding


def last_block(bridge, mechanism):
    if mechanism == "bridge":
        return bridge.blocks[N_LAYERS - 1]
    plain = plain_model(bridge)
    return plain.get_submodule(plain_layout(plain).blocks)[N_LAYERS - 1]


@pytest.mark.parametrize("family", FAMS)
def test_stop_early_both_mechanisms(family, arch_dirs, record_capability):
    record_capability(family, "stop_early", note="plain+bridge")
    _, bridge, tok = model(family, arch_dirs)
    for mech, site in (("plain", "blocks.0.hook_resid_post"), ("bridge", "blocks.0.hook_resid_post"),
                       ("auto", "blocks.0.attn.hook_pattern")):
        ran = {"n": 0, "first": 0}
        runs = "bridge" if mech == "auto" else mech
        h_last = last_block(bridge, runs).register_forward_pre_hook(lambda *a: ran.__setitem__("n", ran["n"] + 1))
        first = bridge.blocks[0] if runs == "bridge" else plain_model(bridge).get_submodule(
            plain_layout(plain_model(bridge)).blocks)[0]
        h_first = first.register_forward_pre_hook(lambda *a: ran.__setitem__("first", ran["first"] + 1))
        try:
            res = capture(bridge, docs_of(tok), CaptureConfig(hooks=[site], batch_size=2, progress=False),
                          mechanism=mech)
        finally:
            h_last.remove()
            h_first.remove()
        assert res.mechanism == runs
        assert ran["first"] == 2, "the counting hook must see block 0 run (two batches)"
        assert ran["n"] == 0, f"{mech}: block {N_LAYERS - 1} ran after the last requested site"


@pytest.mark.parametrize("family", FAMS)
def test_padding_batched_equals_one_at_a_time(family, arch_dirs, record_capability):
    record_capability(family, "padding")
    _, bridge, tok = model(family, arch_dirs)
    names = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post", "blocks.1.attn.hook_pattern"]
    lengths = [len(d) for d in docs_of(tok)]
    assert len(set(lengths)) > 1  # the batch really is padded
    for mech in ("auto", "bridge"):
        cfg = dict(hooks=names, max_length=64, progress=False)
        batched = capture(bridge, TEXTS, CaptureConfig(batch_size=4, **cfg), mechanism=mech)
        alone = capture(bridge, TEXTS, CaptureConfig(batch_size=1, **cfg), mechanism=mech)
        for n in names:
            for a, b in zip(rows_by_doc(batched, n, len(TEXTS)), rows_by_doc(alone, n, len(TEXTS))):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{mech} {n}")


@pytest.mark.parametrize("family", FAMS)
def test_tokenizer_without_pad_token(family, arch_dirs, record_capability):
    """GPT-2's tokenizer has no pad token; capture pads anyway (padding is masked) and loses nothing."""
    record_capability(family, "no_pad_token")
    _, bridge, tok = model(family, arch_dirs)
    nopad = copy.deepcopy(tok)
    nopad.pad_token = None
    assert nopad.pad_token_id is None
    if family == "gpt2":
        assert tok.pad_token is None or tok.pad_token == tok.eos_token  # as GPT-2 ships (the bridge may set EOS)
    name = "blocks.2.hook_resid_post"
    batched = capture(bridge, TEXTS, CaptureConfig(hooks=[name], batch_size=4, progress=False), tokenizer=nopad)
    alone = capture(bridge, TEXTS, CaptureConfig(hooks=[name], batch_size=1, progress=False), tokenizer=nopad)
    assert batched.n_rows == sum(len(nopad(t)["input_ids"]) for t in TEXTS)
    for a, b in zip(rows_by_doc(batched, name, len(TEXTS)), rows_by_doc(alone, name, len(TEXTS))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------- say what works


def test_models_check_prints_the_row(arch_dirs, capsys):
    from probekit import cli

    path, _, _ = model("gpt2", arch_dirs)
    assert cli.main(["models", "check", str(path)]) == 0
    out = capsys.readouterr().out
    row = [ln for ln in out.splitlines() if ln.startswith("| gpt2 [gpt2]")]
    assert len(row) == 1 and "✗" not in row[0] and row[0].count("✓") == 12  # 12 checks (LinearScope support included); no load_hub here
    assert "attn.hook_pattern" in out and "LinearScope" in out and "✓ (bridge)" in row[0] and "✓ (plain)" in row[0]


def test_models_check_finds_a_wrong_site(arch_dirs, monkeypatch):
    """The check can fail: point GPT-2's attn_out at the MLP and it reports exactly that site."""
    import dataclasses

    from probekit import hooks
    from probekit.archtable import check_model

    path, _, _ = model("gpt2", arch_dirs)
    bad = dataclasses.replace(hooks.PLAIN_LAYOUTS["gpt2"],
                              block_sites={**hooks.PLAIN_LAYOUTS["gpt2"].block_sites,
                                           "hook_attn_out": ("mlp", "output", False)})
    monkeypatch.setitem(hooks.PLAIN_LAYOUTS, "gpt2", bad)
    cells = check_model(path)
    assert cells["attn_out"]["status"] == "fail"
    assert all(c["status"] == "pass" for k, c in cells.items() if k != "attn_out")


def test_models_check_errors(tmp_path, capsys):
    from transformers import T5Config

    from probekit import cli

    assert cli.main(["models", "check", str(tmp_path / "nowhere")]) == 2
    assert "not a model folder" in capsys.readouterr().err
    T5Config(num_layers=1, d_model=16, d_kv=4, num_heads=2, d_ff=32, vocab_size=64).save_pretrained(tmp_path)
    assert cli.main(["models", "check", str(tmp_path)]) == 1  # refused, with the reason in the row
    assert "refused (ModelError:" in capsys.readouterr().out


def test_table_rendering_and_records(tmp_path):
    from probekit.archtable import END, START, load_records, merge_records, render_table, update_readme

    rec = tmp_path / "caps.json"
    merge_records(rec, {"gpt2": {"load": {"status": "pass", "note": ""}},
                        "resnet": {"linearscope": {"status": "pass", "note": "cnn"}}})
    merge_records(rec, {"gpt2": {"resid_mid": {"status": "n/a", "note": ""}}})  # merged, not replaced
    data = load_records(rec)
    assert set(data["gpt2"]) == {"load", "resid_mid"}
    table = render_table(data).splitlines()
    assert table[0] == "| architecture | load (folder) | resid_mid | LinearScope |"  # known columns first
    assert table[2] == "| GPT-2 | ✓ | — |  |" and table[3] == "| resnet |  |  | ✓ (cnn) |"
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{START}\nstale row\n{END}\ntail\n")
    assert update_readme(readme, data) and not update_readme(readme, data)
    assert readme.read_text().endswith(f"{END}\ntail\n") and "stale row" not in readme.read_text()
    rec.write_text('{"gpt2": {"load": {"status": "great"}}}')
    with pytest.raises(ValueError, match="gpt2/load"):
        load_records(rec)
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        update_readme(readme, data)


@pytest.mark.parametrize("family", FAMS)
def test_every_plain_layout_entry_equals_run_with_cache(family, arch_dirs):
    """Every name the family's plain layout maps (embeddings, norms, attn.hook_z … at every layer) captures
    through the twin's modules exactly what the bridge's hook point gives."""
    _, bridge, tok = model(family, arch_dirs)
    layout = plain_layout(plain_model(bridge))
    assert layout is not None, f"{family} has no plain layout"
    names = list(layout.global_sites) + [f"blocks.{l}.{s}" for l in range(N_LAYERS) for s in layout.block_sites]
    missing = [n for n in names if n not in bridge.hook_dict]
    assert not missing, f"the layout maps names the bridge does not have: {missing}"
    docs = docs_of(tok)
    ref = per_doc_reference(bridge, docs, names)
    res = capture(bridge, docs, CaptureConfig(hooks=names, batch_size=4, progress=False), mechanism="plain")
    for n in names:
        for d, got in enumerate(rows_by_doc(res, n, len(docs))):
            torch.testing.assert_close(got, ref[d][n], rtol=1e-4, atol=1e-5, msg=f"{n} doc {d}")


def test_mechanism_errors(arch_dirs):
    _, bridge, tok = model("llama", arch_dirs)
    docs = docs_of(tok)[:1]
    with pytest.raises(ValueError, match="mechanism must be one of"):
        capture(bridge, docs, CaptureConfig(hooks=["blocks.0.hook_resid_post"], progress=False), mechanism="fast")
    with pytest.raises(ValueError, match=r"no plain-module equivalent for \['blocks.0.attn.hook_pattern'\]"):
        capture(bridge, docs, CaptureConfig(hooks=["blocks.0.hook_resid_post", "blocks.0.attn.hook_pattern"],
                                            progress=False), mechanism="plain")
    with pytest.raises(ValueError, match="not a bridge"):
        capture(plain_model(bridge), docs, CaptureConfig(hooks=["blocks.0.hook_resid_post"], progress=False),
                mechanism="bridge")


def test_family_the_bridge_cannot_wrap_is_named_and_captures_by_module_path(tmp_path, record_capability):
    """BioGPT loads in transformers but TransformerLens 4.3 has no adapter: load_model names the family and the
    way out, and capture by dotted module paths on ``load_hf``'s model equals HF ``output_hidden_states``."""
    from transformers import BioGptConfig, BioGptForCausalLM

    from probekit.models import ModelError, load_hf
    from probekit.testing import byte_tokenizer

    record_capability("biogpt", "load", "refused", note="TransformerLens 4.3 has no adapter")
    record_capability("biogpt", "resid_post", note="dotted module paths on load_hf")
    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = BioGptConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, pad_token_id=tok.pad_token_id)
    cfg.architectures = ["BioGptForCausalLM"]
    BioGptForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    wrap = r"(?s)TransformerLens 4\.3.* cannot wrap .*model_type 'biogpt'.*dotted module paths"
    with pytest.raises(ModelError, match=wrap):
        load_model(str(tmp_path))
    hf, hf_tok, _ = load_hf(str(tmp_path))
    names = ["biogpt.layers.0", "biogpt.layers.1"]
    res = capture(hf, TEXTS, CaptureConfig(hooks=names, batch_size=4, progress=False), tokenizer=hf_tok)
    for d, text in enumerate(TEXTS):
        ids = torch.tensor([hf_tok(text)["input_ids"]])
        with torch.inference_mode():
            hs = hf(input_ids=ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(rows_by_doc(res, "biogpt.layers.0", len(TEXTS))[d], hs[1][0], rtol=1e-4, atol=1e-5)
