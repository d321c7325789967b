"""What a run leaves on disk to be resumed: state.pt (atomic), its compatibility check, metrics.csv, TensorBoard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write
from ..errors import DacnnError, first_line
from .config import TrainConfig


class NonFiniteLossError(DacnnError):
    """The loss became NaN or infinite."""


class ResumeError(DacnnError):
    """``state.pt`` cannot continue this run (unreadable, or from another model, optimiser or data)."""


def save_state(path: Path, state: dict[str, Any]) -> Path:
    """torch.save, atomically: a crash never leaves a half-written checkpoint."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


STATE_KEYS = ("model", "optimizer", "rng", "epoch", "batch", "step", "history", "best_acc")


def data_signature(batches: Any) -> str | None:
    """What a run trains on, in words, for ``state.pt``: a resumed run must read the same data.

    The dataset's name (or class), its number of examples and, for the package's own loaders,
    the size the images are brought to; None for an iterable that tells nothing of itself.
    """
    x = getattr(batches, "x", None)
    if isinstance(x, torch.Tensor) and hasattr(batches, "size") and hasattr(batches, "channels"):
        name = getattr(batches, "name", None) or "tensors"
        return f"{name}: {len(x):,} images at {batches.channels}x{batches.size}x{batches.size}"
    loader = getattr(batches, "loader", batches)  # a DataLoader, or the package's wrapper of one
    dataset = getattr(loader, "dataset", None)
    if dataset is None:
        return None
    try:
        count = f" of {len(dataset):,} examples"
    except TypeError:
        count = ""
    return f"{type(dataset).__name__}{count}"


def resume_state(
    path: Path,
    device: torch.device,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    per_epoch: int,
    cfg: TrainConfig,
    data: str | None = None,
) -> dict[str, Any]:
    """``path`` read and checked against this run before anything is restored from it.

    Raises:
        ResumeError: unreadable or truncated, not a training state, or written by a run with
            another model, optimiser, number of steps per epoch or data (``data``: this run's
            :func:`data_signature`; says which).
    """

    def refuse(why: str) -> ResumeError:
        return ResumeError(f"cannot resume from {path}: {why}; to start over instead, use «overwrite»")

    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise refuse(f"it is not a readable training state ({first_line(exc, 120)})") from exc
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise refuse("it is not a dacnn training state (keys missing)")
    mine, theirs = model.state_dict(), state["model"]
    if not isinstance(theirs, dict):
        raise refuse("its model entry is not a state dict")
    missing = [k for k in mine if k not in theirs]
    if missing or len(theirs) != len(mine):
        raise refuse(
            f"it belongs to another model ({len(missing)} of this model's tensors missing, e.g. {missing[:2]})"
        )
    shape = next((k for k in mine if tuple(theirs[k].shape) != tuple(mine[k].shape)), None)
    if shape is not None:
        raise refuse(
            f"it belongs to another model ({shape} has shape {tuple(theirs[shape].shape)}, here "
            f"{tuple(mine[shape].shape)})"
        )
    name = state.get("optimizer_name")
    groups = state["optimizer"].get("param_groups", []) if isinstance(state["optimizer"], dict) else []
    if (name is not None and name != cfg.optimizer) or len(groups) != len(opt.param_groups):
        raise refuse(f"it was written with optimizer {name or 'another'}, this run uses {cfg.optimizer}")
    written = state.get("steps_per_epoch")
    if written is not None and written != per_epoch:
        raise refuse(
            f"it was written with {written} steps per epoch and this run has {per_epoch} "
            "(another «batch-size», «train-limit» or «limit-batches»?)"
        )
    theirs_data = state.get("data")
    if theirs_data is not None and data is not None and theirs_data != data:
        raise refuse(
            f"it was written training on {theirs_data} and this run reads {data} "
            "(another «dataset», «input-size» or «train-limit»?)"
        )
    return state


def append_csv(path: Path, row: dict[str, float]) -> None:
    new = not path.exists()
    with path.open("a") as f:
        if new:
            f.write(",".join(row) + "\n")
        f.write(",".join(f"{v:.6g}" for v in row.values()) + "\n")


def tensorboard_writer(out: Path) -> Any:
    """A TensorBoard writer in ``out/tb`` when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tb"))
