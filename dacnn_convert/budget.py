"""Budget-targeted anchoring: choose, per section, what to share so the model fits a size.

    model ─► mix and plain plans ─► per section: free | mix | plain | bank:f, and a rank for the
    convs that share with nothing (dense | lr:f) and for the output layer (out:g, with data), each
    scored ─► exact multiple-choice knapsack
    for the lowest summed sensitivity with params <= target ─► regulators with the budget left,
    worst-scored sections first ─► banks and low-rank convs grown into what is left ─► one Plan

``bank:f`` gives each share group of the section a bank of f x C_out filters
(:mod:`dacnn_convert.core.banks`); ``lr:f`` factorises the section's unshared convs (stride-2 first
convs, downsample 1x1s, Linears) at rank f x min(C_out, C_in x kh x kw); ``out:g`` the layer producing the
outputs, on its own (``lr:f|out:g``: both). The grids are :data:`BANK_GRID` and :data:`RANK_GRID`.

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

import copy
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from . import amounts, validate
from .core.banks import bank_params, bankable, factorizable, rank_limit
from .core.fitting import BasisCache
from .core.graph import ConvSite
from .core.kinds import is_plain
from .core.knapsack import Option, Solution, front
from .core.modes import mode
from .core.plan import Group, Plan, RegulatorSpec
from .core.planning import InitName, RegulatorStyleName, bank_group, linear_groups, make_plan
from .defaults import DEFAULT_INPUT_SIZE, RESCORE_ROUNDS, SCORE_BATCHES, default_init
from .errors import PlanError, TargetError, TraceError, UsageError, choose, render
from .names import METRICS
from .validate import inputs_of

if TYPE_CHECKING:
    from .core.partial import PrefixCache

OPTIONS = ("free", "mix", "plain")  # the anchoring space of the paper's modes
# bank filters as a fraction of C_out, down to 1/256 (k = 1 for C_out <= 384): a bank's 1x1 coefficients
# (n x C_out x k) are what is left at the bottom of the grid, and 1/64 held EfficientNet-B0 at 12.6% at 32 px
BANK_GRID = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625)
# low-rank ranks of unshared convs, as a fraction of each conv's rank limit min(C_out, C_in x kh x kw):
# of C_out for most 3x3 convs, of C_in for the expanding 1x1s of inverted residuals
RANK_GRID = (
    0.5,
    0.25,
    0.125,
    0.0625,
    0.03125,
    0.015625,
    0.0078125,
    0.00390625,
)  # 1/64: MobileNetV3, ConvNeXt reach 10%
BANK_OPTIONS = (*OPTIONS, *(f"bank:{f}" for f in BANK_GRID))  # "bank:1.0": k = C_out (a fraction, always)
RANK_OPTIONS = tuple(f"lr:{f}" for f in RANK_GRID)
# the layer producing the outputs, ranked on its own (never bundled with its section's other unshared layers):
# a section's rank is "lr:f", "out:g" or both, "lr:f|out:g"
HEAD_OPTIONS = tuple(f"out:{f}" for f in RANK_GRID)
SPACES = ("bank", "anchor")  # bank: every option; anchor: free / mix / plain + regulators only
# per section with several share groups, at most this many per-group bank-size combinations (the non-dominated
# ones, evenly spaced along their front) join the section's options
GROUP_COMBINATIONS = 24


class SectionPick(NamedTuple):
    """What the search picks for one section: how its share groups convert (``free``, ``mix``, ``plain``,
    ``bank:f``) and the rank of its unshared convs and output layer (``dense``, ``lr:f``, ``out:g`` or
    ``lr:f|out:g``)."""

    share: str
    rank: str

    @property
    def label(self) -> str:
        return self.share if self.rank == "dense" else f"{self.share}+{self.rank}"


@dataclass(frozen=True)
class SectionScore:
    """The sensitivity of converting one section one way, alone."""

    section: int
    option: str
    sensitivity: float
    params_saved: int
    macs_saved: int = 0  # per example, exact (Plan.macs_saved of the section converted this way alone)


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
    ranks: tuple[str, ...] = ()  # per section: "dense", "lr:f", "out:g" or "lr:f|out:g" (unshared layers, output layer)
    grown: tuple[str, ...] = ()  # what the leftover budget bought after the search, one line each
    rescored: tuple[tuple[tuple[str, ...], float], ...] = ()  # (choice, whole-plan kl) of refine's plans, best first
    target_macs: int | None = None  # MACs per example the plan had to fit, if asked
    macs_before: int = 0  # of the model at the plan's input size (0: not counted, no MAC target)
    latency_ms: float | None = None  # measured median of the chosen plan, for a latency target
    latency_tries: tuple[tuple[int, float], ...] = ()  # (MACs, measured ms) of every plan timed, in order
    latency_before_ms: float | None = None  # the original's measured median, same batch and machine
    latency_batch: int = 1
    # channel pruning the search tried before sharing (prune_search): (ratio, whole-plan kl against the
    # original or None without data, params, MACs or 0 when not counted, per-section ratios or () for one ratio
    # everywhere; a per-section try's ratio is the uniform one whose MACs it was chosen to remove), in the order tried
    prune_tries: tuple[tuple[float, float | None, int, int, tuple[float, ...]], ...] = ()
    # banks shared across stages (share_across): one line per merge, then the outcome; () when not tried
    across: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The search as plain values (the plan itself is :meth:`Plan.to_dict`)."""
        return {
            "target": self.target,
            "target_macs": self.target_macs,
            "macs_before": self.macs_before,
            "latency_ms": self.latency_ms,
            "latency_tries": [list(t) for t in self.latency_tries],
            "metric": self.metric,
            "choice": list(self.choice),
            "unshared": list(self.ranks),
            "regulator_sections": list(self.regulator_sections),
            "sensitivity": self.sensitivity,
            "candidates": self.candidates,
            "feasible": self.feasible,
            "grown": list(self.grown),
            "options": [
                {
                    "section": s.section,
                    "option": s.option,
                    "sensitivity": s.sensitivity,
                    "params_saved": s.params_saved,
                    "macs_saved": s.macs_saved,
                }
                for s in self.scores
            ],
            "runners_up": [{"choice": list(c), "params": p, "sensitivity": v} for c, p, v in self.runners_up],
            "rescored": [{"choice": list(c), "kl": v} for c, v in self.rescored],
            "prune": self.plan.prune.ratio if self.plan.prune is not None else 0.0,
            "prune_sections": list(self.plan.prune.sections) if self.plan.prune is not None else [],
            "prune_tries": [
                {"ratio": r, "kl": kl, "params": p, "macs": m or None, "sections": list(by)}
                for r, kl, p, m, by in self.prune_tries
            ],
            "across": list(self.across),
        }

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
                f"{self.plan.params_before / self.plan.params_after:.2f}x smaller), "
                + (f"whole-plan kl {self.sensitivity:.4g}" if self.rescored else f"summed {self.metric} sensitivity ")
                + ("" if self.rescored else f"{self.sensitivity:.4g}")
                + f"; {self.feasible:,} non-dominated plans of {self.candidates:,} combinations fit the budget"
            ),
        ]
        if self.latency_ms is not None:
            tried = ", ".join(f"{m:,} MACs: {ms:.3g} ms" for m, ms in self.latency_tries)
            before = f", the original {self.latency_before_ms:.3g} ms" if self.latency_before_ms else ""
            lines.append(
                f"measured latency {self.latency_ms:.3g} ms per batch of {self.latency_batch}{before} "
                f"(plans timed: {tried})"
            )
        if self.target_macs is not None:
            after = self.macs_before - self.plan.macs_saved
            what = "MAC budget (tightened for the latency target)" if self.latency_tries else "target"
            lines.append(
                f"{what} {self.target_macs:,} MACs per example; chosen {after:,} "
                f"({self.macs_before / max(after, 1):.2f}x fewer than {self.macs_before:,})"
            )
        if self.plan.prune is not None:
            p = self.plan.prune
            lines.append(
                f"pruned first: {p.amount} by {p.importance} importance "
                f"(-{p.params_saved:,} params, {_macs(p.macs_saved)}), then shared"
            )
        for ratio, kl, params, macs, per in self.prune_tries:
            score = f"whole-plan kl {kl:.4g} against the original" if kl is not None else "reaches the targets"
            at = f", {macs:,} MACs" if macs else ""
            what = (
                f"per section {'/'.join(f'{r:g}' for r in per)} (by output size, largest first: removing as much "
                f"as {ratio:g} everywhere, where it costs least)"
                if per
                else f"{ratio:g}"
            )
            lines.append(f"  channel pruning {what} then sharing: {params:,} params{at}, {score}")
        for choice, kl in self.rescored:
            lines.append(f"  re-scored whole: {'/'.join(choice)}: kl {kl:.4g}")
        for choice, params, sens in self.runners_up:
            lines.append(f"  candidate {'/'.join(choice)}: {params:,} params, sensitivity {sens:.4g}")
        by = {(s.section, s.option): s for s in self.scores}
        for k, option in enumerate(self.choice, start=1):
            alts = ", ".join(
                f"{o}: {by[k, o].sensitivity:.3g} (-{by[k, o].params_saved:,}, {_macs(by[k, o].macs_saved)})"
                for o in (*BANK_OPTIONS, *RANK_OPTIONS, *HEAD_OPTIONS)
                if (k, o) in by
            )
            reg = " + regulators" if k in self.regulator_sections else ""
            rank = "".join(
                f" + output layer {part}" if part.startswith("out:") else f" + unshared layers {part}"
                for part in _rank_parts(self.ranks[k - 1] if self.ranks else "dense")
            )
            lines.append(f"section {k}: {option}{reg}{rank}; options, sensitivity (params saved, MACs saved): {alts}")
            per_group: dict[str, list[SectionScore]] = {}
            for sc in self.scores:
                if sc.section == k and sc.option.startswith("bank@"):
                    per_group.setdefault(_group_index(sc.option), []).append(sc)
            chosen = _per_group(option) if option.startswith("banks:") else {}
            for index, alone in per_group.items():
                sizes = ", ".join(
                    f"{_fraction(sc.option):g}: {sc.sensitivity:.3g} (-{sc.params_saved:,})" for sc in alone
                )
                pick_g = f"bank {chosen[index]:g}" if index in chosen else "as the section"
                lines.append(f"  group {index} alone, bank size: sensitivity (params saved): {sizes}; chosen: {pick_g}")
        lines += [f"  grown: {g}" for g in self.grown]
        lines += [f"  across stages: {a}" for a in self.across]
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
            kind = "Linear(s)" if self.plan.site(g.members[0]).layer == "linear" else "conv(s)"
            if kind == "Linear(s)" and len(g.members) > 1:
                what = f"share a basis of {g.rank} rows ({g.shape[0]}x{g.shape[1]}) + their own coefficients"
            lines.append(
                f"  group {g.name}: {len(g.members)} {kind} {what} "
                f"(sections {','.join(map(str, g.sections))}): {', '.join(g.members)}"
            )
        shared = {m for g in self.plan.groups for m in g.members}
        free = [s.name for s in self.plan.sites if s.name not in shared]
        lines.append(f"  free convs and Linears ({len(free)}): {', '.join(free) if free else 'none'}")
        return lines


def _macs(saved: int) -> str:
    """MACs saved per example, short: -1.2M; +0.3M where an option adds MACs (regulators)."""
    return f"{-saved / 1e6:+.2f}M MACs" if saved else "0 MACs"


def _fraction(option: str) -> float:
    return float(option.rpartition(":")[2])


def share_groups(mix: Plan, section: int) -> list[tuple[str, list[ConvSite]]]:
    """The bankable share groups of ``section``, each with its index: mix's conv groups (``"3"``) and the
    same-shape Linears of the section (``"l0"``, :func:`~dacnn_convert.core.planning.linear_groups`)."""
    res = tuple(mix.sections[section - 1])
    shared = [(f"{i}", [mix.site(m) for m in g.members]) for i, g in enumerate(mix.groups) if g.sections == (section,)]
    shared += [(f"l{i}", members) for i, members in enumerate(linear_groups(mix.sites)) if members[0].out_size == res]
    return [(index, members) for index, members in shared if bankable(members)]


def _bank_groups(mix: Plan, section: int, f: float | dict[str, float]) -> list[Group]:
    """A bank of f x C_out filters (at most what the group can use) for each share group of ``section``;
    ``f`` a dict: only the groups it names, each at its own fraction."""
    out = []
    for index, members in share_groups(mix, section):
        frac = f.get(index) if isinstance(f, dict) else f
        k = None if frac is None else _bank_size(members, frac)
        if k is not None:
            out.append(bank_group(members, k, section, index))
    return out


def _bank_size(members: Sequence[ConvSite], frac: float) -> int | None:
    """The filters of a bank of ``frac`` x C_out for ``members`` (at most what they can use); None where such
    a bank would not be smaller than the layers it replaces."""
    co, ci, kh, kw = members[0].weight_shape
    k = min(max(1, round(frac * co)), len(members) * co, ci * kh * kw)
    return k if bank_params(members[0], len(members), k) < sum(m.weight_numel for m in members) else None


def _group_index(option: str) -> str:
    """``bank@3:0.25`` -> ``"3"``: the share group a per-group option is for."""
    return option[len("bank@") :].partition(":")[0]


def _per_group(option: str) -> dict[str, float]:
    """``bank@3:0.25`` -> {"3": 0.25}; ``banks:3=0.25,l0=0.5`` -> {"3": 0.25, "l0": 0.5}."""
    if option.startswith("bank@"):
        index, _, f = option[len("bank@") :].partition(":")
        return {index: float(f)}
    return {i: float(f) for i, _, f in (part.partition("=") for part in option[len("banks:") :].split(","))}


def unshared_sites(mix: Plan) -> list[ConvSite]:
    """Convs and Linears that share with nothing in ``mix`` and can be factorised, each in a section.

    The layer that produces the model's outputs (``ConvSite.feeds_output``) is not among them: its rank
    bounds the logits' (a 10-class head at rank 2 tells at most 3 classes apart), and bundled with its
    section's other layers one rank option would carry its cost to all of them (EfficientNet-B0 at 32 px:
    section 4 at rank 1/4 cost kl 1.137 with the classifier, 0.003 without). It has rank options of its
    own (:func:`output_sites`, ``out:f``), which a 1000-class head may take and a 10-class one rarely will.
    """
    grouped = _grouped(mix)
    sections = {tuple(r) for r in mix.sections}
    return [
        s
        for s in mix.sites
        if s.name not in grouped and factorizable(s) and s.out_size in sections and not s.feeds_output
    ]


def _grouped(mix: Plan) -> set[str]:
    """The layers of ``mix`` that are in a share group (conv or Linear)."""
    return {m for g in mix.groups for m in g.members} | {s.name for b in linear_groups(mix.sites) for s in b}


def output_sites(mix: Plan) -> list[ConvSite]:
    """The layers producing the model's outputs that share with nothing and can be factorised, each in a section."""
    grouped = _grouped(mix)
    sections = {tuple(r) for r in mix.sections}
    return [
        s for s in mix.sites if s.feeds_output and s.name not in grouped and factorizable(s) and s.out_size in sections
    ]


def _rank_parts(rank: str) -> list[str]:
    """``lr:0.25|out:0.5`` -> [``lr:0.25``, ``out:0.5``]; ``dense`` -> []."""
    return [] if rank == "dense" else rank.split("|")


def _low_rank_groups(mix: Plan, section: int, f: float, heads: bool = False) -> list[Group]:
    """Rank f x min(C_out, C_in x kh x kw) factorisations of the unshared layers of ``section`` that shrink them
    (``heads``: of the layers producing the outputs instead)."""
    res = tuple(mix.sections[section - 1])
    out = []
    for s in output_sites(mix) if heads else unshared_sites(mix):
        r = max(1, round(f * rank_limit(s, 1)))
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
        groups.append(Group(f"plain{i}_{'x'.join(map(str, shape))}", members, shape, None, secs))
    anchored = {m for g in groups for m in g.members}
    # a plan numbers sections by where its own groups are: take each regulator's section from its host
    regs: list[RegulatorSpec] = [
        replace(r, section=section_of[r.host])
        for src, secs in ((mix, mix_secs), (plain, plain_secs))
        for r in src.regulators
        if section_of[r.host] in secs & regs_in and r.host in anchored
    ]
    for k, option in enumerate(choice, start=1):
        if option.startswith("bank:"):
            groups += _bank_groups(mix, k, _fraction(option))
        elif option.startswith(("bank@", "banks:")):  # each named share group at its own bank size
            groups += _bank_groups(mix, k, _per_group(option))
    for k, rank in enumerate(ranks or (), start=1):
        for part in _rank_parts(rank):  # a conv that plain mode already shares is not factorised as well
            low = _low_rank_groups(mix, k, _fraction(part), heads=part.startswith("out:"))
            groups += [g for g in low if g.members[0] not in anchored]
    return replace(mix, mode="budget", groups=tuple(groups), regulators=tuple(sorted(regs, key=lambda r: r.host)))


def _fit_score(model: nn.Module, plan: Plan, spectra: dict[tuple[str, ...], Any] | None = None) -> float:
    """Kernel energy the plan's fits cannot represent, as a fraction of all kernel parameters.

    The weight-space fits are computed on the kernels alone, exactly as :func:`convert` computes
    them, without copying the model (a VGG's copy is 0.5 GB per candidate). Banks and low-rank
    layers are priced from one eigendecomposition per group, kept in ``spectra`` across
    candidates: every bank size of a group reuses it (the fit is the same weight-space SVD).
    """
    from .core.convert import kernel_of
    from .core.fitting import FITS, bank_spectrum

    spectra = {} if spectra is None else spectra
    modules = dict(model.named_modules())
    errors: dict[str, dict[str, float]] = {}
    for g in plan.groups:
        weights = [kernel_of(modules[m]).detach().float().cpu() for m in g.members]
        if g.kind == "bank":
            if g.members not in spectra:
                spectra[g.members] = bank_spectrum(weights)
            found = spectra[g.members].errors(g.rank)
        else:
            found = FITS.get_or_raise("fit")(weights, g.shape).errors
        errors[g.name] = dict(zip(g.members, found, strict=True))
    total = max(plan.conv_params_before, 1)
    return sum(err**2 * plan.site(m).weight_numel for g in errors.values() for m, err in g.items()) / total


def _recalibrated_kl(
    student: nn.Module, batches: list[torch.Tensor], reference: list[torch.Tensor], prefix: PrefixCache | None = None
) -> float:
    """Mean kl of ``student`` (its BatchNorms recalibrated on ``batches``, in place; left in eval mode) against
    the reference log-probabilities. With ``prefix`` (made on the same batches) only the part of ``student``
    that differs from the original runs, fed by the cached activations of the part before it: the BatchNorms
    before that part are then reset, not recalibrated (a student scored so is for its score only)."""
    from .train.calibrate import recalibrate_bn

    if prefix is not None:
        student = prefix.partial(student)
    recalibrate_bn(student, batches, len(batches))
    student.eval()
    total = 0.0
    with torch.no_grad():
        for x, ref in zip(batches, reference, strict=True):
            total += float(F.kl_div(F.log_softmax(student(x), 1), ref, log_target=True, reduction="batchmean"))
    return total / len(batches)


def search(
    model: nn.Module,
    target_params: int | None,
    input_size: tuple[int, int, int] = DEFAULT_INPUT_SIZE,
    calib_loader: Iterable | None = None,
    calib_batches: int = SCORE_BATCHES,
    metric: str | None = None,
    regulator_style: str = "adapter",
    init: str | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    space: str = "bank",
    rescore_rounds: int = RESCORE_ROUNDS,
    target_macs: int | str | None = None,
    reuse: dict[str, Any] | None = None,
    across: bool = False,
) -> BudgetResult:
    """Find the conversion with the least summed sensitivity whose unique params are <= ``target_params``.

    Args:
        model: the network; left untouched.
        target_params: the budget in unique parameters; the result never exceeds it. None: no size
            budget (a MAC target alone).
        input_size: (C, H, W) of one example.
        calib_loader: batches of (images, labels) for ``kl`` and the ``act`` init.
        calib_batches: batches used for scoring.
        metric: ``fit`` or ``kl``; default ``kl`` with data, else ``fit``.
        regulator_style: how the chosen regulators attach (``adapter`` or ``paper``).
        init: the init the returned plan asks for; default ``act`` with data, else ``fit``.
        leaf_modules: module types fx must not trace into.
        space: ``bank`` (free / mix / plain / banks per section, low-rank unshared convs) or
            ``anchor`` (free / mix / plain and regulators only, as before banks existed).
        rescore_rounds: rounds of :func:`refine` after the additive search (``kl`` only; 0: none).
        target_macs: MACs per example (an int) or ``"4x"`` fewer (:func:`dacnn_convert.amounts.macs_target`);
            the result removes at least what that asks.
        reuse: a dict kept across calls on the same model with the same settings but another MAC
            budget (the latency loop): the traced plans and the section scores are computed once.
        across: then merge the plan's banks across stages where a joint bank is smaller at no larger fitted
            error, spend the saving on more filters, and keep that plan where it scores better whole
            (:func:`share_across`).

    Raises:
        PlanError: no conversion fits the budget (the smallest possible and what holds it are named).
        UsageError: ``kl`` without data, or an unknown metric or space.
    """
    metric = _metric(metric, calib_loader)
    choose("search space", space, SPACES)
    if target_params is None and target_macs is None:
        raise UsageError("give a size target («target-params», «target-ratio», «target-bytes») or «target-macs»")
    if reuse and (target_macs is None or reuse["space"].macs_before):  # the same model and settings, another MAC budget
        space_ = replace(reuse["space"], macs_cap=_macs_cap(reuse["space"].macs_before, target_macs))
    else:
        space_ = _Space.build(
            model, input_size, calib_loader, metric, regulator_style, init, leaf_modules, space, target_macs
        )
    target_params = space_.mix.params_before if target_params is None else target_params
    space_.check(model, target_params)  # pure arithmetic first: a target below the floor is refused before scoring
    if reuse is not None and "scores" in reuse:
        scorer, scores = reuse["scorer"], reuse["scores"]
    else:
        scorer = space_.scorer(model, calib_loader, calib_batches)
        scores = space_.scores(model, scorer)
    if reuse is not None:
        reuse.update(space=space_, scorer=scorer, scores=scores)
    found = space_.pick(scores, target_params)
    if metric == "kl" and rescore_rounds > 0:
        found = refine(model, space_.mix, space_.plain, found, scorer, rescore_rounds, space_.fixed)
    found = share_across(model, found, space_, scorer) if across else found
    scorer.release()  # a scorer kept in «reuse» (the latency loop, each pruning tried) holds no activations
    return found


def _choice_sensitivity(
    scores: Sequence[SectionScore], choice: Sequence[str], ranks: Sequence[str] = ()
) -> dict[int, float]:
    """Each section's score under a choice (share option + ranks): the order :func:`_grow` spends parameters in."""
    by = {(s.section, s.option): s.sensitivity for s in scores}
    ranks = ranks or ("dense",) * len(choice)
    return {
        k: by.get((k, o), 0.0) + sum(by.get((k, r), 0.0) for r in _rank_parts(ranks[k - 1]))
        for k, o in enumerate(choice, start=1)
    }


def share_across(model: nn.Module, found: BudgetResult, space_: _Space, scorer: Scorer) -> BudgetResult:
    """Banks shared across stages: merge the found plan's banks (:func:`~dacnn_convert.core.merging.merge_banks`,
    whitened on the scorer's calibration moments where it has them), spend the parameters saved on more filters
    (:func:`_grow`, within the MAC budget), and keep that plan only where its whole-plan score is lower: kl against
    the model with data, else the kernel energy the fits lose. ``BudgetResult.across`` says what was merged and
    what each plan scored, whichever was kept."""
    from .core.convert import kernel_of
    from .core.merging import merge_banks

    p = found.plan
    modules = dict(model.named_modules())
    kernels = {m: kernel_of(modules[m]) for g in p.groups if g.kind == "bank" for m in g.members}
    moments = {n: h for n, (h, _) in scorer.moments.items()} if scorer.moments is not None else None
    need_macs = None if space_.macs_cap is None else space_.macs_before - space_.macs_cap
    allowed = None if need_macs is None else (lambda q: q.macs_saved >= need_macs)
    merged, merges = merge_banks(p, kernels, moments, allowed)
    if not merges:
        why = (
            "the plan has no banks or low-rank layers to merge"
            if not kernels
            else "no merge saves parameters within the MAC budget"
            if allowed is not None
            else "no two banks share filters enough to save parameters together"
        )
        return replace(found, across=(why,))
    grown, more = _grow(merged, found.target, _choice_sensitivity(found.scores, found.choice, found.ranks), need_macs)

    def score(q: Plan) -> float:
        if scorer.batches:
            return scorer.kl(q)
        return _fit_score(model, q)

    before, after = score(p), score(grown)
    what = "kl" if scorer.batches else "fit"
    lines = [m.describe() for m in merges] + [f"grown after merging: {g}" for g in more]
    if after < before:
        verdict = f"kept: whole-plan {what} {before:.4g} -> {after:.4g} at {grown.params_after:,} params"
        # the headline score is the kept plan's (a whole-plan kl where the search re-scored plans whole)
        return replace(
            found, plan=grown, across=(*lines, verdict), sensitivity=after if found.rescored else found.sensitivity
        )
    verdict = f"not kept: whole-plan {what} {before:.4g} -> {after:.4g}; the plan stays within its stages"
    return replace(found, across=(*lines, verdict))


def _metric(metric: str | None, calib_loader: Iterable | None) -> str:
    """The score to search by: the one asked for, else ``kl`` with data and ``fit`` without."""
    metric = metric or ("kl" if calib_loader is not None else "fit")
    choose("metric", metric, METRICS)
    if metric == "kl" and calib_loader is None:
        raise UsageError("the kl sensitivity needs calibration data: give «dataset» (or use «metric=fit»)")
    return metric


def _macs_cap(macs_before: int, target_macs: int | str | None) -> int | None:
    if target_macs is None:
        return None
    return amounts.resolve_macs(macs_before, amounts.macs_target(target_macs))  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Space:
    """What every search of one model shares: the full mix and plain plans, the options, the fixed parts,
    the metric and the MAC budget."""

    mix: Plan
    plain: Plan
    options: tuple[str, ...]
    ranks: tuple[str, ...]
    fixed: tuple[tuple[str, int], ...]
    metric: str
    macs_before: int = 0
    macs_cap: int | None = None
    leaf_modules: tuple[type[nn.Module], ...] = ()

    @classmethod
    def build(
        cls,
        model: nn.Module,
        input_size: tuple[int, int, int],
        calib_loader: Iterable | None,
        metric: str,
        regulator_style: str,
        init: str | None,
        leaf_modules: Sequence[type[nn.Module]],
        space: str,
        target_macs: int | str | None,
    ) -> _Space:
        init = default_init(init, calib_loader is not None)
        style = cast(RegulatorStyleName, regulator_style)  # a str from a recipe: make_plan checks it
        mix = make_plan(model, "mix", "all", style, cast(InitName, init), input_size, leaf_modules)
        plain = make_plan(model, "plain", "all", style, cast(InitName, init), input_size, leaf_modules)
        mix = every_resolution(mix)
        # the output layer's own ranks only where its effect on the logits is measured: the weight-space fit
        # prices a layer by its share of the parameters, and a head is always cheap by that (rank 1 of 10 classes)
        heads = HEAD_OPTIONS if metric == "kl" else ()
        options, ranks = (BANK_OPTIONS, (*RANK_OPTIONS, *heads)) if space == "bank" else (OPTIONS, ())
        macs_before = 0
        if target_macs is not None:
            from .core.report import count_macs

            macs_before = count_macs(model, input_size)
        macs_cap = _macs_cap(macs_before, target_macs)
        fixed = fixed_parts(model, mix, heads_fixed=space == "bank" and not heads)
        return cls(mix, plain, options, tuple(ranks), fixed, metric, macs_before, macs_cap, tuple(leaf_modules))

    def check(self, model: nn.Module, target_params: int) -> None:
        """Raise :class:`TargetError` when no option reaches ``target_params`` (and the MAC budget)."""
        self.pick(
            score_sections(model, self.mix, self.plain, "size", options=self.options, ranks=self.ranks), target_params
        )

    def scorer(self, model: nn.Module, calib_loader: Iterable | None, calib_batches: int) -> Scorer:
        batches, reference = (
            calibration_reference(model, calib_loader, calib_batches)
            if calib_loader is not None and self.metric == "kl"
            else ([], [])
        )
        wide = len(self.options) > len(OPTIONS) or self.ranks
        moments = _moments(model, self.mix, batches) if self.metric == "kl" and wide else None
        prefix = prefix_cache(model, batches, self.leaf_modules) if batches else None
        return Scorer(model, batches, reference, moments, prefix, BasisCache() if batches else None)

    def scores(self, model: nn.Module, scorer: Scorer) -> tuple[SectionScore, ...]:
        return score_sections(model, self.mix, self.plain, self.metric, scorer, self.options, self.ranks)

    def pick(self, scores: Sequence[SectionScore], target_params: int) -> BudgetResult:
        return pick(
            self.mix, self.plain, scores, target_params, self.metric, self.fixed, self.macs_cap, self.macs_before
        )


@dataclass(frozen=True)
class SweepPoint:
    """One size target of :func:`sweep`: the plan picked for it, or why none fits."""

    ratio: float
    target: int
    found: BudgetResult | None
    refused: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ratio": self.ratio, "target": self.target, "refused": self.refused}
        if self.found is not None:
            p = self.found.plan
            out |= {
                "params": p.params_after,
                "macs_saved": p.macs_saved,
                "score": self.found.sensitivity,
                "choice": list(self.found.choice),
                "unshared": list(self.found.ranks),
            }
        return out


SWEEP_RATIOS = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0)


def sweep(
    model: nn.Module,
    ratios: Sequence[float] = SWEEP_RATIOS,
    input_size: tuple[int, int, int] = DEFAULT_INPUT_SIZE,
    calib_loader: Iterable | None = None,
    calib_batches: int = SCORE_BATCHES,
    metric: str | None = None,
    regulator_style: str = "adapter",
    init: str | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    target_macs: int | str | None = None,
) -> tuple[SweepPoint, ...]:
    """The planner's own front, nothing trained: the plan it picks at each size ``ratio`` (and the MAC
    budget, if given), with its predicted score, from one scoring of the sections.

    The scores are the additive per-section ones (no whole-plan re-scoring, which is per target); the
    ratios stop at the first one below the model's floor, whose point says why.
    """
    metric = _metric(metric, calib_loader)
    for r in ratios:
        validate.number("sweep ratio", r, 1.0)
    space_ = _Space.build(
        model, input_size, calib_loader, metric, regulator_style, init, leaf_modules, "bank", target_macs
    )
    scorer = space_.scorer(model, calib_loader, calib_batches)
    scores = space_.scores(model, scorer)
    points = []
    for r in sorted(ratios):
        target = int(space_.mix.params_before / r)
        try:
            points.append(SweepPoint(r, target, space_.pick(scores, target)))
        except TargetError as exc:
            points.append(SweepPoint(r, target, None, str(exc)))
            break
    return tuple(points)


def _moments(model: nn.Module, mix: Plan, batches: Sequence[torch.Tensor]) -> Any:
    """The input moments of every conv the data-aware fits whiten, from one pass over ``batches``."""
    from .core.convert import whitenable
    from .core.fitting import input_moments

    names = [s.name for s in mix.sites if whitenable(s) and not s.reused]
    return input_moments(model, names, [(x, None) for x in batches], len(batches))


@dataclass
class Scorer:
    """The kl of plans against the model on the calibration batches, and what makes each score cheap.

    Attributes:
        model: the network plans are made for.
        batches, reference: the calibration inputs and the model's log-probabilities on them
            (:func:`calibration_reference`); empty: no data (the ``fit`` metric).
        moments: the input moments of every conv (:func:`_moments`), reused by every candidate's data-aware fit.
        prefix: the activations before each candidate's changed part (:func:`prefix_cache`).
        bases: each group's whitened decomposition, shared by the candidates that bank it at other sizes.
        seen: whole plans scored so far, by their picks.
    """

    model: nn.Module
    batches: Sequence[torch.Tensor]
    reference: Sequence[torch.Tensor]
    moments: Any = None
    prefix: PrefixCache | None = None
    bases: BasisCache | None = None
    seen: dict[tuple[SectionPick, ...], float] = field(default_factory=dict)

    def kl(self, plan: Plan) -> float:
        """Mean kl against the model of ``plan``'s conversion (fitted to the batches, BatchNorms recalibrated)."""
        from .core.convert import convert

        batches = list(self.batches)
        student = convert(
            self.model,
            replace(plan, init="act"),
            calib_loader=[(x, None) for x in batches],
            calib_batches=len(batches),
            moments=self.moments,
            bases=self.bases,
        ).model
        return _recalibrated_kl(student, batches, list(self.reference), self.prefix)

    def release(self) -> None:
        """Drop the cached activations and decompositions (made again if the scorer is used again)."""
        if self.prefix is not None:
            self.prefix.release()
        if self.bases is not None:
            self.bases.release()

    def __call__(self, mix: Plan, plain: Plan, picks: tuple[SectionPick, ...]) -> float:
        if picks not in self.seen:
            p = compose(mix, plain, [q.share for q in picks], ranks=[q.rank for q in picks])
            self.seen[picks] = self.kl(p) if p.groups else 0.0
        return self.seen[picks]


def _picks(found: BudgetResult) -> tuple[SectionPick, ...]:
    ranks = found.ranks or ("dense",) * len(found.choice)
    return tuple(SectionPick(o, r) for o, r in zip(found.choice, ranks, strict=True))


def _group_sizes(mix: Plan, section: int, share: str) -> dict[str, float]:
    """Each share group of ``section`` banked under ``share``, with its bank size (a uniform ``bank:f`` names the
    groups of a section that has several which a bank of that size shrinks; other options name none)."""
    if share.startswith("banks:"):
        return _per_group(share)
    if share.startswith("bank:"):
        f = _fraction(share)
        groups = share_groups(mix, section)
        banked = {index: f for index, members in groups if _bank_size(members, f) is not None}
        return banked if len(groups) > 1 else {}
    return {}


def _without(sizes: dict[str, float], index: str) -> str:
    """The share option of a section whose groups bank as ``sizes`` except group ``index`` (left free)."""
    rest = {i: f for i, f in sizes.items() if i != index}
    return "banks:" + ",".join(f"{i}={f}" for i, f in rest.items()) if rest else "free"


def refine(
    model: nn.Module,
    mix: Plan,
    plain: Plan,
    found: BudgetResult,
    score: Scorer,
    rounds: int = RESCORE_ROUNDS,
    fixed: Sequence[tuple[str, int]] = (),
) -> BudgetResult:
    """Re-score the additive search's plan as a whole and search again with scores that know the company.

    The per-section scores are each measured with one section converted; in a deep plan the
    errors compound, and a section that looked cheap alone can cost most of the whole plan's kl
    (EfficientNet-B0 at 25%: summed 0.33, whole plan 2.08). Each round scores the chosen plan
    whole and with each converted section left free: what the whole plan loses by converting
    section k, over what k cost alone, rescales every option of section k. Where the chosen plan
    banks several share groups of one section, each group is left free in turn as well, and what the
    plan loses by banking that group, over what the group cost alone, rescales that group's own bank
    sizes (``bank@i:f``): a group that is cheap alone but costly in the plan's company is offered
    larger banks, or none, the next round (the section's factor is the prior of groups not yet seen
    in a plan). The exact knapsack then runs again on the rescaled scores. After ``rounds`` rounds (or
    when the search returns a plan already scored) the plan with the lowest whole-plan kl is kept; the
    additive plan is one of the candidates, so the result never scores worse than it. The whole-plan kl
    is of each plan's sharing and ranks as the search picked them, before regulators and bank growth are
    added. ``rounds`` x (n + g + 2) kl evaluations at most for n sections and g banked share groups.
    """
    by = {(s.section, s.option): s.sensitivity for s in found.scores}
    scale: dict[int, float] = {}
    group_scale: dict[tuple[int, str], float] = {}
    current, best = found, found
    best_kl = score(mix, plain, _picks(found))
    tried = {_picks(found): best_kl}  # the plans the search returned (fit the budget), with their whole-plan kl

    # clipped: a plan already ruined everywhere says little about one section (kl saturates)
    def clip(x: float) -> float:
        return min(max(x, 1 / 16), 256.0)

    base = [s for s in found.scores if not s.option.startswith("banks:")]  # pick combines the groups afresh
    for _ in range(rounds):
        picks = _picks(current)
        whole = score(mix, plain, picks)
        for k, q in enumerate(picks, start=1):
            ranked = sum(by.get((k, r), 0.0) for r in _rank_parts(q.rank))
            alone = by.get((k, q.share), 0.0) + ranked
            if q.share.startswith("banks:"):
                alone = sum(by.get((k, f"bank@{i}:{f}"), 0.0) for i, f in _per_group(q.share).items()) + ranked
            if q == SectionPick("free", "dense") or alone <= 0:
                continue
            left_out = score(mix, plain, (*picks[: k - 1], SectionPick("free", "dense"), *picks[k:]))
            scale[k] = clip((whole - left_out) / alone)
            sizes = _group_sizes(mix, k, q.share)
            for index, f in sizes.items() if len(sizes) > 1 else ():
                own = by.get((k, f"bank@{index}:{f}"), 0.0)
                if own <= 0:
                    continue
                rest = score(mix, plain, (*picks[: k - 1], SectionPick(_without(sizes, index), q.rank), *picks[k:]))
                group_scale[k, index] = clip((whole - rest) / own)
        rescaled = [replace(s, sensitivity=s.sensitivity * _scale_of(s, scale, group_scale)) for s in base]
        current = pick(mix, plain, rescaled, found.target, found.metric, fixed, found.target_macs, found.macs_before)
        seen = _picks(current) in tried  # the search returned a plan it returned before: no new round
        kl = tried[_picks(current)] = score(mix, plain, _picks(current))
        if kl < best_kl:
            best, best_kl = current, kl
        if seen:
            break
    return replace(
        best,
        scores=found.scores,
        sensitivity=best_kl,
        rescored=tuple((tuple(q.label for q in p), v) for p, v in sorted(tried.items(), key=lambda i: i[1])),
    )


def _scale_of(s: SectionScore, scale: dict[int, float], group_scale: dict[tuple[int, str], float]) -> float:
    """The factor refine puts on one score: its group's, where the group was seen in a plan, else its section's."""
    if s.option.startswith("bank@") and (s.section, _group_index(s.option)) in group_scale:
        return group_scale[s.section, _group_index(s.option)]
    return scale.get(s.section, 1.0)


def every_resolution(mix: Plan) -> Plan:
    """``mix`` with a section for every output resolution that holds a conv, not only those with a share group.

    Mix sections are where two convs of one configuration meet; a VGG or GoogLeNet also has
    resolutions with single convs, which plain mode can still share and low rank can still
    factorise. The extra sections come after mix's own, so its groups keep their numbers.
    """
    known = {tuple(r) for r in mix.sections}
    first: dict[tuple[int, int], int] = {}
    for s in mix.sites:
        first.setdefault(s.out_size, s.order)
    extra = sorted((r for r in first if r not in known), key=lambda r: (-r[0] * r[1], first[r]))
    return replace(mix, sections=(*mix.sections, *extra))


def fixed_parts(model: nn.Module, mix: Plan, heads_fixed: bool = False) -> tuple[tuple[str, int], ...]:
    """What no option of the search shrinks, by kind, in parameters (for the floor's message); ``heads_fixed``:
    the output layers too (a search without data does not rank them)."""
    described = {s.name for s in mix.sites}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d) and n not in described]
    uncalled = sum(m.weight.numel() for _, m in layers if is_plain(m))
    subclass = sum(m.weight.numel() for _, m in layers if not is_plain(m))
    stem = sum(s.weight_numel for s in mix.sites if s.fed_by_input)
    heads = sum(s.weight_numel for s in output_sites(mix) if not s.fed_by_input) if heads_fixed else 0
    grouped = sum(s.weight_numel for s in mix.sites if s.groups > 1 and not s.fed_by_input)
    other = mix.params_before - mix.conv_params_before - uncalled - subclass
    parts = (
        (
            "layers the traced forward pass does not call as modules "
            "(auxiliary heads; attention weights used functionally)",
            uncalled,
        ),
        ("Linear and conv subclasses (attention projections, timm's Conv2dSame)", subclass),
        ("BatchNorm, biases and other parameters", other),
        ("the layer(s) fed by the image", stem),
        ("the output layer(s), factorised only when scored on calibration data (give a «dataset»)", heads),
        ("grouped and depthwise convs (shared by mix only)", grouped),
    )
    return tuple((what, n) for what, n in parts if n > 0)


PRUNE_ADVICE = ", or prune as well («prune»)"  # the floor message's last words (prune_search says "more" instead)


def _floor_message(mix: Plan, target: int, smallest: int, fixed: Sequence[tuple[str, int]]) -> str:
    held = "; ".join(f"{what} {n:,}" for what, n in fixed)
    return (
        f"no conversion fits {target:,} params: the smallest possible is {smallest:,} "
        f"({100 * smallest / mix.params_before:.1f}% of {mix.params_before:,}), every section shared or "
        f"factorised as far as the search goes. Held there by {held or 'nothing fixed'}, plus the smallest "
        f"banks and ranks of the grid. Raise the target to at least {smallest:,}" + PRUNE_ADVICE
    )


def prefix_cache(
    model: nn.Module, batches: Sequence[torch.Tensor], leaf_modules: Sequence[type[nn.Module]] = ()
) -> PrefixCache | None:
    """A :class:`~dacnn_convert.core.partial.PrefixCache` of ``model`` on ``batches`` (its BatchNorms
    recalibrated on them in a copy, as every scored candidate's are), so each kl score runs only the changed
    part; None without batches or where fx cannot trace the model (candidates then run whole)."""
    from .core.partial import PrefixCache
    from .train.calibrate import recalibrate_bn

    if not batches:
        return None
    reference = copy.deepcopy(model)
    recalibrate_bn(reference, list(batches), len(batches))
    try:
        return PrefixCache(model, reference, batches, leaf_modules)
    except TraceError:
        return None


def calibration_reference(
    model: nn.Module, calib_loader: Iterable, calib_batches: int = SCORE_BATCHES
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The first ``calib_batches`` input batches and the model's log-probabilities on them (eval mode).

    The ``kl`` sensitivity compares every candidate with these; the model's train/eval mode is restored.
    """
    batches: list[torch.Tensor] = []
    reference: list[torch.Tensor] = []
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    with mode(model), torch.no_grad():
        for i, batch in enumerate(calib_loader):
            if i >= calib_batches:
                break
            x = inputs_of(batch).to(device)
            batches.append(x)
            reference.append(F.log_softmax(model(x), 1))
    if not batches:
        raise UsageError("«calib-loader» yielded no batches: the kl score needs at least one batch of images")
    return batches, reference


def score_sections(
    model: nn.Module,
    mix: Plan,
    plain: Plan,
    metric: str = "fit",
    scorer: Scorer | None = None,
    options: Sequence[str] = OPTIONS,
    ranks: Sequence[str] = (),
) -> tuple[SectionScore, ...]:
    """The sensitivity of each (section, option) and (section, rank), converting that alone.

    ``metric`` is ``fit``, ``kl`` or ``size`` (no scoring: every option's sensitivity is 0, its
    saving exact; what the search needs to tell whether a target is reachable at all).

    With ``kl``, ``scorer`` (:meth:`_Space.scorer`) converts and measures each candidate, reusing what does
    not change between them (input moments, each group's decomposition, the activations before the section).
    """
    n = len(mix.sections)
    scores: list[SectionScore] = []
    spectra: dict[tuple[str, ...], Any] = {}  # one decomposition per group, shared by its bank sizes
    free = ("free",) * n
    trials: list[tuple[int, str, tuple[str, ...], tuple[str, ...] | None]] = [
        (k, o, tuple(o if j == k else "free" for j in range(1, n + 1)), None) for k in range(1, n + 1) for o in options
    ]
    trials += [
        (k, r, free, tuple(r if j == k else "dense" for j in range(1, n + 1))) for k in range(1, n + 1) for r in ranks
    ]
    # per share group, where a section holds several: each group its own bank size (pick combines them)
    bank_sizes = [o for o in options if o.startswith("bank:")]
    for k in range(1, n + 1):
        indices = [index for index, _ in share_groups(mix, k)] if bank_sizes else []
        if len(indices) > 1:
            trials += [
                (k, o, tuple(o if j == k else "free" for j in range(1, n + 1)), None)
                for index in indices
                for o in (f"bank@{index}:{_fraction(b)}" for b in bank_sizes)
            ]
    scored: dict[tuple[Any, ...], float] = {}  # options that build the same plan (k rounds to 1) are scored once
    for k, option, choice, rank in trials:
        p = compose(mix, plain, choice, ranks=rank)
        if option != "free" and not p.groups:
            continue  # nothing to convert in this section that way
        key = (p.groups, p.regulators)
        if option == "free" or metric == "size":  # "size": the arithmetic alone, every option costed 0
            sens = 0.0
        elif key in scored:
            sens = scored[key]
        elif metric == "fit":
            sens = _fit_score(model, p, spectra)
        else:
            if scorer is None:
                raise UsageError(
                    "the kl metric scores on calibration data: pass scorer=Scorer(model, batches, reference) "
                    "(budget.calibration_reference gives batches and reference)"
                )
            sens = scorer.kl(p)
        scored[key] = sens
        scores.append(SectionScore(k, option, sens, p.saved_params - p.scale_params, p.macs_saved))
    return monotone(scores)


def monotone(scores: Sequence[SectionScore]) -> tuple[SectionScore, ...]:
    """Each section's bank (and rank) scores made non-decreasing as the bank (rank) shrinks.

    The fits are nested (the best k filters are in the span of no fewer than the best k - 1's), so a
    smaller bank never represents a section better; a lower measured kl for it is noise of the BN
    recalibration in the regime where a section collapses (EfficientNet-B0, section 4: 1/16 of
    C_out 0.245, 1/64 0.164). A smaller option takes the largest score of the larger ones before
    it, so the search cannot buy size where the measurement was lucky.
    """
    out = list(scores)
    worst: dict[tuple[int, str], float] = {}  # per (section, chain): "bank:", "lr:", "out:", "bank@3:" (one group)
    chain = sorted(
        (i for i, s in enumerate(out) if s.option.startswith(("bank:", "lr:", "out:", "bank@"))),
        key=lambda i: (out[i].section, out[i].option.rpartition(":")[0], -_fraction(out[i].option)),
    )
    for i in chain:
        s = out[i]
        key = (s.section, s.option.rpartition(":")[0])
        worst[key] = max(worst.get(key, 0.0), s.sensitivity)
        out[i] = replace(s, sensitivity=worst[key])
    return tuple(out)


def pick(
    mix: Plan,
    plain: Plan,
    scores: Sequence[SectionScore],
    target_params: int,
    metric: str = "fit",
    fixed: Sequence[tuple[str, int]] = (),
    target_macs: int | None = None,
    macs_before: int = 0,
) -> BudgetResult:
    """The least summed sensitivity whose params fit ``target_params``, exactly; then regulators and growth.

    With ``target_macs`` (MACs per example; ``macs_before`` the model's), the plan also removes at
    least ``macs_before - target_macs`` MACs (Plan.macs_saved is exact and adds up by section). With
    only a MAC target (``target_params`` at the model's size) the search is exact on MACs; with both, it
    is exact on params and searches the MACs by a Lagrangian sweep (each option's score minus mu times
    the MACs it removes, mu from far below to far above the scores' scale), keeping the least-scored
    plan that meets both; the final plan is checked against both budgets exactly.

    Per section the options are (share option, rank of the unshared convs) pairs with additive
    costs, a multiple-choice knapsack solved exactly over non-dominated partial plans
    (:mod:`dacnn_convert.core.knapsack`): any number of sections and options. Costs add up
    section by section except where plain members of several sections share one master kernel;
    each set of plain sections is solved on its own with that kernel's exact saving added.
    ``candidates`` counts every combination of the space, ``feasible`` the non-dominated plans
    that fit (the five best are kept as runners-up).

    ``fixed`` names what no option shrinks (:func:`fixed_parts`), for the message when nothing fits.

    Raises:
        PlanError: nothing fits ``target_params``; the smallest reachable size and what holds it are named.
    """
    n = len(mix.sections)
    scores = [*scores, *_group_combinations(scores)]
    by = {(s.section, s.option): s for s in scores}
    share = [
        [o for o in BANK_OPTIONS if (k, o) in by]
        + [s.option for s in scores if s.section == k and s.option[:6] == "banks:"]
        for k in range(1, n + 1)
    ]
    rank_opts = [_rank_options(k, by) for k in range(1, n + 1)]
    candidates = 1
    for k in range(n):
        candidates *= len(share[k]) * len(rank_opts[k])

    def cost(k: int, o: str) -> tuple[float, int]:
        parts = [by.get((k, p)) for p in (_rank_parts(o) if o.startswith(("lr:", "out:")) else [o])]
        return sum(s.sensitivity for s in parts if s), sum(s.params_saved for s in parts if s)

    def by_macs(k: int, q: SectionPick) -> int:
        return sum(by[k, o].macs_saved for o in (q.share, *_rank_parts(q.rank)) if (k, o) in by)

    per_section = [
        [
            Option(
                SectionPick(o, r), (0 if o == "plain" else cost(k, o)[1]) + cost(k, r)[1], cost(k, o)[0] + cost(k, r)[0]
            )
            for o in share[k - 1]
            for r in rank_opts[k - 1]
            if o != "plain" or r == "dense"  # plain shares the unshared 3x3 convs too (and is not combined with a rank)
        ]
        for k in range(1, n + 1)
    ]
    plain_able = [k for k in range(1, n + 1) if "plain" in share[k - 1]]
    need = mix.params_before - target_params
    need_macs = None if target_macs is None else macs_before - target_macs
    macs = {(k, c.label): by_macs(k, c.label) for k in range(1, n + 1) for c in per_section[k - 1]}
    solutions: list[Solution[SectionPick]] = []
    most_saved = 0
    for size in range(len(plain_able) + 1):
        for secs in itertools.combinations(plain_able, size):
            p = compose(mix, plain, ["plain" if k in secs else "free" for k in range(1, n + 1)])
            extra = p.saved_params - p.scale_params  # the shared master kernel's exact saving
            classes = [
                [c for c in per_section[k - 1] if (c.label.share == "plain") == (k in secs)] for k in range(1, n + 1)
            ]
            most_saved = max(most_saved, extra + sum(max((c.saved for c in cl), default=0) for cl in classes))
            if need_macs is None:
                solutions += [Solution(f.labels, f.saved + extra, f.cost) for f in front(classes, need - extra)]
            else:
                params_bound = target_params < mix.params_before
                found = _macs_front(classes, need - extra, need_macs, macs, macs_before, params_bound)
                solutions += [Solution(f.labels, f.saved + extra, f.cost) for f in found]
    if not solutions and need_macs is not None and most_saved >= need:
        fewest = macs_before - sum(max(macs[k, c.label] for c in cl) for k, cl in enumerate(per_section, start=1))
        raise TargetError(
            _macs_floor_message(fewest, macs_before, target_macs or 0, target_params, fixed),
            nearest=fewest if (target_macs or 0) < fewest else None,
        )
    if not solutions:
        # no ``nearest``: it is a MAC budget where set (the latency loop reads it), and this floor is in params
        raise TargetError(_floor_message(mix, target_params, mix.params_before - most_saved, fixed))
    solutions.sort(key=lambda f: (f.cost, -f.saved, f.labels))
    ranked = [(tuple(p.label for p in f.labels), mix.params_before - f.saved, f.cost) for f in solutions[:5]]
    best = solutions[0]
    choice, ranks = tuple(p.share for p in best.labels), tuple(p.rank for p in best.labels)
    sens, expected, feasible = best.cost, mix.params_before - best.saved, len(solutions)
    p = compose(mix, plain, choice, ranks=ranks)
    if p.params_after != expected:  # the additive arithmetic and the composed plan must agree exactly
        raise PlanError(
            f"budget search bug: {'/'.join(choice)} ({'/'.join(ranks)}) was costed at {expected:,} params "
            f"but composes to {p.params_after:,}; please report it"
        )
    macs_cap = None if need_macs is None else macs_before - need_macs
    if macs_cap is not None and macs_before - p.macs_saved > macs_cap:
        raise PlanError(
            f"budget search bug: {'/'.join(choice)} ({'/'.join(ranks)}) was costed within {macs_cap:,} MACs "
            f"but composes to {macs_before - p.macs_saved:,}; please report it"
        )
    regs: list[int] = []
    for k in sorted(range(1, n + 1), key=lambda k: (-by[k, choice[k - 1]].sensitivity, k)):
        if choice[k - 1] not in ("mix", "plain"):
            continue
        trial = compose(mix, plain, choice, [*regs, k], ranks)
        fits = macs_cap is None or macs_before - trial.macs_saved <= macs_cap
        if trial.params_after <= target_params and fits and trial.regulators != p.regulators:
            regs.append(k)
            p = trial
    section_sens = _choice_sensitivity(scores, choice, ranks)
    p, grown = _grow(p, target_params, section_sens, None if macs_cap is None else macs_before - macs_cap)
    top = tuple(ranked)
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
        target_macs=target_macs,
        macs_before=macs_before,
    )


def _rank_options(k: int, by: dict[tuple[int, str], SectionScore]) -> list[str]:
    """Section ``k``'s ranks: dense, each ``lr:f`` of its unshared layers, each ``out:g`` of its output layer,
    and each pair of the two (``lr:f|out:g``, their scores and savings added)."""
    low = [r for r in RANK_OPTIONS if (k, r) in by]
    heads = [h for h in HEAD_OPTIONS if (k, h) in by]
    return ["dense", *low, *heads, *(f"{r}|{h}" for r in low for h in heads)]


def _group_combinations(scores: Sequence[SectionScore]) -> list[SectionScore]:
    """Per section with per-group bank scores (``bank@i:f``): every non-dominated way to give each of its
    share groups its own bank size or none, as a ``banks:i=f,...`` option whose score, saving and MACs are the
    sums over its groups (the same additive model as across sections; the uniform ``bank:f`` options stay, each
    scored with its groups converted together)."""
    out = []
    for k in sorted({s.section for s in scores if s.option.startswith("bank@")}):
        by_group: dict[str, list[SectionScore]] = {}
        for s in scores:
            if s.section == k and s.option.startswith("bank@"):
                by_group.setdefault(_group_index(s.option), []).append(s)
        classes: list[list[Option[SectionScore | None]]] = [
            [Option(None, 0, 0.0), *(Option[SectionScore | None](g, g.params_saved, g.sensitivity) for g in group)]
            for group in by_group.values()
        ]
        combos = [c for c in front(classes, -(10**18)) if any(g is not None for g in c.labels)]
        if len(combos) > GROUP_COMBINATIONS:  # evenly along the front (cheapest and most saving kept): the
            step = (len(combos) - 1) / (GROUP_COMBINATIONS - 1)  # outer search stays fast on 20-group sections
            combos = [combos[round(i * step)] for i in range(GROUP_COMBINATIONS)]
        for combo in combos:
            picked = [g for g in combo.labels if g is not None]
            label = "banks:" + ",".join(f"{g.option[len('bank@') :].replace(':', '=')}" for g in picked)
            out.append(
                SectionScore(
                    k,
                    label,
                    sum(g.sensitivity for g in picked),
                    sum(g.params_saved for g in picked),
                    sum(g.macs_saved for g in picked),
                )
            )
    return out


def _macs_front(
    classes: Sequence[Sequence[Option[SectionPick]]],
    need: int,
    need_macs: int,
    macs: dict[tuple[int, SectionPick], int],
    macs_before: int,
    params_bound: bool,
) -> list[Solution[SectionPick]]:
    """Choices that save at least ``need`` params and ``need_macs`` MACs, each with its true summed score.

    MACs alone (``params_bound`` False): the exact front with the MACs as the saving. Both: the exact
    params front of the Lagrangian scores (score - mu x MACs removed) for mu on a log grid around the
    scores' scale per MAC; every choice found that meets the MAC need is kept with its true score.
    """

    def macs_of(labels: Sequence[SectionPick]) -> int:
        return sum(macs[k, q] for k, q in enumerate(labels, start=1))

    saved = {(k, c.label): c.saved for k, cl in enumerate(classes, start=1) for c in cl}
    score = {(k, c.label): c.cost for k, cl in enumerate(classes, start=1) for c in cl}

    def params_of(labels: Sequence[SectionPick]) -> int:
        return sum(saved[k, q] for k, q in enumerate(labels, start=1))

    if not params_bound:
        on_macs = [[Option(c.label, macs[k, c.label], c.cost) for c in cl] for k, cl in enumerate(classes, start=1)]
        return [Solution(f.labels, params_of(f.labels), f.cost) for f in front(on_macs, need_macs)]
    scale = sum(max((c.cost for c in cl), default=0.0) for cl in classes) / max(macs_before, 1) or 1e-12
    found: dict[tuple[SectionPick, ...], Solution[SectionPick]] = {}
    for mu in (0.0, *(scale * 10 ** (e / 4) for e in range(-16, 25))):
        lagrangian = [
            [Option(c.label, c.saved, c.cost - mu * macs[k, c.label]) for c in cl]
            for k, cl in enumerate(classes, start=1)
        ]
        for f in front(lagrangian, need):
            if f.labels not in found and macs_of(f.labels) >= need_macs:  # the true score, summed afresh
                true_cost = sum(score[k, q] for k, q in enumerate(f.labels, start=1))
                found[f.labels] = Solution(f.labels, f.saved, true_cost)
    return list(found.values())


def _macs_floor_message(
    fewest: int,
    macs_before: int,
    target_macs: int,
    target_params: int,
    fixed: Sequence[tuple[str, int]],
) -> str:
    """Why no plan meets a MAC target: below what any plan reaches (``fewest``), or not with the size target."""
    if target_macs < fewest:
        held = "; ".join(
            f"{what} {n:,} params"
            for what, n in fixed
            if any(w in what for w in ("image", "depthwise", "output layer"))
        )
        return (
            f"no conversion reaches {target_macs:,} MACs per example: the fewest possible is {fewest:,} "
            f"({100 * fewest / max(macs_before, 1):.1f}% of {macs_before:,}), every section at its smallest bank "
            f"or rank. Held there by what no option shrinks ({held or 'convs that share with nothing'}). "
            f"Raise «target-macs» to at least {fewest:,}"
        )
    return (
        f"the search found no conversion within both {target_params:,} params and {target_macs:,} MACs per "
        f"example (the fewest MACs possible at any size is {fewest:,}): raise «target-params» or «target-macs», "
        "or give only one (`dacnn plan MODEL --sweep --target-macs N` shows the sizes a MAC budget allows)"
    )


def _grow(
    p: Plan, target_params: int, section_sens: dict[int, float], min_macs_saved: int | None = None
) -> tuple[Plan, list[str]]:
    """Spend what the budget leaves on more filters, most sensitive section first (never over the target;
    with ``min_macs_saved``, never removing fewer MACs than that: a bank that grows past the MAC budget stops).

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
    stopped: set[int] = set()
    while True:
        for i in order:
            g = groups[i]
            site = p.site(g.members[0])
            d = site.weight_numel // site.out_channels
            per = d + sum(p.site(m).out_channels for m in g.members)  # one more filter and its coefficients
            dense = sum(p.site(m).weight_numel for m in g.members)
            outs = sum(p.site(m).out_channels for m in g.members)  # merged banks mix C_outs
            cap = min(outs, d, (dense - 1) // per)  # never costlier than dense convs
            step = min(max(1, g.rank // 8), cap - g.rank, left // per)
            while step > 0 and i not in stopped and min_macs_saved is not None:  # halve a step over the MAC budget
                trial = [*groups[:i], _resized(g, g.rank + step), *groups[i + 1 :]]
                if replace(p, groups=tuple(trial)).macs_saved >= min_macs_saved:
                    break
                step //= 2
            if step == 0 and min_macs_saved is not None:
                stopped.add(i)  # not one more filter fits the MAC budget: this bank stays as it is
            if step > 0 and i not in stopped:
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
    overhead_bytes: int = 0,
) -> int:
    """One budget in unique parameters from whichever target was given (bytes at ``bytes_per_param``,
    after the ``overhead_bytes`` a file holds beyond its parameters: io.checkpoint.stored_overhead).

    Raises:
        UsageError: none or several targets, or a value that is not positive, or a byte target
            the file's overhead alone fills.
    """
    given = [t for t in (target_params, target_ratio, target_bytes) if t is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of «target-params», «target-ratio», «target-bytes»")
    if not given[0] > 0:
        raise UsageError(f"the target must be positive, got {given[0]}")
    if target_ratio is not None:
        if not target_ratio > 1:
            raise UsageError(
                f"«target-ratio» is how many times smaller the model gets and must be > 1, got {target_ratio} "
                "(a ratio of 4 keeps a quarter of the parameters)"
            )
        return int(params_before / target_ratio)
    if target_bytes is not None:
        if target_bytes <= overhead_bytes:
            raise UsageError(
                f"«target-bytes» {target_bytes:,} leaves nothing for parameters: a file of this model holds about "
                f"{overhead_bytes:,} bytes beside them (BatchNorm statistics and the plan's metadata)"
            )
        return int((target_bytes - overhead_bytes) // bytes_per_param)
    return int(target_params)  # type: ignore[arg-type]
