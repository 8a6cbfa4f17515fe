"""Cost of the cache hardening (issue #19): directory fsyncs at every commit, and the shard check on reuse.

Figures (BENCHMARKS.md, "Cache hardening"):

1. commit: time to write a run through ``RunWriter`` (fsync of every file, of every folder a rename or a new
   folder changed, and of the manifest's folder) / the same writes with directory fsyncs switched off.
2. reuse: ``ActivationCache.capture`` of a run that is already complete — it now checks every committed
   shard (size + xxh3) so that damage is repaired — followed by reading every hook, / opening the run and
   reading every hook (the reader's own first-read xxh3 check included). The writer hands its verified files
   to the returned ``Run``, so nothing is hashed twice.

Synthetic activations from a plain module (no model download). Run: ``python benchmarks/bench_cache_hardening.py``
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _timing import interleaved_times

import probekit.cache as cache_mod
from probekit.cache import ActivationCache, Run
from probekit.capture import CaptureConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16384)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, args.width), torch.nn.ReLU(), torch.nn.Linear(args.width, 256))
    x = torch.randn(args.samples, 32)
    cfg = CaptureConfig(hooks=["0", "1", "2"], batch_size=1024, progress=False)
    tmp = Path(tempfile.mkdtemp(prefix="probekit-bench-"))
    real_fsync_dir = cache_mod._fsync_dir

    def write(dir_fsync: bool):
        def go():
            root = tmp / f"w{time.perf_counter_ns()}"
            cache_mod._fsync_dir = real_fsync_dir if dir_fsync else (lambda path: None)
            try:
                ActivationCache(root).capture(net, x, cfg, batches_per_shard=1)
            finally:
                cache_mod._fsync_dir = real_fsync_dir
            shutil.rmtree(root)
        return go

    commit = interleaved_times({"dir_fsync": write(True), "no_dir_fsync": write(False)}, args.repeats)

    root = tmp / "reuse"
    run = ActivationCache(root).capture(net, x, cfg, batches_per_shard=1)
    size = run.nbytes()

    def reuse_then_read():
        r = ActivationCache(root).capture(net, x, cfg, batches_per_shard=1)
        for h in r.hooks:
            r.load(h).sum()

    def open_then_read():
        r = Run(run.path)
        for h in r.hooks:
            r.load(h).sum()

    reuse = interleaved_times({"reuse": reuse_then_read, "open": open_then_read}, args.repeats)
    shutil.rmtree(tmp, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in {**commit, **reuse}.items()}
    print(f"{platform.machine()}, {torch.get_num_threads()} threads; run of {size / 2**20:.1f} MiB in "
          f"{len(run.manifest['shards'])} shards x {len(run.hooks) + 1} files; median of {args.repeats}")
    print(f"commit: with directory fsyncs {med['dir_fsync']:.3f} s, without {med['no_dir_fsync']:.3f} s, "
          f"ratio {med['dir_fsync'] / med['no_dir_fsync']:.3f}")
    print(f"reuse: capture() of the complete run + read every hook {med['reuse']:.3f} s, Run() + read every hook "
          f"{med['open']:.3f} s, ratio {med['reuse'] / med['open']:.3f}")


if __name__ == "__main__":
    main()
