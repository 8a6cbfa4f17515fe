"""The device tier of the activation cache: whole hooks resident on the GPU (or in RAM), and minibatches.

``DeviceCache`` sits on top of a :class:`~probekit.cache.Run`. It keeps *whole hooks* (tensors
``(n_rows, *row_shape)`` in the stored dtype) resident on a device within a memory budget, evicting the least
recently used hook when a new one would not fit, and serves minibatches for probe training:

- when every requested hook fits the budget, the hooks are made resident once and each minibatch is gathered
  on the device by index (no host round trip per batch);
- otherwise the rows are streamed from the memory-mapped run, a buffer of blocks at a time; on CUDA through
  pinned host memory with the next buffer's copy already running on a side stream while the current one is
  consumed.

Shuffling is *block* shuffling, so a streamed epoch reads the disk in large sequential pieces: the rows are cut
into blocks of consecutive rows, the block order is shuffled, ``buffer_blocks`` blocks at a time are gathered
into a buffer, and the rows inside the buffer are shuffled. Every row comes exactly once per epoch, and the order
depends only on ``seed`` and the epoch number, not on the path (resident or streamed) nor the device.

Example
-------
>>> import torch                                                              # doctest: +SKIP
>>> from probekit.cache import ActivationCache                                # doctest: +SKIP
>>> from probekit.device_cache import DeviceCache                             # doctest: +SKIP
>>> run = ActivationCache().list()[0]            # any captured run            # doctest: +SKIP
>>> hook = run.hooks[0]                                                       # doctest: +SKIP
>>> dc = DeviceCache(run, budget_gb=8)           # cuda when available, else cpu   # doctest: +SKIP
>>> x = dc.get(hook)                             # (n_rows, *row_shape), resident  # doctest: +SKIP
>>> token_id = run.meta_tensors(["token_id"])["token_id"].to(dc.device)     # doctest: +SKIP
>>> for b in dc.batches(hook, 1024, shuffle=True, epochs=2, dtype=torch.float32):  # doctest: +SKIP
...     x, y = b[hook], token_id[b["rows"]]      # (1024, *row_shape) float32, (1024,) labels
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterator, Sequence

import numpy as np
import torch

from .cache import CacheError, Run

_GIB = 1 << 30
_LOAD_CHUNK = 64 << 20  # bytes per host->device copy when making a hook resident (bounds pinned staging memory)


class BudgetError(CacheError):
    """A hook (or request) cannot fit the device cache's memory budget."""


class DeviceCache:
    """Whole hooks of one run resident on a device, least-recently-used eviction, and minibatch iteration.

    Parameters
    ----------
    run : Run
        The on-disk run to read from.
    device : str or torch.device, optional
        ``"cuda"``, ``"cuda:1"``, ``"cpu"``, …; ``None`` picks ``cuda`` when available, else ``cpu``.
    budget_gb : float
        Memory budget for resident hooks, in GiB (2**30 bytes). Only resident hooks count; streaming buffers
        (``buffer_blocks * block_bytes``, twice over on CUDA) and batches handed out do not.

    Notes
    -----
    Tensors returned by :meth:`get`, and batches that :meth:`batches` slices without copying (sequential order,
    no ``dtype`` cast, resident hooks), share memory with the cache: treat them as read-only. An evicted hook's
    memory is freed once nothing else references it (on CUDA it goes back to PyTorch's caching allocator). Not
    thread-safe.
    """

    def __init__(self, run: Run, *, device: str | torch.device | None = None, budget_gb: float = 4.0):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"DeviceCache(device={str(device)!r}): CUDA is not available in this "
                                   "process (CPU-only torch, or no visible GPU); use device='cpu' or None.")
            if self.device.index is None:  # pin the index so streams, events and tensors agree
                self.device = torch.device("cuda", torch.cuda.current_device())
        if not budget_gb > 0:
            raise ValueError(f"budget_gb must be positive, got {budget_gb}")
        self.run = run
        self.budget_gb = float(budget_gb)
        self.budget = int(budget_gb * _GIB)
        self._resident: OrderedDict[str, torch.Tensor] = OrderedDict()  # least recently used first

    def __repr__(self) -> str:
        return (f"DeviceCache(run={self.run.run_id[:12]}, device={self.device}, "
                f"{self.nbytes / _GIB:.3f}/{self.budget_gb:g} GiB, resident={self.resident})")

    # ------------------------------------------------------------------------------------------ sizes

    def row_nbytes(self, hooks: str | Sequence[str]) -> int:
        """Bytes of one row, summed over ``hooks``, in the stored dtypes."""
        hooks = [hooks] if isinstance(hooks, str) else hooks
        return sum(math.prod(self.run.shape(h)[1:]) * self.run.dtype(h).itemsize for h in hooks)

    def hook_nbytes(self, hook: str) -> int:
        """Bytes a hook takes when resident: ``n_rows * row bytes``."""
        return self.run.n_rows * self.row_nbytes(hook)

    def rows_per_block(self, hooks: str | Sequence[str], block_bytes: int = 1 << 20) -> int:
        """Rows in one shuffle block: the fewest consecutive rows whose bytes, summed over ``hooks``, reach
        ``block_bytes``, i.e. ``ceil(block_bytes / row_nbytes(hooks))``.

        Summing over the hooks (rather than taking the widest) makes ``block_bytes`` what one block costs to read
        in total, whatever the mix of hooks; narrow hooks then get shorter reads, which are still sequential.
        """
        return max(1, -(-int(block_bytes) // max(1, self.row_nbytes(hooks))))

    # ------------------------------------------------------------------------------------------ residency

    @property
    def resident(self) -> list[str]:
        """Names of the resident hooks, least recently used first."""
        return list(self._resident)

    @property
    def nbytes(self) -> int:
        """Bytes held by resident hooks."""
        return sum(t.nbytes for t in self._resident.values())

    def __contains__(self, hook: str) -> bool:
        return hook in self._resident

    def get(self, hook: str) -> torch.Tensor:
        """The whole hook, resident on the device: ``(n_rows, *row_shape)`` in the stored dtype.

        Loads it on first use, evicting least-recently-used hooks until it fits the budget.

        Raises
        ------
        BudgetError
            If the hook alone is larger than the budget.
        """
        if hook in self._resident:
            self._resident.move_to_end(hook)
            return self._resident[hook]
        need = self.hook_nbytes(hook)
        self._check_fits(need, f"hook {hook!r} {tuple(self.run.shape(hook))} {str(self.run.dtype(hook))[6:]}")
        while self._resident and self.nbytes + need > self.budget:
            self._resident.popitem(last=False)
        t = self._load(hook)
        self._resident[hook] = t
        return t

    def evict(self, hook: str) -> None:
        """Drop a hook from the device (no error when it is not resident)."""
        self._resident.pop(hook, None)

    def clear(self) -> None:
        """Drop every resident hook."""
        self._resident.clear()

    def _check_fits(self, need: int, what: str) -> None:
        if need > self.budget:
            raise BudgetError(
                f"{what} takes {need / _GIB:.3f} GiB ({need:,} bytes), more than this DeviceCache's budget of "
                f"{self.budget_gb:g} GiB ({self.budget:,} bytes) on {self.device}. Raise budget_gb (if the device "
                f"has the memory), or iterate with DeviceCache.batches(...), which streams blocks from disk "
                f"when the hooks do not fit.")

    def _shard_bounds(self) -> list[int]:
        return np.cumsum([0] + [s["rows"] for s in self.run.manifest["shards"]]).tolist()

    def _load(self, hook: str) -> torch.Tensor:
        """Copy a hook from the memory-mapped run into one device tensor, shard by shard (each ``run.load`` is
        then a zero-copy view of the map), in chunks of ``_LOAD_CHUNK`` bytes."""
        shape, dtype = self.run.shape(hook), self.run.dtype(hook)
        out = torch.empty(shape, dtype=dtype, device=self.device)
        step = max(1, _LOAD_CHUNK // max(1, self.row_nbytes(hook)))
        bounds = self._shard_bounds()
        cuda = self.device.type == "cuda"
        for a, b in zip(bounds[:-1], bounds[1:]):
            for lo in range(a, b, step):
                hi = min(lo + step, b)
                src = self.run.load(hook, slice(lo, hi))
                if cuda:  # pinned copy: the next chunk's host copy overlaps this chunk's upload
                    out[lo:hi].copy_(src.pin_memory(), non_blocking=True)
                else:
                    out[lo:hi].copy_(src)
        return out

    # ------------------------------------------------------------------------------------------ batches

    def batches(self, hooks: str | Sequence[str], batch_size: int, *, shuffle: bool = False, seed: int = 0,
                epochs: int = 1, rows: slice | Sequence[int] | np.ndarray | torch.Tensor | None = None,
                drop_last: bool = False, block_bytes: int = 1 << 20, buffer_blocks: int = 16,
                dtype: torch.dtype | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Minibatches of one or more hooks, on the device.

        Parameters
        ----------
        hooks : str or sequence of str
            Hooks to put in each batch.
        batch_size : int
            Rows per batch; the last batch of an epoch may be shorter unless ``drop_last``.
        shuffle : bool
            ``False``: rows in order (the order of ``rows`` when given). ``True``: block-shuffled (module
            docstring); the generator is ``torch.Generator().manual_seed(seed + epoch)``.
        seed : int
            Seed of the shuffle; the same seed gives the same order, on any device and either path.
        epochs : int
            Passes over the rows; each shuffled differently.
        rows : slice, int sequence/array/tensor, or bool mask, optional
            Restrict to these row indices (e.g. a train split); every listed entry comes once per epoch. Blocks
            are cut from this list, so sorted indices read the disk sequentially.
        drop_last : bool
            Drop each epoch's final short batch.
        block_bytes : int
            Minimum bytes per shuffle block, summed over ``hooks`` (see :meth:`rows_per_block`); only the last
            block of the row list can be shorter.
        buffer_blocks : int
            Blocks whose rows are shuffled together. Larger mixes better, and costs
            ``buffer_blocks * block_bytes`` of buffer memory when streaming.
        dtype : torch.dtype, optional
            Cast the hook tensors (e.g. bf16 storage -> ``torch.float32`` for training).

        Yields
        ------
        dict
            ``{hook: (b, *row_shape) tensor, ..., "rows": (b,) int64 tensor}``, all on ``self.device``;
            ``"rows"`` are the run's row indices of the batch, to index metadata or labels.

        Notes
        -----
        When the requested hooks fit the budget together they are made resident (:meth:`get`) and batches are
        gathered on the device; otherwise they are streamed without becoming resident. Argument errors are
        raised here, not on the first ``next``.
        """
        hooks = [hooks] if isinstance(hooks, str) else list(hooks)
        if not hooks:
            raise ValueError("batches() needs at least one hook")
        if len(set(hooks)) != len(hooks) or "rows" in hooks:
            raise ValueError(f"hooks must be distinct and not named 'rows': {hooks}")
        for h in hooks:
            self.run.shape(h)  # unknown hook -> CacheError naming the run's hooks
        for name, v in (("batch_size", batch_size), ("epochs", epochs), ("block_bytes", block_bytes),
                        ("buffer_blocks", buffer_blocks)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        sel = self._rows(rows)
        plan = dict(sel=sel, batch_size=int(batch_size), shuffle=bool(shuffle), seed=int(seed),
                    epochs=int(epochs), drop_last=bool(drop_last), rpb=self.rows_per_block(hooks, block_bytes),
                    buffer_blocks=int(buffer_blocks), dtype=dtype)
        if sum(self.hook_nbytes(h) for h in hooks) <= self.budget:
            return self._resident_batches(hooks, **plan)
        return self._streamed_batches(hooks, **plan)

    def _rows(self, rows) -> np.ndarray:
        n = self.run.n_rows
        if rows is None:
            return np.arange(n, dtype=np.int64)
        if isinstance(rows, slice):
            return np.arange(*rows.indices(n), dtype=np.int64)
        a = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows)
        if a.dtype == bool:
            if a.shape != (n,):
                raise IndexError(f"a boolean row mask must have shape ({n},), got {a.shape}")
            return np.flatnonzero(a).astype(np.int64)
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"rows must be integer indices, a bool mask or a slice, got dtype {a.dtype}")
        a = a.astype(np.int64).reshape(-1)
        if a.size and (a.min() < 0 or a.max() >= n):
            raise IndexError(f"row index out of range for a run of {n} rows "
                             f"(min {a.min()}, max {a.max()})")
        return a

    @staticmethod
    def _epoch_buffers(n: int, rpb: int, buffer_blocks: int, shuffle: bool, gen: torch.Generator | None):
        """Per buffer: its blocks as position ranges ``[start, stop)`` into the row list, in buffer order, and
        the within-buffer permutation (``None`` when not shuffling): output row ``j`` is the ``perm[j]``-th row
        of the blocks concatenated. Both paths draw from ``gen`` in this one order, so they agree."""
        nblocks = -(-n // rpb)
        order = torch.randperm(nblocks, generator=gen) if shuffle else torch.arange(nblocks)
        for k in range(0, nblocks, buffer_blocks):
            starts = order[k : k + buffer_blocks] * rpb
            stops = torch.clamp(starts + rpb, max=n)
            length = int((stops - starts).sum())
            perm = torch.randperm(length, generator=gen) if shuffle else None
            yield starts.tolist(), stops.tolist(), perm

    def _epochs(self, n, rpb, buffer_blocks, shuffle, seed, epochs):
        for e in range(epochs):
            gen = torch.Generator().manual_seed(seed + e) if shuffle else None
            yield self._epoch_buffers(n, rpb, buffer_blocks, shuffle, gen)

    # ---- resident: gather by index on the device

    def _resident_batches(self, hooks, *, sel, batch_size, shuffle, seed, epochs, drop_last, rpb, buffer_blocks,
                          dtype):
        tensors = {h: self.get(h) for h in hooks}  # held here, so a later eviction cannot pull them mid-epoch
        n = len(sel)
        contiguous = n > 0 and sel[-1] - sel[0] == n - 1 and bool(np.all(np.diff(sel) == 1))
        sel_t = torch.from_numpy(sel)
        for buffers in self._epochs(n, rpb, buffer_blocks, shuffle, seed, epochs):
            if shuffle:
                order = torch.cat([torch.cat([torch.arange(a, b) for a, b in zip(st, sp)])[perm]
                                   for st, sp, perm in buffers]) if n else torch.zeros(0, dtype=torch.int64)
                idx = sel_t[order].to(self.device)  # one upload per epoch, not per batch
            else:
                idx = sel_t.to(self.device)
            for i in range(0, n, batch_size):
                j = min(i + batch_size, n)
                if drop_last and j - i < batch_size:
                    break
                r = idx[i:j]
                if contiguous and not shuffle:  # zero-copy views of the resident tensors
                    s = int(sel[0])
                    batch = {h: t[s + i : s + j] for h, t in tensors.items()}
                else:
                    batch = {h: t.index_select(0, r) for h, t in tensors.items()}
                if dtype is not None:
                    batch = {h: t.to(dtype) for h, t in batch.items()}
                batch["rows"] = r
                yield batch

    # ---- streamed: a buffer of blocks at a time from the memory map

    def _shard_views(self, hook: str) -> list[tuple[int, int, torch.Tensor]]:
        """``(first_row, stop_row, view)`` per non-empty shard: zero-copy views of the memory maps, held while an
        iterator lives, so blocks are plain slices (no map per block; pages faulted once stay mapped)."""
        b = self._shard_bounds()
        return [(lo, hi, self.run.load(hook, slice(lo, hi))) for lo, hi in zip(b[:-1], b[1:]) if hi > lo]

    def _read_buffer(self, hooks, views, sel, starts, stops, perm, *, pin=False, reuse=None):
        """Read one buffer's blocks from the run into host tensors, already in output order.

        A block of consecutive rows is copied from the shard views straight to its (shuffled) positions, so every
        byte is copied once; a block of scattered rows (a ``rows`` subset) is gathered with ``run.load``. With
        ``reuse`` (a dict), the buffers are kept there and refilled by the next call (CPU); otherwise they are
        fresh (``pin``: in pinned memory, for an async upload)."""
        lens = [b - a for a, b in zip(starts, stops)]
        length = sum(lens)
        offs = np.cumsum([0] + lens).tolist()
        if perm is not None:
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(length)
        out = {}
        for h in hooks:
            if reuse is not None and h in reuse and len(reuse[h]) >= length:
                t = reuse[h][:length]
            else:
                t = torch.empty((length, *self.run.shape(h)[1:]), dtype=self.run.dtype(h), pin_memory=pin)
                if reuse is not None:
                    reuse[h] = t
            for a, b, o in zip(starts, stops, offs):
                r = sel[a:b]
                lo, hi = int(r[0]), int(r[-1]) + 1
                if hi - lo == len(r) and np.all(np.diff(r) == 1):
                    pieces = [(v[max(lo, s0) - s0 : min(hi, s1) - s0], o + max(lo, s0) - lo)
                              for s0, s1, v in views[h] if s0 < hi and lo < s1]
                else:
                    pieces = [(self.run.load(h, r), o)]
                for src, d in pieces:
                    if perm is None:
                        t[d : d + len(src)].copy_(src)
                    else:
                        t.index_copy_(0, inv[d : d + len(src)], src)
            out[h] = t
        rows = torch.from_numpy(np.concatenate([sel[a:b] for a, b in zip(starts, stops)]))
        rows = rows if perm is None else rows[perm]
        out["rows"] = rows.pin_memory() if pin else rows
        return out

    def _streamed_batches(self, hooks, *, sel, batch_size, shuffle, seed, epochs, drop_last, rpb, buffer_blocks,
                          dtype):
        n = len(sel)
        views = {h: self._shard_views(h) for h in hooks}

        up = self._uploader()
        if up is None:
            reuse: dict[str, torch.Tensor] = {}  # one host buffer per hook, refilled: no fresh pages per buffer

            def own(part):  # batches must outlive the buffer's refill: each gets its own copy (cast included)
                return {k: v if k == "rows" else v.to(dtype or v.dtype, copy=True) for k, v in part.items()}

            for buffers in self._epochs(n, rpb, buffer_blocks, shuffle, seed, epochs):
                yield from _rebatch((self._read_buffer(hooks, views, sel, *b, reuse=reuse) for b in buffers),
                                    batch_size, drop_last, own)
            return

        def chunks(buffers):
            """Stage buffer k+1 (host read, async upload) before buffer k is handed out: the upload overlaps the
            consumer's work on buffer k."""
            it = iter(buffers)
            cur = next(it, None)
            cur = up.stage(self._read_buffer(hooks, views, sel, *cur, pin=up.pin)) if cur is not None else None
            while cur is not None:
                nxt = next(it, None)
                nxt = up.stage(self._read_buffer(hooks, views, sel, *nxt, pin=up.pin)) if nxt is not None else None
                yield up.ready(cur)
                cur = nxt

        def cast(part):  # device buffers are fresh per buffer: batches may stay views of them
            return {k: v if k == "rows" or dtype is None else v.to(dtype) for k, v in part.items()}

        try:
            for buffers in self._epochs(n, rpb, buffer_blocks, shuffle, seed, epochs):
                yield from _rebatch(chunks(buffers), batch_size, drop_last, cast)
        finally:  # closed early with an upload in flight: order its buffer's reuse after the copy
            up.close()

    def _uploader(self) -> "_CudaUploader | None":
        """The host->device transport of the streamed path on CUDA; ``None`` on the CPU, where buffers are read
        straight into reused host memory. (A seam: tests drive the pipelined path with a fake transport.)"""
        return _CudaUploader(self.device) if self.device.type == "cuda" else None


class _CudaUploader:
    """Uploads host buffers on a side stream so they overlap the main stream's work.

    ``stage`` copies a dict of pinned host tensors into fresh device tensors on the side stream and records an
    event; ``ready`` makes the main stream wait for that event and returns the device tensors; ``close`` orders
    every later main-stream use of memory the side stream wrote after the side stream's work.
    """

    pin = True  # host buffers must be pinned for the copies to be asynchronous

    def __init__(self, device: torch.device):
        self.device = device
        self.main = torch.cuda.current_stream(device)
        self.side = torch.cuda.Stream(device)

    def stage(self, host: dict[str, torch.Tensor]):
        # device memory is allocated on the main stream; the side stream must not write it before main-stream
        # work that used the same memory (before it was freed) is done
        dev = {k: torch.empty_like(v, device=self.device) for k, v in host.items()}
        self.side.wait_stream(self.main)
        with torch.cuda.stream(self.side):
            for k, v in host.items():
                dev[k].copy_(v, non_blocking=True)  # the host allocator keeps `v` until this copy completes
        ev = torch.cuda.Event()
        ev.record(self.side)
        return dev, ev

    def ready(self, staged) -> dict[str, torch.Tensor]:
        dev, ev = staged
        self.main.wait_event(ev)
        return dev

    def close(self) -> None:
        self.main.wait_stream(self.side)


def _rebatch(chunks: Iterator[dict[str, torch.Tensor]], batch_size: int, drop_last: bool, convert):
    """Cut a stream of equally long tensor dicts into batches of ``batch_size`` rows, passing each piece through
    ``convert`` before the next chunk is pulled (so a chunk's memory may be refilled afterwards). A batch
    straddling two chunks is concatenated. One epoch: the remainder is yielded unless ``drop_last``."""
    pending: list[dict[str, torch.Tensor]] = []
    npend = 0
    for c in chunks:
        length = len(c["rows"])
        i = 0
        if npend:
            take = min(batch_size - npend, length)
            pending.append(convert({k: v[:take] for k, v in c.items()}))
            npend += take
            i = take
            if npend < batch_size:
                continue
            yield {k: torch.cat([p[k] for p in pending]) for k in pending[0]}
            pending, npend = [], 0
        while length - i >= batch_size:
            yield convert({k: v[i : i + batch_size] for k, v in c.items()})
            i += batch_size
        if i < length:
            pending, npend = [convert({k: v[i:] for k, v in c.items()})], length - i
    if npend and not drop_last:
        yield pending[0] if len(pending) == 1 else {k: torch.cat([p[k] for p in pending]) for k in pending[0]}
