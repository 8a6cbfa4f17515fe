"""Scale-out capture with ``torchrun``: the process group. The per-rank runs and their merge are part of the
run format and live in :mod:`probekit.cache` (``ActivationCache.capture(..., rank=, world_size=)``).

``torchrun --nproc-per-node N -m probekit capture …`` runs the same command in N processes. Batches (the
length buckets ``capture`` makes) are dealt round-robin: rank r takes batches r, r+N, r+2N, … Each rank
writes a complete run of its own under ``<run>/rank-<r>/`` (same crash-safe protocol, resumable per rank);
after a barrier rank 0 writes ``<run>/manifest.json`` listing every rank's shards in rank order. Rows are
the same as a one-process capture of the same config; their order differs and is recorded in the metadata
(``doc_index``, ``position``).

The process group uses NCCL when CUDA is present and gloo otherwise; the tests run 2 CPU processes on gloo.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def env_rank() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (``(0, 1, 0)`` when absent)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init_from_env() -> tuple[int, int, str]:
    """Join the process group torchrun set up; return ``(rank, world_size, device)``."""
    rank, world, local = env_rank()
    device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return rank, world, device
