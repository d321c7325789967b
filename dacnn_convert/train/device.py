"""Where a model runs: ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N``, and torchrun's LOCAL_RANK.

Every command that runs a model takes ``--device`` and resolves it here, so that a machine
with a GPU trains on it without being told, and ``torchrun`` gives each process its own GPU.
"""

from __future__ import annotations

import torch

from ..defaults import DEVICE_HELP
from ..errors import UsageError
from .distributed import launch_local_rank, launch_world


def local_rank() -> int:
    """This process's GPU index under torchrun (0 without it)."""
    return launch_local_rank()


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The device ``spec`` names, checked against what this machine has.

    ``auto`` is ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; ``cuda`` is
    ``cuda:LOCAL_RANK``; ``cuda:N`` must exist.

    Raises:
        UsageError: an unknown spec, or a CUDA device this machine does not have.
    """
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index = text.partition(":")[2]
        if index and not index.isdigit():
            raise UsageError(f"device {spec!r}: the GPU index must be a number, e.g. cuda:0")
        if not torch.cuda.is_available():
            raise UsageError(
                f"device {spec!r} requested, but no CUDA device is available on this machine; use cpu or auto"
            )
        n = int(index) if index else local_rank()
        world = launch_world()
        if world > 1 and n != local_rank():
            raise UsageError(
                f"device {spec!r}: under torchrun each process uses the GPU of its LOCAL_RANK "
                f"(here cuda:{local_rank()}); use cuda or auto"
            )
        count = torch.cuda.device_count()
        if n >= count:
            raise UsageError(
                f"device cuda:{n} does not exist: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
            )
        return torch.device("cuda", n)
    raise UsageError(f"unknown device {spec!r}; expected {DEVICE_HELP}")


def device_of(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
