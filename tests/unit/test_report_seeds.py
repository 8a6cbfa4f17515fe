"""The seeds report (configs/seeds.yaml) end to end at its ``tiny`` scale on tiny random-init models: one section
per paper with its claims table, a finding sentence, every figure's axes and colour bars titled."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from probekit.cli import main
from probekit.report import STAGE_TITLES

SEEDS = Path(__file__).resolve().parents[2] / "configs" / "seeds.yaml"


def page_figures(text: str) -> list[tuple[list, dict]]:
    """(data, layout) of every ``Plotly.newPlot`` call in an HTML page, parsed from the page's JSON."""
    dec = json.JSONDecoder()
    out = []
    for m in re.finditer(r'Plotly\.newPlot\(\s*"[^"]*",\s*', text):
        data, end = dec.raw_decode(text, m.end())
        rest = re.match(r"\s*,\s*", text[end:])
        layout, _ = dec.raw_decode(text, end + rest.end())
        out.append((data, layout))
    return out


def _title(obj: dict | None) -> str:
    t = (obj or {}).get("title")
    if isinstance(t, dict):
        t = t.get("text")
    return (t or "").strip()


_NO_AXES = {"table", "pie", "sunburst", "treemap", "sankey", "indicator", "parcoords", "parcats"}
_SCALED = {"heatmap", "contour", "histogram2d", "histogram2dcontour", "surface"}


def untitled(data: list, layout: dict) -> list[str]:
    """What lacks a title in one figure: each visible cartesian axis that a trace draws on, and each colour bar."""
    bad = []
    for tr in data:
        kind = tr.get("type", "scatter")
        if kind in _NO_AXES:
            continue
        for ax in ("x", "y"):
            ref = tr.get(f"{ax}axis", ax)
            name = f"{ax}axis" + ref[1:]
            axis = layout.get(name, {})
            if axis.get("visible") is False or axis.get("showticklabels") is False:
                continue
            if not _title(axis):
                bad.append(f"{name} of a {kind} trace ({_title(layout) or 'untitled figure'})")
        scaled = kind in _SCALED or "colorscale" in (tr.get("marker") or {})
        if scaled and tr.get("showscale", True) is not False and (tr.get("marker") or {}).get("showscale", True):
            ca = tr.get("coloraxis") or (tr.get("marker") or {}).get("coloraxis")
            bar = (layout.get(ca, {}) if ca else tr if kind in _SCALED else tr["marker"]).get("colorbar")
            if kind not in _SCALED and not ca and not (tr.get("marker") or {}).get("showscale"):
                continue  # a colourscale on markers draws no bar unless showscale is set
            if not _title(bar):
                bad.append(f"colour bar of a {kind} trace ({_title(layout) or 'untitled figure'})")
    return sorted(set(bad))


def test_untitled_finds_missing_titles():
    """The checker itself can fail: an untitled axis and colour bar are caught, titled ones pass."""
    data = [{"type": "heatmap", "z": [[1]]}]
    assert len(untitled(data, {"xaxis": {"title": {"text": "x"}}})) == 2  # y axis and colour bar
    data[0]["colorbar"] = {"title": {"text": "value"}}
    assert untitled(data, {"xaxis": {"title": {"text": "x"}}, "yaxis": {"title": {"text": "y"}}}) == []


def test_seeds_report_tiny_end_to_end(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path / "cache"))
    cfg = yaml.safe_load(SEEDS.read_text())
    assert set(cfg["probes"]) == {"ast_probe", "dark_matter", "safety_activation", "linearscope", "linearscope_sr",
                                  "linearscope_i2i"}
    cfg["model"] = str(tiny_dir["llama"])
    cfg["probes"]["safety_activation"]["model"] = str(tiny_dir["llama"])
    cfg["out"] = str(tmp_path / "reports")
    path = tmp_path / "seeds.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["report", str(path), "--scale", "tiny"]) == 0
    folder = tmp_path / "reports" / "seeds-tiny"
    text = (folder / "index.html").read_text()
    metrics = json.loads((folder / "metrics.json").read_text())

    # sections titled in words, each opening with a finding and (for the four papers) a claims table
    for probe in cfg["probes"]:
        assert f"<h2 id='{probe}'>{STAGE_TITLES[probe]}" in text.replace("&#x27;", "'").replace("&amp;", "&") \
            or f"id='{probe}'" in text
        assert metrics["stages"][probe]["title"] == STAGE_TITLES[probe]
        assert metrics["stages"][probe]["claims"], probe
    assert text.count("<p class='finding'>") == len(cfg["probes"])
    assert text.count("<table class='claims'>") == len(cfg["probes"])
    assert "<footer id='timings'>" in text and not re.search(r"</h2><p>\d+ s", text)

    # AST-Probe: per-snippet F1 stored, its mean is the published per-layer F1, rows carry n and a CI
    ast = json.loads(next((folder / "ast_probe").rglob("ast_probe.json")).read_text())
    per = ast["per_snippet_f1"]
    for layer_f1, f1 in zip(per["trained"], ast["result"]["f1"]):
        assert abs(sum(layer_f1) / len(layer_f1) - f1) < 1e-9
    assert len(per["random_init"]) == len(per["trained"])
    rows = {r["key"]: r for r in metrics["stages"]["ast_probe"]["claims"]}
    best = rows["ast_best_f1"]["ours"]
    assert best["n"] == ast["n_snippets"][2] and best["low"] <= best["value"] <= best["high"]
    assert best["too_small"] == (best["n"] < 30)
    assert rows["ast_best_f1"]["verdict"] == ("too few to conclude" if best["n"] < 30 else
                                              rows["ast_best_f1"]["verdict"])
    # refusal rows: 2 harmful test prompts at the tiny size -> too few to conclude
    srows = {r["key"]: r for r in metrics["stages"]["safety_activation"]["claims"]}
    assert srows["refusal_base"]["ours"]["n"] == 2
    assert srows["refusal_base"]["verdict"] == "too few to conclude"
    act = json.loads(next((folder / "safety_activation").rglob("activation.json")).read_text())
    assert srows["refusal_base"]["ours"]["value"] == act["refusal"]["refusal_rate"]["baseline"]["harmful"]
    # the weight-space claim is listed, not assessed, and says where it is measured (no weight stage here)
    assert srows["svd_vs_random_equal_loss"]["verdict"] == "not assessed"
    assert "--scale paper" in srows["svd_vs_random_equal_loss"]["reason"]

    # dark matter: per-document sums stored; their pooled R² is the run's own R²(‖e‖² | x) (METHODS §3)
    dm = json.loads(next((folder / "dark_matter").rglob("dark_matter.json")).read_text())
    drows = {r["key"]: r for r in metrics["stages"]["dark_matter"]["claims"]}
    w = str(dm["per_document"]["width"])
    assert abs(drows["dm_norm_r2"]["ours"]["value"] - dm["decomposition"][w]["r2_error_norm_sq"]) < 1e-9
    assert sum(dm["per_document"]["n_tokens"]) == dm["n_tokens"]["test"]

    # LinearScope: per-image bias shares whose mean is the test-set mean; a CI over test images
    ls = json.loads(next((folder / "linearscope").rglob("digit-3.json")).read_text())
    shares = ls["per_image_share_predicted"]
    assert len(shares) == ls["test_set"]["n"]
    mean = ls["test_set"]["mean_share_predicted"]
    assert abs(sum(shares) / len(shares) - mean) <= 1e-6 * max(1.0, abs(mean))
    (lrow,) = metrics["stages"]["linearscope"]["claims"]
    assert lrow["ours"]["n"] == len(shares) and lrow["ours"]["unit"] == "test images"

    # every figure on the page: titled axes and colour bars
    figs = page_figures(text)
    assert len(figs) == text.count("Plotly.newPlot") > 5
    problems = [p for data, layout in figs for p in untitled(data, layout)]
    assert problems == []


def test_scales_are_checked_up_front_and_named(tmp_path, capsys):
    import pytest

    from probekit.report import ReportConfigError, load_config

    cfg = load_config(SEEDS)
    paper = cfg.with_scale("paper").stage_configs()
    assert paper["ast_probe"].k == 128 and paper["ast_probe"].out.endswith("seeds-paper/ast_probe")
    assert cfg.with_scale(None) is cfg
    with pytest.raises(ReportConfigError, match=r"--scale 'huge': this config defines the scales \['paper', 'tiny'\]"):
        cfg.with_scale("huge")
    bad = tmp_path / "bad.yaml"
    # the paper scale adds the weight-space stage the CPU size leaves out; a scale may not name an unknown one
    assert "safety_weight" not in cfg.stage_configs() and paper["safety_weight"].n_useful == 1000
    assert list(paper)[-1] == "safety_weight" and paper["safety_weight"].out.endswith("seeds-paper/safety_weight")
    bad.write_text("name: x\nprobes: {ast_probe: {}}\nscales: {paper: {dark_mater: {epochs: 2}}}\n")
    with pytest.raises(ReportConfigError, match="scales.paper: unknown probe 'dark_mater'; allowed probes"):
        load_config(bad)
    bad.write_text("name: x\nprobes: {ast_probe: {}}\nscales: {paper: {dark_matter: {epoch: 2}}}\n")
    with pytest.raises(ReportConfigError, match="scales.paper: probes.dark_matter: unknown setting 'epoch'"):
        load_config(bad)
    bad.write_text("name: x\nprobes: {ast_probe: {}}\nscales: {paper: {ast_probe: {n_function: 2}}}\n")
    with pytest.raises(ReportConfigError, match="scales.paper: probes.ast_probe: unknown setting 'n_function'"):
        load_config(bad)
    assert main(["report", str(SEEDS), "--scale", "huge"]) == 2
    assert "--scale 'huge'" in capsys.readouterr().err
