"""The forward worker of the token and attention views: ``python -m app.forward_worker`` reads a
:class:`app.view_jobs.ForwardSpec` as JSON on stdin, runs one forward of the model on the typed text (or a cached
document's token ids), and writes ``results/forward/<id>/``:

* ``forward.safetensors``: ``acts.<hook>`` ``(n, d)`` float32 for each hook asked for, and when attention was asked
  for ``attn.<layer>`` ``(n_heads, n, n)`` float16 (rows: query position, columns: key position);
* ``forward.json``: model, tokens (decoded one by one), token ids, hooks, n_layers, n_heads (written last).

It prints JSON lines ``{"event": "status"|"done"|"error", …}`` like the other workers. Activations come from the
plain Hugging Face model with :class:`probekit.hooks.HookSet` (the bridge names mapped to its modules, as in
capture); attention patterns from the model's eager attention (``output_attentions``).
"""

from __future__ import annotations

import json
import os
import sys
import time

from app.worker_io import emit, serve


def forward(model, tok, spec: dict) -> tuple[dict, dict]:
    """``(info, arrays)`` of one forward as described in the module docstring."""
    import torch

    from probekit.hooks import HookSet

    if spec.get("token_ids"):
        ids = [int(t) for t in spec["token_ids"]][: int(spec["max_tokens"])]
    else:
        ids = tok(spec["text"])["input_ids"][: int(spec["max_tokens"])]
    x = torch.tensor([ids])
    arrays = {}
    hooks = list(spec.get("hooks") or [])
    if spec.get("all_resid"):
        n = int(getattr(model.config, "num_hidden_layers", 0))
        hooks += [h for h in (f"blocks.{l}.hook_resid_post" for l in range(n)) if h not in hooks]
    out = None
    with torch.inference_mode():
        if hooks:
            hs = HookSet.for_hf(model, hooks)
            if hs is None:
                raise ValueError(f"hook(s) {hooks} have no equivalent on this model; use blocks.<l>.hook_resid_post, "
                                 "hook_resid_pre, hook_mlp_out, hook_attn_out or mlp.hook_post")
            with hs:
                acts = hs.run(lambda: model(x))
            for h in hooks:
                arrays[f"acts.{h}"] = acts[h][0].reshape(len(ids), -1).float().contiguous().numpy()
        if spec.get("attention"):
            out = model(x, output_attentions=True)
            for layer, a in enumerate(out.attentions):
                arrays[f"attn.{layer}"] = a[0].to(torch.float16).contiguous().numpy()
    n_layers = len(out.attentions) if out is not None else int(getattr(model.config, "num_hidden_layers", 0))
    info = dict(model=spec["model"], tokens=[tok.decode([t]) for t in ids], token_ids=ids, hooks=hooks,
                attention=bool(spec.get("attention")), n_layers=n_layers,
                n_heads=int(getattr(model.config, "num_attention_heads", 0)), source=spec.get("source", "typed"))
    return info, arrays


def run(spec: dict, root: str) -> dict:
    t0 = time.perf_counter()
    try:
        from safetensors.numpy import save_file

        from app.security import safe_path
        from probekit.models import load_hf

        out = safe_path(root, "results", "forward", spec["fid"])
        emit(event="status", message=f"loading model {spec['model']}")
        try:
            model, tok, _ = load_hf(spec["model_path"], fetch=False)
        except Exception as e:
            return dict(event="error",
                        message=f"The model {spec['model']} could not be loaded: {type(e).__name__}: {e}")
        if spec.get("attention"):
            try:
                model.set_attn_implementation("eager")  # sdpa kernels return no weights
            except Exception:
                model.config._attn_implementation = "eager"
        emit(event="status", message="running the forward")
        info, arrays = forward(model, tok, spec)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".forward.safetensors.tmp"
        save_file(arrays, str(tmp))
        os.replace(tmp, out / "forward.safetensors")
        (out / ".forward.json.tmp").write_text(json.dumps(info))
        os.replace(out / ".forward.json.tmp", out / "forward.json")
        return dict(event="done", fid=spec["fid"], n_tokens=len(info["tokens"]),
                    seconds=round(time.perf_counter() - t0, 2))
    except Exception as e:  # reported to the page as text
        return dict(event="error", message=f"{type(e).__name__}: {e}")


def main() -> int:
    return serve(run)


if __name__ == "__main__":
    sys.exit(main())
