"""Every drawn figure can be read: measured in headless Chromium at two window widths on the fixture cache.

For each figure of each page: the plot area (the union of the subplots' drag rectangles, ``.nsewdrag``) is at
least 250 px high and at least 60 % of the figure's height, the legend lies inside the figure, cartesian figures
title an x and a y axis, heat maps title their colour bar, and no two text labels of the AST tree overlap. The
pages run under the app's Content-Security-Policy: a refused script, style or image would show as a console error,
and there is none. Screenshots of every page at both widths go to ``artifacts/``.
"""

from __future__ import annotations

import pytest

from tests.browser.conftest import ARTIFACTS

WIDTHS = (1366, 1920)
#: page (with the query that selects a result holding every figure) -> graph ids that must be drawn
PAGES = {
    "/layers": ["layers-acc-fig", "layers-stats-fig"],
    "/ast-probe?model=smollm2-135m&snippet=3": ["ast-layer-fig", "ast-k-fig", "ast-recall-fig", "ast-tree-fig"],
    "/dark-matter": ["dm-fvu-fig", "dm-r2-fig", "dm-ce-fig", "dm-scatter-fig"],
    "/linearscope?digit=0": ["ls-rows-fig", "ls-share-fig", "ls-prompt-fig"],
    "/safety": ["safety-heatmap-fig", "safety-lines-fig", "safety-refusal-fig", "safety-curves-fig",
                "safety-table-fig"],
}
MIN_PLOT_PX = 250
MIN_PLOT_SHARE = 0.6

# One measurement per figure, from the DOM plotly drew and its full layout.
_MEASURE = """(id) => {
  const g = document.querySelector('#' + id + ' .js-plotly-plot');
  const box = (el) => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const fig = box(g.querySelector('.main-svg'));
  const drags = [...g.querySelectorAll('.nsewdrag')].map(box).filter(b => b[3] - b[1] > 0);
  const plot = drags.length ? [Math.min(...drags.map(b => b[0])), Math.min(...drags.map(b => b[1])),
                               Math.max(...drags.map(b => b[2])), Math.max(...drags.map(b => b[3]))] : null;
  const legend = g.querySelector('.legend');
  const fl = g._fullLayout;
  const titled = (prefix) => Object.keys(fl).filter(k => k.startsWith(prefix) && fl[k] && fl[k].visible
      && fl[k].showticklabels).map(k => (fl[k].title && fl[k].title.text) || '');
  const colorbars = [...g.querySelectorAll('.colorbar')].map(c => {
      const t = c.querySelector('.cbtitle text'); return t ? t.textContent.trim() : ''; });
  return {fig, plot, legend: legend ? box(legend) : null, x_titles: titled('xaxis'), y_titles: titled('yaxis'),
          colorbars, n_traces: (g.data || []).length};
}"""

_TREE_LABELS = """() => {
  const g = document.querySelector('#ast-tree-fig .js-plotly-plot');
  return [...g.querySelectorAll('.textpoint text, .xtick text')].filter(t => t.textContent.trim())
    .map(t => { const r = t.getBoundingClientRect(); return [t.textContent, r.left, r.top, r.right, r.bottom]; });
}"""


def _overlap(a, b, tol: float = 0.5) -> bool:
    return min(a[3], b[3]) - max(a[1], b[1]) > tol and min(a[4], b[4]) - max(a[2], b[2]) > tol


def _wait_drawn(page, graph_id: str) -> None:
    page.wait_for_function("(id) => { const g = document.querySelector('#' + id + ' .js-plotly-plot');"
                           " return g && g.data && g.data.length > 0 && g._fullLayout; }", arg=graph_id)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("path", list(PAGES))
def test_every_figure_is_readable(browser, server, path, width):
    ctx = browser.new_context(viewport={"width": width, "height": 1000})
    page = ctx.new_page()
    page.set_default_timeout(60_000)
    errors = []  # console errors (CSP refusals among them) and uncaught page errors
    page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    try:
        page.goto(server + path)
        page.wait_for_selector("#page > *")
        for gid in PAGES[path]:
            _wait_drawn(page, gid)
        page.wait_for_function("() => !document.querySelector('[data-dash-is-loading=\"true\"]')")
        page.wait_for_timeout(500)  # plotly's responsive relayout after the last draw
        ARTIFACTS.mkdir(exist_ok=True)
        name = path.split("?")[0].strip("/") or "home"
        page.screenshot(path=str(ARTIFACTS / f"figures-{name}-{width}.png"), full_page=True)
        problems = []
        for gid in PAGES[path]:
            m = page.evaluate(_MEASURE, gid)
            fig_h = m["fig"][3] - m["fig"][1]
            if m["plot"] is not None:
                plot_h = m["plot"][3] - m["plot"][1]
                if plot_h < MIN_PLOT_PX or plot_h < MIN_PLOT_SHARE * fig_h:
                    problems.append(f"{gid}: plot area {plot_h:.0f} px of a {fig_h:.0f} px figure")
                if not any(m["x_titles"]) or not any(m["y_titles"]):
                    if m["x_titles"] or m["y_titles"]:  # image grids hide every axis
                        problems.append(f"{gid}: untitled axes (x {m['x_titles']}, y {m['y_titles']})")
            if m["legend"] is not None:
                lg, fg = m["legend"], m["fig"]
                if lg[0] < fg[0] - 1 or lg[1] < fg[1] - 1 or lg[2] > fg[2] + 1 or lg[3] > fg[3] + 1:
                    problems.append(f"{gid}: legend {[round(v) for v in lg]} outside the figure "
                                    f"{[round(v) for v in fg]}")
            if any(not t for t in m["colorbars"]):
                problems.append(f"{gid}: a colour bar without a title")
        if "ast-tree-fig" in PAGES[path]:
            labels = page.evaluate(_TREE_LABELS)
            assert labels, "the AST tree drew no text labels"
            clashes = [(a[0], b[0]) for i, a in enumerate(labels) for b in labels[i + 1:] if _overlap(a, b)]
            if clashes:
                problems.append(f"ast-tree-fig: {len(clashes)} overlapping label pairs, e.g. {clashes[:5]}")
        assert errors == []  # first: a refused style or script also explains a broken layout
        assert not problems, "\n".join(problems)
    finally:
        ctx.close()
