"""SAE load time: ``load_sae`` vs a bare safetensors read of the same file (and vs sae-lens, when available).

Figure (BENCHMARKS.md, "SAE loading"): seconds to load a TopK SAE folder (float32, ``cfg.json`` +
``sae_weights.safetensors``) at d_in × d_sae = 576 × 4608 (SmolLM2-135M, 8×) and 2304 × 16384 (Gemma-2-2B, 16k):

- ``read``: ``safetensors.torch.load_file`` of the weights file, the floor any loader pays;
- ``load_sae``: probekit's loader (module on the meta device, tensors assigned);
- ``random init first``: the former path, a seeded random float64 decoder built and normalised, then overwritten;
- ``sae-lens``: ``SAE.load_from_disk`` in sae-lens's own environment (a subprocess; its interpreter from
  ``$SAELENS_PYTHON``, default ``/tmp/saelens-venv/bin/python``; skipped when absent), timed inside that process;
- ``… + encode``: the load then one ``encode`` of a single token, for probekit and sae-lens alike. safetensors
  maps the file lazily, so a bare load touches no weight: this row is where the pages are read (and where probekit
  checks the weights for NaN/inf, once).

Median of interleaved rounds after a warm-up (page cache warm for all). Prints ratios against ``read``.

Run: ``python benchmarks/bench_sae_load.py``
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved_times  # noqa: E402

from probekit.probes.sae import SAE, SAEConfig, load_sae, param_shapes, save_sae  # noqa: E402

SIZES = [(576, 4608, 7), (2304, 16384, 3)]  # d_in, d_sae, rounds

SAELENS_TIMER = textwrap.dedent("""
    import json, statistics, sys, time
    from sae_lens import SAE
    folder, rounds = sys.argv[1], int(sys.argv[2])
    import torch
    torch.set_num_threads(2)
    SAE.load_from_disk(folder)
    ts, te = [], []
    for _ in range(rounds):
        t0 = time.perf_counter(); SAE.load_from_disk(folder); ts.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); s = SAE.load_from_disk(folder); s.encode(torch.zeros(1, s.cfg.d_in))
        te.append(time.perf_counter() - t0)
    print(json.dumps([ts, te]))
""")


def old_path(folder: Path, cfg: SAEConfig) -> SAE:
    """What load_sae did before: a random-init SAE (float64 decoder, normalised), then the tensors copied in."""
    from safetensors.torch import load_file

    t = load_file(str(folder / "sae_weights.safetensors"))
    sae = SAE(cfg)
    with torch.no_grad():
        for key in param_shapes(cfg):
            getattr(sae, key).data = t[key].to(cfg.torch_dtype).clone()
    return sae.eval()


def saelens_times(folder: Path, rounds: int) -> list[list[float]] | None:
    py = os.environ.get("SAELENS_PYTHON", "/tmp/saelens-venv/bin/python")
    if not Path(py).is_file():
        return None
    out = subprocess.run([py, "-c", SAELENS_TIMER, str(folder), str(rounds)], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": ""})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from safetensors.torch import load_file

    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        for d_in, d_sae, rounds in SIZES:
            cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=32, hook_name="blocks.3.hook_resid_post",
                            model_name="smollm2-135m")
            folder = save_sae(SAE(cfg), Path(tmp) / f"{d_in}x{d_sae}")
            w = folder / "sae_weights.safetensors"
            one = torch.zeros(1, d_in)
            times = interleaved_times({
                "read": lambda: load_file(str(w)),
                "load_sae": lambda: load_sae(folder),
                "random init first": lambda: old_path(folder, cfg),
                "load_sae + encode": lambda: load_sae(folder).encode(one),
            }, rounds)
            med = {k: statistics.median(v) for k, v in times.items()}
            sl = saelens_times(folder, rounds)
            if sl is not None:
                med["sae-lens"] = statistics.median(sl[0])
                med["sae-lens + encode"] = statistics.median(sl[1])
            mb = w.stat().st_size / 2**20
            print(f"\n{d_in} x {d_sae} ({mb:.0f} MB), median of {rounds}:")
            for k, v in med.items():
                print(f"  {k:18s} {v * 1e3:8.1f} ms   ratio to read {v / med['read']:6.2f}")
            if "sae-lens" in med:
                print(f"  load_sae / sae-lens = {med['load_sae'] / med['sae-lens']:.2f};  with the first encode: "
                      f"{med['load_sae + encode'] / med['sae-lens + encode']:.2f}")
            print(f"  random init first / load_sae = {med['random init first'] / med['load_sae']:.1f}")
            (folder / "sae_weights.safetensors").unlink()


if __name__ == "__main__":
    main()
