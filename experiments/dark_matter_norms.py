"""The dark-matter norm question (issue #17): which choice makes R² of ‖e‖² from x low on SmolLM2-135M.

A controlled experiment at reduced size: the dark-matter run's documents (stdlib functions + pydoc prose) and
its SAE recipe (TopK, k = 32, widths in multiples of d_model, BOS excluded from training, bf16 activations),
then :func:`probekit.probes.dark_matter_norms.norm_predictability` with one choice changed at a time:
token selection / target / regression on the reference SAE (the full sweep), and the SAE itself (width, k,
training length, layer, activation dtype) with the reference selection and with BOS included.

Step 1 captures float32 residual streams of three layers once (``--acts``, safetensors); step 2 trains the SAEs
and runs the sweeps. Results: ``norm_question.json`` and ``norm_question.html`` next to ``--acts``.

    PROBEKIT_CACHE=… python experiments/dark_matter_norms.py --acts /tmp/acts.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

LAYERS = (8, 15, 22)
#: Selections computed for every SAE variant (the full sweep runs on the reference SAE).
VARIANT_SELECTIONS = ("run default: ‖e‖², BOS excluded, code + prose, OLS + bias", "BOS (position 0) included",
                      "positions ≥ 4", "top 0.1% of ‖e‖² dropped", "target log ‖e‖")


def capture_acts(path: Path, n_code: int, n_text: int) -> None:
    from safetensors.torch import save_file

    from probekit.capture import CaptureConfig, capture
    from probekit.dark_matter_run import DarkMatterRunConfig, run_documents
    from probekit.models import load_model

    cfg = DarkMatterRunConfig(n_code=n_code, n_text=n_text, progress=False)
    bridge, tok = load_model(cfg.model)
    docs, kinds, _ = run_documents(cfg, tok)
    res = capture(bridge, docs, CaptureConfig(hooks=[f"blocks.{l}.hook_resid_post" for l in LAYERS],
                                              max_length=cfg.max_length, dtype="float32", progress=False))
    out = {f"L{l}": res.acts[f"blocks.{l}.hook_resid_post"].contiguous() for l in LAYERS}
    out.update({k: res.meta[k].contiguous() for k in ("doc_index", "position", "token_id")})
    out["is_code"] = torch.tensor([k == "code" for k in kinds])
    save_file(out, str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--acts", type=Path, required=True, help="safetensors of activations (captured if absent)")
    ap.add_argument("--n-code", type=int, default=200)
    ap.add_argument("--n-text", type=int, default=120)
    ap.add_argument("--test-fraction", type=float, default=0.25)
    ap.add_argument("--epochs", type=int, default=8, help="reference SAE epochs (about the run's step count)")
    ap.add_argument("--quick", action="store_true", help="reference SAE only (no SAE variants)")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("--only", default="", help="comma-separated SAE variants to run (e.g. 'reference,layer 22')")
    args = ap.parse_args()
    from safetensors.torch import load_file

    from probekit.dark_matter_run import split_documents
    from probekit.probes.dark_matter_norms import DEFAULT_SELECTIONS, NormSelection, norm_predictability, \
        sae_error_sq
    from probekit.probes.sae import SAEConfig, sae_metrics, train_sae

    torch.set_num_threads(2)
    if not args.acts.exists():
        capture_acts(args.acts, args.n_code, args.n_text)
    t = load_file(str(args.acts))
    doc, pos = t["doc_index"].numpy(), t["position"].numpy()
    kinds = np.where(t["is_code"].numpy(), "code", "text")
    n_docs = len(kinds)
    is_test = split_documents(n_docs, args.test_fraction, 0)
    train_rows = np.nonzero((pos > 0) & ~is_test[doc])[0]
    test_rows = np.nonzero((pos > 0) & is_test[doc])[0]
    d = t["L15"].shape[1]
    print(f"{n_docs} documents ({(kinds == 'code').sum()} code), {int(is_test.sum())} held out; "
          f"{len(train_rows)} train / {len(test_rows)} test tokens (BOS excluded)", flush=True)

    def bf16(x):
        return x.to(torch.bfloat16).float()

    def sae_for(layer=15, width=2, k=32, epochs=args.epochs, dtype="bf16"):
        x = t[f"L{layer}"]
        x = bf16(x) if dtype == "bf16" else x.float()
        cfg = SAEConfig(d_in=d, d_sae=width * d, architecture="topk", k=k, lr=1e-3, batch_size=1024, epochs=epochs,
                        dead_steps=100, seed=0, hook_name=f"blocks.{layer}.hook_resid_post")
        t0 = time.perf_counter()
        sae = train_sae(cfg, x[torch.as_tensor(train_rows)], progress=False)
        sae.eval()
        fvu = sae_metrics(sae, x[torch.as_tensor(test_rows)]).fvu
        return x, sae, float(fvu), time.perf_counter() - t0

    out = dict(sizes=dict(n_documents=n_docs, n_code=int((kinds == "code").sum()), n_test_documents=int(is_test.sum()),
                          train_tokens=int(len(train_rows)), test_tokens=int(len(test_rows)), d_model=int(d),
                          reference_epochs=args.epochs), sweeps={}, saes={})
    figs = []
    extra = (NormSelection("positions ≥ 16", min_position=16), NormSelection("first 32 tokens per document",
                                                                             max_position=32),
             NormSelection("1,000 training tokens", max_train_tokens=1000),
             NormSelection("20,000 training tokens", max_train_tokens=20000),
             NormSelection("BOS included, ‖e‖² top 0.1% dropped", min_position=0, drop_top=0.001),
             NormSelection("BOS included, no intercept", min_position=0, fit_intercept=False))
    base = args.acts.with_suffix("")
    variants = {"reference (L15, 2×, k=32, bf16)": {}}
    if not args.quick:
        variants.update({"fp32 activations": dict(dtype="fp32"), "1 epoch": dict(epochs=1),
                         "layer 22": dict(layer=22), "layer 8": dict(layer=8), "k = 16": dict(k=16),
                         "width 4×": dict(width=4), "20 epochs": dict(epochs=20)})
    if args.only:
        variants = {k: v for k, v in variants.items() if k.split(" (")[0] in args.only.split(",")}
    for name, kw in variants.items():
        x, sae, fvu, secs = sae_for(**kw)
        err = sae_error_sq(sae, x)
        sels = DEFAULT_SELECTIONS + extra if not kw else [s for s in DEFAULT_SELECTIONS
                                                          if s.name in VARIANT_SELECTIONS]
        res = norm_predictability(x, err, doc, pos, is_test, doc_domain=kinds, selections=sels,
                                  label=f"SmolLM2-135M, {name}")
        out["saes"][name] = dict(fvu_heldout=fvu, train_seconds=round(secs, 1), **kw)
        out["sweeps"][name] = res.to_dict()
        figs.append(res.figure())
        print(f"\n## {name}: FVU {fvu:.3f} ({secs:.0f} s)\n{res.table()}", flush=True)
        # written after each SAE, so a stopped run keeps what it finished
        Path(f"{base}_norm_question{args.tag}.json").write_text(json.dumps(out, indent=2, default=float))
    from probekit.html_page import write_figures_page

    write_figures_page(Path(f"{base}_norm_question{args.tag}.html"), figs, title="SAE error-norm predictability")


if __name__ == "__main__":
    main()
