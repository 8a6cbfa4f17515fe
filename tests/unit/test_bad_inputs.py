"""The bad-input catalogue: what a new user might type, the error text that must name the problem, and the rule
that nothing already written changes.

Each row runs ``probekit`` in-process (``probekit.cli.main``) against a cache that holds a sound run, a run with
a missing shard and a run whose manifest is not UTF-8, with ``$PROBEKIT_CACHE`` pointing at it and the working
folder beside it. A row passes when the command fails (non-zero exit), its output contains every expected
fragment, and the whole tree (cache, working folder, inputs) is byte-for-byte the same afterwards.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from probekit.cache import ActivationCache
from probekit.capture import CaptureConfig
from probekit.cli import main
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
CAP = ["capture", "--model", "{model}", "--hooks", HOOK]

# (id, argv, fragments that must all appear in the output)
CASES = [
    # capture: inputs
    ("texts-binary", CAP + ["--texts", "{work}/binary.txt"], ["--texts {work}/binary.txt", "not UTF-8"]),
    ("texts-missing", CAP + ["--texts", "{work}/nope.txt"], ["no such file", "nope.txt"]),
    ("texts-empty", CAP + ["--texts", "{work}/empty.txt"], ["empty.txt", "no non-blank line"]),
    ("texts-and-stdlib", CAP + ["--texts", "{work}/texts.txt", "--stdlib-functions", "3"],
     ["exactly one of --texts FILE or --stdlib-functions N"]),
    ("no-documents", CAP, ["exactly one of --texts FILE or --stdlib-functions N"]),
    ("stdlib-zero", CAP + ["--stdlib-functions", "0"], ["argument --stdlib-functions", "positive integer"]),
    ("stdlib-word", CAP + ["--stdlib-functions", "ten"], ["argument --stdlib-functions", "'ten'"]),
    # capture: flags
    ("positions-words", CAP + ["--texts", "{work}/texts.txt", "--positions", "a,b"], ["argument --positions", "'a'"]),
    ("positions-past-end", CAP + ["--texts", "{work}/texts.txt", "--positions", "500"],
     ["positions [500]", "past the end of every document", "--positions"]),
    ("batches-per-shard-zero", CAP + ["--texts", "{work}/texts.txt", "--batches-per-shard", "0"],
     ["argument --batches-per-shard", "positive integer"]),
    ("batches-per-shard-negative", CAP + ["--texts", "{work}/texts.txt", "--batches-per-shard=-2"],
     ["argument --batches-per-shard", "got -2"]),
    ("batch-size-zero", CAP + ["--texts", "{work}/texts.txt", "--batch-size", "0"], ["argument --batch-size"]),
    ("max-length-zero", CAP + ["--texts", "{work}/texts.txt", "--max-length", "0"], ["argument --max-length"]),
    ("dtype", CAP + ["--texts", "{work}/texts.txt", "--dtype", "int8"], ["argument --dtype", "invalid choice"]),
    ("unknown-hook", ["capture", "--model", "{model}", "--hooks", "blocks.0.hook_resid_pots", "--texts",
                      "{work}/texts.txt"], ["hook_resid_pots"]),
    ("unknown-model", ["capture", "--model", "{work}/no-model", "--hooks", HOOK, "--texts", "{work}/texts.txt"],
     ["unknown model", "no-model"]),
    # cache
    ("cache-show-unknown", ["cache", "show", "nope"], ["no run matching 'nope'"]),
    ("cache-rm-unknown", ["cache", "rm", "nope"], ["no run matching 'nope'"]),
    ("cache-show-missing-shard", ["cache", "show", "{holed}"],
     ["{holed_file}", "missing", "Run the same capture again", "probekit cache rm {holed}"]),
    ("cache-verify-missing-shard", ["cache", "verify", "{holed}"], ["{holed_file}", "missing"]),
    ("cache-show-not-utf8", ["cache", "show", "{garbled}"], ["{garbled_manifest}", "not UTF-8",
                                                             "probekit cache rm {garbled}"]),
    ("cache-verify-not-utf8", ["cache", "verify", "{garbled}"], ["{garbled_manifest}", "not UTF-8"]),
    # probe commands: list flags
    ("ast-probe-layers", ["ast-probe", "--model", "{model}", "--layers", "a,b"], ["argument --layers", "'a'"]),
    ("ast-probe-k-sweep", ["ast-probe", "--model", "{model}", "--k-sweep", "8,x"], ["argument --k-sweep", "'x'"]),
    ("dark-matter-expansions", ["dark-matter", "run", "--model", "{model}", "--expansions", "2,x,8"],
     ["argument --expansions", "'x'"]),
    ("linearscope-digits", ["linearscope", "--skip-lm", "--out", "{work}/ls", "--digits", "1,x"],
     ["digits must be 'per-class' or comma-separated", "'1,x'"]),
    ("linearscope-digit-index", ["linearscope", "--skip-lm", "--out", "{work}/ls", "--digit-index=-2"],
     ["digit_index must be a test-set index"]),
    ("models-fetch-typo", ["models", "fetch", "smollm2-13"], ["unknown model 'smollm2-13'", "Did you mean"]),
    # report configs
    ("report-binary", ["report", "{work}/binary.yaml"], ["{work}/binary.yaml", "not a UTF-8 text file"]),
    ("report-missing", ["report", "{work}/missing.yaml"], ["missing.yaml", "no such config file"]),
    ("report-not-yaml", ["report", "{work}/not-yaml.yaml"], ["not-yaml.yaml", "not valid YAML"]),
    ("report-wrong-type", ["report", "{work}/wrong-type.yaml"], ["probes.ast_probe.k", "expected an integer",
                                                                 "'abc'"]),
    ("report-batch-size-zero", ["report", "{work}/batch-zero.yaml"],
     ["probes.layer_probes.batch_size", "positive integer"]),
    ("report-float-epochs", ["report", "{work}/epochs-float.yaml"], ["probes.dark_matter.epochs", "1.5"]),
    ("report-model-list", ["report", "{work}/model-list.yaml"], ["model: expected a string"]),
    ("report-unknown-probe", ["report", "{work}/unknown-probe.yaml"], ["unknown probe 'nope'; allowed probes"]),
    ("report-unknown-setting", ["report", "{work}/unknown-setting.yaml"],
     ["probes.ast_probe: unknown setting 'n_function'; allowed"]),
    ("report-few-functions", ["report", "{work}/few-functions.yaml"],
     ["probes.ast_probe: n_functions must be at least 30"]),
    ("report-probe-not-mapping", ["report", "{work}/probe-not-mapping.yaml"], ["probes.ast_probe must be a mapping"]),
    ("report-two-widths", ["report", "{work}/two-widths.yaml"], ["probes.dark_matter: per-token scaling needs at "
                                                                 "least 3"]),
    ("report-unknown-key", ["report", "{work}/unknown-key.yaml"], ["unknown key 'modle'; allowed"]),
    ("report-bad-name", ["report", "{work}/bad-name.yaml"], ["name '../x' must be"]),
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


@pytest.mark.parametrize("argv,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error_and_changes_nothing(template, tmp_path, monkeypatch, capsys, argv, fragments):
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
