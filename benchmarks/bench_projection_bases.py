"""Safety weight run: projected models from the shared basis bank vs one SVD per projected model.

Workload: the projection grid of ``WeightRunConfig`` (default 3 bases x 5 rank fractions x 2 variants = 30 models)
over the 2-D weight matrices of the first ``--layers`` blocks of a random-init Llama with SmolLM2-135M's shapes
(d = 576, MLP 1,536, 9 query / 3 key-value heads of 64: q/o 576 x 576, k/v 192 x 576, gate/up 1,536 x 576,
down 576 x 1,536; vocab 49,152, tied embeddings, not projected). The alignment and fine-tuning updates are each
a rank-32 part plus small Gaussian noise (full rank numerically, with a decaying spectrum, like a fine-tune's).
Every model is written into the same ``nn.Module``, as the run does.

- shared bank (what ``run_weight_space`` does): ``safety_run._bank`` — one ``update_bases`` call, hence one
  decomposition, per matrix and basis kind for all fractions — then ``safety_run._load_projection`` per model;
- baseline: ``weight_space.project_into`` per model, which recomputes the basis (an SVD, or a randomized range
  finder at small ``k``) of every matrix for each model.

Both sides run once as a warm-up, then ``--repeats`` interleaved rounds; medians are reported. The projected
weights of both sides are compared on one (fraction, variant) per basis kind: the ``svd``/``random`` bases of the
bank come from one decomposition at the largest fraction, the baseline's from one at the model's own fraction
(randomized at small ``k``), so they agree to the randomized finder's accuracy, not bit for bit.

Run: ``python benchmarks/bench_projection_bases.py [--layers 1] [--repeats 1] [--threads 2]``; writes
``benchmarks/out/projection_bases.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved_times  # noqa: E402

from probekit import safety_run as sr  # noqa: E402
from probekit.probes.weight_space import matrix_keys, project_into  # noqa: E402

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    head_dim=64, vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5)


def _update(shape: tuple[int, ...], g: torch.Generator, rank: int = 32, scale: float = 1e-3) -> torch.Tensor:
    """A fine-tune-like update: a rank-``rank`` part plus noise at a tenth of its entry size."""
    m, n = shape
    low = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / rank**0.5
    return scale * (low + 0.1 * torch.randn(m, n, generator=g))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=1, help="blocks of SmolLM2's shapes to project (30 in the model)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=args.layers, **SMOLLM2_135M)).eval()
    g = torch.Generator().manual_seed(0)
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    keys = matrix_keys(base_sd)
    aligned_sd = {k: v + _update(v.shape, g) if k in keys else v for k, v in base_sd.items()}
    finetuned_sd = {k: v + _update(v.shape, g) if k in keys else v for k, v in aligned_sd.items()}
    model.load_state_dict(finetuned_sd)
    cfg = sr.WeightRunConfig(progress=False)
    grid = [(b, f, v) for b in cfg.bases for f in cfg.fractions for v in cfg.variants]
    shapes = sorted({tuple(base_sd[k].shape) for k in keys})
    print(f"{len(grid)} projected models ({len(cfg.bases)} bases x {len(cfg.fractions)} fractions x "
          f"{len(cfg.variants)} variants) of {len(keys)} matrices: the first {args.layers} of SmolLM2-135M's 30 "
          f"blocks (shapes {', '.join('x'.join(map(str, s)) for s in shapes)}), random init, float32 weights, "
          f"float64 maths")
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    last: dict = {}

    def banked():
        t0 = time.perf_counter()
        bank = sr._bank(base_sd, aligned_sd, keys, cfg)
        last["bank_s"] = time.perf_counter() - t0
        for b, f, v in grid:
            sr._load_projection(model, aligned_sd, finetuned_sd, keys, bank[b], f, v)
        last["bank"] = bank

    def per_model():
        for b, f, v in grid:
            project_into(model, base_sd, aligned_sd, finetuned_sd, fraction=f, variant=v, basis=b, keys=keys,
                         seed=cfg.seed)

    bank_times: list[float] = []

    def banked_timed():
        banked()
        bank_times.append(last["bank_s"])

    times = interleaved_times({"shared bank": banked_timed, "SVD per model": per_model}, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    bank_build = statistics.median(bank_times[1:] or bank_times)
    ratio = med["SVD per model"] / med["shared bank"]

    # the same projected weights either way (one fraction and variant per basis kind)
    own = model.state_dict()
    agree = {}
    for b in cfg.bases:
        f, v = cfg.fractions[0], "same"  # smallest k: the per-model svd/random basis is randomized there
        sr._load_projection(model, aligned_sd, finetuned_sd, keys, last["bank"][b], f, v)
        w_bank = {k: own[k].double().clone() for k in keys}
        project_into(model, base_sd, aligned_sd, finetuned_sd, fraction=f, variant=v, basis=b, keys=keys,
                     seed=cfg.seed)
        agree[f"{b}/{f}/{v}"] = max(float((w_bank[k] - own[k].double()).norm()
                                          / (finetuned_sd[k].double() - aligned_sd[k].double()).norm())
                                    for k in keys)

    n_bank = len(keys) * len(cfg.bases)
    n_model = len(keys) * len(grid)
    print(f"  shared bank    {med['shared bank']:.2f} s  ({n_bank} decompositions, {bank_build:.2f} s; "
          f"then {len(grid)} projections)")
    print(f"  SVD per model  {med['SVD per model']:.2f} s  ({n_model} decompositions)")
    print(f"  ratio SVD per model / shared bank = {ratio:.2f}x")
    print("  max ||W_bank - W_per_model||_F / ||U||_F over matrices: "
          + ", ".join(f"{k} {v:.1e}" for k, v in agree.items()))
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "projection_bases.json").write_text(json.dumps(dict(
        args=vars(args), n_models=len(grid), n_matrices=len(keys), shapes=shapes, seconds=times, median_s=med,
        bank_build_s=bank_times, ratio=ratio, relative_difference=agree, machine=platform.platform(),
        cpu_threads=torch.get_num_threads(), torch=torch.__version__), indent=2))


if __name__ == "__main__":
    main()
