"""Budget-targeted anchoring: choose, per section, what to share so the model fits a size.

    model ─► mix and plain plans ─► per section: free | mix | plain, each scored ─►
    exhaustive search (3^sections) for the lowest summed sensitivity with params <= target ─►
    regulators with the budget left, worst-scored sections first ─► one Plan

Costs are exact plan arithmetic (no model is built). Sensitivity is measured per section
with only that section converted:

- ``fit`` (no data needed): the kernel energy the anchors cannot represent,
  sum over members of (relative fit error)^2 x kernel size, over all conv parameters.
- ``kl`` (needs calibration data, the default with data): KL(teacher || candidate) of the
  output distributions on a few calibration batches, after BN recalibration.

Measured (benchmarks/sensitivity_rank.py, ResNet-18 on Fashion-MNIST, 13 candidates): Spearman's
rho against the accuracy after fine-tuning is 0.91 for ``kl`` and 0.42 for ``fit`` — about that of
the parameter count alone, because a pretrained network's kernels fit one anchor equally badly
(relative error ~0.8) in every section.

Regulators are zero-initialised adapters: they do not change the function at conversion,
so no at-init score can value them. They are placed after the sharing is chosen, one
section at a time in order of sensitivity, while the budget allows — where sharing hurt
most, fine-tuning has most to recover.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PlanError, UsageError, choose
from .planning import Group, Plan, RegulatorSpec, make_plan

OPTIONS = ("free", "mix", "plain")
METRICS = ("fit", "kl")
MAX_SECTIONS = 8  # 3^8 = 6,561 candidates


@dataclass(frozen=True)
class SectionScore:
    """The sensitivity of converting one section one way, alone."""

    section: int
    option: str
    sensitivity: float
    params_saved: int


@dataclass(frozen=True)
class BudgetResult:
    """The chosen plan, the search that led to it, and why."""

    plan: Plan
    target: int
    metric: str
    choice: tuple[str, ...]
    regulator_sections: tuple[int, ...]
    sensitivity: float
    scores: tuple[SectionScore, ...]
    candidates: int
    feasible: int
    runners_up: tuple[tuple[tuple[str, ...], int, float], ...] = ()  # (choice, params, sensitivity), best first

    def advice(self) -> str | None:
        """What to do for a better plan, or None: a ``fit``-scored search is little better than size alone."""
        if self.metric != "fit":
            return None
        return ("scored by fit (weights only), which ranked conversions little better than their size in "
                "benchmarks/sensitivity_rank.py (Spearman 0.42 against accuracy after fine-tuning; kl: 0.91): "
                "give calibration data (--dataset, or calib_loader=) for the kl score")  # fmt: skip

    def explain(self) -> list[str]:
        """One line per section and one per group: what was chosen and why."""
        lines = [
            (f"target {self.target:,} params; chosen {self.plan.params_after:,} "
             f"({4 * self.plan.params_after / 1e6:.2f} MB in fp32, "
             f"{self.plan.params_before / self.plan.params_after:.2f}x smaller), summed {self.metric} sensitivity "
             f"{self.sensitivity:.4g}; {self.feasible:,} of {self.candidates:,} candidates fit the budget"),
        ]
        for choice, params, sens in self.runners_up:
            lines.append(f"  candidate {'/'.join(choice)}: {params:,} params, sensitivity {sens:.4g}")
        by = {(s.section, s.option): s for s in self.scores}
        for k, option in enumerate(self.choice, start=1):
            alts = ", ".join(f"{o}: {by[k, o].sensitivity:.3g} (-{by[k, o].params_saved:,})" for o in OPTIONS
                             if (k, o) in by)  # fmt: skip
            reg = " + regulators" if k in self.regulator_sections else ""
            lines.append(f"section {k}: {option}{reg}; options, sensitivity (params saved): {alts}")
        for g in self.plan.groups:
            lines.append(f"  group {g.name}: {len(g.members)} convs share {'x'.join(map(str, g.shape))} "
                         f"(sections {','.join(map(str, g.sections))}): {', '.join(g.members)}")  # fmt: skip
        shared = {m for g in self.plan.groups for m in g.members}
        free = [s.name for s in self.plan.sites if s.name not in shared]
        lines.append(f"  free convs ({len(free)}): {', '.join(free) if free else 'none'}")
        return lines


def compose(mix: Plan, plain: Plan, choice: Sequence[str], regulator_sections: Iterable[int] = ()) -> Plan:
    """The plan that converts section k as ``choice[k-1]`` (free, mix or plain), with regulators in some sections.

    ``mix`` and ``plain`` are full plans of the same model made with ``regulators="all"``.
    Plain members of several sections share one kernel (the widest slice they need).
    """
    regs_in = set(regulator_sections)
    mix_secs = {k for k, o in enumerate(choice, start=1) if o == "mix"}
    plain_secs = {k for k, o in enumerate(choice, start=1) if o == "plain"}
    groups: list[Group] = [g for g in mix.groups if set(g.sections) <= mix_secs]
    section_of = {s.name: k for k, res in enumerate(mix.sections, start=1) for s in mix.sites if s.out_size == tuple(res)}
    for i, g in enumerate(plain.groups):
        members = tuple(m for m in g.members if section_of[m] in plain_secs)
        if len(members) < 2:
            continue
        shapes = [mix.site(m).weight_shape for m in members]
        shape = (max(s[0] for s in shapes), max(s[1] for s in shapes), *g.shape[2:])
        secs = tuple(sorted({section_of[m] for m in members}))
        groups.append(Group(f"plain{i}_{'x'.join(map(str, shape))}", members, shape, None, secs))  # type: ignore[arg-type]
    anchored = {m for g in groups for m in g.members}
    regs: list[RegulatorSpec] = [r for src, secs in ((mix, mix_secs), (plain, plain_secs)) for r in src.regulators
                                 if r.section in secs & regs_in and r.host in anchored]  # fmt: skip
    return replace(mix, mode="budget", groups=tuple(groups), regulators=tuple(sorted(regs, key=lambda r: r.host)))


def _fit_score(model: nn.Module, plan: Plan) -> float:
    from .convert import convert

    errors = convert(model, replace(plan, init="fit")).fit_errors
    total = max(plan.conv_params_before, 1)
    return sum(err**2 * plan.site(m).weight_numel for g in errors.values() for m, err in g.items()) / total


def _kl_score(model: nn.Module, plan: Plan, batches: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    from .convert import convert
    from .distill.calibrate import recalibrate_bn

    student = convert(model, replace(plan, init="act"), calib_loader=[(x, None) for x in batches],
                      calib_batches=len(batches)).model  # fmt: skip
    recalibrate_bn(student, batches, len(batches))
    student.eval()
    total = 0.0
    with torch.no_grad():
        for x, ref in zip(batches, reference, strict=True):
            total += float(F.kl_div(F.log_softmax(student(x), 1), ref, log_target=True, reduction="batchmean"))
    return total / len(batches)


def search(
    model: nn.Module,
    target_params: int,
    input_size: tuple[int, int, int] = (3, 224, 224),
    calib_loader: Iterable | None = None,
    calib_batches: int = 8,
    metric: str | None = None,
    regulator_style: str = "adapter",
    init: str | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
) -> BudgetResult:
    """Find the conversion with the least summed sensitivity whose unique params are <= ``target_params``.

    Args:
        model: the network; left untouched.
        target_params: the budget in unique parameters; the result never exceeds it.
        input_size: (C, H, W) of one example.
        calib_loader: batches of (images, labels) for ``kl`` and the ``act`` init.
        calib_batches: batches used for scoring.
        metric: ``fit`` or ``kl``; default ``kl`` with data, else ``fit``.
        regulator_style: how the chosen regulators attach (``adapter`` or ``paper``).
        init: the init the returned plan asks for; default ``act`` with data, else ``fit``.
        leaf_modules: module types fx must not trace into.

    Raises:
        PlanError: no conversion fits the budget (the smallest possible is named), or the
            model has more sections than the exhaustive search takes.
        UsageError: ``kl`` without data, or an unknown metric.
    """
    metric = metric or ("kl" if calib_loader is not None else "fit")
    choose("metric", metric, METRICS)
    if metric == "kl" and calib_loader is None:
        raise UsageError("the kl sensitivity needs calibration data: give --dataset (or use --metric fit)")
    init = init or ("act" if calib_loader is not None else "fit")
    mix = make_plan(model, "mix", "all", regulator_style, init, input_size, leaf_modules)
    plain = make_plan(model, "plain", "all", regulator_style, init, input_size, leaf_modules)
    n = len(mix.sections)
    if n > MAX_SECTIONS:
        raise PlanError(f"{n} sections: the exhaustive search takes at most {MAX_SECTIONS}; use --mode instead")
    batches, reference = calibration_reference(model, calib_loader, calib_batches) if metric == "kl" else ([], [])
    scores = score_sections(model, mix, plain, metric, batches, reference)
    return pick(mix, plain, scores, target_params, metric)


def calibration_reference(
    model: nn.Module, calib_loader: Iterable, calib_batches: int = 8
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The first ``calib_batches`` input batches and the model's log-probabilities on them (eval mode).

    The ``kl`` sensitivity compares every candidate with these; the model's train/eval mode is restored.
    """
    batches: list[torch.Tensor] = []
    reference: list[torch.Tensor] = []
    was = model.training
    model.eval()
    for i, (x, *_) in enumerate(calib_loader):
        if i >= calib_batches:
            break
        batches.append(x)
        with torch.no_grad():
            reference.append(F.log_softmax(model(x), 1))
    model.train(was)
    return batches, reference


def score_sections(
    model: nn.Module,
    mix: Plan,
    plain: Plan,
    metric: str = "fit",
    batches: Sequence[torch.Tensor] = (),
    reference: Sequence[torch.Tensor] = (),
) -> tuple[SectionScore, ...]:
    """The sensitivity of each (section, option), converting that section alone."""
    n = len(mix.sections)
    scores: list[SectionScore] = []
    for k in range(1, n + 1):
        for option in OPTIONS:
            choice = tuple(option if j == k else "free" for j in range(1, n + 1))
            p = compose(mix, plain, choice)
            if option != "free" and not p.groups:
                continue  # nothing to share in this section that way
            if option == "free":
                s = 0.0
            elif metric == "fit":
                s = _fit_score(model, p)
            else:
                s = _kl_score(model, p, list(batches), list(reference))
            scores.append(SectionScore(k, option, s, p.saved_params - p.scale_params))
    return tuple(scores)


def pick(mix: Plan, plain: Plan, scores: Sequence[SectionScore], target_params: int, metric: str = "fit") -> BudgetResult:
    """Exhaustive search over per-section options, then regulators with the budget left (deterministic).

    Raises:
        PlanError: nothing fits ``target_params``; the smallest reachable size is named.
    """
    n = len(mix.sections)
    by = {(s.section, s.option): s.sensitivity for s in scores}
    best: tuple[float, int, tuple[str, ...], Plan] | None = None
    candidates = feasible = 0
    smallest: int | None = None
    ranked: list[tuple[float, int, tuple[str, ...]]] = []
    for choice in itertools.product(*[[o for o in OPTIONS if (k, o) in by] for k in range(1, n + 1)]):
        candidates += 1
        p = compose(mix, plain, choice)
        smallest = p.params_after if smallest is None else min(smallest, p.params_after)
        if p.params_after > target_params:
            continue
        feasible += 1
        key = (sum(by[k, o] for k, o in enumerate(choice, start=1)), p.params_after, choice, p)
        ranked.append((key[0], key[1], choice))
        if best is None or key[:3] < best[:3]:
            best = key
    if best is None:
        raise PlanError(
            f"no conversion fits {target_params:,} params: the smallest possible is {smallest:,} "
            "(every section shared). Raise the target, or prune as well"
        )
    sens, _, choice, p = best
    regs: list[int] = []
    for k in sorted(range(1, n + 1), key=lambda k: (-by[k, choice[k - 1]], k)):
        if choice[k - 1] == "free":
            continue
        trial = compose(mix, plain, choice, [*regs, k])
        if trial.params_after <= target_params and trial.regulators != p.regulators:
            regs.append(k)
            p = trial
    top = tuple((c, n, s) for s, n, c in sorted(ranked)[:5])
    return BudgetResult(p, target_params, metric, choice, tuple(sorted(regs)), sens, tuple(scores), candidates, feasible,
                        top)  # fmt: skip


def resolve_target(params_before: int, target_params: int | None = None, target_ratio: float | None = None,
                   target_bytes: int | None = None, bytes_per_param: int = 4) -> int:  # fmt: skip
    """One budget in unique parameters from whichever target was given (bytes at ``bytes_per_param``).

    Raises:
        UsageError: none or several targets, or a value that is not positive.
    """
    given = [t for t in (target_params, target_ratio, target_bytes) if t is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of --target-params, --target-ratio, --target-bytes")
    if not given[0] > 0:
        raise UsageError(f"the target must be positive, got {given[0]}")
    if target_ratio is not None:
        return int(params_before / target_ratio)
    if target_bytes is not None:
        return int(target_bytes // bytes_per_param)
    return int(target_params)  # type: ignore[arg-type]
