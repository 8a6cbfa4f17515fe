"""The app as an exploration tool, in headless Chromium: a report's results reach the pages, back and forward
restore the controls, and the capture form refuses a bad hook before any model loads."""

from __future__ import annotations

import re

from tests.browser.conftest import ARTIFACTS
from tests.browser.fixture_cache import REPORT_MODEL
from tests.browser.test_app_browser import _fig_data, _settle, _wait_fig

_LABELS = """() => { window.__labels = []; const el = document.querySelector('#capture-bar-label');
  new MutationObserver(() => window.__labels.push(el.textContent)).observe(el, {childList: true, subtree: true,
  characterData: true}); }"""


def test_report_results_reach_every_page_that_shows_them(page, server):
    page.goto(server + "/")
    _settle(page)
    index = page.inner_text("#result-index")
    assert "report:demo" in index and REPORT_MODEL in index and "report demo" in index
    assert "smollm2-135m" in index  # the cache's own sets are in the same index
    page.screenshot(path=str(ARTIFACTS / "home-index.png"), full_page=True)
    # the Layers page lists the report's set beside the cache's and draws it
    row = page.locator("#result-index tr", has=page.locator("td:text-is('layer probes')")).filter(has_text="report:demo")
    row.locator("text=open").click()
    page.wait_for_function("() => location.pathname === '/layers' && location.search.includes('report')")
    _settle(page)
    # null-safe: the figure may not be drawn yet when the predicate first runs
    title = "() => document.querySelector('#layers-acc-fig .js-plotly-plot')?.layout?.title?.text || ''"
    page.wait_for_function(f"() => ({title})().includes('{REPORT_MODEL}')")
    assert len(_wait_fig(page, "layers-acc-fig", 2)[0]["x"]) == 5  # the report's 4 layers + embeddings
    page.click("#layers-model")
    opts = page.get_by_role("option").all_inner_texts()
    assert any(o.startswith("report:demo") for o in opts) and any(o.startswith("smollm2-135m") for o in opts), opts
    page.keyboard.press("Escape")
    # and the AST-Probe page
    page.goto(server + "/ast-probe?model=report%3Ademo")
    _settle(page)
    _wait_fig(page, "ast-layer-fig", 1)
    assert "report:demo" in page.inner_text("#ast-model")
    assert "No result" not in page.inner_text("#page")
    assert page.errors == []


def test_back_and_forward_restore_the_controls(page, server):
    page.goto(server + "/ast-probe?model=smollm2-135m")
    _settle(page)
    f1 = _wait_fig(page, "ast-layer-fig", 1)[0]["y"]
    page.click("#ast-metric")
    page.click("text=c accuracy")
    page.wait_for_function("() => location.search.includes('metric=c_accuracy')")
    page.click("#ast-curves >> text=separate fits")  # the radio, not the headline row "best k (separate fits)"
    page.wait_for_function("() => location.search.includes('curves=separate')")
    _settle(page)
    checked = "() => document.querySelector('#ast-curves input:checked').value"
    y = "() => JSON.stringify(document.querySelector('#ast-layer-fig .js-plotly-plot').data[0].y)"
    assert page.evaluate(checked) == "separate"
    page.go_back()  # the curves choice is undone, the metric kept
    page.wait_for_function(f"() => ({checked})() === 'both'")
    assert "metric=c_accuracy" in page.evaluate("() => location.search")
    assert "c accuracy" in page.inner_text("#ast-metric")
    page.go_back()  # the metric too: F1 again, in the control and the figure
    page.wait_for_function(f"(f1) => ({y})() === JSON.stringify(f1)", arg=f1)
    assert "constituent F1" in page.inner_text("#ast-metric")
    page.go_forward()
    page.wait_for_function("() => location.search.includes('metric=c_accuracy')")
    page.wait_for_function(f"(f1) => ({y})() !== JSON.stringify(f1)", arg=f1)
    assert "c accuracy" in page.inner_text("#ast-metric")
    # a pasted link drives the controls of a page already open
    page.evaluate("() => { history.pushState({}, '', '/ast-probe?model=smollm2-135m&curves=matryoshka');"
                  " window.dispatchEvent(new PopStateEvent('popstate')); }")
    page.wait_for_function(f"() => ({checked})() === 'matryoshka'")
    assert page.errors == []


def test_capture_refuses_a_bad_hook_before_any_model_loads(page, server, app_cache):
    runs = sorted(p.name for p in (app_cache["root"] / "runs").iterdir())
    page.goto(server + "/capture?model=models%2Ftiny-llama")
    _settle(page)
    page.evaluate(_LABELS)
    # the picker offers the model's hook names (from its config, in layer order) and adds the chosen one
    page.click("#capture-hook-pick")
    page.keyboard.type("blocks.1.hook_resid_p")
    page.get_by_role("option", name="blocks.1.hook_resid_post").click()
    page.wait_for_function("() => document.querySelector('#capture-hooks').value.includes('blocks.1.hook_resid_post')")
    # a hook the model does not have is named, with close matches, as soon as it is typed
    page.fill("#capture-hooks", "blocks.1.hook_resid_post blocks.7.hook_resid_post")
    page.press("#capture-hooks", "Enter")
    page.wait_for_selector("#capture-error .notice")
    msg = page.inner_text("#capture-error")
    assert "blocks.7.hook_resid_post" in msg and "blocks.1.hook_resid_post" not in msg.split("did you mean")[0]
    # and Start does not start a job: the error comes back, no model-loading step, no new run
    page.click("#capture-start")
    page.wait_for_selector("#capture-result .notice.error")
    assert "blocks.7.hook_resid_post" in page.inner_text("#capture-result")
    page.wait_for_selector("#capture-start:not([disabled])")
    labels = page.evaluate("() => window.__labels")
    assert not any("loading model" in t or "starting the worker" in t for t in labels), labels
    assert sorted(p.name for p in (app_cache["root"] / "runs").iterdir()) == runs
    page.screenshot(path=str(ARTIFACTS / "capture-bad-hook.png"), full_page=True)
    assert page.errors == []


def test_capture_progress_shows_loading_then_true_token_counts(page, server, app_cache):
    page.goto(server + "/capture?model=models%2Ftiny-llama&dataset=texts")
    _settle(page)
    page.evaluate(_LABELS)
    page.fill("#capture-texts", "a b c\n---\nprint('hello world')")
    page.fill("#capture-hooks", "blocks.0.hook_resid_post")
    page.press("#capture-hooks", "Enter")
    page.wait_for_function("() => !document.querySelector('#capture-error .notice')")
    page.click("#capture-start")
    page.wait_for_selector("#capture-done", timeout=180_000)
    labels = page.evaluate("() => window.__labels")
    assert any(t.startswith("Step 1 of 2: loading model") for t in labels), labels
    run_id = re.search(r"run ([0-9a-f]{24})", page.inner_text("#capture-done")).group(1)
    from probekit.cache import Run

    n = Run(app_cache["root"] / "runs" / run_id).n_rows  # positions "all": one row per token
    counts = [tuple(int(v.replace(",", "")) for v in m.groups())
              for t in labels for m in [re.search(r"\(([\d,]+) / ([\d,]+) tokens\)", t)] if m]
    assert counts and counts[-1] == (n, n), (labels, n)  # never a made-up "1 / 1"
    assert page.errors == []
