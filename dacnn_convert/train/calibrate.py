"""BatchNorm recalibration: re-estimate running statistics after the kernels changed."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..core.convert import BN_STALE_ATTR
from ..core.modes import mode
from ..defaults import CALIBRATE_BATCHES
from ..validate import inputs_of


def needs_bn_calibration(model: nn.Module) -> bool:
    """Is ``model`` fresh from a conversion, with BN statistics that describe the original's kernels?"""
    return bool(getattr(model, BN_STALE_ATTR, False))


def recalibrate_bn(model: nn.Module, batches: Iterable, num_batches: int = CALIBRATE_BATCHES) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them as a cumulative average.

    Anchoring changes each layer's kernel, so the statistics the pretrained BNs hold are
    stale; a few forward passes fix them without any gradient step.

    Args:
        model: the converted model (any module with BatchNorm layers).
        batches: yields ``(images, labels)`` or images.
        num_batches: how many batches to use.

    Returns:
        The number of batches actually used.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = {m: m.momentum for m in bns}
    device = next(model.parameters()).device
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the calibration batches
    used = 0
    try:
        with mode(model, train=True), torch.no_grad():
            for batch in batches:
                if used >= num_batches:
                    break
                model(inputs_of(batch).to(device))
                used += 1
    finally:
        for m, mom in momenta.items():
            m.momentum = mom
    if used and hasattr(model, BN_STALE_ATTR):
        setattr(model, BN_STALE_ATTR, False)
    return used
