"""Hook names and how they are attached.

The public vocabulary is a string per site:

- on a TransformerLens 4.3 ``TransformerBridge``: its hook-point names, e.g. ``blocks.6.hook_resid_post``,
  ``blocks.3.attn.hook_pattern``, ``blocks.2.mlp.hook_post``;
- on any other ``torch.nn.Module``: a dotted module path from ``named_modules()``, e.g. ``features.3``
  (the module's output is captured; a tuple output gives its first element).

Names are checked before any compute: an unknown one raises ``HookNameError`` listing close matches.

Two mechanisms fire them, chosen per request:

- *plain*: ``register_forward_hook``/``register_forward_pre_hook`` on the HF modules of the un-bridged twin
  that ``load_model`` keeps (``models.plain_model``). Used when every requested bridge name has a known
  module equivalent in the family's ``PlainLayout`` (residual stream, attention/MLP outputs, MLP
  post-activation, ``attn.hook_z``, norms; GPT-2, GPT-NeoX, GPT-J, Llama, Mistral, Qwen2/3, Gemma 1/2/3,
  Phi-3, OLMo 2, BERT, RoBERTa). It costs what a bare HF forward costs; tests check every layout entry
  equals ``run_with_cache``.
- *bridge*: the bridge's own hook points, for everything else (attention patterns, scores, q/k/v …).

Either way a forward stops (``StopForward``) as soon as every requested site has fired, so layers after the
last needed one never run.

Example
-------
>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> with HookSet.for_module(net, ["1"]) as hs:
...     _ = hs.run(lambda: net(torch.randn(3, 4)))
...     hs.acts["1"].shape
torch.Size([3, 8])
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

__all__ = ["HookNameError", "HookSite", "HookSet", "StopForward", "is_bridge", "available_hooks"]


class HookNameError(KeyError):
    """An unknown hook name; the message lists close matches."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


MECHANISMS = ("auto", "plain", "bridge")


class StopForward(Exception):
    """Raised inside a hook once every requested site has fired, to skip the rest of the forward."""


@dataclass(frozen=True)
class HookSite:
    """Where one named activation is read.

    name : the public hook name.
    module : dotted path of the module hooked (plain mechanism) or the bridge hook-point name.
    take : "output" or "input" (first positional input / ``hidden_states``) of ``module``.
    n_heads : if set, split the last dim into ``(n_heads, d_head)`` (``attn.hook_z``).
    pos_axis : axis of the token position in the activation (1 for ``(batch, pos, …)``; 2 for patterns
        ``(batch, head, q, k)``; None for non-sequence modules, whose rows are the batch).
    """

    name: str
    module: str
    take: str = "output"
    n_heads: int | None = None
    pos_axis: int | None = 1


def is_bridge(model) -> bool:
    return hasattr(model, "hook_dict") and hasattr(model, "original_model")


def available_hooks(model) -> list[str]:
    """All hook names ``model`` accepts: bridge hook points, or module paths for a plain module."""
    if is_bridge(model):
        return list(model.hook_dict.keys())
    return [n for n, _ in model.named_modules() if n]


def _check_names(names: Iterable[str], valid: list[str], what: str) -> None:
    valid_set = set(valid)
    for name in names:
        if name not in valid_set:
            close = difflib.get_close_matches(name, valid, n=5, cutoff=0.6)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise HookNameError(
                f"unknown hook name {name!r} for this {what}.{hint} "
                "List valid names with probekit.hooks.available_hooks(model)."
            )


@dataclass(frozen=True)
class PlainLayout:
    """Where the TransformerBridge names live in one HF family's plain modules.

    blocks : dotted path of the block list (``model.layers``).
    block_sites : bridge suffix after ``blocks.{l}.`` → (module path inside the block, "" for the block
        itself; take "input"|"output"; split heads).
    global_sites : bridge name → (module path, take).

    Each entry was read off the bridge's ``run_with_cache`` and is checked against it for every family in
    ``tests/unit/test_architectures.py``. A name a family lacks here goes through the bridge's own hooks.
    """

    blocks: str
    block_sites: dict[str, tuple[str, str, bool]]
    global_sites: dict[str, tuple[str, str]]


_RESID = {"hook_resid_pre": ("", "input", False), "hook_resid_post": ("", "output", False)}
# Llama layout: Llama, Mistral, Qwen2/3, Gemma, Phi-3 (pre-norm, sequential attention then MLP).
_LLAMA = PlainLayout("model.layers", {
    **_RESID,
    "hook_resid_mid": ("post_attention_layernorm", "input", False),
    "hook_attn_out": ("self_attn", "output", False),
    "hook_mlp_out": ("mlp", "output", False),
    "mlp.hook_post": ("mlp.down_proj", "input", False),
    "attn.hook_z": ("self_attn.o_proj", "input", True),
    "ln1.hook_out": ("input_layernorm", "output", False),
    "ln2.hook_out": ("post_attention_layernorm", "output", False),
}, {"hook_embed": ("model.embed_tokens", "output"), "ln_final.hook_out": ("model.norm", "output")})
# Gemma 2/3: a norm after attention and after the MLP too; the bridge's attn/mlp outs are the post-norm outputs.
_GEMMA2 = PlainLayout("model.layers", {
    **_RESID,
    "hook_resid_mid": ("pre_feedforward_layernorm", "input", False),
    "hook_attn_out": ("post_attention_layernorm", "output", False),
    "hook_mlp_out": ("post_feedforward_layernorm", "output", False),
    "mlp.hook_post": ("mlp.down_proj", "input", False),
    "attn.hook_z": ("self_attn.o_proj", "input", True),
    "ln1.hook_out": ("input_layernorm", "output", False),
    "ln2.hook_out": ("pre_feedforward_layernorm", "output", False),
}, _LLAMA.global_sites)
# OLMo 2: no pre-norms; the attention and MLP outputs are normed before they join the residual.
_OLMO2 = PlainLayout("model.layers", {
    **_RESID,
    "hook_resid_mid": ("mlp", "input", False),
    "hook_attn_out": ("post_attention_layernorm", "output", False),
    "hook_mlp_out": ("post_feedforward_layernorm", "output", False),
    "mlp.hook_post": ("mlp.down_proj", "input", False),
    "attn.hook_z": ("self_attn.o_proj", "input", True),
}, _LLAMA.global_sites)
_GPT2 = PlainLayout("transformer.h", {
    **_RESID,
    "hook_resid_mid": ("ln_2", "input", False),
    "hook_attn_out": ("attn", "output", False),
    "hook_mlp_out": ("mlp", "output", False),
    "mlp.hook_post": ("mlp.c_proj", "input", False),
    "attn.hook_z": ("attn.c_proj", "input", True),
    "ln1.hook_out": ("ln_1", "output", False),
    "ln2.hook_out": ("ln_2", "output", False),
}, {"hook_embed": ("transformer.wte", "output"), "ln_final.hook_out": ("transformer.ln_f", "output")})
# GPT-NeoX (Pythia) and GPT-J: parallel attention and MLP, so there is no resid_mid.
_NEOX = PlainLayout("gpt_neox.layers", {
    **_RESID,
    "hook_attn_out": ("attention", "output", False),
    "hook_mlp_out": ("mlp", "output", False),
    "mlp.hook_post": ("mlp.dense_4h_to_h", "input", False),
    "attn.hook_z": ("attention.dense", "input", True),
    "ln1.hook_out": ("input_layernorm", "output", False),
    "ln2.hook_out": ("post_attention_layernorm", "output", False),
}, {"hook_embed": ("gpt_neox.embed_in", "output"), "ln_final.hook_out": ("gpt_neox.final_layer_norm", "output")})
_GPTJ = PlainLayout("transformer.h", {
    **_RESID,
    "hook_attn_out": ("attn", "output", False),
    "hook_mlp_out": ("mlp", "output", False),
    "mlp.hook_post": ("mlp.fc_out", "input", False),
    "attn.hook_z": ("attn.out_proj", "input", True),
    "ln1.hook_out": ("ln_1", "output", False),
}, {"hook_embed": ("transformer.wte", "output"), "ln_final.hook_out": ("transformer.ln_f", "output")})


def _encoder(prefix: str) -> PlainLayout:
    """BERT/RoBERTa (post-norm). The bridge's names, as it defines them on these blocks: ``hook_attn_out`` is
    the attention sub-block's output after its residual add and LayerNorm; ``hook_resid_mid`` is the sum
    entering the block's last LayerNorm; ``hook_mlp_out`` is the output dense before that sum."""
    return PlainLayout(f"{prefix}.encoder.layer", {
        **_RESID,
        "hook_resid_mid": ("output.LayerNorm", "input", False),
        "hook_attn_out": ("attention", "output", False),
        "hook_mlp_out": ("output.dense", "output", False),
        "mlp.hook_post": ("output.dense", "input", False),
        "attn.hook_z": ("attention.output.dense", "input", True),
    }, {"hook_embed": (f"{prefix}.embeddings", "output")})


# config.model_type → layout. Families not listed here (and sequential-residual NeoX, which the checks do not
# cover) capture through the bridge's hook points.
PLAIN_LAYOUTS: dict[str, PlainLayout] = {
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")},
    "gemma2": _GEMMA2, "gemma3_text": _GEMMA2,
    "olmo2": _OLMO2,
    "gpt2": _GPT2,
    "gpt_neox": _NEOX,
    "gptj": _GPTJ,
    "bert": _encoder("bert"),
    "roberta": _encoder("roberta"),
}


def plain_layout(plain: torch.nn.Module) -> PlainLayout | None:
    """The layout of an HF model (by ``config.model_type``), or None when probekit has none for it."""
    config = getattr(plain, "config", None)
    layout = PLAIN_LAYOUTS.get(getattr(config, "model_type", None))
    if layout is _NEOX and not getattr(config, "use_parallel_residual", True):
        return None  # sequential NeoX has a resid_mid the table does not map; the bridge handles it
    return layout


def _pos_axis(name: str) -> int:
    return 2 if name.endswith(("hook_pattern", "hook_attn_scores")) else 1


def plain_sites(plain: torch.nn.Module, names: list[str], n_heads: int | None) -> list[HookSite] | None:
    """Map bridge names to modules of the plain HF twin, or None if any name has no known equivalent."""
    layout = plain_layout(plain)
    if layout is None:
        return None
    modules = dict(plain.named_modules())
    sites = []
    for name in names:
        if name in layout.global_sites:
            module, take = layout.global_sites[name]
            heads = False
        else:
            m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
            if m is None or m.group(2) not in layout.block_sites:
                return None
            sub, take, heads = layout.block_sites[m.group(2)]
            module = f"{layout.blocks}.{m.group(1)}" + (f".{sub}" if sub else "")
        if module not in modules:
            return None
        sites.append(HookSite(name, module, take, n_heads if heads else None, 1))
    return sites


class HookSet:
    """Attach a set of capture hooks; read ``acts`` after ``run``. Use as a context manager.

    ``acts[name]`` holds the detached activation of the last forward, shape ``(batch, pos, …)`` for
    sequence models (patterns: ``(batch, head, q, k)``), ``(batch, …)`` otherwise.
    """

    def __init__(self, sites: list[HookSite], attach: Callable[["HookSet"], list], mechanism: str,
                 model: torch.nn.Module):
        self.sites = sites
        self.mechanism = mechanism
        self.model = model  # the module whose forward fires these hooks (the plain twin, the bridge, or the module)
        self.acts: dict[str, torch.Tensor] = {}
        self._attach = attach
        self._handles: list = []
        self._pending: set[str] = set()

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_module(cls, module: torch.nn.Module, names: list[str]) -> "HookSet":
        """Hooks on dotted module paths of any ``nn.Module`` (their outputs)."""
        _check_names(names, available_hooks(module), type(module).__name__)
        sites = [HookSite(n, n, "output", None, None) for n in names]
        return cls(sites, lambda hs: hs._attach_modules(module), "plain", module)

    @classmethod
    def for_hf(cls, model: torch.nn.Module, names: list[str]) -> "HookSet | None":
        """Bridge-style names (``blocks.3.hook_resid_pre``) on a plain HF model, or None if any has no equivalent."""
        if not hasattr(model, "config"):
            return None
        sites = plain_sites(model, names, getattr(model.config, "num_attention_heads", None))
        if sites is None:
            return None
        return cls(sites, lambda hs: hs._attach_modules(model), "plain", model)

    @classmethod
    def for_bridge(cls, bridge, names: list[str], *, prefer_plain: bool = True,
                   mechanism: str = "auto") -> "HookSet":
        """Hooks on TransformerBridge names, by the plain twin when possible, else the bridge's points.

        mechanism : "auto" (plain when every name maps, else bridge), "plain" (raise ``ValueError`` if a
            name has no plain equivalent), or "bridge". ``prefer_plain=False`` is the same as "bridge".
        """
        from .models import plain_model

        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
        _check_names(names, available_hooks(bridge), "TransformerBridge")
        if not prefer_plain:
            mechanism = "bridge"
        plain = plain_model(bridge) if mechanism != "bridge" else None
        if plain is not None:
            sites = plain_sites(plain, names, getattr(bridge.cfg, "n_heads", None))
            if sites is not None:
                return cls(sites, lambda hs: hs._attach_modules(plain), "plain", plain)
        if mechanism == "plain":
            kind = getattr(getattr(plain, "config", None), "model_type", None) if plain is not None else None
            missing = [n for n in names if plain is None or plain_sites(plain, [n], None) is None]
            raise ValueError(
                f"mechanism='plain': no plain-module equivalent for {missing} on this model "
                f"({'model_type ' + repr(kind) if plain is not None else 'a bridge not made by load_model'}). "
                "Use mechanism='auto' or 'bridge'."
            )
        sites = [HookSite(n, n, "output", None, _pos_axis(n)) for n in names]
        return cls(sites, lambda hs: hs._attach_bridge(bridge), "bridge", bridge)

    # ------------------------------------------------------------------ hook functions
    def _record(self, site: HookSite, value) -> None:
        if isinstance(value, (tuple, list)):
            value = value[0]
        t = value.detach().clone()  # a later in-place op (ReLU(inplace=True)) must not rewrite what we took
        if site.n_heads:
            t = t.reshape(*t.shape[:-1], site.n_heads, t.shape[-1] // site.n_heads)
        self.acts[site.name] = t
        self._pending.discard(site.name)
        if not self._pending:
            raise StopForward

    def _attach_modules(self, root: torch.nn.Module) -> list:
        modules = dict(root.named_modules())
        handles = []
        for site in self.sites:
            mod = modules[site.module]
            if site.take == "output":
                handles.append(mod.register_forward_hook(lambda m, a, out, s=site: self._record(s, out)))
            else:

                def pre(m, args, kwargs, s=site):
                    self._record(s, args[0] if args else kwargs["hidden_states"])

                handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        return handles

    def _attach_bridge(self, bridge) -> list:
        handles = []
        for site in self.sites:
            hp = bridge.hook_dict[site.name]

            def fn(act, hook, s=site):
                self._record(s, act)

            handles.append(hp.add_hook(fn).hook)  # LensHandle.hook: removes only this hook
        return handles

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "HookSet":
        self._handles = self._attach(self)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def run(self, forward: Callable[[], object]) -> dict[str, torch.Tensor]:
        """Call ``forward()`` and return the captured activations; the forward stops after the last site."""
        self.acts = {}
        self._pending = {s.name for s in self.sites}
        try:
            with torch.inference_mode():
                forward()
        except StopForward:
            pass
        missing = self._pending
        if missing:
            raise RuntimeError(
                f"hook(s) {sorted(missing)} never fired during the forward; the module is not on the path "
                "that this input takes."
            )
        return self.acts
