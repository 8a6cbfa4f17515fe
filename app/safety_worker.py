"""The safety prompt-box worker: ``python -m app.safety_worker`` reads an :class:`app.jobs.SafetyPromptSpec` as
JSON on stdin, loads the result's model and its refusal direction, and prints JSON lines::

    {"event": "status", "message": "loading model …"}
    {"event": "done", "clean_score": -3.1, "ablated_score": -4.0, "clean_completion": "…",
     "ablated_completion": "…", "layer": 12, "model": "…", "seconds": 2.4}
    {"event": "error", "message": "…"}

The score is :func:`probekit.probes.safety.refusal_score` of the prompt, once on the model and once inside
:func:`~probekit.interventions.directional_ablation` of the direction at the chosen layer (projected out of
every block); the completions are greedy (:func:`~probekit.probes.safety.generate_greedy`). It runs in its own
process so the web server never holds a model; the direction file is opened only through ``safe_path``.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

from app.worker_io import emit, serve


def prompt_report(model, tok, direction, prompt: str, *, chat_template: bool = True,
                  max_new_tokens: int = 32) -> dict:
    """Refusal score and greedy completion of ``prompt``, clean and with ``direction`` ablated."""
    from probekit.interventions import directional_ablation
    from probekit.probes.safety import generate_greedy, refusal_score

    kw = dict(chat_template=chat_template)
    out = dict(clean_score=float(refusal_score(model, tok, [prompt], **kw)[0]),
               clean_completion=generate_greedy(model, tok, [prompt], max_new_tokens=max_new_tokens, progress=False,
                                                **kw)[0])
    with directional_ablation(model, direction) as m:
        out["ablated_score"] = float(refusal_score(m, tok, [prompt], **kw)[0])
        out["ablated_completion"] = generate_greedy(m, tok, [prompt], max_new_tokens=max_new_tokens,
                                                    progress=False, **kw)[0]
    return out


def run(spec: dict, root: str, say: Callable[..., None] = emit) -> dict:
    """Do one request; return the final event (``done`` or ``error``) after reporting status through ``say``."""
    t0 = time.perf_counter()
    try:
        import torch
        from safetensors.torch import load_file

        from app.security import safe_path

        path = safe_path(root, spec["direction_file"])
        key = f"layer_{int(spec['layer'])}"
        dirs = load_file(str(path))
        if key not in dirs:
            return dict(event="error", message=f"{path.name} holds no direction for layer {spec['layer']} "
                                               f"(it has {', '.join(sorted(dirs)) or 'none'}).")
        direction = dirs[key].to(torch.float32)
        say(event="status", message=f"loading model {spec['model']}")
        from probekit.models import load_hf

        try:
            model, tok, _ = load_hf(spec["model_path"], fetch=False)
        except Exception as e:  # any loading problem is reported as such, not as a scoring failure
            return dict(event="error", message=f"The model {spec['model']} could not be loaded: "
                                               f"{type(e).__name__}: {e}")
        d_model = getattr(model.config, "hidden_size", None)
        if d_model is not None and direction.numel() != d_model:
            return dict(event="error", message=f"the direction has {direction.numel()} entries but the model's "
                                               f"residual stream has {d_model}: is this the result's model?")
        say(event="status", message="scoring the prompt, clean and with the direction ablated")
        out = prompt_report(model, tok, direction, spec["prompt"], chat_template=bool(spec.get("chat_template", True)),
                            max_new_tokens=int(spec.get("max_new_tokens", 32)))
        return dict(event="done", layer=int(spec["layer"]), model=spec["model"],
                    seconds=round(time.perf_counter() - t0, 2), **out)
    except Exception as e:  # reported to the page as text
        return dict(event="error", message=f"{type(e).__name__}: {e}")


def main() -> int:
    return serve(run, first_status="reading the refusal direction")


if __name__ == "__main__":
    sys.exit(main())
