"""LinearScope for transformer LMs: the exact input-dependent linear map from input embeddings to logits.

METHODS.md §4, transformer extension. Two streams run through the model: x⁰ (the real input embeddings, the output
of the model's input-embedding module, so Gemma's √d scale is in x⁰) and x¹ (a probe input). Every nonlinearity
takes its decision from x⁰ and applies it to x¹:

- LayerNorm / RMSNorm: ``x¹ ↦ w ⊙ (x¹ − c) · r(x⁰) + β`` with ``r(x⁰) = 1 / sqrt(var(x⁰) + ε)`` (the scale of x⁰;
  RMSNorm: the mean square, no centring). Gemma's norms multiply by ``1 + w``. The centring ``c`` is linear: by
  default (``norm_centering="probe"``, as :class:`~probekit.probes.linearscope.LinearScope`) ``c = mean(x¹)``;
  ``norm_centering="decision"`` freezes the mean of x⁰ as well (``c = mean(x⁰)``, the literal "mean and scale
  frozen" reading), which moves ``−w·mean(x⁰)·r`` into b. Both give ``y¹(x⁰) = f(x⁰)``.
- attention: the softmax pattern of x⁰ (queries and keys from x⁰ with their q/k norms, rotary embedding — full,
  partial or GPT-J's interleaved —, the attention scale, Gemma 2's logit soft-cap, the causal and sliding-window
  masks) mixes the values of x¹ (``P⁰ · W_V x¹``, plus the value bias where the model has one);
- gated MLP: ``W_down (act(W_gate x⁰) ⊙ W_up x¹)``; plain MLP (GPT-2, NeoX, GPT-J): ``W_out (m(z⁰) ⊙ z¹)`` with
  ``z = W_in x + b_in`` and ``m = f(z⁰)/z⁰`` in closed form (GELU: ``Φ(z⁰)``; tanh-GELU:
  ``½(1 + tanh(√(2/π)(z⁰ + 0.044715 z⁰³)))``; SiLU: ``σ(z⁰)``; ReLU: ``1[z⁰ > 0]``), so the map is exact at x¹ = x⁰;
- final logit soft-cap (Gemma 2/3): ``cap·tanh(z/cap) ↦ (cap·tanh(z⁰/cap)/z⁰) · z¹`` (1 where ``z⁰ = 0``).

Post-attention / post-feedforward norms (Gemma 2/3, OLMo 2) and BERT/RoBERTa's post-residual LayerNorms are
norms like any other; parallel blocks (GPT-NeoX ``use_parallel_residual``, GPT-J, Phi-2) add both branches to
the residual; learned positions (GPT-2, BERT, RoBERTa) and BERT's token type 0 are additive constants (they land
in b); the encoders attend both ways and their masked-LM transform (dense → GELU → LayerNorm) follows the same
rules.

So ``y¹ = A(x⁰) x¹ + b(x⁰)`` exactly, and ``y¹(x⁰) = f(x⁰)``: the real logits. ``b`` is ``y¹`` at ``x¹ = 0``.
A token's contribution to a logit is its block of A applied to its own embedding; the contributions and b add up
to the logit exactly.

One code path runs both streams: in the real stream every decision is computed from the current tensor and
recorded, in the probe stream it is read back, so nothing nonlinear in x¹ can slip through. A model whose
family, module or config field has no rule is refused in the constructor (:func:`check_support`, naming it);
on every call the real stream is compared with the model's own forward (and the probe stream at x¹ = x⁰ with the
real stream), and a mismatch raises :class:`LinearScopeError` — a wrong map is never returned.
:data:`SUPPORTED_FAMILIES` lists the outcome per ``config.model_type``. Single sequences without padding (for
RoBERTa: no pad token inside the prompt, whose positions HF would skip).

Example
-------
>>> scope = TransformerLinearScope(bridge, dtype=torch.float64)            # doctest: +SKIP
>>> ids = tok("def add(a, b):\\n    return a +", return_tensors="pt")["input_ids"][0]  # doctest: +SKIP
>>> rec = scope.reconstruction(ids)                                        # doctest: +SKIP
>>> rec["hf_relative_error"] < 1e-6                                        # doctest: +SKIP
True
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch

from .linearscope import LinearScopeError

__all__ = ["LinearScopeError", "SUPPORTED_FAMILIES", "TokenContributions", "TransformerLinearScope",
           "check_support"]

#: Outcome per HF ``config.model_type``: "exact" (rebuilds the HF forward to ≤ 1e-6 relative in float64, A equal to
#: the Jacobian with decisions detached; tests/unit/test_linearscope_families.py) or "refused: why".
SUPPORTED_FAMILIES: dict[str, str] = {
    "gpt2": "exact", "gpt_neox": "exact", "gptj": "exact", "llama": "exact", "mistral": "exact", "qwen2": "exact",
    "qwen3": "exact", "gemma": "exact", "gemma2": "exact", "gemma3_text": "exact", "phi3": "exact", "olmo2": "exact",
    "phi": "exact", "bert": "exact", "roberta": "exact",
    "gemma3": "refused: the multimodal Gemma3ForConditionalGeneration; load the text model (Gemma3ForCausalLM)",
}
_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2"}
_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}  # static tables; "dynamic"/"longrope" depend on the length
_TOL = {torch.float64: 1e-5, torch.float32: 5e-4}  # HF keeps softmax, rotary tables, some norms in float32


def _unwrap(model) -> torch.nn.Module:
    from ..models import plain_model

    if hasattr(model, "hook_dict"):  # a TransformerBridge: use its plain twin, or its HF model
        return plain_model(model) or model.original_model
    return model


# ---------------------------------------------------------------------------------------------- resolved modules
@dataclass
class _Norm:
    """A LayerNorm/RMSNorm resolved to its formula: ``(x − c) · r · (offset + weight) + bias``."""

    path: str
    weight: torch.Tensor | None  # the module's own parameter (read at each call, so later edits count)
    bias: torch.Tensor | None
    eps: float
    center: bool
    offset: float = 0.0  # Gemma: the multiplier is 1 + w

    def rscale(self, x: torch.Tensor) -> torch.Tensor:
        """``1 / sqrt(var + ε)`` over the last dim ``(..., 1)`` (the decision)."""
        z = x - x.mean(-1, keepdim=True) if self.center else x
        return torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + self.eps)

    def affine(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            x = x * (self.weight + self.offset if self.offset else self.weight)
        return x + self.bias if self.bias is not None else x

    def full(self, x: torch.Tensor) -> torch.Tensor:
        """The norm itself (used inside the attention pattern, a decision as a whole)."""
        z = x - x.mean(-1, keepdim=True) if self.center else x
        return self.affine(z * self.rscale(x))


@dataclass
class _Attn:
    layout: str  # "separate" (q/k/v_proj), "phi3" (qkv_proj), "gpt2" (c_attn), "neox" (query_key_value)
    proj: tuple  # the projection modules for the layout
    out: torch.nn.Module
    n_heads: int
    n_kv: int
    head_dim: int
    scaling: float
    softcap: float | None
    q_norm: _Norm | None
    k_norm: _Norm | None
    qk_norm_per_head: bool
    rope: tuple | None  # (inv_freq (rd/2,), attention_scaling, style "half"|"interleaved") or None
    window: int | None
    causal: bool = True  # False: BERT/RoBERTa encoders attend both ways


@dataclass
class _Mlp:
    layout: str  # "gated" (gate/up/down), "gate_up" (Phi-3 fused), "plain" (in → act → out)
    proj: tuple
    act: str  # "silu" | "gelu" | "gelu_tanh" | "relu"
    act_module: torch.nn.Module


@dataclass
class _Block:
    attn_in: _Norm | None
    attn: _Attn
    attn_out: _Norm | None
    mlp_in: _Norm | None
    mlp: _Mlp
    mlp_out: _Norm | None
    parallel: bool
    attn_resid: _Norm | None = None  # post-LN (BERT/RoBERTa): the norm of h + attention
    mlp_resid: _Norm | None = None  # and of h + MLP


_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {  # m(z) = f(z)/z in closed form
    "silu": torch.sigmoid,
    "gelu": lambda z: 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0))),
    "gelu_tanh": lambda z: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z.pow(3)))),
    "relu": lambda z: (z > 0).to(z.dtype),
}


def _identify_act(module: torch.nn.Module, path: str) -> str:
    """Which closed form ``module`` computes (checked numerically on a grid), or refuse naming it."""
    z = torch.linspace(-6, 6, 241, dtype=torch.float64)
    with torch.no_grad():
        try:
            out = module(z).to(torch.float64)
        except Exception as e:  # noqa: BLE001 - any failure means: not a pointwise function we know
            raise LinearScopeError(f"{path} ({type(module).__name__}): not a pointwise activation ({e})") from e
    for name, m in _ACTS.items():
        if out.shape == z.shape and torch.allclose(out, m(z) * z, rtol=1e-6, atol=1e-6):
            return name
    raise LinearScopeError(f"{path} is {type(module).__name__}: not a supported activation (supported: "
                           f"{', '.join(_ACTS)}); TransformerLinearScope has no frozen-decision rule for it")


def _resolve_norm(module: torch.nn.Module | None, path: str) -> _Norm | None:
    """Read a norm module's formula: nn.LayerNorm directly; RMSNorm-like modules checked numerically for
    ``w·x/rms`` or Gemma's ``(1+w)·x/rms``; anything else is refused naming the module."""
    if module is None:
        return None
    if isinstance(module, torch.nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            raise LinearScopeError(f"{path}: LayerNorm over {tuple(module.normalized_shape)}; only the last dim")
        return _Norm(path, module.weight, module.bias, float(module.eps), center=True)
    w = getattr(module, "weight", None)
    eps = next((getattr(module, a) for a in ("variance_epsilon", "eps", "epsilon") if hasattr(module, a)), None)
    extra = [n for n, _ in module.named_parameters() if n != "weight"]
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or extra:
        raise LinearScopeError(f"{path} is {type(module).__name__}: not a LayerNorm/RMSNorm with one weight vector")
    eps_used = float(torch.finfo(torch.float64).eps if eps is None else eps)
    x = torch.randn(5, w.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    with torch.no_grad():  # on a float64 copy, so that a bf16 model is judged by its formula, not its rounding
        out = copy.deepcopy(module).to(torch.float64)(x).to(torch.float64)
        base = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps_used)
        w64 = w.detach().to(torch.float64)
        for offset in (0.0, 1.0):
            if torch.allclose(out, base * (w64 + offset), rtol=1e-5, atol=1e-6):
                eps_run = float(torch.finfo(w.dtype).eps if eps is None else eps)
                return _Norm(path, w, None, eps_run, center=False, offset=offset)
    raise LinearScopeError(f"{path} is {type(module).__name__}: its output is neither w·x/rms(x) nor "
                           "(1+w)·x/rms(x); no rule for this norm")


def _rope_params(cfg, layer_type: str | None) -> dict:
    rp = getattr(cfg, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(rp.get(layer_type), dict):
        rp = rp[layer_type]
    return rp


def _rope(model, family: str, cfg, head_dim: int, layer_type: str | None):
    """(inv_freq float64 (rd/2,), attention scaling, style) of one layer, or refuse an unsupported rope type."""
    if family == "gpt2":
        return None
    if family == "gptj":  # sinusoids on the first rotary_dim dims of each head, interleaved pairs, base 10000
        rd = cfg.rotary_dim or head_dim
        inv = 1.0 / (10000 ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd))
        return inv, 1.0, "interleaved"
    rp = _rope_params(cfg, layer_type)
    rtype = rp.get("rope_type", "default")
    if rtype not in _ROPE_TYPES:
        raise LinearScopeError(f"config.rope_parameters rope_type={rtype!r}: the rotary table depends on the "
                               f"sequence length; supported: {sorted(_ROPE_TYPES)}")
    rot = model.gpt_neox.rotary_emb if family == "gpt_neox" else model.model.rotary_emb
    prefix = f"{layer_type}_" if hasattr(rot, f"{layer_type}_inv_freq") else ""
    inv = getattr(rot, f"{prefix}original_inv_freq", None)
    inv = getattr(rot, f"{prefix}inv_freq") if inv is None else inv
    return inv.detach().to(torch.float64), float(getattr(rot, f"{prefix}attention_scaling", 1.0)), "half"


def _window(cfg, i: int) -> int | None:
    types = getattr(cfg, "layer_types", None)
    sw = getattr(cfg, "sliding_window", None)
    if types is not None:
        if types[i] not in ("full_attention", "sliding_attention"):
            raise LinearScopeError(f"config.layer_types[{i}] = {types[i]!r}: no rule for this attention type")
        return sw if types[i] == "sliding_attention" else None
    return sw


class _Builder:
    """Resolves one HF model into blocks, recording which parametrised modules it consumed."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.names = {id(m): n for n, m in model.named_modules()}
        self.used: set[str] = set()

    def take(self, module: torch.nn.Module | None) -> torch.nn.Module | None:
        if module is not None:
            name = self.names[id(module)]
            self.used.update(".".join(filter(None, (name, n))) for n, _ in module.named_modules())
        return module

    def norm(self, module) -> _Norm | None:
        if module is None:
            return None
        return _resolve_norm(self.take(module), self.names[id(module)])

    def act(self, module) -> str:
        return _identify_act(self.take(module), self.names[id(module)])

    def check_all_used(self) -> None:
        for n, mod in self.model.named_modules():
            if any(True for _ in mod.parameters(recurse=False)) and n not in self.used:
                raise LinearScopeError(f"{n} ({type(mod).__name__}): a module with weights that "
                                       f"TransformerLinearScope has no rule for in a {self.model.config.model_type} "
                                       "model; refusing rather than skipping it")


@dataclass
class _Net:
    embed: torch.nn.Module  # x⁰ = embed(ids)
    const: Callable | None  # (T, device) → (T, D) added to x (learned positions, token type 0): lands in b
    emb_norm: _Norm | None  # BERT/RoBERTa: LayerNorm on the embeddings
    blocks: list
    final_norm: _Norm | None
    head_mlp: tuple | None  # BERT/RoBERTa MLM transform: (dense, activation, norm)
    head: torch.nn.Module  # → logits
    cap: float | None  # final logit soft-cap


def _llama_like(b: _Builder, model, cfg) -> _Net:
    """Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, OLMo 2: ``model.model.layers`` of self_attn + gated mlp."""
    family, H = cfg.model_type, cfg.num_attention_heads
    Hkv = getattr(cfg, "num_key_value_heads", None) or H
    blocks = []
    for i, layer in enumerate(model.model.layers):
        att, mlp = layer.self_attn, layer.mlp
        hd = att.head_dim
        if hasattr(att, "qkv_proj"):  # Phi-3
            layout, proj = "phi3", (b.take(att.qkv_proj),)
        else:
            layout, proj = "separate", (b.take(att.q_proj), b.take(att.k_proj), b.take(att.v_proj))
        qn, kn = b.norm(getattr(att, "q_norm", None)), b.norm(getattr(att, "k_norm", None))
        per_head = qn is not None and qn.weight.shape[0] == hd  # Qwen3, Gemma 3; OLMo 2 norms all heads at once
        ltype = cfg.layer_types[i] if getattr(cfg, "layer_types", None) else None
        a = _Attn(layout, proj, b.take(att.o_proj), H, Hkv, hd, float(att.scaling),
                  getattr(cfg, "attn_logit_softcapping", None), qn, kn, per_head, _rope(model, family, cfg, hd, ltype),
                  _window(cfg, i))
        if hasattr(mlp, "gate_up_proj"):  # Phi-3: [gate | up]
            m = _Mlp("gate_up", (b.take(mlp.gate_up_proj), b.take(mlp.down_proj)), b.act(mlp.activation_fn),
                     mlp.activation_fn)
        else:
            m = _Mlp("gated", (b.take(mlp.gate_proj), b.take(mlp.up_proj), b.take(mlp.down_proj)), b.act(mlp.act_fn),
                     mlp.act_fn)
        if family in ("gemma2", "gemma3_text"):  # (attn in, attn out, mlp in, mlp out)
            norms = (layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                     layer.post_feedforward_layernorm)
        elif family == "olmo2":
            norms = (None, layer.post_attention_layernorm, None, layer.post_feedforward_layernorm)
        else:
            norms = (layer.input_layernorm, None, layer.post_attention_layernorm, None)
        n = [b.norm(x) for x in norms]
        blocks.append(_Block(n[0], a, n[1], n[2], m, n[3], parallel=False))
    return _Net(b.take(model.model.embed_tokens), None, None, blocks, b.norm(model.model.norm), None,
                b.take(model.lm_head), getattr(cfg, "final_logit_softcapping", None))


def _gpt2(b: _Builder, model, cfg) -> _Net:
    """GPT-2: fused Conv1D qkv, LayerNorms, plain MLP, learned positions."""
    H, base, blocks = cfg.num_attention_heads, model.transformer, []
    for layer in base.h:
        att, mlp = layer.attn, layer.mlp
        a = _Attn("gpt2", (b.take(att.c_attn),), b.take(att.c_proj), H, H, att.head_dim, float(att.scaling), None,
                  None, None, False, None, None)
        m = _Mlp("plain", (b.take(mlp.c_fc), b.take(mlp.c_proj)), b.act(mlp.act), mlp.act)
        blocks.append(_Block(b.norm(layer.ln_1), a, None, b.norm(layer.ln_2), m, None, parallel=False))
    wpe = b.take(base.wpe)
    return _Net(b.take(base.wte), lambda T, dev: wpe(torch.arange(T, device=dev)), None, blocks, b.norm(base.ln_f),
                None, b.take(model.lm_head), None)


def _gpt_neox(b: _Builder, model, cfg) -> _Net:
    """GPT-NeoX / Pythia: per-head fused qkv, partial rotary, parallel or sequential residual."""
    H, base, blocks = cfg.num_attention_heads, model.gpt_neox, []
    for layer in base.layers:
        att, mlp = layer.attention, layer.mlp
        hd = att.head_size
        a = _Attn("neox", (b.take(att.query_key_value),), b.take(att.dense), H, H, hd, float(att.scaling), None, None,
                  None, False, _rope(model, "gpt_neox", cfg, hd, None), None)
        m = _Mlp("plain", (b.take(mlp.dense_h_to_4h), b.take(mlp.dense_4h_to_h)), b.act(mlp.act), mlp.act)
        blocks.append(_Block(b.norm(layer.input_layernorm), a, None, b.norm(layer.post_attention_layernorm), m, None,
                             parallel=bool(layer.use_parallel_residual)))
    return _Net(b.take(base.embed_in), None, None, blocks, b.norm(base.final_layer_norm), None,
                b.take(model.lm_head), None)


def _gptj(b: _Builder, model, cfg) -> _Net:
    """GPT-J: interleaved rotary on ``rotary_dim``, one LayerNorm feeding parallel attention and MLP."""
    H, base, blocks = cfg.num_attention_heads, model.transformer, []
    for layer in base.h:
        att, mlp = layer.attn, layer.mlp
        hd = att.head_dim
        a = _Attn("separate", (b.take(att.q_proj), b.take(att.k_proj), b.take(att.v_proj)), b.take(att.out_proj), H,
                  H, hd, float(att.scaling), None, None, None, False, _rope(model, "gptj", cfg, hd, None), None)
        m = _Mlp("plain", (b.take(mlp.fc_in), b.take(mlp.fc_out)), b.act(mlp.act), mlp.act)
        ln = b.norm(layer.ln_1)
        blocks.append(_Block(ln, a, None, ln, m, None, parallel=True))
    return _Net(b.take(base.wte), None, None, blocks, b.norm(base.ln_f), None, b.take(model.lm_head), None)


def _phi(b: _Builder, model, cfg) -> _Net:
    """Phi-1/Phi-2: one LayerNorm feeding parallel attention and MLP, partial rotary, optional per-head q/k
    LayerNorm (``qk_layernorm``), biased lm_head."""
    H = cfg.num_attention_heads
    Hkv = getattr(cfg, "num_key_value_heads", None) or H
    blocks = []
    for layer in model.model.layers:
        att, mlp = layer.self_attn, layer.mlp
        hd = att.head_dim
        qn, kn = b.norm(getattr(att, "q_layernorm", None)), b.norm(getattr(att, "k_layernorm", None))
        a = _Attn("separate", (b.take(att.q_proj), b.take(att.k_proj), b.take(att.v_proj)), b.take(att.dense), H,
                  Hkv, hd, float(att.scaling), None, qn, kn, True, _rope(model, "phi", cfg, hd, None), None)
        m = _Mlp("plain", (b.take(mlp.fc1), b.take(mlp.fc2)), b.act(mlp.activation_fn), mlp.activation_fn)
        ln = b.norm(layer.input_layernorm)
        blocks.append(_Block(ln, a, None, ln, m, None, parallel=True))
    return _Net(b.take(model.model.embed_tokens), None, None, blocks, b.norm(model.model.final_layernorm), None,
                b.take(model.lm_head), None)


def _encoder(b: _Builder, model, cfg) -> _Net:
    """BERT / RoBERTa masked LMs: embedding LayerNorm, post-residual LayerNorms, both-way attention, MLM head."""
    family, H = cfg.model_type, cfg.num_attention_heads
    emb = getattr(model, family).embeddings
    wpe, tte = b.take(emb.position_embeddings), b.take(emb.token_type_embeddings)
    offset = emb.padding_idx + 1 if family == "roberta" else 0  # RoBERTa counts positions from pad + 1

    def const(T, dev):  # positions and token type 0: an additive constant
        return wpe(torch.arange(T, device=dev) + offset) + tte(torch.zeros(T, dtype=torch.long, device=dev))

    blocks = []
    for layer in getattr(model, family).encoder.layer:
        sa, so = layer.attention.self, layer.attention.output
        a = _Attn("separate", (b.take(sa.query), b.take(sa.key), b.take(sa.value)), b.take(so.dense), H, H,
                  sa.attention_head_size, float(sa.scaling), None, None, None, False, None, None,
                  causal=bool(getattr(cfg, "is_decoder", False)))
        act = layer.intermediate.intermediate_act_fn
        m = _Mlp("plain", (b.take(layer.intermediate.dense), b.take(layer.output.dense)), b.act(act), act)
        blocks.append(_Block(None, a, None, None, m, None, parallel=False, attn_resid=b.norm(so.LayerNorm),
                             mlp_resid=b.norm(layer.output.LayerNorm)))
    if family == "bert":
        t = model.cls.predictions.transform
        head_mlp = (b.take(t.dense), b.act(t.transform_act_fn), b.norm(t.LayerNorm))
        b.take(model.cls.predictions)  # its output bias is the decoder's (tied)
        head = model.cls.predictions.decoder
    else:  # RobertaLMHead: dense → exact GELU (a function, not a module) → layer_norm → decoder
        h = model.lm_head
        head_mlp = (b.take(h.dense), "gelu", b.norm(h.layer_norm))
        b.take(h)
        head = h.decoder
    return _Net(b.take(emb.word_embeddings), const, b.norm(emb.LayerNorm), blocks, None, head_mlp, head, None)


_FAMILY_RULES: dict[str, Callable[[_Builder, Any, Any], _Net]] = {
    **{f: _llama_like for f in _LLAMA_LIKE}, "gpt2": _gpt2, "gpt_neox": _gpt_neox, "gptj": _gptj, "phi": _phi,
    "bert": _encoder, "roberta": _encoder,
}


def _build(model: torch.nn.Module) -> _Net:
    """The model resolved into rules, or :class:`LinearScopeError` naming what has none."""
    cfg = getattr(model, "config", None)
    family = getattr(cfg, "model_type", None)
    if family is None:
        raise LinearScopeError(f"{type(model).__name__}: not a transformers model (no config.model_type); "
                               "TransformerLinearScope interprets HF transformer LMs, LinearScope any nn.Module")
    why = SUPPORTED_FAMILIES.get(family)
    if why != "exact" or family not in _FAMILY_RULES:
        raise LinearScopeError(f"{type(model).__name__} (model_type {family!r}): "
                               f"{why or 'no TransformerLinearScope rules for this family'}; exact families: "
                               f"{sorted(k for k, v in SUPPORTED_FAMILIES.items() if v == 'exact')}")
    head_attr, head_cls = {"bert": ("cls", "BertForMaskedLM"), "roberta": ("lm_head", "RobertaForMaskedLM")}.get(
        family, ("lm_head", f"the causal-LM class of {family}"))
    if getattr(model, head_attr, None) is None:
        raise LinearScopeError(f"{type(model).__name__}: no {head_attr} (an output head to read logits from); "
                               f"load {head_cls}")
    if getattr(cfg, "add_cross_attention", False):
        raise LinearScopeError(f"{family}: config.add_cross_attention=True; cross-attention has no rule")
    b = _Builder(model)
    net = _FAMILY_RULES[family](b, model, cfg)
    b.check_all_used()
    return net


def check_support(model) -> None:
    """Raise :class:`LinearScopeError` naming the family, module or config field TransformerLinearScope cannot
    interpret exactly; return None when it can (for ``probekit models check``). Runs no model forward: only
    tiny probes of the norm and activation modules, to tell their formulas apart."""
    _build(_unwrap(model))


# ---------------------------------------------------------------------------------------------- the two streams
class _Rec:
    """Decisions: computed from the current (real) tensor and stored, or read back for the probe stream."""

    def __init__(self, store: dict | None = None, *, detach: bool = False):
        self.replay = store is not None
        self.d = store if store is not None else {}
        self.detach = detach

    def __call__(self, key: str, fn: Callable[[torch.Tensor], Any], z: torch.Tensor):
        if self.replay:
            return self.d[key]
        out = fn(z.detach() if self.detach else z)
        self.d[key] = out
        return out


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotary embedding on the first ``cos.shape[-1]`` dims of ``x (..., T, hd)``; the rest passes."""
    rd = cos.shape[-1]
    xr, xp = x[..., :rd], x[..., rd:]
    if style == "half":
        rot = torch.cat((-xr[..., rd // 2:], xr[..., : rd // 2]), dim=-1)
    else:  # GPT-J: pairs (2i, 2i+1)
        rot = torch.stack((-xr[..., 1::2], xr[..., ::2]), dim=-1).flatten(-2)
    return torch.cat((xr * cos + rot * sin, xp), dim=-1)


def _softcap_ratio(cap: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def ratio(z):
        safe = torch.where(z == 0, torch.ones_like(z), z)
        return torch.where(z == 0, torch.ones_like(z), cap * torch.tanh(safe / cap) / safe)

    return ratio


@dataclass
class TokenContributions:
    """Per-token contributions to one logit: LinearScope (exact decomposition) beside gradient × input."""

    tokens: list[str]
    target: str
    logit: float
    bias: float
    linearscope: list[float]
    grad_x_input: list[float]

    def to_dict(self) -> dict:
        return asdict(self)

    def figures(self, *, view: str = "heatmap", prompt: str | None = None) -> list:
        """One plotly figure: each token's contribution to the logit, LinearScope (exact) beside gradient × input.

        Reads ``tokens``, ``target``, ``logit``, ``bias``, ``linearscope`` and ``grad_x_input`` (one float per token).

        Parameters
        ----------
        view : {"heatmap", "bars"}
            A two-row heatmap on a colour scale symmetric about 0, or grouped bars per token.
        prompt : str, optional
            The prompt text, named in the title.

        Returns
        -------
        list of plotly.graph_objects.Figure
        """
        import plotly.graph_objects as go

        if view not in ("heatmap", "bars"):
            raise ValueError(f"view must be one of ['heatmap', 'bars'], not {view!r}")
        # the position keeps repeated tokens apart; newlines and spaces drawn visibly (⏎, ·)
        toks = [f"{i}:{t}".replace("\n", "⏎").replace(" ", "·") for i, t in enumerate(self.tokens)]
        if view == "bars":
            fig = go.Figure([go.Bar(x=toks, y=list(self.linearscope), name="LinearScope (exact)"),
                             go.Bar(x=toks, y=list(self.grad_x_input), name="gradient × input")])
            fig.update_layout(barmode="group", yaxis_title="contribution to the logit")
        else:
            z = [list(self.linearscope), list(self.grad_x_input)]
            lim = float(np.nanmax(np.abs(np.asarray(z, dtype=float)), initial=0.0)) or 1.0
            fig = go.Figure(go.Heatmap(z=z, x=toks, y=["LinearScope", "gradient × input"], colorscale="RdBu",
                                       zmin=-lim, zmax=lim, colorbar={"title": {"text": "contribution to the logit"}}))
            fig.update_layout(yaxis_title="attribution method")
        head = f"{prompt!r} → {self.target!r}" if prompt is not None else f"{self.target!r}"
        fig.update_layout(title=f"{head}: logit {self.logit:.2f} = Σ LinearScope + b ({self.bias:.2f})",
                          template="plotly_white", xaxis_title="token")
        fig.update_xaxes(type="category")
        return [fig]


class TransformerLinearScope:
    """Exact linear interpreter of a transformer LM at one input (see module docstring).

    Parameters
    ----------
    model : TransformerBridge from ``load_model``, or an HF causal LM (BERT/RoBERTa: masked LM) of a family marked
        "exact" in :data:`SUPPORTED_FAMILIES`.
    dtype : computation dtype; float64 for exact reconstructions (a private copy is made when it differs).
    norm_centering : {"probe", "decision"}
        LayerNorm centring of the probe stream: ``mean(x¹)`` (linear, default) or the frozen ``mean(x⁰)``.
    tolerance : relative error allowed between the real stream and the model's own forward on every call
        (default 1e-5 in float64, 5e-4 in float32: HF keeps softmax, rotary tables and some norms in float32).

    Raises
    ------
    LinearScopeError
        In the constructor, naming the unsupported family, module or config field (no computation is run); on
        any call, when the interpreter does not reproduce the model's forward within ``tolerance``.
    """

    def __init__(self, model, *, dtype: torch.dtype = torch.float64, norm_centering: str = "probe",
                 tolerance: float | None = None):
        if norm_centering not in ("probe", "decision"):
            raise ValueError(f"norm_centering must be 'probe' or 'decision', not {norm_centering!r}")
        m = _unwrap(model)
        _build(m)  # refuse before copying anything
        if next(m.parameters()).dtype != dtype:
            m = copy.deepcopy(m).to(dtype)
        self.model = m.eval()
        self.dtype = dtype
        self.device = next(m.parameters()).device
        self.cfg = m.config
        self.family = m.config.model_type
        self.norm_centering = norm_centering
        self.tolerance = tolerance if tolerance is not None else _TOL.get(dtype, 5e-2)
        self.net = _build(m)
        self.blocks = self.net.blocks

    # ------------------------------------------------------------------ the two-stream forward
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``(T, D)`` of token ids ``(T,)``: the model's input-embedding module (Gemma: scaled)."""
        return self.net.embed(ids.to(self.device)).to(self.dtype)

    def _norm(self, rec: _Rec, key: str, n: _Norm | None, x: torch.Tensor) -> torch.Tensor:
        if n is None:
            return x
        if n.center:
            mu = (x.mean(-1, keepdim=True) if self.norm_centering == "probe"
                  else rec(key + ".mean", lambda z: z.mean(-1, keepdim=True), x))
            x = x - mu
        return n.affine(x * rec(key + ".scale", n.rscale, x))

    def _qkv(self, a: _Attn, x: torch.Tensor):
        """q ``(..., T, H·hd)``, k and v ``(..., T, Hkv·hd)`` of the layer's input."""
        if a.layout == "separate":
            return a.proj[0](x), a.proj[1](x), a.proj[2](x)
        out = a.proj[0](x)
        if a.layout == "phi3":
            nq, nk = a.n_heads * a.head_dim, a.n_kv * a.head_dim
            return out[..., :nq], out[..., nq:nq + nk], out[..., nq + nk:]
        if a.layout == "gpt2":
            return out.split(a.n_heads * a.head_dim, dim=-1)
        qkv = out.unflatten(-1, (a.n_heads, 3 * a.head_dim)).chunk(3, dim=-1)  # neox: [q|k|v] per head
        return tuple(t.flatten(-2) for t in qkv)

    @staticmethod
    def _heads(x: torch.Tensor, n: int, hd: int) -> torch.Tensor:
        return x.unflatten(-1, (n, hd)).transpose(-2, -3)  # (..., n, T, hd)

    def _pattern(self, a: _Attn, x: torch.Tensor) -> torch.Tensor:
        """Softmax pattern ``(H, T, T)`` of the real stream at one layer."""
        T = x.shape[-2]
        q, k, _ = self._qkv(a, x)
        if a.q_norm is not None and not a.qk_norm_per_head:  # OLMo 2: over all heads at once
            q, k = a.q_norm.full(q), a.k_norm.full(k)
        q, k = self._heads(q, a.n_heads, a.head_dim), self._heads(k, a.n_kv, a.head_dim)
        if a.q_norm is not None and a.qk_norm_per_head:  # Qwen3, Gemma 3
            q, k = a.q_norm.full(q), a.k_norm.full(k)
        if a.rope is not None:
            inv, scale, style = a.rope
            freqs = torch.arange(T, dtype=torch.float64, device=x.device)[:, None] * inv.to(x.device)[None, :]
            emb = torch.cat((freqs, freqs), -1) if style == "half" else freqs.repeat_interleave(2, -1)
            cos, sin = (emb.cos() * scale).to(self.dtype), (emb.sin() * scale).to(self.dtype)
            q, k = _rotate(q, cos, sin, style), _rotate(k, cos, sin, style)
        k = k.repeat_interleave(a.n_heads // a.n_kv, dim=-3)
        s = q @ k.transpose(-1, -2) * a.scaling
        if a.softcap is not None:
            s = a.softcap * torch.tanh(s / a.softcap)
        i = torch.arange(T, device=x.device)
        allowed = i[None, :] <= i[:, None] if a.causal else torch.ones(T, T, dtype=torch.bool, device=x.device)
        if a.window is not None:
            allowed &= i[None, :] > i[:, None] - a.window
        return torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)

    def _attention(self, rec: _Rec, key: str, a: _Attn, x: torch.Tensor) -> torch.Tensor:
        pattern = rec(key + ".pattern", lambda z: self._pattern(a, z), x)
        v = a.proj[2](x) if a.layout == "separate" else self._qkv(a, x)[2]  # fused layouts: one projection
        v = self._heads(v, a.n_kv, a.head_dim).repeat_interleave(a.n_heads // a.n_kv, dim=-3)
        return a.out((pattern @ v).transpose(-2, -3).flatten(-2))

    def _mlp(self, rec: _Rec, key: str, m: _Mlp, x: torch.Tensor) -> torch.Tensor:
        if m.layout == "plain":
            z = m.proj[0](x)
            return m.proj[1](rec(key + ".act", _ACTS[m.act], z) * z)
        if m.layout == "gated":
            gate = rec(key + ".gate", lambda t: m.act_module(m.proj[0](t)), x)
            return m.proj[2](gate * m.proj[1](x))
        gu = m.proj[0](x)
        half = gu.shape[-1] // 2
        gate = rec(key + ".gate", lambda t: m.act_module(t[..., :half]), gu)  # Phi-3: [gate | up]
        return m.proj[1](gate * gu[..., half:])

    def _stream(self, x: torch.Tensor, rec: _Rec) -> torch.Tensor:
        """Logits ``(..., T, V)`` of ``x (..., T, D)``; decisions recorded (real stream) or replayed (probe)."""
        net, h = self.net, x
        if net.const is not None:  # learned positions (and BERT's token type 0): an additive constant
            h = h + net.const(x.shape[-2], x.device).to(self.dtype)
        h = self._norm(rec, "embed", net.emb_norm, h)
        for i, blk in enumerate(net.blocks):
            a = self._attention(rec, f"{i}.attn", blk.attn, self._norm(rec, f"{i}.attn_in", blk.attn_in, h))
            a = self._norm(rec, f"{i}.attn_out", blk.attn_out, a)
            if blk.parallel:
                h = h + a + self._mlp(rec, f"{i}.mlp", blk.mlp, self._norm(rec, f"{i}.mlp_in", blk.mlp_in, h))
                continue
            h = self._norm(rec, f"{i}.attn_resid", blk.attn_resid, h + a)
            f = self._mlp(rec, f"{i}.mlp", blk.mlp, self._norm(rec, f"{i}.mlp_in", blk.mlp_in, h))
            h = self._norm(rec, f"{i}.mlp_resid", blk.mlp_resid, h + self._norm(rec, f"{i}.mlp_out", blk.mlp_out, f))
        h = self._norm(rec, "final", net.final_norm, h)
        if net.head_mlp is not None:
            dense, act, norm = net.head_mlp
            z = dense(h)
            h = self._norm(rec, "head", norm, rec("head.act", _ACTS[act], z) * z)
        y = net.head(h)
        if net.cap is not None:
            y = rec("logit_cap", _softcap_ratio(float(net.cap)), y) * y
        return y

    def _record(self, x0: torch.Tensor, *, detach: bool = False) -> dict:
        rec = _Rec(detach=detach)
        logits = self._stream(x0, rec)
        return dict(decisions=rec.d, logits=logits)

    def _hf(self, **inputs) -> torch.Tensor:
        """The model's own logits ``(T, V)``, run with eager attention (the arithmetic the rules follow; SDPA
        drops Gemma 2's attention soft-cap). The attention setting is restored after the call."""
        cfg = self.model.config
        impl = getattr(cfg, "_attn_implementation", None)
        try:
            if impl not in (None, "eager"):
                cfg._attn_implementation = "eager"
            with torch.no_grad():
                return self.model(**inputs).logits[0].to(self.dtype)
        finally:
            if impl not in (None, "eager"):
                cfg._attn_implementation = impl

    def _hf_logits(self, x0: torch.Tensor) -> torch.Tensor:
        return self._hf(inputs_embeds=x0.detach().to(self.dtype).unsqueeze(0))

    def _check(self, x0: torch.Tensor, dec: dict) -> None:
        """The reconstruction check run on every call: raise rather than return a wrong map."""
        with torch.no_grad():
            f = dec["logits"].detach()
            hf = self._hf_logits(x0)
            err_hf = ((f - hf).norm() / hf.norm()).item()
            y1 = self.linear_stream(dec, x0.detach())
            err_lin = ((y1 - f).norm() / f.norm()).item()
        if not (err_hf <= self.tolerance and err_lin <= self.tolerance):
            raise LinearScopeError(
                f"{self.family}: the interpreter differs from the model's own forward (relative error {err_hf:.1e} "
                f"against the HF logits, {err_lin:.1e} between the probe stream at x¹ = x⁰ and the real stream; "
                f"tolerance {self.tolerance:.0e}); its map would be wrong. A module or config field of this model "
                "is not what its family's rules assume (e.g. a patched module or an attention kernel with other "
                "arithmetic); SUPPORTED_FAMILIES lists what is exact")

    def decisions(self, x0: torch.Tensor) -> dict:
        """Run the real stream x⁰ ``(T, D)``; record every decision the probe stream will reuse.

        Returns a dict with ``logits`` ``(T, V)`` (differentiable in x⁰) and ``decisions``. Checks the real
        stream against the model's own forward (raises :class:`LinearScopeError` beyond ``tolerance``).
        """
        dec = self._record(x0)
        self._check(x0, dec)
        return dec

    def detached_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model with its decisions detached: logits ``(T, V)`` whose autograd Jacobian in x at x⁰ is A(x⁰)."""
        return self._record(x, detach=True)["logits"]

    def linear_stream(self, dec: dict, x1: torch.Tensor) -> torch.Tensor:
        """The probe stream: logits ``(..., T, V)`` of x¹ ``(..., T, D)`` under x⁰'s frozen decisions."""
        return self._stream(x1, _Rec(dec["decisions"]))

    # ------------------------------------------------------------------ products at one position
    def reconstruction(self, ids: torch.Tensor) -> dict:
        """How exactly the probe stream at x¹ = x⁰ reproduces the network.

        ``relative_error``: ‖y¹(x⁰) − f(x⁰)‖ / ‖f(x⁰)‖ with f the real stream in the computation dtype.
        ``hf_relative_error``: the real stream against the HF model's own forward from the token ids (which runs
        softmax, rotary tables and Gemma's norms in float32 even for a float64 model, so this one bottoms out
        near 1e-7 in float64).
        """
        with torch.no_grad():
            x0 = self.embed(ids)
            dec = self.decisions(x0)
            y1 = self.linear_stream(dec, x0)
            hf = self._hf(input_ids=ids.to(self.device).unsqueeze(0))
        f = dec["logits"]
        return dict(relative_error=((y1 - f).norm() / f.norm()).item(),
                    hf_relative_error=((f - hf).norm() / hf.norm()).item(),
                    dtype=str(self.dtype).removeprefix("torch."), tokens=int(len(ids)))

    def bias(self, dec: dict, x0: torch.Tensor) -> torch.Tensor:
        """b(x⁰): logits ``(T, V)`` of the probe stream at x¹ = 0."""
        return self.linear_stream(dec, torch.zeros_like(x0))

    def apply(self, dec: dict, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """A·v for probe inputs v ``(..., T, D)`` (batched over leading dims): ``y¹(v) − b``."""
        return self.linear_stream(dec, v) - bias

    def apply_transpose(self, dec: dict, x0: torch.Tensor, u: torch.Tensor, position: int = -1) -> torch.Tensor:
        """Aᵀ·u ``(T, D)`` for a covector u ``(V,)`` on the logits at ``position`` (one backward pass)."""
        x1 = torch.zeros_like(x0, requires_grad=True)
        with torch.enable_grad():
            y = self.linear_stream(dec, x1)[position]
            (g,) = torch.autograd.grad(y, x1, grad_outputs=u.to(y))
        return g

    def matrix(self, ids: torch.Tensor, position: int = -1, *, chunk_size: int = 64) -> torch.Tensor:
        """The full A ``(V, T·D)`` at ``position`` for a short input: basis vectors as a batch of probe inputs,
        ``chunk_size`` per forward (a per-column loop would run T·D forwards)."""
        x0 = self.embed(ids).detach()
        T, D = x0.shape
        with torch.no_grad():
            dec = self.decisions(x0)
            b = self.bias(dec, x0)[position]
            cols = []
            for start in range(0, T * D, chunk_size):
                idx = torch.arange(start, min(start + chunk_size, T * D), device=self.device)
                basis = torch.zeros(len(idx), T * D, dtype=self.dtype, device=self.device)
                basis[torch.arange(len(idx)), idx] = 1
                cols.append(self.linear_stream(dec, basis.view(-1, T, D))[:, position] - b)
        return torch.cat(cols).T

    def svd(self, ids: torch.Tensor, k: int = 4, position: int = -1):
        """Top-k singular triplets of A (logits at ``position`` ← all input embeddings) by Lanczos.

        Returns ``(U (V, k), S (k,), Vt (k, T, D))``, largest first. Uses ``scipy.sparse.linalg.svds`` on a
        ``LinearOperator`` whose products are one probe-stream forward (A·v) or backward (Aᵀ·u).
        """
        from scipy.sparse.linalg import LinearOperator, svds

        x0 = self.embed(ids).detach()
        with torch.no_grad():
            dec = self.decisions(x0)
            b = self.bias(dec, x0)[position]
        T, D = x0.shape
        n_out = b.shape[-1]

        def matvec(v):
            v = torch.as_tensor(np.asarray(v).reshape(T, D), dtype=self.dtype, device=self.device)
            with torch.no_grad():
                return (self.linear_stream(dec, v)[position] - b).cpu().numpy()

        def rmatvec(u):
            u = torch.as_tensor(np.asarray(u).reshape(-1), dtype=self.dtype, device=self.device)
            return self.apply_transpose(dec, x0, u, position).reshape(-1).cpu().numpy()

        op = LinearOperator((n_out, T * D), matvec=matvec, rmatvec=rmatvec,
                            dtype=np.float64 if self.dtype == torch.float64 else np.float32)
        U, S, Vt = svds(op, k=k, random_state=0)
        order = np.argsort(S)[::-1]
        return (torch.from_numpy(U[:, order].copy()), torch.from_numpy(S[order].copy()),
                torch.from_numpy(Vt[order].copy()).reshape(k, T, D))

    def token_contributions(self, ids: torch.Tensor, target_id: int, tokenizer=None, position: int = -1
                            ) -> TokenContributions:
        """Exact per-token split of one logit (LinearScope) beside gradient × input (a first-order guess)."""
        x0 = self.embed(ids).detach()
        with torch.no_grad():
            dec = self.decisions(x0)
            b = self.bias(dec, x0)[position, target_id].item()
        row = self.apply_transpose(dec, x0, torch.nn.functional.one_hot(
            torch.tensor(target_id), dec["logits"].shape[-1]).to(self.dtype), position)
        contrib = (row * x0).sum(-1)
        xg = x0.clone().requires_grad_(True)
        with torch.enable_grad():
            y = self._record(xg)["logits"][position, target_id]
            (g,) = torch.autograd.grad(y, xg)
        gxi = (g * x0).sum(-1)
        toks = [tokenizer.decode([int(t)]) for t in ids] if tokenizer else [str(int(t)) for t in ids]
        target = tokenizer.decode([target_id]) if tokenizer else str(target_id)
        return TokenContributions(tokens=toks, target=target, logit=float(dec["logits"][position, target_id]),
                                  bias=b, linearscope=contrib.tolist(), grad_x_input=gxi.tolist())
