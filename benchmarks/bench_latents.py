"""The latent-statistics job (:func:`probekit.latents.compute_latent_stats`) against its floor: one streaming
``SAE.encode`` pass over the same rows (the cost of reading the cache and encoding, with nothing kept).

Workload (SmolLM2-sized): a synthetic cache run of ``--rows`` token rows (documents of 128 tokens) at one hook of
width ``--d-in`` 576, float32 shards in a temporary folder (page cache warm); a TopK SAE with ``--d-sae`` latents
(k = 32, random weights, unit decoder rows), a random ``(d_in, --vocab)`` unembedding for the logit effects.
Ratio printed: job time / encode-only time (the overhead of everything the latent pages need). Times are
medians of interleaved repeats after a warm-up (benchmarks/_timing.py).

Run: ``python benchmarks/bench_latents.py [--rows 20000] [--d-sae 4608] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> int:
    from _timing import interleaved_times

    from probekit.cache import ActivationCache, RunKey
    from probekit.latents import LatentStatsConfig, compute_latent_stats, encode_nonzero
    from probekit.probes.sae import SAE, SAEConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--vocab", type=int, default=49_152)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tmp = Path(tempfile.mkdtemp(prefix="probekit-bench-latents-"))
    hook = "blocks.3.hook_resid_post"
    g = torch.Generator().manual_seed(0)
    cache = ActivationCache(tmp)
    key = RunKey(model="synthetic", weights="bench", dataset="bench-latents", hooks=(hook,), positions="all",
                 dtype="float32", max_length=128, batch_size=8, sort_by_length=False, batches_per_shard=16)
    w = cache.writer(key)
    L = 128
    for d in range(args.rows // L):
        w.write({hook: torch.randn(L, args.d_in, generator=g)},
                dict(doc_index=torch.full((L,), d), position=torch.arange(L),
                     token_id=torch.randint(0, args.vocab, (L,), generator=g)))
    w.close()
    run = cache.open(key.run_id)
    sae = SAE(SAEConfig(d_in=args.d_in, d_sae=args.d_sae, architecture="topk", k=32, seed=0)).eval()
    unembed = torch.randn(args.d_in, args.vocab, generator=g) / args.d_in ** 0.5
    cfg = LatentStatsConfig(out=str(tmp / "out"), exclude_positions=(0,))
    times = interleaved_times({
        "encode only (floor)": lambda: encode_nonzero(run, sae, hook, chunk_rows=cfg.chunk_rows),
        "latent-statistics job": lambda: compute_latent_stats(run, sae, hook, cfg, unembed=unembed, progress=False),
    }, args.repeats)
    med = {k: float(np.median(v)) for k, v in times.items()}
    ratio = med["latent-statistics job"] / med["encode only (floor)"]
    out = dict(rows=run.n_rows, d_in=args.d_in, d_sae=args.d_sae, vocab=args.vocab, seconds=med,
               rows_per_s_job=round(run.n_rows / med["latent-statistics job"], 1),
               ratio_job_over_encode=round(ratio, 2),
               machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                       f"{torch.get_num_threads()} threads")
    (REPO / "benchmarks" / "out").mkdir(parents=True, exist_ok=True)
    (REPO / "benchmarks" / "out" / "latents.json").write_text(json.dumps(out, indent=2))
    for k, v in med.items():
        print(f"{k:24s} {v:7.2f} s  ({run.n_rows / v:,.0f} rows/s)")
    print(f"job / encode-only: {ratio:.2f}×  ({run.n_rows:,} rows, d_in {args.d_in}, d_sae {args.d_sae})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
