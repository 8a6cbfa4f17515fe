"""The static image of a notebook figure: one browser per process (probekit.notebook) against one per figure.

Workload: ``--figures`` tutorial-sized figures (a 64 × 64 heatmap with a colour bar, a grouped bar chart with 3 × 12
bars, alternating), each to a 700 × 500 PNG by kaleido in the local Chromium.

- baseline: ``plotly.io.to_image`` with no kaleido server running: kaleido starts and closes a browser per figure
  (what plotly's ``png`` renderer does in a notebook);
- ``probekit.notebook.figure_png``: starts kaleido's sync server (one browser) on first use and reuses it; its time
  here includes that start.

Each round runs the baseline, then starts the server, draws the same figures and stops it again; the best of
``--repeats`` rounds is reported. Goal: ratio baseline / probekit ≥ 2 for 6 figures.

Run: ``python benchmarks/bench_notebook_png.py [--figures 6] [--repeats 2]``
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

from probekit import notebook


def figures(n: int) -> list[go.Figure]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if i % 2 == 0:
            fig = go.Figure(go.Heatmap(z=rng.standard_normal((64, 64)), colorbar_title="value"))
        else:
            fig = go.Figure([go.Bar(x=[f"c{j}" for j in range(12)], y=rng.random(12), name=f"layer {k}")
                             for k in range(3)])
            fig.update_layout(barmode="group")
        fig.update_layout(title=f"figure {i}", xaxis_title="x", yaxis_title="y")
        out.append(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--figures", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import kaleido

    figs = figures(args.figures)
    path = notebook.chromium_path()
    if path is None:
        raise SystemExit("no Chromium found: " + notebook.INSTALL_HINT)
    import os

    os.environ.setdefault("BROWSER_PATH", path)  # the baseline's kaleido finds the same browser
    base, ours = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        a = [pio.to_image(f, format="png") for f in figs]
        base.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = [notebook.figure_png(f) for f in figs]
        ours.append(time.perf_counter() - t0)
        kaleido.stop_sync_server(silence_warnings=True)
        notebook._server_started = False  # the next round starts it again  # noqa: SLF001 (benchmark only)
        assert [x[:8] for x in a] == [x[:8] for x in b] == [b"\x89PNG\r\n\x1a\n"] * len(figs)
    tb, to = min(base), min(ours)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; Chromium {path}")
    print(f"{args.figures} figures → PNG: one browser per figure {tb:.1f} s ({tb / len(figs):.2f} s/figure), "
          f"one per process {to:.1f} s ({to / len(figs):.2f} s/figure); ratio {tb / to:.1f}×")


if __name__ == "__main__":
    main()
