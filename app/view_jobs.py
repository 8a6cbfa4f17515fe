"""Background jobs of the example-level views: a forward of typed text (tokens, attention) and the latent-statistics
job. Each validates what the page asked for and runs a worker process through :func:`app.jobs.run_worker`, so the
web server never holds a model."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from . import viewdata
from .jobs import resolve_model, run_worker
from .security import UnsafePathError, check_hook, check_name, check_run_id

MAX_TEXT_CHARS = 4000
MAX_TOKENS = 256  # attention of every layer and head is stored: n² per head


@dataclass
class ForwardSpec:
    """One forward: ``text`` (typed) or ``token_ids`` (a cached document) through ``model_path``."""

    fid: str
    model: str
    model_path: str
    hooks: list[str]
    attention: bool
    all_resid: bool = False
    text: str | None = None
    token_ids: list[int] = field(default_factory=list)
    max_tokens: int = MAX_TOKENS
    source: str = "typed"

    def to_dict(self) -> dict:
        return asdict(self)


def build_forward_spec(root: Path, *, model: str | None, text: str | None = None, token_ids: list[int] | None = None,
                       hooks: list[str] | None = None, attention: bool = False, all_resid: bool = False,
                       source: str = "typed") -> ForwardSpec:
    """Validate a forward request; ``ValueError`` naming the bad field. ``all_resid`` adds every layer's
    ``blocks.<l>.hook_resid_post`` (the worker reads the layer count from the model)."""
    if not model:
        raise ValueError("Choose a model (a registry name fetched into the cache, or models/<folder>).")
    model_path = resolve_model(Path(root), model)
    if token_ids is None:
        text = (text or "")
        if not text.strip():
            raise ValueError("Type some text first.")
        if len(text) > MAX_TEXT_CHARS:
            raise ValueError(f"The text is too long: at most {MAX_TEXT_CHARS:,} characters.")
    hooks = list(dict.fromkeys(hooks or []))
    try:
        for h in hooks:
            check_hook(h)
    except UnsafePathError as e:
        raise ValueError(str(e)) from None
    if not hooks and not attention and not all_resid:
        raise ValueError("Name a hook (e.g. blocks.1.hook_resid_post) or ask for attention.")
    ids = [int(t) for t in token_ids] if token_ids is not None else None
    fid = viewdata.forward_id(model, text if ids is None else None, ids, hooks + ["*resid"] * all_resid, attention)
    return ForwardSpec(fid=fid, model=model, model_path=model_path, hooks=hooks, attention=bool(attention),
                       all_resid=bool(all_resid),
                       text=text if ids is None else None, token_ids=ids or [], source=source)


def run_forward_job(spec: ForwardSpec, root: Path, on_event: Callable[[dict], None]) -> dict:
    """Run the forward worker unless the same request's result already exists; returns the final event."""
    try:
        viewdata.load_forward(spec.fid, root)
        return dict(event="done", fid=spec.fid, cached=True)
    except FileNotFoundError:
        pass
    return run_worker("app.forward_worker", spec.to_dict(), root, on_event, what="forward worker")


def forward_button(set_progress: Callable[[list], None], root: Path, build: Callable[[], ForwardSpec]) -> tuple:
    """What a page's "Compute" callback returns: ``(fid, "done")``, or ``(no_update, message)`` when ``build``
    refuses the request (its ValueError's text) or the worker fails. Progress messages go to ``set_progress``."""
    from dash import no_update

    try:
        spec = build()
    except ValueError as e:
        return no_update, str(e)
    set_progress(["starting the worker …"])
    final = run_forward_job(spec, root, lambda ev: set_progress([ev.get("message", "")]))
    if final.get("event") != "done":
        return no_update, final.get("message", "the forward failed")
    return final["fid"], "done"


@dataclass
class LatentJobSpec:
    """Latent statistics of the SAE folder ``sae`` over run ``run_id`` at ``hook``, into results/latents/<name>."""

    run_id: str
    hook: str
    sae: str
    name: str
    model_path: str | None = None
    tokenizer_path: str | None = None
    top_k: int = 20
    context: int = 8
    exclude_bos: bool = True  # position 0 left out of the statistics (see LatentStatsConfig.exclude_positions)

    def to_dict(self) -> dict:
        return asdict(self)


def latent_name(sae: str) -> str:
    """The default results name of an SAE folder: its path with ``/`` as ``--`` (one path component)."""
    return re.sub(r"[^A-Za-z0-9._+-]", "-", sae.replace("/", "--"))[:120]


def build_latent_spec(root: Path, *, sae: str | None, run_id: str | None, hook: str | None = None) -> LatentJobSpec:
    """Validate a latent-job request: the SAE folder exists, the run has the SAE's hook with its width."""
    from . import data

    root = Path(root)
    if not sae or sae not in viewdata.list_sae_folders(root):
        raise ValueError("Choose an SAE folder of this cache (saes/<name> or "
                         f"results/dark-matter/<model>/saes/<name>); got {str(sae)[:80]!r}.")
    try:
        check_run_id(run_id)
        run = data.open_run(run_id, root)
    except Exception as e:
        raise ValueError(f"Choose a cache run: {e}") from None
    model_obj = viewdata.load_sae_folder(sae, root)
    hook = hook or model_obj.cfg.hook_name
    if not hook or hook not in run.hooks:
        raise ValueError(f"run {run_id[:12]} has no hook {hook!r} (the SAE's hook); it holds {', '.join(run.hooks)}. "
                         "Capture that hook first (Capture page).")
    width = 1
    for s in run.shape(hook)[1:]:
        width *= int(s)
    if width != int(model_obj.cfg.d_in):
        raise ValueError(f"the SAE reads {model_obj.cfg.d_in} features but {hook} of run {run_id[:12]} has {width}.")
    model = str(run.config.get("key", {}).get("model", ""))
    try:
        model_path = resolve_model(root, model)
    except ValueError:
        model_path = None  # no logit effects, tokens shown from the tokenizer folder if any
    tfolder = data.tokenizer_folder(model, root)
    return LatentJobSpec(run_id=run_id, hook=hook, sae=sae, name=check_name(latent_name(sae), "result name"),
                         model_path=model_path, tokenizer_path=str(tfolder) if tfolder else None)


def run_latent_job(spec: LatentJobSpec, root: Path, on_event: Callable[[dict], None]) -> dict:
    return run_worker("app.latents_worker", spec.to_dict(), root, on_event, what="latent-statistics worker")
