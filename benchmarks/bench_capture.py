"""Capture cost against a bare forward, on the same batches of real code (SmolLM2-135M, CPU by default).

Figures (BENCHMARKS.md, "Capture"):
- capture of layer L of N, as a fraction of a bare full forward (the plain HF model, no hooks), against the
  bound 1.15 × (L+1)/N;
- capture of every layer's residual stream: throughput relative to the bare forward (target ≥ 0.75);
- TransformerBridge ``run_with_cache`` of the same 30 sites on the same batches, for comparison.

Run: ``python benchmarks/bench_capture.py [--docs 32] [--repeats 3] [--device cpu]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from _timing import interleaved_times

from probekit.capture import CaptureConfig, NullWriter, _batches, capture
from probekit.data.code import iter_stdlib_functions
from probekit.models import load_hf, load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = args.device

    bridge, tok = load_model(args.model, device=dev)
    bare, _, _ = load_hf(args.model, device=dev)  # an untouched HF model: no bridge, no hooks
    n = bridge.cfg.n_layers
    src = [s.source for s in iter_stdlib_functions(max_functions=args.docs, seed=1)]
    docs = [ids for ids in tok(src, truncation=True, max_length=args.max_length)["input_ids"]]
    lengths = [len(d) for d in docs]
    tokens = sum(lengths)
    pad = tok.pad_token_id
    batches = []
    for b in _batches(lengths, args.batch_size, sort=True):  # the same buckets capture() makes
        P = max(lengths[i] for i in b)
        ids = torch.full((len(b), P), pad)
        mask = torch.zeros((len(b), P), dtype=torch.long)
        for r, i in enumerate(b):
            ids[r, : lengths[i]] = torch.tensor(docs[i])
            mask[r, : lengths[i]] = 1
        batches.append((ids.to(dev), mask.to(dev)))

    def sync():
        if dev.startswith("cuda"):
            torch.cuda.synchronize()

    def bare_forward():
        with torch.inference_mode():
            for ids, mask in batches:
                bare(input_ids=ids, attention_mask=mask)

    resid = [f"blocks.{l}.hook_resid_post" for l in range(n)]

    def run_with_cache():
        with torch.inference_mode():
            for ids, mask in batches:
                bridge.run_with_cache(ids, attention_mask=mask, names_filter=lambda x: x in resid)

    def cap(hooks):
        return lambda: capture(bridge, docs, CaptureConfig(hooks=hooks, batch_size=args.batch_size,
                                                           max_length=args.max_length, progress=False),
                               writer=NullWriter())

    layers = sorted({0, n // 4, n // 2, (3 * n) // 4, n - 1})
    methods = {"bare": bare_forward, "run_with_cache": run_with_cache, "capture_all": cap(resid)}
    methods.update({f"capture_L{l}": cap([f"blocks.{l}.hook_resid_post"]) for l in layers})

    times = interleaved_times(methods, args.repeats, sync)
    med = {k: statistics.median(v) for k, v in times.items()}

    base = med["bare"]
    device_name = torch.cuda.get_device_name() if dev.startswith("cuda") else platform.processor() or platform.machine()
    print(f"device {dev} ({device_name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{args.docs} docs, {tokens} tokens, batch {args.batch_size}, median of {args.repeats}")
    print(f"bare forward: {base:.3f} s = {tokens / base:,.0f} tokens/s")
    rows = {}
    for l in layers:
        r = med[f"capture_L{l}"] / base
        bound = 1.15 * (l + 1) / n
        rows[f"L{l}"] = dict(ratio=r, bound=bound, ok=r <= bound)
        print(f"capture layer {l:>2} of {n}: {r:.3f} × bare   (bound 1.15·(L+1)/N = {bound:.3f})  "
              f"{'OK' if r <= bound else 'OVER'}")
    thr_all = base / med["capture_all"]
    thr_rwc = base / med["run_with_cache"]
    print(f"capture all {n} layers: throughput {thr_all:.3f} × bare  (target ≥ 0.75)  {'OK' if thr_all >= 0.75 else 'UNDER'}")
    print(f"run_with_cache, same {n} sites: throughput {thr_rwc:.3f} × bare;  capture / run_with_cache speed-up "
          f"{med['run_with_cache'] / med['capture_all']:.2f}×")
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "capture.json").write_text(json.dumps(dict(device=dev, device_name=device_name, tokens=tokens,
                                                      median_seconds=med, per_layer=rows,
                                                      all_layers_throughput=thr_all,
                                                      run_with_cache_throughput=thr_rwc), indent=2))


if __name__ == "__main__":
    main()
