"""Reading the activation cache: raw disk-format reads, minibatch iteration, and the device tier.

Builds a synthetic run (one bf16 hook of ``--dim`` columns, about ``--mb`` MiB, several shards) with the real
``RunWriter`` in a temporary folder outside the repo, with the page cache warm, then measures:

- Figure 1: ``run.load(hook)`` of every row into one in-memory tensor, against ``numpy.fromfile`` of the same
  shard files (the same bytes into memory, no checks). With a fresh ``Run`` each repeat (so the once-per-process
  xxh3 check of every shard is included) and with the check already done (second read). Target ≥ 0.8.
- Figure 2: block-shuffled minibatches from ``DeviceCache`` on the CPU (hook resident, and streamed from the
  memory map) against sequential minibatches of the same rows (``run.load`` slices), each cast to float32 as for
  training. Target ≥ 0.5.
- Figure 3, where CUDA is available: the same minibatches on the GPU (resident and streamed), rows/s.

Times are the best of ``--repeats`` interleaved runs (the machine may be shared; medians are in the JSON).

Run: ``python benchmarks/bench_cache_read.py [--mb 256] [--batch-size 1024] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _timing import interleaved_times

from probekit.cache import ActivationCache, Run, RunKey
from probekit.device_cache import DeviceCache

HOOK = "blocks.6.hook_resid_post"
MEDIANS: dict[str, float] = {}


def build_run(root: Path, mb: int, dim: int, rows_per_write: int, batches_per_shard: int) -> Run:
    n = (mb << 20) // (dim * 2)
    key = RunKey(model="synthetic", weights="none", dataset=f"bench-{n}x{dim}", hooks=(HOOK,), positions="all",
                 dtype="bfloat16", max_length=0, batch_size=rows_per_write, sort_by_length=False,
                 batches_per_shard=batches_per_shard)
    w = ActivationCache(root).writer(key)
    g = torch.Generator().manual_seed(0)
    for i in range(0, n, rows_per_write):
        m = min(rows_per_write, n - i)
        zeros = torch.zeros(m, dtype=torch.long)
        w.write({HOOK: torch.randn((m, dim), generator=g).bfloat16()},
                {"doc_index": torch.arange(i, i + m), "position": zeros, "token_id": zeros})
    w.close()
    return Run(w.path)


def timed(methods: dict, repeats: int, sync=lambda: None) -> dict[str, float]:
    """Best (minimum) seconds per method, the least disturbed on a shared machine; repeats interleaved so drift
    hits every method alike. Medians go to ``MEDIANS`` for the JSON."""
    times = interleaved_times(methods, repeats, sync)
    MEDIANS.update({k: statistics.median(v) for k, v in times.items()})
    return {k: min(v) for k, v in times.items()}


def epoch(dc: DeviceCache, bs: int, shuffle: bool, **kw):
    def f():
        for _ in dc.batches(HOOK, bs, shuffle=shuffle, dtype=torch.float32, **kw):
            pass
    return f


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256, help="size of the synthetic hook, MiB")
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--rows-per-write", type=int, default=8192)
    ap.add_argument("--batches-per-shard", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--block-bytes", type=int, default=1 << 20)
    ap.add_argument("--buffer-blocks", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cpu_name = platform.processor() or platform.machine()
    results: dict = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu=cpu_name)
    with tempfile.TemporaryDirectory(prefix="probekit-bench-") as tmp:
        t0 = time.perf_counter()
        run = build_run(Path(tmp), args.mb, args.dim, args.rows_per_write, args.batches_per_shard)
        n, nbytes = run.n_rows, run.n_rows * args.dim * 2
        shards = [run.path / s["files"][HOOK]["path"] for s in run.manifest["shards"]]
        assert len(shards) > 1  # so run.load(hook) returns a new in-memory tensor (torch.cat), like fromfile
        print(f"device cpu ({cpu_name}), torch {torch.__version__}, threads {torch.get_num_threads()}; run of "
              f"{n:,} rows x {args.dim} bf16 = {nbytes / 2**20:.0f} MiB in {len(shards)} shards "
              f"(built in {time.perf_counter() - t0:.1f} s), best of {args.repeats}")
        results.update(rows=n, dim=args.dim, bytes=nbytes, shards=len(shards))

        # ---- Figure 1: whole-hook read vs numpy.fromfile
        warm = Run(run.path)
        warm.load(HOOK)  # xxh3 done for `warm`: later loads are the read alone
        best = timed({
            "fromfile": lambda: [np.fromfile(p, dtype=np.uint16) for p in shards],
            "load_fresh_run": lambda: Run(run.path).load(HOOK),
            "load_verified": lambda: warm.load(HOOK),
        }, args.repeats)
        gbs = {k: nbytes / v / 1e9 for k, v in best.items()}
        r_fresh, r_warm = best["fromfile"] / best["load_fresh_run"], best["fromfile"] / best["load_verified"]
        print(f"fig1 read all rows: numpy.fromfile {gbs['fromfile']:.2f} GB/s; run.load fresh Run (xxh3 incl.) "
              f"{gbs['load_fresh_run']:.2f} GB/s, second read {gbs['load_verified']:.2f} GB/s")
        print(f"fig1 ratio run.load / fromfile: {r_fresh:.3f} with xxh3 check, {r_warm:.3f} without  "
              f"(target ≥ 0.8)  {'OK' if r_fresh >= 0.8 else 'UNDER'} / {'OK' if r_warm >= 0.8 else 'UNDER'}")
        results["fig1"] = dict(best_seconds=best, gb_per_s=gbs, ratio_with_check=r_fresh,
                               ratio_without_check=r_warm)

        # ---- Figure 2: block-shuffled minibatches vs sequential, CPU
        bs, kw = args.batch_size, dict(block_bytes=args.block_bytes, buffer_blocks=args.buffer_blocks)
        resident = DeviceCache(run, device="cpu", budget_gb=2 * nbytes / 2**30)
        t0 = time.perf_counter()
        resident.get(HOOK)
        t_resident = time.perf_counter() - t0
        streamed = DeviceCache(run, device="cpu", budget_gb=0.5 * nbytes / 2**30)  # the hook does not fit

        def sequential_loads():
            for i in range(0, n, bs):
                warm.load(HOOK, slice(i, i + bs)).to(torch.float32)

        best = timed({
            "sequential_run_load": sequential_loads,
            "resident_sequential": epoch(resident, bs, False, **kw),
            "resident_shuffled": epoch(resident, bs, True, **kw),
            "streamed_sequential": epoch(streamed, bs, False, **kw),
            "streamed_shuffled": epoch(streamed, bs, True, **kw),
        }, args.repeats)
        assert streamed.resident == [] and resident.resident == [HOOK]
        rps = {k: n / v for k, v in best.items()}
        base = rps["sequential_run_load"]
        print(f"fig2 minibatches of {bs} rows -> float32 on cpu, rows/s: sequential run.load slices {base:,.0f}; "
              f"resident seq {rps['resident_sequential']:,.0f} / shuffled {rps['resident_shuffled']:,.0f}; "
              f"streamed seq {rps['streamed_sequential']:,.0f} / shuffled {rps['streamed_shuffled']:,.0f} "
              f"(making the hook resident took {t_resident:.2f} s)")
        fig2 = {}
        for path in ("resident", "streamed"):
            r = rps[f"{path}_shuffled"] / base
            r_same = rps[f"{path}_shuffled"] / rps[f"{path}_sequential"]
            fig2[path] = dict(ratio_vs_sequential_loads=r, ratio_vs_same_path_sequential=r_same)
            print(f"fig2 ratio block-shuffled {path} / sequential minibatches: {r:.3f}  (target ≥ 0.5)  "
                  f"{'OK' if r >= 0.5 else 'UNDER'};  vs {path} sequential: {r_same:.3f}")
        results["fig2"] = dict(batch_size=bs, rows_per_block=resident.rows_per_block(HOOK, args.block_bytes),
                               buffer_blocks=args.buffer_blocks, best_seconds=best, rows_per_s=rps,
                               resident_load_seconds=t_resident, **fig2)

        # ---- Figure 3: the device tier on CUDA
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name()
            on_gpu = DeviceCache(run, device="cuda", budget_gb=2 * nbytes / 2**30)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            on_gpu.get(HOOK)
            torch.cuda.synchronize()
            t_up = time.perf_counter() - t0
            gpu_stream = DeviceCache(run, device="cuda", budget_gb=0.5 * nbytes / 2**30)
            best = timed({"cuda_resident_shuffled": epoch(on_gpu, bs, True, **kw),
                         "cuda_streamed_shuffled": epoch(gpu_stream, bs, True, **kw)},
                        args.repeats, sync=torch.cuda.synchronize)
            rps = {k: n / v for k, v in best.items()}
            print(f"fig3 cuda ({gpu}): block-shuffled minibatches of {bs} -> float32, rows/s: resident "
                  f"{rps['cuda_resident_shuffled']:,.0f}, streamed {rps['cuda_streamed_shuffled']:,.0f}; "
                  f"upload of the hook {nbytes / t_up / 1e9:.2f} GB/s; streamed / resident "
                  f"{rps['cuda_streamed_shuffled'] / rps['cuda_resident_shuffled']:.3f}")
            results["fig3"] = dict(device_name=gpu, best_seconds=best, rows_per_s=rps, upload_seconds=t_up)
        else:
            print("fig3 device tier on CUDA: no CUDA in this process, skipped")
            results["fig3"] = None

    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    results["median_seconds"] = MEDIANS
    (out / "cache_read.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
