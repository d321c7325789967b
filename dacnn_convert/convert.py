"""Apply a plan: a copy of the model with anchored kernels, folded scales and regulators."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import PlanError, UsageError
from .fitting import FITS, fit_activations, input_moments
from .layers import BANK_NAME, AnchorBank, AnchoredConv2d, Regulator
from .planning import Group, Plan, make_plan

def plan(
    model: nn.Module,
    mode: str = "mix",
    regulators: str | Sequence[int] | None = "none",
    regulator_style: str = "adapter",
    init: str = "fit",
    input_size: tuple[int, int, int] = (3, 224, 224),
    leaf_modules: Sequence[type[nn.Module]] = (),
    *,
    target_params: int | None = None,
    target_ratio: float | None = None,
    target_bytes: int | None = None,
    calib_loader: Iterable | None = None,
    calib_batches: int = 8,
    metric: str | None = None,
) -> Plan:
    """Decide what to share: by ``mode``, or — given a target size — by budget search.

    Without a target this is :func:`dacnn_convert.planning.make_plan` (see it for the
    arguments). With ``target_params``, ``target_ratio`` (times smaller) or ``target_bytes``
    (fp32), :func:`dacnn_convert.budget.search` picks free / mix / plain per section and
    where regulators go, never exceeding the target; ``mode`` and ``regulators`` are then
    ignored, and ``calib_loader`` makes the search use the ``kl`` sensitivity.

    Raises:
        UsageError, TraceError, PlanError: as make_plan; PlanError also when nothing fits.
    """
    if target_params is None and target_ratio is None and target_bytes is None:
        return make_plan(model, mode, regulators, regulator_style, init, input_size, leaf_modules)
    from .budget import resolve_target, search
    from .planning import unique_params

    target = resolve_target(unique_params(model), target_params, target_ratio, target_bytes)
    return search(model, target, input_size, calib_loader, calib_batches, metric, regulator_style,
                  init if calib_loader is None or init != "fit" else None, leaf_modules).plan  # fmt: skip

PLAN_ATTR = "dacnn_plan"


@dataclass
class Conversion:
    """The converted model, the plan it follows, and how well each anchor fits its members."""

    model: nn.Module
    plan: Plan
    fit_errors: dict[str, dict[str, float]] = field(default_factory=dict)  # group -> member -> rel. error
    notes: list[str] = field(default_factory=list)


def _act_ready(plan: Plan, group: Group) -> bool:
    """Groups whose members' inputs can be unfolded into patches for the data-aware fit."""
    sites = [plan.site(m) for m in group.members]
    return all(
        s.weight_shape == tuple(group.shape) and s.groups == 1 and s.padding_mode == "zeros" and not isinstance(s.padding, str)
        for s in sites
    )


def convert(
    model: nn.Module,
    plan: Plan,
    init: str | None = None,
    calib_loader: Iterable | None = None,
    calib_batches: int = 100,
) -> Conversion:
    """Return a converted deep copy of ``model`` following ``plan``; ``model`` is untouched.

    Args:
        model: the network the plan was made for (same module names and shapes).
        plan: from :func:`dacnn_convert.plan`.
        init: overrides ``plan.init``; ``"none"`` skips initialisation (used by ``load``,
            which overwrites every tensor from the checkpoint right after).
        calib_loader: batches of (images, labels) for ``init="act"``: the anchor is fitted to
            the inputs each member actually sees (the original model is run on them); for
            ``"act-seq"`` to the inputs it sees in the student converted so far, matching the
            original's outputs (one pass over the batches per group).
        calib_batches: how many batches of ``calib_loader`` to use.

    Raises:
        PlanError: a planned conv is missing or has another shape in ``model``.
    """
    init = plan.init if init is None else init
    sequential = init == "act-seq"
    originals = dict(model.named_modules())
    members = [originals.get(m) for g in plan.groups for m in g.members]
    # Members are replaced right away: do not copy their kernels (saves memory and time) —
    # unless the student must run before every group is converted (sequential fit).
    memo = {} if sequential else {id(m.weight): nn.Parameter(torch.empty(0)) for m in members if type(m) is nn.Conv2d}
    student = copy.deepcopy(model, memo)
    modules = dict(student.named_modules())
    for s in plan.sites:
        conv = originals.get(s.name)
        if type(conv) is not nn.Conv2d or tuple(conv.weight.shape) != s.weight_shape:
            raise PlanError(
                f"the plan expects nn.Conv2d {s.name} of shape {s.weight_shape}, the model has "
                f"{type(conv).__name__ if conv is not None else 'nothing'} there; was the plan made for this model?"
            )
    if hasattr(student, BANK_NAME):
        raise PlanError("the model is already anchored; convert the original model instead")

    bank = AnchorBank({g.name: g.shape for g in plan.groups})
    regs = {r.host: r for r in plan.regulators}
    errors: dict[str, dict[str, float]] = {}
    notes: list[str] = []
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    data_aware = init in ("act", "act-seq")
    if data_aware and calib_loader is None:
        raise UsageError(f"init {init!r} fits anchors to real inputs: pass calib_loader=... (CLI: --dataset)")
    if init == "act":
        ready = [m for g in plan.groups if _act_ready(plan, g) for m in g.members]
        moments = input_moments(model, ready, calib_loader, calib_batches)  # type: ignore[arg-type]
    for g in sorted(plan.groups, key=lambda g: min(plan.site(m).order for m in g.members)):
        weights = [originals[m].weight.detach().float().cpu() for m in g.members]  # type: ignore[union-attr]
        if sequential and _act_ready(plan, g):
            # inputs as the student, converted up to here, feeds them (GPTQ-style, layer by layer)
            moments = input_moments(model, list(g.members), calib_loader, calib_batches, student=student)  # type: ignore[arg-type]
        if init == "none":
            fit = None
        elif data_aware and all(m in moments for m in g.members):
            fit = fit_activations(weights, [moments[m] for m in g.members])
        else:
            if data_aware:
                notes.append(f"{g.name}: members differ in shape or padding; weight-space fit used instead of {init}")
            fit = FITS["fit" if data_aware else init](weights, g.shape)
        if fit is not None:
            errors[g.name] = dict(zip(g.members, fit.errors, strict=True))
        with torch.no_grad():
            if fit is not None:
                getattr(bank, g.name).copy_(fit.anchor)
        for i, name in enumerate(g.members):
            site = plan.site(name)
            old: nn.Conv2d = originals[name]  # type: ignore[assignment]
            scale = fit.scales[i] if fit is not None else None
            reg = regs.get(name)
            new = AnchoredConv2d(
                bank,
                g.name,
                site.in_channels,
                site.out_channels,
                site.kernel_size,
                site.stride,
                site.padding,
                site.dilation,
                site.groups,
                bias=site.bias,
                padding_mode=site.padding_mode,
                scale=plan.has_scale(name),
                regulator=Regulator(reg.in_channels, reg.out_channels, reg.stride, plan.regulator_style == "adapter")
                if reg
                else None,
                regulator_style=plan.regulator_style,
            ).to(old.weight.device)
            with torch.no_grad():
                bias = old.bias.detach().clone() if old.bias is not None else None
                if scale is not None and site.bn is not None:
                    _fold_into_bn(modules[site.bn], scale)  # type: ignore[arg-type]
                    if bias is not None:
                        bias = bias / _safe(scale)
                elif scale is not None and new.scale is not None:
                    new.scale.copy_(scale)  # type: ignore[union-attr]
                if bias is not None:
                    new.bias.copy_(bias)  # type: ignore[union-attr]
            _set(student, name, new)
    student.add_module(BANK_NAME, bank.to(_device(model)))
    setattr(student, PLAN_ATTR, plan)
    return Conversion(student, plan, errors, notes)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _safe(a: torch.Tensor) -> torch.Tensor:
    return torch.where(a.abs() < 1e-12, torch.full_like(a, 1e-12), a)


def _fold_into_bn(bn: nn.BatchNorm2d, a: torch.Tensor) -> None:
    """Make ``bn(z)`` equal the old ``bn(a * z)`` exactly in eval mode.

    BN(u) = g (u - m) / sqrt(v + e) + b with u = a z becomes g' (z - m') / sqrt(v' + e) + b
    with m' = m / a, v' = (v + e) / a^2 - e and g' = g * sign(a). In train mode BN
    normalises with batch statistics, which absorb any per-channel scale already.
    """
    a = _safe(a.to(bn.running_mean.device, bn.running_mean.dtype))  # type: ignore[union-attr]
    eps = bn.eps
    bn.running_mean.div_(a)  # type: ignore[union-attr]
    bn.running_var.copy_(((bn.running_var + eps) / (a * a) - eps).clamp_min(0))  # type: ignore[operator,union-attr]
    bn.weight.mul_(torch.sign(a))


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def apply(model: nn.Module, plan: Plan) -> nn.Module:
    """Return a converted copy of ``model`` following ``plan`` (``model`` is left untouched)."""
    return convert(model, plan).model


def anchor(
    model: nn.Module,
    mode: str = "mix",
    regulators: str | Sequence[int] | None = "none",
    regulator_style: str = "adapter",
    init: str | None = None,
    input_size: tuple[int, int, int] = (3, 224, 224),
    leaf_modules: Sequence[type[nn.Module]] = (),
    calib_loader: Iterable | None = None,
    calib_batches: int = 100,
) -> nn.Module:
    """Convert ``model`` into a deep anchored CNN in one call: plan, then apply.

    Args:
        model: any fx-traceable ``nn.Module``; it is left untouched.
        mode: ``mix`` (share per stage and configuration, the paper's mixed DACNN),
            ``plain`` (one network-wide sliced kernel), ``sharesnet`` or ``none``.
        regulators: ``none``, ``all`` or 1-based section numbers, e.g. ``"1,3"``.
        regulator_style: ``adapter`` (parallel, function-preserving) or ``paper`` (series).
        init: anchor initialisation: ``fit`` (least squares with scales folded into BN),
            ``act``/``act-seq`` (data-aware, need ``calib_loader``), ``mean``, ``first`` or
            ``random``; None picks ``act`` with data, else ``fit``.
        input_size: (C, H, W) of one example, for shape propagation.
        leaf_modules: module types fx must not trace into.
        calib_loader: batches of (images, labels); when given, ``init`` defaults to ``act``
            (anchors fitted to the inputs each layer sees) instead of ``fit``.
        calib_batches: how many batches of ``calib_loader`` to use.

    Returns:
        A copy of ``model`` (same class, same names for untouched modules) whose
        anchored convs read shared kernels from ``model.dacnn_anchors``.

    Raises:
        UsageError: an argument is outside its allowed values.
        TraceError, PlanError: the model cannot be traced, run or converted.
    """
    if init is None:
        init = "act" if calib_loader is not None else "fit"
    p = plan(model, mode, regulators, regulator_style, init, input_size, leaf_modules)
    return convert(model, p, calib_loader=calib_loader, calib_batches=calib_batches).model
