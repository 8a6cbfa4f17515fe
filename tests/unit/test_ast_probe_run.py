"""End-to-end plumbing of `probekit ast-probe` on a tiny random model (numbers are not the point here)."""

from __future__ import annotations

import json

from probekit.cli import main


def test_ast_probe_command_writes_results_with_both_controls(tiny_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ast"
    args = ["ast-probe", "--model", str(tiny_dir["llama"]), "--n-functions", "40", "--layers", "0,2",
            "--k", "8", "--epochs", "2", "--k-sweep", "4,8", "--no-progress", "--out", str(out)]
    rc = main(args)
    assert rc == 0
    payload = json.loads((out / "ast_probe.json").read_text())
    res = payload["result"]
    assert res["layers"] == ["embed", "0", "2"]
    assert all(0.0 <= f <= 1.0 for f in res["f1"])
    assert set(res["controls"]) == {"layer 0 (embeddings)", "random-init model"}
    assert len(res["controls"]["random-init model"]) == 3
    assert payload["n_snippets"][0] > payload["n_snippets"][2] > 0  # train > test > 0, split by file
    assert (out / "ast_probe.html").stat().st_size > 100_000
    sweep = payload["k_sweep"]
    D = load_file(str(out / "ast_probe.safetensors"))["P"].shape[1]
    assert sweep["ks"] == [4, 8, D] and len(sweep["separate_f1"]) == len(sweep["matryoshka_f1"]) == 3
    assert sweep["layer"] == payload["best_layer_by_validation"]
    assert res["label_support"] and len(res["label_recall"]) == 3
    # the activations went through the cache: a second run reuses the same cache run
    runs = list((tmp_path / "cache" / "runs").iterdir())
    assert payload["cache_run"] in {r.name for r in runs}
    assert main(args + ["--no-random-control"]) == 0
    assert json.loads((out / "ast_probe.json").read_text())["cache_run"] == payload["cache_run"]
    assert len(list((tmp_path / "cache" / "runs").iterdir())) == len(runs)
