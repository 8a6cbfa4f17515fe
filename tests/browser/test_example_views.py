"""The example-level views in headless Chromium: typed text → coloured tokens, a latent page with highlighted top
examples, token search, the latent job launched from the Dark matter page, and the attention view (heatmap and
hover token-to-token). Readability is measured (figure heights, axis and colour-bar titles, distinct colours),
and each view is saved at 1366 and 1920 px wide to artifacts/."""

from __future__ import annotations

import numpy as np
import pytest

from tests.browser.conftest import ARTIFACTS
from tests.browser.test_app_browser import _fig_data, _settle, _wait_fig

WIDTHS = (1366, 1920)


def _shots(page, name: str) -> None:
    for w in WIDTHS:
        page.set_viewport_size({"width": w, "height": 1000})
        page.wait_for_timeout(300)
        page.screenshot(path=str(ARTIFACTS / f"{name}-{w}.png"), full_page=True)


def _graph_height(page, graph_id: str) -> float:
    return page.evaluate(f"() => document.querySelector('#{graph_id} .js-plotly-plot').getBoundingClientRect().height")


def _layout(page, graph_id: str) -> dict:
    return page.evaluate(f"() => JSON.parse(JSON.stringify(document.querySelector('#{graph_id} .js-plotly-plot')"
                         ".layout))")


@pytest.mark.parametrize("path", ["/tokens", "/latents", "/attention", "/compare"])
def test_view_pages_load_without_console_errors(page, server, path):
    page.goto(server + path)
    _settle(page)
    assert "Traceback" not in page.content()
    assert page.errors == []


def typed_tokens(page, url: str, text_in: str, go: str, tokens: str, text: str) -> list:
    """Open ``url``, type ``text`` into ``text_in``, press ``go`` and return the token spans under ``tokens``
    once the worker's forward has drawn them."""
    page.goto(url)
    _settle(page)
    page.fill(text_in, text)
    page.click(go)
    page.wait_for_selector(f"{tokens} .tok", timeout=120_000)
    return page.query_selector_all(f"{tokens} .tok")


def test_typed_text_gives_coloured_tokens(page, server):
    text = "def add(a, b):\n    return a + b"
    spans = typed_tokens(page, server + "/tokens?source=typed", "#tok-text-in", "#tok-go", "#tok-text", text)
    assert len(spans) == len(text.encode()) + 1  # byte tokens + BOS
    first_cls = spans[0].get_attribute("class")
    assert "tok-excluded" in first_cls, "BOS is greyed and left out of the scale"
    colours = {s.evaluate("e => getComputedStyle(e).backgroundColor") for s in spans[1:]}
    assert len(colours) > 5, f"tokens should be visibly different colours, got {colours}"
    title = spans[3].get_attribute("title")
    assert "token 'f'" in title and "‖x‖ =" in title
    assert "⏎" in page.inner_text("#tok-text") and "·" in page.inner_text("#tok-text")
    page.wait_for_function("() => location.search.includes('fwd=')")
    # a neuron instead of the norm: a diverging scale (some tokens blue)
    page.click("text=neuron")
    page.wait_for_function("() => document.querySelector('#tok-text .tok:nth-child(3)').title.includes('neuron 0')")
    _shots(page, "tokens-typed")
    assert page.errors == []


def test_latent_page_shows_highlighted_top_examples(page, server, app_cache):
    from probekit.latents import load_latent_stats

    _, a, _ = load_latent_stats(app_cache["latents_dir"])
    i = int(np.argmax(a["firing_count"]))
    page.goto(server + f"/latents?result=view-sae&latent={i}")
    _settle(page)
    page.wait_for_selector("#lat-top .tok-focus")
    examples = page.query_selector_all("#lat-top .example")
    assert len(examples) == int((a["top_row"][i] >= 0).sum())
    focus = page.query_selector("#lat-top .example .tok-focus")
    bg = focus.evaluate("e => getComputedStyle(e).backgroundColor")
    assert bg.startswith("rgba(214, 39, 40") and float(bg.split(",")[-1].rstrip(")")) > 0.5, bg
    assert "activation =" in focus.get_attribute("title")
    _wait_fig(page, "lat-hist-fig", 1)
    lay = _layout(page, "lat-hist-fig")
    assert lay["xaxis"]["title"]["text"] == "activation" and lay["yaxis"]["title"]["text"] == "tokens"
    assert _graph_height(page, "lat-hist-fig") >= 250
    assert page.query_selector_all("#lat-quant .example") and page.inner_text("#lat-logits")
    assert len(page.query_selector_all("#lat-neigh a")) == 8
    # the list sorted by firing rate, then a token search
    rates = [float(t.replace("%", "")) for t in page.eval_on_selector_all(
        "#lat-table tbody tr td:nth-child(2)", "els => els.map(e => e.innerText)")]
    assert rates == sorted(rates, reverse=True) and len(rates) == a["firing_count"].shape[0]
    _shots(page, "latent-page")
    page.fill("#lat-search", "d")
    page.press("#lat-search", "Enter")
    page.wait_for_function("() => document.querySelector('#lat-table th:nth-child(2)').innerText === 'token'")
    assert page.inner_text("#lat-table tbody tr:first-child td:nth-child(2)") == "'d'"
    page.wait_for_function("() => location.search.includes('q=d')")
    assert page.errors == []


def test_dark_matter_links_an_sae_to_its_latent_job(page, server):
    page.goto(server + "/dark-matter")
    _settle(page)
    page.click("#dm-sae-links a.sae-launch")
    page.wait_for_url("**/latents?sae=*")
    _settle(page)
    page.wait_for_function("() => document.querySelector('#lat-run') && "
                           "document.querySelector('#lat-run').innerText.includes('tiny-llama')")
    page.click("#lat-launch")
    page.wait_for_selector("#lat-job-link, #lat-job-result .notice", timeout=180_000)
    assert page.query_selector("#lat-job-result .notice") is None, page.inner_text("#lat-job-result")
    page.click("#lat-job-link")
    _settle(page)
    page.wait_for_selector("#lat-table")
    assert "results/dark-matter" not in page.inner_text("#lat-msg")
    page.goto(server + "/dark-matter")
    _settle(page)
    assert page.query_selector("#dm-sae-links a.sae-latents") is not None  # now links to the computed pages
    assert page.errors == []


def test_attention_view_heatmap_and_token_hover(page, server, app_cache):
    page.goto(server + f"/attention?source=cached&run={app_cache['view_run_id']}&doc=0")
    _settle(page)
    page.click("#attn-go")
    page.wait_for_function("() => location.search.includes('fwd=')", timeout=120_000)
    data = _wait_fig(page, "attn-heat-fig", 1)
    n = len(data[0]["z"])
    assert n == len("def add(a, b):\n    return a + b".encode()) + 1
    z = np.array(data[0]["z"], dtype=float)
    np.testing.assert_allclose(z.sum(1), 1.0, atol=2e-2)  # rows are distributions
    assert np.allclose(np.triu(z, 1), 0, atol=1e-3)  # causal
    lay = _layout(page, "attn-heat-fig")
    assert lay["xaxis"]["title"]["text"].startswith("key") and lay["yaxis"]["title"]["text"].startswith("query")
    assert data[0]["colorbar"]["title"]["text"] == "attention weight"
    assert _graph_height(page, "attn-heat-fig") >= 400
    fid = page.evaluate("() => new URLSearchParams(location.search).get('fwd')")
    page.goto(server + f"/attention?fwd={fid}&layer=1&head=2&source=cached&run={app_cache['view_run_id']}&doc=0")
    _settle(page)
    _wait_fig(page, "attn-heat-fig", 1)
    assert "Layer 1, head 2" in _layout(page, "attn-heat-fig")["title"]["text"]
    page.hover("#attn-text .attn-tok:nth-child(10)")
    page.wait_for_function("() => document.querySelector('#attn-text .attn-tok:nth-child(10)')"
                           ".classList.contains('attn-query')")
    bgs = page.eval_on_selector_all("#attn-text .attn-tok", "els => els.map(e => e.style.backgroundColor)")
    assert all(b.endswith(", 0)") or b == "rgba(31, 119, 180, 0)" for b in bgs[10:]), "no attention to the future"
    assert len(set(bgs[:10])) > 2
    _shots(page, "attention")
    assert page.errors == []


def test_compare_two_result_sets(page, server):
    page.goto(server + "/compare?kind=demo&a=smollm2-135m&b=tiny-llama")
    _settle(page)
    data = _wait_fig(page, "cmp-fig", 2)
    assert [t["name"] for t in data] == ["smollm2-135m", "tiny-llama"]
    lay = _layout(page, "cmp-fig")
    assert lay["xaxis"]["title"]["text"] == "layer" and lay["yaxis"]["title"]["text"] == "test accuracy"
    assert _graph_height(page, "cmp-fig") >= 300
    cells = page.eval_on_selector_all("#cmp-table tr", "els => els.map(e => e.innerText)")
    assert any(c.startswith("best test accuracy") and "-0.200" in c for c in cells), cells
    _shots(page, "compare")
    assert page.errors == []


@pytest.mark.parametrize("path,radio,first,second", [
    ("/latents?result=view-sae", "lat-sort", "max", "id"),
    ("/tokens?source=cached", "tok-qty", "neuron", "latent"),
    ("/attention?source=cached", "attn-source", "cached", "typed"),
])
def test_back_and_forward_restore_the_view_controls(page, server, path, radio, first, second):
    """Each view's controls follow the query string both ways: change a control twice, go back, forward. (Compare is
    left out: switching its probe also resets A and B, a second history entry, so one step back lands between.)"""
    checked = f"() => document.querySelector('#{radio} input:checked').value"
    page.goto(server + path)
    _settle(page)
    for value in (first, second):
        if page.evaluate(checked) != value:
            page.click(f"#{radio} input[value='{value}']")
        page.wait_for_function(f"() => location.search.includes('={value}')")
        _settle(page)
    page.go_back()
    page.wait_for_function(f"() => ({checked})() === '{first}'")
    page.go_forward()
    page.wait_for_function(f"() => ({checked})() === '{second}'")
    assert page.errors == []
