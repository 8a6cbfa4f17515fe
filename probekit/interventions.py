"""Interventions: change activations at named sites during a forward, and read what the model does then.

One place for every edit of a model's forward that the probes use (METHODS.md §2 refusal direction, §3 CE-loss
recovered):

- :func:`resolve_sites` — where a hook name lives on a ``TransformerBridge`` (its plain HF twin when possible,
  else its own hook points), on a plain HF causal LM of any family below, or on any module (dotted paths);
- :func:`intervene` — the primitive: a context manager that replaces the activation at each named site by
  ``fn(activation)``, optionally only at chosen token positions;
- :func:`splice` (one site), :func:`directional_ablation`, :func:`activation_addition`;
- :func:`record_activations`, :func:`activation_patching` (clean → corrupted at chosen sites and positions, a
  metric per site × position), :func:`logit_difference`;
- :func:`lm_logits` and :func:`greedy_decode` (KV cache; position-limited interventions follow the new tokens).

Definitions
-----------
site
    A hook name. On a bridge: any of its hook-point names. On a plain HF causal LM, the residual-stream names
    ``blocks.{l}.hook_resid_pre`` (input of block ``l``), ``hook_resid_mid`` (sequential blocks only),
    ``hook_resid_post`` (output of block ``l``), ``hook_attn_out`` and ``hook_mlp_out`` (the attention and MLP
    terms *added to the residual stream*: after the post-norm in Gemma 2/3 and OLMo 2, as TransformerLens places
    them; BERT/RoBERTa encoders: resid_pre/post and mlp_out only) for the families of :data:`HF_LAYOUTS`; the
    Llama-layout families also take the other names of :mod:`probekit.hooks` (``attn.hook_z``, ``mlp.hook_post``,
    norms). Any other module: dotted module paths.
positions
    Absolute token columns of ``input_ids`` (0 = first column, padding included). During KV-cached decoding a
    forward over new tokens covers columns ``[past_length, past_length + n)``, so an intervention limited to
    ``slice(5, None)`` acts on column 5 and on every generated token; the same columns as a full recompute.
    Negative positions are refused (they would mean different tokens with and without a KV cache).
directional ablation
    ``x <- x - (x . r_hat) r_hat``, ``r_hat = r / ||r||`` (float64, applied in the activation's dtype), at
    ``hook_resid_pre``, ``hook_attn_out`` and ``hook_mlp_out`` of every block, every position (Arditi et al.
    2024). In a pre-norm model every block's output, a sum of ablated terms, is then orthogonal to ``r_hat`` too
    (not in a post-LN encoder, whose LayerNorm follows the sum; its next block's input is ablated again).
activation addition
    ``x <- x + alpha r`` (``r`` not normalised) at ``blocks.{layer}.hook_resid_pre``, every position by default.
activation patching
    Run the clean input, record the activation at a site; run the corrupted input with the clean activation
    written in at that site and the chosen positions; score the logits with ``metric``. Clean and corrupted
    inputs must have the same shape (positions correspond column by column).

Example
-------
>>> with directional_ablation(bridge, r) as m:                        # doctest: +SKIP
...     logits = lm_logits(m, input_ids, attention_mask)
>>> res = activation_patching(bridge, clean_ids, corrupt_ids,          # doctest: +SKIP
...                           [f"blocks.{l}.hook_resid_pre" for l in range(n_layers)], positions="each",
...                           metric=lambda z: logit_difference(z, answer, wrong).mean())
>>> res.figures()[0].show()                                          # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .hooks import HookNameError, HookSet, HookSite, is_bridge, plain_sites

__all__ = [
    "ABLATION_SITES",
    "HF_LAYOUTS",
    "resolve_sites",
    "runner",
    "model_device",
    "n_layers",
    "intervene",
    "splice",
    "directional_ablation",
    "activation_addition",
    "lm_logits",
    "greedy_decode",
    "record_activations",
    "logit_difference",
    "PatchingResult",
    "activation_patching",
]

ABLATION_SITES: tuple[str, ...] = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")


@dataclass(frozen=True)
class _Layout:
    """Where the residual-stream sites of one HF family live (paths relative to a decoder layer)."""

    layers: str  # the ModuleList of blocks
    attn_out: str | None  # module whose output is the attention term added to the residual (None: no equivalent)
    mlp_out: str  # module whose output is the MLP term added to the residual
    resid_mid: str | None  # module whose *input* is the residual between attention and MLP (None: no equivalent)
    llama_like: bool = False  # probekit.hooks.plain_sites' Llama patterns hold for the other names
    parallel: bool = False  # attention and MLP read the same residual (no resid_mid exists)


_LLAMA = _Layout("model.layers", "self_attn", "mlp", "post_attention_layernorm", llama_like=True)
_POST_NORM = _Layout("model.layers", "post_attention_layernorm", "post_feedforward_layernorm",
                     "pre_feedforward_layernorm")

#: HF ``config.model_type`` → layout of its causal-LM class; checked against TransformerBridge in the tests.
HF_LAYOUTS: dict[str, _Layout] = {
    "gpt2": _Layout("transformer.h", "attn", "mlp", "ln_2"),
    "gptj": _Layout("transformer.h", "attn", "mlp", None, parallel=True),
    "gpt_neox": _Layout("gpt_neox.layers", "attention", "mlp", "post_attention_layernorm"),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "phi3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _POST_NORM,
    "gemma3_text": _POST_NORM,
    "olmo2": _Layout("model.layers", "post_attention_layernorm", "post_feedforward_layernorm", "mlp"),
    # post-LN encoders (masked-LM heads): TransformerBridge's hook_attn_out / hook_resid_mid there are LayerNorm
    # outputs with no single module equivalent, so those two names run on the bridge's own hook points
    "bert": _Layout("bert.encoder.layer", None, "output.dense", None),
    "roberta": _Layout("roberta.encoder.layer", None, "output.dense", None),
}

_RESID_RE = re.compile(r"blocks\.(\d+)\.(hook_resid_pre|hook_resid_mid|hook_resid_post|hook_attn_out|hook_mlp_out)")


# ------------------------------------------------------------------------------------------- model helpers


def runner(model: torch.nn.Module) -> torch.nn.Module:
    """The module to call: a bridge's plain HF twin when ``load_model`` made one, else the model itself."""
    if is_bridge(model):
        from .models import plain_model

        twin = plain_model(model)
        return twin if twin is not None else model
    return model


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the first parameter (CPU for a parameterless module)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def n_layers(model: torch.nn.Module) -> int:
    """Number of blocks of a bridge (``cfg.n_layers``) or an HF model (``config.num_hidden_layers`` …)."""
    cfg = getattr(model, "cfg", None)  # bridge
    if cfg is not None and getattr(cfg, "n_layers", None):
        return int(cfg.n_layers)
    cfg = getattr(model, "config", None)  # HF
    for attr in ("num_hidden_layers", "n_layer"):
        if cfg is not None and getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise ValueError(f"cannot tell the number of layers of {type(model).__name__}; pass layers=… explicitly.")


def _layout(model: torch.nn.Module) -> _Layout | None:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    return HF_LAYOUTS.get(mt) if isinstance(mt, str) else None


def _hf_site(model: torch.nn.Module, layout: _Layout, modules: Mapping[str, torch.nn.Module], name: str
             ) -> HookSite | None:
    """The residual-stream site ``name`` on an HF model of ``layout``, or None if the name is not one of them."""
    m = _RESID_RE.fullmatch(name)
    if m is None:
        return None
    layer, kind = int(m.group(1)), m.group(2)
    block = f"{layout.layers}.{layer}"
    if block not in modules:
        raise HookNameError(f"{name!r}: the model has no block {layer} ({n_layers(model)} blocks).")
    if kind == "hook_resid_pre":
        module, take = block, "input"
    elif kind == "hook_resid_post":
        module, take = block, "output"
    elif kind == "hook_attn_out":
        if layout.attn_out is None:
            return None
        module, take = f"{block}.{layout.attn_out}", "output"
    elif kind == "hook_mlp_out":
        module, take = f"{block}.{layout.mlp_out}", "output"
    else:
        if layout.parallel or (layout.resid_mid and getattr(model.config, "use_parallel_residual", False)):
            raise HookNameError(f"{name!r}: {model.config.model_type} blocks add attention and MLP in parallel, "
                                "so there is no residual stream between them; use hook_resid_pre or hook_resid_post.")
        if layout.resid_mid is None:
            return None
        module, take = f"{block}.{layout.resid_mid}", "input"
    if module not in modules:
        return None
    return HookSite(name, module, take, None, 1)


def _hf_sites(model: torch.nn.Module, names: Sequence[str]) -> list[HookSite] | None:
    """Sites for bridge-style names on an HF causal LM, or None when some name has no module equivalent."""
    layout = _layout(model)
    if layout is None:
        return plain_sites(model, list(names), getattr(model.config, "num_attention_heads", None))
    modules = dict(model.named_modules())
    n_heads = getattr(model.config, "num_attention_heads", None)
    out = []
    for name in names:
        site = _hf_site(model, layout, modules, name)
        if site is None and layout.llama_like:
            more = plain_sites(model, [name], n_heads)
            site = more[0] if more else None
        if site is None:
            return None
        out.append(site)
    return out


def resolve_sites(model: torch.nn.Module, names: Sequence[str], *, prefer_plain: bool = True
                  ) -> tuple[list[HookSite], str, torch.nn.Module]:
    """``(sites, mechanism, runner)`` for hook ``names``: where each activation is read or replaced.

    - bridge: on its plain HF twin (``mechanism="plain"``, the twin is the runner) when ``prefer_plain`` and every
      name has a module equivalent there, else on the bridge's own hook points (``"bridge"``, the bridge runs);
    - HF causal LM: the residual-stream names of :data:`HF_LAYOUTS` (and, for Llama-layout families, the rest of
      :mod:`probekit.hooks`' names), else dotted module paths;
    - any other module: dotted module paths.

    Raises
    ------
    HookNameError
        A name the model does not have; the message lists close matches or what to use instead.
    """
    names = list(names)
    if not names:
        raise ValueError("no hook names given.")
    if is_bridge(model):
        twin = runner(model) if prefer_plain else model
        if twin is not model:
            HookSet.for_bridge(model, names, prefer_plain=False)  # name check against the bridge's vocabulary
            sites = _hf_sites(twin, names)
            if sites is not None:
                return sites, "plain", twin
        hs = HookSet.for_bridge(model, names, prefer_plain=False)
        return hs.sites, "bridge", model
    if hasattr(model, "config"):
        sites = _hf_sites(model, names)
        if sites is not None:
            return sites, "plain", model
        bridge_names = [n for n in names if n.startswith("blocks.") or n.startswith("hook_")]
        modules = {n for n, _ in model.named_modules()}
        unknown = [n for n in bridge_names if n not in modules]
        if unknown:
            fam = getattr(model.config, "model_type", "?")
            raise HookNameError(
                f"hook name {unknown[0]!r} has no module equivalent on a plain {type(model).__name__} "
                f"(model_type {fam!r}). Plain HF models take blocks.{{l}}.hook_resid_pre/mid/post, hook_attn_out "
                f"and hook_mlp_out for model types {', '.join(sorted(HF_LAYOUTS))} (encoders: resid_pre/post and "
                "mlp_out), or dotted module paths; "
                "for every other name load the model with probekit.models.load_model (a TransformerBridge).")
    hs = HookSet.for_module(model, names)
    return hs.sites, "plain", model


# ------------------------------------------------------------------------------------------- positions


class _Positions:
    """Absolute token columns an intervention acts on: all, a set, or a half-open range (``stop`` may be None)."""

    def __init__(self, spec: Any, name: str):
        self.all = spec is None
        self.cols: list[int] | None = None
        self.range: tuple[int, int | None] | None = None
        if self.all:
            return
        bad = (f"positions for {name!r} must be None, a slice(start, stop) with step 1, or non-negative ints "
               "(absolute token columns, 0 = first column of input_ids)")
        if isinstance(spec, slice):
            if spec.step not in (None, 1):
                raise ValueError(f"{bad}; got step {spec.step}.")
            start = 0 if spec.start is None else int(spec.start)
            if start < 0 or (spec.stop is not None and int(spec.stop) < 0):
                raise ValueError(f"{bad}; got {spec}. Negative columns would name different tokens with and "
                                 "without a KV cache.")
            self.range = (start, None if spec.stop is None else int(spec.stop))
            return
        if isinstance(spec, torch.Tensor):
            spec = spec.flatten().tolist()
        try:
            cols = sorted({int(p) for p in ([spec] if isinstance(spec, (int, np.integer)) else spec)})
        except (TypeError, ValueError):
            raise ValueError(f"{bad}; got {spec!r}.") from None
        if cols and cols[0] < 0:
            raise ValueError(f"{bad}; got {cols[0]}. For the last column pass input_ids.shape[1] - 1.")
        self.cols = cols

    def local(self, offset: int, n: int) -> list[int] | None:
        """Indices into a forward covering columns ``[offset, offset + n)``; None means all of them."""
        if self.all:
            return None
        if self.range is not None:
            a, b = self.range
            lo, hi = max(a, offset), min(offset + n, b if b is not None else offset + n)
            return list(range(lo - offset, hi - offset))
        return [c - offset for c in self.cols if offset <= c < offset + n]


def _past_length(kwargs: Mapping[str, Any]) -> int:
    """Columns already in the KV cache of a forward called with ``kwargs`` (0 without a cache)."""
    cp = kwargs.get("cache_position")
    if isinstance(cp, torch.Tensor) and cp.numel():
        return int(cp.flatten()[0])
    past = kwargs.get("past_key_values", kwargs.get("cache"))  # "cache" is its newer transformers name
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    return int(past[0][0].shape[-2])  # legacy tuple of (key, value) per layer


# ------------------------------------------------------------------------------------------- the primitive


@contextmanager
def intervene(model: torch.nn.Module, fns: Mapping[str, Callable[[torch.Tensor], torch.Tensor]], *,
              positions: Any = None, prefer_plain: bool = True) -> Iterator[torch.nn.Module]:
    """Replace the activation at each hook ``name`` by ``fns[name](activation)`` in forwards run inside the block.

    Yields the module to call (see :func:`resolve_sites`): for a bridge from ``load_model`` its plain HF twin
    (same parameters) when every name has a module equivalent, else the bridge; call it with :func:`lm_logits`
    or :func:`greedy_decode`. Hooks are removed on exit, also after an error.

    Parameters
    ----------
    model : torch.nn.Module
        A bridge, an HF causal LM, or any module (dotted paths).
    fns : mapping str -> callable
        ``fn(a) -> a'`` of the same shape. ``a`` is ``(batch, pos, d)`` for residual/attention/MLP sites
        (``attn.hook_z``: ``(batch, pos, n_heads, d_head)``; bridge patterns: ``(batch, head, q, k)``, positions on
        the query axis). With ``positions`` it gets only the selected columns, ``(batch, k, …)`` in ascending
        column order, and is not called for a forward that covers none of them.
    positions : None, slice, int sequence, or mapping str -> one of these
        Absolute token columns to act on (module docstring); None: every position. A mapping gives each site its
        own (a missing site: every position).
    prefer_plain : bool
        Use a bridge's plain twin when possible.

    Yields
    ------
    torch.nn.Module
    """
    names = list(fns)
    if not names:
        raise ValueError("fns is empty: nothing to intervene on.")
    if isinstance(positions, Mapping):
        extra = set(positions) - set(names)
        if extra:
            raise ValueError(f"positions names site(s) {sorted(extra)} that have no function in fns.")
        pos = {n: _Positions(positions.get(n), n) for n in names}
    else:
        pos = {n: _Positions(positions, n) for n in names}
    sites, mechanism, run = resolve_sites(model, names, prefer_plain=prefer_plain)
    state = {"offset": 0}

    def call(name: str, a: torch.Tensor) -> torch.Tensor:
        new = fns[name](a)
        if not isinstance(new, torch.Tensor) or new.shape != a.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(f"intervention on {name!r} must return shape {tuple(a.shape)}, got {got}.")
        return new.to(a.dtype)

    def apply(site: HookSite, act: torch.Tensor) -> torch.Tensor:
        nh = site.n_heads
        a = act.reshape(*act.shape[:-1], nh, act.shape[-1] // nh) if nh else act
        p = pos[site.name]
        if p.all:
            new = call(site.name, a)
        else:
            if site.pos_axis is None or site.pos_axis >= a.ndim:
                raise ValueError(f"positions were given for {site.name!r}, which has no token axis.")
            idx = p.local(state["offset"], a.shape[site.pos_axis])
            if not idx:
                return act
            it = torch.tensor(idx, dtype=torch.long, device=a.device)
            new = a.index_copy(site.pos_axis, it, call(site.name, a.index_select(site.pos_axis, it)))
        return new.reshape(act.shape) if nh else new

    def track(m, args, kwargs):
        state["offset"] = _past_length(kwargs)

    handles = [run.register_forward_pre_hook(track, with_kwargs=True)]
    try:
        if mechanism == "bridge":
            for s in sites:
                hp = model.hook_dict[s.name]
                handles.append(hp.add_hook(lambda act, hook, s=s: apply(s, act)).hook)
        else:
            modules = dict(run.named_modules())
            for s in sites:
                mod = modules[s.module]
                if s.take == "output":
                    def out_hook(m, args, out, s=s):
                        if isinstance(out, tuple):
                            return (apply(s, out[0]),) + tuple(out[1:])
                        return apply(s, out)

                    handles.append(mod.register_forward_hook(out_hook))
                else:
                    def pre_hook(m, args, kwargs, s=s):
                        if args:
                            return (apply(s, args[0]),) + tuple(args[1:]), kwargs
                        kwargs = dict(kwargs)
                        kwargs["hidden_states"] = apply(s, kwargs["hidden_states"])
                        return args, kwargs

                    handles.append(mod.register_forward_pre_hook(pre_hook, with_kwargs=True))
        yield run
    finally:
        for h in handles:
            h.remove()


@contextmanager
def splice(model: torch.nn.Module, hook_name: str, fn: Callable[[torch.Tensor], torch.Tensor], *,
           positions: Any = None, prefer_plain: bool = True) -> Iterator[torch.nn.Module]:
    """Replace the activation at ``hook_name`` by ``fn(activation)``: :func:`intervene` with one site.

    Example
    -------
    >>> with splice(bridge, "blocks.1.hook_resid_post", sae) as m:          # doctest: +SKIP
    ...     logits = lm_logits(m, input_ids, attention_mask)
    """
    with intervene(model, {hook_name: fn}, positions=positions, prefer_plain=prefer_plain) as m:
        yield m


def _unit(direction: torch.Tensor) -> torch.Tensor:
    d = torch.as_tensor(direction).detach().flatten().double()
    n = d.norm()
    if not torch.isfinite(n) or n == 0:
        raise ValueError("direction must be a non-zero finite vector.")
    return d / n


class _Cast:
    """A float64 vector handed out in each activation's device and dtype (converted once per pair)."""

    def __init__(self, v: torch.Tensor):
        self.v, self.cache = v, {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in self.cache:
            self.cache[key] = self.v.to(device=x.device, dtype=x.dtype)
        return self.cache[key]


@contextmanager
def directional_ablation(model: torch.nn.Module, direction: torch.Tensor, *, layers: Iterable[int] | None = None,
                         sites: Sequence[str] = ABLATION_SITES, positions: Any = None, prefer_plain: bool = True
                         ) -> Iterator[torch.nn.Module]:
    """Project ``direction`` out of the residual input and attention/MLP outputs of every block.

    ``x <- x - (x . r_hat) r_hat`` with ``r_hat = direction / ||direction||`` at ``blocks.{l}.{site}`` for each
    ``l`` in ``layers`` (default: all blocks) and each site (default :data:`ABLATION_SITES`), at every position
    (or ``positions``).

    Parameters
    ----------
    model : torch.nn.Module
        Bridge or HF causal LM.
    direction : torch.Tensor
        Shape ``(d,)``.
    layers : iterable of int or None
    sites : sequence of str
    positions : see :func:`intervene`
    prefer_plain : bool

    Yields
    ------
    torch.nn.Module
        The module to call (see :func:`intervene`).
    """
    r = _Cast(_unit(direction))

    def ablate(x: torch.Tensor) -> torch.Tensor:
        rh = r(x)
        return x - (x @ rh).unsqueeze(-1) * rh

    ls = range(n_layers(model)) if layers is None else [int(l) for l in layers]
    fns = {f"blocks.{l}.{s}": ablate for l in ls for s in sites}
    with intervene(model, fns, positions=positions, prefer_plain=prefer_plain) as m:
        yield m


@contextmanager
def activation_addition(model: torch.nn.Module, direction: torch.Tensor, layer: int, alpha: float = 1.0, *,
                        hook: str = "hook_resid_pre", positions: Any = None, prefer_plain: bool = True
                        ) -> Iterator[torch.nn.Module]:
    """Add ``alpha * direction`` (not normalised) at ``blocks.{layer}.{hook}``, every position (or ``positions``).

    Parameters
    ----------
    model : torch.nn.Module
    direction : torch.Tensor
        Shape ``(d,)``.
    layer : int
    alpha : float
        Use 1.0 with a difference-in-means direction to move harmless activations to the harmful mean;
        negative values subtract it.
    hook : str
    positions : see :func:`intervene`
    prefer_plain : bool

    Yields
    ------
    torch.nn.Module
    """
    v = _Cast(float(alpha) * torch.as_tensor(direction).detach().flatten().double())
    with intervene(model, {f"blocks.{int(layer)}.{hook}": lambda x: x + v(x)}, positions=positions,
                   prefer_plain=prefer_plain) as m:
        yield m


# ------------------------------------------------------------------------------------------- running


def lm_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
              ) -> torch.Tensor:
    """Logits ``(batch, pos, vocab)`` of a TransformerBridge or an HF causal LM for ``input_ids`` ``(batch, pos)``."""
    if is_bridge(model):
        return model(input_ids, attention_mask=attention_mask, return_type="logits")
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return out.logits if hasattr(out, "logits") else out


def _uses_kv_cache(run: torch.nn.Module) -> bool:
    return (not is_bridge(run)) and hasattr(run, "config") and hasattr(run, "get_input_embeddings")


@torch.inference_mode()
def greedy_decode(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                  max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0
                  ) -> torch.Tensor:
    """Greedy continuation of a left-padded batch; call it with the module an intervention yields.

    HF causal LMs (a bridge's plain twin included) decode with a KV cache and position ids counted over real
    tokens (``cumsum(mask) - 1``), so a left-padded row sees the positions it would see alone; a
    position-limited intervention knows which columns each step covers (see :func:`intervene`). Other modules
    (a bridge without a twin) recompute the whole sequence each step through :func:`lm_logits` without position
    ids — exact for relative (rotary) positions only.

    Parameters
    ----------
    model : torch.nn.Module
    input_ids : torch.Tensor
        Shape ``(B, P)``, left-padded.
    attention_mask : torch.Tensor
        Shape ``(B, P)``, 1 for real tokens.
    max_new_tokens : int
    eos_token_id : int, sequence of int, or None
        A row stops after emitting one of these; its later slots hold ``pad_token_id``. None: never stop.
    pad_token_id : int

    Returns
    -------
    torch.Tensor
        int64, shape ``(B, T)`` with ``T <= max_new_tokens`` (fewer when every row stopped early).
    """
    run = runner(model)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    device = model_device(run)
    ids = input_ids.to(device)
    mask = attention_mask.to(device).long()
    B = ids.shape[0]
    if not bool((mask[:, -1] == 1).all()):
        raise ValueError("greedy_decode needs a left-padded batch (every row must end with a real token).")
    eos = None if eos_token_id is None else torch.as_tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    new: list[torch.Tensor] = []
    cached = _uses_kv_cache(run)
    past = None
    step_ids, step_pos = ids, (mask.cumsum(-1) - 1).clamp(min=0)
    for _ in range(int(max_new_tokens)):
        if cached:
            out = run(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=past,
                      use_cache=True)
            past = out.past_key_values
            logits = out.logits[:, -1]
        else:
            logits = lm_logits(run, ids, mask)[:, -1]
        nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        new.append(nxt)
        if eos is not None:
            done = done | torch.isin(nxt, eos)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        step_ids, step_pos = nxt[:, None], step_pos[:, -1:] + 1
        if bool(done.all()):
            break
    return torch.stack(new, 1).cpu() if new else torch.zeros((B, 0), dtype=torch.long)


# ------------------------------------------------------------------------------------------- patching


@torch.no_grad()
def record_activations(model: torch.nn.Module, names: Sequence[str], input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None = None, *, prefer_plain: bool = True
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the activations at ``names`` of one full forward, read on the sites interventions write.

    Returns
    -------
    logits : torch.Tensor
        Shape ``(batch, pos, vocab)``.
    acts : dict str -> torch.Tensor
        Each as the intervention function would see it (``(batch, pos, d)`` for residual sites).
    """
    acts: dict[str, torch.Tensor] = {}

    def keep(name):
        def fn(a):
            acts[name] = a.detach().clone()
            return a
        return fn

    with intervene(model, {n: keep(n) for n in names}, prefer_plain=prefer_plain) as m:
        logits = lm_logits(m, input_ids, attention_mask)
    return logits, acts


def logit_difference(logits: torch.Tensor, correct: Any, incorrect: Any, *,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``logits[b, t_b, correct_b] - logits[b, t_b, incorrect_b]`` at each row's last real token ``t_b``.

    Parameters
    ----------
    logits : torch.Tensor
        Shape ``(batch, pos, vocab)``.
    correct, incorrect : int or int tensor/sequence of shape ``(batch,)``
        Token ids.
    attention_mask : torch.Tensor or None
        ``(batch, pos)`` right-padded mask; None: the last column.

    Returns
    -------
    torch.Tensor
        Shape ``(batch,)``.
    """
    B, P, _ = logits.shape
    if attention_mask is None:
        t = torch.full((B,), P - 1, dtype=torch.long, device=logits.device)
    else:
        t = attention_mask.to(logits.device).long().sum(-1) - 1
    rows = torch.arange(B, device=logits.device)
    last = logits[rows, t]
    c = torch.as_tensor(correct, device=logits.device).long().expand(B)
    w = torch.as_tensor(incorrect, device=logits.device).long().expand(B)
    return last[rows, c] - last[rows, w]


@dataclass
class PatchingResult:
    """A clean → corrupted activation-patching sweep.

    ``metric[i, j]`` is ``metric(logits)`` of the corrupted run with the clean activation of ``sites[i]`` patched
    in at ``positions[j]`` (``None``: every position at once). ``clean_metric`` / ``corrupted_metric``: the metric
    without patching on each input.
    """

    sites: list[str]
    positions: list[int | None]
    metric: np.ndarray
    clean_metric: float
    corrupted_metric: float
    logits: torch.Tensor | None = field(default=None, repr=False)  # (n_sites, n_positions, batch, pos, vocab)

    def normalized(self) -> np.ndarray:
        """``(metric - corrupted) / (clean - corrupted)``: 0 = no effect, 1 = the clean behaviour restored."""
        d = self.clean_metric - self.corrupted_metric
        return (self.metric - self.corrupted_metric) / d if d != 0 else np.full_like(self.metric, np.nan)

    def __repr__(self) -> str:
        return (f"PatchingResult({len(self.sites)} sites x {len(self.positions)} positions, "
                f"clean_metric={self.clean_metric:.4g}, corrupted_metric={self.corrupted_metric:.4g})")

    def _repr_html_(self) -> str:
        from .html_page import html_table

        cols = ["all" if p is None else str(p) for p in self.positions]
        rows = [{"site": s, **{c: float(v) for c, v in zip(cols, self.metric[i])}} for i, s in enumerate(self.sites)]
        return html_table(rows, caption=f"metric per site and position (clean {self.clean_metric:.4g}, "
                                        f"corrupted {self.corrupted_metric:.4g})")

    def to_dict(self) -> dict[str, Any]:
        return {"sites": list(self.sites), "positions": list(self.positions), "metric": self.metric.tolist(),
                "clean_metric": self.clean_metric, "corrupted_metric": self.corrupted_metric}

    def figures(self) -> list[Any]:
        """One heatmap: sites × positions, coloured by the normalised metric."""
        import plotly.graph_objects as go

        x = ["all" if p is None else str(p) for p in self.positions]
        fig = go.Figure(go.Heatmap(z=self.normalized(), x=x, y=self.sites, colorscale="RdBu", zmid=0,
                                   colorbar={"title": "(m − m_corr) / (m_clean − m_corr)"}))
        fig.update_layout(title="Activation patching: clean → corrupted", xaxis_title="token position",
                          yaxis_title="site")
        return [fig]


@torch.no_grad()
def activation_patching(model: torch.nn.Module, clean_ids: torch.Tensor, corrupted_ids: torch.Tensor,
                        sites: Sequence[str], *, metric: Callable[[torch.Tensor], Any] | None = None,
                        positions: str | Sequence[int] = "all", attention_mask: torch.Tensor | None = None,
                        return_logits: bool = False, prefer_plain: bool = True) -> PatchingResult:
    """Patch clean activations into the corrupted run, one site (and position) at a time.

    Parameters
    ----------
    model : torch.nn.Module
        Bridge or HF causal LM (or any module taking ``(input_ids, attention_mask)``).
    clean_ids, corrupted_ids : torch.Tensor
        Shape ``(batch, pos)`` each, the same shape: column ``t`` of one corresponds to column ``t`` of the other.
    sites : sequence of str
        Hook names to patch, one per run (e.g. ``blocks.{l}.hook_resid_pre`` for every ``l``).
    metric : callable or None
        ``logits (batch, pos, vocab) -> float`` (or a 0-d tensor), e.g. the mean :func:`logit_difference`.
    positions : "all", "each", or sequence of int
        "all": patch every position at once (one run per site); "each": every column separately; a sequence:
        those columns, each separately (absolute, ``>= 0``).
    attention_mask : torch.Tensor or None
        ``(batch, pos)``, shared by both inputs.
    return_logits : bool
        Keep every patched run's logits (``n_sites × n_positions × batch × pos × vocab``; mind the memory).
    prefer_plain : bool

    Returns
    -------
    PatchingResult
    """
    clean_ids, corrupted_ids = torch.as_tensor(clean_ids), torch.as_tensor(corrupted_ids)
    if clean_ids.shape != corrupted_ids.shape or clean_ids.ndim != 2:
        raise ValueError(f"clean_ids {tuple(clean_ids.shape)} and corrupted_ids {tuple(corrupted_ids.shape)} must "
                         "both be (batch, pos) of the same shape; pad them to a common length first.")
    if metric is None and not return_logits:
        raise ValueError("give a metric (e.g. lambda z: logit_difference(z, good, bad).mean()) or return_logits=True.")
    sites = list(sites)
    P = clean_ids.shape[1]
    if isinstance(positions, str):
        if positions not in ("all", "each"):
            raise ValueError(f"positions must be 'all', 'each' or a sequence of ints, got {positions!r}.")
        cols: list[int | None] = [None] if positions == "all" else list(range(P))
    else:
        cols = [int(p) for p in positions]
        bad = [p for p in cols if not 0 <= p < P]
        if bad or not cols:
            raise ValueError(f"positions must be columns in [0, {P}), got {bad or 'none'}.")
    dev = model_device(runner(model))
    clean_ids, corrupted_ids = clean_ids.to(dev), corrupted_ids.to(dev)
    mask = None if attention_mask is None else torch.as_tensor(attention_mask).to(dev)

    def score(z: torch.Tensor) -> float:
        return float(metric(z)) if metric is not None else float("nan")

    axis = {s.name: s.pos_axis for s in resolve_sites(model, sites, prefer_plain=prefer_plain)[0]}
    clean_logits, clean_acts = record_activations(model, sites, clean_ids, mask, prefer_plain=prefer_plain)
    corrupt_logits = lm_logits(runner(model) if prefer_plain else model, corrupted_ids, mask)
    out = np.zeros((len(sites), len(cols)))
    kept = []
    for i, s in enumerate(sites):
        src = clean_acts[s]
        for j, c in enumerate(cols):
            # the function receives only the selected column(s), in ascending order: hand back the clean ones
            fn = (lambda a, src=src: src) if c is None else (lambda a, src=src, c=c, ax=axis[s]: src.narrow(ax, c, 1))
            with intervene(model, {s: fn}, positions=None if c is None else [c], prefer_plain=prefer_plain) as m:
                z = lm_logits(m, corrupted_ids, mask)
            out[i, j] = score(z)
            if return_logits:
                kept.append(z.detach().cpu())
    logits = None
    if return_logits:
        logits = torch.stack(kept).reshape(len(sites), len(cols), *kept[0].shape)
    return PatchingResult(sites=sites, positions=cols, metric=out, clean_metric=score(clean_logits),
                          corrupted_metric=score(corrupt_logits), logits=logits)
