"""TopK SAE training throughput: probekit's ``train_sae`` vs sae-lens's ``SAETrainer`` on the same activations.

Figure (BENCHMARKS.md, "SAE training"): tokens/s of a TopK SAE (d_in 256, d_sae 2048, k 16, batch 1024, Adam,
float32, 2 threads) trained for the same number of steps on the same saved activation tensor (random sparse codes
times a random dictionary, 16,384 rows), each library with its own defaults otherwise:

- probekit: ``train_sae`` from the tensor (geometric-median ``b_dec`` init, dead-latent aux loss, decoder rows
  renormalised every step, NaN/inf row check up front), no progress bar;
- sae-lens 6.x: ``SAETrainer.fit`` on ``TopKTrainingSAE`` (its defaults: decoder-norm rescaling, aux loss, gradient
  clipping) fed the same rows in order, in its own environment (a subprocess; interpreter from
  ``$SAELENS_PYTHON``, default ``/tmp/saelens-venv/bin/python``), timed inside that process around ``fit()``.

Each side runs in a fresh process per round (imports excluded, including the lazy import of ``torch._dynamo`` by the
first ``Adam`` of a process, ~10 s on a busy box; the whole training call timed, setup included), rounds
interleaved (probekit, sae-lens, probekit, …) so that load on the shared machine hits both alike; the best round of
each is reported with the ratio. About a minute
(two on a busy 2-core box).

Run: ``python benchmarks/bench_sae_train.py``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
from safetensors.torch import save_file

D_IN, D_SAE, K, BATCH, STEPS, ROUNDS = 256, 2048, 16, 1024, 16, 3

PROBEKIT_RUN = textwrap.dedent("""
    import json, sys, time
    import torch
    from safetensors.torch import load_file
    from probekit.probes.sae import SAEConfig, train_sae
    torch.set_num_threads(2)
    x = load_file(sys.argv[1])["x"]
    d_in, d_sae, k, batch, steps = map(int, sys.argv[2:7])
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # the first Adam imports torch._dynamo: not timed
    t0 = time.perf_counter()
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k, batch_size=batch, total_tokens=steps * batch,
                    lr=4e-4, seed=0)
    train_sae(cfg, x, progress=False)
    print(json.dumps(time.perf_counter() - t0))
""")

SAELENS_RUN = textwrap.dedent("""
    import json, sys, time, warnings
    warnings.filterwarnings("ignore")
    import torch
    from safetensors.torch import load_file
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer
    torch.set_num_threads(2)
    x = load_file(sys.argv[1])["x"]
    d_in, d_sae, k, batch, steps = map(int, sys.argv[2:7])
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # the first Adam imports torch._dynamo: not timed
    def provider():
        while True:
            for i in range(0, len(x) - batch + 1, batch):
                yield x[i : i + batch]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    cfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch, lr=4e-4,
                           lr_end=4e-4, dead_feature_window=1000, feature_sampling_window=2000)
    SAETrainer(cfg, sae, provider()).fit()
    print(json.dumps(time.perf_counter() - t0))
""")


def data(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    dictionary = torch.randn(4 * D_IN, D_IN, generator=g)
    codes = torch.rand(n, 4 * D_IN, generator=g) * (torch.rand(n, 4 * D_IN, generator=g) < 0.02)
    return (codes @ dictionary).contiguous()


def main() -> None:
    torch.set_num_threads(2)
    py = os.environ.get("SAELENS_PYTHON", "/tmp/saelens-venv/bin/python")
    if not Path(py).is_file():
        sys.exit(f"sae-lens's interpreter {py} is missing: see tests/fixtures/saelens/make_fixtures.py for the venv")
    x = data(STEPS * BATCH)
    tokens = STEPS * BATCH
    root = str(Path(__file__).resolve().parents[1])
    best = {"probekit": float("inf"), "sae-lens": float("inf")}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "acts.safetensors")
        save_file({"x": x}, path)
        sizes = [*map(str, (D_IN, D_SAE, K, BATCH, STEPS))]
        runs = {"probekit": ([sys.executable, "-c", PROBEKIT_RUN, path, *sizes], {"PYTHONPATH": root}),
                "sae-lens": ([py, "-c", SAELENS_RUN, path, *sizes], {"PYTHONPATH": "", "TQDM_DISABLE": "1"})}
        for r in range(ROUNDS):
            for name, (args, env) in runs.items():
                out = subprocess.run(args, capture_output=True, text=True, check=True, env={**os.environ, **env})
                best[name] = min(best[name], json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}: probekit {best['probekit']:.2f} s, sae-lens {best['sae-lens']:.2f} s (best so far)")
    rate = {k: tokens / v for k, v in best.items()}
    print(f"\nTopK d_in {D_IN}, d_sae {D_SAE}, k {K}, batch {BATCH}, {STEPS} steps ({tokens:,} tokens), "
          f"torch {torch.__version__}, 2 threads, best of {ROUNDS}:")
    for k, v in rate.items():
        print(f"  {k:9s} {v:10,.0f} tokens/s  ({best[k]:.2f} s)")
    print(f"  probekit / sae-lens throughput ratio: {rate['probekit'] / rate['sae-lens']:.2f}")


if __name__ == "__main__":
    main()
