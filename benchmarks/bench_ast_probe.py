"""AST-Probe: all layers fitted as one batched model vs one separate fit per layer.

Same data, same epochs, same batches: real gold tuples of stdlib functions (as in ``probekit ast-probe``) with
leaf vectors of SmolLM2's shape (``--layers`` layers, D = 576), early stopping off (patience = epochs) so both
sides do exactly the same optimisation work; the unit test ``test_batched_fit_equals_separate_layer_fits``
checks that the results agree. Baseline: ``ASTProbe.fit`` on ``X.layers([l])`` for each layer in turn.

Run: ``python benchmarks/bench_ast_probe.py [--layers 11] [--snippets 400] [--epochs 2] [--device cpu]``;
writes ``benchmarks/out/ast_probe.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import interleaved_times  # noqa: E402

from probekit.data.code import iter_stdlib_functions  # noqa: E402
from probekit.probes.ast_probe import ASTProbe, PackedLeaves  # noqa: E402
from probekit.probes.ast_tree import code_to_tuple  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=11)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--snippets", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    gold = []
    for s in iter_stdlib_functions(max_functions=3 * args.snippets):
        _, d, c, u = code_to_tuple(s.source)
        if 3 <= len(u) <= 80:
            gold.append((d, c, u))
        if len(gold) == args.snippets:
            break
    g = torch.Generator().manual_seed(0)
    lengths = [len(u) for _, _, u in gold]
    H = torch.randn(args.layers, sum(lengths), args.dim, generator=g)
    X = PackedLeaves(H, lengths).to(args.device)
    n_tr = int(0.8 * len(gold))
    tr, va = X.snippets(0, n_tr), X.snippets(n_tr, len(gold))
    ytr, yva = gold[:n_tr], gold[n_tr:]
    kw = dict(k=args.k, lr=5e-3, epochs=args.epochs, patience=args.epochs + 1, batch_size=32, device=args.device,
              progress=False)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def batched():
        ASTProbe(**kw).fit(tr, ytr, va, yva)

    def separate():
        for layer in range(args.layers):
            ASTProbe(**kw).fit(tr.layers([layer]), ytr, va.layers([layer]), yva)

    times = interleaved_times({"batched": batched, "separate": separate}, args.repeats, sync)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["separate"] / med["batched"]
    print(f"AST-Probe fit, {args.layers} layers, D={args.dim}, k={args.k}, {n_tr} train snippets, "
          f"{args.epochs} epochs, {args.device}:")
    print(f"  all layers batched  {med['batched']:.2f} s")
    print(f"  separate per layer  {med['separate']:.2f} s")
    print(f"  ratio separate / batched = {ratio:.2f}x")
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "ast_probe.json").write_text(json.dumps(dict(
        args=vars(args), seconds=times, median_s=med, ratio=ratio, machine=platform.platform(),
        cpu_threads=torch.get_num_threads(), device=args.device,
        gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        mean_leaves=float(np.mean(lengths))), indent=2))


if __name__ == "__main__":
    main()
