"""Capture-to-cache overhead: the same capture written into the activation cache vs discarded.

Figure (BENCHMARKS.md, "Cache"): time(capture → ActivationCache) / time(capture → NullWriter), same batches,
SmolLM2-135M, all 30 ``hook_resid_post`` sites in bf16. The cache path includes sha256 + xxh3 of every shard,
fsync of every file and every manifest commit.

Run: ``python benchmarks/bench_cache_write.py [--docs 24] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _timing import interleaved_times

from probekit.cache import ActivationCache
from probekit.capture import CaptureConfig, NullWriter, capture, tokenize
from probekit.data.code import iter_stdlib_functions
from probekit.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--docs", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches-per-shard", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    bridge, tok = load_model(args.model, device=args.device)
    n = bridge.cfg.n_layers
    cfg = CaptureConfig(hooks=[f"blocks.{l}.hook_resid_post" for l in range(n)], batch_size=8, max_length=256,
                        dtype="bfloat16", progress=False)
    docs = tokenize(tok, [s.source for s in iter_stdlib_functions(max_functions=args.docs, seed=2)],
                    max_length=cfg.max_length)
    tmp = Path(tempfile.mkdtemp(prefix="probekit-bench-"))

    def to_null():
        capture(bridge, docs, cfg, writer=NullWriter())

    def to_cache():
        root = tmp / f"c{time.perf_counter_ns()}"
        run = ActivationCache(root).capture(bridge, docs, cfg, batches_per_shard=args.batches_per_shard)
        stats["bytes"] = run.nbytes()
        stats["shards"] = len(run.manifest["shards"])
        shutil.rmtree(root)

    stats: dict = {}
    times = interleaved_times({"null": to_null, "cache": to_cache}, args.repeats)
    shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["cache"] / med["null"]
    tokens = sum(map(len, docs))
    print(f"device {args.device} ({platform.machine()}), {args.docs} docs, {tokens} tokens, {n} hooks bf16, "
          f"{stats['bytes'] / 2**20:.1f} MiB in {stats['shards']} shards, median of {args.repeats}")
    print(f"capture → nothing: {med['null']:.2f} s;  capture → cache: {med['cache']:.2f} s;  "
          f"overhead ratio {ratio:.3f} ({stats['bytes'] / 2**20 / med['cache']:.1f} MiB/s written)")
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "cache_write.json").write_text(json.dumps(dict(median_seconds=med, ratio=ratio, **stats), indent=2))


if __name__ == "__main__":
    main()
