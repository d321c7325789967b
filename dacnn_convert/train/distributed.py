"""torchrun support: join the process group when launched by torchrun, and rank helpers."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..errors import UsageError, first_line

_LAUNCH = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not (value.isascii() and value.isdigit()):
        raise UsageError(f"environment variable {name}={value!r} is not a non-negative integer; torchrun sets it")
    return int(value)


def _check_resolves(host: str) -> None:
    """A MASTER_ADDR no name server knows is refused at once (the rendezvous would wait for it for 30 minutes)."""
    import socket

    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError) as exc:
        raise UsageError(
            f"MASTER_ADDR={host!r} does not resolve ({first_line(exc, 80)}): give the host of rank 0 "
            "(torchrun sets it; 127.0.0.1 on one machine)"
        ) from None


def launch_world() -> int:
    """The world size torchrun announced in the environment (1 without torchrun).

    Raises:
        UsageError: ``WORLD_SIZE`` is not an integer, or is above 1 without the variables torchrun sets
            beside it (a ``WORLD_SIZE=2`` left in the shell is not a launch).
    """
    world = _env_int("WORLD_SIZE", 1)
    if world > 1:
        missing = [name for name in _LAUNCH if not os.environ.get(name, "").strip()]
        if missing:
            raise UsageError(
                f"WORLD_SIZE={world} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
                f"start the job with torchrun --nproc-per-node {world} (it sets all of them), or unset WORLD_SIZE "
                "to run in one process"
            )
        for name in ("RANK", "LOCAL_RANK"):
            if _env_int(name, 0) >= world:
                raise UsageError(f"{name}={os.environ[name]} is not below WORLD_SIZE={world}; torchrun sets both")
        port = _env_int("MASTER_PORT", 0)
        if not 1 <= port <= 65535:
            raise UsageError(f"MASTER_PORT={port} is not a TCP port (1 to 65535); torchrun sets it")
        _check_resolves(os.environ["MASTER_ADDR"])
    return world


def launch_rank() -> int:
    """This process's rank as torchrun announced it (0 without torchrun)."""
    return _env_int("RANK", 0) if launch_world() > 1 else 0


def launch_local_rank() -> int:
    """This process's local rank (its GPU index) as the launcher announced it (0 without one)."""
    launch_world()  # a broken WORLD_SIZE is refused first
    return _env_int("LOCAL_RANK", 0)


def init_from_env(device: torch.device | None = None) -> tuple[int, int]:
    """Join the process group torchrun described in the environment; returns (rank, world size).

    Without torchrun (no WORLD_SIZE, or 1) nothing happens and (0, 1) is returned. On a CUDA
    ``device`` the process's GPU is selected first (NCCL needs it before the group exists) and
    the backend is NCCL; on the CPU it is gloo. Call :func:`shutdown` when the job ends.
    """
    world = launch_world()
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
