"""Child process for the crash and scale-out tests: capture a text file into a cache root.

usage: python -m tests.unit._capture_child MODEL_DIR TEXTS_FILE CACHE_ROOT [--slow]
``--slow`` adds a short sleep to every atomic file write, so a SIGKILL sent at a random time lands inside
the write protocol (between temp write, rename and manifest update) rather than only inside a forward.
"""

import sys
import time

import torch

torch.set_num_threads(1)

from probekit import cache as cache_mod  # noqa: E402
from probekit.cache import ActivationCache  # noqa: E402
from probekit.capture import CaptureConfig  # noqa: E402
from probekit.distributed import init_from_env  # noqa: E402
from probekit.models import load_model  # noqa: E402

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post", "blocks.2.attn.hook_z"]


def main() -> None:
    model_dir, texts_file, root = sys.argv[1:4]
    if "--slow" in sys.argv:
        original = cache_mod._atomic_write

        def slow(path, data):
            time.sleep(0.01)
            original(path, data)

        cache_mod._atomic_write = slow
    rank, world, device = init_from_env()
    bridge, tok = load_model(model_dir)
    texts = open(texts_file, encoding="utf-8").read().split("\n\x00\n")
    cfg = CaptureConfig(hooks=HOOKS, batch_size=2, max_length=64, dtype="bfloat16", progress=False)
    print("ready", flush=True)
    run = ActivationCache(root).capture(bridge, texts, cfg, tokenizer=tok, batches_per_shard=1, rank=rank,
                                        world_size=world)
    print(f"done {run.run_id}", flush=True)


if __name__ == "__main__":
    main()
