"""Activation cache hardening: unreadable manifests, repair by re-capture, no lock-only leftovers, directory
fsyncs at every commit point."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import pytest
import torch

from probekit.cache import ActivationCache, CacheError, Run
from probekit.capture import CaptureConfig, tokenize
from probekit.cli import main
from tests.conftest import TEXTS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def docs(tiny_llama):
    _, tok = tiny_llama
    return tokenize(tok, TEXTS * 3, max_length=64)


def cfg(**kw):
    base = dict(hooks=["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"], batch_size=2, progress=False)
    base.update(kw)
    return CaptureConfig(**base)


def tree(path: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and folder (None) under ``path``, the writer's lock excluded."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))
            if p.name != ".lock"}


def mtimes(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*.bin")}


# --------------------------------------------------------------------------------- unreadable manifests


def test_a_manifest_that_is_not_utf8_hides_no_other_run(tiny_llama, docs, tmp_path, capsys):
    bridge, _ = tiny_llama
    cache = ActivationCache(tmp_path)
    bad = cache.capture(bridge, docs, cfg())
    good = cache.capture(bridge, docs, cfg(positions="last"))
    m = bad.path / "manifest.json"
    m.write_bytes(b"\xff\xfe{\x00" + m.read_bytes()[:40])
    with pytest.warns(UserWarning, match="manifest.json"):
        assert [r.run_id for r in cache.list()] == [good.run_id]
    assert main(["cache", "list", "--cache-root", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert good.run_id[:12] in out.out and str(m) in out.err + out.out
    with pytest.raises(CacheError, match=f"{m}.*not UTF-8.*cache rm {bad.run_id[:12]}"):
        cache.open(bad.run_id)
    assert main(["cache", "show", bad.run_id[:12], "--cache-root", str(tmp_path)]) == 2
    assert str(m) in capsys.readouterr().err


# --------------------------------------------------------------------------------- repair by re-capture


@pytest.mark.parametrize("damage", ["missing", "truncated", "flipped"])
def test_recapture_repairs_a_damaged_shard_and_keeps_the_sound_ones(tiny_llama, docs, tmp_path, damage):
    bridge, _ = tiny_llama
    ref = ActivationCache(tmp_path / "ref").capture(bridge, docs, cfg(), batches_per_shard=1)
    cache = ActivationCache(tmp_path / "c")
    run = cache.capture(bridge, docs, cfg(), batches_per_shard=1)
    assert len(run.manifest["shards"]) >= 4
    want, before = tree(ref.path), mtimes(run.path)
    victim = run.path / run.manifest["shards"][1]["files"]["blocks.1.mlp.hook_post"]["path"]
    if damage == "missing":
        victim.unlink()
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-4])
    else:
        data = bytearray(victim.read_bytes())
        data[7] ^= 0x10
        victim.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=f"{victim.name}.*capture"):
        Run(run.path).load("blocks.1.mlp.hook_post")
    again = cache.capture(bridge, docs, cfg(), batches_per_shard=1)
    assert again.complete and tree(again.path) == want  # bitwise the uninterrupted run
    after = mtimes(again.path)
    rel = str(victim.relative_to(run.path))
    assert after[rel] != before[rel]
    assert {k: v for k, v in after.items() if "shard-00001" not in k} == \
        {k: v for k, v in before.items() if "shard-00001" not in k}  # sound shards were not rewritten
    assert again.verify() == []


def test_recapture_repairs_a_tensor_run(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x = torch.randn(10, 4)
    c = CaptureConfig(hooks=["1"], batch_size=2, progress=False)
    cache = ActivationCache(tmp_path)
    run = cache.capture(net, x, c, batches_per_shard=1)
    want = tree(run.path)
    (run.path / run.manifest["shards"][2]["files"]["1"]["path"]).unlink()
    again = cache.capture(net, x, c, batches_per_shard=1)
    assert tree(again.path) == want and again.verify() == []


# --------------------------------------------------------------------------------- no lock-only leftovers


def test_a_failed_first_capture_leaves_no_folder(tiny_llama, docs, tmp_path):
    bridge, _ = tiny_llama
    cache = ActivationCache(tmp_path)
    with pytest.raises(Exception, match="hook_resid_pots"):
        cache.capture(bridge, docs, cfg(hooks=["blocks.0.hook_resid_pots"]))
    assert list(cache.runs_dir.iterdir()) == []


def test_listings_skip_and_explain_folders_without_a_manifest(tiny_llama, docs, tmp_path, capsys):
    bridge, _ = tiny_llama
    cache = ActivationCache(tmp_path)
    run = cache.capture(bridge, docs, cfg())
    orphan = cache.runs_dir / "0123456789abcdef01234567"  # a capture killed before its first commit
    orphan.mkdir()
    (orphan / ".lock").touch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r.run_id for r in cache.list()] == [run.run_id]
    assert main(["cache", "list", "--cache-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert run.run_id[:12] in out and "0123456789ab" in out and "no committed shard" in out
    with pytest.raises(CacheError) as e:
        cache.open("zzz")
    assert run.run_id[:12] in str(e.value) and "0123456789ab" not in str(e.value)
    assert cache.open(run.run_id[:4]).run_id == run.run_id
    cache.rm("0123456789ab")  # the leftover can be removed by name
    assert not orphan.exists() and run.path.is_dir()


# --------------------------------------------------------------------------------- durability


def test_every_commit_point_fsyncs_the_directories_it_changed(tiny_llama, docs, tmp_path, monkeypatch):
    """A rename or a new folder is durable only once its parent directory is fsynced (what SQLite and LMDB
    do): before each manifest commit, every folder created and every file renamed since the last commit must
    have had its parent fsynced after the change, and the manifest's own folder after its rename."""
    bridge, _ = tiny_llama
    events: list[tuple[str, Path]] = []
    real_fsync, real_replace, real_mkdir = os.fsync, os.replace, os.mkdir

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst, *a, **kw):
        real_replace(src, dst, *a, **kw)
        events.append(("replace", Path(dst).resolve()))

    def mkdir(path, *a, **kw):
        real_mkdir(path, *a, **kw)
        events.append(("mkdir", Path(path).resolve()))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "mkdir", mkdir)
    ActivationCache(tmp_path).capture(bridge, docs, cfg(), batches_per_shard=2)
    monkeypatch.undo()

    commits = [i for i, (kind, p) in enumerate(events) if kind == "replace" and p.name == "manifest.json"]
    assert len(commits) >= 3  # several shards, then the "complete" flag
    start = 0
    for c in commits:
        window = events[start:c]
        for i, (kind, p) in enumerate(window):
            if kind in ("mkdir", "replace"):
                assert ("fsync", p.parent) in window[i + 1:], f"{kind} {p} committed without fsync of {p.parent}"
        nxt = events[c + 1:c + 2]
        assert nxt == [("fsync", events[c][1].parent)], f"manifest rename at event {c} not followed by a dir fsync"
        start = c + 1
    made = {p for kind, p in events if kind == "mkdir"}
    assert any(p.name == "blocks.0.hook_resid_post" for p in made) and any(p.name == "runs" for p in made)


def test_torchrun_recapture_repairs_a_rank_shard(tiny_dir, tmp_path):
    """Scale-out: each rank checks its own shards under a merged run and captures only what is damaged."""
    import subprocess
    import sys

    from tests.unit.test_cache_crash import ENV, REPO, texts

    tf = tmp_path / "texts.txt"
    tf.write_text("\n".join(texts(16)), encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "probekit",
           "capture", "--model", str(tiny_dir["llama"]), "--texts", str(tf), "--hooks", "blocks.0.hook_resid_post",
           "--batch-size", "2", "--max-length", "32", "--batches-per-shard", "1", "--cache-root", str(tmp_path)]
    first = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = ActivationCache(tmp_path).list()
    want, before = tree(run.path), mtimes(run.path)
    victim = run.path / "rank-1" / "acts" / "blocks.0.hook_resid_post" / "shard-00001.bin"
    victim.unlink()
    again = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    (run,) = ActivationCache(tmp_path).list()
    assert tree(run.path) == want and run.verify() == []
    after = mtimes(run.path)
    rel = str(victim.relative_to(run.path))
    assert {k: v for k, v in after.items() if k != rel} == {k: v for k, v in before.items() if k != rel}


def test_a_writer_waiting_on_a_failed_first_capture_locks_the_new_folder(tiny_llama, docs, tmp_path):
    """The failed writer removes the folder with its lock file; the waiting writer must not keep a lock on the
    removed file (a third writer would then lock a new one and two would write one run)."""
    import fcntl
    import threading

    bridge, _ = tiny_llama
    cache = ActivationCache(tmp_path)
    key = cache.key_for(bridge, docs, cfg())
    first = cache.writer(key)
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("w", cache.writer(key)))
    t.start()
    t.join(0.3)
    assert t.is_alive()  # waiting for the lock
    first.abort()  # nothing committed: the folder goes
    t.join(30)
    second = got["w"]
    with open(second.path / ".lock", "a+") as fh:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    second.abort()
    assert not second.path.exists()
