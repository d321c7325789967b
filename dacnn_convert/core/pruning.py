"""Structured channel pruning as a step of a plan: narrow every layer first, then share what is left.

A :class:`Pruning` says how (a uniform fraction of every layer's channels, ranked by an importance) and
what it removes (exact parameter and MAC counts, measured when the plan is made:
:func:`dacnn_convert.prune_search.prune`), so a plan that prunes
stays data: :func:`dacnn_convert.core.convert.convert` prunes a copy of the model before it shares
anything, and ``load`` narrows the skeleton to the shapes the plan records (no weights needed).

The pruning itself is Torch-Pruning's: its dependency graph keeps residual additions, depthwise convs
and concatenations consistent; the layers producing the logits keep their outputs. Importance by
group L2 norm (DepGraph, Fang et al. 2023) or by the L1 norm of each filter (Li et al. 2017). The
channels removed depend on the weights, so a plan that prunes is tied to the weights it was made for;
``convert`` checks every pruned shape against the plan and names the first that differs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PlanError, choose
from ..names import PRUNE_IMPORTANCES


@dataclass(frozen=True)
class Pruning:
    """Prune ``ratio`` of the channels of every layer (the logits layer's outputs kept) before sharing.

    ``params_saved`` and ``macs_saved`` (per example, at the plan's input size) are what the pruning
    alone removes from the original model, filled in when the plan is made
    (:func:`dacnn_convert.prune_search.prune`).
    """

    ratio: float
    importance: str = "group"
    params_saved: int = 0
    macs_saved: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float) or not 0.0 < self.ratio < 1.0:
            raise PlanError(f"a pruning ratio is a fraction of channels in (0, 1), got {self.ratio!r}")
        choose("pruning importance", self.importance, PRUNE_IMPORTANCES)
        if self.params_saved < 0 or self.macs_saved < 0:
            raise PlanError(f"a pruning cannot add parameters or MACs ({self.params_saved}, {self.macs_saved})")

    @property
    def label(self) -> str:
        return f"prune {self.ratio:g} ({self.importance})"


def output_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """Linear layers whose outputs are the model's outputs: their output width is the task's."""
    with torch.no_grad():
        width = model(example).shape[-1]
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == width]


def channel_prune(
    model: nn.Module,
    ratio: float,
    importance: str,
    input_size: tuple[int, int, int],
    widest_ratio: float | None = None,
) -> nn.Module:
    """Prune ``ratio`` of the channels of every layer of ``model`` in place (the logits layer's outputs kept).

    ``widest_ratio`` prunes the widest layers (the last stage of a ResNet) at their own ratio:
    the fine adjustment that brings the count within 1% of a budget when one uniform ratio
    steps over it. The model's train/eval mode is restored.
    """
    import torch_pruning as tp

    choose("pruning importance", importance, PRUNE_IMPORTANCES)
    if importance == "l1":
        imp = tp.importance.MagnitudeImportance(p=1, group_reduction="first")
    else:  # named GroupNormImportance before Torch-Pruning 1.5
        group = getattr(tp.importance, "GroupMagnitudeImportance", None) or tp.importance.GroupNormImportance
        imp = group(p=2)
    was_training = model.training
    model.eval()  # a batch of one example would break BatchNorm in train mode
    for p in model.parameters():  # Torch-Pruning leaves frozen parameters alone
        p.requires_grad_(True)
    first = next(model.parameters(), None)
    example = torch.randn(1, *input_size, device=first.device if first is not None else "cpu")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    widest = max(m.out_channels for m in convs)
    per_layer = {m: widest_ratio for m in convs if m.out_channels == widest} if widest_ratio is not None else None
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=imp,
        pruning_ratio=ratio,
        pruning_ratio_dict=per_layer,
        ignored_layers=output_layers(model, example),
        global_pruning=False,
    )
    pruner.step()
    model.train(was_training)
    return model


def pruned_copy(model: nn.Module, pruning: Pruning, input_size: tuple[int, int, int]) -> nn.Module:
    """A copy of ``model`` with ``pruning`` applied (``model`` and its train/eval mode untouched)."""
    student = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    flags = [p.requires_grad for p in student.parameters()]
    channel_prune(student, pruning.ratio, pruning.importance, input_size)
    if len(flags) == len(list(student.parameters())):  # give frozen parameters their flag back
        for p, flag in zip(student.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return student
