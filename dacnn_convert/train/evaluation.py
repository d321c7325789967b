"""Top-1 accuracy of a model on batches, and moving batches to a device."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..core.modes import mode
from .precision import autocast, resolve_precision


def evaluate(model: nn.Module, batches: Iterable, precision: str = "auto", limit_batches: int | None = None) -> float:
    """Top-1 accuracy (fraction) of ``model`` in eval mode; its train/eval mode is restored."""
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    correct = total = 0
    with mode(model), torch.no_grad(), autocast(precision, device):
        for i, (x, y) in enumerate(batches):
            if limit_batches is not None and i >= limit_batches:
                break
            pred = model(to_device(x, device)).argmax(dim=1)
            correct += int((pred.cpu() == y).sum())
            total += len(y)
    return correct / max(total, 1)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch to ``device``; from pinned memory (the loaders' ``pin_memory``) without blocking the host."""
    return t.to(device, non_blocking=device.type == "cuda" and t.is_pinned())
