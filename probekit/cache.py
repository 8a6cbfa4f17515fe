"""The activation cache: content-addressed, sharded, checksummed runs on disk that survive a crash.

Layout of one run (``<cache root>/runs/<run_id>/``; ``run_id`` is the hash of the canonical config)::

    manifest.json              config, per-hook row shape and dtype, committed shards, "complete" flag,
                               and a checksum of its own body (an edited manifest is detected)
    acts/<hook>/shard-00000.bin   raw little-endian rows, shape (rows, *row_shape); bf16 stays bf16
    meta/shard-00000.arrow     token metadata (doc_index, position, token_id, …): Arrow IPC stream
    .lock                      held by the writer (two captures of one config never interleave)

Write protocol, per shard: every file goes to a temporary name, is fsynced and renamed, and its folder is
fsynced (as is the parent of every folder created); then the manifest is rewritten the same way with the shard
appended. The manifest is the commit point: a reader sees exactly the shards it lists, a writer killed
anywhere resumes after the last listed shard, and shard boundaries are a fixed number of capture batches, so a
resumed run is bitwise identical to an uninterrupted one. ``complete`` is set last. The directory fsyncs make
the commit survive a power loss, not only a killed process (a rename is durable once its folder is).

Repair: a writer opening a run checks every committed shard (size, xxh3); capturing the same config again
rewrites a missing, truncated or corrupt shard in place and keeps the sound ones. A first capture that fails
removes its folder; ``ActivationCache.unfinished`` lists folders a killed capture left without a manifest.

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
    """Make the entries of folder ``path`` (renames into it, folders made in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkdir_durable(path: Path) -> None:
    """``mkdir -p`` that fsyncs the parent of every folder it creates: a new folder's name lives in its parent,
    and without that fsync a power loss can drop the folder with every file committed inside it."""
    missing = []
    p = path
    while not p.is_dir():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            pass
        _fsync_dir(d.parent)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write a temporary file, fsync it, rename it over ``path``, fsync ``path``'s folder (the rename is only
    durable once the folder is; SQLite and LMDB do the same)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _file_digest(path: Path, nbytes: int) -> str:
    """xxh3 of a file, hashing the page-cache pages in place (no read() copies)."""
    with open(path, "rb") as fh:
        if nbytes == 0:
            return xxhash.xxh3_64_hexdigest(b"")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return xxhash.xxh3_64_hexdigest(mm)


def _remedy(run_dir: Path) -> str:
    """What to do about a damaged shard of the run (or rank run) at ``run_dir``."""
    run_id = run_dir.parent.name if run_dir.name.startswith("rank-") else run_dir.name
    return (f"Run the same capture again to repair it (sound shards are kept, only damaged ones are recomputed), "
            f"or remove the run with `probekit cache rm {run_id[:12]}`.")


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
                                     f"{_remedy(self.path)}") from None
                if size != f["bytes"]:
                    raise CacheError(f"{p}: size {size} bytes, manifest says {f['bytes']} (truncated or "
                                     f"overwritten). {_remedy(self.path)}")

    def _check_file(self, rel: str, f: dict) -> None:
        """xxh3 of one file against the manifest, once per process (the fast read-time check)."""
        if rel in self._verified:
            return
        p = self.path / rel
        if _file_digest(p, f["bytes"]) != f["xxh3"]:
            raise CacheError(f"{p}: checksum mismatch (the file is corrupt). Nothing was read from it. "
                             f"{_remedy(self.path)}")
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


def _read_manifest(path: Path) -> dict:
    """The checked body of a manifest; a CacheError naming the file (and the remedy) for anything else."""
    run_dir = path.parent
    run_id = (run_dir.parent.name if run_dir.name.startswith("rank-") else run_dir.name)[:12]
    remedy = (f"Its shards cannot be trusted without it: remove the run with `probekit cache rm {run_id}` and "
              "capture again.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CacheError(f"{path}: unreadable manifest, not UTF-8 ({e.reason} at byte {e.start}). {remedy}") from None
    try:
        doc = json.loads(text)
        body, checksum = doc["body"], doc["checksum"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CacheError(f"{path}: unreadable manifest ({type(e).__name__}: {e}). {remedy}") from None
    if hashlib.sha256(_canonical(body)).hexdigest() != checksum:
        raise CacheError(f"{path}: manifest checksum mismatch (edited or corrupt). Nothing was read. {remedy}")
    if not isinstance(body, dict) or not {"format", "config", "hooks", "shards", "complete"} <= body.keys():
        raise CacheError(f"{path}: manifest lacks the keys format, config, hooks, shards, complete. {remedy}")
    return body


# --------------------------------------------------------------------------------------------- writing


def _lock_folder(path: Path, *, wait: bool = True):
    """An exclusive ``flock`` on ``path/.lock`` (the folder is made if needed), or None when busy and
    ``wait`` is False. A folder removed by its previous holder while we waited (``cache rm``, a failed first
    capture) is made again and locked afresh, so two holders never lock different files of one run."""
    while True:
        _mkdir_durable(path)
        try:
            fh = open(path / ".lock", "a+")
        except FileNotFoundError:  # removed between mkdir and open
            continue
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                fh.close()
                raise
            if not wait:
                fh.close()
                return None
            print(f"[probekit cache] another process is writing run {path.name}; waiting for it …")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            held, now = os.fstat(fh.fileno()), os.stat(path / ".lock")
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                return fh
        except FileNotFoundError:
            pass
        fh.close()


class RunWriter:
    """Streams capture batches into a run, committing a shard every ``key.batches_per_shard`` batches.

    Implements the capture ``ActivationWriter`` protocol. Holds the run's lock until ``close``/``abort``.

    Opening checks every committed shard (file present, size and xxh3 as in the manifest). ``resume_batches``
    tells capture how many leading batches are committed and sound (they are skipped). A damaged shard
    (missing, truncated, corrupt) is repaired: its batches are captured again and written to the same files;
    ``skip_batches`` are the batch indices after it that belong to sound shards, which a capture that can
    filter batches skips (a tensor capture cannot: it recomputes them, giving the same bytes). ``abort`` on
    a folder that never got a manifest removes the folder, so a failed first capture leaves nothing behind.
    """

    def __init__(self, path: Path, key: RunKey, extra_config: dict | None = None):
        self.path = path
        self.key = key
        self._lock = _lock_folder(path)
        mpath = path / "manifest.json"
        try:
            if mpath.is_file():
                self.body = _read_manifest(mpath)
                if self.body["config"]["key"] != key.to_dict():
                    raise CacheError(f"{mpath}: run id collision with a different config; remove the run "
                                     f"(`probekit cache rm {path.name[:12]}`).")
            else:
                self.body = dict(format=FORMAT_VERSION, config=dict(key=key.to_dict(), **(extra_config or {})),
                                 hooks={}, shards=[], complete=False)
            self.verified, self.damaged = self._check_shards()
        except BaseException:
            self.abort()
            raise
        shards = self.body["shards"]
        first = self.damaged[0] if self.damaged else len(shards)
        self.resume_batches = sum(s["batches"] for s in shards[:first])
        start = self.resume_batches
        self.skip_batches: set[int] = set()
        self._slots = list(self.damaged)  # existing shard indices the next commits rewrite, in order
        for i in range(first, len(shards)):
            if i not in self.damaged:
                self.skip_batches.update(range(start, start + shards[i]["batches"]))
            start += shards[i]["batches"]
        self._pending: list[tuple[dict, dict]] = []
        self._pending_batches = 0

    def _check_shards(self) -> tuple[set[str], list[int]]:
        """Relative paths of the sound committed files, and the indices of the damaged shards."""
        sound, damaged = set(), []
        for i, s in enumerate(self.body["shards"]):
            ok = True
            for f in s["files"].values():
                p = self.path / f["path"]
                if Path(f["path"]).is_absolute() or ".." in Path(f["path"]).parts:
                    raise CacheError(f"{self.path / 'manifest.json'}: file path {f['path']!r} points outside the "
                                     "run folder; refusing to use it.")
                try:
                    good = p.stat().st_size == f["bytes"] and _file_digest(p, f["bytes"]) == f["xxh3"]
                except FileNotFoundError:
                    good = False
                if good:
                    sound.add(f["path"])
                ok &= good
            if not ok:
                damaged.append(i)
        return sound, damaged

    def recompute_sound_shards(self) -> None:
        """For captures that cannot skip batches (tensor inputs): capture everything after the first damaged
        shard again, rewriting the sound shards there with the same bytes."""
        if self.skip_batches:
            first = self.damaged[0]
            self._slots = list(range(first, len(self.body["shards"])))
            self.skip_batches = set()

    @property
    def complete(self) -> bool:
        """The run is complete and every committed shard is sound (nothing to capture)."""
        return bool(self.body["complete"]) and not self.damaged

    def write(self, acts: dict[str, torch.Tensor], meta: dict[str, torch.Tensor]) -> None:
        self._pending.append((acts, meta))
        self._pending_batches += 1
        want = self.body["shards"][self._slots[0]]["batches"] if self._slots else self.key.batches_per_shard
        if self._pending_batches >= want:
            self._commit()

    def _commit(self) -> None:
        if not self._pending_batches:
            return
        import pyarrow as pa

        i = self._slots[0] if self._slots else len(self.body["shards"])
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
            _mkdir_durable(p.parent)
            _atomic_write(p, data)  # fsyncs the file and its folder
            entries[role] = dict(path=rel, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                                 xxh3=xxhash.xxh3_64_hexdigest(data))
        shard = dict(rows=rows, batches=self._pending_batches, files=entries)
        if self._slots:  # a repaired shard: same files, same place in the run
            self.body["shards"][self._slots.pop(0)] = shard
        else:
            self.body["shards"].append(shard)
        self._write_manifest()
        self._pending, self._pending_batches = [], 0

    def _write_manifest(self) -> None:
        write_manifest(self.path, self.body)

    def close(self) -> None:
        self._commit()
        if self._slots:
            raise CacheError(f"{self.path}: the capture ended before shard {self._slots[0]} was rewritten; the "
                             "inputs differ from the run's (its config hash should have changed). "
                             f"{_remedy(self.path)}")
        self.body["complete"] = True
        self._write_manifest()
        self._release()

    def abort(self) -> None:
        """Drop uncommitted batches and release the lock; committed shards stay for a later resume. A folder
        with no committed manifest (a first capture that failed) is removed."""
        self._pending, self._pending_batches = [], 0
        if not self._lock.closed and not (self.path / "manifest.json").exists():
            shutil.rmtree(self.path, ignore_errors=True)
            _fsync_dir(self.path.parent)
            if self.path.name.startswith("rank-"):  # the run folder of a scale-out capture, if now empty
                try:
                    self.path.parent.rmdir()
                    _fsync_dir(self.path.parent.parent)
                except OSError:
                    pass
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
        _mkdir_durable(self.runs_dir)

    def _folders(self) -> list[Path]:
        return sorted(p for p in self.runs_dir.iterdir() if p.is_dir())

    def list(self) -> list[Run]:
        """Every run with a readable manifest. A run that cannot be opened is skipped with a warning naming
        its file (it never hides the others); folders without a manifest are in :meth:`unfinished`."""
        out = []
        for p in self._folders():
            if (p / "manifest.json").is_file():
                try:
                    out.append(Run(p))
                except CacheError as e:
                    warnings.warn(str(e), stacklevel=2)
        return out

    def unfinished(self) -> list[tuple[Path, str]]:
        """Folders under ``runs/`` without a manifest, with their state: ``"being written"`` (a capture holds
        the lock and has not committed its first shard) or ``"interrupted"`` (a capture was killed before its
        first commit: capture again to start it, or ``cache rm`` it)."""
        out = []
        for p in self._folders():
            if (p / "manifest.json").exists():
                continue
            try:
                with open(p / ".lock", "rb") as fh:
                    try:
                        fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
                        state = "interrupted"
                    except OSError:
                        state = "being written"
            except FileNotFoundError:
                state = "interrupted"
            out.append((p, state))
        return out

    def _resolve(self, run_id: str, *, unfinished: bool = False) -> Path:
        """The run folder whose name starts with ``run_id``; folders without a manifest only when
        ``unfinished`` (so they never shadow a run or show up as one)."""
        folders = [p for p in self._folders() if unfinished or (p / "manifest.json").exists()]
        matches = [p for p in folders if p.name.startswith(run_id)] if run_id else []
        if len(matches) != 1:
            known = ", ".join(p.name[:12] for p in self._folders() if (p / "manifest.json").exists()) or "none"
            what = "no run" if not matches else f"{len(matches)} runs"
            raise CacheError(f"{what} matching {run_id!r} under {self.runs_dir}; runs: {known}")
        return matches[0]

    def open(self, run_id: str) -> Run:
        """Open a run by id (a unique prefix is enough)."""
        return Run(self._resolve(run_id))

    def rm(self, run_id: str) -> Path:
        """Remove a run (or a folder a killed capture left without a manifest)."""
        path = self._resolve(run_id, unfinished=True)
        if path.resolve().parent != self.runs_dir.resolve() or not path.is_dir():
            raise CacheError(f"refusing to remove {path}: not a run folder under {self.runs_dir}")
        with open(path / ".lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise CacheError(f"run {path.name} is being written by another process; stop it first") from None
            shutil.rmtree(path)
            _fsync_dir(self.runs_dir)
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
        """Capture into the cache, reusing a complete run of the same config, resuming a partial one and
        repairing damaged shards (missing, truncated or corrupt files are captured again; sound ones kept)."""
        from .capture import tokenize

        if not isinstance(docs, torch.Tensor):  # a tensor is a batch of samples for a plain module
            docs = list(docs)
            if docs and isinstance(docs[0], str):
                tok = tokenizer or getattr(model, "tokenizer", None)
                docs = tokenize(tok, docs, max_length=cfg.max_length)
            docs = [list(map(int, d))[: cfg.max_length] for d in docs]
            _check_positions(docs, cfg.positions)
        if not isinstance(batches_per_shard, int) or isinstance(batches_per_shard, bool) or batches_per_shard < 1:
            raise ValueError(f"batches_per_shard must be a positive integer, got {batches_per_shard!r}")
        key = self.key_for(model, docs, cfg, batches_per_shard=batches_per_shard, model_name=model_name,
                           world_size=world_size)
        if world_size > 1:
            return capture_distributed(self, model, docs, cfg, key, rank=rank, world_size=world_size,
                                       tokenizer=tokenizer)
        w = self.writer(key)
        _fill(w, model, docs, cfg, tokenizer)
        return _opened(w.path, w.verified)


# --------------------------------------------------------------------------------------------- scale-out


def _check_positions(docs: Sequence[Sequence[int]], positions) -> None:
    """Refuse fixed positions that exist in no document: the run would be complete with 0 rows."""
    if isinstance(positions, str) or not docs:
        return
    if not any(-len(d) <= p < len(d) for d in docs for p in positions):
        longest = max(len(d) for d in docs)
        raise ValueError(f"positions {list(positions)} lie past the end of every document (the longest has "
                         f"{longest} tokens), so the run would have 0 rows; choose positions in "
                         f"[-{longest}, {longest - 1}] (CaptureConfig.positions, `--positions`)")


def _fill(w: RunWriter, model, docs, cfg, tokenizer, batch_filter=None) -> None:
    """Capture what the writer still lacks (nothing, the tail after a resume, damaged shards), then release."""
    from .capture import capture as run_capture

    if w.complete:
        w.abort()
        return
    keep = batch_filter or (lambda i: True)
    kw = {}
    if isinstance(docs, torch.Tensor):  # a tensor capture cannot skip batches: recompute after the damage
        w.recompute_sound_shards()
    elif w.skip_batches or batch_filter is not None:
        # rank r's j-th batch is batch j*world+r of all; keep() says which are this rank's (all when alone)
        mine = [i for i in range(_n_batches(docs, cfg)) if keep(i)]
        skip = {mine[j] for j in w.skip_batches if j < len(mine)}
        kw["batch_filter"] = lambda i: keep(i) and i not in skip
    try:
        run_capture(model, docs, cfg, writer=w, tokenizer=tokenizer, **kw)
    except BaseException:
        w.abort()
        raise


def _n_batches(docs, cfg) -> int:
    return -(-len(docs) // cfg.batch_size)


def _opened(path: Path, verified: set[str]) -> Run:
    """The run at ``path``, its files already checksummed by the writer marked as such (no second hash)."""
    run = Run(path)
    ours = {f["path"] for s in run.manifest["shards"] for f in s["files"].values()}
    run._verified |= verified & ours
    return run


def capture_distributed(cache: ActivationCache, model, docs, cfg, key: RunKey, *, rank: int, world_size: int,
                        tokenizer=None) -> Run:
    """This rank's share of a capture into ``cache``; every rank returns the merged run."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise CacheError("world_size > 1 needs a process group: start with torchrun (see probekit.distributed)")
    run_dir = cache.runs_dir / key.run_id
    # every rank checks (and repairs) its own shards, also under a merged manifest
    w = RunWriter(run_dir / f"rank-{rank}", key, dict(rank=rank, world_size=world_size))
    _fill(w, model, docs, cfg, tokenizer, batch_filter=lambda i: i % world_size == rank)
    dist.barrier()
    if rank == 0:
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
    merged = run_dir / "manifest.json"
    try:
        if merged.is_file() and _read_manifest(merged) == body:
            return  # already merged: leave the committed file alone
    except CacheError:
        pass  # an unreadable merged manifest is rebuilt from the ranks' own
    write_manifest(run_dir, body)
