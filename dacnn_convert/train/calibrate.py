"""BatchNorm recalibration: re-estimate running statistics after the kernels changed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..core.convert import BN_STALE_ATTR
from ..core.layers import Regulator
from ..core.modes import mode
from ..defaults import CALIB_BATCHES
from ..validate import inputs_of


def needs_bn_calibration(model: nn.Module) -> bool:
    """Is ``model`` fresh from a conversion, with BN statistics that describe the original's kernels?"""
    return bool(getattr(model, BN_STALE_ATTR, False))


def recalibrate_bn(model: nn.Module, batches: Iterable, num_batches: int = CALIB_BATCHES) -> int:
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
    # fitted adapters (regulator_init="fit") pass their input through an identity BN: it stays the
    # identity, measured rather than re-normalised (Regulator.set_fitted)
    fitted = [r for r in model.modules() if isinstance(r, Regulator) and r.identity_pending]
    skip = {id(r.bn) for r in fitted}
    bns = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and id(m) not in skip
    ]
    momenta = {m: m.momentum for m in bns}
    device = next(model.parameters()).device
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the calibration batches
    sums: dict[int, tuple[Any, Any, int]] = {}  # per fitted BN: sum, sum of squares, count (float64)

    def measure(bn: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        z = inp[0].detach().double().transpose(0, 1).flatten(1)  # (C, N*H*W)
        total, squares, n = sums.get(id(bn), (0.0, 0.0, 0))
        sums[id(bn)] = (z.sum(1) + total, z.pow(2).sum(1) + squares, n + z.shape[1])

    handles = [r.bn.register_forward_pre_hook(measure) for r in fitted]
    used = 0
    try:
        with mode(model, train=True), torch.no_grad():
            for r in fitted:
                r.bn.eval()  # the identity while the host BNs are measured
            for batch in batches:
                if used >= num_batches:
                    break
                model(inputs_of(batch).to(device))
                used += 1
    finally:
        for m, mom in momenta.items():
            m.momentum = mom
        for h in handles:
            h.remove()
    for r in fitted:
        if id(r.bn) in sums:
            total, squares, n = sums[id(r.bn)]
            mean = total / n
            var = (squares / n - mean.pow(2)).clamp_min(0)
            with torch.no_grad():
                bn = r.bn
                bn.running_mean.copy_(mean)  # type: ignore[union-attr]
                bn.running_var.copy_(var)  # type: ignore[union-attr]
                bn.weight.copy_((var + bn.eps).sqrt())
                bn.bias.copy_(mean)
                bn.num_batches_tracked.fill_(used)  # type: ignore[union-attr]
            r.identity_pending = False
    if used and hasattr(model, BN_STALE_ATTR):
        setattr(model, BN_STALE_ATTR, False)
    return used
