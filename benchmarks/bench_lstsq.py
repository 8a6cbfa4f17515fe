"""Least squares for the SAE dark-matter fit: streamed normal equations against scikit-learn.

Workload (SmolLM2-sized): ``Y ≈ X W + b`` with ``d = 576`` inputs and outputs, ``--n-train`` training rows
(default 200k) and ``--n-test`` held-out rows, float32 on disk (``.npy`` in a temporary folder outside the repo,
page cache warm). Each method runs in a *fresh subprocess*, so its peak resident memory (``VmHWM``) is its own:

- baseline ``sklearn.linear_model.LinearRegression`` gets the full training matrices in memory (``np.load``);
  its extra memory is peak RSS minus RSS after loading the data;
- ``StreamedLeastSquares`` reads the same files in batches of ``--batch-size`` rows (plain reads into one reused
  buffer, as it would stream from the cache) and never holds the full matrix; its extra memory is peak RSS minus
  RSS after imports. Total peaks are reported too.

Both fit with an intercept and are scored on the same held-out rows (pooled R², ``variance_weighted``).
Goals: time ratio sklearn / streamed ≥ 5, extra-memory ratio streamed / sklearn ≤ 0.25, |ΔR²| ≤ 1e-4.
Times are the best of ``--repeats`` subprocess runs, alternating the methods.

Run: ``python benchmarks/bench_lstsq.py [--n-train 200000] [--n-test 20000] [--dim 576] [--repeats 2]``
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _rss_mb(field: str = "VmHWM") -> float:
    """Peak (``VmHWM``) or current (``VmRSS``) resident memory of this process, MiB. Read from /proc rather than
    ``getrusage``: ``ru_maxrss`` survives exec, so a child would inherit the parent's peak (the generated data)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _read_batches(path: Path, bs: int):
    """float32 rows of a 2-D ``.npy`` in batches, by plain reads into one reused buffer (no mmap, no full load)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = read_header(f)
        buf = np.empty((bs, shape[1]), dtype=np.float32)
        for i in range(0, shape[0], bs):
            m = min(bs, shape[0] - i)
            f.readinto(memoryview(buf[:m]).cast("B"))
            yield buf[:m]


def child(method: str, folder: Path, bs: int, threads: int) -> dict:
    import torch
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score

    from probekit.probes.lstsq import StreamedLeastSquares

    torch.set_num_threads(threads)
    if method == "sklearn":
        X, Y = np.load(folder / "x_train.npy"), np.load(folder / "y_train.npy")
        base = _rss_mb()
        t0 = time.perf_counter()
        est = LinearRegression().fit(X, Y)
        seconds = time.perf_counter() - t0
        peak = _rss_mb()
        Xte, Yte = np.load(folder / "x_test.npy"), np.load(folder / "y_test.npy")
        r2 = r2_score(Yte, est.predict(Xte), multioutput="variance_weighted")
    else:
        base = _rss_mb()
        t0 = time.perf_counter()
        est = StreamedLeastSquares(fit_intercept=True)
        for xb, yb in zip(_read_batches(folder / "x_train.npy", bs), _read_batches(folder / "y_train.npy", bs)):
            est.partial_fit(torch.from_numpy(xb), torch.from_numpy(yb))
        est.coef_  # the solve
        seconds = time.perf_counter() - t0
        peak = _rss_mb()
        test = zip(_read_batches(folder / "x_test.npy", bs), _read_batches(folder / "y_test.npy", bs))
        r2 = est.score_batches((torch.from_numpy(x), torch.from_numpy(y)) for x, y in test).r2
    return dict(seconds=seconds, base_rss_mb=base, peak_rss_mb=peak, extra_rss_mb=peak - base, r2=float(r2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=200_000)
    ap.add_argument("--n-test", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.folder), args.batch_size, args.threads)))
        return

    n, m, d = args.n_train, args.n_test, args.dim
    results: dict = dict(n_train=n, n_test=m, dim=d, batch_size=args.batch_size, threads=args.threads,
                         cpu=platform.processor() or platform.machine(), python=platform.python_version())
    with tempfile.TemporaryDirectory(prefix="probekit-bench-lstsq-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        # residual-stream-like X: a large mean, uneven scales; Y: affine in X plus a nonlinear part and noise
        scale = np.exp(rng.normal(0, 1, d)).astype(np.float32)
        mean = rng.normal(0, 3, d).astype(np.float32)
        W = (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
        for name, rows in (("train", n), ("test", m)):
            X = rng.standard_normal((rows, d), dtype=np.float32) * scale + mean
            Y = X @ W + 0.5 * np.tanh(X[:, ::-1]) + 0.3 * rng.standard_normal((rows, d), dtype=np.float32)
            np.save(folder / f"x_{name}.npy", X)
            np.save(folder / f"y_{name}.npy", Y.astype(np.float32))
            del X, Y
        print(f"data: train {n:,} x {d} -> {d}, test {m:,}, float32 ({2 * n * d * 4 / 2**20:.0f} MiB of training "
              f"data; built in {time.perf_counter() - t0:.1f} s); {args.threads} threads, batch {args.batch_size}")
        runs: dict[str, list[dict]] = {"sklearn": [], "streamed": []}
        for _ in range(args.repeats):
            for method in runs:
                out = subprocess.run([sys.executable, __file__, "--child", method, "--folder", str(folder),
                                      "--batch-size", str(args.batch_size), "--threads", str(args.threads)],
                                     capture_output=True, text=True)
                if out.returncode:
                    raise RuntimeError(f"{method} subprocess failed:\n{out.stderr}")
                runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = {k: min(r["seconds"] for r in v) for k, v in runs.items()}
    first = {k: v[0] for k, v in runs.items()}
    t_ratio = best["sklearn"] / best["streamed"]
    mem_ratio = first["streamed"]["extra_rss_mb"] / first["sklearn"]["extra_rss_mb"]
    peak_ratio = first["streamed"]["peak_rss_mb"] / first["sklearn"]["peak_rss_mb"]
    dr2 = abs(first["streamed"]["r2"] - first["sklearn"]["r2"])
    print(f"sklearn LinearRegression: {best['sklearn']:.2f} s, peak RSS {first['sklearn']['peak_rss_mb']:.0f} MiB "
          f"(+{first['sklearn']['extra_rss_mb']:.0f} MiB over the loaded data), held-out R² "
          f"{first['sklearn']['r2']:.6f}")
    print(f"StreamedLeastSquares:     {best['streamed']:.2f} s, peak RSS {first['streamed']['peak_rss_mb']:.0f} MiB "
          f"(+{first['streamed']['extra_rss_mb']:.0f} MiB over imports), held-out R² {first['streamed']['r2']:.6f}")
    print(f"time ratio sklearn / streamed: {t_ratio:.2f}x  (goal ≥ 5)  {'OK' if t_ratio >= 5 else 'UNDER'}")
    print(f"extra-memory ratio streamed / sklearn: {mem_ratio:.3f}  (goal ≤ 0.25)  "
          f"{'OK' if mem_ratio <= 0.25 else 'OVER'};  total peak RSS ratio {peak_ratio:.3f}")
    print(f"|ΔR²| held out: {dr2:.2e}  (goal ≤ 1e-4)  {'OK' if dr2 <= 1e-4 else 'OVER'}")
    results.update(runs=runs, best_seconds=best, time_ratio=t_ratio, extra_memory_ratio=mem_ratio,
                   peak_memory_ratio=peak_ratio, r2_abs_diff=dr2)
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "lstsq.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
