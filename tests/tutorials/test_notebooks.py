"""The tutorials: stored clean (no outputs, reproducible from tutorials/_build.py), and every one runs.

The execution test runs each notebook in a fresh kernel of *this* interpreter (a kernelspec written on the fly
under a temporary JUPYTER_PATH, so it works on a fresh clone after ``pip install -e '.[dev]'`` whatever kernels
the machine has), from the ``tutorials/`` folder as Jupyter would, and fails on the first cell error, naming the
notebook and the cell. It then checks that every figure it displayed shows everywhere: the interactive plotly
mimetype, a PNG, and an HTML entry that holds the PNG (what nbconvert HTML renders where no script runs).

The PNG is drawn by kaleido in a local Chromium, found as the browser tests find theirs (a missing one fails with
the install hint, never skips).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[2] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT = 900
KERNEL = "probekit-tutorials"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
IMAGE_MIMES = ("image/png", "image/svg+xml")


def figure_output_problems(nb) -> list[str]:
    """What keeps the executed notebook's figures from showing everywhere (empty when nothing does).

    A figure output is a display with the plotly mimetype, or with an HTML entry that draws with plotly.js; it
    must carry the plotly mimetype, an image mimetype, and (when it has HTML) the image inside that HTML. A
    notebook with a cell that calls ``.show(`` must have displayed at least one figure (not every such cell: one
    draws saved results only when there are some).
    """
    problems, n_figures = [], 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        figures = [o for o in cell.get("outputs", []) if o.get("output_type") in ("display_data", "execute_result")
                   and (PLOTLY_MIME in o.get("data", {}) or "plotly" in str(o.get("data", {}).get("text/html", "")))]
        n_figures += len(figures)
        for k, o in enumerate(figures):
            data = o["data"]
            missing = [m for m in (PLOTLY_MIME,) if m not in data]
            if not any(m in data for m in IMAGE_MIMES):
                missing.append(" or ".join(IMAGE_MIMES))
            if "image/png" in data:
                try:
                    if not base64.b64decode(data["image/png"]).startswith(b"\x89PNG"):
                        missing.append("a PNG in image/png")
                except ValueError:
                    missing.append("base64 in image/png")
            if "text/html" in data and "data:image/" not in str(data["text/html"]):
                missing.append("the image inside text/html (nbconvert HTML renders text/html)")
            if missing:
                problems.append(f"cell {i}, figure {k}: no {', '.join(missing)} (has {sorted(data)})")
    if n_figures == 0 and any(c.cell_type == "code" and ".show(" in c.source for c in nb.cells):
        problems.append("cells call .show() but no figure was displayed")
    return problems


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5, f"expected the tutorial notebooks under {TUTORIALS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_clean(path):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} carry outputs or execution counts; notebooks are committed "
                       "without them: run `python tutorials/_build.py` to rewrite them")


def test_build_script_reproduces_the_notebooks(tmp_path):
    pytest.importorskip("nbformat")
    spec = importlib.util.spec_from_file_location("tutorials_build", TUTORIALS / "_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    built = {p.name: p.read_bytes() for p in build.main(tmp_path)}
    assert sorted(built) == [p.name for p in NOTEBOOKS], "tutorials/*.ipynb and _build.py list different notebooks"
    stale = [name for name, data in built.items() if (TUTORIALS / name).read_bytes() != data]
    assert not stale, f"{stale} differ from what tutorials/_build.py writes: edit _build.py and run it"


@pytest.fixture(scope="session")
def kernel_name(tmp_path_factory):
    """A kernelspec that starts ipykernel with this interpreter, found through a temporary JUPYTER_PATH."""
    pytest.importorskip("ipykernel")
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "probekit tutorials", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(root)] + ([old] if old else []))
    yield KERNEL
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


@pytest.mark.integration
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, kernel_name, chromium_for_figures, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(TUTORIALS)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as e:
        # the failing cell: the one with an error output, or (timeout) the first code cell left unexecuted
        code = [c for c in nb.cells if c.cell_type == "code"]
        failing = next((c for c in code if any(o.get("output_type") == "error" for o in c.get("outputs", []))),
                       None) or next((c for c in code if c.get("execution_count") is None), None)
        source = failing.source if failing is not None else "(cell not found)"
        pytest.fail(f"{path.name}: a cell failed.\n--- cell source ---\n{source}\n--- error ---\n{e}",
                    pytrace=False)
    print(f"\n{path.name}: executed in {time.perf_counter() - t0:.0f} s")
    problems = figure_output_problems(nb)
    assert not problems, (f"{path.name}: figures that do not show everywhere (call probekit.notebook.setup() in "
                          "the first cell, see tutorials/_build.py):\n" + "\n".join(problems))
    # nbconvert's HTML (what nbviewer serves) holds every figure's image
    import nbconvert

    body, _ = nbconvert.HTMLExporter().from_notebook_node(nb)
    pngs = [o["data"]["image/png"] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
    absent = sum(png not in body for png in pngs)
    assert not absent, f"{path.name}: {absent} of {len(pngs)} figure images are not in nbconvert's HTML"
    (tmp_path / path.name).write_text(nbformat.writes(nb), encoding="utf-8")
    (tmp_path / path.with_suffix(".html").name).write_text(body, encoding="utf-8")
    print(f"{path.name}: {len(pngs)} figures; executed notebook and its HTML in {tmp_path}")


FIGURE_CELLS = [
    "import plotly.graph_objects as go\n"
    "fig = go.Figure(go.Bar(x=['a', 'b'], y=[2, 1]))\n"
    "fig.update_layout(title='bars </script> & co', xaxis_title='class', yaxis_title='count')\n"
    "fig.show()",
    "go.Figure(go.Heatmap(z=[[1, 2], [3, 4]], colorbar_title='value'))  # a figure as the cell's value",
]


def _execute(cells, kernel_name):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell(c) for c in cells])
    nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=300).execute()
    return nb


def test_figures_carry_an_image_fallback(kernel_name, chromium_for_figures, tmp_path):
    """The tutorials' figure set-up on two small figures: both mimetypes in every output, the PNG in nbconvert's
    HTML, shown by a browser with no network (image) and with plotly.js reachable (interactive, image gone)."""
    nbformat = pytest.importorskip("nbformat")
    try:
        import nbconvert
    except ImportError:
        pytest.fail("nbconvert is not installed: `pip install -e .[dev]`")

    # without the set-up (the tutorials before it): plotly's own renderer, no image
    assert figure_output_problems(_execute(FIGURE_CELLS, kernel_name)), "the check finds nothing to object to"

    nb = _execute(["from probekit.notebook import setup\nsetup()"] + FIGURE_CELLS, kernel_name)
    assert figure_output_problems(nb) == []
    pngs = [o["data"]["image/png"] for c in nb.cells for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 2

    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(pngs[0])))
    assert img.size == (700, 500)  # plotly's default layout size, scale 1
    assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 3, "the PNG is blank"

    body, _ = nbconvert.HTMLExporter().from_notebook_node(nb)
    assert sum(png in body for png in pngs) == 2, "nbconvert's HTML lacks a figure's image"
    page = tmp_path / "figures.html"
    page.write_text(body, encoding="utf-8")
    nbformat.write(nb, tmp_path / "figures.ipynb")

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `pip install -e .[browser]`")
    import plotly

    plotly_js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"

    def check_in_browser():
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_for_figures, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            try:
                offline = browser.new_page(viewport={"width": 1100, "height": 1400})
                offline.route("**/*", lambda r: r.continue_() if r.request.url.startswith("file:") else r.abort())
                offline.goto(page.as_uri())
                offline.wait_for_timeout(1000)
                imgs = offline.locator("img.probekit-static")
                assert imgs.count() == 2
                sizes = imgs.evaluate_all("els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])")
                assert sizes == [[True, 700, 500]] * 2, f"the fallback images did not load: {sizes}"
                assert offline.locator(".probekit-figure .js-plotly-plot").count() == 0

                def cdn_from_disk(r):  # plotly.js from the CDN is served from disk; other remote requests fail
                    if "cdn.plot.ly" in r.request.url:
                        r.fulfill(path=str(plotly_js), content_type="application/javascript")
                    elif r.request.url.startswith("file:"):
                        r.continue_()
                    else:
                        r.abort()

                online = browser.new_page(viewport={"width": 1100, "height": 1400})
                online.route("**/*", cdn_from_disk)
                online.goto(page.as_uri())
                online.locator(".probekit-figure .js-plotly-plot").nth(1).wait_for(timeout=30_000)
                assert online.locator(".probekit-figure .js-plotly-plot").count() == 2
                assert online.locator("img.probekit-static").count() == 0

                # where require.js is on the page (nbconvert's templates load it from a CDN): a minimal AMD loader
                # that, like require.js with plotly.js 3, hands the callback no module value
                amd = browser.new_page(viewport={"width": 1100, "height": 1400})
                amd.add_init_script("""
                    window.requirejs = function (deps, ok, err) {
                      var s = document.createElement("script");
                      s.src = window.requirejs.paths[deps[0]] + ".js";
                      s.onload = function () { ok(undefined); }; s.onerror = err;
                      document.head.appendChild(s);
                    };
                    window.requirejs.config = function (c) { window.requirejs.paths = c.paths; };
                    Object.defineProperty(window, "requirejs", {writable: false});""")
                amd.route("**/*", cdn_from_disk)
                amd.goto(page.as_uri())
                amd.locator(".probekit-figure .js-plotly-plot").nth(1).wait_for(timeout=30_000)
                assert amd.locator("img.probekit-static").count() == 0
            finally:
                browser.close()

    # Playwright's sync API refuses to start inside a running asyncio loop, which the browser tests' session-wide
    # Playwright keeps in this thread when the suites run together: drive this browser from a thread of its own.
    failure: list[BaseException] = []

    def run():
        try:
            check_in_browser()
        except BaseException as e:  # re-raised below, in the test's thread
            failure.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if failure:
        raise failure[0]
