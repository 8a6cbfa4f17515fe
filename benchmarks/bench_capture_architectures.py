"""Capture cost on each architecture family against its bare forward (tiny-but-not-trivial random-init models).

Figure (BENCHMARKS.md, "Capture across architectures"): per family (4 layers, d_model 256, 4 heads, byte
vocabulary), the time to capture every layer's ``hook_resid_post`` on the same documents, as a ratio to the bare
HF forward of an untouched copy of the model (no bridge, no hooks, the default attention kernel), by the
automatic mechanism (plain module hooks where probekit maps the family), by the bridge's hook points, and the
bridge's ``run_with_cache``; plus the bare forward with the attention kernel the bridge sets (eager), which
capture also runs, to separate the kernel's cost from the hooks'. Times are the best of interleaved rounds:
on a shared machine the minimum is the least disturbed run.

Run: ``python benchmarks/bench_capture_architectures.py [--docs 8] [--repeats 5] [--threads 1]
[--families gpt2 llama …]`` (BENCHMARKS.md used ``--docs 4 --max-length 96 --repeats 7``).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import torch

from _timing import interleaved_times

from probekit.capture import CaptureConfig, NullWriter, _batches, capture
from probekit.models import load_hf, load_model, plain_model
from probekit.testing import FAMILIES, make_tiny_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.max_length // 2, args.max_length + 1, (args.docs,), generator=gen).tolist()
    docs = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]  # byte ids
    tokens = sum(lengths)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; "
          f"{args.docs} docs, {tokens} tokens, batch {args.batch_size}; {args.layers} layers, d_model {args.d_model}; "
          f"best of {args.repeats} interleaved rounds (robust to a shared machine; load average "
          f"{os.getloadavg()[0]:.1f} at start), ratios to the bare HF forward")
    print(f"{'family':<10} {'bare ms':>8} {'bare, eager':>12} {'auto':>14} {'bridge hooks':>13} {'run_with_cache':>15}")
    with tempfile.TemporaryDirectory() as tmp:
        for fam in args.families:
            path = make_tiny_model(Path(tmp) / fam, arch=fam, n_layers=args.layers, d_model=args.d_model)
            bridge, tok = load_model(str(path))
            bare, _, _ = load_hf(str(path))
            eager, _, _ = load_hf(str(path))  # the attention kernel the bridge (and so capture) runs
            eager.set_attn_implementation(plain_model(bridge).config._attn_implementation)
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            batches = []
            for b in _batches(lengths, args.batch_size, sort=True):  # the buckets capture() makes
                P = max(lengths[i] for i in b)
                ids = torch.full((len(b), P), pad)
                mask = torch.zeros((len(b), P), dtype=torch.long)
                for r, i in enumerate(b):
                    ids[r, : lengths[i]] = torch.tensor(docs[i])
                    mask[r, : lengths[i]] = 1
                batches.append((ids, mask))
            resid = [f"blocks.{l}.hook_resid_post" for l in range(args.layers)]
            cfg = CaptureConfig(hooks=resid, batch_size=args.batch_size, max_length=args.max_length, progress=False)
            mech = capture(bridge, docs[:1], cfg, writer=NullWriter()).mechanism

            def bare_forward():
                with torch.inference_mode():
                    for ids, mask in batches:
                        bare(input_ids=ids, attention_mask=mask)

            def bare_eager():
                with torch.inference_mode():
                    for ids, mask in batches:
                        eager(input_ids=ids, attention_mask=mask)

            def run_with_cache():
                with torch.inference_mode():
                    for ids, mask in batches:
                        bridge.run_with_cache(ids, attention_mask=mask, names_filter=lambda x: x in resid)

            methods = {
                "bare": bare_forward,
                "bare_eager": bare_eager,
                "auto": lambda: capture(bridge, docs, cfg, writer=NullWriter()),
                "bridge": lambda: capture(bridge, docs, cfg, writer=NullWriter(), mechanism="bridge"),
                "run_with_cache": run_with_cache,
            }
            t = {k: min(v) for k, v in interleaved_times(methods, args.repeats).items()}
            r = {k: t[k] / t["bare"] for k in t}
            print(f"{fam:<10} {1e3 * t['bare']:>8.1f} {r['bare_eager']:>11.2f}× {r['auto']:>7.2f}× {mech:<5} "
                  f"{r['bridge']:>12.2f}× "
                  f"{r['run_with_cache']:>14.2f}×", flush=True)
            del bridge, bare, eager
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
