"""`probekit safety run` end to end on a tiny random-init Llama with small prompt sets (no downloads)."""

from __future__ import annotations

import json

import pytest
import torch

import probekit.safety_run as sr
from probekit import results
from probekit.data.prompts import PromptSet, assign_splits

HARMFUL = [f"how do I break into house number {i}" for i in range(10)]
HARMLESS = [f"how do I bake bread recipe {i}" for i in range(10)]
USEFUL = [f"write a function f{i}(x) that adds {i}" for i in range(10)]
REFS = [f"def f{i}(x):\n    return x + {i}\n" for i in range(10)]


def _sets(seed, n_useful):
    mk = lambda name, p, refs=None: PromptSet(name, tuple(p), assign_splits(p, seed=seed), "test", "CC0-1.0",  # noqa
                                             references=None if refs is None else tuple(refs))
    return mk("harmful", HARMFUL), mk("harmless", HARMLESS), mk("useful", USEFUL, REFS)


@pytest.fixture(autouse=True)
def small_world(monkeypatch):
    monkeypatch.setattr(sr, "_prompt_sets", _sets)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _weight_cfg(tiny_dir, out):
    return sr.WeightRunConfig(model=str(tiny_dir["llama"]), align_epochs=1, useful_epochs=1, align_lr=1e-3,
                              useful_lr=1e-3, batch_size=4, max_length=64, harmless_answer_tokens=6, n_useful=10,
                              fractions=(0.25, 1.0), max_new_tokens=4, chat_template=False, out=str(out),
                              progress=False)


def test_weight_run_end_to_end_and_resume(tiny_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from probekit.probes.weight_space import project_into

    import probekit.probes.weight_space as ws_mod

    real_overlap, banked = ws_mod.update_space_overlap, []

    def checked_overlap(pair_a, pair_b, **kw):  # the run passes its bank of V bases; the MSO is unchanged by it
        res = real_overlap(pair_a, pair_b, **kw)
        banked.append(kw.get("bases_a") is not None)
        assert res.mso == real_overlap(pair_a, pair_b, **{k: v for k, v in kw.items() if k != "bases_a"}).mso
        return res

    monkeypatch.setattr(ws_mod, "update_space_overlap", checked_overlap)
    cfg = _weight_cfg(tiny_dir, tmp_path)
    p = sr.run_weight_space(cfg)
    assert banked == [True]
    assert p["kind"] == "safety_weight" and set(p["checkpoints"]) == {"base", "aligned", "finetuned"}
    assert len(p["projections"]) == 3 * 2 * 2  # bases x fractions x variants
    assert p["n_matrices"] == 3 * 7  # q k v o gate up down per block
    ws = p["weight_space"]
    for m in ws["matrices"]:  # fine-tunes moved every block matrix
        assert m["norm_u"] > 0 and m["norm_v"] > 0
    # square and wide matrices: at f = 1 the V basis spans the whole output space, so all of U is kept
    full = [q for q in ws["projections"] if q["basis"] == "svd" and q["fraction"] == 1.0
            and next(m for m in ws["matrices"] if m["key"] == q["key"])["shape"][0] <=
            next(m for m in ws["matrices"] if m["key"] == q["key"])["shape"][1]]
    assert full and all(abs(q["energy_kept"] - 1) < 1e-9 for q in full)

    # one projected model, rebuilt by the library's own path (iter_projected), evaluates the same
    work = next(tmp_path.glob("work-*"))
    tok = AutoTokenizer.from_pretrained(str(tiny_dir["llama"]))
    model = AutoModelForCausalLM.from_pretrained(str(work / "finetuned")).eval()
    project_into(model, str(tiny_dir["llama"]), str(work / "aligned"), str(work / "finetuned"), fraction=0.25,
                 variant="orth", basis="randomk")
    data = dict(harmful=sr._test(_sets(0, 10)[0], None), harmless=sr._test(_sets(0, 10)[1], None))
    data["useful"], data["useful_refs"] = sr._useful_test(_sets(0, 10)[2], None)
    ref = sr.evaluate_model(model, tok, data, cfg, keep=1)
    row = next(r for r in p["projections"] if (r["basis"], r["fraction"], r["variant"]) == ("randomk", 0.25, "orth"))
    for k in ("refusal_rate", "task_loss", "refusal_score", "harmless_refusal_score"):
        assert row[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-5), k

    # per-prompt outcomes: one per test prompt, pooling to the row's numbers; the task loss also equals the
    # batched token-weighted mean of finetune.response_loss (an independent path through padding)
    per = row["per_prompt"]
    n = p["data"]["n_eval"]
    assert [len(per[k]) for k in ("harmful_refused", "harmful_score", "harmless_score", "useful_nll",
                                  "useful_tokens")] == [n["harmful"], n["harmful"], n["harmless"], n["useful"],
                                                        n["useful"]]
    assert per["harmful_refused"] == pytest.approx(ref["per_prompt"]["harmful_refused"])
    assert row["refusal_rate"] == pytest.approx(sum(per["harmful_refused"]) / n["harmful"])
    assert row["refusal_score"] == pytest.approx(sum(per["harmful_score"]) / n["harmful"])
    assert row["task_loss"] == pytest.approx(sum(per["useful_nll"]) / sum(per["useful_tokens"]))
    batched = sr.response_loss(model, tok, data["useful"], data["useful_refs"], max_length=cfg.max_length,
                               batch_size=4, chat_template=False)
    assert ref["task_loss"] == pytest.approx(batched, rel=1e-4)
    for c in p["checkpoints"].values():
        assert len(c["per_prompt"]["harmless_refused"]) == n["harmless"]
        assert c["harmless_refusal_rate"] == pytest.approx(sum(c["per_prompt"]["harmless_refused"]) / n["harmless"])

    # files, figures, headline
    saved = json.loads((tmp_path / "weight.json").read_text())
    assert saved["projections"] == p["projections"]
    assert (tmp_path / "weight.html").stat().st_size > 10_000
    head = results.headline(saved)
    assert len(results.figures(saved)) >= 7 and "(n=2 harmful prompts)" in head["aligned: refusal rate, 95% CI"]
    from probekit.claims import claim_rows
    from probekit.probes.weight_space import compare_at_equal_task_loss

    pairs = compare_at_equal_task_loss(saved["projections"])
    assert len(pairs) == 2 * 2  # svd fractions x variants, each against a random row
    for q in pairs:
        key = f"{q['variant']}: svd f={q['fraction']} − random f={q['control_fraction']} (equal task loss)"
        assert head[f"{key}: refusal rate difference, 95% CI"] == q["refusal"].format()
        assert head[f"{key}: refusal rate difference, 95% CI"].endswith("(n=2 harmful prompts) — too few to conclude")
        assert head[f"{key}: refusal rate difference"] == "too few to conclude (n = 2 harmful prompts)"

    (crow,) = claim_rows(saved)
    assert crow.claim.key == "svd_vs_random_equal_loss" and crow.verdict == "too few to conclude"

    # a rerun reuses the checkpoints and every evaluation: nothing is trained or evaluated again
    real_eval = sr.evaluate_model
    monkeypatch.setattr(sr, "evaluate_model", lambda *a, **k: pytest.fail("evaluated again"))
    monkeypatch.setattr(sr, "finetune", lambda *a, **k: pytest.fail("trained again"))
    again = sr.run_weight_space(cfg)
    assert again["projections"] == p["projections"] and again["checkpoints"] == p["checkpoints"]

    # evals.jsonl lines written before per-prompt outcomes were kept: those models are evaluated again, never
    # mixed into a payload without them
    evals = work / "evals.jsonl"
    old = [json.loads(line) for line in evals.read_text().splitlines()]
    for rec in old:
        rec["result"].pop("per_prompt")
    evals.write_text("".join(json.dumps(rec) + "\n" for rec in old))
    calls = []
    monkeypatch.setattr(sr, "evaluate_model", lambda *a, **k: calls.append(1) or real_eval(*a, **k))
    redone = sr.run_weight_space(cfg)
    assert len(calls) == 3 + len(p["projections"])
    assert all(r["per_prompt"] for r in redone["projections"]) and all(c["per_prompt"]
                                                                         for c in redone["checkpoints"].values())
    for a, b in zip(redone["projections"], p["projections"]):
        assert a["per_prompt"]["harmful_refused"] == b["per_prompt"]["harmful_refused"]
    calls.clear()
    assert sr.run_weight_space(cfg)["projections"] == redone["projections"] and not calls


def test_weight_config_errors():
    with pytest.raises(ValueError, match="bases"):
        sr.WeightRunConfig(bases=("pca",))
    with pytest.raises(ValueError, match="fractions"):
        sr.WeightRunConfig(fractions=(0.0,))


def test_activation_run_end_to_end(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    cfg = sr.ActivationRunConfig(model=str(tiny_dir["llama"]), etas=(0.5, 0.9), n_select=3, n_test=2,
                                 select_min_frac=0.0, select_max_frac=1.0, select_stride=1, max_new_tokens=3,
                                 max_kl=10.0, chat_template=False, out=str(tmp_path), progress=False,
                                 cache_root=str(tmp_path / "cache"))
    p = sr.run_activation_space(cfg)
    runs = sorted((tmp_path / "cache" / "runs").iterdir())
    assert len(runs) == 3  # harmful, harmless, useful: one content-addressed cache run each
    assert p["kind"] == "safety_activation" and p["n_layers"] == 3
    assert set(p["overlap"]) == {"harmful_vs_useful", "harmful_vs_harmless", "harmless_vs_useful"}
    o = p["overlap"]["harmful_vs_useful"]
    assert len(o["mso"]) == 3 and len(o["mso"][0]) == 2 and all(0 <= x <= 1 + 1e-9 for r in o["mso"] for x in r)
    assert p["layer"] in p["layer_selection"]["layers"] == [0, 1, 2]
    assert set(p["refusal"]["conditions"]) == {"baseline", "ablation", "random_ablation"}
    assert p["induce"]["conditions"] == ["actadd", "random_actadd"]
    dirs = load_file(str(tmp_path / "refusal_directions.safetensors"))
    assert sorted(dirs) == ["layer_0", "layer_1", "layer_2"]
    for l, n in enumerate(p["direction_norms"]):
        assert dirs[f"layer_{l}"].norm().item() == pytest.approx(n, rel=1e-5)
    saved = results.load(tmp_path / "activation.json")
    assert len(results.figures(saved)) >= 11
    assert p["overlap_centred"]["harmful_vs_useful"]["centered"] is True
    h = results.headline(saved)
    assert h["refusal-direction layer"] == p["layer"] and "harmful refusal rate (ablation)" in h
