"""Wall time of the seeds report from an empty cache (model fetches included), stage by stage, against the
one-hour budget on 2 CPU cores (issue: the four papers side by side in under an hour).

    python benchmarks/bench_seeds_report.py [--scale tiny] [--keep DIR]

Runs ``probekit report configs/seeds.yaml`` in a fresh process with ``PROBEKIT_CACHE`` and ``--out`` in a new
temporary folder (nothing of ./cache is reused), then prints each stage's seconds (the report's own timings) and
the total wall time as a fraction of 3,600 s. The baseline is the budget, not a second run: the report is the
only way the four stages run together. Expect ≈ 25 min on 2 quiet cores; much more on a shared machine.
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

BUDGET_S = 3600.0
ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", help="a scale of configs/seeds.yaml (e.g. tiny for a smoke run)")
    ap.add_argument("--keep", help="folder for the cache and the report (default: a temporary one, removed)")
    args = ap.parse_args()
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="seeds-bench-")
    work = Path(args.keep or tmp.name)
    env = {**os.environ, "PROBEKIT_CACHE": str(work / "cache")}
    cmd = [sys.executable, "-m", "probekit", "report", str(ROOT / "configs" / "seeds.yaml"), "--out",
           str(work / "reports")] + (["--scale", args.scale] if args.scale else [])
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    name = "seeds" + (f"-{args.scale}" if args.scale else "")
    metrics = json.loads((work / "reports" / name / "metrics.json").read_text())
    print(f"{'stage':<20} {'seconds':>9}")
    for stage, s in metrics["stages"].items():
        print(f"{stage:<20} {s['seconds']:>9.1f}{'  (reused)' if s['reused'] else ''}")
    print(f"{'total (wall)':<20} {wall:>9.1f}   = {wall / BUDGET_S:.2f} × the one-hour budget; "
          f"cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
