"""End-to-end plumbing of `probekit ast-probe` on a tiny random model (numbers are not the point here)."""

from __future__ import annotations

import json

from probekit.cli import main


def test_ast_probe_command_writes_results_with_both_controls(tiny_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import tempfile
    from pathlib import Path

    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path / "cache"))
    before = set(Path(tempfile.gettempdir()).glob("probekit-random-init-*"))
    out = tmp_path / "ast"
    args = ["ast-probe", "--model", str(tiny_dir["llama"]), "--n-functions", "40", "--layers", "0,2",
            "--k", "8", "--epochs", "2", "--k-sweep", "4,8", "--no-progress", "--out", str(out)]
    rc = main(args)
    assert rc == 0
    assert set(Path(tempfile.gettempdir()).glob("probekit-random-init-*")) == before  # the copy is cleaned up
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
    snips = payload["test_snippets"]
    assert len(snips) == payload["n_snippets"][2]
    assert all(len(s["gold"][2]) == len(s["leaves"]) == len(s["pred"][2]) == len(s["pred"][0]) + 1 for s in snips)
    # the activations went through the cache: a second run reuses the same cache run
    runs = list((tmp_path / "cache" / "runs").iterdir())
    assert payload["cache_run"] in {r.name for r in runs}
    # the random-init control's run is keyed by its weights and a durable name, never by its temp folder
    from probekit.cache import Run

    keys = [Run(r).config["key"] for r in runs]
    assert len(runs) == 2 and not any("probekit-random-init" in k["model"] for k in keys), [k["model"] for k in keys]
    assert sorted(k["model"] for k in keys) == sorted([str(tiny_dir["llama"]), f"random-init:{tiny_dir['llama']}"])
    # every test snippet carries its predicted tree at every layer (the app's layer picker drives the tree)
    assert all(set(s["pred_by_layer"]) == set(res["layers"]) for s in snips)
    best = payload["best_layer_by_validation"]
    assert all(s["pred_by_layer"][best] == s["pred"] for s in snips)
    # a rerun reuses both cache runs: the model's and the random-init control's
    assert main(args) == 0
    assert json.loads((out / "ast_probe.json").read_text())["cache_run"] == payload["cache_run"]
    assert sorted(r.name for r in (tmp_path / "cache" / "runs").iterdir()) == sorted(r.name for r in runs)


def test_ast_probe_command_javascript(tiny_dir, tmp_path, monkeypatch):
    """`--language javascript` takes the npm corpus (here a local stand-in) and the JS grammar."""
    import probekit.data.javascript as js
    from probekit.data.code import CodeSnippet
    from tests.unit.test_javascript import FIXTURE

    # 9 real-style functions, 3 per file, so the by-file split has train, val and test files
    snippets = [CodeSnippet(doc_id=f"pkg/f{i // 3}.js::{i}", path=f"pkg/f{i // 3}.js", name=f"fn{i}", source=src)
                for i, src in enumerate(FIXTURE * 4)]
    monkeypatch.setattr(js, "iter_npm_functions", lambda max_functions=None, seed=0: snippets[:max_functions])
    monkeypatch.setenv("PROBEKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "js"
    rc = main(["ast-probe", "--model", str(tiny_dir["llama"]), "--language", "javascript", "--n-functions", "36",
               "--layers", "1", "--k", "4", "--epochs", "1", "--k-sweep", "none", "--no-random-control",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    payload = json.loads((out / "ast_probe.json").read_text())
    assert payload["language"] == "javascript" and payload["k_sweep"] is None
    assert sum(payload["n_snippets"]) + sum(payload["rejected"].values()) == 36
    labels = set(payload["result"]["label_support"])
    assert "function_declaration" in labels or "statement_block" in labels  # JS grammar, not Python's
