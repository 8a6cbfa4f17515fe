"""Device tier: resident hooks with LRU eviction, sequential and block-shuffled minibatches, streaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probekit.cache import ActivationCache, CacheError, Run, RunKey
from probekit.device_cache import BudgetError, DeviceCache

N = 1000  # rows; shards of 3 writes x 64 rows, the last one short, so reads cross shard boundaries
SHAPES = {"a": (16,), "b": (3, 4)}
BIG = 1.0  # GiB: everything fits
TINY = 1e-9  # GiB: nothing fits, so batches() streams


def make_run(root, dtype: torch.dtype, shapes=SHAPES, n=N, rows_per_write=64, seed=0) -> Run:
    """A synthetic run written through RunWriter (the real on-disk format)."""
    name = str(dtype).removeprefix("torch.")
    key = RunKey(model="synthetic", weights="none", dataset=f"randn-{seed}-{n}", hooks=tuple(shapes),
                 positions="all", dtype=name, max_length=0, batch_size=rows_per_write, sort_by_length=False,
                 batches_per_shard=3)
    w = ActivationCache(root).writer(key)
    g = torch.Generator().manual_seed(seed)
    for i in range(0, n, rows_per_write):
        m = min(rows_per_write, n - i)
        acts = {h: torch.randn((m, *s), generator=g).to(dtype) for h, s in shapes.items()}
        w.write(acts, {"doc_index": torch.arange(i, i + m), "position": torch.zeros(m, dtype=torch.long),
                       "token_id": torch.zeros(m, dtype=torch.long)})
    w.close()
    return Run(w.path)


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def run(request, tmp_path_factory):
    r = make_run(tmp_path_factory.mktemp("dc"), request.param)
    assert len(r.manifest["shards"]) > 3
    return r


@pytest.fixture(scope="module")
def run_bf16(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("dc16"), torch.bfloat16)


def same(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


def cache(run, path: str) -> DeviceCache:
    return DeviceCache(run, device="cpu", budget_gb=BIG if path == "resident" else TINY)


def collect(it):
    """Batches kept as yielded (not cloned): each must stay valid while later ones are produced."""
    return list(it)


def epochs_of(batches, n):
    """Split a flat list of batches into epochs of n rows (batches never straddle epochs)."""
    out, cur, got = [], [], 0
    for b in batches:
        cur.append(b)
        got += len(b["rows"])
        assert got <= n, "a batch straddles two epochs"
        if got == n:
            out.append(cur)
            cur, got = [], 0
    assert not cur
    return out


def rows_of(batches) -> np.ndarray:
    return torch.cat([b["rows"] for b in batches]).numpy()


# ------------------------------------------------------------------------------------------------ sequential


@pytest.mark.parametrize("path", ["resident", "streamed"])
def test_sequential_batches_reproduce_load(run, path):
    dc = cache(run, path)
    bs = 37
    batches = collect(dc.batches(["a", "b"], bs, block_bytes=500, buffer_blocks=3))
    assert [len(b["rows"]) for b in batches] == [bs] * (N // bs) + [N % bs]
    assert all(b["rows"].dtype == torch.int64 for b in batches)
    assert np.array_equal(rows_of(batches), np.arange(N))
    for h in ("a", "b"):
        got = torch.cat([b[h] for b in batches])
        assert same(got, run.load(h))
    assert dc.resident == (["a", "b"] if path == "resident" else [])


# ------------------------------------------------------------------------------------------------ block shuffle


@pytest.mark.parametrize("path", ["resident", "streamed"])
def test_block_shuffle_every_row_once_values_match(run, path):
    dc = cache(run, path)
    batches = collect(dc.batches(["a", "b"], 25, shuffle=True, seed=3, epochs=2, block_bytes=1000,
                                 buffer_blocks=4))
    eps = epochs_of(batches, N)
    assert len(eps) == 2
    for ep in eps:
        assert np.array_equal(np.sort(rows_of(ep)), np.arange(N))  # every row exactly once
        for b in ep:
            for h in ("a", "b"):
                assert same(b[h], run.load(h, b["rows"]))
    r0, r1 = rows_of(eps[0]), rows_of(eps[1])
    assert not np.array_equal(r0, r1)  # a new order each epoch
    assert not np.array_equal(r0, np.arange(N))
    # shuffled within buffers too, not only block order: few consecutive rows stay neighbours
    assert np.mean(np.diff(r0) == 1) < 0.2


def test_block_shuffle_deterministic_per_seed(run):
    dc = cache(run, "resident")

    def order(seed):
        return rows_of(dc.batches("a", 64, shuffle=True, seed=seed, block_bytes=700, buffer_blocks=2))

    assert np.array_equal(order(5), order(5))
    assert not np.array_equal(order(5), order(6))
    # epoch e of seed s is epoch 0 of seed s + e
    two = epochs_of(collect(dc.batches("a", 64, shuffle=True, seed=5, epochs=2, block_bytes=700,
                                       buffer_blocks=2)), N)
    assert np.array_equal(rows_of(two[1]), order(6))


def test_blocks_are_at_least_block_bytes(run):
    dc = cache(run, "resident")
    hooks, block_bytes = ["a", "b"], 1000
    row = dc.row_nbytes(hooks)
    assert row == (16 + 12) * run.dtype("a").itemsize
    rpb = dc.rows_per_block(hooks, block_bytes)
    assert rpb * row >= block_bytes > (rpb - 1) * row  # the fewest rows reaching block_bytes
    tail = N % rpb or rpb
    nblocks = -(-N // rpb)

    def block(k):
        return set(range(k * rpb, min((k + 1) * rpb, N)))

    # buffer_blocks=1: the stream is whole blocks back to back, in shuffled block order
    r = rows_of(dc.batches(hooks, 7, shuffle=True, seed=1, block_bytes=block_bytes, buffer_blocks=1))
    p, seen = 0, []
    while p < N:
        k = int(r[p]) // rpb
        size = len(block(k))
        assert set(r[p : p + size].tolist()) == block(k)
        assert size == rpb or k == nblocks - 1  # only the tail block is short
        seen.append(k)
        p += size
    assert sorted(seen) == list(range(nblocks)) and seen != sorted(seen)
    # buffer_blocks=3: consecutive segments of the stream are unions of 3 whole blocks
    r = rows_of(dc.batches(hooks, 7, shuffle=True, seed=1, block_bytes=block_bytes, buffer_blocks=3))
    p, nseg = 0, 0
    while p < N:
        for size in (3 * rpb, 2 * rpb + tail, N - p):
            seg = set(r[p : p + size].tolist())
            ks = {x // rpb for x in seg}
            if len(ks) <= 3 and seg == set().union(*(block(k) for k in ks)):
                break
        else:
            raise AssertionError(f"rows {p}.. are not a buffer of whole blocks")
        p += size
        nseg += 1
    assert nseg == -(-nblocks // 3)


# ------------------------------------------------------------------------------------------------ subsets


@pytest.mark.parametrize("path", ["resident", "streamed"])
def test_rows_subset(run, path):
    dc = cache(run, path)
    subset = np.arange(5, N, 3)
    seq = collect(dc.batches("a", 50, rows=subset, block_bytes=300))
    assert np.array_equal(rows_of(seq), subset)
    assert same(torch.cat([b["a"] for b in seq]), run.load("a", subset))
    shuf = collect(dc.batches(["a", "b"], 50, rows=torch.from_numpy(subset), shuffle=True, block_bytes=300,
                              buffer_blocks=2))
    assert np.array_equal(np.sort(rows_of(shuf)), subset)
    assert not np.array_equal(rows_of(shuf), subset)
    for b in shuf:
        assert same(b["b"], run.load("b", b["rows"]))
    # unsorted rows come in the given order when not shuffled; a bool mask and a slice work too
    perm = np.random.default_rng(0).permutation(subset)
    assert np.array_equal(rows_of(dc.batches("a", 64, rows=perm)), perm)
    mask = np.zeros(N, dtype=bool)
    mask[subset] = True
    assert np.array_equal(rows_of(dc.batches("a", 64, rows=mask)), subset)
    assert np.array_equal(rows_of(dc.batches("a", 64, rows=slice(5, None, 3))), subset)


def test_drop_last_and_dtype(run_bf16):
    dc = cache(run_bf16, "resident")
    batches = collect(dc.batches("a", 64, shuffle=True, drop_last=True, epochs=2, dtype=torch.float32))
    assert [len(b["rows"]) for b in batches] == [64] * (2 * (N // 64))
    for b in batches:
        assert b["a"].dtype == torch.float32
        assert torch.equal(b["a"], run_bf16.load("a", b["rows"]).float())


# ------------------------------------------------------------------------------------------------ residency


def test_lru_eviction_and_budget_error(tmp_path):
    run = make_run(tmp_path, torch.float32, shapes={"h1": (8,), "h2": (8,), "h3": (8,)}, n=300)
    hb = 300 * 8 * 4
    dc = DeviceCache(run, device="cpu", budget_gb=2.5 * hb / 2**30)  # fits 2 of 3
    assert dc.hook_nbytes("h1") == hb
    for h in ("h1", "h2", "h1", "h3"):
        got = dc.get(h)
        assert same(got, run.load(h))
    assert dc.resident == ["h1", "h3"]  # h2 was least recently used
    assert dc.nbytes == 2 * hb and "h2" not in dc
    got = dc.get("h1")
    assert got.is_contiguous() and got.data_ptr() == dc.get("h1").data_ptr()  # served, not reloaded
    got[0, 0] = 1.0  # an in-memory copy, not the read-only map
    dc.get("h2")
    assert dc.resident == ["h1", "h2"]
    dc.evict("h1")
    assert dc.resident == ["h2"] and dc.nbytes == hb
    dc.evict("h1")  # not resident: no error
    dc.clear()
    assert dc.resident == [] and dc.nbytes == 0

    small = DeviceCache(run, device="cpu", budget_gb=0.5 * hb / 2**30)
    with pytest.raises(BudgetError, match=r"'h1'.*budget.*budget_gb.*batches"):
        small.get("h1")
    assert small.resident == []
    assert isinstance(BudgetError("x"), CacheError)


@pytest.mark.parametrize("shuffle", [False, True])
def test_streamed_equals_resident(run_bf16, shuffle):
    kw = dict(shuffle=shuffle, seed=11, epochs=2, rows=np.arange(3, N - 2), drop_last=True, block_bytes=800,
              buffer_blocks=3, dtype=torch.float32)
    res_dc, str_dc = cache(run_bf16, "resident"), cache(run_bf16, "streamed")
    res = collect(res_dc.batches(["a", "b"], 45, **kw))
    st = collect(str_dc.batches(["a", "b"], 45, **kw))
    assert res_dc.resident == ["a", "b"] and str_dc.resident == []  # the two paths were really taken
    assert len(res) == len(st) == 2 * ((N - 5) // 45)
    for x, y in zip(res, st):
        assert x.keys() == y.keys()
        for k in x:
            assert same(x[k], y[k]), k


def test_hooks_fit_alone_but_not_together_stream(run_bf16):
    one = DeviceCache(run_bf16, device="cpu").hook_nbytes("a")
    dc = DeviceCache(run_bf16, device="cpu", budget_gb=1.2 * one / 2**30)
    batches = collect(dc.batches(["a", "b"], 100, shuffle=True))
    assert dc.resident == []
    assert np.array_equal(np.sort(rows_of(batches)), np.arange(N))


def test_argument_errors(run_bf16):
    dc = cache(run_bf16, "resident")
    with pytest.raises(CacheError, match="no hook 'zz'"):
        dc.batches(["a", "zz"], 8)  # raised at the call, not at the first next()
    with pytest.raises(ValueError, match="batch_size"):
        dc.batches("a", 0)
    with pytest.raises(IndexError, match="out of range"):
        dc.batches("a", 8, rows=[0, N])
    with pytest.raises(ValueError, match="at least one hook"):
        dc.batches([], 8)
    with pytest.raises(CacheError, match="no hook"):
        dc.get("zz")
    assert list(dc.batches("a", 8, rows=[])) == []
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            DeviceCache(run_bf16, device="cuda")
    assert DeviceCache(run_bf16).device.type == ("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------ pipelined path
# The CUDA streamed path stages buffer k+1 (host read + async upload) before buffer k is handed out. The real
# transport needs a GPU; here a fake transport that copies and logs drives the same pipeline on the CPU, so the
# ordering (prefetch one buffer ahead, wait before use, drain on early close) and the data are checked.


class _FakeUploader:
    """Stands in for the CUDA transport: 'uploads' are copies; every call is logged."""

    pin = False

    def __init__(self):
        self.log: list[tuple] = []
        self.rows: list[set[int]] = []  # rows of each staged buffer

    def stage(self, host):
        k = len(self.rows)
        self.rows.append(set(host["rows"].tolist()))
        self.log.append(("stage", k))
        return k, {name: v.clone() for name, v in host.items()}

    def ready(self, staged):
        k, dev = staged
        self.log.append(("ready", k))
        return dev

    def close(self):
        self.log.append(("close",))


class _Pipelined(DeviceCache):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fake = _FakeUploader()

    def _uploader(self):
        return self.fake


@pytest.mark.parametrize("shuffle", [False, True])
def test_pipelined_stream_equals_resident(run_bf16, shuffle):
    kw = dict(shuffle=shuffle, seed=5, epochs=2, rows=np.arange(7, N), block_bytes=800, buffer_blocks=3,
              dtype=torch.float32)
    res = collect(cache(run_bf16, "resident").batches(["a", "b"], 37, **kw))
    pip = _Pipelined(run_bf16, device="cpu", budget_gb=TINY)
    st = collect(pip.batches(["a", "b"], 37, **kw))
    assert pip.resident == [] and pip.fake.log  # the pipelined streamed path was really taken
    assert len(res) == len(st)
    for x, y in zip(res, st):
        assert x.keys() == y.keys()
        for k in x:
            assert same(x[k], y[k]), k


def test_pipeline_prefetches_one_buffer_ahead_and_waits_before_use(run_bf16):
    pip = _Pipelined(run_bf16, device="cpu", budget_gb=TINY)
    up = pip.fake
    rpb = pip.rows_per_block("a", 800)
    n_buffers = -(-(-(-N // rpb)) // 2)  # blocks per epoch, two blocks a buffer
    for b in pip.batches("a", 30, shuffle=True, seed=1, epochs=2, block_bytes=800, buffer_blocks=2):
        readied = [e[1] for e in up.log if e[0] == "ready"]
        staged = [e[1] for e in up.log if e[0] == "stage"]
        # every row handed out comes from a buffer the consumer has waited for ...
        assert set(b["rows"].tolist()) <= set().union(*(up.rows[k] for k in readied))
        # ... and the next buffer of the epoch is already staged while this one is consumed
        last = readied[-1]
        if (last + 1) % n_buffers:
            assert last + 1 in staged
    epoch = [("stage", 0)] + [e for k in range(1, n_buffers) for e in (("stage", k), ("ready", k - 1))] \
        + [("ready", n_buffers - 1)]
    second = [(op, k + n_buffers) for op, k in epoch]
    assert up.log == epoch + second + [("close",)]


def test_pipeline_closed_early_drains_the_upload_in_flight(run_bf16):
    pip = _Pipelined(run_bf16, device="cpu", budget_gb=TINY)
    it = pip.batches("a", 10, block_bytes=800, buffer_blocks=2)
    next(it)
    it.close()
    assert pip.fake.log == [("stage", 0), ("stage", 1), ("ready", 0), ("close",)]
