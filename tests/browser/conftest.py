"""Real-browser fixtures: Debian Chromium driven by Playwright, and the app served by `probekit app` in a
subprocess on a free loopback port over a temporary cache root."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).parent / "artifacts"
INSTALL_HINT = ("Chromium is needed for the browser tests: `apt-get install -y chromium` (Debian/Ubuntu) and "
                "`pip install playwright`, or set PROBEKIT_CHROMIUM to a Chromium binary. "
                "(`playwright install` is not needed.)")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
               # a DNS-rebinding page: attacker.example resolves to the loopback address (test_app_security_browser)
               "--host-resolver-rules=MAP attacker.example 127.0.0.1"]


def chromium_path() -> str:
    """Path of a Chromium binary: $PROBEKIT_CHROMIUM, /usr/bin/chromium, or installed with apt when root.

    Fails (never skips) with the install instructions when none can be found.
    """
    for cand in (os.environ.get("PROBEKIT_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if cand and Path(cand).is_file():
            return cand
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update"], check=False, env=env, capture_output=True)
        res = subprocess.run(["apt-get", "install", "-y", "chromium"], env=env, capture_output=True, text=True)
        if res.returncode == 0 and Path("/usr/bin/chromium").is_file():
            return "/usr/bin/chromium"
        pytest.fail(f"apt-get install -y chromium failed:\n{res.stderr[-2000:]}\n{INSTALL_HINT}")
    pytest.fail(INSTALL_HINT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def app_cache(tmp_path_factory):
    from tests.browser.fixture_cache import populate, write_views

    from tests.browser.fixture_cache import write_report

    root = tmp_path_factory.mktemp("app-cache")
    info = populate(root, tiny_model=True, safety=True)
    reports = tmp_path_factory.mktemp("reports")  # outside the cache root, as ./reports is
    write_report(reports)
    info.update(write_views(root))  # token, latent and attention views
    from tests.browser.fixture_cache import write_probe_files

    info.update(write_probe_files(root))  # the Layers page's probe of one layer
    return dict(root=root, reports=reports, **info)


@pytest.fixture(scope="session")
def server(app_cache):
    """`probekit app` on a free port; yields its base URL."""
    port = _free_port()
    repo = Path(__file__).resolve().parents[2]
    log = open(app_cache["root"] / "server.log", "w")
    env = dict(os.environ, PYTHONPATH=str(repo), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "probekit", "app", "--port", str(port), "--cache-root",
                             str(app_cache["root"]), "--reports", str(app_cache["reports"])],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(repo))
    url = f"http://127.0.0.1:{port}"
    import requests

    deadline = time.time() + 120
    while True:
        try:
            if requests.get(url + "/", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("the app did not start:\n" + (app_cache["root"] / "server.log").read_text()[-3000:])
        time.sleep(0.3)
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `pip install playwright` (or `pip install -e .[browser]`). "
                    + INSTALL_HINT)
    exe = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=LAUNCH_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh page that records console errors and uncaught page errors in ``page.errors``."""
    ARTIFACTS.mkdir(exist_ok=True)
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    pg.errors = []
    pg.on("console", lambda m: pg.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.errors.append(f"pageerror: {e}"))
    pg.set_default_timeout(30_000)
    yield pg
    ctx.close()
