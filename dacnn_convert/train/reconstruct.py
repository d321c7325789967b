"""Section-wise reconstruction: after the closed-form fit, match the teacher section by section.

    for section k = 1..K, in order:
        inputs  = the calibration images through the converted student (sections < k already done)
        target  = the teacher's output of section k on the same images
        minimise  ||student_k - teacher_k||^2 / ||teacher_k||^2   over section k's own parameters

The closed-form fits minimise each layer's error alone; errors then compound through the
network. Reconstruction corrects them where they arise, before any end-to-end training, as
block-wise reconstruction does for whitened factorisations and quantisation (BRECQ, SVD-LLM).

Sections follow the plan's (:func:`sections_of`): section k runs from its first layer to the
first layer of section k + 1, whose input (names the teacher and the student share) is what
section k hands on; the last section ends at the model's output. Section k trains its layers'
parameters (coefficients, regulators, scales, biases), their BatchNorms' affine parameters, and
the anchors and banks only its layers use: a tensor shared with an earlier section stays as that section left it, so a
section once done stays done. A filter bank shared across stages (``share_across``) is trained by the earliest
section that uses it (later sections then fit their own coefficients to it); a plain anchor spanning sections stays
as fitted. BatchNorms run in eval mode on the statistics the BN
recalibration measured (the function inference computes); the forward pass stops at the
section's end. Deterministic: the calibration batches are cycled in order, the optimiser is
Adam. Shared tensors stay shared: parameters are updated in place.

A fifth of the calibration batches (at least one, where there are four or more) is held out: a section
whose error on them rises is put back as it was (``ReconstructResult.kept``). On a plan that already keeps
the teacher, fitting a few batches section by section can overfit them (the Fashion-MNIST MobileNetV3-Large
at 25%: 85.42% after BN recalibration, 83.41% after reconstruction without the check).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.convert import PLAN_ATTR, has_plan_shapes
from ..core.layers import BANK_NAME, AnchoredConv2d, AnchoredLinear
from ..core.modes import mode
from ..core.plan import Plan
from ..core.pruning import pruned_copy
from ..errors import UsageError
from ..validate import inputs_of
from .calibrate import needs_bn_calibration


@dataclass(frozen=True)
class ReconstructConfig:
    """How long and how fast each section is reconstructed.

    Measured (issue 28, the Fashion-MNIST ResNet-18 teacher at 90.35% on 2,000 test images, mix +
    fitted regulators after act-seq and BN recalibration, 86.55%): 100 steps at lr 1e-3 88.10%,
    300 steps 89.50%, 100 steps at lr 3e-3 82.35% (too fast).

    Attributes:
        steps: optimiser steps per section (one calibration batch each, cycled in order).
        lr: Adam's learning rate.
        batches: calibration batches used (held in memory as inputs, not as activations).
    """

    steps: int = 300
    lr: float = 1e-3
    batches: int = 20

    def __post_init__(self) -> None:
        for name in ("steps", "batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"reconstruction «{name}» must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, int | float) and 0 < self.lr < 1):
            raise UsageError(f"reconstruction «lr» must be in (0, 1), got {self.lr!r}")


@dataclass
class ReconstructResult:
    """Per section: the relative output error (mean over the calibration batches) before and after."""

    sections: list[str] = field(default_factory=list)  # the layer each section feeds ("output": the last)
    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)
    trained: list[int] = field(default_factory=list)  # parameters trained per section
    kept: list[bool] = field(default_factory=list)  # False: its held-out error rose, the section was put back
    wall_s: float = 0.0


class _Stop(Exception):
    """Raised by a forward hook to end a forward pass at a section's end."""


def _capture(model: nn.Module, end: str | None, x: torch.Tensor) -> torch.Tensor:
    """What ``model`` feeds its module ``end`` on ``x`` (the forward pass stops there); None: its output."""
    if end is None:
        return model(x)
    found: list[torch.Tensor] = []

    def hook(_m: nn.Module, inp: tuple) -> None:
        found.append(inp[0])
        raise _Stop

    handle = model.get_submodule(end).register_forward_pre_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not found:
        raise UsageError(
            f"the forward pass never reached {end!r}: reconstruction needs every section's first layer called"
        )
    return found[0]


def sections_of(plan: Plan) -> list[tuple[list[str], str | None]]:
    """Per section of ``plan``, in order: its layers, and the layer that takes its output (None: the model output).

    Section k holds the convs and Linears from the first layer of section k (by traced order) up
    to the first layer of section k + 1, whose input is what section k hands on: after residual
    additions and activations, the tensor the rest of the network reads.
    """
    firsts = []
    for res in plan.sections:
        layers = [s for s in plan.sites if s.out_size == tuple(res)]
        if layers:
            firsts.append(min(layers, key=lambda s: s.order))
    firsts.sort(key=lambda s: s.order)
    out: list[tuple[list[str], str | None]] = []
    for k, first in enumerate(firsts):
        nxt = firsts[k + 1] if k + 1 < len(firsts) else None
        hi = nxt.order if nxt is not None else float("inf")
        out.append(([s.name for s in plan.sites if first.order <= s.order < hi], nxt.name if nxt is not None else None))
    return out


def _anchor_users(student: nn.Module) -> dict[str, set[str]]:
    """Per anchor or bank of ``student``, the layers that read it."""
    used_by: dict[str, set[str]] = {}
    for name, m in student.named_modules():
        if isinstance(m, AnchoredConv2d | AnchoredLinear):
            used_by.setdefault(m.anchor, set()).add(name)
    return used_by


def _section_parameters(
    student: nn.Module,
    plan: Plan,
    layers: list[str],
    used_by: dict[str, set[str]],
    done: AbstractSet[str] = frozenset(),
) -> list[nn.Parameter]:
    """The parameters a section owns: its layers' own (coefficients, regulators, scales, biases), their
    BatchNorms', the anchors and banks only its layers use, and the filter banks shared across stages
    (``share_across``) whose earliest user is in this section: no section already reconstructed (``done``)
    reads them, so training them here changes only layers whose sections come later."""
    members = set(layers)
    bank = getattr(student, BANK_NAME, None)
    spanning = {g.name for g in plan.groups if g.kind == "bank"}
    params: dict[int, nn.Parameter] = {}
    for anchor, users in used_by.items():
        first_here = anchor in spanning and bool(users & members) and not users & done
        if bank is not None and (users <= members or first_here):
            p = getattr(bank, anchor)
            params[id(p)] = p
    for name in layers:
        for p in student.get_submodule(name).parameters():  # the bank is no submodule of a layer
            params[id(p)] = p
        bn = plan.site(name).bn
        if bn is not None:
            for p in student.get_submodule(bn).parameters():
                params[id(p)] = p
    return list(params.values())


def reconstruct_sections(
    student: nn.Module,
    teacher: nn.Module,
    calib_loader: Iterable,
    config: ReconstructConfig | None = None,
    on_step: Callable[[int, int, int, float], None] | None = None,
) -> ReconstructResult:
    """Reconstruct ``student`` (a converted model) section by section to match ``teacher``'s outputs.

    Updates ``student`` in place and returns the per-section errors. Run it after BN
    recalibration. ``on_step(section, step, steps, loss)`` is called after every step.

    Raises:
        UsageError: ``student`` was not converted by this library, or the data yields nothing.
    """
    config = config or ReconstructConfig()
    plan = getattr(student, PLAN_ATTR, None)
    if not isinstance(plan, Plan):
        raise UsageError("reconstruct() takes a converted model (from anchor() or convert()) and its original")
    if needs_bn_calibration(student):
        raise UsageError(
            "the model's BatchNorm statistics still describe the original's kernels: run "
            "recalibrate_bn(student, calib_loader) before reconstruct_sections (anchor() with data does both)"
        )
    if plan.prune is not None and not has_plan_shapes(teacher, plan):
        # the student was pruned before it was shared: match the pruned original, whose layers have its widths
        # (the same channels are kept: pruning is decided by the original's weights)
        teacher = pruned_copy(teacher, plan.prune, plan.input_size, calib_loader, config.batches)
    sections = sections_of(plan)
    device = next(student.parameters()).device
    batches = []
    for i, batch in enumerate(calib_loader):
        if i >= config.batches:
            break
        batches.append(inputs_of(batch).to(device))
    if not batches:
        raise UsageError("«calib-loader» yielded no batches: reconstruction needs calibration images")
    result = ReconstructResult(sections=[end or "output" for _, end in sections])
    held = batches[len(batches) - max(1, len(batches) // 5) :] if len(batches) >= 4 else []
    fit_on = batches[: len(batches) - len(held)]
    start = time.perf_counter()
    flags = {p: p.requires_grad for p in student.parameters()}
    used_by = _anchor_users(student)
    with mode(student, teacher):  # eval: BatchNorms use the recalibrated statistics
        try:
            done: set[str] = set()
            for k, (layers, end) in enumerate(sections):
                params = _section_parameters(student, plan, layers, used_by, done)
                done |= set(layers)
                for p in student.parameters():
                    p.requires_grad_(False)
                for p in params:
                    p.requires_grad_(True)
                result.before.append(_error(student, teacher, end, batches))
                result.trained.append(sum(p.numel() for p in params))
                check = bool(held and params)  # a section that trains nothing cannot get worse
                held_before = _error(student, teacher, end, held) if check else 0.0
                saved = [p.detach().clone() for p in params] if check else []
                if params:
                    opt = torch.optim.Adam(params, lr=config.lr)
                    for step in range(config.steps):
                        x = fit_on[step % len(fit_on)]
                        with torch.no_grad():  # recomputed, not held: one batch of activations at a time
                            target = _capture(teacher, end, x)
                        loss = _relative(_capture(student, end, x), target)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        if on_step is not None:
                            on_step(k + 1, step + 1, config.steps, float(loss))
                worse = check and _error(student, teacher, end, held) > held_before
                if worse:  # overfitted the batches it saw: the section goes back to what it was
                    with torch.no_grad():
                        for p, value in zip(params, saved, strict=True):
                            p.copy_(value)
                result.kept.append(not worse)
                result.after.append(_error(student, teacher, end, batches))
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
    result.wall_s = time.perf_counter() - start
    return result


def _relative(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||out - target||^2 / ||target||^2, in float32 whatever autocast chose."""
    return (out.float() - target.float()).pow(2).mean() / target.float().pow(2).mean().clamp_min(1e-12)


def _error(student: nn.Module, teacher: nn.Module, end: str | None, batches: list[torch.Tensor]) -> float:
    """The mean relative error of what ``student`` feeds ``end`` (None: its output) over ``batches``."""
    with torch.no_grad():
        errs = [float(_relative(_capture(student, end, x), _capture(teacher, end, x))) for x in batches]
    return sum(errs) / len(errs)
