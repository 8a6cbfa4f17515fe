"""The activation cache: content-addressed, sharded, checksummed runs on disk that survive a crash.

Layout of one run (``<cache root>/runs/<run_id>/``; ``run_id`` is the hash of the canonical config)::

    manifest.json              config, per-hook row shape and dtype, committed shards, "complete" flag,
                               and a checksum of its own body (an edited manifest is detected)
    acts/<hook>/shard-00000.bin   raw little-endian rows, shape (rows, *row_shape); bf16 stays bf16
    meta/shard-00000.arrow     token metadata (doc_index, position, token_id, …): Arrow IPC stream
    .lock                      held by the writer (two captures of one config never interleave)

Write protocol, per shard: every file goes to a temporary name, is fsynced and renamed; then the manifest is
rewritten the same way with the shard appended. The manifest is the commit point: a reader sees exactly the
shards it lists, a writer killed anywhere resumes after the last listed shard, and shard boundaries are a
fixed number of capture batches, so a resumed run is bitwise identical to an uninterrupted one. ``complete``
is set last.

Scale-out (``torchrun``, see :mod:`probekit.distributed`): rank r writes its own run under ``rank-<r>/`` with
the same protocol; after a barrier rank 0 writes the run's ``manifest.json`` listing every rank's shards.

Reading: ``Run.load(hook, rows)`` memory-maps the shards (no copy when the rows lie in one shard). Every
shard's size is checked against the manifest when the run is opened and its xxh3 checksum on first read in
a process; ``Run.verify()`` re-hashes everything with sha256. Nothing corrupt is ever returned silently.

Example
-------
>>> from probekit.cache import ActivationCache            # doctest: +SKIP
>>> run = ActivationCache().capture(bridge, docs, CaptureConfig(hooks=["blocks.6.hook_resid_post"]))  # doctest: +SKIP
>>> x = run.load("blocks.6.hook_resid_post")                # (n_rows, 576), memory-mapped   # doctest: +SKIP
>>> meta = run.metadata()                                   # datasets.Dataset               # doctest: +SKIP
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import xxhash

from .paths import cache_root

FORMAT_VERSION = 1
_NP_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}  # bf16 kept as raw bits
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
META_DIR = "meta"
ACTS_DIR = "acts"


class CacheError(RuntimeError):
    """A run is missing, corrupt, or used wrongly. The message names the file and what to do."""


# --------------------------------------------------------------------------------------------- helpers


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def fingerprint_docs(docs: Sequence[Sequence[int]]) -> str:
    """sha256 of a token-id dataset (document boundaries included)."""
    h = hashlib.sha256()
    for d in docs:
        a = np.asarray(d, dtype=np.int64)
        h.update(len(a).to_bytes(8, "little"))
        h.update(a.tobytes())
    return h.hexdigest()


def fingerprint_tensor(x: torch.Tensor) -> str:
    """sha256 of a tensor dataset (shape, dtype and bytes)."""
    t = x.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}:{t.dtype}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def weights_fingerprint(model) -> str:
    """Identity of a model's weights: the registry sha256 when known, else a hash of its parameters."""
    known = getattr(model, "probekit_weights", None)
    if known:
        return known
    from .models import plain_model

    model = plain_model(model) or model  # a bridge's own state_dict has aliases; its twin's is plain HF
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = p.detach().cpu().contiguous()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class RunKey:
    """Everything that determines a run's bytes. Two equal keys give bitwise-equal runs."""

    model: str
    weights: str
    dataset: str
    hooks: tuple[str, ...]
    positions: str | tuple[int, ...]
    dtype: str
    max_length: int
    batch_size: int
    sort_by_length: bool
    batches_per_shard: int
    world_size: int = 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hooks"] = list(self.hooks)
        if not isinstance(self.positions, str):
            d["positions"] = list(self.positions)
        return d

    @property
    def run_id(self) -> str:
        return hashlib.sha256(_canonical(dict(format=FORMAT_VERSION, **self.to_dict()))).hexdigest()[:24]


# --------------------------------------------------------------------------------------------- reading


class Run:
    """A committed (possibly still growing) run. Cheap to open; re-open to see newly committed shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.is_file():
            raise CacheError(f"{mpath} does not exist: not a run, or no shard was committed yet.")
        self.manifest = _read_manifest(mpath)
        self._verified: set[str] = set()
        self._check_sizes()

    # ---- description
    def __repr__(self) -> str:
        state = "complete" if self.complete else "partial"
        model = self.config.get("key", {}).get("model")
        return (f"Run({self.run_id[:12]}, model={model!r}, hooks={len(self.hooks)}, rows={self.n_rows:,}, "
                f"{self.nbytes() / 2**20:,.1f} MiB, {state})")

    def _repr_html_(self) -> str:
        from .html_page import html_table

        rows = [{"hook": h, "shape": tuple(self.shape(h)), "dtype": str(self.dtype(h)).removeprefix("torch.")}
                for h in self.hooks]
        return html_table(rows, caption=repr(self))

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def n_rows(self) -> int:
        return sum(s["rows"] for s in self.manifest["shards"])

    def shape(self, hook: str) -> tuple[int, ...]:
        """Full shape ``(n_rows, *row_shape)`` of a hook."""
        return (self.n_rows, *self._hook(hook)["shape"])

    def dtype(self, hook: str) -> torch.dtype:
        return _TORCH[self._hook(hook)["dtype"]]

    def nbytes(self) -> int:
        return sum(f["bytes"] for s in self.manifest["shards"] for f in s["files"].values())

    def _hook(self, hook: str) -> dict:
        try:
            return self.manifest["hooks"][hook]
        except KeyError:
            raise CacheError(f"run {self.run_id} has no hook {hook!r}; it has {self.hooks}") from None

    # ---- integrity
    def _check_sizes(self) -> None:
        root = self.path.resolve()
        for s in self.manifest["shards"]:
            for f in s["files"].values():
                p = self.path / f["path"]
                if Path(f["path"]).is_absolute() or not p.resolve().is_relative_to(root):
                    raise CacheError(f"{self.path / 'manifest.json'}: file path {f['path']!r} points outside the "
                                     "run folder; refusing to read it.")
                try:
                    size = p.stat().st_size
                except FileNotFoundError:
                    raise CacheError(f"{p}: shard file listed in the manifest is missing. "
                                     f"Run `probekit cache verify {self.run_id}`; re-capture to repair.") from None
                if size != f["bytes"]:
                    raise CacheError(f"{p}: size {size} bytes, manifest says {f['bytes']} (truncated or "
                                     f"overwritten). Re-capture this run (`probekit cache rm {self.run_id}`).")

    def _check_file(self, rel: str, f: dict) -> None:
        """xxh3 of one file against the manifest, once per process (the fast read-time check)."""
        if rel in self._verified:
            return
        p = self.path / rel
        with open(p, "rb") as fh:
            if f["bytes"] == 0:
                digest = xxhash.xxh3_64_hexdigest(b"")
            else:  # hash the page-cache pages in place: no read() copies
                with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    digest = xxhash.xxh3_64_hexdigest(mm)
        if digest != f["xxh3"]:
            raise CacheError(f"{p}: checksum mismatch (the file is corrupt). Nothing was read from it. "
                             f"Re-capture this run (`probekit cache rm {self.run_id}`).")
        self._verified.add(rel)

    def verify(self) -> list[str]:
        """Re-hash every file with sha256; return a list of problems (empty when the run is sound)."""
        problems = []
        for s in self.manifest["shards"]:
            for f in s["files"].values():
                p = self.path / f["path"]
                if not p.is_file():
                    problems.append(f"{p}: missing")
                    continue
                if p.stat().st_size != f["bytes"]:
                    problems.append(f"{p}: size {p.stat().st_size}, expected {f['bytes']} (truncated?)")
                    continue
                h = hashlib.sha256()
                with open(p, "rb") as fh:
                    while block := fh.read(1 << 24):
                        h.update(block)
                if h.hexdigest() != f["sha256"]:
                    problems.append(f"{p}: sha256 mismatch (corrupt)")
        return problems

    # ---- data
    def _shard_array(self, hook: str, i: int) -> np.ndarray:
        s = self.manifest["shards"][i]
        f = s["files"][hook]
        self._check_file(f["path"], f)
        info = self.manifest["hooks"][hook]
        if s["rows"] == 0:
            return np.zeros((0, *info["shape"]), dtype=_NP_STORAGE[info["dtype"]])
        # copy-on-write map: still zero-copy, and a caller writing into a loaded tensor gets private pages
        # instead of a segfault on a read-only mapping
        return np.memmap(self.path / f["path"], dtype=_NP_STORAGE[info["dtype"]], mode="c",
                         shape=(s["rows"], *info["shape"]))

    def _to_torch(self, arr: np.ndarray, hook: str) -> torch.Tensor:
        t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if self.manifest["hooks"][hook]["dtype"] == "bfloat16" else t

    def load(self, hook: str, rows: slice | Sequence[int] | np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        """Rows of one hook as a tensor ``(n, *row_shape)`` in the stored dtype.

        A slice inside one shard is a zero-copy view of the memory map (read-only: clone before writing);
        anything else is gathered into a new tensor.
        """
        self._hook(hook)
        bounds = np.cumsum([0] + [s["rows"] for s in self.manifest["shards"]])
        n = int(bounds[-1])
        if rows is None:
            rows = slice(0, n)
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1 and stop <= start:
                return self._to_torch(np.empty((0, *self._hook(hook)["shape"]),
                                               dtype=_NP_STORAGE[self._hook(hook)["dtype"]]), hook)
            if step == 1:
                first = int(np.searchsorted(bounds, start, side="right") - 1)
                if first < len(bounds) - 1 and stop <= bounds[first + 1]:
                    arr = self._shard_array(hook, first)[start - bounds[first] : stop - bounds[first]]
                    return self._to_torch(arr, hook)
                parts = []
                for i in range(len(bounds) - 1):
                    lo, hi = max(start, bounds[i]), min(stop, bounds[i + 1])
                    if lo < hi:
                        parts.append(self._to_torch(np.asarray(self._shard_array(hook, i)[lo - bounds[i] : hi - bounds[i]]), hook))
                return torch.cat(parts) if parts else self._to_torch(self._shard_array(hook, 0)[:0], hook)
            rows = np.arange(start, stop, step)
        idx = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean row mask of shape {idx.shape} for a run of {n} rows")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"row index out of range for a run of {n} rows")
        info = self.manifest["hooks"][hook]
        out = np.empty((len(idx), *info["shape"]), dtype=_NP_STORAGE[info["dtype"]])
        shard_of = np.searchsorted(bounds, idx, side="right") - 1
        for i in np.unique(shard_of):
            sel = shard_of == i
            out[sel] = self._shard_array(hook, int(i))[idx[sel] - bounds[i]]
        return self._to_torch(out, hook)

    def metadata(self):
        """Token metadata of every committed row as a ``datasets.Dataset`` (columns doc_index, position,
        token_id, and any labels), in row order."""
        import datasets

        parts = []
        for s in self.manifest["shards"]:
            f = s["files"][META_DIR]
            self._check_file(f["path"], f)
            parts.append(datasets.Dataset.from_file(str(self.path / f["path"]), in_memory=True))
        if not parts:
            raise CacheError(f"run {self.run_id} has no committed rows yet")
        return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]

    def meta_tensors(self, columns: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Metadata columns (all by default) as int64 tensors ``(n_rows,)``."""
        ds = self.metadata().with_format("numpy")
        return {c: torch.from_numpy(np.asarray(ds[c])) for c in (columns or ds.column_names)}

    def rows_where(self, *, doc_index: Iterable[int] | None = None, position: Iterable[int] | None = None) -> np.ndarray:
        """Row indices whose metadata matches (document ids and/or positions)."""
        m = self.meta_tensors(("doc_index", "position"))
        keep = torch.ones(len(m["doc_index"]), dtype=torch.bool)
        if doc_index is not None:
            keep &= torch.isin(m["doc_index"], torch.as_tensor(list(doc_index)))
        if position is not None:
            keep &= torch.isin(m["position"], torch.as_tensor(list(position)))
        return torch.nonzero(keep).flatten().numpy()


def _check_hook_name(hook: str) -> None:
    """Hook names become folder names: refuse anything that could leave the run folder."""
    if not hook or hook.startswith(".") or "/" in hook or "\\" in hook or "\x00" in hook:
        raise CacheError(f"hook name {hook!r} cannot be stored: it must be non-empty, not start with '.', and "
                         "contain no path separators")


def write_manifest(run_dir: Path, body: dict) -> None:
    """Atomically replace ``run_dir/manifest.json`` with ``body`` and its checksum (the commit point)."""
    doc = dict(body=body, checksum=hashlib.sha256(_canonical(body)).hexdigest())
    _atomic_write(run_dir / "manifest.json", json.dumps(doc, indent=1, sort_keys=True).encode())
    _fsync_dir(run_dir)


def _read_manifest(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
        body, checksum = doc["body"], doc["checksum"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CacheError(f"{path}: unreadable manifest ({e}). Re-capture the run.") from None
    if hashlib.sha256(_canonical(body)).hexdigest() != checksum:
        raise CacheError(f"{path}: manifest checksum mismatch (edited or corrupt). Nothing was read. "
                         "Re-capture the run.")
    return body


# --------------------------------------------------------------------------------------------- writing


class RunWriter:
    """Streams capture batches into a run, committing a shard every ``key.batches_per_shard`` batches.

    Implements the capture ``ActivationWriter`` protocol. ``resume_batches`` tells capture how many batches
    are already committed (they are skipped). Holds the run's lock until ``close``/``abort``.
    """

    def __init__(self, path: Path, key: RunKey, extra_config: dict | None = None):
        self.path = path
        self.key = key
        path.mkdir(parents=True, exist_ok=True)
        self._lock = open(path / ".lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            print(f"[probekit cache] another process is writing run {path.name}; waiting for it …")
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        mpath = path / "manifest.json"
        if mpath.is_file():
            try:
                self.body = _read_manifest(mpath)
                if self.body["config"]["key"] != key.to_dict():
                    raise CacheError(f"{mpath}: run id collision with a different config; remove the run.")
            except BaseException:
                self._release()
                raise
        else:
            self.body = dict(format=FORMAT_VERSION, config=dict(key=key.to_dict(), **(extra_config or {})),
                             hooks={}, shards=[], complete=False)
        self.resume_batches = sum(s["batches"] for s in self.body["shards"])
        self._pending: list[tuple[dict, dict]] = []
        self._pending_batches = 0

    @property
    def complete(self) -> bool:
        return bool(self.body["complete"])

    def write(self, acts: dict[str, torch.Tensor], meta: dict[str, torch.Tensor]) -> None:
        self._pending.append((acts, meta))
        self._pending_batches += 1
        if self._pending_batches >= self.key.batches_per_shard:
            self._commit()

    def _commit(self) -> None:
        if not self._pending_batches:
            return
        import pyarrow as pa

        i = len(self.body["shards"])
        name = f"shard-{i:05d}"
        files = {}
        hooks = self._pending[0][0].keys()
        for hook in hooks:
            _check_hook_name(hook)
            parts = [a[hook] for a, _ in self._pending]
            t = (parts[0] if len(parts) == 1 else torch.cat(parts)).contiguous()
            dtype = {v: k for k, v in _TORCH.items()}[t.dtype]
            info = self.body["hooks"].setdefault(hook, dict(shape=list(t.shape[1:]), dtype=dtype))
            if info["shape"] != list(t.shape[1:]) or info["dtype"] != dtype:
                raise CacheError(f"hook {hook}: rows of shape {tuple(t.shape[1:])} {dtype} do not match the run's "
                                 f"{tuple(info['shape'])} {info['dtype']}")
            arr = (t.view(torch.uint16) if dtype == "bfloat16" else t).numpy()
            raw = memoryview(arr).cast("B") if arr.size else b""  # no copy
            files[hook] = (f"{ACTS_DIR}/{hook}/{name}.bin", raw)
        cols = {k: torch.cat([m[k] for _, m in self._pending]).numpy() for k in self._pending[0][1]}
        rows = len(next(iter(cols.values())))
        sink = pa.BufferOutputStream()
        table = pa.table(cols)
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        files[META_DIR] = (f"{META_DIR}/{name}.arrow", sink.getvalue().to_pybytes())
        entries = {}
        for role, (rel, data) in files.items():
            p = self.path / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(p, data)
            entries[role] = dict(path=rel, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                                 xxh3=xxhash.xxh3_64_hexdigest(data))
        for d in {(self.path / rel).parent for rel, _ in files.values()}:
            _fsync_dir(d)
        self.body["shards"].append(dict(rows=rows, batches=self._pending_batches, files=entries))
        self._write_manifest()
        self._pending, self._pending_batches = [], 0

    def _write_manifest(self) -> None:
        write_manifest(self.path, self.body)

    def close(self) -> None:
        self._commit()
        self.body["complete"] = True
        self._write_manifest()
        self._release()

    def abort(self) -> None:
        """Drop uncommitted batches and release the lock; committed shards stay for a later resume."""
        self._pending, self._pending_batches = [], 0
        self._release()

    def _release(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()


# --------------------------------------------------------------------------------------------- the cache


class ActivationCache:
    """All runs under ``<root>/runs`` (root: ``$PROBEKIT_CACHE`` or ``cache/``)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else cache_root()
        self.runs_dir = self.root / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)

    def list(self) -> list[Run]:
        out = []
        for p in sorted(self.runs_dir.iterdir()):
            if (p / "manifest.json").is_file():
                try:
                    out.append(Run(p))
                except CacheError as e:
                    warnings.warn(str(e))
        return out

    def _resolve(self, run_id: str) -> Path:
        matches = [p for p in self.runs_dir.iterdir() if p.name.startswith(run_id)] if run_id else []
        if len(matches) != 1:
            known = ", ".join(p.name[:12] for p in self.runs_dir.iterdir()) or "none"
            what = "no run" if not matches else f"{len(matches)} runs"
            raise CacheError(f"{what} matching {run_id!r} under {self.runs_dir}; runs: {known}")
        return matches[0]

    def open(self, run_id: str) -> Run:
        """Open a run by id (a unique prefix is enough)."""
        return Run(self._resolve(run_id))

    def rm(self, run_id: str) -> Path:
        path = self._resolve(run_id)
        if path.resolve().parent != self.runs_dir.resolve() or not path.is_dir():
            raise CacheError(f"refusing to remove {path}: not a run folder under {self.runs_dir}")
        with open(path / ".lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise CacheError(f"run {path.name} is being written by another process; stop it first") from None
            shutil.rmtree(path)
        return path

    def key_for(self, model, docs: Sequence[Sequence[int]] | torch.Tensor, cfg, *, batches_per_shard: int = 4,
                model_name: str | None = None, world_size: int = 1) -> RunKey:
        positions = cfg.positions if isinstance(cfg.positions, str) else tuple(cfg.positions)
        name = model_name or getattr(model, "probekit_name", None) or type(model).__name__
        p = next(model.parameters(), None)
        # same weights in another dtype or on another device type give other bytes: part of the identity
        weights = f"{weights_fingerprint(model)}:{p.dtype if p is not None else ''}:{p.device.type if p is not None else ''}"
        dataset = fingerprint_tensor(docs) if isinstance(docs, torch.Tensor) else fingerprint_docs(docs)
        return RunKey(model=name, weights=weights, dataset=dataset,
                      hooks=tuple(cfg.hooks), positions=positions, dtype=cfg.dtype, max_length=cfg.max_length,
                      batch_size=cfg.batch_size, sort_by_length=cfg.sort_by_length,
                      batches_per_shard=batches_per_shard, world_size=world_size)

    def writer(self, key: RunKey, extra_config: dict | None = None) -> RunWriter:
        return RunWriter(self.runs_dir / key.run_id, key, extra_config)

    def capture(self, model, docs, cfg, *, tokenizer=None, batches_per_shard: int = 4,
                model_name: str | None = None, rank: int = 0, world_size: int = 1) -> Run:
        """Capture into the cache, reusing a complete run of the same config and resuming a partial one."""
        from .capture import capture as run_capture
        from .capture import tokenize

        if not isinstance(docs, torch.Tensor):  # a tensor is a batch of samples for a plain module
            docs = list(docs)
            if docs and isinstance(docs[0], str):
                tok = tokenizer or getattr(model, "tokenizer", None)
                docs = tokenize(tok, docs, max_length=cfg.max_length)
            docs = [list(map(int, d))[: cfg.max_length] for d in docs]
        key = self.key_for(model, docs, cfg, batches_per_shard=batches_per_shard, model_name=model_name,
                           world_size=world_size)
        if world_size > 1:
            return capture_distributed(self, model, docs, cfg, key, rank=rank, world_size=world_size,
                                       tokenizer=tokenizer)
        w = self.writer(key)
        if w.complete:
            w.abort()
            return Run(w.path)
        try:
            run_capture(model, docs, cfg, writer=w, tokenizer=tokenizer)
        except BaseException:
            w.abort()
            raise
        return Run(w.path)


# --------------------------------------------------------------------------------------------- scale-out


def capture_distributed(cache: ActivationCache, model, docs, cfg, key: RunKey, *, rank: int, world_size: int,
                        tokenizer=None) -> Run:
    """This rank's share of a capture into ``cache``; every rank returns the merged run."""
    import torch.distributed as dist

    from .capture import capture as run_capture

    if not dist.is_initialized():
        raise CacheError("world_size > 1 needs a process group: start with torchrun (see probekit.distributed)")
    run_dir = cache.runs_dir / key.run_id
    merged = run_dir / "manifest.json"
    if not merged.is_file():
        w = RunWriter(run_dir / f"rank-{rank}", key, dict(rank=rank, world_size=world_size))
        if not w.complete:
            try:
                run_capture(model, docs, cfg, writer=w, tokenizer=tokenizer,
                            batch_filter=lambda i: i % world_size == rank)
            except BaseException:
                w.abort()
                raise
        else:
            w.abort()
    dist.barrier()
    if rank == 0 and not merged.is_file():
        merge_ranks(run_dir, key, world_size)
    dist.barrier()
    return Run(run_dir)


def merge_ranks(run_dir, key: RunKey, world_size: int) -> None:
    """Write ``run_dir/manifest.json`` listing every rank's shards (paths relative to ``run_dir``)."""
    bodies = []
    for r in range(world_size):
        body = _read_manifest(run_dir / f"rank-{r}" / "manifest.json")
        if not body["complete"]:
            raise CacheError(f"{run_dir}/rank-{r} is not complete; re-run the same torchrun command to resume")
        bodies.append(body)
    hooks = {}
    for b in bodies:
        for h, info in b["hooks"].items():
            if hooks.setdefault(h, info) != info:
                raise CacheError(f"ranks disagree on hook {h}: {hooks[h]} vs {info}")
    shards = []
    for r, b in enumerate(bodies):
        for s in b["shards"]:
            files = {role: {**f, "path": f"rank-{r}/{f['path']}"} for role, f in s["files"].items()}
            shards.append({**s, "files": files, "rank": r})
    body = dict(format=bodies[0]["format"], config=dict(key=key.to_dict(), world_size=world_size),
                hooks=hooks, shards=shards, complete=True)
    write_manifest(run_dir, body)
