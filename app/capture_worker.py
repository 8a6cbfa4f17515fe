"""The capture worker: ``python -m app.capture_worker`` reads a :class:`app.jobs.CaptureSpec` as JSON on
stdin, captures into the activation cache of ``$PROBEKIT_CACHE`` and prints JSON lines::

    {"event": "status", "message": "loading model"}
    {"event": "progress", "done": 120, "total": 480}
    {"event": "done", "run_id": "…", "rows": 480, "hooks": [...], "seconds": 3.2}
    {"event": "error", "message": "…"}

It runs in its own process so the web server never holds a model.
"""

from __future__ import annotations

import io
import json
import sys
import time


def emit(**event) -> None:
    print(json.dumps(event), flush=True)


def _install_progress_bar() -> None:
    """Make the capture's tqdm bar report through :func:`emit` (capture creates it as ``probekit.capture.tqdm``)."""
    import importlib

    from tqdm.std import tqdm as std_tqdm

    cap = importlib.import_module("probekit.capture")  # the module: ``probekit.capture`` is also a function name

    class LineBar(std_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.update(disable=False, file=io.StringIO(), mininterval=0.25)
            super().__init__(*args, **kwargs)

        def display(self, msg=None, pos=None):
            emit(event="progress", done=int(self.n), total=int(self.total or 0))
            return True

    cap.tqdm = LineBar


def main() -> int:
    t0 = time.perf_counter()
    try:
        spec = json.loads(sys.stdin.read())
        emit(event="status", message="loading model")
        from probekit.cache import ActivationCache
        from probekit.capture import CaptureConfig
        from probekit.models import load_model

        _install_progress_bar()
        bridge, tok = load_model(spec["model_path"], fetch=False)
        if spec["dataset"] == "stdlib":
            from probekit.data.code import iter_stdlib_functions

            texts = [s.source for s in iter_stdlib_functions(max_functions=spec["n_functions"], seed=spec["seed"])]
        else:
            texts = list(spec["texts"])
        emit(event="status", message=f"capturing {len(texts)} documents")
        cfg = CaptureConfig(hooks=spec["hooks"], positions=spec["positions"], batch_size=spec["batch_size"],
                            max_length=spec["max_length"], dtype=spec["dtype"], progress=True)
        run = ActivationCache().capture(bridge, texts, cfg, tokenizer=tok)
        # no made-up "1 / 1" here: the bar's last display (on close) already reported the real token count
        emit(event="done", run_id=run.run_id, rows=run.n_rows, hooks=run.hooks,
             seconds=round(time.perf_counter() - t0, 2))
        return 0
    except Exception as e:  # reported to the page as text; the worker exits non-zero
        emit(event="error", message=f"{type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
