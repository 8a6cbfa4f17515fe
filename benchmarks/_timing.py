"""Shared timing loop for the benchmark scripts (run as ``python benchmarks/bench_*.py``)."""

from __future__ import annotations

import time
from typing import Callable


def interleaved_times(methods: dict[str, Callable[[], object]], repeats: int,
                      sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds of each method over ``repeats`` rounds, after one warm-up call each (allocator, kernels, page
    cache). Rounds are interleaved so that drift on a shared machine hits every method alike."""
    for f in methods.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(repeats):
        for k, f in methods.items():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t0)
    return times
