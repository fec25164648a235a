"""Collectives the training loop needs on CPU (gloo) and GPU (NCCL) alike; a no-op without a
process group (one worker, unit tests)."""

from __future__ import annotations

import torch


def all_reduce(values: torch.Tensor) -> torch.Tensor:
    """Sum a small CPU tensor over ranks. NCCL reduces CUDA tensors only: there the sums make
    the round trip through this rank's GPU."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":
            on_gpu = values.to(torch.device("cuda", torch.cuda.current_device()))
            torch.distributed.all_reduce(on_gpu)
            return on_gpu.cpu()
        torch.distributed.all_reduce(values)
    return values


def on_every_rank(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank (a collective: every rank must call it alike)."""
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return int(all_reduce(torch.tensor([float(ok)], dtype=torch.float64))[0]) == world
