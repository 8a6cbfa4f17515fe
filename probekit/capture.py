"""Batched activation capture into a writer (memory, or a run of the activation cache).

Sequence models (a ``TransformerBridge`` from ``load_model``, or any HF-style module taking
``input_ids``/``attention_mask``): documents are tokenised (or given as token ids), bucketed by length so
batches carry little padding, padded on the right, run with only the requested hooks attached, and stopped
after the last one fires. Rows are tokens: all non-padding tokens, the last token of each document, or given
positions. Each row carries metadata ``doc_index``, ``position``, ``token_id``; because of bucketing, rows
come in bucket order, and the metadata is the record of that order.

Any other ``nn.Module``: inputs are a tensor ``(n_samples, …)``; rows are samples.

Example
-------
>>> from probekit.models import load_model                      # doctest: +SKIP
>>> bridge, tok = load_model("smollm2-135m")                     # doctest: +SKIP
>>> res = capture(bridge, ["def f(x):\\n    return x"], CaptureConfig(hooks=["blocks.3.hook_resid_post"]))  # doctest: +SKIP
>>> res.acts["blocks.3.hook_resid_post"].shape                   # doctest: +SKIP
torch.Size([9, 576])
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from .hooks import MECHANISMS, HookSet, is_bridge

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CaptureConfig:
    """What to capture and how.

    hooks : hook names (bridge names or dotted module paths).
    positions : "all" (every non-padding token), "last" (last token of each document), or a list of
        positions taken in every document (negative counts from the end; positions past a document's
        end are skipped and counted in ``CaptureResult.skipped``).
    batch_size : documents per batch (sequence models) or samples per batch (other modules).
    max_length : documents are truncated to this many tokens.
    dtype : storage dtype, "float32" | "bfloat16" | "float16" (the forward runs in the model's dtype).
    sort_by_length : bucket documents by length (less padding); order is recorded in the metadata.
    progress : show a tqdm bar with tokens/s.
    """

    hooks: list[str]
    positions: str | list[int] = "all"
    batch_size: int = 8
    max_length: int = 256
    dtype: str = "float32"
    sort_by_length: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.hooks, str):
            self.hooks = [self.hooks]
        if not self.hooks:
            raise ValueError("CaptureConfig.hooks is empty: name at least one hook, e.g. 'blocks.0.hook_resid_post'.")
        if len(set(self.hooks)) != len(self.hooks):
            raise ValueError(f"CaptureConfig.hooks has duplicates: {self.hooks}")
        if isinstance(self.positions, str) and self.positions not in ("all", "last"):
            raise ValueError(f"positions must be 'all', 'last' or a list of ints, got {self.positions!r}")
        if not isinstance(self.positions, str):
            self.positions = [int(p) for p in self.positions]
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.batch_size < 1 or self.max_length < 1:
            raise ValueError("batch_size and max_length must be positive")

    def to_dict(self) -> dict:
        return asdict(self)


class ActivationWriter(Protocol):
    """Where captured rows go. ``write`` gets one batch: ``acts[hook]`` of shape ``(rows, …)`` and
    ``meta[key]`` of shape ``(rows,)`` (int64). ``close`` is called once at the end (not on error)."""

    def write(self, acts: dict[str, torch.Tensor], meta: dict[str, torch.Tensor]) -> None: ...

    def close(self) -> None: ...


class MemoryWriter:
    """Keep everything in RAM; ``acts``/``meta`` are concatenated tensors after ``close``."""

    def __init__(self) -> None:
        self._acts: dict[str, list[torch.Tensor]] = {}
        self._meta: dict[str, list[torch.Tensor]] = {}
        self.acts: dict[str, torch.Tensor] = {}
        self.meta: dict[str, torch.Tensor] = {}

    def write(self, acts, meta) -> None:
        for k, v in acts.items():
            self._acts.setdefault(k, []).append(v)
        for k, v in meta.items():
            self._meta.setdefault(k, []).append(v)

    def close(self) -> None:
        self.acts = {k: torch.cat(v) for k, v in self._acts.items()}
        self.meta = {k: torch.cat(v) for k, v in self._meta.items()}


class NullWriter:
    """Discard everything (to time capture alone)."""

    def write(self, acts, meta) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class CaptureResult:
    """Summary of a capture. With a ``MemoryWriter`` (the default) ``acts``/``meta`` hold the rows."""

    config: CaptureConfig
    mechanism: str
    n_docs: int
    n_tokens: int
    n_rows: int
    seconds: float
    skipped: int = 0
    acts: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    meta: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / max(self.seconds, 1e-9)

    def __repr__(self) -> str:
        shapes = {h: tuple(t.shape) for h, t in self.acts.items()}
        return (f"CaptureResult({self.n_docs} docs, {self.n_tokens:,} tokens, {self.n_rows:,} rows, "
                f"{self.tokens_per_second:,.0f} tok/s via {self.mechanism}, acts={shapes or 'written to the writer'})")


def tokenize(tokenizer, texts: Sequence[str], *, max_length: int) -> list[list[int]]:
    """Token ids per text with the tokenizer's own special tokens (BOS for the bridge's tokenizers)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)
    return [list(ids) for ids in enc["input_ids"]]


def _batches(lengths: list[int], batch_size: int, sort: bool) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)) if sort else list(range(len(lengths)))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _select_rows(act: torch.Tensor, pos_axis: int, mask: torch.Tensor, positions, max_length: int):
    """Rows of one hook's batch activation ``act`` (``(B, P, …)`` once ``pos_axis`` is moved to 1).

    ``mask`` is the CPU padding mask; indices are built on the CPU and moved to ``act``'s device.
    """
    if pos_axis != 1:
        act = act.movedim(pos_axis, 1)
        if act.shape[-1] != max_length:  # key axis of patterns: pad to a fixed width so rows stack
            act = torch.nn.functional.pad(act, (0, max_length - act.shape[-1]))
    dev = act.device
    if positions == "all":  # integer indices from the CPU mask: no device-side nonzero/sync
        bi, pi = mask.nonzero(as_tuple=True)
        return act[bi.to(dev), pi.to(dev)]
    lengths = mask.sum(1)
    b = torch.arange(act.shape[0])
    if positions == "last":
        return act[b.to(dev), (lengths - 1).to(dev)]
    idx, keep = _fixed_positions(lengths, positions)
    return act[b.repeat_interleave(len(positions))[keep].to(dev), idx[keep].to(dev)]


def _fixed_positions(lengths: torch.Tensor, positions: list[int]):
    """Flattened ``(B * len(positions),)`` indices (negatives from each document's end) and which exist."""
    p = torch.tensor(positions).unsqueeze(0).expand(len(lengths), -1)
    idx = torch.where(p < 0, lengths.unsqueeze(1) + p, p)
    keep = (idx >= 0) & (idx < lengths.unsqueeze(1))
    return idx.reshape(-1), keep.reshape(-1)


def _row_meta(ids: torch.Tensor, mask: torch.Tensor, doc_idx: list[int], positions) -> dict[str, torch.Tensor]:
    B, P = ids.shape
    doc = torch.tensor(doc_idx).unsqueeze(1).expand(B, P)
    pos = torch.arange(P).unsqueeze(0).expand(B, P)
    if positions == "all":
        return dict(doc_index=doc[mask], position=pos[mask], token_id=ids[mask])
    lengths = mask.sum(1)
    b = torch.arange(B)
    if positions == "last":
        last = lengths - 1
        return dict(doc_index=doc[:, 0], position=last, token_id=ids[b, last])
    idx, keep = _fixed_positions(lengths, positions)
    bb = b.repeat_interleave(len(positions))[keep]
    return dict(doc_index=doc[bb, 0], position=idx[keep], token_id=ids[bb, idx[keep]])


def capture(model, inputs, config: CaptureConfig, *, writer: ActivationWriter | None = None,
            tokenizer=None, batch_filter: Callable[[int], bool] | None = None,
            mechanism: str = "auto") -> CaptureResult:
    """Run ``inputs`` through ``model`` and hand the requested activations to ``writer``.

    Parameters
    ----------
    model : ``TransformerBridge`` (names are bridge hook names), HF-style sequence model, or any
        ``nn.Module`` (names are module paths).
    inputs : list of str (tokenised with ``tokenizer`` or the bridge's), list of token-id lists, or — for
        non-sequence modules — a tensor ``(n_samples, …)``.
    writer : defaults to a ``MemoryWriter`` whose rows are returned in the result. A writer with a
        ``resume_batches`` attribute (the cache's ``RunWriter``) has that many leading batches skipped.
    batch_filter : keep only batches whose index passes (scale-out: each rank takes its own batches).
    mechanism : for a bridge, "auto" (plain module hooks when every name maps, else the bridge's hook
        points), "plain" or "bridge" (force one; "plain" raises if a name has no module equivalent). Both
        give the same activations; the choice only changes speed.
    """
    if mechanism not in MECHANISMS:
        raise ValueError(f"capture: mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    if mechanism != "auto" and not is_bridge(model):
        raise ValueError(f"capture: mechanism={mechanism!r} chooses between a TransformerBridge's two hook "
                         f"mechanisms; {type(model).__name__} is not a bridge (use the default 'auto').")
    own = writer is None
    writer = writer or MemoryWriter()
    if isinstance(inputs, torch.Tensor):
        if batch_filter is not None:
            raise ValueError("scale-out (batch_filter) is for token sequences; split a tensor dataset yourself")
        res = _capture_tensor(model, inputs, config, writer)
    else:
        res = _capture_sequences(model, inputs, config, writer, tokenizer, batch_filter, mechanism)
    writer.close()
    if own:
        res.acts, res.meta = writer.acts, writer.meta
    return res


def _capture_tensor(module, x: torch.Tensor, cfg: CaptureConfig, writer) -> CaptureResult:
    hs = HookSet.for_module(module, cfg.hooks)
    dtype = DTYPES[cfg.dtype]
    t0 = time.perf_counter()
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    first = getattr(writer, "resume_batches", 0) * cfg.batch_size  # resume after committed batches
    with hs, tqdm(total=len(x) - first, unit="sample", disable=not cfg.progress, desc="capture") as bar:
        for start in range(first, len(x), cfg.batch_size):
            xb = x[start : start + cfg.batch_size].to(device)
            acts = hs.run(lambda: module(xb))
            writer.write({k: v.to(dtype).to("cpu") for k, v in acts.items()},
                         dict(doc_index=torch.arange(start, start + len(xb))))
            bar.update(len(xb))
    return CaptureResult(cfg, hs.mechanism, len(x), len(x), len(x), time.perf_counter() - t0)


def _capture_sequences(model, inputs, cfg: CaptureConfig, writer, tokenizer, batch_filter=None,
                       mechanism: str = "auto") -> CaptureResult:
    inputs = list(inputs)
    if not inputs:
        raise ValueError("capture got no documents")
    if isinstance(inputs[0], str):
        tokenizer = tokenizer or getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("text inputs need a tokenizer: pass tokenizer=… or token-id lists")
        docs = tokenize(tokenizer, inputs, max_length=cfg.max_length)
    else:
        docs = [list(map(int, d))[: cfg.max_length] for d in inputs]
    if any(len(d) == 0 for d in docs):
        raise ValueError("an input document is empty after tokenisation; drop empty documents first")
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id

    if is_bridge(model):
        hs = HookSet.for_bridge(model, cfg.hooks, mechanism=mechanism)
    else:
        # an HF decoder/encoder takes the bridge names too; any other module takes dotted module paths
        hs = HookSet.for_hf(model, cfg.hooks) or HookSet.for_module(model, cfg.hooks)
        hs.sites = [replace(s, pos_axis=1) for s in hs.sites]  # module outputs are (batch, pos, …)
    runner = hs.model
    bridge_path = hs.mechanism == "bridge"
    param = next(runner.parameters())
    device = param.device
    dtype = DTYPES[cfg.dtype]

    lengths = [len(d) for d in docs]
    batches = _batches(lengths, cfg.batch_size, cfg.sort_by_length)
    if batch_filter is not None:
        batches = [b for i, b in enumerate(batches) if batch_filter(i)]
    done = getattr(writer, "resume_batches", 0)  # already committed by an earlier, interrupted capture
    n_tokens = sum(lengths[i] for b in batches[done:] for i in b)
    skipped = 0
    n_rows = 0
    t0 = time.perf_counter()
    with hs, tqdm(total=n_tokens, unit="tok", unit_scale=True, disable=not cfg.progress, desc="capture") as bar:
        for batch in batches[done:]:
            P = max(lengths[i] for i in batch)
            ids = torch.full((len(batch), P), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), P), dtype=torch.bool)
            for r, i in enumerate(batch):
                ids[r, : lengths[i]] = torch.tensor(docs[i])
                mask[r, : lengths[i]] = True
            ids_d, mask_d = ids.to(device), mask.to(device).long()
            if bridge_path:
                acts = hs.run(lambda: runner(ids_d, attention_mask=mask_d, return_type=None))
            else:
                acts = hs.run(lambda: runner(input_ids=ids_d, attention_mask=mask_d))
            rows = {}
            for site in hs.sites:
                a = acts[site.name]
                rows[site.name] = _select_rows(a, site.pos_axis or 1, mask, cfg.positions,
                                               cfg.max_length).to(dtype).to("cpu")
            meta = _row_meta(ids, mask, batch, cfg.positions)
            if not isinstance(cfg.positions, str):
                skipped += len(batch) * len(cfg.positions) - len(meta["doc_index"])
            n_rows += len(meta["doc_index"])
            writer.write(rows, meta)
            bar.update(int(mask.sum()))
            bar.set_postfix_str(f"{bar.n / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s")
    return CaptureResult(cfg, hs.mechanism, len(docs), n_tokens, n_rows, time.perf_counter() - t0, skipped)
