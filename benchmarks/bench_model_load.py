"""Model load time: the converted fp32 safetensors folder vs loading the registry GGUF directly.

Figure (BENCHMARKS.md, "Models"): seconds to load SmolLM2-135M from ``cache/models/smollm2-135m`` (what every
``load_model`` after the first fetch does) against transformers' own GGUF load + dequantisation (what each
load would cost without the one-time conversion), and the bridge boot on top. Median of 3, same process
(imports warm).

Run: ``python benchmarks/bench_model_load.py``
"""

from __future__ import annotations

import statistics
import time

import torch

from probekit.models import fetch_model, gguf_source_path, load_hf, load_model


def timed(f, n=3):
    f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    from transformers import AutoModelForCausalLM

    fetch_model("smollm2-135m", verbose=False)
    gguf = gguf_source_path("smollm2-135m")
    t_folder = timed(lambda: load_hf("smollm2-135m"))
    t_gguf = timed(lambda: AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                                dtype=torch.float32))
    t_bridge = timed(lambda: load_model("smollm2-135m"))
    print(f"load fp32 folder: {t_folder:.2f} s;  load GGUF + dequantise: {t_gguf:.2f} s;  "
          f"ratio {t_folder / t_gguf:.3f} ({t_gguf / t_folder:.1f}× faster)")
    print(f"load_model (folder + TransformerBridge boot + plain twin): {t_bridge:.2f} s")


if __name__ == "__main__":
    main()
