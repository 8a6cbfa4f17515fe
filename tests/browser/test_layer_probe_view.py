"""The Layers page's probe of one layer in headless Chromium: typed text → per-token predicted classes (colour per
class, hover: class and probability), the confusion matrix (titled axes and colour bar, a readable height) and the
misclassified test tokens in context; saved at 1366 and 1920 px wide to artifacts/."""

from __future__ import annotations

from tests.browser.test_app_browser import _wait_fig
from tests.browser.test_example_views import _graph_height, _layout, _shots, typed_tokens


def test_probe_on_typed_text_confusion_and_errors(page, server):
    text = "def add(a, b):\n    return a + b"
    spans = typed_tokens(page, server + "/layers?model=tiny-llama&probe=1", "#layers-probe-text",
                         "#layers-probe-go", "#layers-probe-tokens", text)
    assert len(spans) == len(text.encode()) + 1  # byte tokens + BOS
    labels = [s.get_attribute("data-label") for s in spans]
    assert set(labels) <= {"letter", "space", "punct"} and len(set(labels)) >= 2
    colours = {s.evaluate("e => getComputedStyle(e).backgroundColor") for s in spans}
    assert len(colours) == len(set(labels)), "one colour per predicted class"
    title = spans[3].get_attribute("title")
    assert "token 'f'" in title and "predicted" in title and "p = " in title
    assert "⏎" in page.inner_text("#layers-probe-tokens") and "·" in page.inner_text("#layers-probe-tokens")
    page.wait_for_function("() => location.search.includes('fwd=') && location.search.includes('probe=1')")

    _wait_fig(page, "layers-probe-confusion")
    lay = _layout(page, "layers-probe-confusion")
    assert lay["xaxis"]["title"]["text"] == "predicted class" and lay["yaxis"]["title"]["text"] == "true class"
    assert page.evaluate("() => document.querySelector('#layers-probe-confusion .js-plotly-plot').data[0]"
                         ".colorbar.title.text")
    assert _graph_height(page, "layers-probe-confusion") >= 250
    page.wait_for_selector("#layers-probe-wrong tbody tr")
    row = page.query_selector("#layers-probe-wrong tbody tr")
    assert row.query_selector("mark") is not None  # the token highlighted in its context
    cells = [c.inner_text() for c in row.query_selector_all("td")]
    assert cells[3] != cells[4] and cells[3] in {"letter", "space", "punct"}
    assert "Traceback" not in page.content() and page.errors == []
    page.query_selector("#layers-probe-layer").scroll_into_view_if_needed()
    _shots(page, "layers-probe")
