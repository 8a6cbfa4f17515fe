"""LinearScope for decoder LMs: the exact input-dependent linear map from input embeddings to logits.

METHODS.md §4, transformer extension. Two streams run through the model: x⁰ (the real input embeddings)
and x¹ (a probe input). Every nonlinearity takes its decision from x⁰ and applies it to x¹:

- RMSNorm: x¹ ↦ w ⊙ x¹ · r(x⁰), with r(x⁰) = 1 / sqrt(mean(x⁰²) + ε) (the scale of x⁰);
- attention: the softmax pattern of x⁰ (queries and keys from x⁰, rotary, causal mask) mixes the values
  of x¹ (``P⁰ · W_V x¹``, plus the value bias where the model has one);
- gated MLP: ``W_down (act(W_gate x⁰) ⊙ W_up x¹)``.

So ``y¹ = A(x⁰) x¹ + b(x⁰)`` exactly, and ``y¹(x⁰) = f(x⁰)``: the real logits. ``b`` is ``y¹`` at ``x¹ = 0``
(only biases survive — zero for Llama/SmolLM2, the value/query biases for Qwen2). A token's contribution to a
logit is its block of A applied to its own embedding; the contributions and b add up to the logit exactly.

Supported: the Llama layout (Llama, SmolLM2, Qwen2, Mistral): ``model.embed_tokens``, ``model.layers[i]``
with ``input_layernorm``/``self_attn`` (q/k/v/o_proj)/``post_attention_layernorm``/``mlp``
(gate/up/down_proj), ``model.norm``, ``lm_head``. Single sequences without padding.

Example
-------
>>> scope = TransformerLinearScope(bridge, dtype=torch.float64)            # doctest: +SKIP
>>> ids = tok("def add(a, b):\\n    return a +", return_tensors="pt")["input_ids"][0]  # doctest: +SKIP
>>> rec = scope.reconstruction(ids)                                        # doctest: +SKIP
>>> rec["relative_error"] < 1e-12                                          # doctest: +SKIP
True
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .linearscope import LinearScopeError

__all__ = ["LinearScopeError", "TokenContributions", "TransformerLinearScope"]


def _unwrap(model) -> torch.nn.Module:
    from ..models import plain_model

    if hasattr(model, "hook_dict"):  # a TransformerBridge: use its plain twin, or its HF model
        return plain_model(model) or model.original_model
    return model


def _check_layout(m: torch.nn.Module) -> None:
    need = ["model.embed_tokens", "model.layers", "model.norm", "lm_head"]
    mods = dict(m.named_modules())
    for n in need:
        if n not in mods:
            raise LinearScopeError(f"{type(m).__name__}: no module {n!r}; TransformerLinearScope supports the Llama "
                                   "layout (Llama, SmolLM2, Qwen2, Mistral)")
    layer = m.model.layers[0]
    for n in ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]:
        if n not in dict(layer.named_modules()):
            raise LinearScopeError(f"{type(layer).__name__}: no submodule {n!r}; unsupported decoder block")
    act = type(layer.mlp.act_fn).__name__
    if act not in ("SiLU", "SiLUActivation", "GELUActivation", "GELUTanh", "PytorchGELUTanh", "NewGELUActivation"):
        raise LinearScopeError(f"mlp.act_fn is {act}: not a supported gate activation")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


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
    """Exact linear interpreter of a decoder LM at one input (see module docstring).

    Parameters
    ----------
    model : TransformerBridge from ``load_model`` or an HF causal LM with the Llama layout.
    dtype : computation dtype; float64 for exact reconstructions (a private copy is made when it differs).
    """

    def __init__(self, model, *, dtype: torch.dtype = torch.float64):
        m = _unwrap(model)
        _check_layout(m)
        p = next(m.parameters())
        if p.dtype != dtype:
            m = copy.deepcopy(m).to(dtype)
        self.model = m.eval()
        self.dtype = dtype
        self.device = next(m.parameters()).device
        self.cfg = m.config

    # ------------------------------------------------------------------ the two-stream forward
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings ``(T, D)`` of token ids ``(T,)``."""
        return self.model.model.embed_tokens(ids.to(self.device)).to(self.dtype)

    def decisions(self, x0: torch.Tensor) -> dict:
        """Run the real stream x⁰ ``(T, D)``; record every decision the probe stream will reuse."""
        m, cfg = self.model, self.cfg
        T = x0.shape[0]
        cos, sin = self._rotary(T)  # (1, T, hd)
        causal = torch.full((T, T), float("-inf"), dtype=self.dtype, device=self.device).triu(1)
        h = x0
        layers = []
        for layer in m.model.layers:
            att = layer.self_attn
            r1 = self._rms_scale(h, layer.input_layernorm)
            a = h * r1 * layer.input_layernorm.weight
            H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
            hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
            q = att.q_proj(a).view(T, H, hd).transpose(0, 1)
            k = att.k_proj(a).view(T, Hkv, hd).transpose(0, 1)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            k = k.repeat_interleave(H // Hkv, dim=0)
            pattern = torch.softmax(q @ k.transpose(-1, -2) * hd**-0.5 + causal, dim=-1)  # (H, T, T)
            v = att.v_proj(a).view(T, Hkv, hd).transpose(0, 1).repeat_interleave(H // Hkv, dim=0)
            h = h + att.o_proj((pattern @ v).transpose(0, 1).reshape(T, H * hd))
            r2 = self._rms_scale(h, layer.post_attention_layernorm)
            b = h * r2 * layer.post_attention_layernorm.weight
            gate = layer.mlp.act_fn(layer.mlp.gate_proj(b))
            h = h + layer.mlp.down_proj(gate * layer.mlp.up_proj(b))
            layers.append(dict(r1=r1, pattern=pattern, r2=r2, gate=gate))
        rf = self._rms_scale(h, m.model.norm)
        logits = m.lm_head(h * rf * m.model.norm.weight)
        return dict(layers=layers, rf=rf, logits=logits)

    def _rotary(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of the rotary embedding in the computation dtype (HF computes them in float32)."""
        rot = self.model.model.rotary_emb
        inv_freq = rot.inv_freq.to(self.dtype)
        freqs = torch.arange(T, device=self.device, dtype=self.dtype)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = getattr(rot, "attention_scaling", 1.0)
        return (emb.cos() * scale).unsqueeze(0), (emb.sin() * scale).unsqueeze(0)

    @staticmethod
    def _rms_scale(h: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
        return torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)

    def linear_stream(self, dec: dict, x1: torch.Tensor) -> torch.Tensor:
        """The probe stream: logits ``(..., T, V)`` of x¹ ``(..., T, D)`` under x⁰'s frozen decisions."""
        m, cfg = self.model, self.cfg
        H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
        h = x1
        lead, T = x1.shape[:-2], x1.shape[-2]
        for layer, d in zip(m.model.layers, dec["layers"]):
            att = layer.self_attn
            a = h * d["r1"] * layer.input_layernorm.weight
            v = att.v_proj(a).view(*lead, T, Hkv, hd).transpose(-2, -3).repeat_interleave(H // Hkv, dim=-3)
            z = (d["pattern"] @ v).transpose(-2, -3).reshape(*lead, T, H * hd)
            h = h + att.o_proj(z)
            b = h * d["r2"] * layer.post_attention_layernorm.weight
            h = h + layer.mlp.down_proj(d["gate"] * layer.mlp.up_proj(b))
        return m.lm_head(h * dec["rf"] * m.model.norm.weight)

    # ------------------------------------------------------------------ products at one position
    def reconstruction(self, ids: torch.Tensor) -> dict:
        """How exactly the probe stream at x¹ = x⁰ reproduces the network.

        ``relative_error``: ‖y¹(x⁰) − f(x⁰)‖ / ‖f(x⁰)‖ with f the real stream in the computation dtype.
        ``hf_relative_error``: the real stream against the HF model's own forward (which runs its norms,
        softmax and rotary tables in float32 even for a float64 model, so this one bottoms out near 1e-7
        in float64).
        """
        with torch.no_grad():
            x0 = self.embed(ids)
            dec = self.decisions(x0)
            y1 = self.linear_stream(dec, x0)
            hf = self.model(input_ids=ids.to(self.device).unsqueeze(0)).logits[0].to(self.dtype)
        f = dec["logits"]
        return dict(relative_error=((y1 - f).norm() / f.norm()).item(),
                    hf_relative_error=((f - hf).norm() / hf.norm()).item(), dtype=str(self.dtype).removeprefix("torch."),
                    tokens=int(len(ids)))

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
        import numpy as np
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
            y = self.decisions(xg)["logits"][position, target_id]
            (g,) = torch.autograd.grad(y, xg)
        gxi = (g * x0).sum(-1)
        toks = [tokenizer.decode([int(t)]) for t in ids] if tokenizer else [str(int(t)) for t in ids]
        target = tokenizer.decode([target_id]) if tokenizer else str(target_id)
        return TokenContributions(tokens=toks, target=target, logit=float(dec["logits"][position, target_id]),
                                  bias=b, linearscope=contrib.tolist(), grad_x_input=gxi.tolist())
