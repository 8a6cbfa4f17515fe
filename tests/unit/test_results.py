"""probekit.results: figures and headline numbers rebuilt from result files alone."""

from __future__ import annotations

import json

import pytest

from probekit import results
from probekit.cli import main


@pytest.fixture(scope="module")
def result_files(tiny_dir, tmp_path_factory):
    """One tiny result of each kind, written by the real commands."""
    import os

    tmp = tmp_path_factory.mktemp("results")
    old = os.environ.get("PROBEKIT_CACHE")
    os.environ["PROBEKIT_CACHE"] = str(tmp / "cache")
    try:
        model = str(tiny_dir["llama"])
        assert main(["linearscope", "--model", model, "--prompt", "x = 1", "--out", str(tmp / "ls")]) == 0
        assert main(["ast-probe", "--model", model, "--n-functions", "40", "--layers", "1", "--k", "4",
                     "--epochs", "1", "--k-sweep", "4", "--no-progress", "--out", str(tmp / "ast")]) == 0
    finally:
        if old is None:
            os.environ.pop("PROBEKIT_CACHE")
        else:
            os.environ["PROBEKIT_CACHE"] = old
    return tmp


def test_every_kind_round_trips_through_its_file(result_files):
    found = results.find(result_files)
    kinds = {results.load(p)["kind"] for p in found}
    assert kinds == {"linearscope_digits", "linearscope_lm", "ast_probe"}
    for p in found:
        payload = json.loads(p.read_text())  # the file alone, as the app and the reports see it
        figs = results.figures(payload)
        assert figs and all(f.to_json() for f in figs)
        head = results.headline(payload)
        assert head and all(isinstance(k, str) for k in head)


def test_ast_headline_and_figures_match_the_payload(result_files):
    payload = results.load(result_files / "ast" / "ast_probe.json")
    head = results.headline(payload)
    assert head["best F1"] == max(payload["result"]["f1"])
    assert head["layer 0 (embeddings) F1"] == payload["result"]["f1"][0]
    figs = results.figures(payload)
    # F1 per layer (+ controls), F1 vs k, recall per label, the tree
    assert len(figs) == 4
    assert list(figs[0].data[0].y) == payload["result"]["f1"]


def test_unknown_kind_is_refused(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"kind": "nope"}))
    with pytest.raises(ValueError, match="not a probekit result"):
        results.load(bad)
    with pytest.raises(ValueError, match="expected one of"):
        results.figures({"kind": "nope"})
    assert results.find(tmp_path) == []
