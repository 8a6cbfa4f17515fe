"""The bad-input catalogue: what a new user might type (on the command line or into the app), the error text that must
name the problem, and the rule that nothing already written changes. One table, :data:`CASES`, of rows
``(id, surface, input, fragments)``:

- ``surface == "cli"``: ``input`` is an argv run in-process (``probekit.cli.main``) against a cache that holds a
  sound run, a run with a missing shard and a run whose manifest is not UTF-8, with ``$PROBEKIT_CACHE`` pointing at
  it and the working folder beside it. The row passes when the command fails (non-zero exit), its output contains
  every fragment, and the whole tree (cache, working folder, inputs) is byte-for-byte the same afterwards.
- ``surface == "app"``: ``input`` is ``(callback, values)``: the callback named by a fragment of its output key
  (``"capture-error.children"``) and the control values the renderer posts (``{"id.prop": value}``, the rest None;
  ``"RUN"`` stands for the fixture run's id). The row passes when the answer is a 200 holding every fragment
  (:data:`NO_UPDATE`: the callback changed no output) and the app's cache root is byte-for-byte the same afterwards.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from probekit.cache import ActivationCache
from probekit.capture import CaptureConfig
from probekit.cli import main
from tests.browser.dash_payloads import callback_key, payload, post
from tests.conftest import TEXTS

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.0.hook_resid_post"
FILES = {
    "texts.txt": "\n".join(TEXTS).encode(),
    "binary.txt": bytes(range(256)) * 4,
    "empty.txt": b"\n  \n",
    "binary.yaml": b"name: x\nprobes: {ast_probe: {}}\n\xff\xfe\x00\x81",
    "not-yaml.yaml": b"name: [unclosed\n",
    "wrong-type.yaml": b"name: x\nprobes:\n  ast_probe: {k: abc}\n",
    "batch-zero.yaml": b"name: x\nprobes:\n  layer_probes: {batch_size: 0}\n",
    "epochs-float.yaml": b"name: x\nprobes:\n  dark_matter: {epochs: 1.5}\n",
    "model-list.yaml": b"name: x\nmodel: [a, b]\nprobes:\n  ast_probe: {}\n",
    "unknown-probe.yaml": b"name: x\nprobes:\n  nope: {}\n",
    "unknown-setting.yaml": b"name: x\nprobes:\n  ast_probe: {n_function: 40}\n",
    "few-functions.yaml": b"name: x\nprobes:\n  ast_probe: {n_functions: 5}\n",
    "probe-not-mapping.yaml": b"name: x\nprobes:\n  ast_probe: 3\n",
    "two-widths.yaml": b"name: x\nprobes:\n  dark_matter: {expansions: [2, 4]}\n",
    "unknown-key.yaml": b"name: x\nmodle: smollm2-135m\nprobes: {ast_probe: {}}\n",
    "bad-name.yaml": b"name: ../x\nprobes: {ast_probe: {}}\n",
}
NO_UPDATE = '"response":{}'  # Dash's answer when every output of a callback is no_update
CAP = ["capture", "--model", "{model}", "--hooks", HOOK]

# (id, surface, input, fragments that must all appear in the output); see the module docstring
CASES = [
    # capture: inputs
    ("texts-binary", "cli", CAP + ["--texts", "{work}/binary.txt"], ["--texts {work}/binary.txt", "not UTF-8"]),
    ("texts-missing", "cli", CAP + ["--texts", "{work}/nope.txt"], ["no such file", "nope.txt"]),
    ("texts-empty", "cli", CAP + ["--texts", "{work}/empty.txt"], ["empty.txt", "no non-blank line"]),
    ("texts-and-stdlib", "cli", CAP + ["--texts", "{work}/texts.txt", "--stdlib-functions", "3"],
     ["exactly one of --texts FILE or --stdlib-functions N"]),
    ("no-documents", "cli", CAP, ["exactly one of --texts FILE or --stdlib-functions N"]),
    ("stdlib-zero", "cli", CAP + ["--stdlib-functions", "0"], ["argument --stdlib-functions", "positive integer"]),
    ("stdlib-word", "cli", CAP + ["--stdlib-functions", "ten"], ["argument --stdlib-functions", "'ten'"]),
    # capture: flags
    ("positions-words", "cli", CAP + ["--texts", "{work}/texts.txt", "--positions", "a,b"],
     ["argument --positions", "'a'"]),
    ("positions-past-end", "cli", CAP + ["--texts", "{work}/texts.txt", "--positions", "500"],
     ["positions [500]", "past the end of every document", "--positions"]),
    ("batches-per-shard-zero", "cli", CAP + ["--texts", "{work}/texts.txt", "--batches-per-shard", "0"],
     ["argument --batches-per-shard", "positive integer"]),
    ("batches-per-shard-negative", "cli", CAP + ["--texts", "{work}/texts.txt", "--batches-per-shard=-2"],
     ["argument --batches-per-shard", "got -2"]),
    ("batch-size-zero", "cli", CAP + ["--texts", "{work}/texts.txt", "--batch-size", "0"], ["argument --batch-size"]),
    ("max-length-zero", "cli", CAP + ["--texts", "{work}/texts.txt", "--max-length", "0"], ["argument --max-length"]),
    ("dtype", "cli", CAP + ["--texts", "{work}/texts.txt", "--dtype", "int8"], ["argument --dtype", "invalid choice"]),
    ("unknown-hook", "cli", ["capture", "--model", "{model}", "--hooks", "blocks.0.hook_resid_pots", "--texts",
                      "{work}/texts.txt"], ["hook_resid_pots"]),
    ("unknown-model", "cli", ["capture", "--model", "{work}/no-model", "--hooks", HOOK, "--texts", "{work}/texts.txt"],
     ["unknown model", "no-model"]),
    # cache
    ("cache-show-unknown", "cli", ["cache", "show", "nope"], ["no run matching 'nope'"]),
    ("cache-rm-unknown", "cli", ["cache", "rm", "nope"], ["no run matching 'nope'"]),
    ("cache-show-missing-shard", "cli", ["cache", "show", "{holed}"],
     ["{holed_file}", "missing", "Run the same capture again", "probekit cache rm {holed}"]),
    ("cache-verify-missing-shard", "cli", ["cache", "verify", "{holed}"], ["{holed_file}", "missing"]),
    ("cache-show-not-utf8", "cli", ["cache", "show", "{garbled}"], ["{garbled_manifest}", "not UTF-8",
                                                                    "probekit cache rm {garbled}"]),
    ("cache-verify-not-utf8", "cli", ["cache", "verify", "{garbled}"], ["{garbled_manifest}", "not UTF-8"]),
    # probe commands: list flags
    ("ast-probe-layers", "cli", ["ast-probe", "--model", "{model}", "--layers", "a,b"], ["argument --layers", "'a'"]),
    ("ast-probe-k-sweep", "cli", ["ast-probe", "--model", "{model}", "--k-sweep", "8,x"],
     ["argument --k-sweep", "'x'"]),
    ("dark-matter-expansions", "cli", ["dark-matter", "run", "--model", "{model}", "--expansions", "2,x,8"],
     ["argument --expansions", "'x'"]),
    ("linearscope-digits", "cli", ["linearscope", "--skip-lm", "--out", "{work}/ls", "--digits", "1,x"],
     ["digits must be 'per-class' or comma-separated", "'1,x'"]),
    ("linearscope-digit-index", "cli", ["linearscope", "--skip-lm", "--out", "{work}/ls", "--digit-index=-2"],
     ["digit_index must be a test-set index"]),
    ("models-fetch-typo", "cli", ["models", "fetch", "smollm2-13"], ["unknown model 'smollm2-13'", "Did you mean"]),
    # report configs
    ("report-binary", "cli", ["report", "{work}/binary.yaml"], ["{work}/binary.yaml", "not a UTF-8 text file"]),
    ("report-missing", "cli", ["report", "{work}/missing.yaml"], ["missing.yaml", "no such config file"]),
    ("report-not-yaml", "cli", ["report", "{work}/not-yaml.yaml"], ["not-yaml.yaml", "not valid YAML"]),
    ("report-wrong-type", "cli", ["report", "{work}/wrong-type.yaml"], ["probes.ast_probe.k", "expected an integer",
                                                                        "'abc'"]),
    ("report-batch-size-zero", "cli", ["report", "{work}/batch-zero.yaml"],
     ["probes.layer_probes.batch_size", "positive integer"]),
    ("report-float-epochs", "cli", ["report", "{work}/epochs-float.yaml"], ["probes.dark_matter.epochs", "1.5"]),
    ("report-model-list", "cli", ["report", "{work}/model-list.yaml"], ["model: expected a string"]),
    ("report-unknown-probe", "cli", ["report", "{work}/unknown-probe.yaml"], ["unknown probe 'nope'; allowed probes"]),
    ("report-unknown-setting", "cli", ["report", "{work}/unknown-setting.yaml"],
     ["probes.ast_probe: unknown setting 'n_function'; allowed"]),
    ("report-few-functions", "cli", ["report", "{work}/few-functions.yaml"],
     ["probes.ast_probe: n_functions must be at least 30"]),
    ("report-probe-not-mapping", "cli", ["report", "{work}/probe-not-mapping.yaml"],
     ["probes.ast_probe must be a mapping"]),
    ("report-two-widths", "cli", ["report", "{work}/two-widths.yaml"],
     ["probes.dark_matter: per-token scaling needs at least 3"]),
    ("report-unknown-key", "cli", ["report", "{work}/unknown-key.yaml"], ["unknown key 'modle'; allowed"]),
    ("report-bad-name", "cli", ["report", "{work}/bad-name.yaml"], ["name '../x' must be"]),
    # app: LinearScope
    ("ls-digit-word", "app", ("ls-rows-fig.figure", {"ls-digit.value": "seven"}), ["not a digit index"]),
    ("ls-digit-dict", "app", ("ls-rows-fig.figure", {"ls-digit.value": {"x": 1}}), ["not a digit index"]),
    ("ls-digit-inf", "app", ("ls-rows-fig.figure", {"ls-digit.value": float("inf")}), ["not a digit index"]),
    ("ls-digit-negative", "app", ("ls-rows-fig.figure", {"ls-digit.value": -1}), ["not a digit index"]),
    ("ls-digit-huge", "app", ("ls-rows-fig.figure", {"ls-digit.value": 10**300}), ["not a digit index"]),
    ("ls-digit-bool", "app", ("ls-rows-fig.figure", {"ls-digit.value": True}), ["not a digit index"]),
    # app: AST-Probe
    ("ast-snippet-inf", "app", ("ast-tree-fig.figure", {"ast-model.value": "smollm2-135m",
                                                        "ast-snippet.value": float("inf")}), ["not a snippet"]),
    ("ast-snippet-list", "app", ("ast-tree-fig.figure", {"ast-model.value": "smollm2-135m", "ast-snippet.value": [0]}),
     ["not a snippet"]),
    ("ast-layer-dict", "app", ("ast-tree-fig.figure", {"ast-model.value": "smollm2-135m", "ast-snippet.value": 0,
                                                       "ast-layer.value": {"x": 1}}), ["the layer must be text"]),
    # app: Layers
    ("layers-doc-inf", "app", ("layers-tokens.children", {"layers-run.value": "RUN", "layers-doc.value": float("inf"),
                                                          "layers-hook.value": "blocks.0.hook_resid_post"}),
     ["not a document"]),
    ("layers-probe-no-probes", "app", ("layers-probe-errors.children", {"layers-model.value": "smollm2-135m",
                                                                        "layers-probe-layer.value": "1"}),
     ["test_predictions.safetensors is missing", "probekit demo"]),
    ("layers-probe-no-index", "app", ("layers-probe-view.children", {"layers-model.value": "smollm2-135m",
                                                                     "layers-probe-layer.value": None}),
     ["probes.json is missing", "probekit demo"]),
    # app: Capture
    ("capture-model-list", "app", ("capture-error.children", {"capture-model.value": ["models/tiny-llama"]}),
     ["Choose a model"]),
    ("capture-model-dict", "app", ("capture-error.children", {"capture-model.value": {"models/tiny-llama": 1}}),
     ["Choose a model"]),
    ("capture-hooks-list", "app", ("capture-error.children", {
        "capture-model.value": "models/tiny-llama", "capture-hooks.value": ["a"], "capture-dataset.value": "stdlib",
        "capture-n.value": 3}), ["hook names"]),
    ("capture-unknown-hook", "app", ("capture-error.children", {  # from the model's config, before any weights load
        "capture-model.value": "models/tiny-llama", "capture-hooks.value": "blocks.0.hook_resid_pots",
        "capture-dataset.value": "stdlib", "capture-n.value": 3}),
     ["Unknown hook", "blocks.0.hook_resid_pots", "did you mean blocks.0.hook_resid_post"]),
    ("capture-n-list", "app", ("capture-error.children", {
        "capture-model.value": "models/tiny-llama", "capture-dataset.value": "stdlib",
        "capture-hooks.value": "blocks.0.hook_resid_post", "capture-n.value": [3]}), ["number of functions"]),
    ("capture-n-inf", "app", ("capture-error.children", {
        "capture-model.value": "models/tiny-llama", "capture-dataset.value": "stdlib",
        "capture-hooks.value": "blocks.0.hook_resid_post", "capture-n.value": float("inf")}), ["number of functions"]),
    ("capture-texts-number", "app", ("capture-error.children", {
        "capture-model.value": "models/tiny-llama", "capture-dataset.value": "texts",
        "capture-hooks.value": "blocks.0.hook_resid_post", "capture-texts.value": 5}), ["documents"]),
    ("capture-dataset-list", "app", ("capture-error.children", {
        "capture-model.value": "models/tiny-llama", "capture-dataset.value": ["texts"],
        "capture-hooks.value": "blocks.0.hook_resid_post"}), ["Choose a dataset"]),
    ("capture-hook-pick-model-list", "app", ("capture-hook-pick.options", {"capture-model.value": ["a", "b"]}),
     ['"options":[]']),
    ("capture-hook-pick-dict", "app", ("capture-hook-pick.value..", {"capture-hook-pick.value": {"x": 1},
                                                               "capture-hooks.value": "blocks.0.hook_resid_post"}),
     [NO_UPDATE]),
    ("capture-hook-pick-two-names", "app", ("capture-hook-pick.value..", {"capture-hook-pick.value": "a b",
                                                                    "capture-hooks.value": ""}), [NO_UPDATE]),
    # app: Safety
    ("safety-heatmap-lists", "app", ("safety-heatmap-fig.figure", {
        "safety-model.value": "tiny-llama", "safety-pair.value": ["x"], "safety-heat.value": {"a": 1},
        "safety-refusal.value": [1], "safety-eta.value": [0.9]}), ["heatmap"]),
    ("safety-metric-list", "app", ("safety-curves-fig.figure", {"safety-model.value": "tiny-llama",
                                                                "safety-metric.value": ["x"]}), ["scatter"]),
    ("safety-model-list", "app", ("safety-headline.children", {"safety-model.value": ["tiny-llama"]}), ["result id"]),
    ("safety-model-dict", "app", ("safety-eta.options", {"safety-model.value": {"a": 1}}), ['"response"']),
]


@pytest.fixture(scope="module")
def template(tiny_dir, tiny_llama, tmp_path_factory):
    """A cache with a sound run, a run missing one shard file and a run whose manifest is not UTF-8."""
    bridge, tok = tiny_llama
    root = tmp_path_factory.mktemp("bad-inputs") / "cache"
    cache = ActivationCache(root)
    cfg = CaptureConfig(hooks=[HOOK], batch_size=2, max_length=32, progress=False)
    cache.capture(bridge, TEXTS, cfg, tokenizer=tok)
    holed = cache.capture(bridge, TEXTS[:3], cfg, tokenizer=tok, batches_per_shard=1)
    hole = holed.path / holed.manifest["shards"][1]["files"][HOOK]["path"]
    hole.unlink()
    garbled = cache.capture(bridge, TEXTS[1:], cfg, tokenizer=tok)
    m = garbled.path / "manifest.json"
    m.write_bytes(b"\xff" + m.read_bytes())
    return dict(root=root, model=str(tiny_dir["llama"]), holed=holed.run_id[:12], garbled=garbled.run_id[:12],
                holed_rel=hole.relative_to(root), garbled_rel=m.relative_to(root))


def snapshot(path: Path) -> dict[str, str]:
    """Every file (sha256) and folder under ``path``."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("surface,given,fragments", [c[1:] for c in CASES], ids=[f"{c[1]}-{c[0]}" for c in CASES])
def test_bad_input_gets_a_clear_error_and_changes_nothing(request, surface, given, fragments):
    {"cli": run_cli_row, "app": run_app_row}[surface](request, given, fragments)


def run_cli_row(request, argv: list[str], fragments: list[str]) -> None:
    template = request.getfixturevalue("template")
    tmp_path, monkeypatch, capsys = (request.getfixturevalue(n) for n in ("tmp_path", "monkeypatch", "capsys"))
    root = tmp_path / "cache"
    shutil.copytree(template["root"], root)
    work = tmp_path / "work"
    work.mkdir()
    for name, data in FILES.items():
        (work / name).write_bytes(data)
    monkeypatch.setenv("PROBEKIT_CACHE", str(root))
    monkeypatch.chdir(work)
    fill = dict(model=template["model"], work=str(work), holed=template["holed"], garbled=template["garbled"],
                holed_file=str(root / template["holed_rel"]), garbled_manifest=str(root / template["garbled_rel"]))
    before = snapshot(tmp_path)
    try:
        rc = main([a.format(**fill) for a in argv])
        message = ""
    except SystemExit as e:  # argparse errors (code 2) and SystemExit("message") from the commands
        rc, message = (e.code, "") if isinstance(e.code, int) else (1, str(e.code))
    out = capsys.readouterr()
    text = "\n".join((out.err, out.out, message))
    assert rc not in (0, None), f"exit code {rc}; output:\n{text}"
    for frag in fragments:
        assert frag.format(**fill) in text, f"{frag.format(**fill)!r} not in:\n{text}"
    assert "Traceback" not in text
    assert snapshot(tmp_path) == before, "the failed command changed files"


def run_app_row(request, given: tuple[str, dict], fragments: list[str]) -> None:
    # the app and its cache are built only when an app row runs (module-scoped, tests/unit/conftest.py)
    app_cache, dash_app, client = (request.getfixturevalue(n) for n in ("app_cache", "dash_app", "client"))
    fragment, values = given
    values = {k: app_cache["run_id"] if v == "RUN" else v for k, v in values.items()}
    before = snapshot(app_cache["root"])
    r = post(client, payload(dash_app.callback_map, callback_key(dash_app.callback_map, fragment), values))
    text = r.get_data(as_text=True)
    assert r.status_code == 200, f"{r.status_code}:\n{text[-1500:]}"
    for frag in fragments:
        assert frag in text, f"{frag!r} not in:\n{text[:1500]}"
    assert "Traceback" not in text
    assert snapshot(app_cache["root"]) == before, "the callback changed files"
