"""Say what works: the architecture × capability table, and the same checks run on one model folder.

The README table is generated from the tests: ``tests/unit/test_architectures.py`` (and any test using the
``record_capability`` fixture of ``tests/conftest.py``) records one cell per (family, capability) into
``tests/capabilities.json``; ``python -m probekit.archtable`` renders that file into README.md between the
``<!-- archtable:start -->`` and ``<!-- archtable:end -->`` markers (``--check`` fails when it is stale).

``probekit models check PATH`` runs the same kind of checks on one model folder (``check_model``) and prints
its row.

A cell is ``{"status": "pass"|"fail"|"refused"|"n/a"|"skipped", "note": str}``.

Example
-------
>>> print(render_table({"gpt2": {"load": {"status": "pass", "note": ""}}}).splitlines()[2])
| GPT-2 | ✓ |
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

START, END = "<!-- archtable:start -->", "<!-- archtable:end -->"

# Known columns in display order; any other capability a test records is appended after them, sorted.
COLUMNS: dict[str, str] = {
    "load": "load (folder)",
    "load_hub": "load (Hub id, offline cache)",
    "resid_pre": "resid_pre",
    "resid_mid": "resid_mid",
    "resid_post": "resid_post",
    "attn_out": "attn_out",
    "mlp_out": "mlp_out",
    "mlp_post": "mlp.hook_post",
    "attn_pattern": "attn.hook_pattern",
    "stop_early": "stop early",
    "padding": "padding",
    "no_pad_token": "no pad token",
    "linearscope": "LinearScope",
    "ablation": "directional ablation",
    "addition": "activation addition",
    "patching": "activation patching",
    "generation": "generation under interventions (KV cache)",
}
# Known rows in display order; others are appended sorted.
FAMILY_NAMES: dict[str, str] = {
    "gpt2": "GPT-2", "gpt_neox": "GPT-NeoX (Pythia)", "gptj": "GPT-J", "llama": "Llama", "mistral": "Mistral",
    "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma", "gemma2": "Gemma 2", "gemma3": "Gemma 3",
    "phi3": "Phi-3", "olmo2": "OLMo 2", "bert": "BERT", "roberta": "RoBERTa", "biogpt": "BioGPT",
}
MARKS = {"pass": "✓", "fail": "✗", "refused": "refused", "n/a": "—", "skipped": "skipped"}
STATUSES = tuple(MARKS)

# capability → bridge hook suffix after ``blocks.{l}.``
SITES: dict[str, str] = {
    "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "mlp_post": "mlp.hook_post",
    "attn_pattern": "attn.hook_pattern",
}


# --------------------------------------------------------------------------------------------- records


def load_records(path: str | Path) -> dict[str, dict[str, dict]]:
    """Read ``{family: {capability: cell}}``; a missing file is an empty table."""
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e}); delete it and run the architecture tests again.") from e
    for fam, caps in data.items():
        for cap, cell in caps.items():
            if not isinstance(cell, dict) or cell.get("status") not in STATUSES:
                raise ValueError(f"{p}: cell {fam}/{cap} = {cell!r}; expected a status in {STATUSES}.")
    return data


def merge_records(path: str | Path, new: dict[str, dict[str, dict]]) -> dict:
    """Merge ``new`` cells over the file's (cells not in ``new`` are kept); write atomically; return the merge."""
    merged = load_records(path)
    for fam, caps in new.items():
        merged.setdefault(fam, {}).update(caps)
    merged = {f: dict(sorted(c.items())) for f, c in sorted(merged.items())}
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(_dump(merged))
    os.replace(tmp, p)
    return merged


def _dump(records: dict) -> str:
    """JSON with one line per cell, so a changed result is a one-line diff."""
    fams = []
    for fam, caps in records.items():
        cells = ",\n".join(f"  {json.dumps(c)}: {json.dumps(cell, ensure_ascii=False)}" for c, cell in caps.items())
        fams.append(f" {json.dumps(fam)}: {{\n{cells}\n }}")
    return "{\n" + ",\n".join(fams) + "\n}\n"


# --------------------------------------------------------------------------------------------- rendering


def _order(keys, known) -> list[str]:
    return [k for k in known if k in keys] + sorted(k for k in keys if k not in known)


def render_table(records: dict[str, dict[str, dict]]) -> str:
    """A Markdown table: one row per family, one column per capability recorded for any family."""
    caps = _order({c for row in records.values() for c in row}, COLUMNS)
    fams = _order(set(records), FAMILY_NAMES)
    lines = ["| architecture | " + " | ".join(COLUMNS.get(c, c) for c in caps) + " |",
             "|---|" + "---|" * len(caps)]
    for fam in fams:
        cells = []
        for c in caps:
            cell = records[fam].get(c)
            if cell is None:
                cells.append("")
                continue
            mark = MARKS[cell["status"]]
            cells.append(f"{mark} ({cell['note']})" if cell.get("note") else mark)
        lines.append(f"| {FAMILY_NAMES.get(fam, fam)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_readme(readme: str | Path, records: dict) -> bool:
    """Replace the table between the markers in ``readme``; return True if the file changed."""
    p = Path(readme)
    text = p.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise ValueError(f"{p} has no {START} … {END} markers; add them where the table belongs.")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{render_table(records)}\n{END}{tail}"
    if new == text:
        return False
    p.write_text(new, encoding="utf-8")
    return True


# --------------------------------------------------------------------------------------------- live checks

_CHECK_TEXTS = ["def f(x):\n    return x + 1", "import os", "class A:\n    pass  # é"]


def _cell(status: str, note: str = "") -> dict:
    return dict(status=status, note=note)


def _reference(bridge, docs: list[list[int]], names: list[str]) -> list[dict[str, torch.Tensor]]:
    """Per-document (unpadded) ``run_with_cache`` activations ``(pos, …)``; patterns ``(q, head, k)``."""
    out = []
    want = set(names)
    for d in docs:
        with torch.inference_mode():
            _, cache = bridge.run_with_cache(torch.tensor([d]), names_filter=lambda n: n in want,
                                             return_type=None)
        out.append({n: cache[n][0].movedim(1, 0) if n.endswith("hook_pattern") else cache[n][0] for n in names})
    return out


def _matches(res, ref, names: list[str], atol: float) -> bool:
    """Capture rows (any order) equal the per-document reference at every (doc, position)."""
    for n in names:
        for row in range(res.n_rows):
            doc, pos = int(res.meta["doc_index"][row]), int(res.meta["position"][row])
            want = ref[doc][n][pos]
            got = res.acts[n][row]
            if want.dim() == 2:  # pattern (head, key): capture pads the key axis to max_length
                got = got[:, : want.shape[-1]]
            if not torch.allclose(got.float(), want.float(), rtol=1e-4, atol=atol):
                return False
    return True


def check_model(path: str | Path, *, atol: float = 1e-4) -> dict[str, dict]:
    """Run the capability checks on one model folder; return ``{capability: cell}``.

    Loads the model (config, weights, tokenizer), then on three short documents: each capture site at every
    layer by the automatic mechanism against per-document ``run_with_cache`` (the note names the mechanism);
    stop-early (the last block never runs when only block 0 is asked for, both mechanisms); padding (batched
    equals one at a time); a tokenizer without a pad token. A folder that is not a model folder raises
    ``ModelError`` naming the problem; a model that does not load is reported as "refused" with the reason.
    """
    from .capture import CaptureConfig, capture
    from .hooks import plain_layout
    from .models import ModelError, load_model, plain_model

    p = Path(path).expanduser()
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ModelError(f"{p}: not a model folder (expected a folder with config.json, as save_pretrained "
                         "writes it).")
    cells: dict[str, dict] = {}
    try:
        bridge, tok = load_model(str(p))
    except Exception as e:  # report why, do not crash: this is what the row is for
        cells["load"] = _cell("refused", f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        return cells
    cells["load"] = _cell("pass")
    docs = [tok(t, add_special_tokens=True)["input_ids"][:32] for t in _CHECK_TEXTS]
    L = bridge.cfg.n_layers
    names_all = []
    for cap, suffix in SITES.items():
        names = [f"blocks.{l}.{suffix}" for l in range(L)]
        if any(n not in bridge.hook_dict for n in names):
            cells[cap] = _cell("n/a", "no such site")
            continue
        names_all += names
        try:
            ref = _reference(bridge, docs, names)
            res = capture(bridge, docs, CaptureConfig(hooks=names, batch_size=3, max_length=32, progress=False))
            ok = _matches(res, ref, names, atol)
            cells[cap] = _cell("pass" if ok else "fail", res.mechanism)
        except Exception as e:
            cells[cap] = _cell("fail", f"{type(e).__name__}: {str(e)[:120]}")

    # stop early: the last block must not run when only block 0 is asked for (both mechanisms)
    plain = plain_model(bridge)
    layout = plain_layout(plain) if plain is not None else None
    targets = {"bridge": bridge.blocks[L - 1]}
    if layout is not None:
        targets["plain"] = plain.get_submodule(layout.blocks)[L - 1]
    ran = []
    handles = [m.register_forward_pre_hook(lambda *a, k=k: ran.append(k)) for k, m in targets.items()]
    try:
        for mech in targets:
            res = capture(bridge, docs, CaptureConfig(hooks=["blocks.0.hook_resid_post"], progress=False),
                          mechanism=mech)
            if res.mechanism != mech:
                raise RuntimeError(f"asked for the {mech} mechanism, got {res.mechanism}")
        cells["stop_early"] = _cell("fail" if ran else "pass", "+".join(targets))
    except Exception as e:
        cells["stop_early"] = _cell("fail", f"{type(e).__name__}: {str(e)[:120]}")
    finally:
        for h in handles:
            h.remove()

    # padding, and a tokenizer without a pad token: batched rows equal one-at-a-time rows
    probe = [n for n in names_all if n.endswith(("hook_resid_post", "hook_pattern"))] or names_all
    for cap, tokenizer in (("padding", tok), ("no_pad_token", _without_pad(tok))):
        try:
            cfg = dict(hooks=probe, max_length=32, progress=False)
            batched = capture(bridge, _CHECK_TEXTS, CaptureConfig(batch_size=3, **cfg), tokenizer=tokenizer)
            alone = capture(bridge, _CHECK_TEXTS, CaptureConfig(batch_size=1, **cfg), tokenizer=tokenizer)
            ok = all(torch.allclose(batched.acts[n][_doc_order(batched)], alone.acts[n][_doc_order(alone)],
                                    rtol=1e-4, atol=atol) for n in probe)
            cells[cap] = _cell("pass" if ok else "fail")
        except Exception as e:
            cells[cap] = _cell("fail", f"{type(e).__name__}: {str(e)[:120]}")
    _linearscope_cell(bridge, cells)
    return cells


def _linearscope_cell(bridge, cells: dict) -> None:
    """The "linearscope" cell, when ``probekit.probes.linearscope_transformer`` exposes a public
    ``check_support(model)`` (returns None when supported, raises ``ValueError`` saying why not)."""
    try:
        from .probes import linearscope_transformer as lt
    except ImportError:
        return
    check = getattr(lt, "check_support", None)
    if not callable(check):
        return
    try:
        check(bridge)
        cells["linearscope"] = _cell("pass")
    except ValueError as e:
        cells["linearscope"] = _cell("refused", str(e).splitlines()[0][:160])


def _without_pad(tok):
    t = copy.deepcopy(tok)
    t.pad_token = None
    return t


def _doc_order(res) -> torch.Tensor:
    return torch.argsort(res.meta["doc_index"] * 1_000_000 + res.meta["position"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m probekit.archtable",
                                 description="Render tests/capabilities.json into the README architecture table.")
    ap.add_argument("--records", default="tests/capabilities.json")
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--check", action="store_true", help="exit 1 if the README table is not up to date")
    ap.add_argument("--print", action="store_true", help="print the table instead of writing the README")
    args = ap.parse_args(argv)
    records = load_records(args.records)
    if not records:
        print(f"{args.records}: no records; run the architecture tests first "
              "(pytest tests/unit/test_architectures.py).", file=sys.stderr)
        return 2
    if args.print:
        print(render_table(records))
        return 0
    if args.check:
        text = Path(args.readme).read_text(encoding="utf-8")
        stale = f"{START}\n{render_table(records)}\n{END}" not in text
        if stale:
            print(f"{args.readme}: the architecture table is stale; run python -m probekit.archtable", file=sys.stderr)
        return 1 if stale else 0
    changed = update_readme(args.readme, records)
    print(f"{args.readme}: table {'updated' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
