"""The LinearScope super-resolution and image-to-image payloads load, draw and headline through ``results``."""

from __future__ import annotations

import pytest

from probekit import results


@pytest.mark.parametrize("kind", ["linearscope_sr", "linearscope_i2i"])
def test_new_kinds_load_draw_and_headline_with_intervals(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path / "cache"))
    if kind == "linearscope_sr":
        from probekit.linearscope_sr_run import SRAnalysisConfig, run_sr_analysis

        res = run_sr_analysis(SRAnalysisConfig(n_test=4, steps=10, width=4, ks=(1, 8), k_headline=8, n_boot=100,
                                               out=str(tmp_path / "out")))
        name = "sr-cnn.json"
    else:
        from probekit.linearscope_i2i_run import I2IAnalysisConfig, run_i2i_analysis

        res = run_i2i_analysis(I2IAnalysisConfig(n_test=3, steps=5, width=4, n_boot=50, out=str(tmp_path / "out")))
        name = "denoise-cnn.json"
    payload = results.load(tmp_path / "out" / name)
    assert payload["kind"] == kind
    figs = results.figures(payload)
    assert [f.to_plotly_json()["layout"].get("title") for f in figs] == \
        [f.to_plotly_json()["layout"].get("title") for f in res.figures()]
    head = results.headline(payload)
    numbers = {k: v for k, v in head.items() if k != "verdict"}
    assert numbers and all(f"(n={res.n} test patches)" in v for v in numbers.values())
    assert all(v.endswith("too few to conclude") for v in numbers.values())  # 3–4 patches < 30
