"""Apply a plan: a copy of the model with anchored kernels, folded scales and regulators."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from ..defaults import CALIB_BATCHES
from ..errors import PlanError, UsageError
from .fitting import (
    FITS,
    AdapterFit,
    BasisCache,
    centre_tap,
    fit_activations,
    fit_adapter,
    fit_anchor_and_adapters,
    fit_bank,
    input_moments,
)
from .graph import ConvSite
from .kinds import is_plain, plain_kind
from .layers import BANK_NAME, AnchorBank, AnchoredConv2d, AnchoredLinear, Regulator
from .plan import Group, Plan

PLAN_ATTR = "dacnn_plan"
# True on a freshly converted model whose BatchNorm statistics still describe the original's
# kernels; recalibrate_bn clears it, distill() recalibrates first when it is set.
BN_STALE_ATTR = "dacnn_bn_stale"


@dataclass
class Conversion:
    """The converted model, the plan it follows, and how well each anchor fits its members."""

    model: nn.Module
    plan: Plan
    fit_errors: dict[str, dict[str, float]] = field(default_factory=dict)  # group -> member -> rel. error
    notes: list[str] = field(default_factory=list)
    fit_energy: dict[str, float] = field(default_factory=dict)  # bank -> captured (whitened) energy
    # host -> its relative output error without and with its fitted adapter (regulator_init="fit")
    regulator_errors: dict[str, tuple[float, float]] = field(default_factory=dict)


def whitenable(site: ConvSite) -> bool:
    """Can a data-aware fit whiten this layer's inputs? Dense, numeric zero padding, and patches of at
    most :data:`WHITEN_MAX_DIM` values (a VGG head's 25,088 inputs would need a 5 GB moment matrix)."""
    return (
        site.groups == 1
        and site.padding_mode == "zeros"
        and not isinstance(site.padding, str)
        and site.weight_numel // site.out_channels <= WHITEN_MAX_DIM
    )


def _act_ready(plan: Plan, group: Group) -> bool:
    """Groups whose members' inputs can be unfolded into patches for the data-aware fit."""
    sites = [plan.site(m) for m in group.members]
    if group.kind == "bank":  # members read patches of the bank's shape; their C_out may differ (merged banks)
        return all(tuple(s.weight_shape[1:]) == tuple(group.shape[1:]) and whitenable(s) for s in sites)
    return all(s.weight_shape == tuple(group.shape) and whitenable(s) for s in sites)


MOMENT_BYTES = 1 << 30  # float64 input moments held at once; more groups take another calibration pass
WHITEN_MAX_DIM = 8192  # patch length above which a layer is fitted in weight space (its d x d moments: 512 MB)


def _chunks(plan: Plan, groups: list[Group], limit: int = MOMENT_BYTES) -> list[list[Group]]:
    """Consecutive groups whose members' d x d float64 moments fit in ``limit`` bytes together."""
    out: list[list[Group]] = [[]]
    used = 0
    for g in groups:
        site = plan.site(g.members[0])
        d = site.weight_numel // site.out_channels
        need = 8 * d * d * len(g.members)
        if out[-1] and used + need > limit:
            out.append([])
            used = 0
        out[-1].append(g)
        used += need
    return out


def has_plan_shapes(model: nn.Module, plan: Plan) -> bool:
    """Every layer of the plan has the plan's shape in ``model`` (a pruned plan's model is pruned already)."""
    modules = dict(model.named_modules())
    for s in plan.sites:
        layer = modules.get(s.name)
        weight = getattr(layer, "weight", None)
        shape = s.weight_shape[:2] if s.layer == "linear" else s.weight_shape
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != shape:
            return False
    return True


def convert(
    model: nn.Module,
    plan: Plan,
    init: str | None = None,
    calib_loader: Iterable | None = None,
    calib_batches: int = CALIB_BATCHES,
    *,
    moments: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    align: bool = False,
    bases: BasisCache | None = None,
) -> Conversion:
    """Return a converted deep copy of ``model`` following ``plan``; ``model`` is untouched.

    Args:
        model: the network the plan was made for (same module names and shapes); for a plan that prunes
            first (``plan.prune``), the unpruned network: a pruned copy is made, then shared.
        plan: from :func:`dacnn_convert.plan`.
        init: overrides ``plan.init``; ``"none"`` skips initialisation (used by ``load``,
            which overwrites every tensor from the checkpoint right after).
        calib_loader: batches of (images, labels) for ``init="act"``: the anchor is fitted to
            the inputs each member actually sees (the original model is run on them); for
            ``"act-seq"`` to the inputs it sees in the student converted so far, matching the
            original's outputs (one pass over the batches per group). Banks are fitted by
            whitened SVD (:func:`dacnn_convert.core.fitting.fit_bank`); without data, by the SVD of
            the kernels.
        calib_batches: how many batches of ``calib_loader`` to use.
        moments: input moments of the original model's convs, as
            :func:`dacnn_convert.core.fitting.input_moments` returns them, to reuse across many
            conversions of one model (the budget search); replaces passes over ``calib_loader``.
        align: first permute each member's private input channels to match the first member
            of its group (:func:`dacnn_convert.core.align.align_channels`; the function is unchanged).
        bases: each bank's whitening and decomposition, kept across conversions of ``model`` with the same
            ``moments`` at other bank sizes (the budget search); the per-member fit errors are then not computed.

    Raises:
        PlanError: a planned conv is missing or has another shape in ``model``.
        UsageError: a data-aware init without calibration data.
    """
    from .. import validate

    validate.module("model", model)
    if not isinstance(plan, Plan):
        raise UsageError(
            f"«plan» must be a Plan from dacnn_convert.plan(model, ...), got {type(plan).__name__} {plan!r:.40}; "
            "for a mode in one call use dacnn_convert.anchor(model, mode=...)"
        )
    if calib_loader is not None:
        validate.loader("calib-loader", calib_loader)
    validate.integer("calib-batches", calib_batches, 0)
    init = plan.init if init is None else init
    sequential = init == "act-seq"
    if sequential and calib_loader is None:
        raise UsageError("init 'act-seq' runs the partly converted student on real inputs: pass calib_loader=...")
    if align and moments is not None:
        raise UsageError(
            "align=True permutes channels, so precomputed moments no longer match: pass calib_loader instead"
        )
    pruned_here = plan.prune is not None and not has_plan_shapes(model, plan)
    if pruned_here and moments is not None:
        raise UsageError(
            "the plan prunes first, and «moments» were taken on the unpruned model: pass calib_loader instead "
            "(or prune first and pass the pruned model with its own moments)"
        )
    if pruned_here:  # prune a copy first: the plan's sites are the pruned model's layers
        from .pruning import pruned_copy

        assert plan.prune is not None
        data = calib_loader if init in ("act", "act-seq") else None  # a data-aware conversion compensates too
        model = pruned_copy(model, plan.prune, plan.input_size, data, calib_batches)
    alignment = None
    if align:
        from .align import align_channels

        model, alignment = align_channels(model, plan)
    originals = dict(model.named_modules())
    members = [originals.get(m) for g in plan.groups for m in g.members]
    # Members are replaced right away: do not copy their kernels (saves memory and time) —
    # unless the student must run before every group is converted (sequential fit).
    memo = (
        {}
        if sequential
        else {
            id(m.weight): nn.Parameter(torch.empty(0))
            for m in members
            if isinstance(m, nn.Conv2d | nn.Linear) and is_plain(m)
        }
    )
    student = copy.deepcopy(model, memo)
    modules = dict(student.named_modules())
    for s in plan.sites:
        layer: Any = originals.get(s.name)
        kind, shape = (nn.Linear, s.weight_shape[:2]) if s.layer == "linear" else (nn.Conv2d, s.weight_shape)
        if layer is None or plain_kind(layer) is not kind or tuple(layer.weight.shape) != shape:
            there = (
                type(layer).__name__
                if layer is None or plain_kind(layer) is not kind
                else f"shape {tuple(layer.weight.shape)}"
            )
            raise PlanError(
                f"the plan expects nn.{kind.__name__} {s.name} of shape {shape}, the model has "
                f"{there if layer is not None else 'nothing'} there"
                + (f" after {plan.prune.label}" if pruned_here and plan.prune is not None else "")
                + "; was the plan made for this model?"
            )
    for g in plan.groups:
        if g.kind != "bank" and any(plan.site(m).layer == "linear" for m in g.members):
            raise PlanError(
                f"group {g.name!r} slices one kernel for Linears; Linears share by banks (kind 'bank') only"
            )
    if hasattr(student, BANK_NAME):
        raise PlanError("the model is already anchored; convert the original model instead")
    data_aware = init in ("act", "act-seq")
    if data_aware and calib_loader is None and moments is None:
        raise UsageError(f"init {init!r} fits anchors to real inputs: pass «dataset»")

    bank = AnchorBank({g.name: g.shape for g in plan.groups})
    conversion = Conversion(student, plan)
    if alignment is not None and alignment.permuted:
        gain = sum(a - b for _, b, a in alignment.permuted) / len(alignment.permuted)
        conversion.notes.append(
            f"aligned the private channels of {len(alignment.permuted)} conv(s); mean cosine "
            f"similarity to their group's first member +{gain:.3f}"
        )
    swap = _Swap(originals, modules, bank, plan, init, conversion, bases)
    ordered = sorted(plan.groups, key=lambda g: min(plan.site(m).order for m in g.members))
    chunks = [ordered] if not data_aware or sequential or moments is not None else _chunks(plan, ordered)
    for chunk in chunks:
        found: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = moments or {}
        if init == "act" and moments is None:  # one calibration pass per chunk of groups, memory bounded
            wanted = [m for g in chunk if _act_ready(plan, g) for m in g.members]
            found = input_moments(model, wanted, calib_loader, calib_batches)  # type: ignore[arg-type]
        for g in chunk:
            if sequential and _act_ready(plan, g):
                # inputs as the student, converted up to here, feeds them (GPTQ-style, layer by layer)
                found = input_moments(model, list(g.members), calib_loader, calib_batches, student=student)  # type: ignore[arg-type]
            ready = data_aware and _act_ready(plan, g) and all(m in found for m in g.members)
            use = [found[m] for m in g.members] if ready else None
            if data_aware and use is None:
                sites = [plan.site(m) for m in g.members]
                why = (
                    f"inputs of {sites[0].weight_numel // sites[0].out_channels:,} values, above the "
                    f"{WHITEN_MAX_DIM:,} whose moments are collected"
                    if any(s.weight_numel // s.out_channels > WHITEN_MAX_DIM for s in sites)
                    else "members differ in shape or padding"
                    if not _act_ready(plan, g)
                    else "no input moments for its members"
                )
                conversion.notes.append(f"{g.name}: {why}; weight-space fit used instead of {init}")
            (_convert_bank if g.kind == "bank" else _convert_anchor)(swap, g, use, sequential)
        del found
    student.add_module(BANK_NAME, bank.to(_device(model)))
    setattr(student, PLAN_ATTR, plan)
    setattr(student, BN_STALE_ATTR, bool(plan.groups) and init != "none")
    return conversion


@dataclass(frozen=True)
class _Swap:
    """What every group's conversion reads and writes: the original's and the student's modules, the bank."""

    originals: dict[str, nn.Module]
    modules: dict[str, nn.Module]  # the student's, by name (BNs to fold scales into)
    bank: AnchorBank
    plan: Plan
    init: str
    conversion: Conversion
    bases: BasisCache | None = None  # reused decompositions (the search); no fit errors then


def _convert_anchor(
    swap: _Swap, g: Group, moments: list[tuple[torch.Tensor, torch.Tensor]] | None, sequential: bool
) -> None:
    """Fit one shared (sliced) anchor and swap its members for :class:`AnchoredConv2d`."""
    originals, modules, bank, plan, init, conversion = (
        swap.originals,
        swap.modules,
        swap.bank,
        swap.plan,
        swap.init,
        swap.conversion,
    )
    student = conversion.model
    weights = [cast(nn.Conv2d, originals[m]).weight.detach().float().cpu() for m in g.members]
    regs = {r.host: r for r in plan.regulators}
    joint = _joint_tap(plan, g, regs) if init != "none" and moments is not None else None
    adapters: list[AdapterFit | None] = [None] * len(g.members)
    if init == "none":
        fit = None
    elif moments is not None and joint is not None:  # anchor and adapters fitted together
        fit, adapters = fit_anchor_and_adapters(weights, moments, joint, [m in regs for m in g.members])
    elif moments is not None:
        fit = fit_activations(weights, moments)
    else:
        fit = FITS.get_or_raise("fit" if init in ("act", "act-seq") else init)(weights, g.shape)
    if fit is not None:
        conversion.fit_errors[g.name] = dict(zip(g.members, fit.errors, strict=True))
        with torch.no_grad():
            getattr(bank, g.name).copy_(fit.anchor)
    for i, name in enumerate(g.members):
        site = plan.site(name)
        old: nn.Conv2d = originals[name]  # type: ignore[assignment]
        scale = fit.scales[i] if fit is not None else None
        new = _anchored(bank, g, site, plan, regs.get(name)).to(old.weight.device)
        with torch.no_grad():
            bias = old.bias.detach().clone() if old.bias is not None else None
            if scale is not None and site.bn is not None:
                _fold_into_bn(modules[site.bn], scale)  # type: ignore[arg-type]
                if bias is not None:
                    bias = bias / _safe(scale)
            elif scale is not None and new.scale is not None:
                new.scale.copy_(scale)
            if bias is not None:
                new.bias.copy_(bias)  # type: ignore[union-attr]
        found = adapters[i]
        if found is not None and new.regulator is not None:
            # fitted in the units of the anchor's output; a member that keeps its scale adds it after
            kernel = (
                found.kernel * scale.view(-1, 1, 1, 1) if new.scale is not None and scale is not None else found.kernel
            )
            new.regulator.set_fitted(kernel)
            conversion.regulator_errors[name] = (found.before, found.after)
        elif fit is not None and new.regulator is not None:
            # the member's pre-regulator output is s * (W_G x); its original, in the same units, W_l / u x
            sliced = fit.anchor[: weights[i].shape[0], : weights[i].shape[1]]
            folded = scale is not None and site.bn is not None
            target = weights[i] / _safe(scale).view(-1, 1, 1, 1) if scale is not None and folded else weights[i]
            current = sliced * scale.view(-1, 1, 1, 1) if new.scale is not None and scale is not None else sliced
            _fit_regulator(swap, name, new, target, current, moments[i] if moments is not None else None)
        _set(student, name, new)


def _joint_tap(plan: Plan, g: Group, regs: Mapping[str, Any]) -> tuple[int, int] | None:
    """The tap at which the group's adapters are fitted jointly with its anchor, or None (fitted after, or not)."""
    if plan.regulator_init != "fit" or plan.regulator_style != "adapter" or not any(m in regs for m in g.members):
        return None
    sites = [plan.site(m) for m in g.members]
    if any(s.groups != 1 for s in sites):
        return None
    taps = {centre_tap(s.kernel_size, s.padding, s.dilation) for s in sites}
    return taps.pop() if len(taps) == 1 else None  # members reading other pixels are fitted one by one


def _fit_regulator(
    swap: _Swap,
    name: str,
    new: AnchoredConv2d,
    target: torch.Tensor,
    current: torch.Tensor,
    moments: tuple[torch.Tensor, torch.Tensor] | None,
) -> None:
    """Fit ``new``'s adapter regulator to the member's residual (``regulator_init="fit"``), or say why not."""
    plan, conversion = swap.plan, swap.conversion
    if plan.regulator_init != "fit" or new.regulator is None:
        return
    site = plan.site(name)
    tap = centre_tap(site.kernel_size, site.padding, site.dilation)
    why = (
        "serial (paper-style) regulators apply a ReLU inside, which a least-squares fit cannot pass"
        if plan.regulator_style != "adapter"
        else "a grouped or depthwise conv"
        if site.groups != 1
        else f"no kernel tap reads the pixel its 1x1 regulator reads (padding {site.padding})"
        if tap is None
        else None
    )
    if why is not None:
        conversion.notes.append(f"{name}: regulator left at its default init: {why}")
        return
    found = fit_adapter(target, current, tap, moments)  # type: ignore[arg-type]
    new.regulator.set_fitted(found.kernel)
    conversion.regulator_errors[name] = (found.before, found.after)


def _convert_bank(
    swap: _Swap, g: Group, moments: list[tuple[torch.Tensor, torch.Tensor]] | None, sequential: bool
) -> None:
    """Fit one filter bank (whitened SVD) and swap its members for banked :class:`AnchoredConv2d`."""
    originals, bank, plan, init, conversion = swap.originals, swap.bank, swap.plan, swap.init, swap.conversion
    student = conversion.model
    # a Linear's (out, in) weight is the (out, in, 1, 1) kernel of the 1x1 conv it is
    weights = [kernel_of(originals[m]).detach().float().cpu() for m in g.members]
    fit = None
    if init not in ("none", "random"):
        if moments is not None and sequential:
            # match the original's outputs on the student's inputs: W_l T S^T (S S^T)^-1 is the map to fit
            targets = [_seq_target(w, h, c) for w, (h, c) in zip(weights, moments, strict=True)]
            fit = fit_bank(targets, g.rank, [h for h, _ in moments])
        else:
            held = [h for h, _ in moments] if moments is not None else None
            if swap.bases is None:
                fit = fit_bank(weights, g.rank, held)
            else:
                sources = [kernel_of(originals[m]) for m in g.members]
                basis = swap.bases.get(g.members, sources, weights, held)
                fit = fit_bank(weights, g.rank, held, basis=basis, errors=False)
        if fit.errors:
            conversion.fit_errors[g.name] = dict(zip(g.members, fit.errors, strict=True))
        conversion.fit_energy[g.name] = fit.energy
        with torch.no_grad():
            getattr(bank, g.name).copy_(fit.bank)
    elif init == "random":
        torch.nn.init.kaiming_uniform_(getattr(bank, g.name).data, a=math.sqrt(5))
    regs = {r.host: r for r in plan.regulators}
    for i, name in enumerate(g.members):
        old: nn.Conv2d = originals[name]  # type: ignore[assignment]
        site = plan.site(name)
        new: AnchoredLinear | AnchoredConv2d = (
            AnchoredLinear(bank, g.name, site.in_channels, site.out_channels, g.rank, site.bias)
            if site.layer == "linear"
            else _anchored(bank, g, site, plan, regs.get(name))
        ).to(old.weight.device)
        with torch.no_grad():
            coeff = cast(torch.Tensor, cast(nn.Module, new.coeff).weight)
            if fit is not None:
                coeff.copy_(fit.coefficients[i].view_as(coeff))
            if old.bias is not None and new.bias is not None:
                new.bias.copy_(old.bias.detach())
        if fit is not None and isinstance(new, AnchoredConv2d) and new.regulator is not None:
            current = (fit.coefficients[i] @ fit.bank.flatten(1)).view_as(weights[i])
            _fit_regulator(swap, name, new, weights[i], current, moments[i] if moments is not None else None)
        _set(student, name, new)


def kernel_of(layer: nn.Module) -> torch.Tensor:
    """A conv's kernel, or a Linear's weight as the (out, in, 1, 1) kernel of its 1x1 conv."""
    w = cast(nn.Conv2d, layer).weight
    return w[:, :, None, None] if isinstance(layer, nn.Linear) else w


def _seq_target(w: torch.Tensor, h: torch.Tensor, c: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """W C H^-1: the kernel that best maps the student's patches to the original's outputs."""
    eye = torch.eye(h.shape[0], dtype=torch.float64) * ridge * float(h.diagonal().mean())
    flat = w.reshape(w.shape[0], -1).double() @ c.double()
    return torch.linalg.solve(h.double() + eye, flat.T).T.reshape(w.shape).float()


def _anchored(bank: AnchorBank, g: Group, site: Any, plan: Plan, reg: Any) -> AnchoredConv2d:
    """The module that replaces ``site``: its conv attributes, its anchor, its regulator."""
    return AnchoredConv2d(
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
        scale=plan.has_scale(site.name),
        regulator=Regulator(reg.in_channels, reg.out_channels, reg.stride, plan.regulator_style == "adapter")
        if reg
        else None,
        regulator_style=plan.regulator_style,
        coefficients=g.rank if g.kind == "bank" else None,
    )


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


def apply(
    model: nn.Module,
    plan: Plan,
    *,
    calib_loader: Iterable | None = None,
    calib_batches: int = CALIB_BATCHES,
    align: bool = False,
) -> nn.Module:
    """Return a converted copy of ``model`` following ``plan`` (``model`` is left untouched), as
    torch.ao's ``convert`` returns the converted model; with ``calib_loader`` a data-aware plan
    (``init="act"``) is fitted to those batches. :func:`convert` is the same step returning the
    fit report too (:class:`Conversion`)."""
    return convert(model, plan, calib_loader=calib_loader, calib_batches=calib_batches, align=align).model
