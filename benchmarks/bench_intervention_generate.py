"""Greedy generation under directional ablation: KV-cached ``greedy_decode`` vs recomputing every step.

Workload: a random-init Llama (d_model 256, 4 layers, 8 heads, byte vocabulary), a batch of 4 left-padded prompts of
24–32 tokens, 32 new tokens, the refusal-style ablation of one direction at every block's resid_pre, attn_out and
mlp_out (12 sites).

- cached: ``greedy_decode`` inside ``directional_ablation`` (one forward over the prompt, then one token a step;
  the position-tracking hooks apply the ablation to each new token);
- baseline: the same generation recomputing the whole sequence every step under the same ablation (what a model
  without a KV cache, e.g. a bridge without a plain twin, costs); the tokens must be identical;
- reference: ``greedy_decode`` with no intervention (hook overhead = cached / reference).

Run: ``python benchmarks/bench_intervention_generate.py [--repeats 3] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import interleaved_times  # noqa: E402

from probekit.interventions import directional_ablation, greedy_decode  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                         num_attention_heads=8, num_key_value_heads=4)).eval()
    lengths = [32, 30, 27, 24]
    P, T = max(lengths), args.new_tokens
    ids = torch.randint(3, 256, (len(lengths), P))
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        mask[r, P - n:] = 1
    ids = ids * mask
    r = torch.randn(256)

    @torch.inference_mode()
    def recompute():
        with directional_ablation(model, r) as m:
            x, mk = ids.clone(), mask.clone()
            out = []
            for _ in range(T):
                pos = (mk.cumsum(-1) - 1).clamp(min=0)
                nxt = m(input_ids=x, attention_mask=mk, position_ids=pos, use_cache=False).logits[:, -1].argmax(-1)
                out.append(nxt)
                x, mk = torch.cat([x, nxt[:, None]], 1), torch.cat([mk, torch.ones_like(mk[:, :1])], 1)
            return torch.stack(out, 1)

    def cached():
        with directional_ablation(model, r) as m:
            return greedy_decode(m, ids, mask, max_new_tokens=T)

    def clean():
        return greedy_decode(model, ids, mask, max_new_tokens=T)

    assert torch.equal(cached(), recompute()), "KV-cached and recomputed generations differ"
    times = interleaved_times({"cached": cached, "recompute": recompute, "clean": clean}, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"greedy generation of {T} tokens, batch {len(lengths)} x {P}-token prompts, ablation at 12 sites, "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"  recompute every step (baseline)   {med['recompute']:7.3f} s")
    speedup, overhead = med["recompute"] / med["cached"], med["cached"] / med["clean"]
    print(f"  greedy_decode, KV cache           {med['cached']:7.3f} s   speed-up {speedup:.2f}x")
    print(f"  greedy_decode, no intervention    {med['clean']:7.3f} s   hook overhead {overhead:.2f}x")


if __name__ == "__main__":
    main()
