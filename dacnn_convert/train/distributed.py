"""torchrun support: join the process group when launched by torchrun, and rank helpers."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: torch.device | None = None) -> tuple[int, int]:
    """Join the process group torchrun described in the environment; returns (rank, world size).

    Without torchrun (no WORLD_SIZE, or 1) nothing happens and (0, 1) is returned. On a CUDA
    ``device`` the process's GPU is selected first (NCCL needs it before the group exists) and
    the backend is NCCL; on the CPU it is gloo. Call :func:`shutdown` when the job ends.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    cuda = device is not None and device.type == "cuda"
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend_for(device))
    return dist.get_rank(), dist.get_world_size()


def backend_for(device: torch.device | None) -> str:
    """NCCL for CUDA devices, gloo for the CPU."""
    return "nccl" if device is not None and device.type == "cuda" else "gloo"


def shutdown() -> None:
    """Leave the process group, if this process joined one (the end of a torchrun job)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Only rank 0 logs and writes checkpoints."""
    return rank() == 0


def all_sum(values: list[float]) -> list[float]:
    """Sum floats over ranks (identity in a single process)."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()
