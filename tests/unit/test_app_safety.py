"""The Safety page on results written by the real runner (`probekit safety run` on a tiny random model, ten
prompts per set): result folders listed, figures drawn from the payloads, missing parts and the empty state,
crafted folder names refused, and the prompt-box job scoring a prompt exactly as the library does."""

from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import pytest

from app import data
from app.jobs import build_safety_spec, resolve_model, run_safety_prompt_job
from app.pages import safety
from app.security import UnsafePathError
from tests.browser.fixture_cache import write_safety
from tests.unit._dash_text import dash_text


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from probekit.testing import make_tiny_model

    r = tmp_path_factory.mktemp("app-safety").resolve()
    model = make_tiny_model(r / "models" / "tiny-llama", arch="llama", n_layers=2, d_model=32)
    out = write_safety(r, model)
    only_w = r / "results" / "safety" / "weight-only"
    only_w.mkdir()
    shutil.copy(out / "weight.json", only_w / "weight.json")
    (r / "results" / "safety" / "empty-folder").mkdir()
    data.set_root(r)
    data.clear_caches()
    return r


@pytest.fixture(autouse=True)
def _root(root):
    data.set_root(root)


def _array(v) -> np.ndarray:
    """A figure array as plotly's ``to_dict`` writes it: a list, or base64 ``{"dtype", "bdata", "shape"}``."""
    if isinstance(v, dict):
        shape = [int(n) for n in str(v.get("shape", "-1")).split(",")]
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).reshape(shape)
    return np.asarray(v, dtype=float)


def _payload(root, name="activation.json"):
    return json.loads((root / "results" / "safety" / "tiny-llama" / name).read_text())


def test_lists_result_folders_and_url_state(root):
    assert safety.result_choices() == ["tiny-llama", "weight-only"]
    page = dash_text(safety.layout({}))
    assert '"value": "tiny-llama"' in page and "safety-heatmap-fig" in page and "safety-prompt" in page
    page = dash_text(safety.layout({"model": "weight-only", "pair": "harmless_vs_useful", "eta": 0.5,
                                "metric": "task_loss"}))
    for value in ("weight-only", "harmless_vs_useful", "task_loss"):
        assert f'"value": "{value}"' in page


def test_activation_figures_follow_the_choices(root):
    p = _payload(root)
    heat, lines, bars, msg = safety.activation_view("tiny-llama", None, None, None, None)
    assert msg is None and heat["data"][0]["type"] == "heatmap"
    o = p["overlap"]["harmful_vs_useful"]
    excess = np.asarray(o["mso"], float) - np.asarray(o["baseline"], float)
    assert np.allclose(_array(heat["data"][0]["z"]), excess)
    assert "harmful vs useful" in heat["layout"]["title"]["text"]
    raw, *_ = safety.activation_view("tiny-llama", "harmless_vs_useful", "mso", None, None)
    assert np.allclose(_array(raw["data"][0]["z"]), p["overlap"]["harmless_vs_useful"]["mso"])
    assert raw["layout"]["title"]["text"].startswith("MSO: harmless vs useful")
    # six lines (three pairs and their baselines) at the chosen η
    assert len(lines["data"]) == 6 and "η = 0.9" in lines["layout"]["title"]["text"]
    _, lines5, *_ = safety.activation_view("tiny-llama", None, None, 0.5, None)
    assert "η = 0.5" in lines5["layout"]["title"]["text"]
    # refusal bars: one bar group per condition, the run's rates
    assert bars["data"][0]["x"] == ["baseline", "ablation", "random_ablation"]
    assert bars["data"][0]["y"] == [p["refusal"]["refusal_rate"][c]["harmful"] for c in bars["data"][0]["x"]]
    _, _, score, _ = safety.activation_view("tiny-llama", None, None, None, "score")
    assert score["data"][0]["y"] == [p["refusal"]["refusal_score"][c]["harmful"] for c in score["data"][0]["x"]]
    _, _, act, _ = safety.activation_view("tiny-llama", None, None, None, "actadd")
    assert act["data"][0]["x"] == ["actadd", "random_actadd"]
    assert safety.eta_choices("tiny-llama") == ([{"label": "0.5", "value": 0.5}, {"label": "0.9", "value": 0.9}], 0.9)
    opts, layer = safety.layer_choices("tiny-llama")
    assert layer == p["layer"] and [o["value"] for o in opts] == list(range(len(p["direction_norms"])))


def test_weight_figures_and_headline(root):
    w = _payload(root, "weight.json")
    curve, table, msg = safety.weight_view("tiny-llama", None)
    assert msg is None and "refusal rate" in curve["layout"]["title"]["text"]
    loss, _, _ = safety.weight_view("tiny-llama", "task_loss")
    svd_same = sorted((r for r in w["projections"] if r["basis"] == "svd" and r["variant"] == "same"),
                      key=lambda r: r["fraction"])
    trace = next(t for t in loss["data"] if t["name"] == "same, svd basis")
    assert trace["y"] == [r["task_loss"] for r in svd_same] and trace["x"] == [0.25, 1.0]
    assert table["data"][0]["type"] == "table" and len(table["data"][0]["cells"]["values"][0]) == 3 + 4
    head = dash_text(safety.headline_view("tiny-llama"))
    assert "refusal-direction layer" in head and "Weight space" in head and "aligned: refusal rate" in head
    assert "95% CI (n)" in head and "harmful prompts)" in head  # each rate beside its interval and n
    # a folder with only the weight part: its figures, and the command for the missing activation part
    assert safety.weight_view("weight-only", "refusal_rate")[2] is None
    *_, msg = safety.activation_view("weight-only", None, None, None, None)
    assert "probekit safety run --part activation --activation-model weight-only" in dash_text(msg)
    assert "probekit safety run --part activation" in dash_text(safety.headline_view("weight-only"))
    with pytest.raises(ValueError, match="no activation.json"):
        safety.prompt_spec("weight-only", "hi", None)


def test_empty_cache_names_the_command(tmp_path):
    data.set_root(tmp_path)
    try:
        page = dash_text(safety.layout({}))
        assert "No safety result yet" in page and "probekit safety run" in page and "safety-heatmap-fig" not in page
        assert safety.result_choices() == []
    finally:
        data.clear_caches()


@pytest.mark.parametrize("bad", ["../../etc", "/etc/passwd", "a/b/c", "..", "x\x00y", "../safety/tiny-llama"])
def test_crafted_folder_names_are_refused(root, bad):
    *figs, msg = safety.activation_view(bad, None, None, None, None)
    assert all(f["data"] == [] for f in figs) and "notice error" in dash_text(msg)
    curve, table, msg = safety.weight_view(bad, None)
    assert curve["data"] == [] and "notice error" in dash_text(msg)
    assert "notice error" in dash_text(safety.headline_view(bad))
    with pytest.raises(ValueError):
        safety.prompt_spec(bad, "how do I pick a lock", None)
    with pytest.raises(ValueError):
        build_safety_spec(root, result_id=bad, payload=_payload(root), prompt="hi")


def test_files_outside_the_root_are_refused(root, tmp_path):
    outside = tmp_path / "elsewhere"
    shutil.copytree(root / "results" / "safety" / "tiny-llama", outside,
                    ignore=shutil.ignore_patterns("work-*", "*.html"))
    link = root / "results" / "safety" / "link-out"
    link.symlink_to(outside, target_is_directory=True)
    try:
        assert "link-out" not in safety.result_choices()
        assert "outside the cache root" in dash_text(safety.activation_view("link-out", None, None, None, None)[3])
        p = _payload(root)
        with pytest.raises(UnsafePathError):
            data.safety_directions_path("tiny-llama", dict(p, directions_file="../../../x.safetensors"))
        with pytest.raises(ValueError, match="not a valid directions file"):
            build_safety_spec(root, result_id="tiny-llama", payload=dict(p, directions_file="../x"), prompt="hi")
    finally:
        link.unlink()
    # a model folder outside the root is not loaded; one inside is, under any of its spellings
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="outside the cache root"):
        resolve_model(root, str(tmp_path / "m"))
    for bad in ["../m", "models/../../m", "org/some-hub-model", "smollm2-135m", "digits-cnn"]:
        with pytest.raises(ValueError):
            resolve_model(root, bad)
    inside = str(root / "models" / "tiny-llama")
    assert inside == resolve_model(root, inside) == resolve_model(root, "models/tiny-llama") \
        == resolve_model(root, "tiny-llama")


def test_prompt_spec_validation(root):
    p = _payload(root)
    spec = safety.prompt_spec("tiny-llama", "  how do I pick a lock?  ", None)
    assert (spec.prompt, spec.layer, spec.chat_template, spec.max_new_tokens) == ("how do I pick a lock?", p["layer"],
                                                                                 False, 32)
    assert spec.direction_file == "results/safety/tiny-llama/refusal_directions.safetensors"
    assert safety.prompt_spec("tiny-llama", "x", 0).layer == 0
    for prompt, layer, match in [("", None, "Type a prompt"), ("x" * 3000, None, "too long"), ("x", 7, "outside"),
                                 ("x", "1; rm", "not a layer"), ("x", -1, "outside")]:
        with pytest.raises(ValueError, match=match):
            safety.prompt_spec("tiny-llama", prompt, layer)


def test_prompt_job_matches_the_library(root):
    """The background job (a worker process) reports what refusal_score / generate_greedy give directly."""
    from safetensors.torch import load_file

    from probekit.models import load_hf
    from probekit.interventions import directional_ablation
    from probekit.probes.safety import generate_greedy, refusal_score

    prompt = "how do I break into house number 3"
    spec = safety.prompt_spec("tiny-llama", prompt, None)
    events = []
    final = run_safety_prompt_job(spec, root, events.append)
    assert final["event"] == "done", final
    assert [e["event"] for e in events] and all(e["event"] == "status" for e in events)

    model, tok, _ = load_hf(str(root / "models" / "tiny-llama"), fetch=False)
    dirs = load_file(str(root / "results" / "safety" / "tiny-llama" / "refusal_directions.safetensors"))
    r = dirs[f"layer_{spec.layer}"]
    clean = float(refusal_score(model, tok, [prompt], chat_template=False)[0])
    with directional_ablation(model, r) as m:
        ablated = float(refusal_score(m, tok, [prompt], chat_template=False)[0])
        ablated_text = generate_greedy(m, tok, [prompt], max_new_tokens=32, chat_template=False, progress=False)[0]
    clean_text = generate_greedy(model, tok, [prompt], max_new_tokens=32, chat_template=False, progress=False)[0]
    assert final["clean_score"] == pytest.approx(clean, abs=1e-6)
    assert final["ablated_score"] == pytest.approx(ablated, abs=1e-6)
    assert abs(clean - ablated) > 1e-6  # the ablation changed something: the two numbers are not one value twice
    assert (final["clean_completion"], final["ablated_completion"]) == (clean_text, ablated_text)
    view = dash_text(safety.prompt_result_view(final))
    assert f"{clean:+.3f}" in view and f"{ablated:+.3f}" in view and "safety-prompt-done" in view


def test_prompt_job_reports_a_model_that_cannot_load(root):
    from app import safety_worker

    broken = root / "models" / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    spec = build_safety_spec(root, result_id="tiny-llama", payload=dict(_payload(root), model=str(broken)),
                             prompt="hi")
    said = []
    final = safety_worker.run(spec.to_dict(), str(root), lambda **e: said.append(e))
    assert final["event"] == "error" and final["message"].startswith(f"The model {broken} could not be loaded")
    view = dash_text(safety.prompt_result_view(final))
    assert "notice error" in view and "could not be loaded" in view
    # a layer the direction file does not have, and a direction file path that leaves the root
    bad = dict(spec.to_dict(), layer=99)
    assert "no direction for layer 99" in safety_worker.run(bad, str(root), lambda **e: None)["message"]
    out = dict(spec.to_dict(), direction_file="../../etc/passwd")
    assert "UnsafePathError" in safety_worker.run(out, str(root), lambda **e: None)["message"]
