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
  module equivalent (residual stream, attention/MLP outputs, MLP post-activation, ``attn.hook_z``, norms).
  It costs what a bare HF forward costs; tests check it equals ``run_with_cache``.
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


# TransformerBridge name → (HF module path, take, split heads) for decoder LMs with the Llama layout
# (Llama, Qwen2, Mistral …). Every entry is checked against run_with_cache in the tests.
_DECODER_PATTERNS: list[tuple[str, str, str, bool]] = [
    (r"hook_embed", "model.embed_tokens", "output", False),
    (r"blocks\.(\d+)\.hook_resid_pre", "model.layers.{0}", "input", False),
    (r"blocks\.(\d+)\.hook_resid_post", "model.layers.{0}", "output", False),
    (r"blocks\.(\d+)\.hook_resid_mid", "model.layers.{0}.post_attention_layernorm", "input", False),
    (r"blocks\.(\d+)\.hook_attn_out", "model.layers.{0}.self_attn", "output", False),
    (r"blocks\.(\d+)\.hook_mlp_out", "model.layers.{0}.mlp", "output", False),
    (r"blocks\.(\d+)\.mlp\.hook_post", "model.layers.{0}.mlp.down_proj", "input", False),
    (r"blocks\.(\d+)\.attn\.hook_z", "model.layers.{0}.self_attn.o_proj", "input", True),
    (r"blocks\.(\d+)\.ln1\.hook_out", "model.layers.{0}.input_layernorm", "output", False),
    (r"blocks\.(\d+)\.ln2\.hook_out", "model.layers.{0}.post_attention_layernorm", "output", False),
    (r"ln_final\.hook_out", "model.norm", "output", False),
]
_ENCODER_PATTERNS: list[tuple[str, str, str, bool]] = [
    (r"blocks\.(\d+)\.hook_resid_post", "bert.encoder.layer.{0}", "output", False),
]


def _pos_axis(name: str) -> int:
    return 2 if name.endswith(("hook_pattern", "hook_attn_scores")) else 1


def plain_sites(plain: torch.nn.Module, names: list[str], n_heads: int | None) -> list[HookSite] | None:
    """Map bridge names to modules of the plain HF twin, or None if any name has no known equivalent."""
    modules = dict(plain.named_modules())
    patterns = _ENCODER_PATTERNS if "bert.encoder.layer.0" in modules else _DECODER_PATTERNS
    sites = []
    for name in names:
        for pat, path, take, heads in patterns:
            m = re.fullmatch(pat, name)
            if m:
                module = path.format(*m.groups())
                if module not in modules:
                    return None
                sites.append(HookSite(name, module, take, n_heads if heads else None, 1))
                break
        else:
            return None
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
    def for_bridge(cls, bridge, names: list[str], *, prefer_plain: bool = True) -> "HookSet":
        """Hooks on TransformerBridge names, by the plain twin when possible, else the bridge's points."""
        from .models import plain_model

        _check_names(names, available_hooks(bridge), "TransformerBridge")
        plain = plain_model(bridge) if prefer_plain else None
        if plain is not None:
            sites = plain_sites(plain, names, getattr(bridge.cfg, "n_heads", None))
            if sites is not None:
                return cls(sites, lambda hs: hs._attach_modules(plain), "plain", plain)
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
