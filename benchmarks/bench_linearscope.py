"""LinearScope on the digits CNN: full A batched vs per-column loop, and the bias share over the test set.

Figure 1: time to build the full ``A(x0)`` (10 x 64) by one batched paired forward over all 64 basis vectors
(``matrix(x0)``) against one paired forward per column (``matrix(x0, method="loop")``), same input, float32 and
float64; goal ratio >= 10. Also the batched-backward ``method="rows"`` time. Best of ``--repeats`` interleaved
runs over ``--inputs`` test images (medians in the JSON).

Figure 2: bias share ``b_k / y_k`` per class on one input, and ``b_c / y_c`` at the predicted class averaged
over the 450 test images (also per predicted class), float64.

Run: ``python benchmarks/bench_linearscope.py [--repeats 5] [--inputs 4]``; writes
``benchmarks/out/linearscope.json``. Uses the cached CNN (``load_digits_cnn``; trains it once, a few seconds).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from probekit.digits_cnn import digits_split, load_digits_cnn
from probekit.probes.linearscope import LinearScope


def best_and_median(fns: dict, repeats: int) -> dict[str, dict[str, float]]:
    for f in fns.values():  # warm-up
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: {"best_s": min(v), "median_s": statistics.median(v)} for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inputs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: modest on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_digits_cnn()
    _, X_te, _, y_te = digits_split(0)
    out: dict = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        "model": {"name": "digits-cnn", "test_accuracy": getattr(model, "test_accuracy", None),
                  "n_in": 64, "n_out": 10},
        "timing": {},
    }
    print(f"digits CNN test accuracy {out['model']['test_accuracy']:.4f}")
    for dtype in (torch.float32, torch.float64):
        scope = LinearScope(model, dtype=dtype)
        name = str(dtype).replace("torch.", "")
        rows = []
        for i in range(args.inputs):
            x0 = X_te[i]
            A = scope.matrix(x0)
            err_loop = float((A - scope.matrix(x0, method="loop")).abs().max())
            err_rows = float((A - scope.matrix(x0, method="rows")).abs().max())
            t = best_and_median({
                "batched": lambda: scope.matrix(x0),
                "loop": lambda: scope.matrix(x0, method="loop"),
                "rows": lambda: scope.matrix(x0, method="rows"),
            }, args.repeats)
            rows.append({**{k: v for k, v in t.items()}, "max_abs_diff_loop": err_loop, "max_abs_diff_rows": err_rows})
        ratio = statistics.median(r["loop"]["best_s"] / r["batched"]["best_s"] for r in rows)
        out["timing"][name] = {
            "per_input": rows,
            "batched_best_s": statistics.median(r["batched"]["best_s"] for r in rows),
            "loop_best_s": statistics.median(r["loop"]["best_s"] for r in rows),
            "rows_best_s": statistics.median(r["rows"]["best_s"] for r in rows),
            "loop_over_batched": ratio,
            "goal": ">= 10",
        }
        tm = out["timing"][name]
        print(f"[{name}] full A (10x64): batched {tm['batched_best_s'] * 1e3:.2f} ms, loop {tm['loop_best_s'] * 1e3:.2f} ms,"
              f" rows(backward) {tm['rows_best_s'] * 1e3:.2f} ms -> loop/batched = {ratio:.1f}x (goal >= 10);"
              f" max |A_batched - A_loop| = {max(r['max_abs_diff_loop'] for r in rows):.2e}")

    scope = LinearScope(model, dtype=torch.float64)
    x0 = X_te[0]
    share = scope.bias_share(x0).numpy()
    res = scope.analyze(x0, label=int(y_te[0]))
    ds = scope.dataset_bias_share(X_te, y_te)
    out["one_input"] = {"index": 0, "label": int(y_te[0]), "predicted": res.predicted,
                        "bias_share_per_class": share.tolist(), "logits": res.logits.tolist(),
                        "bias": res.bias.tolist(), "reconstruction_rel_error": res.reconstruction_rel_error,
                        "top_singular_values": res.singular_values.tolist()}
    out["test_set"] = ds.to_dict()
    print(f"bias share b_k/y_k on test[0] (label {int(y_te[0])}, predicted {res.predicted}): "
          + " ".join(f"{k}:{s:+.3f}" for k, s in enumerate(share)))
    print(f"test set (n={ds.n}, accuracy {ds.accuracy:.4f}): mean bias share at predicted class "
          f"{ds.mean_share_predicted:+.4f} (median {ds.median_share_predicted:+.4f}); "
          f"mean |b|/(|b|+|Ax|) {ds.mean_abs_fraction:.4f}")
    print("  per predicted class: " + " ".join(
        f"{k}:{s:+.3f}" if s is not None else f"{k}:n/a" for k, s in enumerate(ds.per_class_mean_share)))
    out["elapsed_s"] = time.perf_counter() - t0
    path = Path(__file__).resolve().parent / "out" / "linearscope.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, allow_nan=False))
    print(f"wrote {path} ({out['elapsed_s']:.1f} s)")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
