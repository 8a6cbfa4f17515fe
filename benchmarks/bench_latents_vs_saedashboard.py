"""probekit's latent-statistics job against SAEDashboard's feature-data generation on the same SAE and tokens.

SAEDashboard (``sae-dashboard`` 0.8, PyPI) needs transformer-lens < 3 and sae-lens 6, which do not import beside
probekit's transformer-lens 4.3, so it runs in its own venv (``--saedash-python``, e.g. /tmp/saedash-venv/bin/python,
made with ``python -m venv`` + ``pip install sae-dashboard==0.8.0``). Workload: a random-init 2-layer
``HookedTransformer`` (d_model ``--d-model``, byte-sized vocabulary), ``--prompts`` × ``--seq`` random tokens
(seed 0), a random ReLU SAE with ``--d-sae`` latents at ``blocks.1.hook_resid_post`` saved by probekit in the
SAELens format and loaded by sae-lens.

* SAEDashboard: ``SaeVisRunner(SaeVisConfig(features=all)).run(sae, model, tokens)`` — it runs the model itself.
* probekit: the same model's activations at the hook (``run_with_cache`` in the other venv, timed and counted),
  written to a cache run, then :func:`probekit.latents.compute_latent_stats` with the model's ``W_U``.

Ratio printed: SAEDashboard seconds / (probekit forward seconds + job seconds). Both on CPU, 2 threads; note that
the two venvs carry different torch builds (SAEDashboard's pulls its own).

Run: ``python benchmarks/bench_latents_vs_saedashboard.py --saedash-python /tmp/saedash-venv/bin/python`` (without
it, the script says how to make that venv and exits 0, so ``make bench`` runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_SAEDASH_PART = r'''
import json, sys, time
import torch
torch.set_num_threads(2)
from safetensors.torch import save_file
from transformer_lens import HookedTransformerConfig
from sae_lens import SAE, HookedSAETransformer
from sae_dashboard.sae_vis_data import SaeVisConfig
from sae_dashboard.sae_vis_runner import SaeVisRunner
a = json.loads(sys.argv[1])
torch.manual_seed(0)
cfg = HookedTransformerConfig(n_layers=2, d_model=a["d_model"], d_head=a["d_model"] // 4, n_heads=4,
                              d_mlp=2 * a["d_model"], d_vocab=a["vocab"], n_ctx=a["seq"], act_fn="gelu",
                              normalization_type="LN", device="cpu", seed=0)
model = HookedSAETransformer(cfg).eval()
g = torch.Generator().manual_seed(0)
tokens = torch.randint(0, a["vocab"], (a["prompts"], a["seq"]), generator=g)
sae = SAE.load_from_disk(a["sae"], device="cpu")
hook = "blocks.1.hook_resid_post"
t0 = time.perf_counter()
with torch.no_grad():
    acts = torch.cat([model.run_with_cache(tokens[i:i + 16], names_filter=hook)[1][hook]
                      for i in range(0, len(tokens), 16)])
t_fwd = time.perf_counter() - t0
save_file({"acts": acts.reshape(-1, a["d_model"]).contiguous(), "tokens": tokens.contiguous(),
           "W_U": model.W_U.detach().contiguous()}, a["out"] + "/acts.safetensors")
vis = SaeVisConfig(hook_point=hook, features=list(range(sae.cfg.d_sae)), minibatch_size_features=256,
                   minibatch_size_tokens=64, device="cpu", dtype="float32", verbose=False)
t0 = time.perf_counter()
data = SaeVisRunner(vis).run(encoder=sae, model=model, tokens=tokens)
t_dash = time.perf_counter() - t0
print(json.dumps(dict(forward_s=t_fwd, saedash_s=t_dash, n_features=len(data.feature_data_dict))))
'''


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--saedash-python", default=os.environ.get("PROBEKIT_SAEDASH_PYTHON"),
                    help="python of a venv with sae-dashboard installed (or $PROBEKIT_SAEDASH_PYTHON)")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-sae", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    if not args.saedash_python or not Path(args.saedash_python).is_file():
        print("SAEDashboard comparison not run: pass --saedash-python (or set PROBEKIT_SAEDASH_PYTHON) to the python "
              "of a venv made with `python -m venv V && V/bin/pip install sae-dashboard==0.8.0 'pyarrow<20' sympy "
              "networkx` (it cannot share probekit's venv: it needs transformer-lens < 3).")
        return 0
    sys.path.insert(0, str(REPO))
    import torch
    from safetensors.torch import load_file

    from probekit.cache import ActivationCache, RunKey
    from probekit.latents import LatentStatsConfig, compute_latent_stats
    from probekit.probes.sae import SAE, SAEConfig, save_sae

    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="probekit-bench-saedash-"))
    hook = "blocks.1.hook_resid_post"
    sae = SAE(SAEConfig(d_in=args.d_model, d_sae=args.d_sae, architecture="relu", seed=0, hook_name=hook,
                        model_name="random-2l"))
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)
    save_sae(sae, tmp / "sae")
    req = dict(d_model=args.d_model, vocab=args.vocab, seq=args.seq, prompts=args.prompts, sae=str(tmp / "sae"),
               out=str(tmp))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([args.saedash_python, "-c", _SAEDASH_PART, json.dumps(req)], capture_output=True, text=True,
                         env=env, cwd=str(tmp))
    if res.returncode != 0:
        print(res.stderr[-3000:])
        raise SystemExit("SAEDashboard failed (above)")
    dash = json.loads(res.stdout.strip().splitlines()[-1])
    t = load_file(str(tmp / "acts.safetensors"))
    cache = ActivationCache(tmp / "cache")
    key = RunKey(model="random-2l", weights="bench", dataset="bench-saedash", hooks=(hook,), positions="all",
                 dtype="float32", max_length=args.seq, batch_size=16, sort_by_length=False, batches_per_shard=8)
    w = cache.writer(key)
    S = args.seq
    for i in range(args.prompts):
        w.write({hook: t["acts"][i * S:(i + 1) * S]}, dict(doc_index=torch.full((S,), i), position=torch.arange(S),
                                                           token_id=t["tokens"][i]))
    w.close()
    run = cache.open(key.run_id)
    t0 = time.perf_counter()
    compute_latent_stats(run, sae, hook, LatentStatsConfig(out=str(tmp / "out"), top_k=20, context=8),
                         unembed=t["W_U"], progress=False)
    job = time.perf_counter() - t0
    ours = dash["forward_s"] + job
    ratio = dash["saedash_s"] / ours
    out = dict(tokens=args.prompts * args.seq, d_model=args.d_model, d_sae=args.d_sae, saedash_s=dash["saedash_s"],
               probekit_forward_s=dash["forward_s"], probekit_job_s=job, ratio_saedash_over_probekit=round(ratio, 2))
    (REPO / "benchmarks" / "out").mkdir(parents=True, exist_ok=True)
    (REPO / "benchmarks" / "out" / "latents_vs_saedashboard.json").write_text(json.dumps(out, indent=2))
    print(f"SAEDashboard feature data ({args.d_sae} features, {args.prompts * args.seq:,} tokens): "
          f"{dash['saedash_s']:.2f} s")
    print(f"probekit: forward {dash['forward_s']:.2f} s + latent job {job:.2f} s = {ours:.2f} s")
    print(f"SAEDashboard / probekit: {ratio:.1f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
