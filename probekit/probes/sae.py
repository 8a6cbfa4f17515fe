"""Sparse autoencoders: model, training with exact resume, the SAELens on-disk format, metrics, and splicing.

The SAE (METHODS.md §3)::

    f  = act((x - b_dec) @ W_enc + b_enc)      W_enc (d_in, d_sae), b_enc (d_sae,)
    x̂  = f @ W_dec + b_dec                     W_dec (d_sae, d_in), b_dec (d_in,)

with ``act`` = ReLU (trained with an L1 penalty) or TopK (keep the k largest pre-activations, then ReLU; trained
with the auxiliary dead-latent loss of Gao et al. 2024). Decoder rows are kept at unit norm.

SAEs read from disk may also be JumpReLU (Gemma Scope; SAELens BatchTopK checkpoints load as their JumpReLU export)
or gated, skip the ``b_dec`` input shift, normalise their inputs per token, or rescale TopK latents by decoder
row norms: :class:`SAE` states the exact rule of each, the one SAELens 6 applies (checked against folders written by
sae-lens 6.54 in ``tests/fixtures/saelens``).

Pinned metric definitions (METHODS.md §3; do not change them silently):

- FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ the mean over tokens (centred; SAELens issue #659 used zero instead);
- explained variance = 1 − FVU;
- L0 = mean number of active (non-zero) latents per token;
- dead fraction = fraction of latents never active on the evaluation set;
- CE-loss recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean), x̂ (or zeros) spliced in at the hook.

Example
-------
>>> import torch
>>> cfg = SAEConfig(d_in=8, d_sae=32, architecture="topk", k=2, batch_size=64, epochs=2, lr=3e-3)
>>> x = torch.randn(512, 8)
>>> sae = train_sae(cfg, x, progress=False)
>>> sae.encode(x[:3]).shape, int((sae.encode(x[:3]) != 0).sum(-1).max()) <= 2
(torch.Size([3, 32]), True)
>>> m = sae_metrics(sae, x)
>>> 0.0 <= m.fvu < 1.0
True
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

__all__ = [
    "SAEConfig",
    "SAE",
    "train_sae",
    "save_sae",
    "load_sae",
    "fvu",
    "explained_variance",
    "l0",
    "dead_fraction",
    "SAEMetrics",
    "sae_metrics",
    "CEResult",
    "ce_recovered",
    "ce_recovered_many",
    "splice",
    "lm_logits",
    "geometric_median",
]

_ARCHS = ("relu", "topk", "jumprelu", "gated")
_TRAINABLE_ARCHS = ("relu", "topk")
_NORMS = ("none", "constant_norm_rescale", "layer_norm")
_LN_EPS = 1e-5  # SAELens's layer_norm epsilon
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_B_DEC_INITS = ("geometric_median", "mean", "zeros")
CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"


# ============================================================================================== config


@dataclass
class SAEConfig:
    """Everything that defines an SAE and how it is trained; validated on construction.

    Parameters
    ----------
    d_in, d_sae : int
        Input width (the hook's last dim) and number of latents.
    architecture : {"relu", "topk", "jumprelu", "gated"}
        ReLU with an L1 penalty, or TopK (at most ``k`` active latents per token); both trainable. JumpReLU and
        gated SAEs are read from disk only (inference rules in :class:`SAE`).
    k : int
        Active latents per token for ``"topk"`` (1 ≤ k ≤ d_sae).
    l1_coefficient : float
        Weight of the L1 penalty Σ|f| for ``"relu"`` (decoder rows are unit norm, so no norm weighting).
    lr, lr_warmup_steps, lr_decay_fraction : float, int, float
        Adam learning rate; linear warm-up from 0 over the first ``lr_warmup_steps`` steps; linear decay to 0
        over the last ``lr_decay_fraction`` of all steps (0 disables the decay).
    batch_size : int
        Tokens per optimiser step (every step uses a full batch: an epoch's remainder is dropped).
    total_tokens, epochs : int or None
        Length of training: ``ceil(total_tokens / batch_size)`` steps, or ``epochs`` passes over the data.
        Give at most one; neither means ``epochs=1``.
    aux_k, aux_coefficient, dead_steps : int or None, float, int
        TopK auxiliary loss (Gao et al. 2024): the residual ``x − x̂`` is reconstructed from the top ``aux_k``
        pre-activations among *dead* latents (no activation in the last ``dead_steps`` steps), weighted by
        ``aux_coefficient``. ``aux_k=None`` means ``min(d_sae, max(1, d_in // 2))``.
    b_dec_init : {"geometric_median", "mean", "zeros"}
        How ``b_dec`` starts, from ``init_sample_size`` training rows.
    seed : int
        Seeds initialisation and batch order.
    device : str
        Where the SAE trains ("cpu", "cuda", "cuda:1", …).
    dtype : {"float32", "float64"}
        Parameter dtype.
    hook_name, model_name : str
        Where the SAE reads (written to ``cfg.json``).
    apply_b_dec_to_input : bool
        Subtract ``b_dec`` from the (normalised) input before encoding (SAELens's default); Gemma Scope SAEs do not.
    normalize_activations : {"none", "constant_norm_rescale", "layer_norm"}
        Per-token input normalisation, undone on the output (see :class:`SAE`). SAELens's
        "expected_average_only_in" is a constant factor: :func:`load_sae` folds it into the weights.
    rescale_acts_by_decoder_norm : bool
        TopK only: pre-activations are multiplied by the decoder row norms and latents divided by them before
        decoding (SAELens's TopK trainer default), so the decoder rows need not be unit norm.
    """

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int = 32
    l1_coefficient: float = 1e-3
    lr: float = 4e-4
    lr_warmup_steps: int = 0
    lr_decay_fraction: float = 0.2
    batch_size: int = 4096
    total_tokens: int | None = None
    epochs: int | None = None
    aux_k: int | None = None
    aux_coefficient: float = 1.0 / 32
    dead_steps: int = 1000
    b_dec_init: str = "geometric_median"
    init_sample_size: int = 4096
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    hook_name: str = ""
    model_name: str = ""
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    rescale_acts_by_decoder_norm: bool = False

    def __post_init__(self) -> None:
        def need(cond: bool, field: str, what: str) -> None:
            if not cond:
                raise ValueError(f"SAEConfig.{field} {what}, got {getattr(self, field)!r}")

        for f in ("d_in", "d_sae", "batch_size", "dead_steps", "init_sample_size"):
            need(isinstance(getattr(self, f), int) and getattr(self, f) >= 1, f, "must be an int >= 1")
        need(self.architecture in _ARCHS, "architecture", f"must be one of {list(_ARCHS)}")
        if self.architecture == "topk":
            need(isinstance(self.k, int) and 1 <= self.k <= self.d_sae, "k",
                 f"must be an int in [1, d_sae={self.d_sae}]")
        need(self.l1_coefficient >= 0, "l1_coefficient", "must be >= 0")
        need(self.lr > 0, "lr", "must be > 0")
        need(isinstance(self.lr_warmup_steps, int) and self.lr_warmup_steps >= 0, "lr_warmup_steps",
             "must be an int >= 0")
        need(0.0 <= self.lr_decay_fraction <= 1.0, "lr_decay_fraction", "must be in [0, 1]")
        if self.total_tokens is not None and self.epochs is not None:
            raise ValueError(f"SAEConfig: give total_tokens or epochs, not both (got "
                             f"total_tokens={self.total_tokens}, epochs={self.epochs})")
        if self.total_tokens is not None:
            need(isinstance(self.total_tokens, int) and self.total_tokens >= 1, "total_tokens", "must be an int >= 1")
        if self.epochs is not None:
            need(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", "must be an int >= 1")
        if self.aux_k is None:
            self.aux_k = min(self.d_sae, max(1, self.d_in // 2))
        need(isinstance(self.aux_k, int) and 1 <= self.aux_k <= self.d_sae, "aux_k",
             f"must be an int in [1, d_sae={self.d_sae}]")
        need(self.aux_coefficient >= 0, "aux_coefficient", "must be >= 0")
        need(self.b_dec_init in _B_DEC_INITS, "b_dec_init", f"must be one of {list(_B_DEC_INITS)}")
        need(self.dtype in _DTYPES, "dtype", f"must be one of {list(_DTYPES)}")
        need(isinstance(self.device, str) and re.fullmatch(r"cpu|mps|cuda(:\d+)?", self.device) is not None,
             "device", "must be 'cpu', 'mps', 'cuda' or 'cuda:N'")
        need(isinstance(self.seed, int), "seed", "must be an int")
        need(isinstance(self.apply_b_dec_to_input, bool), "apply_b_dec_to_input", "must be a bool")
        need(self.normalize_activations in _NORMS, "normalize_activations", f"must be one of {list(_NORMS)}")
        need(isinstance(self.rescale_acts_by_decoder_norm, bool), "rescale_acts_by_decoder_norm", "must be a bool")
        need(not self.rescale_acts_by_decoder_norm or self.architecture == "topk", "rescale_acts_by_decoder_norm",
             f"applies to architecture 'topk' only (this one is {self.architecture!r})")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SAEConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _count_nonfinite(t: torch.Tensor) -> int:
    """Number of NaN/inf entries of a float tensor. The sum is finite iff every entry is (unless it overflows, which
    the exact count then settles): one fast reduction in the common case, where ``isfinite`` is ~20× slower."""
    if not t.is_floating_point() or bool(torch.isfinite(t.sum())):
        return 0
    return int((~torch.isfinite(t)).sum())


def param_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """The parameters of an SAE of this config and their shapes, in ``sae_weights.safetensors`` key names."""
    d_in, d_sae = cfg.d_in, cfg.d_sae
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if cfg.architecture == "gated":
        shapes.update(b_gate=(d_sae,), r_mag=(d_sae,), b_mag=(d_sae,))
    else:
        shapes["b_enc"] = (d_sae,)
    if cfg.architecture == "jumprelu":
        shapes["threshold"] = (d_sae,)
    return shapes


# ============================================================================================== model


class SAE(torch.nn.Module):
    """A sparse autoencoder with one fixed inference rule per architecture (the SAELens 6 rules).

    With ``n(x)`` the input normalisation (below), ``s = n(x) − b_dec`` if ``apply_b_dec_to_input`` else ``n(x)``,
    ``h = s @ W_enc + b_enc`` and, when ``rescale_acts_by_decoder_norm`` (TopK only), ``h ← h ⊙ ‖W_dec,j‖``:

    - ``relu`` (SAELens "standard"): ``f = ReLU(h)``;
    - ``topk``: keep the k largest ``h`` per token, then ReLU;
    - ``jumprelu``: ``f = ReLU(h) ⊙ [h > threshold]`` (SAELens's BatchTopK folders load as this rule with their one
      learned ``topk_threshold``, as SAELens's own inference export does);
    - ``gated``: ``f = [s @ W_enc + b_gate > 0] ⊙ ReLU(s @ (W_enc ⊙ exp(r_mag)) + b_mag)`` (no ``b_enc``).

    Decoding: ``y = f @ W_dec + b_dec`` (with ``rescale_acts_by_decoder_norm``: ``(f / ‖W_dec,j‖) @ W_dec + b_dec``),
    then the normalisation undone: ``x̂ = n⁻¹(y)``. ``normalize_activations``:

    - ``"none"``: ``n(x) = x``;
    - ``"constant_norm_rescale"``: ``n(x) = x · c``, ``c = √d_in / ‖x‖`` per token; ``n⁻¹(y) = y / c``;
    - ``"layer_norm"``: ``n(x) = (x − μ) / (σ + 1e-5)`` with μ, σ the per-token mean and (unbiased, as in SAELens)
      standard deviation; ``n⁻¹(y) = y · σ + μ`` (note: σ, not σ + 1e-5, exactly as SAELens undoes it).

    Both per-token modes need the token's own ``x`` to decode: :meth:`decode` takes it as ``x=`` (SAELens keeps it in
    the module between ``encode`` and ``decode`` instead). Training (:func:`train_sae`) supports ``relu`` and ``topk``
    with unit-norm decoder rows; the other architectures and options are for SAEs read from disk.

    Parameters
    ----------
    cfg : SAEConfig
    init : bool
        Random (seeded) initialisation for training. ``False`` allocates nothing: the parameters live on the
        ``meta`` device until a loader assigns the real tensors.

    Attributes
    ----------
    W_enc : (d_in, d_sae) Parameter
    b_enc : (d_sae,) Parameter, except for ``gated``
    W_dec : (d_sae, d_in) Parameter (unit-norm rows for SAEs trained here)
    b_dec : (d_in,) Parameter
    threshold : (d_sae,) Parameter, ``jumprelu`` only
    b_gate, r_mag, b_mag : (d_sae,) Parameters, ``gated`` only
    """

    def __init__(self, cfg: SAEConfig, *, init: bool = True):
        super().__init__()
        self.cfg = cfg
        self._unverified: str | None = None  # weights read from this file, not yet checked for NaN/inf
        dt = cfg.torch_dtype
        names = param_shapes(cfg)
        if not init:  # shapes only: a loader assigns the tensors it read (no random decoder built first)
            for name, shape in names.items():
                setattr(self, name, torch.nn.Parameter(torch.empty(shape, dtype=dt, device="meta")))
            return
        g = torch.Generator().manual_seed(cfg.seed)
        w_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=g, dtype=torch.float64)
        w_dec = (w_dec / w_dec.norm(dim=1, keepdim=True)).to(dt)
        self.W_dec = torch.nn.Parameter(w_dec)
        self.W_enc = torch.nn.Parameter(w_dec.T.clone().contiguous())  # tied at init: encoder starts as decoderᵀ
        for name, shape in names.items():
            if name not in ("W_enc", "W_dec"):
                setattr(self, name, torch.nn.Parameter(torch.zeros(shape, dtype=dt)))

    # ---------------------------------------------------------------- weights read from disk
    def _verify(self) -> None:
        """Refuse NaN/inf weights read from disk, naming the file and tensor, before their first use.

        Checked on first use rather than in :func:`load_sae` so that loading stays a lazy read of the file (the
        check is one pass over the weights, the cost of paging them in).
        """
        if self._unverified is None:
            return
        for name, p in self.named_parameters():
            n_bad = _count_nonfinite(p.detach())
            if n_bad:
                raise ValueError(f"{self._unverified}: tensor {name!r} holds {n_bad} NaN/inf value(s) of {p.numel()}; "
                                 f"an SAE with them encodes to NaN. The file is damaged or its training diverged")
        self._unverified = None

    # ---------------------------------------------------------------- normalisation
    def _norm_stats(self, x: torch.Tensor):
        """Per-token statistics of the input normalisation (None for ``"none"``); ``x`` in the SAE's dtype."""
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            return (self.cfg.d_in ** 0.5) / x.norm(dim=-1, keepdim=True)
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            return mu, (x - mu).std(dim=-1, keepdim=True)
        return None

    def _norm_in(self, x: torch.Tensor, stats) -> torch.Tensor:
        if stats is None:
            return x
        if self.cfg.normalize_activations == "constant_norm_rescale":
            return x * stats
        mu, std = stats
        return (x - mu) / (std + _LN_EPS)

    def _norm_out(self, y: torch.Tensor, stats) -> torch.Tensor:
        if stats is None:
            return y
        if self.cfg.normalize_activations == "constant_norm_rescale":
            return y / stats
        mu, std = stats
        return y * std + mu

    # ---------------------------------------------------------------- forward pieces
    def _sae_in(self, x: torch.Tensor, stats) -> torch.Tensor:
        s = self._norm_in(x, stats)
        return s - self.b_dec if self.cfg.apply_b_dec_to_input else s

    def _dec_norm(self) -> torch.Tensor:
        return self.W_dec.norm(dim=-1)

    def _pre(self, s: torch.Tensor) -> torch.Tensor:
        if self.cfg.architecture == "gated":
            return s @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        h = s @ self.W_enc + self.b_enc
        return h * self._dec_norm() if self.cfg.rescale_acts_by_decoder_norm else h

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations ``h`` (for ``gated``, the magnitude path): ``(..., d_in)`` -> ``(..., d_sae)``.

        ``x`` is normalised first when ``normalize_activations`` asks for it.
        """
        self._verify()
        x = x.to(self.W_enc.dtype)
        return self._pre(self._sae_in(x, self._norm_stats(x)))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """The activation of ``relu`` / ``topk`` / ``jumprelu`` on pre-activations ``(..., d_sae)``.

        TopK keeps the k largest pre-activations, then ReLU (so at most k non-zero). ``gated`` needs the gate path
        too: use :meth:`encode`.
        """
        arch = self.cfg.architecture
        if arch == "relu":
            return F.relu(pre)
        if arch == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, idx, F.relu(vals))
        if arch == "jumprelu":
            return F.relu(pre) * (pre > self.threshold).to(pre.dtype)
        raise ValueError(f"SAE.activation: architecture {arch!r} has no single activation of h; use encode()")

    def _encode(self, x: torch.Tensor, stats) -> torch.Tensor:
        s = self._sae_in(x, stats)
        if self.cfg.architecture == "gated":
            gate = (s @ self.W_enc + self.b_gate > 0).to(s.dtype)
            return gate * F.relu(self._pre(s))
        return self.activation(self._pre(s))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents ``f``: ``(..., d_in)`` -> ``(..., d_sae)``, in the SAE's dtype."""
        self._verify()
        x = x.to(self.W_enc.dtype)
        return self._encode(x, self._norm_stats(x))

    def _decode(self, f: torch.Tensor, stats) -> torch.Tensor:
        if self.cfg.rescale_acts_by_decoder_norm:
            f = f * (1 / self._dec_norm())
        return self._norm_out(f @ self.W_dec + self.b_dec, stats)

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction ``x̂``: ``(..., d_sae)`` -> ``(..., d_in)``.

        ``x`` ``(..., d_in)``: the tokens ``f`` encodes; needed (only) to undo a per-token input normalisation
        (``normalize_activations`` "layer_norm" or "constant_norm_rescale").
        """
        self._verify()
        stats = None
        if self.cfg.normalize_activations != "none":
            if x is None:
                raise ValueError(f"this SAE has normalize_activations={self.cfg.normalize_activations!r}: decoding "
                                 f"undoes a per-token normalisation of the input, so pass the input as decode(f, x=x) "
                                 f"or call the SAE on x (forward)")
            stats = self._norm_stats(x.to(self.W_enc.dtype))
        return self._decode(f, stats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x̂`` for ``x`` of shape ``(..., d_in)``, returned in ``x``'s dtype (so it can be spliced back)."""
        self._verify()
        xs = x.to(self.W_enc.dtype)
        stats = self._norm_stats(xs)
        return self._decode(self._encode(xs, stats), stats).to(x.dtype)

    # ---------------------------------------------------------------- losses
    def _losses(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None):
        """``(losses, fired, n_active)`` for a training batch ``x`` ``(b, d_in)`` (``relu``/``topk``, no
        normalisation): the loss dict of :meth:`loss`, ``fired`` ``(d_sae,)`` bool (latents active on some token)
        and the number of active (token, latent) pairs, a 0-dim tensor.

        TopK decodes its k latents per token as a weighted sum of k decoder rows (``embedding_bag``) instead of a
        dense ``(b, d_sae) @ (d_sae, d_in)`` product: the same x̂ up to float rounding, and no dense matmul in the
        decoder's forward or backward. Biases enter through ``addmm``.
        """
        self._verify()
        x = x.to(self.W_enc.dtype)
        s = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
        pre = torch.addmm(self.b_enc, s, self.W_enc)
        out = {}
        if self.cfg.architecture == "relu":
            f = F.relu(pre)
            x_hat = torch.addmm(self.b_dec, f, self.W_dec)
            out["l1"] = f.abs().sum(-1).mean()
            active = f.detach() > 0
            fired, n_active = active.any(0), active.sum()
        else:
            vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            vals = F.relu(vals)
            x_hat = F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum") + self.b_dec
            on = vals.detach() > 0
            fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=x.device).index_fill_(0, idx[on], True)
            n_active = on.sum()
            out["aux"] = self._aux_loss(pre, (x - x_hat).detach(), dead_mask)
        out["mse"] = (x_hat - x).pow(2).sum(-1).mean()
        if self.cfg.architecture == "relu":
            out["total"] = out["mse"] + self.cfg.l1_coefficient * out["l1"]
        else:
            out["total"] = out["mse"] + self.cfg.aux_coefficient * out["aux"]
        return out, fired, n_active

    def _aux_loss(self, pre: torch.Tensor, err: torch.Tensor, dead_mask: torch.Tensor | None) -> torch.Tensor:
        """‖e − ê‖² (mean over tokens), ê decoded (no bias) from the top ``aux_k`` dead pre-activations.

        Zero when no latent is dead: the term exists only to give dead latents a gradient.
        """
        if dead_mask is None or not bool(dead_mask.any()):
            return pre.new_zeros(())
        k = min(self.cfg.aux_k, int(dead_mask.sum()))
        masked = pre.masked_fill(~dead_mask.to(pre.device), float("-inf"))
        vals, idx = masked.topk(k, dim=-1, sorted=False)  # k ≤ number of dead latents: every pick is finite
        e_hat = F.embedding_bag(idx, self.W_dec, per_sample_weights=F.relu(vals), mode="sum")
        return (e_hat - err).pow(2).sum(-1).mean()

    def loss(self, x: torch.Tensor, dead_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training losses for a batch ``x`` of shape ``(b, d_in)``.

        Returns ``{"mse", "l1", "total"}`` (ReLU) or ``{"mse", "aux", "total"}`` (TopK), scalars, where
        mse = mean over tokens of ‖x − x̂‖²; l1 = mean Σ|f|; aux as in :meth:`_aux_loss` given ``dead_mask``
        ``(d_sae,)`` bool; total = mse + l1_coefficient·l1 or mse + aux_coefficient·aux.
        """
        return self._losses(x, dead_mask)[0]

    # ---------------------------------------------------------------- decoder constraint
    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the component of each decoder row's gradient along the row (it would only change its norm)."""
        if self.W_dec.grad is not None:
            w = self.W_dec
            self.W_dec.grad -= (self.W_dec.grad * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


# ============================================================================================== init helper


@torch.no_grad()
def geometric_median(x: torch.Tensor, *, iters: int = 50, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's iteration for argmin_m Σ‖x_i − m‖: ``(n, d)`` -> ``(d,)`` (float64 inside)."""
    x = x.to(torch.float64)
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(1e-12)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() <= tol * (1 + m.norm()):
            return new
        m = new
    return m


# ============================================================================================== data sources


class _Source:
    """Minibatches ``(batch_size, d_in)`` for one epoch, in an order fixed by ``(seed, epoch)``; full batches only."""

    n: int

    def epoch(self, epoch: int, skip: int) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def sample(self, n: int, seed: int) -> torch.Tensor:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        raise NotImplementedError


def _nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of ``x`` ``(n, d)`` holding NaN/inf. Row sums first (a row's sum is finite iff its entries
    are, unless it overflows: such rows get the exact test), ~20× faster than ``isfinite`` over all of ``x``."""
    cand = (~torch.isfinite(x.sum(dim=1))).nonzero().flatten()
    if len(cand) == 0:
        return cand
    return cand[~torch.isfinite(x[cand]).all(dim=1)]


def _nonfinite_rows_error(rows, what: str) -> ValueError:
    rows = [int(r) for r in rows]
    shown = ", ".join(map(str, rows[:10])) + (", …" if len(rows) > 10 else "")
    return ValueError(f"{what} holds NaN or inf in {len(rows)} row(s) (row indices {shown}); an SAE trained on them "
                      f"ends with every weight NaN. Drop or repair those rows (e.g. pass rows=… without them)")


class _TensorSource(_Source):
    def __init__(self, x: torch.Tensor, batch_size: int, seed: int, index: torch.Tensor | None = None):
        """``index``: the row numbers of ``x`` in the tensor the caller passed (when ``rows=`` selected some)."""
        if x.ndim != 2:
            raise ValueError(f"a tensor source must be (n, d_in), got shape {tuple(x.shape)}")
        bad = _nonfinite_rows(x).cpu()
        if len(bad):
            raise _nonfinite_rows_error((bad if index is None else index[bad]).tolist(), "the training tensor")
        self.x, self.n, self.bs, self.seed = x, len(x), batch_size, seed

    def epoch(self, epoch, skip):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        for i in range(skip * self.bs, self.n - self.bs + 1, self.bs):
            yield self.x[perm[i : i + self.bs]]

    def sample(self, n, seed):
        idx = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))[:n]
        return self.x[idx]

    def fingerprint(self):
        return {"kind": "tensor", "n": self.n, "d": int(self.x.shape[1])}


class _CacheSource(_Source):
    """A DeviceCache hook; order from ``DeviceCache.batches(shuffle=True, seed=seed + epoch)`` (block-shuffled)."""

    def __init__(self, dc, hook: str, rows, batch_size: int, seed: int):
        shape = dc.run.shape(hook)
        if len(shape) != 2:
            raise ValueError(f"hook {hook!r} has row shape {shape[1:]}; an SAE needs flat (d_in,) rows")
        self.dc, self.hook, self.rows, self.bs, self.seed = dc, hook, rows, batch_size, seed
        self.sel = dc._rows(rows)
        self.n = len(self.sel)

    def epoch(self, epoch, skip):
        # DeviceCache seeds epoch e with seed + e, so one epoch started at seed + epoch is that epoch exactly
        it = self.dc.batches(self.hook, self.bs, shuffle=True, seed=self.seed + epoch, epochs=1, rows=self.rows,
                             drop_last=True, dtype=torch.float32)
        for i, b in enumerate(it):
            if i >= skip:
                x = b[self.hook]
                bad = _nonfinite_rows(x)
                if len(bad):  # checked per batch: the cache is not scanned ahead of training
                    raise _nonfinite_rows_error(b["rows"][bad.to(b["rows"].device)].tolist(),
                                                f"cache run {self.dc.run.run_id} hook {self.hook!r}")
                yield x

    def sample(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        pick = np.sort(self.sel[torch.randperm(self.n, generator=g)[:n].numpy()])
        x = self.dc.run.load(self.hook, pick).to(torch.float32)
        bad = _nonfinite_rows(x)
        if len(bad):
            raise _nonfinite_rows_error(pick[bad.numpy()].tolist(),
                                        f"cache run {self.dc.run.run_id} hook {self.hook!r}")
        return x

    def fingerprint(self):
        import hashlib

        rows = hashlib.sha256(np.ascontiguousarray(self.sel).tobytes()).hexdigest()[:16]
        return {"kind": "cache", "run_id": self.dc.run.run_id, "hook": self.hook, "n": self.n, "rows_sha": rows}


def _make_source(source, cfg: SAEConfig, hook: str | None, rows) -> _Source:
    if isinstance(source, torch.Tensor):
        index = None
        if rows is not None:
            index = torch.arange(len(source))[torch.as_tensor(rows) if not isinstance(rows, slice) else rows]
            source = source[rows]
        return _TensorSource(source, cfg.batch_size, cfg.seed, index)
    if hasattr(source, "batches") and hasattr(source, "run"):
        hook = hook or cfg.hook_name
        if not hook:
            raise ValueError("training from a DeviceCache needs a hook: pass hook=… or set SAEConfig.hook_name")
        return _CacheSource(source, hook, rows, cfg.batch_size, cfg.seed)
    raise TypeError(f"source must be a (n, d_in) tensor or a DeviceCache, got {type(source).__name__}")


# ============================================================================================== training


def _lr_factor(step: int, total: int, cfg: SAEConfig) -> float:
    """Multiplier of ``cfg.lr`` at 0-based ``step``: linear warm-up, flat, linear decay to 0 at ``total``."""
    f = 1.0
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        f = (step + 1) / cfg.lr_warmup_steps
    decay = int(cfg.lr_decay_fraction * total)
    if decay and step >= total - decay:
        f = min(f, (total - step) / decay)
    return f


def _total_steps(cfg: SAEConfig, n: int) -> tuple[int, int]:
    """``(total_steps, steps_per_epoch)``."""
    per_epoch = n // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(f"the training data has {n} rows, fewer than one batch (batch_size={cfg.batch_size})")
    if cfg.total_tokens is not None:
        return math.ceil(cfg.total_tokens / cfg.batch_size), per_epoch
    return (cfg.epochs or 1) * per_epoch, per_epoch


class _Stop(Exception):
    pass


def train_sae(cfg: SAEConfig, source, *, hook: str | None = None, rows=None,
              checkpoint_dir: str | Path | None = None, checkpoint_every: int = 1000, resume: bool = True,
              max_steps: int | None = None, callback: Callable[[int, dict], None] | None = None,
              progress: bool = True) -> SAE:
    """Train an SAE with Adam on a tensor or a :class:`~probekit.device_cache.DeviceCache` hook.

    Parameters
    ----------
    cfg : SAEConfig
    source : Tensor ``(n, d_in)`` or DeviceCache
        Training rows. A DeviceCache serves block-shuffled batches of ``hook`` (default ``cfg.hook_name``).
    hook : str, optional
        The DeviceCache hook.
    rows : index array / slice / bool mask, optional
        Restrict training to these rows (a train split, e.g. by document).
    checkpoint_dir : path, optional
        Write a checkpoint every ``checkpoint_every`` steps, at ``max_steps`` and at the end; with ``resume``, start
        from the newest one there (same config and data required). Resumed training is bitwise identical to an
        uninterrupted run.
    max_steps : int, optional
        Stop after this many (global) steps even if the schedule has more (the schedule still spans all steps).
    callback : callable, optional
        ``callback(step, stats)`` after each step (``step`` counts completed steps; stats: mse, aux/l1, l0, dead,
        lr as floats). Raising from it stops training (the exception propagates).
    progress : bool
        Show a tqdm bar with tokens/s, mse, L0 and dead fraction.

    Returns
    -------
    SAE
        In eval mode, on ``cfg.device``, with ``sae.train_state_`` (step, steps_since_fired, total_steps).
    """
    from tqdm.auto import tqdm

    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if cfg.architecture not in _TRAINABLE_ARCHS:
        raise ValueError(f"train_sae trains architectures {list(_TRAINABLE_ARCHS)}; SAEConfig.architecture is "
                         f"{cfg.architecture!r} (JumpReLU and gated SAEs are read with load_sae only)")
    if cfg.normalize_activations != "none" or cfg.rescale_acts_by_decoder_norm:
        raise ValueError("train_sae trains on the raw activations with unit-norm decoder rows: set "
                         "SAEConfig.normalize_activations='none' and rescale_acts_by_decoder_norm=False (got "
                         f"{cfg.normalize_activations!r}, {cfg.rescale_acts_by_decoder_norm!r})")
    src = _make_source(source, cfg, hook, rows)
    total, per_epoch = _total_steps(cfg, src.n)
    dev = torch.device(cfg.device)
    sae = SAE(cfg)
    with torch.no_grad():
        if cfg.b_dec_init != "zeros":
            s = src.sample(cfg.init_sample_size, cfg.seed).to(torch.float64)
            if s.shape[1] != cfg.d_in:
                raise ValueError(f"SAEConfig.d_in is {cfg.d_in} but the training rows have {s.shape[1]} features")
            sae.b_dec.copy_(geometric_median(s) if cfg.b_dec_init == "geometric_median" else s.mean(0))
    sae.to(dev)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.int64, device=dev)
    step = 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    meta = {"cfg": cfg.to_dict(), "source": src.fingerprint(), "total_steps": total}
    if ckpt is not None and resume:
        found = _load_checkpoint(ckpt, sae, opt, meta)
        if found is not None:
            step, since_fired = found[0], found[1].to(dev)
    stop_at = total if max_steps is None else min(total, max_steps)

    saved = step  # a resumed run has its starting point on disk already

    def save_now():
        nonlocal saved
        if ckpt is not None and step != saved:
            _save_checkpoint(ckpt, sae, opt, since_fired, step, meta)
            saved = step

    bar = tqdm(total=max(0, stop_at - step) * cfg.batch_size, unit="tok", unit_scale=True, disable=not progress,
               desc="train SAE")
    t0 = time.perf_counter()
    try:
        while step < stop_at:
            epoch, skip = divmod(step, per_epoch)
            for xb in src.epoch(epoch, skip):
                if step >= stop_at:
                    break
                xb = xb.to(dev, sae.W_enc.dtype, non_blocking=True)
                lr = cfg.lr * _lr_factor(step, total, cfg)
                for g in opt.param_groups:
                    g["lr"] = lr
                dead = since_fired >= cfg.dead_steps
                losses, fired, n_active = sae._losses(xb, dead if cfg.architecture == "topk" else None)
                opt.zero_grad(set_to_none=True)
                losses["total"].backward()
                sae.remove_parallel_grad()
                opt.step()
                sae.normalize_decoder()
                with torch.no_grad():
                    since_fired = torch.where(fired, 0, since_fired + 1)
                step += 1
                if callback is not None or (progress and step % 10 == 0) or step == stop_at:
                    stats = {k: float(v.detach()) for k, v in losses.items()}
                    stats.update(l0=float(n_active) / len(xb), dead=float(dead.float().mean()), lr=lr)
                    if progress:
                        rate = (bar.n + cfg.batch_size) / max(time.perf_counter() - t0, 1e-9)
                        bar.set_postfix_str(f"{rate:,.0f} tok/s mse={stats['mse']:.4g} L0={stats['l0']:.1f} "
                                            f"dead={stats['dead']:.1%}")
                    if callback is not None:
                        callback(step, stats)
                bar.update(cfg.batch_size)
                if ckpt is not None and step % checkpoint_every == 0:
                    save_now()
        _check_finite(sae, f"after {step} training steps (the loss diverged: lower SAEConfig.lr)")
        save_now()  # at max_steps / the end (no-op if that step is saved already)
    finally:
        bar.close()
    sae.train_state_ = {"step": step, "total_steps": total, "steps_since_fired": since_fired.cpu()}
    return sae.eval()


def _check_finite(sae: SAE, where: str) -> None:
    for name, p in sae.named_parameters():
        n_bad = _count_nonfinite(p.detach())
        if n_bad:
            raise ValueError(f"SAE parameter {name} holds {n_bad} NaN/inf value(s) {where}")


# ---------------------------------------------------------------------------------------------- checkpoints
#
# A checkpoint is a folder ``step_{step:010d}`` holding ``state.safetensors`` (SAE weights, Adam moments and step
# counters, steps-since-fired) and ``state.json`` (step, Adam param_groups, config and data fingerprint). It is
# written into a temp folder next to it and renamed into place (os.replace), so a reader sees a whole checkpoint
# or none. Older checkpoints are removed after the new one is in place. No pickle anywhere.

_CKPT_RE = re.compile(r"step_(\d{10})")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_checkpoint(root: Path, sae: SAE, opt: torch.optim.Optimizer, since_fired: torch.Tensor, step: int,
                     meta: dict, keep: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in sae.named_parameters()}
    params = [p for g in opt.param_groups for p in g["params"]]
    tensors = {f"sae.{n}": p.detach().cpu().contiguous() for n, p in sae.named_parameters()}
    tensors["steps_since_fired"] = since_fired.cpu().contiguous()
    sd = opt.state_dict()
    for i, p in enumerate(params):  # state_dict indexes params 0..n-1 in param_groups order
        for key, v in sd["state"].get(i, {}).items():
            tensors[f"optim.{names[id(p)]}.{key}"] = v.detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              for g in sd["param_groups"]]
    body = {"format": 1, "step": step, "param_order": [names[id(p)] for p in params], "param_groups": groups,
            **meta}
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-step-", dir=root))
    try:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(body, indent=1))
        for f in ("state.safetensors", "state.json"):
            _fsync(tmp / f)
        final = root / f"step_{step:010d}"
        if final.exists():  # same step written twice (e.g. stop then finish): replace the old one
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(p for p in root.iterdir() if _CKPT_RE.fullmatch(p.name))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(root: Path, sae: SAE, opt: torch.optim.Optimizer, meta: dict):
    """Restore the newest checkpoint in ``root`` into ``sae``/``opt``; return ``(step, steps_since_fired)`` or None."""
    if not root.is_dir():
        return None
    found = sorted(p for p in root.iterdir() if _CKPT_RE.fullmatch(p.name) and (p / "state.json").is_file())
    if not found:
        return None
    path = found[-1]
    body = json.loads((path / "state.json").read_text())
    if isinstance(body.get("cfg"), dict):  # fields added since the checkpoint was written take their defaults
        body["cfg"] = json.loads(json.dumps(SAEConfig.from_dict(body["cfg"]).to_dict()))
    for key in ("cfg", "source", "total_steps"):
        if body.get(key) != json.loads(json.dumps(meta[key])):
            raise ValueError(f"checkpoint {path} was written with a different {key} ({body.get(key)!r}) than this "
                             f"run ({meta[key]!r}); use another checkpoint_dir or resume=False")
    t = load_file(str(path / "state.safetensors"))
    with torch.no_grad():
        for n, p in sae.named_parameters():
            p.copy_(t[f"sae.{n}"])
    by_name = dict(sae.named_parameters())
    state = {}
    for i, n in enumerate(body["param_order"]):
        prefix = f"optim.{n}."
        s = {k[len(prefix):]: v.to(by_name[n].device) if k[len(prefix):] != "step" else v
             for k, v in t.items() if k.startswith(prefix)}
        if s:
            state[i] = s
    groups = [{**{k: (tuple(v) if k == "betas" else v) for k, v in g.items()}, "params": []}
              for g in body["param_groups"]]
    groups[0]["params"] = list(range(len(body["param_order"])))
    opt.load_state_dict({"state": state, "param_groups": groups})
    return int(body["step"]), t["steps_since_fired"]


# ============================================================================================== SAELens format
#
# SAELens 6 folders: ``cfg.json`` + ``sae_weights.safetensors``; probekit writes the same layout and reads every
# SAELens 6 inference architecture (standard, topk, jumprelu, gated), SAELens's BatchTopK training checkpoints, its
# trainer checkpoints (``activation_scaler.json``), pre-6 flat configs and Gemma Scope's ``params.npz``. A field
# value with no exact rule here is refused by name: never a silent, different computation.

SAELENS_FORMAT_VERSION = "6.54.0"  # the sae-lens release whose loader was checked against the folders written here
SCALER_FILENAME = "activation_scaler.json"
NPZ_FILENAME = "params.npz"
_SAVED_ARCH = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
_READ_ARCH = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated",
              "batchtopk": "batchtopk"}
_READ_DTYPES = {"float32": "float32", "float64": "float64", "float16": "float32", "bfloat16": "float32"}


def _hub_id(model_name: str) -> str:
    """The Hugging Face Hub id of a registry name (what SAELens and Neuronpedia expect); other names unchanged."""
    from ..models import REGISTRY

    spec = REGISTRY.get(model_name)
    return spec.hub_id if spec is not None and spec.hub_id else model_name


def save_sae(sae: SAE, folder: str | Path) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` in the SAELens 6 layout (read by SAELens's current loader).

    Weights: ``W_enc`` (d_in, d_sae), ``W_dec`` (d_sae, d_in), ``b_dec`` (d_in,), and ``b_enc`` (d_sae,) or, for
    gated SAEs, ``b_gate``/``r_mag``/``b_mag``; ``threshold`` (d_sae,) for JumpReLU. ``cfg.json`` carries the
    SAELens 6 fields (``d_in``, ``d_sae``, ``dtype``, ``device``, ``apply_b_dec_to_input``, ``normalize_activations``,
    ``reshape_activations``, ``architecture`` = "standard" | "topk" | "jumprelu" | "gated", ``k`` and
    ``rescale_acts_by_decoder_norm`` for TopK), ``metadata`` with ``sae_lens_version`` (so SAELens does not take its
    pre-6 path), ``model_name`` as the Hub id (``HuggingFaceTB/SmolLM2-135M-Instruct`` for ``smollm2-135m``) and
    ``hook_name``; flat ``model_name``/``hook_name`` for older readers; probekit's own config under ``probekit``
    (which keeps the registry name). Both files are written to temp names and renamed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = sae.cfg
    hub = _hub_id(c.model_name)
    cfg = {
        "d_in": c.d_in, "d_sae": c.d_sae, "dtype": c.dtype, "device": c.device,
        "apply_b_dec_to_input": c.apply_b_dec_to_input, "normalize_activations": c.normalize_activations,
        "reshape_activations": "none", "architecture": _SAVED_ARCH[c.architecture],
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, "model_name": hub, "hook_name": c.hook_name},
        "model_name": hub, "hook_name": c.hook_name,
        "probekit": c.to_dict(),
    }
    if c.architecture == "topk":
        cfg.update(k=c.k, rescale_acts_by_decoder_norm=c.rescale_acts_by_decoder_norm)
    tensors = {k: getattr(sae, k).detach().cpu().contiguous() for k in param_shapes(c)}
    for name, write in ((WEIGHTS_FILENAME, lambda p: save_file(tensors, str(p))),
                        (CFG_FILENAME, lambda p: p.write_text(json.dumps(cfg, indent=2)))):
        tmp = folder / f".{name}.tmp"
        write(tmp)
        os.replace(tmp, folder / name)
    return folder


def _pick_device(requested: str | None, saved: str | None) -> str:
    """``requested`` if given; else the saved device when this machine has it; else CPU (with a warning)."""
    if requested:
        return requested
    saved = saved or "cpu"
    try:
        d = torch.device(saved)
    except (RuntimeError, TypeError):
        d = torch.device("cpu")
    ok = (d.type == "cpu" or (d.type == "cuda" and torch.cuda.is_available()
                              and (d.index or 0) < torch.cuda.device_count())
          or (d.type == "mps" and torch.backends.mps.is_available()))
    if not ok:
        import warnings

        warnings.warn(f"the SAE was saved on device {saved!r}, which this machine lacks; loading it on 'cpu' "
                      f"(pass device=… to choose)", stacklevel=3)
        return "cpu"
    return str(d)


def _read_cfg(cfg_path: Path) -> dict:
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}); an SAE folder's {CFG_FILENAME} is a JSON object "
                         f"(rewrite it, or save the SAE again)") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path} holds a JSON {type(raw).__name__}, not an object of SAE fields")
    return raw


def _refuse(cfg_path: Path, field: str, value, what: str) -> ValueError:
    return ValueError(f"{cfg_path}: {field}={value!r} is not supported: {what}")


def _npz_tensors(path: Path) -> dict[str, torch.Tensor]:
    with np.load(path, allow_pickle=False) as data:  # never unpickle
        return {("W_" + k[2:] if k.startswith("w_") else k): torch.from_numpy(np.array(data[k])) for k in data.files}


def _gemma_scope(npz: Path, hook_name: str | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Gemma Scope ``params.npz``: JumpReLU, input not shifted by ``b_dec``, no normalisation (as SAELens reads it)."""
    t = _npz_tensors(npz)
    for key in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        if key not in t:
            raise KeyError(f"{npz} has no array {key!r} (found {sorted(t)}); Gemma Scope's params.npz holds W_enc, "
                           f"W_dec, b_enc, b_dec and threshold")
    sf = t.pop("scaling_factor", None)
    if sf is not None and not torch.all(sf == 1):
        raise ValueError(f"{npz}: array 'scaling_factor' is not all ones; that fine-tuning scale has no rule here")
    d_in, d_sae = t["W_enc"].shape
    raw = {"d_in": d_in, "d_sae": d_sae, "architecture": "jumprelu", "apply_b_dec_to_input": False,
           "normalize_activations": "none", "dtype": "float32", "hook_name": hook_name or ""}
    return raw, t


def load_sae(folder: str | Path, *, expected_d_in: int | None = None, hook_name: str | None = None,
             device: str | None = None, norm_scaling_factor: float | None = None) -> SAE:
    """Read an SAE saved by :func:`save_sae`, by SAELens (any 6.x inference architecture, BatchTopK and trainer
    checkpoints, pre-6 configs), or Gemma Scope's ``params.npz``.

    Parameters
    ----------
    folder : path
        A folder with ``cfg.json`` and ``sae_weights.safetensors``; or a folder with ``params.npz`` (Gemma Scope)
        or that file itself.
    expected_d_in : int, optional
        The width of the hook this SAE will read; a different ``d_in`` raises ``ValueError`` naming both.
    hook_name : str, optional
        Named in that error message, and recorded in the config when the folder has none.
    device : str, optional
        Where to put the SAE. Default: the saved device when this machine has it, else CPU.
    norm_scaling_factor : float, optional
        For ``normalize_activations: "expected_average_only_in"`` folders without ``activation_scaler.json``: the
        constant the SAE's inputs were multiplied by in training (SAELens keeps it in its pretrained-SAE table).

    Returns
    -------
    SAE
        In eval mode. Its fixed inference rule is the one SAELens applies to the same folder (see :class:`SAE`), with
        these conversions, each exact up to float rounding:

        - ``"expected_average_only_in"``: the training-time input scale ``s`` (from ``activation_scaler.json``, as
          SAELens's trainer writes it in checkpoints, or ``norm_scaling_factor``) is folded into the weights,
          ``W_enc ← s·W_enc, W_dec ← W_dec/s, b_dec ← b_dec/s``, as SAELens's trainer does at the end of a run; the
          result has ``normalize_activations="none"``. Without ``s`` the folder is refused (SAELens itself would
          silently ignore the field).
        - ``"batchtopk"`` (a SAELens BatchTopK training checkpoint): JumpReLU with every threshold equal to the
          learned ``topk_threshold``, the decoder row norms folded into the encoder when
          ``rescale_acts_by_decoder_norm`` — SAELens's own inference export.
        - ``log_threshold`` (older JumpReLU checkpoints): ``threshold = exp(log_threshold)``.
        - float16 / bfloat16 weights are upcast to float32 (exactly), and computed in float32.

    Refused, with the field and value named: other architectures, ``normalize_activations`` "covariance_whitening"
    or unknown values, ``reshape_activations`` other than "none", ``finetuning_scaling_factor``, unknown weight
    tensors, and a ``cfg.json`` that is not JSON. Weights holding NaN/inf are refused (file and tensor named) by the
    SAE's first ``encode``/``decode``/``forward``, so that loading itself stays a lazy read of the file.

    Accepted key spellings: hook name from ``hook_name``, ``metadata.hook_name``/``meta.hook_name`` or the old
    ``hook_point``; architecture from ``architecture`` or ``activation_fn_str``/``activation_fn``; k from ``k`` or
    ``activation_fn_kwargs.k``. The model name is read back from ``probekit.model_name`` when present (the registry
    name), else ``metadata.model_name``. The loader builds no random weights: the module is created on the ``meta``
    device and the tensors read from disk are assigned to it.
    """
    path = Path(folder)
    npz = path if path.name == NPZ_FILENAME and path.is_file() else path / NPZ_FILENAME
    if npz.is_file() and not (path / CFG_FILENAME).is_file():
        raw, t = _gemma_scope(npz, hook_name)
        cfg_path = w_path = npz
        folder = npz.parent
    else:
        folder = path
        cfg_path, w_path = folder / CFG_FILENAME, folder / WEIGHTS_FILENAME
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p} is missing; an SAE folder holds {CFG_FILENAME} and {WEIGHTS_FILENAME} "
                                        f"(or Gemma Scope's {NPZ_FILENAME})")
        raw = _read_cfg(cfg_path)
        t = None
    for key in ("d_in", "d_sae"):
        if key not in raw:
            raise KeyError(f"{cfg_path} has no {key!r} field")
    meta = raw.get("metadata") or raw.get("meta") or {}
    hook = raw.get("hook_name") or meta.get("hook_name") or raw.get("hook_point") or hook_name or ""
    if expected_d_in is not None and int(raw["d_in"]) != int(expected_d_in):
        where = f"hook {hook_name!r}" if hook_name else "the hook"
        raise ValueError(f"SAE folder {folder} has d_in={raw['d_in']} (trained on {hook or 'an unnamed hook'}), "
                         f"but {where} has d_in={expected_d_in}")

    # ---- architecture and options: every field that changes the computation is honoured or refused
    fn = raw.get("activation_fn_str", raw.get("activation_fn"))
    kwargs = raw.get("activation_fn_kwargs") or {}
    arch_field = "architecture" if "architecture" in raw else "activation_fn_str"
    arch = raw.get("architecture") or fn or "standard"
    if arch in ("standard", "relu") and fn is not None and fn != "relu":
        if fn != "topk":
            raise _refuse(cfg_path, "activation_fn_str", fn, "a standard SAE's activation must be 'relu' (or 'topk')")
        arch = "topk"  # SAELens ≤ 5 wrote architecture "standard" with a topk activation_fn_str
    if arch not in _READ_ARCH:
        raise _refuse(cfg_path, arch_field, arch, f"architectures read here are {sorted(set(_READ_ARCH) - {'relu'})}")
    arch = _READ_ARCH[arch]
    norm = raw.get("normalize_activations")
    if isinstance(norm, bool) or norm is None:  # SAELens ≤ 5 wrote a bool
        norm = "expected_average_only_in" if norm else "none"
    if norm not in _NORMS + ("expected_average_only_in",):
        raise _refuse(cfg_path, "normalize_activations", norm, "modes read here are "
                      f"{list(_NORMS + ('expected_average_only_in',))}")
    reshape = raw.get("reshape_activations") or "none"
    if reshape != "none":
        raise _refuse(cfg_path, "reshape_activations", reshape, "only 'none'; flatten (n_heads, d_head) activations "
                      "yourself and use a d_in = n_heads·d_head SAE")
    if raw.get("finetuning_scaling_factor"):
        raise _refuse(cfg_path, "finetuning_scaling_factor", raw["finetuning_scaling_factor"], "no rule for it here")
    apply_b = raw.get("apply_b_dec_to_input", True)
    if not isinstance(apply_b, bool):
        raise _refuse(cfg_path, "apply_b_dec_to_input", apply_b, "must be true or false")
    # SAELens's TopK inference config defaults to no rescaling, its (Batch)TopK training configs to rescaling
    rescale = raw.get("rescale_acts_by_decoder_norm", arch == "batchtopk") if arch in ("topk", "batchtopk") else False
    if not isinstance(rescale, bool):
        raise _refuse(cfg_path, "rescale_acts_by_decoder_norm", rescale, "must be true or false")
    dtype = str(raw.get("dtype") or "float32").removeprefix("torch.")
    if dtype not in _READ_DTYPES:
        raise _refuse(cfg_path, "dtype", raw.get("dtype"), f"dtypes read here are {sorted(_READ_DTYPES)}")

    scale = None
    if norm_scaling_factor is not None and norm != "expected_average_only_in":
        raise ValueError(f"load_sae(norm_scaling_factor={norm_scaling_factor!r}) applies to "
                         f"normalize_activations='expected_average_only_in' only; {cfg_path} has {norm!r}")
    if norm == "expected_average_only_in":
        scale = norm_scaling_factor
        scaler = folder / SCALER_FILENAME
        if scale is None and scaler.is_file():
            scale = _read_cfg(scaler).get("scaling_factor")
        if scale is None:
            raise ValueError(f"{cfg_path}: normalize_activations='expected_average_only_in' means the SAE was trained "
                             f"on inputs times a constant, but the folder has no {SCALER_FILENAME} with its "
                             f"scaling_factor; pass load_sae(…, norm_scaling_factor=…) (SAELens's pretrained table "
                             f"lists it) or fold it into the weights first")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"{cfg_path}: the activation scaling factor must be a finite number > 0, got {scale!r}")
        norm = "none"

    extra = raw.get("probekit") or {}
    cfg_kw = {**extra, "d_in": int(raw["d_in"]), "d_sae": int(raw["d_sae"]),
              "architecture": "jumprelu" if arch == "batchtopk" else arch,
              "hook_name": hook, "model_name": extra.get("model_name") or raw.get("model_name")
              or meta.get("model_name") or "",
              "device": _pick_device(device, raw.get("device")), "dtype": _READ_DTYPES[dtype],
              "apply_b_dec_to_input": apply_b, "normalize_activations": norm,
              "rescale_acts_by_decoder_norm": rescale and arch == "topk"}
    if arch == "topk":
        k = raw.get("k", kwargs.get("k"))
        if k is None:
            raise KeyError(f"{cfg_path}: a topk SAE needs 'k' (or activation_fn_kwargs.k)")
        cfg_kw["k"] = int(k)
    cfg = SAEConfig.from_dict(cfg_kw)

    # ---- tensors
    if t is None:
        t = load_file(str(w_path), device="cpu")  # CPU first: a folder saved on a GPU loads anywhere
    if arch == "jumprelu" and "log_threshold" in t and "threshold" not in t:
        t["threshold"] = t.pop("log_threshold").exp()
    if arch == "batchtopk":
        if "topk_threshold" not in t:
            raise KeyError(f"{w_path} has no tensor 'topk_threshold' (found {sorted(t)}); a batchtopk checkpoint "
                           f"carries its learned threshold")
        t["threshold"] = t.pop("topk_threshold").to(torch.float64).expand(cfg.d_sae).clone()
    expect = param_shapes(cfg)
    unknown = sorted(set(t) - set(expect))
    if unknown:
        raise ValueError(f"{w_path}: tensor(s) {unknown} have no rule for architecture {arch!r} (expected "
                         f"{sorted(expect)}); refusing rather than ignoring them")
    for key, shape in expect.items():
        if key not in t:
            raise KeyError(f"{w_path} has no tensor {key!r} (found {sorted(t)})")
        if tuple(t[key].shape) != shape:
            raise ValueError(f"{w_path}: {key} has shape {tuple(t[key].shape)}, expected {shape} "
                             f"from {cfg_path.name}")
    dt = cfg.torch_dtype
    t = {k: v.to(dt) for k, v in t.items()}
    with torch.no_grad():
        if arch == "batchtopk" and rescale:  # SAELens's export: fold the decoder row norms into the encoder
            n = t["W_dec"].norm(dim=-1).clamp(min=1e-8)
            t["b_enc"] = t["b_enc"] * n
            t["W_dec"] = t["W_dec"] / n[:, None]
            t["W_enc"] = t["W_enc"] * n[None, :]
        if scale is not None:  # SAELens's fold_activation_norm_scaling_factor
            t["W_enc"] = t["W_enc"] * scale
            t["W_dec"] = t["W_dec"] / scale
            t["b_dec"] = t["b_dec"] / scale
    sae = SAE(cfg, init=False)
    for key in expect:
        setattr(sae, key, torch.nn.Parameter(t[key].contiguous(), requires_grad=True))
    sae._unverified = str(w_path)  # NaN/inf refused, naming file and tensor, on first use (SAE._verify)
    return sae.to(cfg.device).eval()


# ============================================================================================== metrics


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(torch.float64)


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained, centred: FVU = Σ_i ‖x_i − x̂_i‖² / Σ_i ‖x_i − x̄‖².

    x̄ is the mean of ``x`` over tokens (all leading dims). ``x``, ``x_hat``: ``(..., d)``. Float64 inside.
    """
    x, x_hat = _flat(x), _flat(x_hat)
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Explained variance = 1 − FVU (centred; see :func:`fvu`)."""
    return 1.0 - fvu(x, x_hat)


def l0(f: torch.Tensor) -> float:
    """L0 = mean over tokens of the number of non-zero latents; ``f``: ``(..., d_sae)``."""
    return float((f != 0).sum(-1).to(torch.float64).mean())


def _iter_x(batches, hook: str | None, chunk: int = 4096) -> Iterator[torch.Tensor]:
    """Activations ``(b, d_in)`` from a tensor ``(n, d_in)`` (chunked), or an iterable of tensors / batch dicts."""
    if isinstance(batches, torch.Tensor):
        flat = batches.reshape(-1, batches.shape[-1])
        for i in range(0, len(flat), chunk):
            yield flat[i : i + chunk]
        return
    for b in batches:
        if isinstance(b, Mapping):
            if hook is None:
                keys = [k for k in b if k != "rows"]
                if len(keys) != 1:
                    raise ValueError(f"batch dicts with several hooks {keys}: pass hook=…")
                hook = keys[0]
            b = b[hook]
        yield b.reshape(-1, b.shape[-1])


@torch.no_grad()
def dead_fraction(sae: SAE, batches, *, hook: str | None = None) -> float:
    """Dead fraction = (number of latents with f_j = 0 on every token of ``batches``) / d_sae."""
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=sae.W_enc.device)
    for x in _iter_x(batches, hook):
        fired |= (sae.encode(x.to(sae.W_enc.device)) != 0).any(0)
    return float(1.0 - fired.double().mean())


@dataclass
class SAEMetrics:
    """Reconstruction metrics of one SAE on one evaluation set (definitions in the module docstring)."""

    fvu: float
    explained_variance: float
    l0: float
    dead_fraction: float
    mse: float  # mean over tokens of ‖x − x̂‖²
    n_tokens: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def _repr_html_(self) -> str:
        from ..html_page import html_table

        return html_table([self.to_dict()], caption="SAE metrics (FVU centred; L0 = mean active latents)")


@torch.no_grad()
def sae_metrics(sae: SAE, batches, *, hook: str | None = None) -> SAEMetrics:
    """FVU, explained variance, L0, dead fraction and MSE in one streaming pass over ``batches``.

    ``batches``: a tensor ``(n, d_in)``, an iterable of ``(b, d_in)`` tensors, or DeviceCache batch dicts.

    One pass, float64 accumulators: Σ‖x − x̂‖², and for the centred denominator the shifted sums
    S1 = Σ(x − c), S2 = Σ‖x − c‖² with c the first batch's mean, so Σ‖x − x̄‖² = S2 − ‖S1‖²/n (the shift keeps the
    subtraction well conditioned when ‖x̄‖ is large compared with the spread).
    """
    dev = sae.W_enc.device
    err = 0.0
    n = 0
    active = 0.0
    s1 = s2 = shift = None
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=dev)
    for x in _iter_x(batches, hook):
        x = x.to(dev)
        f = sae.encode(x)
        x_hat = sae.decode(f, x=x)  # x undoes a per-token input normalisation, if any
        xd = x.to(torch.float64)
        if shift is None:
            shift = xd.mean(0)
            s1 = torch.zeros_like(shift)
            s2 = torch.zeros((), dtype=torch.float64, device=dev)
        err += float((xd - x_hat.to(torch.float64)).pow(2).sum())
        c = xd - shift
        s1 += c.sum(0)
        s2 += c.pow(2).sum()
        n += len(x)
        active += float((f != 0).sum())
        fired |= (f != 0).any(0)
    if n == 0:
        raise ValueError("sae_metrics got no tokens")
    denom = float(s2 - s1.pow(2).sum() / n)
    f_ = err / denom
    return SAEMetrics(fvu=f_, explained_variance=1.0 - f_, l0=active / n,
                      dead_fraction=float(1.0 - fired.double().mean()), mse=err / n, n_tokens=n)


# ============================================================================================== CE recovered

# Splicing and LM logits live in probekit.interventions (re-exported here for existing imports); the CE metric
# below calls them through this module's names.
from ..interventions import lm_logits, splice  # noqa: E402


@dataclass
class CEResult:
    """Next-token cross-entropy with and without splicing, averaged over real (non-padding) target tokens.

    ce_recovered = (ce_zero − ce_sae) / (ce_zero − ce_clean); kl_* = mean over tokens of
    KL(p_clean ‖ p_spliced) = Σ_v p_clean(v) (log p_clean(v) − log p_spliced(v)), in nats.

    ``per_document`` (from :func:`ce_recovered_many`): per input sequence, in input order, the float64 *sums*
    over its target tokens — ``nll_clean``, ``nll_zero``, ``nll_sae`` (negative log-likelihoods), ``kl_sae``,
    ``kl_zero`` — and ``n_tokens`` (its target-token count), each an array (n_sequences,). The pooled means above
    are their column sums over ``Σ n_tokens``; a sequence is the unit a CI resamples (METHODS.md §5).
    """

    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_recovered: float
    kl_sae: float
    kl_zero: float
    n_tokens: int
    per_document: dict[str, np.ndarray] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Scalars, plus ``per_document`` as lists when present (JSON-safe)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "per_document"}
        if self.per_document is not None:
            d["per_document"] = {k: np.asarray(v).tolist() for k, v in self.per_document.items()}
        return d


def _token_batches(token_batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(token_batches, torch.Tensor):
        token_batches = [token_batches]
    for b in token_batches:
        if isinstance(b, Mapping):
            ids, mask = b["input_ids"], b.get("attention_mask")
        elif isinstance(b, (tuple, list)):
            ids, mask = b[0], (b[1] if len(b) > 1 else None)
        else:
            ids, mask = b, None
        ids = torch.as_tensor(ids)
        if ids.ndim == 1:
            ids = ids[None]
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
        yield ids, mask


@torch.no_grad()
def ce_recovered(model: torch.nn.Module, token_batches, hook_name: str,
                 sae: Callable[[torch.Tensor], torch.Tensor], *, prefer_plain: bool = True) -> CEResult:
    """CE-loss recovered and KL when ``sae(act)`` (and zeros) replace the activation at ``hook_name``.

    Parameters
    ----------
    model : TransformerBridge from ``load_model``, or an HF causal LM
    token_batches : iterable of ``(input_ids, attention_mask)`` pairs / ``{"input_ids", "attention_mask"}`` dicts /
        ``input_ids`` tensors ``(batch, pos)`` (right padding; mask 1 on real tokens). Read once, so a generator
        will do.
    hook_name : where to splice.
    sae : an :class:`SAE` or any ``(..., d) -> (..., d)`` callable (e.g. x̂ + linear error).

    Returns
    -------
    CEResult
        CE = mean over positions t with tokens t and t+1 both real of −log p(token_{t+1} | ≤ t).

    See Also
    --------
    ce_recovered_many : several replacements against one clean and one zero-ablated forward per batch.
    """
    return ce_recovered_many(model, token_batches, hook_name, {"sae": sae}, prefer_plain=prefer_plain)["sae"]


@torch.no_grad()
def ce_recovered_many(model: torch.nn.Module, token_batches, hook_name: str,
                      replacements: Mapping[str, Callable[[torch.Tensor], torch.Tensor]], *,
                      prefer_plain: bool = True) -> dict[str, CEResult]:
    """:func:`ce_recovered` for several replacements, sharing the clean and the zero-ablated forwards.

    Per batch the model runs once clean, once with zeros spliced in, and once per replacement (``2 + R`` forwards
    instead of ``3 R`` for ``R`` separate :func:`ce_recovered` calls). Each result is what :func:`ce_recovered`
    returns for that replacement alone: ``ce_recovered = (ce_zero − ce_sae) / (ce_zero − ce_clean)`` with
    ``ce_sae`` the CE under that replacement, ``kl_sae`` = KL(p_clean ‖ p_replaced).

    Parameters
    ----------
    model : TransformerBridge from ``load_model``, or an HF causal LM
    token_batches : as for :func:`ce_recovered`. Iterated exactly once (every pass of a batch runs before the
        next batch is read), so a generator will do.
    hook_name : where to splice.
    replacements : mapping name -> ``(..., d) -> (..., d)`` callable (an :class:`SAE`, x̂ + linear error, …);
        at least one.

    Returns
    -------
    dict str -> CEResult
        One result per name, in ``replacements``' order; ``ce_clean``, ``ce_zero``, ``kl_zero`` and ``n_tokens``
        are the same in all of them. ``per_document`` holds each input sequence's sums (no extra forwards).
    """
    names = list(replacements)
    if not names:
        raise ValueError("ce_recovered_many needs at least one replacement")
    param = next(model.parameters())
    # per-sequence sums (float64), one list entry per batch; the pooled numbers are their totals
    shared: dict[str, list[np.ndarray]] = {k: [] for k in ("nll_clean", "nll_zero", "kl_zero", "n_tokens")}
    ce: dict[str, list[np.ndarray]] = {k: [] for k in names}
    kl: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for ids, mask in _token_batches(token_batches):
        ids, mask = ids.to(param.device), mask.to(param.device)
        valid = (mask[:, :-1] * mask[:, 1:]).bool()
        target = ids[:, 1:][valid]
        seq = valid.nonzero()[:, 0]  # the sequence of each target token (row-major, as valid selects them)

        def per_seq(v: torch.Tensor) -> np.ndarray:
            out = torch.zeros(ids.shape[0], dtype=torch.float64, device=v.device)
            return out.index_add_(0, seq, v.double()).cpu().numpy()

        def logp(fn):
            with splice(model, hook_name, fn, prefer_plain=prefer_plain) as r:
                return F.log_softmax(lm_logits(r, ids, mask)[:, :-1][valid].double(), dim=-1)

        def nll(lp):
            return per_seq(-lp.gather(1, target[:, None])[:, 0])

        # clean through an identity splice: the same forward path as the spliced runs, so only ``fn`` differs
        lp_clean = logp(lambda a: a)
        p_clean = lp_clean.exp()
        lp_zero = logp(torch.zeros_like)
        shared["nll_clean"].append(nll(lp_clean))
        shared["nll_zero"].append(nll(lp_zero))
        shared["kl_zero"].append(per_seq((p_clean * (lp_clean - lp_zero)).sum(-1)))
        del lp_zero
        for k in names:  # one (tokens, vocab) log-prob matrix at a time besides the clean one
            lp = logp(replacements[k])
            ce[k].append(nll(lp))
            kl[k].append(per_seq((p_clean * (lp_clean - lp)).sum(-1)))
            del lp
        shared["n_tokens"].append(valid.sum(1).cpu().numpy().astype(np.int64))
    per = {k: np.concatenate(v) if v else np.zeros(0) for k, v in shared.items()}
    n = int(per["n_tokens"].sum())
    if n == 0:
        raise ValueError("ce_recovered got no target tokens (every sequence shorter than 2 real tokens?)")
    clean, zero, kl_zero = float(per["nll_clean"].sum()) / n, float(per["nll_zero"].sum()) / n, \
        float(per["kl_zero"].sum()) / n
    denom = zero - clean
    out = {}
    for k in names:
        nll_k, kl_k = np.concatenate(ce[k]), np.concatenate(kl[k])
        c = float(nll_k.sum()) / n
        rec = (zero - c) / denom if denom != 0 else float("nan")
        out[k] = CEResult(ce_clean=clean, ce_sae=c, ce_zero=zero, ce_recovered=rec, kl_sae=float(kl_k.sum()) / n,
                          kl_zero=kl_zero, n_tokens=n,
                          per_document=dict(nll_clean=per["nll_clean"], nll_zero=per["nll_zero"], nll_sae=nll_k,
                                            kl_sae=kl_k, kl_zero=per["kl_zero"], n_tokens=per["n_tokens"]))
    return out
