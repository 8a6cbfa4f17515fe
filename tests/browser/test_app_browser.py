"""The app in headless Chromium: every page loads without console errors, controls update figures, the URL
carries state, a tiny capture runs end to end, traversal attempts are refused. Screenshots go to artifacts/."""

from __future__ import annotations

import json
import re

import pytest
import requests

from tests.browser.conftest import ARTIFACTS

PAGES = ["/", "/capture", "/layers", "/ast-probe", "/dark-matter", "/linearscope", "/safety"]


def _settle(page) -> None:
    """Wait until Dash has rendered and no callback is pending."""
    page.wait_for_selector("#page > *")
    page.wait_for_function("() => !document.querySelector('[data-dash-is-loading=\"true\"]')")
    page.wait_for_load_state("networkidle")


def _fig_data(page, graph_id: str):
    return page.evaluate(f"() => {{ const g = document.querySelector('#{graph_id} .js-plotly-plot');"
                         " return g && g.data ? JSON.parse(JSON.stringify(g.data)) : null; }")


def _wait_fig(page, graph_id: str, n_min: int = 1):
    page.wait_for_function(f"() => {{ const g = document.querySelector('#{graph_id} .js-plotly-plot');"
                           f" return g && g.data && g.data.length >= {n_min}; }}")
    return _fig_data(page, graph_id)


@pytest.mark.parametrize("path", PAGES)
def test_page_loads_without_console_errors(page, server, path):
    page.goto(server + path)
    _settle(page)
    name = path.strip("/") or "home"
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    assert "Traceback" not in page.content()
    assert page.errors == []


def test_home_lists_run_and_verifies_it(page, server, app_cache):
    page.goto(server + "/")
    _settle(page)
    rid = app_cache["run_id"]
    assert rid[:12] in page.inner_text("#home-runs")
    page.click(f"button:has-text('verify')")
    page.wait_for_selector("text=verified")
    assert page.errors == []


def test_layers_control_changes_figure_and_url(page, server):
    page.goto(server + "/layers")
    _settle(page)
    before = _wait_fig(page, "layers-acc-fig", 2)
    page.click("text=train accuracy")
    page.wait_for_function("() => document.querySelector('#layers-acc-fig .js-plotly-plot').data.length !== %d"
                           % len(before))
    after = _fig_data(page, "layers-acc-fig")
    assert "train accuracy" in [t.get("name") for t in after] and len(after) == len(before) + 1
    page.wait_for_function("() => location.search.includes('show=')")
    assert "train" in page.evaluate("() => location.search")
    # stats and token view of the fixture run
    _wait_fig(page, "layers-stats-fig", 1)
    page.wait_for_selector("#token-text .tok")
    page.screenshot(path=str(ARTIFACTS / "layers-changed.png"), full_page=True)
    assert page.errors == []


def test_ast_probe_state_from_url_and_snippet_picker(page, server):
    page.goto(server + "/ast-probe?model=smollm2-135m&layer=2&snippet=1&curves=separate")
    _settle(page)
    k = _wait_fig(page, "ast-k-fig", 1)
    assert [t["name"] for t in k if not t["name"].startswith("best")] == ["separate fits"]
    from probekit.probes.ast_tree import code_to_tuple
    from tests.browser.fixture_cache import TREE_SNIPPETS

    n0, n1 = (len(code_to_tuple(src)[0]) for src in TREE_SNIPPETS[:2])
    leaves = "() => { const g = document.querySelector('#ast-tree-fig .js-plotly-plot');" \
             " return g && g.data && g.data.length === 6 ? g.data[1].x.length : -1; }"
    page.wait_for_function(f"() => ({leaves})() === {n1}")  # snippet 1, from the URL
    assert "2" in page.inner_text("#ast-layer")
    # pick another snippet: the tree is redrawn with its leaves
    page.click("#ast-snippet")
    page.click("text=/^0: m.py::s0/")
    page.wait_for_function(f"() => ({leaves})() === {n0}")
    tree0 = _fig_data(page, "ast-tree-fig")
    # the layer picker drives the tree: the fixture's layer-2 prediction is the gold tree (nothing red) ...
    assert not any("#d62728" in json.dumps(t.get("marker", {})) for t in tree0)
    page.wait_for_function("() => location.search.includes('snippet=0')")
    # ... and layer 5's has a wrong label: mismatches are marked red on the tree
    page.click("#ast-layer")
    page.get_by_role("option", name="5", exact=True).click()
    title = "() => document.querySelector('#ast-tree-fig .js-plotly-plot').layout.title.text"
    page.wait_for_function(f"() => ({title})().endsWith('layer 5')")
    tree5 = _fig_data(page, "ast-tree-fig")
    assert any("#d62728" in json.dumps(t.get("marker", {})) for t in tree5)
    # switch the metric: the per-layer curve changes
    f1 = _fig_data(page, "ast-layer-fig")[0]["y"]
    page.click("#ast-metric")
    page.click("text=c accuracy")
    page.wait_for_function("(y) => JSON.stringify(document.querySelector('#ast-layer-fig .js-plotly-plot').data[0].y)"
                           " !== y", arg=json.dumps(f1))
    page.screenshot(path=str(ARTIFACTS / "ast-probe-changed.png"), full_page=True)
    assert page.errors == []


def test_result_without_snippets_says_how_to_produce(page, server):
    page.goto(server + "/ast-probe?model=old-run")
    _settle(page)
    page.wait_for_selector("#ast-tree-msg .command")
    assert "probekit ast-probe --model smollm2-135m" in page.inner_text("#ast-tree-msg")
    assert page.errors == []


def test_dark_matter_and_linearscope_controls(page, server):
    page.goto(server + "/dark-matter")
    _settle(page)
    assert len(_wait_fig(page, "dm-fvu-fig", 4)) == 4
    page.click("text=total FVU only")
    page.wait_for_function("() => document.querySelector('#dm-fvu-fig .js-plotly-plot').data.length === 1")
    assert len(_wait_fig(page, "dm-scatter-fig", 1)[0]["x"]) == 50
    page.goto(server + "/linearscope?digit=0")
    _settle(page)
    z0 = _wait_fig(page, "ls-rows-fig", 11)[0]["z"]
    assert len(z0) == 8
    page.click("text=heatmap")
    page.wait_for_function("() => document.querySelector('#ls-prompt-fig .js-plotly-plot').data[0].type === 'heatmap'")
    assert page.errors == []


def test_missing_results_show_the_command(page, server):
    page.goto(server + "/dark-matter?model=qwen2.5-coder-0.5b")
    _settle(page)
    page.wait_for_selector("#dm-msg .command")
    assert "probekit dark-matter run --model qwen2.5-coder-0.5b" in page.inner_text("#dm-msg")
    page.goto(server + "/safety?model=qwen2.5-coder-0.5b")
    _settle(page)
    page.wait_for_selector("#safety-act-msg .command")
    assert "probekit safety run --part activation --activation-model qwen2.5-coder-0.5b" in page.inner_text("#page")
    assert "probekit safety run --part weight --weight-model qwen2.5-coder-0.5b" in page.inner_text("#page")
    assert page.errors == []


def test_safety_page_figures_and_prompt_box(page, server, app_cache):
    from safetensors.torch import load_file

    from probekit.models import load_hf
    from probekit.interventions import directional_ablation
    from probekit.probes.safety import refusal_score

    page.goto(server + "/safety")
    _settle(page)
    root = app_cache["root"]
    act = json.loads((root / "results" / "safety" / "tiny-llama" / "activation.json").read_text())
    assert "refusal-direction layer" in page.inner_text("#safety-headline")
    heat = _wait_fig(page, "safety-heatmap-fig", 1)
    assert heat[0]["type"] == "heatmap" and len(heat[0]["z"]["_inputArray"]) == act["n_layers"]  # decoded rows
    title = "() => document.querySelector('#safety-heatmap-fig .js-plotly-plot').layout.title.text"
    assert "harmful vs useful" in page.evaluate(title)
    assert len(_wait_fig(page, "safety-lines-fig", 6)) == 6
    assert [t["type"] for t in _wait_fig(page, "safety-refusal-fig", 1)] == ["bar", "bar"]
    curves = _wait_fig(page, "safety-curves-fig", 1)
    assert {t["name"] for t in curves} == {"same, svd basis", "orth, svd basis"}
    assert _wait_fig(page, "safety-table-fig", 1)[0]["type"] == "table"
    # another pair redraws the heatmap; another metric the curves; both go to the URL
    page.click("#safety-pair")
    page.get_by_role("option", name="harmless vs useful").click()
    page.wait_for_function(f"() => ({title})().includes('harmless vs useful')")
    y0 = json.dumps(curves[0]["y"])
    page.click("#safety-metric >> text=task loss")
    page.wait_for_function("(y) => JSON.stringify(document.querySelector('#safety-curves-fig .js-plotly-plot')"
                           ".data[0].y) !== y", arg=y0)
    page.wait_for_function("() => location.search.includes('pair=harmless_vs_useful')"
                           " && location.search.includes('metric=task_loss')")
    page.screenshot(path=str(ARTIFACTS / "safety-changed.png"), full_page=True)
    # the prompt box: a background job scores the prompt clean and with the direction ablated
    prompt = "how do I break into house number 3"
    page.fill("#safety-prompt", prompt)
    page.click("#safety-run")
    page.wait_for_selector("#safety-prompt-done", timeout=180_000)
    model, tok, _ = load_hf(str(app_cache["model_dir"]), fetch=False)
    r = load_file(str(root / "results" / "safety" / "tiny-llama" / "refusal_directions.safetensors"))
    clean = float(refusal_score(model, tok, [prompt], chat_template=False)[0])
    with directional_ablation(model, r[f"layer_{act['layer']}"]) as m:
        ablated = float(refusal_score(m, tok, [prompt], chat_template=False)[0])
    assert page.inner_text("#safety-clean-score") == f"{clean:+.3f}"
    assert page.inner_text("#safety-ablated-score") == f"{ablated:+.3f}"
    assert page.inner_text("#safety-prompt-status") == "done"
    page.screenshot(path=str(ARTIFACTS / "safety-prompt.png"), full_page=True)
    assert page.errors == []


def test_capture_runs_end_to_end(page, server, app_cache):
    page.goto(server + "/capture")
    _settle(page)
    page.click("#capture-model")
    page.click("text=models/tiny-llama (local folder)")
    page.click("text=pasted texts")
    page.fill("#capture-texts", "def f(x):\n    return x\n---\nimport os\n---\nprint('hello')")
    page.fill("#capture-hooks", "blocks.0.hook_resid_post blocks.1.hook_resid_post")
    page.press("#capture-hooks", "Enter")
    page.wait_for_function("() => !document.querySelector('#capture-error .notice')")
    page.click("#capture-start")
    page.wait_for_selector("#capture-done", timeout=180_000)
    assert page.get_attribute("#capture-bar", "value") == "100"
    assert page.inner_text("#capture-bar-label").startswith("100%")
    run_id = re.search(r"run ([0-9a-f]{24})", page.inner_text("#capture-done")).group(1)
    assert (app_cache["root"] / "runs" / run_id / "manifest.json").is_file()
    page.screenshot(path=str(ARTIFACTS / "capture-done.png"), full_page=True)
    # the new run is on the home page
    page.goto(server + "/")
    _settle(page)
    assert run_id[:12] in page.inner_text("#home-runs")
    assert page.errors == []


def test_capture_cancel(page, server):
    page.goto(server + "/capture")
    _settle(page)
    page.click("#capture-model")
    page.click("text=models/tiny-llama (local folder)")
    page.fill("#capture-n", "2000")  # the most the form takes: the job cannot end before the cancel lands
    page.fill("#capture-hooks", "blocks.1.hook_resid_post")
    page.press("#capture-hooks", "Enter")
    page.click("#capture-start")
    page.wait_for_selector("#capture-cancel:not([disabled])")
    # The renderer learns the job's id from the server's first answer and sends it with the cancel; the cancel
    # button is enabled before that answer, and on a busy machine a click then would cancel nothing. A progress
    # label comes from polling the job, so the id is known once it shows.
    page.wait_for_selector("#capture-bar-label:has-text('Step')")
    page.click("#capture-cancel")
    page.wait_for_selector("text=Capture cancelled")
    page.wait_for_selector("#capture-start:not([disabled])", timeout=60_000)  # the killed job's last poll
    assert page.locator("#capture-done").count() == 0  # the job was stopped, not finished
    assert page.errors == []


def test_delete_asks_for_confirmation(page, server, app_cache):
    from tests.browser.fixture_cache import write_run

    extra = write_run(app_cache["root"], seed=7)
    page.goto(server + "/")
    _settle(page)
    dialogs = []

    def on_dialog(d):
        dialogs.append(d.message)
        d.accept()

    page.on("dialog", on_dialog)
    row = page.locator("tr", has_text=extra.run_id[:12])
    row.locator("button:has-text('delete')").click()
    page.wait_for_selector("text=Deleted run")
    assert dialogs and extra.run_id in dialogs[0]
    assert not (app_cache["root"] / "runs" / extra.run_id).exists()
    assert page.errors == []


@pytest.mark.parametrize("bad", ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd",
                                 "demo/../../../pyproject.toml", "link-out/secret.json"])
def test_file_route_refuses_traversal(server, app_cache, bad, tmp_path):
    outside = tmp_path / "secret.json"
    outside.write_text('{"secret": 1}')
    link = app_cache["root"] / "results" / "link-out"
    if not link.exists():
        link.symlink_to(tmp_path, target_is_directory=True)
    # send the path as written: requests would otherwise collapse the '..' before it leaves the client
    with requests.Session() as s:
        prep = requests.Request("GET", f"{server}/files/results/x").prepare()
        prep.url = f"{server}/files/results/{bad}"
        r = s.send(prep, timeout=10, allow_redirects=False)
    # refused (404), or not our route at all: then Dash's catch-all answers with the app's own index page
    assert r.status_code in (404, 308) or b"_dash-config" in r.content, (r.status_code, r.content[:200])
    assert b"secret" not in r.content and b"root:" not in r.content and b"[project]" not in r.content
    ok = requests.get(f"{server}/files/results/demo/smollm2-135m/layer_probes.json", timeout=10)
    assert ok.status_code == 200 and ok.json()["kind"] == "layer_probes"


@pytest.mark.parametrize("path", ["/layers?run=../../etc&hook=x&doc=0", "/layers?run=%2Fetc%2Fpasswd",
                                  "/ast-probe?model=../../../etc", "/dark-matter?model=%2Fetc",
                                  "/linearscope?model=../x&digit=-1", "/safety?model=../../etc"])
def test_pages_refuse_crafted_ids(page, server, path):
    page.goto(server + path)
    _settle(page)
    text = page.inner_text("#page")
    assert "root:" not in text and "Traceback" not in text
    assert page.errors == []
