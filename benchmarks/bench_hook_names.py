"""Capture form: the model's hook names from its config on the meta device vs loading the model.

Figure (BENCHMARKS.md, "App: hook names before the job"): seconds to list SmolLM2-135M's TransformerBridge hook
names the way the capture page does (``app.data.model_hook_names``: config → meta-device model → bridge boot, no
weights read) against loading the model as the capture worker does (``probekit.models.load_model``), and the
check that both list the same names. Interleaved rounds, median of 3 after a warm-up (imports warm).

Run: ``PROBEKIT_CACHE=<cache root with models/smollm2-135m> python benchmarks/bench_hook_names.py``
"""

from __future__ import annotations

import os
import statistics

from _timing import interleaved_times

from app import data
from probekit.models import load_model


def main() -> None:
    root = data.set_root(os.environ.get("PROBEKIT_CACHE") or "cache")
    names = data.model_hook_names("smollm2-135m")

    def from_config():
        data.clear_caches()  # no memo: the cost of a first request
        return data.model_hook_names("smollm2-135m")

    def from_weights():
        return sorted(load_model("smollm2-135m", fetch=False)[0].hook_dict, key=data.hook_order_key)

    assert from_weights() == names, "the meta-device names differ from the loaded model's"
    t = interleaved_times({"config (meta device)": from_config, "load_model": from_weights}, repeats=3)
    med = {k: statistics.median(v) for k, v in t.items()}
    print(f"cache root {root}; {len(names)} hook names, identical both ways")
    print(f"hook names from config on meta device: {med['config (meta device)']:.2f} s;  load_model: "
          f"{med['load_model']:.2f} s;  ratio {med['config (meta device)'] / med['load_model']:.3f} "
          f"({med['load_model'] / med['config (meta device)']:.1f}x faster)")


if __name__ == "__main__":
    main()
