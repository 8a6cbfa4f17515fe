"""The latent-statistics worker: ``python -m app.latents_worker`` reads an :class:`app.view_jobs.LatentJobSpec` as
JSON on stdin and runs :func:`probekit.latents.compute_latent_stats` of an SAE folder over a cache run, writing
``results/latents/<name>/``. Progress lines ``{"event": "progress", "done", "total"}``; the unembedding for the
logit effects comes from the run's model when it lies inside the cache root (else no logit effects).
"""

from __future__ import annotations

import sys
import time

from app.worker_io import emit, serve


def run(spec: dict, root: str) -> dict:
    t0 = time.perf_counter()
    try:
        from app.security import safe_path
        from probekit.cache import Run
        from probekit.latents import LatentStatsConfig, compute_latent_stats
        from probekit.probes.sae import load_sae

        run_ = Run(safe_path(root, "runs", spec["run_id"]))
        sae = load_sae(safe_path(root, spec["sae"]))
        tok = unembed = None
        if spec.get("model_path"):
            emit(event="status", message="reading the unembedding of the run's model")
            try:
                from probekit.models import load_hf

                model, tok, _ = load_hf(spec["model_path"], fetch=False)
                head = model.get_output_embeddings()
                unembed = head.weight.detach().float().T.contiguous() if head is not None else None
                del model
                if unembed is not None and unembed.shape[0] != int(sae.cfg.d_in):
                    emit(event="status", message=f"the model's unembedding reads {unembed.shape[0]} features, the SAE "
                                                 f"{sae.cfg.d_in}: logit effects skipped")
                    unembed = None
            except Exception as e:  # statistics without logit effects rather than nothing
                emit(event="status", message=f"no unembedding ({type(e).__name__}: {e}); logit effects skipped")
        if tok is None and spec.get("tokenizer_path"):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(spec["tokenizer_path"])
        cfg = LatentStatsConfig(out=str(safe_path(root, "results", "latents", spec["name"])),
                                top_k=int(spec.get("top_k", 20)), context=int(spec.get("context", 8)),
                                exclude_positions=(0,) if spec.get("exclude_bos", True) else ())
        emit(event="status", message=f"encoding {run_.n_rows:,} rows of {spec['hook']}")
        compute_latent_stats(run_, sae, spec["hook"], cfg, tokenizer=tok, unembed=unembed, progress=False,
                             on_progress=lambda d, n: emit(event="progress", done=int(d), total=int(n)),
                             provenance=dict(sae_folder=spec["sae"]))
        return dict(event="done", name=spec["name"], seconds=round(time.perf_counter() - t0, 2))
    except Exception as e:
        return dict(event="error", message=f"{type(e).__name__}: {e}")


def main() -> int:
    return serve(run)


if __name__ == "__main__":
    sys.exit(main())
