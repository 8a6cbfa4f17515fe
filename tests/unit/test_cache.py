"""Activation cache: round trips, reuse, corruption detection, readers during writes, locking."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from probekit.cache import ActivationCache, CacheError, Run
from probekit.capture import CaptureConfig, capture, tokenize
from tests.conftest import TEXTS

DOCS_TEXT = TEXTS * 3


@pytest.fixture
def docs(tiny_llama):
    _, tok = tiny_llama
    return tokenize(tok, DOCS_TEXT, max_length=64)


def cfg(**kw):
    base = dict(hooks=["blocks.0.hook_resid_post", "blocks.2.attn.hook_z"], batch_size=2, progress=False)
    base.update(kw)
    return CaptureConfig(**base)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_round_trip_exact(tiny_llama, docs, tmp_path, dtype):
    bridge, _ = tiny_llama
    run = ActivationCache(tmp_path).capture(bridge, docs, cfg(dtype=dtype), batches_per_shard=2)
    mem = capture(bridge, docs, cfg(dtype=dtype))
    assert run.complete and len(run.manifest["shards"]) > 1
    for h in run.hooks:
        got = run.load(h)
        assert got.dtype == getattr(torch, dtype)
        assert torch.equal(got.view(torch.uint8) if dtype != "float32" else got,
                           mem.acts[h].view(torch.uint8) if dtype != "float32" else mem.acts[h])
    meta = run.meta_tensors()
    for k in meta:
        assert torch.equal(meta[k], mem.meta[k])
    # any rows, any order, across shard boundaries
    rows = np.array([5, 0, run.n_rows - 1, 17, 17])
    assert torch.equal(run.load("blocks.0.hook_resid_post", rows), mem.acts["blocks.0.hook_resid_post"][rows])
    assert torch.equal(run.load("blocks.0.hook_resid_post", slice(3, 40)), mem.acts["blocks.0.hook_resid_post"][3:40])


def test_same_config_reuses_different_config_never_collides(tiny_llama, docs, tmp_path):
    bridge, _ = tiny_llama
    cache = ActivationCache(tmp_path)
    a = cache.capture(bridge, docs, cfg())
    mtime = (a.path / "manifest.json").stat().st_mtime_ns
    b = cache.capture(bridge, docs, cfg())
    assert b.path == a.path and (a.path / "manifest.json").stat().st_mtime_ns == mtime  # reused, not rewritten
    c = cache.capture(bridge, docs, cfg(dtype="bfloat16"))
    d = cache.capture(bridge, docs[:-1], cfg())
    e = cache.capture(bridge, docs, cfg(positions="last"))
    assert len({a.path, c.path, d.path, e.path}) == 4


def test_metadata_filter(tiny_llama, docs, tmp_path):
    bridge, _ = tiny_llama
    run = ActivationCache(tmp_path).capture(bridge, docs, cfg())
    rows = run.rows_where(doc_index=[1, 3], position=[0, 1])
    meta = run.meta_tensors()
    assert len(rows) == 4
    assert set(meta["doc_index"][rows].tolist()) == {1, 3} and set(meta["position"][rows].tolist()) == {0, 1}
    ds = run.metadata()
    assert ds.num_rows == run.n_rows and set(ds.column_names) >= {"doc_index", "position", "token_id"}


def _first_bin(run: Run):
    return run.path / run.manifest["shards"][1]["files"]["blocks.0.hook_resid_post"]["path"]


def test_truncated_shard_detected_naming_file(tiny_llama, docs, tmp_path):
    bridge, _ = tiny_llama
    cache = ActivationCache(tmp_path)
    run = cache.capture(bridge, docs, cfg(), batches_per_shard=1)
    other = cache.capture(bridge, docs, cfg(positions="last"))
    before = {p: p.read_bytes() for p in other.path.rglob("*") if p.is_file()}
    f = _first_bin(run)
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CacheError, match=str(f.name)):
        Run(run.path)
    assert any(str(f) in p and "size" in p for p in _unchecked(run.path).verify())
    # the other run is untouched and still reads
    assert {p: p.read_bytes() for p in other.path.rglob("*") if p.is_file()} == before
    Run(other.path).load("blocks.0.hook_resid_post")


def _unchecked(path):
    """A Run object without the open-time size check, to call verify() on a damaged run."""
    r = Run.__new__(Run)
    r.path = path
    from probekit.cache import _read_manifest

    r.manifest = _read_manifest(path / "manifest.json")
    r._verified = set()
    return r


def test_flipped_byte_detected_on_read_and_by_verify(tiny_llama, docs, tmp_path):
    bridge, _ = tiny_llama
    run = ActivationCache(tmp_path).capture(bridge, docs, cfg(), batches_per_shard=1)
    f = _first_bin(run)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    fresh = Run(run.path)  # sizes are fine; content is not
    fresh.load("blocks.0.hook_resid_post", slice(0, 2))  # shard 0 is intact and reads
    with pytest.raises(CacheError, match=f.name):
        fresh.load("blocks.0.hook_resid_post")
    problems = fresh.verify()
    assert len(problems) == 1 and f.name in problems[0] and "sha256" in problems[0]


def test_edited_manifest_detected(tiny_llama, docs, tmp_path):
    bridge, _ = tiny_llama
    run = ActivationCache(tmp_path).capture(bridge, docs, cfg())
    m = run.path / "manifest.json"
    doc = json.loads(m.read_text())
    doc["body"]["shards"][0]["rows"] += 1
    m.write_text(json.dumps(doc))
    with pytest.raises(CacheError, match="manifest.json"):
        Run(run.path)


def test_reader_during_write_sees_only_committed_rows(tiny_llama, docs, tmp_path):
    bridge, _ = tiny_llama
    cache = ActivationCache(tmp_path)
    key = cache.key_for(bridge, docs, cfg(), batches_per_shard=1)
    w = cache.writer(key)
    seen = []

    class Watch:
        """Forward writes to the run writer; after each, open the run as an independent reader."""

        resume_batches = 0

        def write(self, acts, meta):
            w.write(acts, meta)
            r = Run(w.path)
            seen.append((r.n_rows, r.complete))
            assert r.load("blocks.0.hook_resid_post").shape[0] == r.n_rows

        def close(self):
            w.close()

    res = capture(bridge, docs, cfg(), writer=Watch())
    assert [c for _, c in seen] == [False] * len(seen)
    assert [n for n, _ in seen] == sorted(n for n, _ in seen) and seen[-1][0] == res.n_rows
    assert Run(w.path).complete


def test_two_writers_of_one_config_serialize(tiny_llama, docs, tmp_path):
    bridge, _ = tiny_llama
    results, errors = [], []

    def go():
        try:
            results.append(ActivationCache(tmp_path).capture(bridge, docs, cfg(), batches_per_shard=1))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results[0].path == results[1].path
    run = Run(results[0].path)
    assert run.complete and not run.verify()
    assert run.n_rows == capture(bridge, docs, cfg()).n_rows


def test_cache_list_open_rm(tiny_llama, docs, tmp_path):
    bridge, _ = tiny_llama
    cache = ActivationCache(tmp_path)
    run = cache.capture(bridge, docs, cfg())
    assert [r.run_id for r in cache.list()] == [run.run_id]
    assert cache.open(run.run_id[:8]).path == run.path
    with pytest.raises(CacheError, match="no run"):
        cache.open("zzzz")
    cache.rm(run.run_id)
    assert cache.list() == []


def test_cli_cache_verify_names_the_corrupt_file(tiny_llama, docs, tmp_path, capsys):
    from probekit.cli import main

    bridge, _ = tiny_llama
    run = ActivationCache(tmp_path).capture(bridge, docs, cfg(), batches_per_shard=1)
    assert main(["cache", "verify", run.run_id[:10], "--cache-root", str(tmp_path)]) == 0
    assert "OK" in capsys.readouterr().out
    f = _first_bin(run)
    data = bytearray(f.read_bytes())
    data[0] ^= 0xFF
    f.write_bytes(bytes(data))
    assert main(["cache", "verify", run.run_id[:10], "--cache-root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"CORRUPT {f}" in out and "1 corrupt file" in out
    assert main(["cache", "list", "--cache-root", str(tmp_path)]) == 0
    assert run.run_id[:12] in capsys.readouterr().out
    assert main(["cache", "show", "nope", "--cache-root", str(tmp_path)]) == 2  # clear error, no traceback
    assert "no run matching" in capsys.readouterr().err


def test_shards_without_rows_are_committed_and_read(tiny_llama, tmp_path):
    """Fixed positions past every document's end give empty batches: they still commit and resume."""
    bridge, _ = tiny_llama
    docs = [[1] * 20, [2] * 3, [3] * 2, [4] * 15]
    run = ActivationCache(tmp_path).capture(bridge, docs, cfg(positions=[10], batch_size=1), batches_per_shard=1)
    assert run.complete and [s["rows"] for s in run.manifest["shards"]] == [1, 1, 0, 0]
    assert run.load("blocks.0.hook_resid_post").shape[0] == 2
    assert run.meta_tensors()["position"].tolist() == [10, 10]
    assert run.verify() == []


def test_plain_module_into_the_cache_and_resume(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x = torch.randn(10, 4)
    c = CaptureConfig(hooks=["1"], batch_size=2, progress=False)
    cache = ActivationCache(tmp_path)
    key = cache.key_for(net, x, c, batches_per_shard=1)
    w = cache.writer(key)

    class Fail:
        resume_batches = 0
        n = 0

        def write(self, acts, meta):
            w.write(acts, meta)
            self.n += 1
            if self.n == 3:
                raise KeyboardInterrupt  # the "crash" after three committed batches

        def close(self):
            w.close()

    with pytest.raises(KeyboardInterrupt):
        capture(net, x, c, writer=Fail())
    w.abort()
    run = cache.capture(net, x, c, batches_per_shard=1)  # resumes after the 3 committed batches
    assert run.run_id == key.run_id and run.n_rows == 10
    assert run.meta_tensors()["doc_index"].tolist() == list(range(10))
    with torch.no_grad():
        torch.testing.assert_close(run.load("1"), net[1](net[0](x)))


def test_model_dtype_is_part_of_the_run_identity(tiny_dir, docs, tmp_path):
    from probekit.models import load_model

    b32, _ = load_model(str(tiny_dir["llama"]))
    b64, _ = load_model(str(tiny_dir["llama"]), dtype=torch.float64)
    cache = ActivationCache(tmp_path)
    assert cache.key_for(b32, docs, cfg()).run_id != cache.key_for(b64, docs, cfg()).run_id


def test_load_edge_cases(tiny_llama, docs, tmp_path):
    bridge, _ = tiny_llama
    run = ActivationCache(tmp_path).capture(bridge, docs, cfg(), batches_per_shard=1)
    h = "blocks.0.hook_resid_post"
    full = run.load(h).clone()
    for sl in (slice(5, 2), slice(5, 0), slice(7, 7)):
        assert run.load(h, sl).shape[0] == 0
    mask = torch.zeros(run.n_rows, dtype=torch.bool)
    mask[[3, 30]] = True
    assert torch.equal(run.load(h, mask), full[[3, 30]])
    assert torch.equal(run.load(h, mask.numpy()), full[[3, 30]])
    with pytest.raises(IndexError):
        run.load(h, torch.zeros(3, dtype=torch.bool))
    view = run.load(h, slice(0, 2))
    view += 1  # copy-on-write pages: allowed, and the files are unchanged
    assert torch.equal(Run(run.path).load(h), full) and run.verify() == []


def test_unsafe_names_and_paths_are_refused(tiny_llama, docs, tmp_path):
    bridge, _ = tiny_llama
    run = ActivationCache(tmp_path).capture(bridge, docs, cfg())
    m = run.path / "manifest.json"
    doc = json.loads(m.read_text())
    f = doc["body"]["shards"][0]["files"]["blocks.0.hook_resid_post"]
    outside = tmp_path / "secret.bin"
    outside.write_bytes((run.path / f["path"]).read_bytes())
    f["path"] = "../../secret.bin"
    from probekit.cache import write_manifest

    write_manifest(run.path, doc["body"])  # a crafted manifest with a valid checksum
    with pytest.raises(CacheError, match="outside the run folder"):
        Run(run.path)
    from probekit.cache import _check_hook_name

    for bad in ("a/b", "../x", ".hidden", ""):
        with pytest.raises(CacheError, match="cannot be stored"):
            _check_hook_name(bad)


def test_rm_refuses_a_run_being_written(tiny_llama, docs, tmp_path):
    bridge, _ = tiny_llama
    cache = ActivationCache(tmp_path)
    w = cache.writer(cache.key_for(bridge, docs, cfg()))
    with pytest.raises(CacheError, match="being written"):
        cache.rm(w.path.name)
    w.abort()  # nothing was committed: the folder goes with the writer
    assert not w.path.exists()
