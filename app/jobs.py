"""Background jobs: validate what the page asked for, run the work in a worker process, and report progress.

The Dash background callback (a :class:`dash.DiskcacheManager` process) calls :func:`run_capture_job` (or
:func:`run_safety_prompt_job`), which starts ``python -m app.capture_worker`` (``app.safety_worker``) and reads
one JSON line per progress step from it. The web server process never loads a model; cancelling the job kills
the manager's process and, with it, the worker (psutil kills the whole process tree).
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .security import UnsafePathError, check_hook, check_index, check_name, safe_path, text_or_none

MAX_FUNCTIONS = 2000
MAX_TEXTS = 500
MAX_TEXT_CHARS = 20_000
MAX_HOOKS = 64
DOC_SEPARATOR = "---"
APP_PARENT = Path(__file__).resolve().parents[1]  # the folder holding the ``app`` package


@dataclass
class CaptureSpec:
    """A validated capture request; ``model_path`` is a registry name or an absolute folder in the root."""

    model: str
    model_path: str
    hooks: list[str]
    dataset: str = "stdlib"  # "stdlib" | "texts"
    n_functions: int = 20
    texts: list[str] = field(default_factory=list)
    positions: str = "all"
    dtype: str = "float32"
    max_length: int = 256
    batch_size: int = 8
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def split_texts(text: str | None) -> list[str]:
    """Pasted documents, separated by lines holding only ``---`` (blank documents dropped)."""
    docs, cur = [], []
    for line in (text or "").splitlines():
        if line.strip() == DOC_SEPARATOR:
            docs.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    docs.append("\n".join(cur))
    return [d for d in docs if d.strip()]


def parse_hooks(text: str | None) -> list[str]:
    """Hook names separated by commas, spaces or newlines; each must look like a hook name."""
    hooks = [h for h in re.split(r"[\s,]+", text or "") if h]
    for h in hooks:
        check_hook(h)
    return list(dict.fromkeys(hooks))


def build_spec(root: Path, *, model: str | None, hooks: str | None, dataset: str | None, n_functions: int | None,
               texts: str | None, positions: str | None = "all", dtype: str | None = "float32",
               max_length: int | None = 256, batch_size: int | None = 8) -> CaptureSpec:
    """Validate the capture form; raise ``ValueError`` with a message for the page on any bad field."""
    from probekit.models import COMPLETE_MARKER, REGISTRY

    if not model or not isinstance(model, str):
        raise ValueError("Choose a model.")
    hooks, texts = text_or_none(hooks, "The hook names"), text_or_none(texts, "The pasted documents")
    if model in REGISTRY:
        if REGISTRY[model].kind == "cnn":
            raise ValueError(f"{model} is an image model; the capture page captures text models.")
        folder = safe_path(root, "models", model)
        if not (folder / COMPLETE_MARKER).is_file():
            raise ValueError(f"{model} is not fetched into this cache yet: run `probekit models fetch {model}` "
                             f"with PROBEKIT_CACHE={root}.")
        model_path = model
    else:
        m = re.fullmatch(r"models/(.+)", model)
        if not m:
            raise ValueError(f"Unknown model {model[:60]!r}: choose a registry name or a folder models/<name> "
                             "inside the cache root.")
        folder = safe_path(root, "models", check_name(m.group(1), "model folder"))
        if not (folder / "config.json").is_file():
            raise ValueError(f"{model} has no config.json: not a Hugging Face model folder.")
        model_path = str(folder)
    try:
        hook_list = parse_hooks(hooks)
    except UnsafePathError as e:
        raise ValueError(str(e)) from None
    if not hook_list:
        raise ValueError("Name at least one hook, e.g. blocks.0.hook_resid_post.")
    if len(hook_list) > MAX_HOOKS:
        raise ValueError(f"At most {MAX_HOOKS} hooks per capture.")
    if positions not in ("all", "last"):
        raise ValueError("positions must be 'all' or 'last'.")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError("dtype must be float32, bfloat16 or float16.")
    max_length = _whole(max_length, 256, 8, 4096, "max length")
    batch_size = _whole(batch_size, 8, 1, 256, "batch size")
    spec = CaptureSpec(model=model, model_path=model_path, hooks=hook_list, positions=positions, dtype=dtype,
                       max_length=max_length, batch_size=batch_size)
    if dataset == "stdlib":
        n = _whole(n_functions, 0, 1, MAX_FUNCTIONS, "number of functions")
        spec.dataset, spec.n_functions = "stdlib", n
    elif dataset == "texts":
        docs = split_texts(texts)
        if not docs:
            raise ValueError(f"Paste at least one document (separate documents with a line '{DOC_SEPARATOR}').")
        if len(docs) > MAX_TEXTS or any(len(d) > MAX_TEXT_CHARS for d in docs):
            raise ValueError(f"At most {MAX_TEXTS} documents of {MAX_TEXT_CHARS:,} characters each.")
        spec.dataset, spec.texts = "texts", docs
    else:
        raise ValueError("Choose a dataset: stdlib functions or pasted texts.")
    return spec


def _whole(value: object, default: int, lo: int, hi: int, what: str) -> int:
    """``value`` (``default`` when empty) as a whole number in ``[lo, hi]``, else ``ValueError`` for the page."""
    try:
        v = check_index(default if value is None or value == "" else value, what)
    except ValueError:
        v = None
    if v is None or not lo <= v <= hi:
        raise ValueError(f"{what} must be a whole number in [{lo}, {hi}].")
    return v


def parse_event(line: str) -> dict | None:
    """One worker line as an event dict (``{"event": "progress"|"done"|"error", …}``), else ``None``."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        ev = json.loads(line)
    except json.JSONDecodeError:
        return None
    return ev if isinstance(ev, dict) and ev.get("event") in ("progress", "done", "error", "status") else None


def progress_percent(done: float, total: float | None) -> float:
    """Percent in [0, 100] (0 while the total is unknown)."""
    if not total:
        return 0.0
    return max(0.0, min(100.0, 100.0 * float(done) / float(total)))


def worker_env(root: Path) -> dict:
    """Environment of the worker: the app's cache root, the ``app`` package importable, no network."""
    env = dict(os.environ)
    env["PROBEKIT_CACHE"] = str(root)
    env["PYTHONPATH"] = os.pathsep.join([str(APP_PARENT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_worker(module: str, request: dict, root: Path, on_event: Callable[[dict], None], *,
               what: str = "worker") -> dict:
    """Run ``python -m <module>`` with ``request`` as JSON on stdin, calling ``on_event`` per progress event.

    Returns
    -------
    dict
        The worker's final event (``done`` or ``error``); an ``error`` with the output's tail when the worker
        ended without one.
    """
    proc = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=worker_env(root),
                            cwd=str(root))
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(request))
    proc.stdin.close()
    final, tail = None, collections.deque(maxlen=15)
    for line in proc.stdout:
        ev = parse_event(line)
        if ev is None:
            tail.append(line.rstrip())
        elif ev["event"] in ("done", "error"):
            final = ev
        else:
            on_event(ev)
    code = proc.wait()
    if final is None:
        final = dict(event="error", message=f"the {what} exited with code {code}: " + "\n".join(tail)[-1500:])
    return final


def run_capture_job(spec: CaptureSpec, root: Path, on_event: Callable[[dict], None]) -> dict:
    """Run one capture in a worker process, calling ``on_event`` for each progress event.

    Returns
    -------
    dict
        The final event: ``{"event": "done", "run_id", "rows", "hooks", "seconds"}`` or
        ``{"event": "error", "message"}``.
    """
    return run_worker("app.capture_worker", spec.to_dict(), root, on_event, what="capture worker")


# --------------------------------------------------------------------------------------------- safety prompt box

MAX_PROMPT_CHARS = 2000
PROMPT_NEW_TOKENS = 32


@dataclass
class SafetyPromptSpec:
    """A validated prompt-box request: score one prompt with and without the stored refusal direction.

    ``model_path`` is a registry name or an absolute model folder inside the cache root; ``direction_file`` is
    the direction file relative to the root (the worker checks it again with ``safe_path``).
    """

    result_id: str
    model: str
    model_path: str
    direction_file: str
    layer: int
    prompt: str
    chat_template: bool = True
    max_new_tokens: int = PROMPT_NEW_TOKENS

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_model(root: Path, model: str) -> str:
    """The loadable form of a result's ``model``: a fetched registry name, or a model folder inside the root.

    Accepted: a registry language model fetched into ``<root>/models/<name>``; ``models/<folder>`` or a bare
    folder name under ``<root>/models``; an absolute folder that lies inside the root. Anything else (a folder
    outside the root, a Hub id) raises ``ValueError`` with what to do.
    """
    from probekit.models import COMPLETE_MARKER, REGISTRY

    root = Path(root).resolve()
    if not isinstance(model, str) or not model:
        raise ValueError("This result names no model.")
    if model in REGISTRY:
        if REGISTRY[model].kind == "cnn":
            raise ValueError(f"{model} is an image model, not a language model.")
        if not (safe_path(root, "models", model) / COMPLETE_MARKER).is_file():
            raise ValueError(f"The model {model} is not fetched into this cache: run `probekit models fetch {model}` "
                             f"with PROBEKIT_CACHE={root}.")
        return model
    try:
        p = Path(model)
        if p.is_absolute():
            try:
                rel = p.resolve().relative_to(root)
            except ValueError:
                raise ValueError(f"The model folder {model} lies outside the cache root {root}; the app only opens "
                                 f"files inside it. Copy the folder to {root / 'models'}/ and rerun "
                                 "`probekit safety run` with that path.") from None
            folder = safe_path(root, str(rel))
        elif model.startswith("models/"):
            folder = safe_path(root, "models", check_name(model[len("models/"):], "model folder"))
        else:
            folder = safe_path(root, "models", check_name(model, "model name"))
    except UnsafePathError as e:
        raise ValueError(f"The model {model[:80]!r} cannot be opened: {e}") from None
    if not (folder / "config.json").is_file():
        raise ValueError(f"The model {model[:80]!r} was not found in this cache (no config.json in {folder}); "
                         "fetch it with `probekit models fetch` or copy its folder under models/.")
    return str(folder)


def build_safety_spec(root: Path, *, result_id: str | None, payload: dict | None, prompt: str | None,
                      layer: int | str | None = None) -> SafetyPromptSpec:
    """Validate a prompt-box request against a ``safety_activation`` payload; ``ValueError`` on a bad field."""
    from .data import result_set_parts, safety_directions_path

    root = Path(root).resolve()
    if not result_id or not isinstance(result_id, str):
        raise ValueError("Choose a safety result folder.")
    try:
        result_set_parts(result_id)
    except UnsafePathError as e:
        raise ValueError(str(e)) from None
    if not isinstance(payload, dict) or payload.get("kind") != "safety_activation":
        raise ValueError(f"{result_id} has no activation.json (the refusal direction comes from "
                         "`probekit safety run --part activation`).")
    prompt = (text_or_none(prompt, "The prompt") or "").strip()
    if not prompt:
        raise ValueError("Type a prompt first.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"The prompt is too long: at most {MAX_PROMPT_CHARS:,} characters.")
    n_layers = len(payload.get("direction_norms") or []) or int(payload.get("n_layers") or 0)
    if layer is None or layer == "":
        layer = payload.get("layer")
    try:  # an int (a negative one is named as outside below); digits; nothing else
        layer = layer if isinstance(layer, int) and not isinstance(layer, bool) else check_index(layer, "layer")
    except ValueError:
        raise ValueError(f"not a layer: {str(layer)[:20]!r}") from None
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is outside the {n_layers} layers of this result.")
    try:
        dfile = safety_directions_path(result_id, payload, root)
    except UnsafePathError as e:
        raise ValueError(str(e)) from None
    if not dfile.is_file():
        raise ValueError(f"{dfile.name} is missing beside activation.json; rerun `probekit safety run --part "
                         "activation`.")
    model = str(payload.get("model") or "")
    cfg = payload.get("config") or {}
    chat = cfg.get("chat_template", (payload.get("refusal") or {}).get("config", {}).get("chat_template", True))
    return SafetyPromptSpec(result_id=result_id, model=model, model_path=resolve_model(root, model),
                            direction_file=str(dfile.relative_to(root)), layer=layer, prompt=prompt,
                            chat_template=bool(chat))


def run_safety_prompt_job(spec: SafetyPromptSpec, root: Path, on_event: Callable[[dict], None]) -> dict:
    """Score one prompt in a worker process (``app.safety_worker``); see :func:`run_worker`.

    Returns
    -------
    dict
        ``{"event": "done", "clean_score", "ablated_score", "clean_completion", "ablated_completion", "layer",
        "model", "seconds"}`` or ``{"event": "error", "message"}``.
    """
    return run_worker("app.safety_worker", spec.to_dict(), root, on_event, what="safety worker")
