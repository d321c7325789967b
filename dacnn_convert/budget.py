"""Budget-targeted anchoring: choose, per section, what to share so the model fits a size.

    model ─► mix and plain plans ─► per section: free | mix | plain | bank:f, and a rank for the
    convs that share with nothing (dense | lr:f), each scored ─► exhaustive search (Pareto-pruned)
    for the lowest summed sensitivity with params <= target ─► regulators with the budget left,
    worst-scored sections first ─► banks and low-rank convs grown into what is left ─► one Plan

``bank:f`` gives each share group of the section a bank of f x C_out filters
(:mod:`dacnn_convert.core.banks`); ``lr:f`` factorises the section's unshared convs (stride-2 first
convs, downsample 1x1s) at rank f x C_out. The grids are :data:`BANK_GRID` and :data:`RANK_GRID`.

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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .core.banks import bank_params, bankable, factorizable
from .core.graph import ConvSite
from .core.modes import mode
from .core.plan import Group, Plan, RegulatorSpec
from .core.planning import bank_group, make_plan
from .defaults import default_init
from .errors import PlanError, UsageError, choose, render

OPTIONS = ("free", "mix", "plain")  # the anchoring space of the paper's modes
BANK_GRID = (1.0, 0.5, 0.25, 0.125, 0.0625)  # bank filters as a fraction of C_out
RANK_GRID = (0.5, 0.25, 0.125)  # low-rank ranks of unshared convs, as a fraction of C_out
BANK_OPTIONS = (*OPTIONS, *(f"bank:{f}" for f in BANK_GRID))  # "bank:1.0": k = C_out (a fraction, always)
RANK_OPTIONS = tuple(f"lr:{f}" for f in RANK_GRID)
SPACES = ("bank", "anchor")  # bank: every option; anchor: free / mix / plain + regulators only
METRICS = ("fit", "kl")
MAX_SECTIONS = 8
MAX_COMBINATIONS = 2_000_000  # Pareto-kept combinations the exhaustive search will enumerate


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
    ranks: tuple[str, ...] = ()  # per section: "dense" or "lr:f" for the convs that share with nothing
    grown: tuple[str, ...] = ()  # what the leftover budget bought after the search, one line each

    def advice(self, cli: bool = False) -> str | None:
        """What to do for a better plan, or None: a ``fit``-scored search is little better than size alone.

        ``cli`` names the setting as a command-line flag instead of a Python keyword.
        """
        if self.metric != "fit":
            return None
        return render(
            "scored by fit (weights only), which ranked conversions little better than their size in "
            "benchmarks/sensitivity_rank.py (Spearman 0.42 against accuracy after fine-tuning; kl: 0.91): "
            "give calibration data («dataset») for the kl score",
            cli,
        )

    def explain(self) -> list[str]:
        """One line per section and one per group: what was chosen and why."""
        lines = [
            (
                f"target {self.target:,} params; chosen {self.plan.params_after:,} "
                f"({4 * self.plan.params_after / 1e6:.2f} MB in fp32, "
                f"{self.plan.params_before / self.plan.params_after:.2f}x smaller), summed {self.metric} sensitivity "
                f"{self.sensitivity:.4g}; {self.feasible:,} of {self.candidates:,} candidates fit the budget"
            ),
        ]
        for choice, params, sens in self.runners_up:
            lines.append(f"  candidate {'/'.join(choice)}: {params:,} params, sensitivity {sens:.4g}")
        by = {(s.section, s.option): s for s in self.scores}
        for k, option in enumerate(self.choice, start=1):
            alts = ", ".join(
                f"{o}: {by[k, o].sensitivity:.3g} (-{by[k, o].params_saved:,})"
                for o in (*BANK_OPTIONS, *RANK_OPTIONS)
                if (k, o) in by
            )
            reg = " + regulators" if k in self.regulator_sections else ""
            rank = f" + unshared convs {self.ranks[k - 1]}" if self.ranks and self.ranks[k - 1] != "dense" else ""
            lines.append(f"section {k}: {option}{reg}{rank}; options, sensitivity (params saved): {alts}")
        lines += [f"  grown: {g}" for g in self.grown]
        for g in self.plan.groups:
            what = (
                f"share {'x'.join(map(str, g.shape))}"
                if g.kind == "anchor"
                else (
                    f"share a bank of {g.rank} filters ({'x'.join(map(str, g.shape))}) + a 1x1 each"
                    if len(g.members) > 1
                    else f"low-rank, rank {g.rank}"
                )
            )
            lines.append(
                f"  group {g.name}: {len(g.members)} conv(s) {what} "
                f"(sections {','.join(map(str, g.sections))}): {', '.join(g.members)}"
            )
        shared = {m for g in self.plan.groups for m in g.members}
        free = [s.name for s in self.plan.sites if s.name not in shared]
        lines.append(f"  free convs ({len(free)}): {', '.join(free) if free else 'none'}")
        return lines


def _fraction(option: str) -> float:
    return float(option.partition(":")[2])


def _bank_groups(mix: Plan, section: int, f: float) -> list[Group]:
    """A bank of f x C_out filters (at most what the group can use) for each share group of ``section``."""
    out = []
    for i, g in enumerate(mix.groups):
        members = [mix.site(m) for m in g.members]
        if g.sections != (section,) or not bankable(members):
            continue
        co, ci, kh, kw = members[0].weight_shape
        k = min(max(1, round(f * co)), len(members) * co, ci * kh * kw)
        if bank_params(members[0], len(members), k) < sum(m.weight_numel for m in members):
            out.append(bank_group(members, k, section, i))
    return out


def unshared_sites(mix: Plan) -> list[ConvSite]:
    """Convs that share with nothing in ``mix`` and can be factorised, each in a section."""
    grouped = {m for g in mix.groups for m in g.members}
    sections = {tuple(r) for r in mix.sections}
    return [s for s in mix.sites if s.name not in grouped and factorizable(s) and s.out_size in sections]


def _low_rank_groups(mix: Plan, section: int, f: float) -> list[Group]:
    """A rank f x C_out factorisation of each unshared conv of ``section`` that it makes smaller."""
    res = tuple(mix.sections[section - 1])
    out = []
    for s in unshared_sites(mix):
        r = min(max(1, round(f * s.out_channels)), s.out_channels, s.weight_numel // s.out_channels)
        if s.out_size == res and bank_params(s, 1, r) < s.weight_numel:
            out.append(bank_group([s], r, section, 0))
    return out


def compose(
    mix: Plan,
    plain: Plan,
    choice: Sequence[str],
    regulator_sections: Iterable[int] = (),
    ranks: Sequence[str] | None = None,
) -> Plan:
    """The plan that converts section k as ``choice[k-1]``, with regulators in some sections.

    ``choice`` items are ``free``, ``mix``, ``plain`` or ``bank:f``; ``ranks`` items (one per
    section, default all ``dense``) are ``dense`` or ``lr:f`` for the section's unshared convs.
    ``mix`` and ``plain`` are full plans of the same model made with ``regulators="all"``.
    Plain members of several sections share one kernel (the widest slice they need).
    Regulators go only to mix and plain sections.
    """
    regs_in = set(regulator_sections)
    mix_secs = {k for k, o in enumerate(choice, start=1) if o == "mix"}
    plain_secs = {k for k, o in enumerate(choice, start=1) if o == "plain"}
    groups: list[Group] = [g for g in mix.groups if set(g.sections) <= mix_secs]
    section_of = {
        s.name: k for k, res in enumerate(mix.sections, start=1) for s in mix.sites if s.out_size == tuple(res)
    }
    for i, g in enumerate(plain.groups):
        members = tuple(m for m in g.members if section_of[m] in plain_secs)
        if len(members) < 2:
            continue
        shapes = [mix.site(m).weight_shape for m in members]
        shape = (max(s[0] for s in shapes), max(s[1] for s in shapes), *g.shape[2:])
        secs = tuple(sorted({section_of[m] for m in members}))
        groups.append(Group(f"plain{i}_{'x'.join(map(str, shape))}", members, shape, None, secs))  # type: ignore[arg-type]
    anchored = {m for g in groups for m in g.members}
    regs: list[RegulatorSpec] = [
        r
        for src, secs in ((mix, mix_secs), (plain, plain_secs))
        for r in src.regulators
        if r.section in secs & regs_in and r.host in anchored
    ]
    for k, option in enumerate(choice, start=1):
        if option.startswith("bank:"):
            groups += _bank_groups(mix, k, _fraction(option))
    for k, rank in enumerate(ranks or (), start=1):
        if rank != "dense":  # a conv that plain mode already shares is not factorised as well
            groups += [g for g in _low_rank_groups(mix, k, _fraction(rank)) if g.members[0] not in anchored]
    return replace(mix, mode="budget", groups=tuple(groups), regulators=tuple(sorted(regs, key=lambda r: r.host)))


def _fit_score(model: nn.Module, plan: Plan) -> float:
    from .core.convert import convert

    errors = convert(model, replace(plan, init="fit")).fit_errors
    total = max(plan.conv_params_before, 1)
    return sum(err**2 * plan.site(m).weight_numel for g in errors.values() for m, err in g.items()) / total


def _kl_score(
    model: nn.Module, plan: Plan, batches: list[torch.Tensor], reference: list[torch.Tensor], moments: Any = None
) -> float:
    from .core.convert import convert
    from .train.calibrate import recalibrate_bn

    student = convert(
        model,
        replace(plan, init="act"),
        calib_loader=[(x, None) for x in batches],
        calib_batches=len(batches),
        moments=moments,
    ).model
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
    space: str = "bank",
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
        space: ``bank`` (free / mix / plain / banks per section, low-rank unshared convs) or
            ``anchor`` (free / mix / plain and regulators only, as before banks existed).

    Raises:
        PlanError: no conversion fits the budget (the smallest possible is named), or the
            model has more sections than the exhaustive search takes.
        UsageError: ``kl`` without data, or an unknown metric or space.
    """
    metric = metric or ("kl" if calib_loader is not None else "fit")
    choose("metric", metric, METRICS)
    choose("search space", space, SPACES)
    if metric == "kl" and calib_loader is None:
        raise UsageError("the kl sensitivity needs calibration data: give «dataset» (or use «metric=fit»)")
    init = default_init(init, calib_loader is not None)
    mix = make_plan(model, "mix", "all", regulator_style, init, input_size, leaf_modules)
    plain = make_plan(model, "plain", "all", regulator_style, init, input_size, leaf_modules)
    n = len(mix.sections)
    if n > MAX_SECTIONS:
        raise PlanError(f"{n} sections: the exhaustive search takes at most {MAX_SECTIONS}; use «mode» instead")
    batches, reference = calibration_reference(model, calib_loader, calib_batches) if metric == "kl" else ([], [])
    options, ranks = (BANK_OPTIONS, RANK_OPTIONS) if space == "bank" else (OPTIONS, ())
    scores = score_sections(model, mix, plain, metric, batches, reference, options, ranks)
    return pick(mix, plain, scores, target_params, metric)


def calibration_reference(
    model: nn.Module, calib_loader: Iterable, calib_batches: int = 8
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The first ``calib_batches`` input batches and the model's log-probabilities on them (eval mode).

    The ``kl`` sensitivity compares every candidate with these; the model's train/eval mode is restored.
    """
    batches: list[torch.Tensor] = []
    reference: list[torch.Tensor] = []
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    with mode(model), torch.no_grad():
        for i, (x, *_) in enumerate(calib_loader):
            if i >= calib_batches:
                break
            x = x.to(device)
            batches.append(x)
            reference.append(F.log_softmax(model(x), 1))
    return batches, reference


def score_sections(
    model: nn.Module,
    mix: Plan,
    plain: Plan,
    metric: str = "fit",
    batches: Sequence[torch.Tensor] = (),
    reference: Sequence[torch.Tensor] = (),
    options: Sequence[str] = OPTIONS,
    ranks: Sequence[str] = (),
) -> tuple[SectionScore, ...]:
    """The sensitivity of each (section, option) and (section, rank), converting that alone.

    With ``kl``, the input moments of every conv are collected once (one pass over ``batches``)
    and reused by every candidate's data-aware fit.
    """
    from .core.fitting import input_moments

    n = len(mix.sections)
    moments = None
    if metric == "kl" and (len(options) > len(OPTIONS) or ranks):
        names = [
            s.name
            for s in mix.sites
            if s.groups == 1 and s.padding_mode == "zeros" and not isinstance(s.padding, str) and not s.reused
        ]
        moments = input_moments(model, names, [(x, None) for x in batches], len(batches))
    scores: list[SectionScore] = []
    free = ("free",) * n
    trials = [
        (k, o, tuple(o if j == k else "free" for j in range(1, n + 1)), None) for k in range(1, n + 1) for o in options
    ]
    trials += [
        (k, r, free, tuple(r if j == k else "dense" for j in range(1, n + 1))) for k in range(1, n + 1) for r in ranks
    ]
    for k, option, choice, rank in trials:
        p = compose(mix, plain, choice, ranks=rank)
        if option != "free" and not p.groups:
            continue  # nothing to convert in this section that way
        if option == "free":
            sens = 0.0
        elif metric == "fit":
            sens = _fit_score(model, p)
        else:
            sens = _kl_score(model, p, list(batches), list(reference), moments)
        scores.append(SectionScore(k, option, sens, p.saved_params - p.scale_params))
    return tuple(scores)


def _pareto(pairs: list[tuple[float, int, str, str]]) -> list[tuple[float, int, str, str]]:
    """Keep (sensitivity, saved, option, rank) pairs that no other pair beats on both counts."""
    kept = []
    for a in sorted(pairs, key=lambda t: (t[0], -t[1], t[2], t[3])):
        if not kept or a[1] > kept[-1][1]:
            kept.append(a)
    return kept


def pick(
    mix: Plan, plain: Plan, scores: Sequence[SectionScore], target_params: int, metric: str = "fit"
) -> BudgetResult:
    """Exhaustive search over per-section options, regulators, then growth into the budget left (deterministic).

    Costs add up section by section except where plain members of several sections share
    one master kernel; those are computed exactly for every set of plain sections. Per
    section, (option, rank) pairs that another pair beats on both sensitivity and size are
    dropped before the search (they can never be chosen); ``feasible`` counts the kept
    combinations that fit, ``candidates`` every combination of the space.

    Raises:
        PlanError: nothing fits ``target_params`` (the smallest reachable size is named), or
            more than :data:`MAX_COMBINATIONS` combinations are left to search.
    """
    n = len(mix.sections)
    by = {(s.section, s.option): s for s in scores}
    share = [[o for o in BANK_OPTIONS if (k, o) in by] for k in range(1, n + 1)]
    rank_opts = [["dense", *(r for r in RANK_OPTIONS if (k, r) in by)] for k in range(1, n + 1)]
    candidates = 1
    for k in range(n):
        candidates *= len(share[k]) * len(rank_opts[k])
    plain_saved: dict[frozenset[int], int] = {}
    for size in range(n + 1):
        for secs in itertools.combinations(range(1, n + 1), size):
            p = compose(mix, plain, ["plain" if k in secs else "free" for k in range(1, n + 1)])
            plain_saved[frozenset(secs)] = p.saved_params - p.scale_params

    def cost(k: int, o: str) -> tuple[float, int]:
        s = by.get((k, o))
        return (s.sensitivity, s.params_saved) if s is not None else (0.0, 0)

    per_section = []
    for k in range(1, n + 1):
        pairs = [
            (cost(k, o)[0] + cost(k, r)[0], (0 if o == "plain" else cost(k, o)[1]) + cost(k, r)[1], o, r)
            for o in share[k - 1]
            for r in rank_opts[k - 1]
            if o != "plain" or r == "dense"
        ]  # plain shares the unshared convs too: nothing left to factorise
        plain_pairs = [p for p in pairs if p[2] == "plain"]
        per_section.append(_pareto([p for p in pairs if p[2] != "plain"]) + _pareto(plain_pairs))
    searched = 1
    for pairs in per_section:
        searched *= len(pairs)
    if searched > MAX_COMBINATIONS:
        raise PlanError(
            f"{n} sections give {searched:,} combinations to search, more than {MAX_COMBINATIONS:,}: use the anchor "
            "space (space='anchor') or a hand-written «mode» bank with a «bank-size» per section"
        )
    best: tuple[float, int, tuple[str, ...], tuple[str, ...]] | None = None
    feasible = 0
    smallest: int | None = None
    ranked: list[tuple[float, int, tuple[str, ...]]] = []  # the five best, kept sorted
    for combo in itertools.product(*per_section):
        plains = frozenset(k for k, c in enumerate(combo, start=1) if c[2] == "plain")
        params = mix.params_before - sum(c[1] for c in combo) - plain_saved[plains]
        smallest = params if smallest is None else min(smallest, params)
        if params > target_params:
            continue
        feasible += 1
        sens = sum(c[0] for c in combo)
        choice, ranks = tuple(c[2] for c in combo), tuple(c[3] for c in combo)
        if len(ranked) < 5 or (sens, params) < ranked[-1][:2]:
            label = tuple(o if r == "dense" else f"{o}+{r}" for o, r in zip(choice, ranks, strict=True))
            ranked = sorted([*ranked, (sens, params, label)])[:5]
        key = (sens, params, choice, ranks)
        if best is None or key < best:
            best = key
    if best is None:
        raise PlanError(
            f"no conversion fits {target_params:,} params: the smallest possible is {smallest:,} "
            "(every section shared as far as the search goes). Raise the target, or prune as well"
        )
    sens, expected, choice, ranks = best
    p = compose(mix, plain, choice, ranks=ranks)
    if p.params_after != expected:  # the additive arithmetic and the composed plan must agree exactly
        raise PlanError(
            f"budget search bug: {'/'.join(choice)} ({'/'.join(ranks)}) was costed at {expected:,} params "
            f"but composes to {p.params_after:,}; please report it"
        )
    regs: list[int] = []
    for k in sorted(range(1, n + 1), key=lambda k: (-by[k, choice[k - 1]].sensitivity, k)):
        if choice[k - 1] not in ("mix", "plain"):
            continue
        trial = compose(mix, plain, choice, [*regs, k], ranks)
        if trial.params_after <= target_params and trial.regulators != p.regulators:
            regs.append(k)
            p = trial
    section_sens = {k: by[k, choice[k - 1]].sensitivity + cost(k, ranks[k - 1])[0] for k in range(1, n + 1)}
    p, grown = _grow(p, target_params, section_sens)
    top = tuple((c, m, s) for s, m, c in ranked)
    rank_out = ranks if any(len(opts) > 1 for opts in rank_opts) else ()
    return BudgetResult(
        p,
        target_params,
        metric,
        choice,
        tuple(sorted(regs)),
        sens,
        tuple(scores),
        candidates,
        feasible,
        top,
        rank_out,
        tuple(grown),
    )


def _grow(p: Plan, target_params: int, section_sens: dict[int, float]) -> tuple[Plan, list[str]]:
    """Spend what the budget leaves on more filters, most sensitive section first (never over the target).

    The grids are coarse (factors of 2), so the chosen plan can leave much of the budget unused;
    each step adds about an eighth of a bank's filters (at least one) where it still fits.
    """
    groups = list(p.groups)
    left = target_params - p.params_after
    order = sorted(
        (i for i, g in enumerate(groups) if g.kind == "bank"),
        key=lambda i: (-section_sens.get(groups[i].sections[0] if groups[i].sections else 0, 0.0), i),
    )
    start = {i: groups[i].rank for i in order}
    while True:
        for i in order:
            g = groups[i]
            site = p.site(g.members[0])
            d = site.weight_numel // site.out_channels
            per = d + sum(p.site(m).out_channels for m in g.members)  # one more filter and its coefficients
            dense = sum(p.site(m).weight_numel for m in g.members)
            cap = min(len(g.members) * site.out_channels, d, (dense - 1) // per)  # never costlier than dense convs
            step = min(max(1, g.rank // 8), cap - g.rank, left // per)
            if step > 0:
                groups[i] = _resized(g, g.rank + step)
                left -= step * per
                break
        else:
            break
    grown = [f"{groups[i].name}: {start[i]} -> {groups[i].rank} filters" for i in order if groups[i].rank != start[i]]
    return replace(p, groups=tuple(groups)), grown


def _resized(g: Group, k: int) -> Group:
    name = (
        g.name if len(g.members) == 1 else g.name.rsplit("_bank", 1)[0] + f"_bank{k}x" + "x".join(map(str, g.shape[1:]))
    )
    return replace(g, name=name, shape=(k, *g.shape[1:]))


def resolve_target(
    params_before: int,
    target_params: int | None = None,
    target_ratio: float | None = None,
    target_bytes: int | None = None,
    bytes_per_param: int = 4,
) -> int:
    """One budget in unique parameters from whichever target was given (bytes at ``bytes_per_param``).

    Raises:
        UsageError: none or several targets, or a value that is not positive.
    """
    given = [t for t in (target_params, target_ratio, target_bytes) if t is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of «target-params», «target-ratio», «target-bytes»")
    if not given[0] > 0:
        raise UsageError(f"the target must be positive, got {given[0]}")
    if target_ratio is not None:
        return int(params_before / target_ratio)
    if target_bytes is not None:
        return int(target_bytes // bytes_per_param)
    return int(target_params)  # type: ignore[arg-type]
