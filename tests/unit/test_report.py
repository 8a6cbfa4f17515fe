"""`probekit report`: a tiny config end to end, reuse on rerun, and config validation."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest

from probekit import results
from probekit.cli import main
from probekit.report import ReportConfigError, load_config


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.scripts = set(), 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "script":
            self.scripts += 1


def _config(tmp_path, model, probes: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(f"name: tiny\nmodel: {model}\nout: {tmp_path / 'reports'}\nprobes:\n{probes}")
    return str(path)


TINY_PROBES = """\
  layer_probes: {n_functions: 12, max_length: 48, max_iter: 20}
  ast_probe: {n_functions: 40, layers: [1], k: 4, epochs: 1, k_sweep: [4]}
  linearscope: {digit_index: 3}
  dark_matter: {layer: 1, expansions: [1, 2, 3], k: 4, epochs: 1, batch_size: 64, n_code: 10, n_text: 4,
                max_length: 48}
"""


def test_tiny_report_end_to_end_and_reuse(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path / "cache"))
    cfg = _config(tmp_path, tiny_dir["llama"], TINY_PROBES)
    assert main(["report", cfg]) == 0
    folder = tmp_path / "reports" / "tiny"
    text = (folder / "index.html").read_text()
    page = _Page()
    page.feed(text)
    assert {"summary", "layer_probes", "ast_probe", "linearscope", "dark_matter", "config", "model",
            "versions", "timings"} <= page.ids
    metrics = json.loads((folder / "metrics.json").read_text())
    n_figs = 0
    for probe, stage in metrics["stages"].items():
        payloads = [results.load(p) for p in results.find(folder / probe)]
        assert [r["headline"] for r in stage["results"]] == [results.headline(p) for p in payloads]
        n_figs += sum(len(results.figures(p)) for p in payloads)
    assert text.count("Plotly.newPlot") == n_figs  # every probe's figures are embedded
    # every headline number beside its 95% CI and n; the tiny run's few test units say so instead of concluding
    assert text.count("<th>95% CI (n)</th>") == sum(len(s["results"]) for s in metrics["stages"].values())
    assert "best F1</td><td>too few to conclude (n = " in text
    assert "best test accuracy: " in text and "test functions) — too few to conclude" in text
    assert text.count("* plotly.js v") == 1  # inlined once: opens offline
    assert metrics["model_source"]["sha256"]  # local folder: sha256 of its weight files
    assert set(metrics["versions"]) >= {"python", "torch", "transformers"}
    # a second run reuses every stage
    assert main(["report", cfg]) == 0
    again = json.loads((folder / "metrics.json").read_text())
    assert all(s["reused"] for s in again["stages"].values())
    assert [s["results"] for s in again["stages"].values()] == [s["results"] for s in metrics["stages"].values()]


@pytest.mark.parametrize("probes,match", [
    ("  nope: {}\n", "unknown probe 'nope'; allowed probes"),
    ("  ast_probe: {n_function: 40}\n", "probes.ast_probe: unknown setting 'n_function'; allowed"),
    ("  ast_probe: {n_functions: 5}\n", "probes.ast_probe: n_functions must be at least 30"),
    ("  ast_probe: 3\n", "probes.ast_probe must be a mapping"),
    ("  dark_matter: {expansions: [2, 4]}\n", "probes.dark_matter: per-token scaling needs at least 3"),
])
def test_invalid_configs_name_the_problem(tmp_path, probes, match):
    with pytest.raises(ReportConfigError, match=match):
        load_config(_config(tmp_path, "smollm2-135m", probes))


def test_invalid_top_level(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodle: smollm2-135m\nprobes: {ast_probe: {}}\n")
    with pytest.raises(ReportConfigError, match="unknown key 'modle'; allowed"):
        load_config(bad)
    bad.write_text("name: ../x\nprobes: {ast_probe: {}}\n")
    with pytest.raises(ReportConfigError, match="name"):
        load_config(bad)
    bad.write_text("name: [unclosed\n")
    assert main(["report", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    with pytest.raises(ReportConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


def test_example_configs_are_valid():
    from pathlib import Path

    configs = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))
    assert len(configs) >= 5
    for c in configs:
        cfg = load_config(c)
        assert cfg.stage_configs()
