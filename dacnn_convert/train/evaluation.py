"""Top-1 accuracy of a model on batches, and moving batches to a device."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..core.modes import mode
from ..errors import NonFiniteOutputError, UsageError
from ..validate import class_indices, labelled
from .precision import autocast, resolve_precision


def evaluate(model: nn.Module, batches: Iterable, precision: str = "auto", limit_batches: int | None = None) -> float:
    """Top-1 accuracy (fraction) of ``model`` in eval mode; its train/eval mode is restored.

    Raises:
        NonFiniteOutputError: an output is NaN or infinite (damaged weights, e.g. a negative BN
            variance): argmax over NaN would still "score" a class, so no accuracy is returned.
        UsageError: ``batches`` yields nothing (an accuracy of an empty set is no number).
    """
    return evaluate_counts(model, batches, precision, limit_batches)[0]


def evaluate_counts(
    model: nn.Module, batches: Iterable, precision: str = "auto", limit_batches: int | None = None
) -> tuple[float, int]:
    """Top-1 accuracy and the number of examples it was measured on (see :func:`evaluate`)."""
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    correct = total = 0
    with mode(model), torch.no_grad(), autocast(precision, device):
        for i, batch in enumerate(batches):
            if limit_batches is not None and i >= limit_batches:
                break
            x, y = labelled(batch)
            out = model(to_device(x, device))
            if not bool(torch.isfinite(out).all()):
                raise NonFiniteOutputError(
                    f"the model's outputs are NaN or infinite on batch {i} (of {len(y)} examples): its weights "
                    "are damaged (a negative BatchNorm variance, an overflow, or a fine-tune at too high an «lr»); "
                    "no accuracy is reported"
                )
            class_indices(y, out.shape[-1])
            correct += int((out.argmax(dim=1).cpu() == y.cpu()).sum())
            total += len(y)
    if total == 0:
        raise UsageError("the evaluation data yielded no examples: an accuracy needs at least one batch")
    return correct / total, total


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch to ``device``; from pinned memory (the loaders' ``pin_memory``) without blocking the host."""
    return t.to(device, non_blocking=device.type == "cuda" and t.is_pinned())
