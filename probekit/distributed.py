"""Scale-out capture with ``torchrun``: each rank captures its own batches, rank 0 merges the manifests.

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

from .cache import ActivationCache, CacheError, Run, RunKey, RunWriter, _read_manifest, write_manifest


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


def capture_distributed(cache: ActivationCache, model, docs, cfg, key: RunKey, *, rank: int, world_size: int,
                        tokenizer=None) -> Run:
    """This rank's share of a capture into ``cache``; every rank returns the merged run."""
    from .capture import capture as run_capture

    if not dist.is_initialized():
        raise CacheError("world_size > 1 needs a process group: start with torchrun (see probekit.distributed)")
    run_dir = cache.runs_dir / key.run_id
    merged = run_dir / "manifest.json"
    if not merged.is_file():
        w = RunWriter(run_dir / f"rank-{rank}", key, dict(rank=rank, world_size=world_size))
        if not w.complete:
            try:
                run_capture(model, docs, cfg, writer=w, tokenizer=tokenizer,
                            batch_filter=lambda i: i % world_size == rank)
            except BaseException:
                w.abort()
                raise
        else:
            w.abort()
    dist.barrier()
    if rank == 0 and not merged.is_file():
        merge_ranks(run_dir, key, world_size)
    dist.barrier()
    return Run(run_dir)


def merge_ranks(run_dir, key: RunKey, world_size: int) -> None:
    """Write ``run_dir/manifest.json`` listing every rank's shards (paths relative to ``run_dir``)."""
    bodies = []
    for r in range(world_size):
        body = _read_manifest(run_dir / f"rank-{r}" / "manifest.json")
        if not body["complete"]:
            raise CacheError(f"{run_dir}/rank-{r} is not complete; re-run the same torchrun command to resume")
        bodies.append(body)
    hooks = {}
    for b in bodies:
        for h, info in b["hooks"].items():
            if hooks.setdefault(h, info) != info:
                raise CacheError(f"ranks disagree on hook {h}: {hooks[h]} vs {info}")
    shards = []
    for r, b in enumerate(bodies):
        for s in b["shards"]:
            files = {role: {**f, "path": f"rank-{r}/{f['path']}"} for role, f in s["files"].items()}
            shards.append({**s, "files": files, "rank": r})
    body = dict(format=bodies[0]["format"], config=dict(key=key.to_dict(), world_size=world_size),
                hooks=hooks, shards=shards, complete=True)
    write_manifest(run_dir, body)
