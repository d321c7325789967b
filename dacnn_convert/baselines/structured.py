"""Structured (channel) pruning through Torch-Pruning, searched to hit a parameter budget.

``l1-filter`` ranks each group of coupled channels by the L1 norm of the filter that
produces it (Li et al. 2017, "Pruning Filters for Efficient ConvNets"); ``group-norm``
by the L2 norm over every weight the group touches (Fang et al. 2023, DepGraph). Both
prune the same fraction of channels in every layer. Torch-Pruning's ``pruning_ratio`` is a
channel ratio, so it is searched by bisection until the unique parameter count is within
1% of the target. The result is a dense, smaller model; :func:`dacnn_convert.io.resize.resize_to_state` rebuilds
its skeleton from tensor shapes alone, so the artefact reloads without pickles.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.plan import count_params
from ..core.pruning import channel_prune
from ..errors import PlanError, UsageError
from ..io.checkpoint import save
from . import Compressed, Context, register_method

TOLERANCE = 0.01


def ensure_unshared(model: nn.Module, method: str) -> None:
    """Refuse a model whose weights are shared: pruning would silently duplicate them.

    Raises:
        UsageError: the model is anchored or ties parameters; prune the original instead.
    """
    seen: set[int] = set()
    shared = any(type(m).__name__ in ("AnchoredConv2d", "AnchorBank") for m in model.modules())
    for _, p in model.named_parameters(remove_duplicate=False):
        shared = shared or p.data_ptr() in seen
        seen.add(p.data_ptr())
    if shared:
        raise UsageError(
            f"{method} cannot prune a model with shared weights: Torch-Pruning un-shares them silently and the "
            "'compressed' model grows. Prune the original model, or anchor after pruning"
        )


def _bisect(
    count: Callable[[float], tuple[int, nn.Module]], target: int, lo: float, hi: float, steps: int
) -> list[tuple[float, float, int, nn.Module]]:
    """Bisect a ratio in [lo, hi] where the count falls as the ratio grows; every try, as (error, ratio, n, model)."""
    tries: list[tuple[float, float, int, nn.Module]] = []
    for _ in range(steps):
        mid = (lo + hi) / 2
        n, model = count(mid)
        tries.append((abs(n - target) / target, mid, n, model))
        if tries[-1][0] <= TOLERANCE / 2:
            break
        lo, hi = (mid, hi) if n > target else (lo, mid)
    return tries


def search_ratio(
    teacher: nn.Module,
    target: int,
    importance: str,
    input_size: tuple[int, int, int],
    steps: int = 20,
    measure: str = "params",
) -> tuple[nn.Module, str]:
    """Find channel ratios that bring a pruned copy of ``teacher`` to ``target`` params (within 1%), or to
    ``target`` MACs per example with ``measure="macs"``.

    First one uniform ratio by bisection; if its steps jump over the target, the widest layers
    get a ratio of their own, bisected between the two uniform ratios that bracket the target.

    Returns:
        The pruned copy and a note of the ratios used.

    Raises:
        PlanError: no ratio gets within 1% (the model is too narrow for this budget).
    """
    from ..core.report import count_macs

    def size(m: nn.Module) -> int:
        return count_macs(m, input_size) if measure == "macs" else count_params(m)

    unit = "MACs" if measure == "macs" else "parameters"
    if target >= size(teacher):
        raise PlanError(f"the budget {target:,} is not below the model's {size(teacher):,} {unit}")
    base = copy.deepcopy(teacher).to(memory_format=torch.contiguous_format)
    # ratios closer than 1/(4 * widest layer) prune the same channels: no point bisecting further
    widest = max((m.out_channels for m in base.modules() if isinstance(m, nn.Conv2d)), default=1)
    steps = min(steps, math.ceil(math.log2(4 * widest)))

    def uniform(r: float) -> tuple[int, nn.Module]:
        m = channel_prune(copy.deepcopy(base), r, importance, input_size)
        return size(m), m

    tries = _bisect(uniform, target, 0.0, 0.999, steps)
    best = min(tries, key=lambda t: t[0])
    note = f"channel ratio {best[1]:.3f} in every layer"
    if best[0] > TOLERANCE:
        above = max((t for t in tries if t[2] > target), key=lambda t: t[1], default=None)
        if above is not None:
            r0 = above[1]

            def with_widest(r: float) -> tuple[int, nn.Module]:
                m = channel_prune(copy.deepcopy(base), r0, importance, input_size, widest_ratio=r)
                return size(m), m

            fine = min(_bisect(with_widest, target, r0, 0.999, steps), key=lambda t: t[0])
            if fine[0] < best[0]:
                best, note = fine, f"channel ratio {r0:.3f}, widest layers {fine[1]:.3f}"
    if best[0] > TOLERANCE:
        raise PlanError(
            f"channel pruning cannot reach {target:,} {unit} within 1% (closest: {best[2]:,} at ratio "
            f"{best[1]:.3f}); the layers are too narrow for this budget"
        )
    return best[3], note


@dataclass(frozen=True)
class ChannelPruning:
    """Torch-Pruning with ``importance`` ("l1" or "group") at a searched uniform channel ratio."""

    name: str
    importance: str
    description: str
    fixed_size: bool = False

    def compress(self, teacher: nn.Module, target_params: int | None, ctx: Context) -> Compressed:
        ensure_unshared(teacher, self.name)
        if target_params is None and ctx.target_macs is None:
            raise PlanError(f"{self.name} needs a parameter budget («budget» or «match») or «budget-macs»")
        if target_params is not None:
            model, ratios = search_ratio(teacher, target_params, self.importance, ctx.input_size)
        else:
            assert ctx.target_macs is not None
            model, ratios = search_ratio(teacher, ctx.target_macs, self.importance, ctx.input_size, measure="macs")

        def store(m: nn.Module, folder: Path) -> dict[str, int]:
            return {"safetensors": save(m, folder / "model.safetensors", source=ctx.source, pruned=True).stat().st_size}

        return Compressed(model, count_params(model), lambda m: m, store, ratios)


register_method(ChannelPruning("l1-filter", "l1", "L1-norm filter pruning (Li et al. 2017) via Torch-Pruning"))
register_method(
    ChannelPruning("group-norm", "group", "DepGraph group-norm pruning (Fang et al. 2023) via Torch-Pruning")
)
