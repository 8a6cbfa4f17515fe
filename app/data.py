"""File access for the app: the cache root, parsed result files, run summaries and run statistics.

Everything here reads files through :func:`app.security.safe_path` and caches what it parsed, keyed by the
file's path and modification time, so a page view never re-parses or recomputes an unchanged file. Nothing
here runs a model; tokenizers (plain JSON files) are the only model files ever read.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .security import RUN_ID_RE, UnsafePathError, check_hook, check_name, check_run_id, safe_path

_ROOT: Path | None = None
_REPORTS: list[Path] = []
_LOCK = threading.Lock()
_JSON: dict[str, tuple[tuple[int, int], Any]] = {}
_MEMO: OrderedDict[tuple, Any] = OrderedDict()
_MEMO_SIZE = 512

#: Result kinds: folder under ``results/``, file name, and the command that writes it (``{model}`` filled in).
RESULTS = {
    "demo": ("demo", "layer_probes.json", "probekit demo --model {model}"),
    "ast-probe": ("ast-probe", "ast_probe.json", "probekit ast-probe --model {model}"),
    "dark-matter": ("dark-matter", "dark_matter.json", "probekit dark-matter run --model {model}"),
    "linearscope-lm": ("linearscope", "token-contributions.json", "probekit linearscope --model {model}"),
    "linearscope-digits": ("linearscope", "digit-{index}.json", "probekit linearscope --digit-index {index} --skip-lm"),
    "safety-activation": ("safety", "activation.json",
                          "probekit safety run --part activation --activation-model {model}"),
    "safety-weight": ("safety", "weight.json", "probekit safety run --part weight --weight-model {model}"),
}
DEFAULT_MODEL = "smollm2-135m"


class ResultMissing(LookupError):
    """A result file does not exist; ``command`` is the exact CLI command that writes it."""

    def __init__(self, what: str, command: str):
        super().__init__(f"No {what} result yet.")
        self.what, self.command = what, command


# --------------------------------------------------------------------------------------------- root


def set_root(root: str | Path | None) -> Path:
    """Set the cache root the app serves (``None``: ``$PROBEKIT_CACHE`` or ``./cache``); return it resolved."""
    global _ROOT
    if root is None:
        root = os.environ.get("PROBEKIT_CACHE") or "cache"
    _ROOT = Path(root).expanduser().resolve()
    _ROOT.mkdir(parents=True, exist_ok=True)
    return _ROOT


def set_reports(folders) -> list[Path]:
    """Set the report folders the app also reads (each holds ``<name>/`` folders written by ``probekit report``);
    ``None``: ``./reports`` when it exists. Returns them resolved; a folder that does not exist is an error."""
    global _REPORTS
    if folders is None:
        folders = ["reports"] if Path("reports").is_dir() else []
    out = []
    for f in folders:
        p = Path(f).expanduser().resolve()
        if not p.is_dir():
            raise FileNotFoundError(f"report folder {f!r} does not exist (--reports takes folders like ./reports "
                                    "that hold the <name>/ folders written by `probekit report`)")
        out.append(p)
    _REPORTS = out
    return list(_REPORTS)


def get_reports() -> list[Path]:
    """The report folders set by :func:`set_reports`."""
    return list(_REPORTS)


def get_root() -> Path:
    """The cache root set by :func:`set_root` (set on first use when nothing was set)."""
    return _ROOT if _ROOT is not None else set_root(None)


def cli_command(command: str, root: Path | None = None) -> str:
    """``command`` as a user types it, with ``PROBEKIT_CACHE=…`` in front when the root is not ``./cache``."""
    root = root or get_root()
    if root == Path("cache").resolve():
        return command
    return f"PROBEKIT_CACHE={shlex.quote(str(root))} {command}"


# --------------------------------------------------------------------------------------------- caching


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def load_json(path: Path) -> Any:
    """Parsed JSON of ``path`` (already checked by ``safe_path``), re-read only when mtime or size changed."""
    stamp = _stamp(path)
    key = str(path)
    with _LOCK:
        hit = _JSON.get(key)
        if hit and hit[0] == stamp:
            return hit[1]
    obj = json.loads(path.read_text(encoding="utf-8"))
    with _LOCK:
        _JSON[key] = (stamp, obj)
    return obj


def memo(key: tuple, fn: Callable[[], Any]) -> Any:
    """``fn()`` cached under ``key`` (keys include file stamps, so a changed file misses); small LRU."""
    with _LOCK:
        if key in _MEMO:
            _MEMO.move_to_end(key)
            return _MEMO[key]
    value = fn()
    with _LOCK:
        _MEMO[key] = value
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
    return value


def clear_caches() -> None:
    """Forget every parsed file and memoised value (tests)."""
    with _LOCK:
        _JSON.clear()
        _MEMO.clear()


# --------------------------------------------------------------------------------------------- results


def result_set_parts(result_id: str) -> list[str]:
    """Split a result-set id (``smollm2-135m`` or ``smollm2-135m/javascript``) into checked components."""
    if not isinstance(result_id, str) or not result_id:
        raise UnsafePathError("empty result id")
    parts = result_id.split("/")
    if len(parts) > 2:
        raise UnsafePathError(f"not a result id: {result_id[:60]!r}")
    return [check_name(p, "result id") for p in parts]


REPORT_PREFIX = "report:"


def result_index(root: Path | None = None) -> list:
    """Every result set of the cache root's ``results/`` and of the report folders
    (:class:`probekit.result_index.ResultSet`: id, kind, source, path, model, date, config)."""
    from probekit.result_index import scan

    root = Path(root or get_root())
    try:
        base = safe_path(root, "results")
    except UnsafePathError:
        base = None
    return scan(base, _REPORTS, load=load_json)


def _report_path(kind: str, result_id: str) -> Path:
    """The file of a report's result set, looked up in the index (an id is never turned into a path)."""
    for s in result_index():
        if s.source != "cache" and s.kind == kind and s.id == result_id:
            return s.path
    raise UnsafePathError(f"no {kind} result set {result_id[:80]!r} in the report folders "
                          f"({', '.join(str(r) for r in _REPORTS) or 'none given: probekit app --reports DIR'})")


def result_path(kind: str, result_id: str, *, index: int | None = None, root: Path | None = None) -> Path:
    """Path of one result file (it may not exist). Raises ``UnsafePathError`` on a crafted id.

    A report's set (id ``report:<name>…``) is found through the index of the report folders."""
    if isinstance(result_id, str) and result_id.startswith(REPORT_PREFIX):
        return _report_path(kind, result_id)
    folder, name, _ = RESULTS[kind]
    parts = result_set_parts(result_id)
    if "{index}" in name:
        if index is None or not isinstance(index, int) or index < 0:
            raise UnsafePathError(f"not a digit index: {index!r}")
        name = name.format(index=index)
    return safe_path(root or get_root(), "results", folder, *parts, name)


def missing_command(kind: str, result_id: str, *, index: int | None = None, root: Path | None = None) -> str:
    """The exact CLI command that writes result ``kind`` for ``result_id``."""
    if result_id.startswith(REPORT_PREFIX):
        return f"probekit report CONFIG  # the config named {result_id[len(REPORT_PREFIX):].split('/')[0]}"
    parts = result_id.split("/")
    cmd = RESULTS[kind][2].format(model=parts[0], index=index if index is not None else 0)
    if len(parts) == 2 and kind == "ast-probe":
        cmd += f" --language {parts[1]}"
    return cli_command(cmd, root)


def load_result(kind: str, result_id: str, *, index: int | None = None, root: Path | None = None) -> dict:
    """Parsed result file; raises ``ResultMissing`` (with the command to produce it) when it is absent."""
    path = result_path(kind, result_id, index=index, root=root)
    if not path.is_file():
        raise ResultMissing(kind, missing_command(kind, result_id, index=index, root=root))
    obj = load_json(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return obj


def result_stamp(kind: str, result_id: str, *, index: int | None = None, root: Path | None = None) -> tuple:
    """``(path, mtime, size)``: the memo key part that identifies one version of a result file."""
    path = result_path(kind, result_id, index=index, root=root)
    return (str(path), *_stamp(path)) if path.is_file() else (str(path), 0, 0)


def list_results(kind: str, root: Path | None = None) -> list[str]:
    """Ids of the result sets of ``kind``: the cache's (sorted, e.g. ``["smollm2-135m"]``), then the report
    folders' (``report:<name>``).

    For ``linearscope-digits`` the cache ids are the digit indices as strings, a report's ``report:<name>/<i>``.
    """
    return list_cache_results(kind, root) + [s.id for s in result_index(root) if s.source != "cache" and s.kind == kind]


def result_label(kind: str, result_id: str, root: Path | None = None) -> str:
    """A dropdown label for a result set: its id, model, source and date."""
    for s in result_index(root):
        if s.kind == kind and s.id == result_id:
            model = f" · {s.model}" if s.model and s.model not in s.id else ""
            return f"{s.id}{model} · {s.source} · {s.date}"
    return f"{result_id} (no result yet)"


def result_options(kind: str, ids: list[str], selected: str | None = None, root: Path | None = None) -> list[dict]:
    """Dropdown options for result-set ids of ``kind`` (labels from :func:`result_label`), plus ``selected`` when
    it is not one of them (a dropdown drops a value missing from its options; the page then says it is missing)."""
    ids = ids + [selected] if selected is not None and selected not in ids else ids
    return [{"label": result_label(kind, i, root), "value": i} for i in ids]


def list_cache_results(kind: str, root: Path | None = None) -> list[str]:
    """Ids of the result sets of ``kind`` under the cache root's ``results/`` only (sorted)."""
    root = root or get_root()
    folder, name, _ = RESULTS[kind]
    try:
        base = safe_path(root, "results", folder)
    except UnsafePathError:
        return []
    if not base.is_dir():
        return []
    out = []
    if kind == "linearscope-digits":
        d = base / "digits-cnn"
        for p in sorted(d.glob("digit-*.json")) if d.is_dir() else []:
            m = re.fullmatch(r"digit-(\d+)\.json", p.name)
            if m:
                out.append(m.group(1))
        return sorted(out, key=int)
    for sub in sorted(base.iterdir()):
        if not sub.is_dir() or not _ok_name(sub.name) or (kind == "linearscope-lm" and sub.name == "digits-cnn"):
            continue
        if (sub / name).is_file() and _inside(root, sub / name):
            out.append(sub.name)
        for sub2 in sorted(sub.iterdir()):  # e.g. ast-probe/<model>/javascript/
            if sub2.is_dir() and _ok_name(sub2.name) and (sub2 / name).is_file() and _inside(root, sub2 / name):
                out.append(f"{sub.name}/{sub2.name}")
    return out


def list_safety_results(root: Path | None = None) -> list[str]:
    """Folders under ``results/safety/`` holding ``activation.json`` and/or ``weight.json`` (sorted ids)."""
    return sorted(set(list_cache_results("safety-activation", root)) | set(list_cache_results("safety-weight", root)))


def safety_directions_path(result_id: str, payload: dict, root: Path | None = None) -> Path:
    """The refusal-direction file beside a ``safety_activation`` result (checked by ``safe_path``)."""
    name = check_name(str(payload.get("directions_file") or "refusal_directions.safetensors"), "directions file")
    if result_id.startswith(REPORT_PREFIX):
        act = _report_path("safety-activation", result_id)
        return safe_path(act.parent, name)
    return safe_path(root or get_root(), "results", "safety", *result_set_parts(result_id), name)


def _ok_name(name: str) -> bool:
    try:
        check_name(name)
        return True
    except UnsafePathError:
        return False


def _inside(root: Path, p: Path) -> bool:
    try:
        safe_path(root, str(p.relative_to(root)))
        return True
    except (UnsafePathError, ValueError):
        return False


PLOTLY_JS = "plotly.min.js"
_RESULT_SUFFIXES = (".json", ".html")


def _servable(full: Path, base: Path, asked: str) -> bool:
    """The one rule for a result file: the name asked for and the resolved file ``full`` both end in .json/.html,
    and ``full`` lies inside ``results/`` (``base``, resolved), so a link cannot lend a run's shard a result's
    name."""
    return asked.endswith(_RESULT_SUFFIXES) and full.suffix in _RESULT_SUFFIXES and full.is_relative_to(base)


def result_files(root: Path | None = None) -> list[dict]:
    """Every JSON/HTML file under ``results/`` (resolving inside it): ``{"kind", "id", "file", "rel", "bytes"}``."""
    root = Path(root or get_root())
    base = safe_path(root, "results")
    if not base.is_dir():
        return []
    out = []
    for p in sorted((root / "results").rglob("*")):
        rel = p.relative_to(root / "results")
        try:
            full = safe_path(root, "results", str(rel))
        except UnsafePathError:
            continue
        if not (_servable(full, base, p.name) and full.is_file()):
            continue
        out.append(dict(kind=rel.parts[0], id="/".join(rel.parts[1:-1]), file=p.name, rel=str(rel),
                        bytes=full.stat().st_size))
    return out


def result_file_path(rel: str, root: Path | None = None) -> Path:
    """A served result file: a ``.json``/``.html`` file that resolves inside ``results/``; raises
    ``UnsafePathError`` (anything else) or ``FileNotFoundError``. (The ``plotly.min.js`` that a folder of pages
    shares is served from the installed plotly, never from disk: see :func:`is_plotly_bundle`.)"""
    if not isinstance(rel, str) or not rel.endswith(_RESULT_SUFFIXES):  # before touching the file system
        raise UnsafePathError(f"not a result file: {str(rel)[:60]!r}")
    root = Path(root or get_root())
    p = safe_path(root, "results", rel)
    if not _servable(p, safe_path(root, "results"), rel):
        raise UnsafePathError(f"not a result file: {rel[:60]!r}")
    if not p.is_file():
        raise FileNotFoundError(rel)
    return p


def is_plotly_bundle(rel: str, root: Path | None = None) -> bool:
    """Whether ``rel`` asks for the plotly.js bundle beside a folder of result pages (``<folders>/plotly.min.js``,
    written by ``write_figures_page(plotlyjs="directory")``); the app answers with the installed bundle."""
    if not isinstance(rel, str) or rel.split("/")[-1] != PLOTLY_JS:
        return False
    try:
        safe_path(root or get_root(), "results", rel)  # the same part checks as any path (no .., no absolute parts)
    except UnsafePathError:
        return False
    return True


# --------------------------------------------------------------------------------------------- runs


def run_dir(run_id: str, root: Path | None = None) -> Path:
    """Folder of a run, after checking the id and that it resolves inside the root."""
    return safe_path(root or get_root(), "runs", check_run_id(run_id))


def open_run(run_id: str, root: Path | None = None):
    """Open a run by its full id (no prefix matching: an id is exact). Raises ``CacheError``/``UnsafePathError``."""
    from probekit.cache import CacheError, Run

    path = run_dir(run_id, root)
    if not (path / "manifest.json").is_file():
        raise CacheError(f"no run {run_id} in this cache")
    return Run(path)


def list_runs(root: Path | None = None) -> list[dict]:
    """Summaries of every committed run: id, model, hooks, rows, bytes, complete, config; or an error."""
    root = root or get_root()
    base = safe_path(root, "runs")
    if not base.is_dir():
        return []
    out = []
    for p in sorted(base.iterdir()):
        if not RUN_ID_RE.match(p.name) or not (p / "manifest.json").is_file():
            continue
        try:
            run = open_run(p.name, root)
            key = run.config.get("key", {})
            out.append(dict(run_id=run.run_id, model=str(key.get("model", "?")), hooks=run.hooks,
                            rows=run.n_rows, bytes=run.nbytes(), complete=run.complete, dtype=key.get("dtype"),
                            positions=key.get("positions"), max_length=key.get("max_length"),
                            shards=len(run.manifest["shards"]), error=None))
        except Exception as e:  # a corrupt run is listed with its problem, never hides the others
            out.append(dict(run_id=p.name, model="?", hooks=[], rows=0, bytes=0, complete=False, dtype=None,
                            positions=None, max_length=None, shards=0, error=str(e)))
    return out


def _manifest_stamp(run_id: str, root: Path | None) -> tuple:
    p = run_dir(run_id, root) / "manifest.json"
    return (str(p), *_stamp(p))


def natural_key(s: str) -> list:
    """Sort key that orders ``blocks.2`` before ``blocks.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# Within a block, hooks in the order the forward pass reaches them (TransformerBridge names; a prefix match).
_BLOCK_ORDER = ("hook_in", "hook_resid_pre", "ln1", "attn", "hook_attn_in", "hook_q_input", "hook_k_input",
                "hook_v_input", "hook_attn_out", "hook_resid_mid", "ln2", "mlp", "hook_mlp_in", "hook_mlp_out",
                "hook_resid_post", "hook_out")
_BEFORE_BLOCKS = ("hook_embed", "hook_pos_embed", "embed", "pos_embed", "rotary_emb", "hook_tokens")


def hook_order_key(name: str) -> tuple:
    """Sort key putting hooks in layer order, as the forward pass meets them: embeddings, then each block in
    turn (``resid_pre``, attention, ``resid_mid``, MLP, ``resid_post``), then what follows the blocks; names
    of other modules (``features.3``) in natural order after those."""
    m = re.match(r"blocks\.(\d+)\.(.+)$", name)
    if m:
        sub = m.group(2)
        rank = next((i for i, p in enumerate(_BLOCK_ORDER) if sub == p or sub.startswith(p + ".")),
                    len(_BLOCK_ORDER))
        return (1, int(m.group(1)), rank, natural_key(sub))
    if name.startswith(_BEFORE_BLOCKS):
        return (0, 0, 0, natural_key(name))
    if name.startswith(("ln_final", "unembed", "hook_final", "hook_logits")):
        return (2, 0, 0, natural_key(name))
    return (3, 0, 0, natural_key(name))


def run_hook_stats(run_id: str, *, max_rows: int = 1024, root: Path | None = None) -> dict:
    """Per hook, statistics of a bounded, evenly spaced sample of rows (memoised per manifest version).

    Returns
    -------
    dict
        ``{"hooks": [...], "mean_norm": [...], "std_norm": [...], "mean_abs": [...], "n_sampled": int}``,
        hooks in layer order (:func:`hook_order_key`).
    """
    def compute() -> dict:
        run = open_run(run_id, root)
        n = run.n_rows
        rows = np.unique(np.linspace(0, max(n - 1, 0), min(n, max_rows)).astype(np.int64)) if n else np.zeros(0, int)
        hooks = sorted(run.hooks, key=hook_order_key)
        stats = dict(hooks=hooks, mean_norm=[], std_norm=[], mean_abs=[], n_sampled=int(len(rows)))
        for h in hooks:
            x = run.load(h, rows).float().flatten(1).numpy() if len(rows) else np.zeros((0, 1), np.float32)
            norms = np.linalg.norm(x, axis=1) if len(x) else np.zeros(0)
            stats["mean_norm"].append(float(norms.mean()) if len(norms) else float("nan"))
            stats["std_norm"].append(float(norms.std()) if len(norms) else float("nan"))
            stats["mean_abs"].append(float(np.abs(x).mean()) if x.size else float("nan"))
        return stats

    return memo(("hook_stats", _manifest_stamp(run_id, root), max_rows), compute)


def run_documents(run_id: str, root: Path | None = None) -> list[int]:
    """Document indices present in a run (sorted)."""
    def compute() -> list[int]:
        m = open_run(run_id, root).meta_tensors(["doc_index"])
        return sorted(int(d) for d in np.unique(m["doc_index"].numpy()))

    return memo(("docs", _manifest_stamp(run_id, root)), compute)


def tokenizer_folder(model: str, root: Path | None = None) -> Path | None:
    """The tokenizer folder of a run's model when it lies inside the cache root (else ``None``)."""
    from probekit.ast_probe_run import RANDOM_INIT_PREFIX

    root = root or get_root()
    model = model[len(RANDOM_INIT_PREFIX):] if model.startswith(RANDOM_INIT_PREFIX) else model  # its base's tokenizer
    try:
        p = Path(model)
        if p.is_absolute():
            p = safe_path(root, str(p.resolve().relative_to(root)))
        elif re.fullmatch(r"[A-Za-z0-9._+-]+", model):
            p = safe_path(root, "models", model)
        else:
            p = safe_path(root, model)
    except (UnsafePathError, ValueError):
        return None
    return p if (p / "tokenizer_config.json").is_file() or (p / "tokenizer.json").is_file() else None


def tokenizer(folder: Path):
    """The tokenizer of a model folder inside the root (plain JSON files; memoised)."""
    def load():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))

    return memo(("tokenizer", str(folder), *_stamp(folder)), load)


def document_activations(run_id: str, hook: str, doc: int, *, root: Path | None = None) -> dict:
    """A cached document's rows at ``hook`` in position order.

    Returns
    -------
    dict
        ``{"tokens": [str], "token_ids": [int], "positions": [int], "x": (n, d) float32 array, "decoded": bool,
        "model": str}``; ``decoded`` is False when no tokenizer was found inside the cache root (tokens are then
        shown as ids).
    """
    check_hook(hook)
    doc = int(doc)

    def compute() -> dict:
        run = open_run(run_id, root)
        if hook not in run.hooks:
            raise ValueError(f"run {run_id[:12]} has no hook {hook!r}")
        m = run.meta_tensors(["doc_index", "position", "token_id"])
        rows = np.flatnonzero(m["doc_index"].numpy() == doc)
        if not len(rows):
            raise ValueError(f"run {run_id[:12]} has no document {doc}")
        pos = m["position"].numpy()[rows]
        order = np.argsort(pos, kind="stable")
        rows, pos = rows[order], pos[order]
        ids = m["token_id"].numpy()[rows]
        x = run.load(hook, rows).float().flatten(1).numpy()
        model = str(run.config.get("key", {}).get("model", ""))
        folder = tokenizer_folder(model, root)
        if folder is not None:
            tok = tokenizer(folder)
            tokens = [tok.decode([int(t)]) for t in ids]
        else:
            tokens = [f"#{int(t)}" for t in ids]
        return dict(tokens=tokens, token_ids=[int(t) for t in ids], positions=[int(p) for p in pos], x=x,
                    decoded=folder is not None, model=model)

    return memo(("doc-acts", _manifest_stamp(run_id, root), hook, doc), compute)


def token_values(run_id: str, hook: str, doc: int, *, root: Path | None = None) -> dict:
    """Per-token activation norm at ``hook`` for document ``doc`` of a run.

    Returns
    -------
    dict
        ``{"tokens": [str], "token_ids": [int], "positions": [int], "values": [float], "decoded": bool}``
        in position order (see :func:`document_activations`).
    """
    d = document_activations(run_id, hook, doc, root=root)
    return dict(tokens=d["tokens"], token_ids=d["token_ids"], positions=d["positions"],
                values=[float(v) for v in np.linalg.norm(d["x"], axis=1)], decoded=d["decoded"])


# --------------------------------------------------------------------------------------------- models


def model_choices(root: Path | None = None) -> list[dict]:
    """Models the capture page offers: ``{"value", "label", "ready", "hint"}``.

    Registry language models (ready when fetched into ``<root>/models/<name>``) and any other folder
    ``<root>/models/<folder>`` holding a ``config.json``. Values are registry names or ``models/<folder>``.
    """
    from probekit.models import COMPLETE_MARKER, REGISTRY

    root = root or get_root()
    out = []
    for name, spec in REGISTRY.items():
        if spec.kind == "cnn":
            continue
        ready = (safe_path(root, "models", name) / COMPLETE_MARKER).is_file()
        out.append(dict(value=name, label=f"{name} (registry{'' if ready else ', not fetched'})", ready=ready,
                        hint=None if ready else cli_command(f"probekit models fetch {name}", root)))
    mdir = safe_path(root, "models")
    for p in sorted(mdir.iterdir()) if mdir.is_dir() else []:
        if p.name in REGISTRY or not _ok_name(p.name) or not _inside(root, p) or not (p / "config.json").is_file():
            continue
        out.append(dict(value=f"models/{p.name}", label=f"models/{p.name} (local folder)", ready=True, hint=None))
    return out


# --------------------------------------------------------------------------------------------- hook names


def model_folder(model: str, root: Path | None = None) -> Path:
    """The folder of a capture-page model value (a registry name or ``models/<folder>``), inside the root."""
    root = root or get_root()
    m = re.fullmatch(r"models/(.+)", model) if isinstance(model, str) else None  # else check_name refuses it
    return safe_path(root, "models", check_name(m.group(1) if m else model, "model"))


def model_hook_names(model: str, root: Path | None = None) -> list[str]:
    """Every hook name the capture accepts for ``model``, in layer order, known without loading its weights.

    The model is built from its ``config.json`` on PyTorch's ``meta`` device (shapes only, no memory, no
    weights read) and booted as a ``TransformerBridge`` with its tokenizer, so the names are the ones the capture
    worker's bridge has. To keep the first request short the config is cut to one block and that block's names
    are repeated for every layer (each block of these architectures has the same hook points); a config that
    cannot be cut is booted whole. Memoised per version of ``config.json``. Raises ``FileNotFoundError`` when the
    folder has no ``config.json``.
    """
    folder = model_folder(model, root)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{model} has no config.json (not fetched yet?)")

    def boot(cfg) -> list[str]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformer_lens.model_bridge import TransformerBridge

        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(cfg)
        tok = AutoTokenizer.from_pretrained(str(folder))
        return list(TransformerBridge.boot_transformers(str(folder), hf_model=hf, tokenizer=tok).hook_dict)

    def compute() -> list[str]:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(str(folder))
        n = getattr(cfg, "num_hidden_layers", None)
        if isinstance(n, int) and n > 1 and not isinstance(getattr(cfg, "layer_types", None), list):
            try:
                cfg.num_hidden_layers = 1
                one = boot(cfg)
                names = [re.sub(r"^blocks\.0\.", f"blocks.{l}.", h) for h in one
                         for l in (range(n) if h.startswith("blocks.0.") else [0])]
                return sorted(dict.fromkeys(names), key=hook_order_key)
            except Exception:  # an architecture that does not boot with one block: boot it whole
                cfg = AutoConfig.from_pretrained(str(folder))
        return sorted(boot(cfg), key=hook_order_key)

    return memo(("hook_names", str(cfg_path), *_stamp(cfg_path)), compute)
