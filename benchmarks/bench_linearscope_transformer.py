"""TransformerLinearScope: the cost of the reconstruction check that runs on every call.

Figure: time of ``token_contributions`` (one exact per-token split of a logit beside gradient × input) with the
check (the real stream compared with the model's own forward and with the probe stream at x¹ = x⁰) against the
same call with the check replaced by a no-op (the baseline), same model, same prompt, interleaved rounds. Also
the relative errors the check sees (float64 and float32).

Run: ``python benchmarks/bench_linearscope_transformer.py [--model smollm2-135m] [--repeats 5]``; writes
``benchmarks/out/linearscope_transformer.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from _timing import interleaved_times
from probekit.models import load_model
from probekit.probes.linearscope_transformer import TransformerLinearScope

PROMPT = "def add(a, b):\n    return a +"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bridge, tok = load_model(args.model)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"][0]
    out: dict = {"machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
                 "model": args.model, "tokens": int(len(ids)), "timing": {}, "reconstruction": {}}
    for dtype in (torch.float64, torch.float32):
        name = str(dtype).removeprefix("torch.")
        checked = TransformerLinearScope(bridge, dtype=dtype)
        out["reconstruction"][name] = checked.reconstruction(ids)
        unchecked = TransformerLinearScope(bridge, dtype=dtype)
        unchecked._check = lambda x0, dec: None  # the baseline: the same interpreter without the per-call check
        target = int(checked.decisions(checked.embed(ids))["logits"][-1].argmax())
        t = interleaved_times({"checked": lambda: checked.token_contributions(ids, target),
                               "unchecked": lambda: unchecked.token_contributions(ids, target)}, args.repeats)
        med = {k: statistics.median(v) for k, v in t.items()}
        out["timing"][name] = {**{f"{k}_median_s": v for k, v in med.items()},
                               "ratio_checked_over_unchecked": med["checked"] / med["unchecked"]}
        rec = out["reconstruction"][name]
        print(f"{args.model} {name}: token_contributions {med['checked']:.3f} s with the check vs "
              f"{med['unchecked']:.3f} s without (×{med['checked'] / med['unchecked']:.2f}); relative error vs the HF "
              f"forward {rec['hf_relative_error']:.1e}, probe vs real stream {rec['relative_error']:.1e}")
    path = Path(__file__).parent / "out" / "linearscope_transformer.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
