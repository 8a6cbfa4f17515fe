"""Jupyter-facing reprs: short text reprs and HTML tables that carry the real numbers."""

from __future__ import annotations

from html.parser import HTMLParser

import torch

from probekit.html_page import html_table
from probekit.probes.ast_probe import ASTProbeResult
from probekit.probes.linear import LayerProbeResult


class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells, self._in = [], False

    def handle_starttag(self, tag, attrs):
        self._in = tag in ("td", "th")

    def handle_endtag(self, tag):
        self._in = False

    def handle_data(self, data):
        if self._in:
            self.cells.append(data)


def _cells(html: str) -> list[str]:
    p = _Cells()
    p.feed(html)
    return p.cells


def test_html_table_escapes_and_rounds():
    cells = _cells(html_table([{"a": 0.123456, "b": "<x>"}, {"a": 2, "b": "y"}]))
    assert cells == ["a", "b", "0.123", "<x>", "2", "y"]
    assert "&lt;x&gt;" in html_table([{"b": "<x>"}])


def test_ast_probe_result_table():
    r = ASTProbeResult(layers=["embed", "5"], precision=[0.3, 0.6], recall=[0.4, 0.7], f1=[0.35, 0.65],
                       c_accuracy=[0.8, 0.9], u_accuracy=[0.99, 0.99], d_order_accuracy=[0.7, 0.8],
                       orthogonality=[0.01, 0.02], k=8, n_snippets=10, controls={"random-init model": [0.3, 0.4]})
    assert "best_layer='5'" in repr(r) and "best_f1=0.650" in repr(r)
    cells = _cells(r._repr_html_())
    assert cells[:2] == ["layer", "F1"] and "random-init model" in cells
    assert cells[cells.index("5") + 1] == "0.65"


def test_layer_probe_result_table():
    r = LayerProbeResult(task="t", kind="logistic", metric="accuracy", layers=["embed", "0"], train_score=[0.6, 0.9],
                         test_score=[0.5, 0.8], majority_baseline=0.2, random_feature_control=[0.2, 0.21],
                         token_identity_control=0.4)
    assert "best_layer='0'" in repr(r)
    html = r._repr_html_()
    assert "majority 0.200, token identity 0.400" in html
    assert _cells(html)[4:6] == ["embed", "0.5"]


def test_run_repr(tiny_llama, tmp_path):
    from probekit.cache import ActivationCache
    from probekit.capture import CaptureConfig

    bridge, tok = tiny_llama
    run = ActivationCache(tmp_path).capture(bridge, ["ab", "cde"], CaptureConfig(hooks=["blocks.0.hook_resid_post"],
                                                                                 positions="all"), tokenizer=tok)
    text = repr(run)
    assert text.startswith(f"Run({run.run_id[:12]}") and "complete" in text and f"rows={run.n_rows:,}" in text
    cells = _cells(run._repr_html_())
    assert "blocks.0.hook_resid_post" in cells and str(tuple(run.shape("blocks.0.hook_resid_post"))) in cells
    assert torch.is_tensor(run.load("blocks.0.hook_resid_post"))


def test_sae_and_dark_matter_reprs():
    from probekit.probes.dark_matter import DarkMatterResult
    from probekit.probes.sae import SAEMetrics

    m = SAEMetrics(fvu=0.2, explained_variance=0.8, l0=32.0, dead_fraction=0.01, mse=1.5, n_tokens=100)
    assert _cells(m._repr_html_())[:2] == ["fvu", "explained_variance"]
    r = DarkMatterResult(n_train=10, n_test=5, d_in=4, fit_intercept=False, fvu=0.3, fvu_linear=0.1,
                         fvu_nonlinear=0.19, fvu_cross=0.01, r2_error_vector=0.5, r2_error_vector_train=0.52,
                         r2_error_norm_sq=0.3, r2_error_norm=0.7, label="w")
    cells = _cells(r._repr_html_())
    assert cells[cells.index("R² of e from x") + 1] == "0.5"


def test_capture_result_repr(tiny_llama):
    from probekit.capture import CaptureConfig, capture

    bridge, tok = tiny_llama
    res = capture(bridge, ["abc", "de"], CaptureConfig(hooks=["blocks.0.hook_resid_post"], positions="all"),
                  tokenizer=tok)
    text = repr(res)
    assert text.startswith("CaptureResult(2 docs") and "'blocks.0.hook_resid_post': (" in text
    assert "config" not in text  # the whole config no longer floods notebook output


def test_safety_result_reprs_are_short_and_tables_hold_the_numbers():
    from probekit.probes.safety import ActivationOverlapResult, LayerSelection, RefusalResult
    from probekit.probes.weight_space import WeightSpaceResult

    o = ActivationOverlapResult([3, 4], [0.5, 0.9], [[0.25, 0.5], [0.75, 1.0]], [[1, 2], [3, 4]], [[1, 2], [3, 4]],
                                [[0.01, 0.02], [0.03, 0.04]], [64, 64], 10, 12, names=("harmful", "useful"))
    assert "harmful vs useful" in repr(o) and "0.625" in repr(o)  # mean MSO
    assert "0.750 (0.030)" in _cells(o._repr_html_())
    r = RefusalResult(["baseline", "ablation"], ["harmful"], {"baseline": {"harmful": 0.75}, "ablation":
                      {"harmful": 0.0}}, {"baseline": {"harmful": 1.5}, "ablation": {"harmful": -3.0}},
                      {"baseline": {"harmful": ["x" * 500]}, "ablation": {"harmful": ["y" * 500]}}, 18, 2.0)
    assert len(repr(r)) < 200 and "0.75" in repr(r) and "0.00" in repr(r)
    assert _cells(r._repr_html_())[-3:] == ["ablation", "0", "-3"]
    sel = LayerSelection([6, 8], -1.2, -3.1, [-0.9, -3.7], [-3.2, -4.0], [0.05, 0.4], None, [True, True], 8, True)
    assert "layer=8" in repr(sel) and "-3.70" in repr(sel)
    assert "0.4" in _cells(sel._repr_html_())
    ws = WeightSpaceResult([{"norm_u": 2.0}], [{"basis": "svd", "fraction": 0.5, "sq_norm_upar": 1.0}])
    assert "f=0.5: 0.250" in repr(ws) and "0.25" in _cells(ws._repr_html_())
