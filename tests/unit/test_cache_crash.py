"""Crash safety (SIGKILL at random points, then resume) and torchrun scale-out, in real subprocesses."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import torch

from probekit.cache import ActivationCache, Run

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "OMP_NUM_THREADS": "1"}


def texts(n: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(f"v{rng.randint(0, 99)} = {rng.randint(0, 9)}" for _ in range(rng.randint(1, 9))) for _ in range(n)]


def child(model_dir, texts_file, root, *extra):
    return subprocess.Popen([sys.executable, "-m", "tests.unit._capture_child", str(model_dir), str(texts_file),
                             str(root), *extra], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)


def files_of(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_sigkill_at_random_points_then_resume_is_bitwise_identical(tiny_dir, tmp_path):
    tf = tmp_path / "texts.txt"
    tf.write_text("\n\x00\n".join(texts(80)), encoding="utf-8")
    ref = child(tiny_dir["llama"], tf, tmp_path / "ref")
    assert ref.wait(timeout=300) == 0
    (ref_run,) = ActivationCache(tmp_path / "ref").list()

    rng = random.Random(1234)
    killed_mid_run = 0
    for _ in range(5):
        p = child(tiny_dir["llama"], tf, tmp_path / "kill", "--slow")
        assert p.stdout.readline().strip() == "ready"
        import time

        time.sleep(rng.uniform(0.05, 0.6))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            runs = list((tmp_path / "kill" / "runs").glob("*"))
            m = runs[0] / "manifest.json" if runs else None
            if m is None or not m.is_file() or not Run(runs[0]).complete:
                killed_mid_run += 1
                if m is not None and m.is_file():
                    Run(runs[0]).load("blocks.0.hook_resid_post")  # whatever is committed reads cleanly
        else:
            p.wait()
    assert killed_mid_run >= 2, "the kills should interrupt the capture at least twice"
    final = child(tiny_dir["llama"], tf, tmp_path / "kill")
    assert final.wait(timeout=300) == 0
    (run,) = ActivationCache(tmp_path / "kill").list()
    assert run.run_id == ref_run.run_id and run.complete
    got, want = files_of(run.path), files_of(ref_run.path)
    assert sorted(got) == sorted(want)  # no stray temp files, no missing shards
    for rel in want:
        assert got[rel] == want[rel], rel
    assert run.verify() == []


def test_torchrun_two_processes_equal_one_process(tiny_dir, tmp_path):
    tf = tmp_path / "texts.txt"
    tf.write_text("\n".join(texts(30)), encoding="utf-8")
    args = ["-m", "probekit", "capture", "--model", str(tiny_dir["llama"]), "--texts", str(tf), "--hooks",
            "blocks.0.hook_resid_post", "blocks.2.attn.hook_z", "--batch-size", "2", "--max-length", "64",
            "--dtype", "bfloat16", "--batches-per-shard", "2"]
    one = subprocess.run([sys.executable, *args, "--cache-root", str(tmp_path / "one")], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          *args, "--cache-root", str(tmp_path / "two")], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    (r1,) = ActivationCache(tmp_path / "one").list()
    (r2,) = ActivationCache(tmp_path / "two").list()
    assert r2.complete and {s["rank"] for s in r2.manifest["shards"]} == {0, 1}
    assert (r2.path / "rank-0").is_dir() and (r2.path / "rank-1").is_dir()
    assert r1.n_rows == r2.n_rows
    m1, m2 = r1.meta_tensors(), r2.meta_tensors()
    o1 = torch.argsort(m1["doc_index"] * 1000 + m1["position"])
    o2 = torch.argsort(m2["doc_index"] * 1000 + m2["position"])
    assert not torch.equal(m2["doc_index"], m1["doc_index"])  # the order differs and is recorded
    for k in m1:
        assert torch.equal(m1[k][o1], m2[k][o2])
    for h in r1.hooks:
        a, b = r1.load(h)[o1], r2.load(h)[o2]
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), h  # bitwise
    assert r2.verify() == []
    shown = json.loads(subprocess.run([sys.executable, "-m", "probekit", "cache", "show", r2.run_id[:10],
                                       "--cache-root", str(tmp_path / "two")], cwd=REPO, env=ENV,
                                      capture_output=True, text=True).stdout)
    assert shown["rows"] == r2.n_rows and shown["complete"]
