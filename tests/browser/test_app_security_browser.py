"""The app's request gate in headless Chromium: a same-origin delete through the UI works; a DNS-rebinding page,
a page of another origin and a raw request with a foreign Origin are refused by every state-changing callback
(delete, capture job, safety job) and leave the cache tree unchanged; the security headers let Dash and plotly
run (no CSP violation) while a foreign page cannot frame the app; a result page runs sandboxed."""

from __future__ import annotations

import http.server
import shutil
import threading
from urllib.parse import urlsplit

import pytest
import requests

from tests.browser.dash_payloads import job_bodies, tree

RECORD_CSP = ("window.__csp = []; document.addEventListener('securitypolicyviolation', "
              "e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));")
POST_JSON = ("async ([url, body]) => { const r = await fetch(url, {method: 'POST', body: JSON.stringify(body), "
             "headers: {'Content-Type': 'application/json'}}); return [r.status, await r.text()]; }")
POST_SIMPLE = ("([url, body]) => fetch(url, {method: 'POST', mode: 'no-cors', body: JSON.stringify(body), "
               "headers: {'Content-Type': 'text/plain'}}).catch(() => null)")


def _settle(page) -> None:
    page.wait_for_selector("#page > *")
    page.wait_for_function("() => !document.querySelector('[data-dash-is-loading=\"true\"]')")
    page.wait_for_load_state("networkidle")


@pytest.fixture(scope="module")
def other_origin():
    """A second loopback server (another port: another origin) answering every GET with the page in ``pages``."""
    pages: dict[str, str] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the http.server name)
            body = pages.get(self.path, "<html><body>other origin</body></html>").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", pages
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def victim(app_cache):
    """A run that only the refused requests could delete."""
    from tests.browser.fixture_cache import write_run

    return write_run(app_cache["root"], seed=17)


@pytest.fixture(scope="module")
def callbacks(server):
    return {d["output"]: d for d in requests.get(server + "/_dash-dependencies", timeout=30).json()}


def test_security_same_origin_delete_through_the_ui(page, server, app_cache):
    from tests.browser.fixture_cache import write_run

    extra = write_run(app_cache["root"], seed=13)
    page.goto(server + "/")
    _settle(page)
    page.on("dialog", lambda d: d.accept())
    page.locator("tr", has_text=extra.run_id[:12]).locator("button:has-text('delete')").click()
    page.wait_for_selector("text=Deleted run")
    assert not extra.path.exists()
    assert page.errors == []


@pytest.mark.parametrize("job", ["delete", "capture", "safety"])
def test_security_cross_origin_posts_are_refused(page, server, app_cache, victim, callbacks, other_origin, job):
    root, port = app_cache["root"], urlsplit(server).port
    body = job_bodies(callbacks, victim.run_id)[job]
    before = tree(root)

    # DNS rebinding: attacker.example now resolves to 127.0.0.1, so a page of attacker.example:<port> is
    # same-origin with the app; it can neither read the app nor post to it (its script runs in the refusal page)
    evil = f"http://attacker.example:{port}"
    read = page.goto(evil + "/files/results/demo/smollm2-135m/layer_probes.json")
    assert read.status == 403 and "layer_probes" not in page.content()
    status, text = page.evaluate(POST_JSON, ["/_dash-update-component", body])
    assert status == 403 and "Host" in text

    # a page of another origin posting a CORS-free request (a JSON one would stop at the preflight)
    page.goto(other_origin[0] + "/")
    with page.expect_response(lambda r: r.url.endswith("/_dash-update-component")) as answer:
        page.evaluate(POST_SIMPLE, [server + "/_dash-update-component", body])
    assert answer.value.status == 403

    # a raw request naming a foreign origin
    r = requests.post(server + "/_dash-update-component", json=body, timeout=30,
                      headers={"Origin": "http://attacker.example"})
    assert r.status_code == 403 and "Origin" in r.text

    assert tree(root) == before and victim.path.is_dir()


def test_security_headers_let_dash_and_plotly_run(page, server):
    page.add_init_script(RECORD_CSP)
    for path, graph in [("/linearscope", "ls-rows-fig"), ("/safety", "safety-heatmap-fig"),
                        ("/layers", "layers-acc-fig")]:
        resp = page.goto(server + path)
        assert resp.headers["x-frame-options"] == "DENY" and resp.headers["x-content-type-options"] == "nosniff"
        assert "script-src 'self' 'sha256-" in resp.headers["content-security-policy"]
        _settle(page)
        page.wait_for_function(f"() => {{ const g = document.querySelector('#{graph} .js-plotly-plot');"
                               " return g && g.data && g.data.length > 0 && g.querySelector('.main-svg'); }")
        assert page.evaluate("() => window.__csp") == [], path
    assert page.errors == []


def test_security_app_cannot_be_framed(page, server, other_origin):
    url, pages = other_origin
    pages["/frame"] = f"<html><body><iframe id='f' src='{server}/'></iframe></body></html>"
    page.goto(url + "/frame")
    page.wait_for_timeout(1500)
    child = [f for f in page.frames if f != page.main_frame]
    assert child and "probekit" not in child[0].content()  # the frame stays empty: X-Frame-Options / frame-ancestors


def test_security_result_page_runs_sandboxed(page, server, app_cache):
    import plotly.graph_objects as go

    from probekit.html_page import write_figures_page

    folder = app_cache["root"] / "results" / "demo" / "sandbox-check"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        write_figures_page(folder / "page.html", [go.Figure(go.Heatmap(z=[[1, 2], [3, 4]]))], plotlyjs="directory")
        page.add_init_script(RECORD_CSP)
        page.goto(server + "/files/results/demo/sandbox-check/page.html")
        page.wait_for_selector(".js-plotly-plot .main-svg")  # plotly.js loads and draws inside the sandbox
        assert page.evaluate("() => window.origin") == "null"  # an opaque origin, not the app's
        assert page.evaluate("() => window.__csp") == []
        # it cannot talk to the app at all (connect-src 'none'); were it let through, its Origin 'null' is refused
        assert page.evaluate(POST_SIMPLE, [server + "/_dash-update-component", {"output": "x"}]) is None
        assert any(v.startswith("connect-src") for v in page.evaluate("() => window.__csp"))
    finally:
        shutil.rmtree(folder)
