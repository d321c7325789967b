"""Borrowing a caller's model without changing it: train/eval flags restored on exit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def mode(*models: nn.Module, train: bool = False) -> Iterator[None]:
    """Run the block with ``models`` in eval mode (``train=True``: train mode); afterwards every
    submodule gets back its own flag, so a model that was partly frozen in eval stays so."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.train(train)
        yield
    finally:
        for m, training in saved:
            m.training = training
