"""CE splices of the dark-matter run: one shared clean and zero-ablated pass vs a separate ``ce_recovered`` per splice.

Workload: the run's nine splices at SmolLM2-135M's ``blocks.15.hook_resid_post`` — for each of three TopK SAE widths
(2×, 4×, 8× d = 576, k = 32, random init: the cost does not depend on training) x̂, x̂ + linear error and
x̂ + nonlinear error (``W*`` a random (d, d) matrix) — over ``--docs`` stdlib functions in batches of 8.

- shared: one ``ce_recovered_many`` call (per batch: 1 clean + 1 zero + 9 spliced forwards = 11);
- baseline: nine ``ce_recovered`` calls (each: clean + zero + spliced = 3 forwards, 27 in all), what the run did
  before.

Both run once as a warm-up, then ``--repeats`` interleaved rounds; medians are reported, and the CE values of the
two sides are compared (they must agree to float64 rounding).

Run: ``python benchmarks/bench_ce_splices.py [--docs 4] [--repeats 1] [--threads 2]``; writes
``benchmarks/out/ce_splices.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved_times  # noqa: E402

from probekit.capture import tokenize  # noqa: E402
from probekit.dark_matter_run import _splices, _token_batches  # noqa: E402
from probekit.data.code import iter_stdlib_functions  # noqa: E402
from probekit.models import load_model  # noqa: E402
from probekit.probes.sae import SAE, SAEConfig, ce_recovered, ce_recovered_many  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    bridge, tok = load_model(args.model)
    d = bridge.cfg.d_model
    hook = f"blocks.{bridge.cfg.n_layers // 2}.hook_resid_post"
    docs = tokenize(tok, [s.source for s in iter_stdlib_functions(max_functions=args.docs, seed=0)], max_length=256)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    splices = {}
    for e in (2, 4, 8):
        sae = SAE(SAEConfig(d_in=d, d_sae=e * d, architecture="topk", k=32, hook_name=hook)).eval()
        W = torch.randn(d, d) / d
        splices.update(_splices(e * d, sae, W, torch.zeros(d), "cpu"))
    out: dict[str, dict] = {}

    def shared():
        with torch.no_grad():
            out["shared"] = {k: r.ce_sae for k, r in ce_recovered_many(bridge, _token_batches(docs, pad), hook,
                                                                        splices).items()}

    def separate():
        with torch.no_grad():
            out["separate"] = {k: ce_recovered(bridge, _token_batches(docs, pad), hook, f).ce_sae
                               for k, f in splices.items()}

    times = interleaved_times({"shared": shared, "separate": separate}, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    gap = max(abs(out["shared"][k] - out["separate"][k]) for k in splices)
    n_tok = sum(len(x) for x in docs)
    print(f"{len(splices)} CE splices at {hook} of {args.model}, {len(docs)} stdlib functions ({n_tok} tokens), "
          f"batches of 8")
    print(f"machine: {platform.platform()}, {platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"  shared clean/zero (ce_recovered_many, 11 forwards a batch)  {med['shared']:7.2f} s")
    print(f"  separate ce_recovered per splice (27 forwards a batch)        {med['separate']:7.2f} s")
    print(f"  ratio separate / shared = {med['separate'] / med['shared']:.2f}x   (forward-count ratio 27/11 = 2.45)")
    print(f"  max |CE shared - CE separate| = {gap:.1e} nats")
    dest = Path(__file__).parent / "out" / "ce_splices.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(dict(model=args.model, hook=hook, docs=len(docs), tokens=n_tok, seconds=med,
                                    ratio=med["separate"] / med["shared"], max_abs_gap=gap), indent=2))


if __name__ == "__main__":
    main()
