"""The token, latent and attention views as pure functions over a small cache (no browser): the robust colour
scale, the quantities against direct computations, the latent page, token search, and the forward worker's
activations and attention against the model's own outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.unit._dash_text import dash_text


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from app import data
    from tests.browser.fixture_cache import populate, write_views

    root = tmp_path_factory.mktemp("views-cache")
    info = populate(root, tiny_model=True)
    info.update(write_views(root))
    data.set_root(root)
    data.clear_caches()
    return dict(root=root, **info)


def _spans(div):
    return [c for c in div.children]


def test_robust_scale_greys_bos_and_massive_tokens():
    from app.tokenspans import GREY, robust_scale, visible

    s = robust_scale([800.0, 70.0, 60.0, 75.0, 900.0, 65.0])
    assert s.excluded == [True, False, False, False, True, False]
    assert (s.lo, s.hi) == (0.0, 75.0)
    assert s.colour(800.0, True) == GREY and s.colour(75.0) != s.colour(60.0)
    s2 = robust_scale([800.0, 70.0, 60.0], exclude_sinks=False)
    assert not any(s2.excluded) and s2.hi == 800.0
    signed = robust_scale([5.0, -2.0, 1.0])
    assert signed.signed and signed.excluded == [True, False, False]
    assert visible("a b\n\tc") == "a·b⏎\n→c"


def test_token_view_cached_document_quantities(root):
    from app import viewdata
    from app.pages import tokens
    from probekit.cache import Run
    from probekit.probes.sae import load_sae

    rid, hook = root["view_run_id"], root["view_hook"]
    src = viewdata.doc_activations(rid, hook, 0)
    run = Run(root["root"] / "runs" / rid)
    rows = run.rows_where(doc_index=[0])
    x = run.load(hook, rows).numpy()
    assert src["decoded"] and "".join(src["tokens"][1:]).startswith("def add")
    v, _ = viewdata.quantity(src["x"], "norm")
    np.testing.assert_allclose(v, np.linalg.norm(x, axis=1), rtol=1e-6)
    from safetensors.torch import load_file

    vec = load_file(str(root["root"] / "vectors" / "probe.safetensors"))["probe"].numpy()
    v, _ = viewdata.quantity(src["x"], "direction", vector="vectors/probe.safetensors::probe")
    np.testing.assert_allclose(v, x @ vec, rtol=1e-5, atol=1e-5)
    sae = load_sae(root["sae_dir"])
    v, _ = viewdata.quantity(src["x"], "latent", sae="saes/view-sae", latent=3)
    np.testing.assert_allclose(v, sae.encode(torch.from_numpy(x))[:, 3].detach().numpy(), rtol=1e-5, atol=1e-6)
    out = tokens.token_view("cached", rid, 0, None, hook, "norm", None, None, None, None, True)
    spans = out[-1].children
    assert len(spans) == len(src["tokens"])
    assert "tok-excluded" in spans[0].className and "tok-excluded" not in spans[1].className
    assert "‖x‖" in spans[1].title and "·" in "".join(s.children for s in spans)  # spaces drawn
    for bad in (dict(qty="neuron", neuron=999), dict(qty="direction", vector="../etc/passwd::x"),
                dict(qty="latent", sae="saes/nope", latent=0)):
        o = tokens.token_view("cached", rid, 0, None, hook, bad["qty"], bad.get("neuron"), bad.get("vector"),
                              bad.get("sae"), bad.get("latent"), True)
        assert o[0].className == "notice error", bad


def test_latent_page_and_token_search(root):
    from app import viewdata
    from app.pages import latents
    from probekit.latents import latent_record

    index, a, names = viewdata.load_latents("view-sae")
    i = int(np.argmax(a["firing_count"]))
    fig, summary, top, quant, logits, neigh = latents.latent_view("view-sae", i)
    assert fig["layout"]["xaxis"]["title"]["text"] == "activation" and fig["layout"]["yaxis"]["title"]["text"]
    rec = latent_record(index, a, i)
    assert len(top.children) == len(rec["top"]) > 0
    first = top.children[0].children[1].children  # spans of the first example
    assert any("tok-focus" in s.className for s in first)
    assert f"{rec['top'][0]['act']:.3f}" == top.children[0].children[0].children
    rows = viewdata.latent_table("view-sae", "rate")
    rates = [r["firing_rate"] for r in rows]
    assert rates == sorted(rates, reverse=True)
    # search: the latents firing most on "d" are the token index's top latents for that byte
    hits = viewdata.search_token("view-sae", "d")
    j = [k for k, t in enumerate(a["token_ids"]) if names[str(int(t))] == "d"][0]
    want = [int(l) for l in a["token_top_latents"][j] if l >= 0]
    assert [h["latent"] for h in hits][:len(want)] == want[:20]
    assert latents.latent_view("view-sae", 10_000)[1].className == "notice error"
    links = dash_text(latents.sae_links("smollm2-135m"))
    assert "compute latent pages" in links and "sae=results%2Fdark-matter%2Fsmollm2-135m%2Fsaes%2F" in links
    assert "no saved SAEs" in dash_text(latents.sae_links("other-model"))


def test_forward_worker_matches_the_model(root):
    from app import forward_worker, viewdata
    from app.view_jobs import build_forward_spec
    from probekit.models import load_hf

    spec = build_forward_spec(root["root"], model="models/tiny-llama", text="def f(x):\n  return x",
                              attention=True, all_resid=True)
    final = forward_worker.run(spec.to_dict(), str(root["root"]))
    assert final["event"] == "done", final
    info, arrays = viewdata.load_forward(spec.fid)
    model, tok, _ = load_hf(str(root["model_dir"]), fetch=False)
    model.set_attn_implementation("eager")
    ids = torch.tensor([tok("def f(x):\n  return x")["input_ids"]])
    with torch.no_grad():
        out = model(ids, output_attentions=True, output_hidden_states=True)
    assert info["token_ids"] == ids[0].tolist()
    np.testing.assert_allclose(arrays["acts.blocks.0.hook_resid_post"], out.hidden_states[1][0].numpy(), rtol=1e-4,
                               atol=1e-5)
    for l, a in enumerate(out.attentions):
        np.testing.assert_allclose(arrays[f"attn.{l}"].astype(np.float32), a[0].numpy(), atol=2e-3)
    from app.pages import attention

    fig, t2t, msg = attention.heatmap_view(spec.fid, 1, 2)
    assert msg is None and fig["layout"]["xaxis"]["title"]["text"].startswith("key")
    assert fig["data"][0]["colorbar"]["title"]["text"] == "attention weight"
    spans = t2t.children[1].children
    row = json.loads(spans[3].to_plotly_json()["props"]["data-attn"])
    np.testing.assert_allclose(row, out.attentions[1][0, 2, 3].numpy(), atol=2e-3)
    _, _, m = attention.heatmap_view(spec.fid, 1, 99)
    assert "outside" in str(m.children)
    with pytest.raises(ValueError, match="Type some text"):
        build_forward_spec(root["root"], model="models/tiny-llama", text="  ", all_resid=True)
    with pytest.raises(ValueError):
        build_forward_spec(root["root"], model="models/../../etc", text="x", all_resid=True)


def test_compare_overlays_two_result_sets(root):
    from app.pages import compare

    fig, table, msg = compare.compare_view("demo", "smollm2-135m", "tiny-llama")
    assert msg is None and [t["name"] for t in fig["data"]] == ["smollm2-135m", "tiny-llama"]
    assert fig["data"][1]["y"] == [0.4, 0.45, 0.42] and fig["data"][0]["x"][:2] == ["embed", "0"]
    assert fig["layout"]["xaxis"]["title"]["text"] == "layer" and fig["layout"]["yaxis"]["title"]["text"]
    text = dash_text(table)
    assert "best test accuracy" in text and f"{0.45 - 0.65:+.3f}" in text  # B − A of the best accuracies
    _, _, msg = compare.compare_view("demo", "smollm2-135m", "nope")
    assert msg.className == "notice error"


def test_new_pages_build_on_an_empty_cache(tmp_path):
    from app import data
    from app.pages import attention, compare, latents, tokens

    saved = data.get_root()
    data.set_root(tmp_path)
    data.clear_caches()
    try:
        for page in (tokens, latents, attention, compare):
            text = dash_text(page.layout({}))
            assert page.TITLE in text
        assert "No latent statistics yet" in dash_text(latents.layout({}))
        assert tokens.token_view("cached", None, None, None, None, "norm", 0, None, None, None, True)[0].className \
            == "notice info"
        assert "press Compute" in dash_text(attention.heatmap_view(None, 0, 0)[2])
    finally:
        data.set_root(saved)
        data.clear_caches()


def test_latent_job_offers_only_runs_the_sae_can_read(root, tmp_path):
    from app.pages import latents
    from tests.browser.fixture_cache import write_run

    other = write_run(root["root"], hooks=("blocks.1.hook_resid_post",), d=32, seed=9)  # same hook, other width
    _, runs, first = latents.job_choices("saes/view-sae")
    ids = [r["value"] for r in runs]
    assert root["view_run_id"] in ids and other.run_id not in ids and first in ids
    import shutil

    shutil.rmtree(other.path)


def test_compare_probe_switch_settles_a_and_b_in_one_url_change(root):
    """Switching the probe picks that probe's result sets for A and B in the same callback that writes the URL,
    so the browser gets one history entry (before: the URL kept A/B of the old probe, then a second entry)."""
    from dash import no_update

    from app import data
    from app.pages import compare

    kinds = [k for k in compare.KINDS if data.list_results(k)]
    assert "demo" in kinds and len(kinds) >= 2
    new = next(k for k in kinds if k != "demo")
    ids = data.list_results(new)
    out = compare.STATE.sync("cmp-kind", compare.PATH, "?kind=demo&a=smollm2-135m&b=tiny-llama",
                             [new, "smollm2-135m", "tiny-llama"])
    a, b = compare.controls({"kind": new, "a": "smollm2-135m", "b": "tiny-llama"})[1:]
    assert a in ids and b in ids and "tiny-llama" not in ids  # B of the old probe is not a result of the new one
    assert out[0] == f"?kind={new}&a={a}&b={b}"
    assert out[1] is no_update and out[2] == (a if a != "smollm2-135m" else no_update)
    assert out[3] == (b if b != "tiny-llama" else no_update)
    # a change that implies nothing else writes only the URL
    out = compare.STATE.sync("cmp-b", compare.PATH, "?kind=demo&a=smollm2-135m&b=tiny-llama",
                             ["demo", "smollm2-135m", "smollm2-135m"])
    assert out == ["?kind=demo&a=smollm2-135m&b=smollm2-135m", no_update, no_update, no_update]
