"""Supervised fine-tuning of a causal LM on (prompt, response) pairs, and the response loss it minimises.

The safety experiment (:mod:`probekit.safety_run`) uses it twice: to make an "aligned" model that refuses
harmful requests and keeps its own answers to harmless ones, and to fine-tune that model on a useful task
(code). It works on any Hugging Face causal LM (``AutoModelForCausalLM``).

Definitions
-----------
example
    A prompt, chat-formatted with the generation prompt exactly as at inference
    (:func:`probekit.probes.safety.encode_prompts`), followed by the response's tokens and the tokenizer's EOS
    token (``<|im_end|>`` for ChatML models, so the model learns to end its turn). Truncated to ``max_length``
    tokens; a prompt that does not leave room for a response token is an error.
response loss
    Mean next-token cross-entropy over the response tokens (EOS included), in nats per token; prompt tokens
    carry no loss. The LM head is applied to the response positions only, which saves most of the
    vocabulary projection on long prompts.
training
    AdamW on every parameter except, by default, the token embeddings and the (often tied) LM head
    (``freeze_embeddings``: the weight-space analysis skips vocabulary-sized matrices, and freezing them saves
    a third of the optimiser memory of a small model). Linear warm-up over ``warmup_steps``, then linear decay
    to zero; gradient norm clipped to ``grad_clip``. Each epoch visits the examples in a seeded random order,
    so a resumed run sees the same batches as an uninterrupted one.

Resume: with ``checkpoint_dir``, the model (safetensors), the optimiser state (tensors only, read back with
``weights_only=True``) and the step count are written atomically after every epoch; a second call with the
same directory continues from the last finished epoch (and returns at once when training had finished).

Public API
----------
FinetuneConfig, FinetuneResult, encode_pairs, response_loss, finetune

Example
-------
>>> model, tok, _ = load_hf("smollm2-135m")                                          # doctest: +SKIP
>>> res = finetune(model, tok, prompts, answers, FinetuneConfig(epochs=2, lr=2e-5))  # doctest: +SKIP
>>> response_loss(model, tok, test_prompts, test_answers)                             # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["FinetuneConfig", "FinetuneResult", "encode_pairs", "response_loss", "finetune"]


@dataclass
class FinetuneConfig:
    """Settings of :func:`finetune`.

    epochs, lr, batch_size : the optimisation.
    max_length : prompt + response tokens per example; longer responses are cut.
    weight_decay, grad_clip, warmup_steps : AdamW decay, gradient-norm clip, linear warm-up steps.
    freeze_embeddings : leave the input embeddings and the LM head untouched.
    chat_template : chat-format the prompts (False: raw prompts with the tokenizer's BOS, for base models).
    seed : example order.
    progress : tqdm bar over steps.
    """

    epochs: int = 2
    lr: float = 2e-5
    batch_size: int = 8
    max_length: int = 256
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 5
    freeze_embeddings: bool = True
    chat_template: bool = True
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}.")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}.")
        if self.warmup_steps < 0 or self.grad_clip <= 0:
            raise ValueError("warmup_steps must be >= 0 and grad_clip > 0.")


@dataclass
class FinetuneResult:
    """What :func:`finetune` did.

    Attributes
    ----------
    losses : list of float
        Mean response loss of every optimiser step, in order (resumed runs include the earlier steps).
    epoch_losses : list of float
        Token-weighted mean loss per epoch.
    steps : int
    n_examples, n_trainable : int
    seconds : float
        Wall time of this call (not of earlier, resumed calls).
    config : dict
    """

    losses: list[float]
    epoch_losses: list[float]
    steps: int
    n_examples: int
    n_trainable: int
    seconds: float
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token before fine-tuning.")
    return int(eos)


def encode_pairs(tokenizer, prompts: Sequence[str], responses: Sequence[str], *, chat_template: bool = True,
                 max_length: int = 256, add_eos: bool | Sequence[bool] = True) -> list[tuple[list[int], int]]:
    """Token ids of each example and the index of its first response token.

    Parameters
    ----------
    tokenizer : transformers tokenizer
    prompts, responses : sequence of str
        Shape ``(n,)`` each.
    chat_template : bool
    max_length : int
    add_eos : bool or sequence of bool
        End each response (or those marked True, shape ``(n,)``) with EOS. Leave it off for a response that was
        itself cut short, so the model does not learn to stop there.

    Returns
    -------
    list of (list of int, int)
        ``(ids, start)`` with ``ids[start:]`` the response (EOS last unless truncated), ``1 <= start < len(ids)``.
    """
    from .probes.safety import encode_prompts

    if isinstance(prompts, str) or isinstance(responses, str):
        raise TypeError("prompts and responses must be sequences of strings.")
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses.")
    if not prompts:
        raise ValueError("no examples given.")
    eos_flags = [bool(add_eos)] * len(prompts) if isinstance(add_eos, (bool, int)) else [bool(x) for x in add_eos]
    if len(eos_flags) != len(prompts):
        raise ValueError(f"add_eos has {len(eos_flags)} entries for {len(prompts)} examples.")
    p_ids = encode_prompts(tokenizer, prompts, chat_template=chat_template)
    eos = _eos_id(tokenizer)
    out = []
    for i, (p, r) in enumerate(zip(p_ids, responses)):
        if len(p) >= max_length:
            raise ValueError(f"prompt {i} has {len(p)} tokens, leaving no room for a response within "
                             f"max_length={max_length}; raise max_length or shorten the prompt.")
        r_ids = list(tokenizer(r, add_special_tokens=False)["input_ids"]) + ([eos] if eos_flags[i] else [])
        if not r_ids:
            raise ValueError(f"response {i} is empty and has no EOS: nothing to learn.")
        out.append(((p + r_ids)[:max_length], len(p)))
    return out


def _batch(examples: list[tuple[list[int], int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask and a (B, P-1) mask of positions whose next token is a response token."""
    P = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), P), dtype=torch.long)
    target = torch.zeros((len(examples), P - 1), dtype=torch.bool)
    for b, (x, s) in enumerate(examples):
        ids[b, : len(x)] = torch.as_tensor(x)
        mask[b, : len(x)] = 1
        target[b, s - 1 : len(x) - 1] = True  # position t predicts token t + 1
    return ids.to(device), mask.to(device), target.to(device)


def _sum_loss(model, ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed response cross-entropy (float32) and the number of response tokens."""
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, P, d)
    h = hidden[:, :-1][target]  # (N, d): only the positions that predict a response token
    logits = model.get_output_embeddings()(h).float()
    return F.cross_entropy(logits, ids[:, 1:][target], reduction="sum"), int(target.sum())


def _pad_id(tokenizer) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    return int(pid) if pid is not None else _eos_id(tokenizer)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def response_loss(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int = 8,
                  chat_template: bool = True, max_length: int = 256, per_example: bool = False):
    """Mean next-token cross-entropy of ``responses`` given ``prompts`` (nats per response token).

    Parameters
    ----------
    model : HF causal LM
    tokenizer : transformers tokenizer
    prompts, responses : sequence of str
        Shape ``(n,)`` each.
    batch_size, chat_template, max_length
        As in :class:`FinetuneConfig`.
    per_example : bool
        Return each example's mean loss, shape ``(n,)``, instead of the token-weighted mean.

    Returns
    -------
    float, or torch.Tensor of shape ``(n,)`` (float64)
    """
    ex = encode_pairs(tokenizer, prompts, responses, chat_template=chat_template, max_length=max_length)
    was_training = model.training
    model.eval()
    dev, pad = _device(model), _pad_id(tokenizer)
    order = sorted(range(len(ex)), key=lambda i: len(ex[i][0]))  # similar lengths together: less padding
    per = torch.zeros(len(ex), dtype=torch.float64)
    total, count = 0.0, 0
    try:
        for j in range(0, len(order), batch_size):
            idx = order[j : j + batch_size]
            if per_example:
                for i in idx:
                    s, n = _sum_loss(model, *_batch([ex[i]], pad, dev))
                    per[i] = float(s) / n
                    total, count = total + float(s), count + n
            else:
                s, n = _sum_loss(model, *_batch([ex[i] for i in idx], pad, dev))
                total, count = total + float(s), count + n
    finally:
        model.train(was_training)
    return per if per_example else total / count


def _lr_at(step: int, total: int, cfg: FinetuneConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    return cfg.lr * max(0.0, 1.0 - (step - cfg.warmup_steps) / span)


def _trainable(model, freeze_embeddings: bool) -> list[torch.nn.Parameter]:
    frozen = set()
    if freeze_embeddings:
        for m in (model.get_input_embeddings(), model.get_output_embeddings()):
            if m is not None:
                frozen |= {id(p) for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in frozen]


def _data_hash(ex: list[tuple[list[int], int]]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(ex).encode()).hexdigest()[:16]


def _save_checkpoint(model, opt, state: dict, folder: Path) -> None:
    """Model, optimiser tensors and state.json, each written to a temporary name and renamed."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.safetensors.tmp"
    save_model(model, str(tmp))
    os.replace(tmp, folder / "model.safetensors")
    tmp = folder / "optimizer.pt.tmp"
    torch.save(opt.state_dict(), tmp)
    os.replace(tmp, folder / "optimizer.pt")
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, folder / "state.json")


def finetune(model, tokenizer, prompts: Sequence[str], responses: Sequence[str],
             config: FinetuneConfig | None = None, *, checkpoint_dir: str | os.PathLike[str] | None = None,
             add_eos: bool | Sequence[bool] = True) -> FinetuneResult:
    """Fine-tune ``model`` in place on (prompt, response) pairs; loss on the response tokens only.

    Parameters
    ----------
    model : HF causal LM (``base_model``, ``get_output_embeddings``), on the device it should train on
    tokenizer : transformers tokenizer
    prompts, responses : sequence of str
        Shape ``(n,)`` each.
    config : FinetuneConfig or None
    checkpoint_dir : path or None
        Where to keep the per-epoch checkpoint for resuming (see the module docstring).
    add_eos : bool or sequence of bool
        See :func:`encode_pairs`.

    Returns
    -------
    FinetuneResult
        The model is left in eval mode with the trained weights (``requires_grad`` flags as they were).
    """
    from safetensors.torch import load_model
    from tqdm.auto import tqdm

    cfg = config or FinetuneConfig()
    ex = encode_pairs(tokenizer, prompts, responses, chat_template=cfg.chat_template, max_length=cfg.max_length,
                      add_eos=add_eos)
    params = _trainable(model, cfg.freeze_embeddings)
    if not params:
        raise ValueError("no trainable parameters (freeze_embeddings froze everything?).")
    was_grad = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    dev, pad = _device(model), _pad_id(tokenizer)
    steps_per_epoch = math.ceil(len(ex) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    state = dict(epoch=0, step=0, losses=[], epoch_losses=[], config=asdict(cfg), n_examples=len(ex),
                 data=_data_hash(ex))
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None and (folder / "state.json").is_file():
        saved = json.loads((folder / "state.json").read_text())
        if saved.get("config") != asdict(cfg) or saved.get("n_examples") != len(ex) or \
                saved.get("data") != _data_hash(ex):
            raise ValueError(f"{folder} holds a checkpoint of a different fine-tune (config or data differ); "
                             "use another checkpoint_dir or delete it.")
        load_model(model, str(folder / "model.safetensors"))
        opt.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True, map_location=dev))
        state = saved
    t0 = time.perf_counter()
    model.train()
    try:
        with tqdm(total=total, initial=state["step"], desc="fine-tune", unit="step",
                  disable=not cfg.progress) as bar:
            for epoch in range(state["epoch"], cfg.epochs):
                g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
                order = torch.randperm(len(ex), generator=g).tolist()
                ep_sum, ep_n = 0.0, 0
                for j in range(0, len(order), cfg.batch_size):
                    for group in opt.param_groups:
                        group["lr"] = _lr_at(state["step"], total, cfg)
                    s, n = _sum_loss(model, *_batch([ex[i] for i in order[j : j + cfg.batch_size]], pad, dev))
                    loss = s / n
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss at step {state['step']}; lower the lr "
                                                 f"(now {cfg.lr}).")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
                    state["step"] += 1
                    state["losses"].append(loss.item())
                    ep_sum, ep_n = ep_sum + s.item(), ep_n + n
                    bar.update(1)
                    bar.set_postfix(loss=f"{state['losses'][-1]:.3f}")
                state["epoch"] = epoch + 1
                state["epoch_losses"].append(ep_sum / ep_n)
                if folder is not None:
                    _save_checkpoint(model, opt, state, folder)
    finally:
        model.eval()
        for p, flag in was_grad:
            p.requires_grad_(flag)
        opt.zero_grad(set_to_none=True)
    return FinetuneResult(state["losses"], state["epoch_losses"], state["step"], len(ex),
                          sum(p.numel() for p in params), time.perf_counter() - t0, asdict(cfg))
