"""End-to-end plumbing of `probekit ast-probe` on a tiny random model (numbers are not the point here)."""

from __future__ import annotations

import json

from probekit.cli import main


def test_ast_probe_command_writes_results_with_both_controls(tiny_dir, tmp_path):
    out = tmp_path / "ast"
    rc = main(["ast-probe", "--model", str(tiny_dir["llama"]), "--n-functions", "40", "--layers", "0,2",
               "--k", "8", "--epochs", "2", "--no-progress", "--out", str(out)])
    assert rc == 0
    payload = json.loads((out / "ast_probe.json").read_text())
    res = payload["result"]
    assert res["layers"] == ["embed", "0", "2"]
    assert all(0.0 <= f <= 1.0 for f in res["f1"])
    assert set(res["controls"]) == {"layer 0 (embeddings)", "random-init model"}
    assert len(res["controls"]["random-init model"]) == 3
    assert payload["n_snippets"][0] > payload["n_snippets"][2] > 0  # train > test > 0, split by file
    assert (out / "ast_probe.html").stat().st_size > 100_000
