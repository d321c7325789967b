"""Prune, then share: channel pruning as the first step of a plan, at a ratio given or searched.

    ratio given ─► prune a copy (core.pruning) ─► plan on it (by mode, or the budget search with the targets
                   made absolute against the original) ─► the plan records the pruning and the original's size
    "auto"      ─► the same at every ratio of PRUNE_GRID that can reach the targets ─► each plan scored whole:
                   kl of the pruned-and-shared model (act fit + BN recalibration) against the original's
                   outputs with data; without data, the least pruning that reaches the targets

After the uniform ratios, "auto" with data also tries pruning per section: each section's layers are pruned alone
at each ratio of SECTION_GRID and scored (kl after compensation and BN recalibration, additive across sections),
and a multiple-choice knapsack (core.knapsack) picks per section the ratio that removes as many MACs (or, without
a MAC target, params) as the best uniform ratio and the next one, at the least summed kl; each such plan is then
searched and scored whole beside the uniform ones.

Pruning narrows every layer, so it removes MACs where banks do not (banks go where the parameters are:
the last, low-resolution stages); sharing then takes what the parameter target still asks. A MAC target
that banks and low rank alone reach only by cutting far below the size target is where pruning first
pays (benchmarks/results/speed_bench/NOTES.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .amounts import macs_target, resolve_macs
from .budget import PRUNE_ADVICE, BudgetResult, Scorer, calibration_reference
from .core.plan import Plan, count_params
from .core.pruning import Pruning, pruned_copy
from .errors import PlanError, TargetError, TraceError, marked

# channel ratios "auto" tries (0: no pruning); beyond a half, a uniform ratio leaves a quarter of the MACs
# and of the params before anything is shared
PRUNE_GRID = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625)
# the ratios each section is scored at alone for per-section pruning (its layers pruned, the rest whole)
SECTION_GRID = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
MAX_RATIO = 0.875  # the furthest "pruning alone" looks above the grid's last ratio
# plans whose whole-plan kl is within this fraction of the lowest count as equal (8 scoring batches do not
# tell them apart); the one with the fewest shared groups runs fastest at the same MACs
KL_TOLERANCE = 0.02

Layers = tuple[tuple[str, float], ...]  # named layers at ratios of their own (core.pruning.Pruning.layers)
Key = tuple[float, Layers]  # one pruning: the ratio of the layers not named, and the named ones


def prune(
    model: nn.Module,
    ratio: float,
    importance: str,
    input_size: tuple[int, int, int],
    calib_loader: Iterable | None = None,
    calib_batches: int = 0,
    layers: Layers = (),
    sections: tuple[float, ...] = (),
) -> tuple[nn.Module, Pruning]:
    """A pruned copy of ``model`` and the :class:`Pruning` that makes it (``layers``: named layers at ratios of
    their own), with what it removes counted; with calibration data, the layers that lost input channels
    refitted to the original's outputs (:func:`dacnn_convert.core.pruning.compensate`).

    Raises:
        PlanError: a ratio is not in [0, 1) or none prunes (Torch-Pruning keeps at least one channel in every
            layer), or a named layer is not in the model.
    """
    from .core.report import count_macs

    spec = Pruning(ratio, importance, layers=layers, sections=sections)
    student = pruned_copy(model, spec, input_size, calib_loader, calib_batches)
    saved = count_params(model) - count_params(student)
    macs = count_macs(model, input_size) - count_macs(student, input_size)
    return student, Pruning(ratio, importance, max(saved, 0), max(macs, 0), layers, sections)


@dataclass
class PrunedModels:
    """Pruned copies of one model, one per ratio, made once (a latency target plans several times)."""

    model: nn.Module
    input_size: tuple[int, int, int]
    importance: str
    calib_loader: Iterable | None = None  # with data, each pruned copy is compensated (core.pruning.compensate)
    calib_batches: int = 0
    leaf_modules: Sequence[type[nn.Module]] = ()  # module types fx must not trace into (section_layers)
    made: dict[Key, tuple[nn.Module, Pruning | None]] = field(default_factory=dict)
    reuse: dict[Key, dict[str, Any]] = field(default_factory=dict)  # the budget search's cache, per pruning
    # per-section pruning's layers and scores (section_layers, section_scores), made once: a latency target
    # searches several MAC budgets, none of which they depend on
    sections: tuple[list[tuple[str, ...]], list[SectionPruning]] | None = None

    def at(
        self, ratio: float, layers: Layers = (), sections: tuple[float, ...] = ()
    ) -> tuple[nn.Module, Pruning | None]:
        """The model pruned at ``ratio`` (``layers`` at their own; ``sections``: their per-section ratios, recorded
        for display), and its :class:`Pruning` (None for the model itself), made once."""
        key = (ratio, layers)
        if key not in self.made:
            if ratio == 0.0 and not layers:
                self.made[key] = (self.model, None)
            else:
                self.made[key] = prune(
                    self.model,
                    ratio,
                    self.importance,
                    self.input_size,
                    self.calib_loader,
                    self.calib_batches,
                    layers,
                    sections,
                )
        self.reuse.setdefault(key, {})
        return self.made[key]


def with_pruning(plan: Plan, pruning: Pruning | None, params_before: int) -> Plan:
    """``plan`` (made on the pruned model) as a plan of the original: it prunes first, sizes count from the original."""
    if pruning is None:
        return plan
    return replace(plan, prune=pruning, params_before=params_before)


def _of_original(found: BudgetResult, pruning: Pruning | None, params_before: int) -> BudgetResult:
    """A search on the pruned model as a search on the original (its plan and its MAC count)."""
    if pruning is None:
        return found
    macs_before = found.macs_before + pruning.macs_saved if found.macs_before else 0
    return replace(found, plan=with_pruning(found.plan, pruning, params_before), macs_before=macs_before)


def absolute_macs(model: nn.Module, input_size: tuple[int, int, int], target: int | str | None) -> int | None:
    """A MAC target as MACs per example of the *original* (``"4x"`` resolved against it)."""
    if target is None:
        return None
    from .core.report import count_macs

    return resolve_macs(count_macs(model, input_size), macs_target(target))  # type: ignore[arg-type]


def meets(
    target_params: int | None, target_macs: int | None, input_size: tuple[int, int, int]
) -> Callable[[nn.Module], bool]:
    """Whether a (pruned) model is within both targets as it is, nothing shared."""
    from .core.report import count_macs

    def check(model: nn.Module) -> bool:
        if target_params is not None and count_params(model) > target_params:
            return False
        return target_macs is None or count_macs(model, input_size) <= target_macs

    return check


def _alone(pruned: PrunedModels, lo: float, hi: float, fits: Callable[[nn.Module], bool]) -> float | None:
    """The smallest ratio in (lo, hi] (to 1/64 of the interval) at which pruning alone meets the targets."""

    def ok(r: float) -> bool:
        return fits(pruned_copy(pruned.model, Pruning(r, pruned.importance), pruned.input_size))

    if not ok(hi):
        return None
    for _ in range(6):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return round(hi, 4)


def _pruned_refusal(exc: TargetError, pruning: Pruning, model: nn.Module, params_before: int) -> TargetError:
    """The search's refusal on a pruned model, in the original's terms: how much pruning left, and "prune more"."""
    said = marked(exc)  # with its «» marks: the CLI renders them as flags, Python as keywords
    more = f", or prune more (a ratio above {pruning.ratio:g})" if not pruning.layers else ", or prune more"
    said = said.removesuffix(PRUNE_ADVICE) + more if said.endswith(PRUNE_ADVICE) else said
    return TargetError(
        f"after pruning {pruning.amount} ({count_params(model):,} of the original's "
        f"{params_before:,} params left): {said}",
        nearest=exc.nearest,
    )


def section_layers(
    model: nn.Module, input_size: tuple[int, int, int], leaf_modules: Sequence[type[nn.Module]] = ()
) -> list[tuple[str, ...]]:
    """The layers channel pruning narrows, by section: the exact convs and Linears the forward pass calls, grouped
    by output resolution as the planner's sections are (largest first; a layer called at two resolutions in the
    first), the logits layers left out."""
    from .core.graph import analyze
    from .core.modes import mode
    from .core.pruning import output_layers

    first = next(model.parameters(), None)
    with mode(model):
        heads = {
            id(m)
            for m in output_layers(
                model, torch.zeros(1, *input_size, device=first.device if first is not None else "cpu")
            )
        }
    modules = dict(model.named_modules())
    by_size: dict[tuple[int, int], list[str]] = {}
    seen: set[str] = set()
    for site in analyze(model, input_size, leaf_modules):
        if id(modules[site.name]) not in heads and site.name not in seen:
            seen.add(site.name)
            by_size.setdefault(site.out_size, []).append(site.name)
    return [tuple(by_size[r]) for r in sorted(by_size, key=lambda r: -r[0] * r[1])]  # stable: first seen first


@dataclass(frozen=True)
class SectionPruning:
    """One section's layers pruned alone at one ratio: what it removes (exact) and its kl against the original
    after compensation and BN recalibration."""

    section: int  # 1-based, in the order of :func:`section_layers`
    ratio: float
    params_saved: int
    macs_saved: int
    kl: float


def section_scores(
    pruned: PrunedModels,
    sections: list[tuple[str, ...]],
    reference: tuple[list[Any], list[Any]],
    grid: Iterable[float] = SECTION_GRID,
) -> list[SectionPruning]:
    """Every section pruned alone at every ratio of ``grid`` (compensated where ``pruned`` has data), scored by kl
    to the original after BN recalibration on the reference batches. Every layer is named, the other sections'
    at 0, as in the plans made of these scores (:func:`layers_at`): a channel group spanning two sections (a
    stem conv and the residual stream it feeds after a pooling) follows the ratio of the layer Torch-Pruning
    reaches first, the same in the scores and in the plan, so each group's saving counts in one section. Ratios
    that remove nothing (Torch-Pruning keeps a channel in every layer) or that the model cannot take are left
    out."""
    from .budget import _recalibrated_kl, prefix_cache

    cache = prefix_cache(pruned.model, reference[0], pruned.leaf_modules)  # each student runs from its section on
    out = []
    for k in range(1, len(sections) + 1):
        for r in grid:
            ratios = [r if i == k else 0.0 for i in range(1, len(sections) + 1)]
            try:
                student, spec = prune(
                    pruned.model,
                    0.0,
                    pruned.importance,
                    pruned.input_size,
                    pruned.calib_loader,
                    pruned.calib_batches,
                    layers_at(sections, ratios),
                )
            except PlanError:
                continue
            if spec.params_saved == 0 and spec.macs_saved == 0:
                continue
            kl = _recalibrated_kl(student, *reference, cache)
            out.append(SectionPruning(k, r, spec.params_saved, spec.macs_saved, kl))
    return out


def _whole_kl(model: nn.Module, plan: Plan, reference: tuple[list[Any], list[Any]]) -> float:
    """The kl of a pruned model's found plan, converted whole (one score per pruning tried)."""
    return Scorer(model, *reference).kl(plan)


def layers_at(sections: list[tuple[str, ...]], ratios: Sequence[float]) -> Layers:
    """Every layer of every section named with its section's ratio (0: whole), for :attr:`Pruning.layers`."""
    return tuple((n, r) for names, r in zip(sections, ratios, strict=True) for n in names)


def per_section_ratios(
    scores: Iterable[SectionPruning], n_sections: int, need: int, by: str
) -> tuple[float, ...] | None:
    """Per section, the ratio (0: whole) such that the sections' summed savings (``by`` "macs" or "params", as each
    section alone removes them) reach ``need`` at the least summed kl (exact multiple-choice knapsack); None when
    no choice reaches it. Pruning two adjacent sections removes a little less than the sum (a layer between them
    loses inputs and outputs: its saving is 1 - (1 - a)(1 - b), not a + b), so the plan's own count is what the
    search then checks."""
    from .core.knapsack import Option, front

    classes = [[Option(0.0, 0, 0.0)] for _ in range(n_sections)]
    for s in scores:
        classes[s.section - 1].append(Option(s.ratio, s.macs_saved if by == "macs" else s.params_saved, s.kl))
    found = front(classes, need)
    return tuple(found[0].labels) if found else None


def search_pruned(
    pruned: PrunedModels,
    ratios: Iterable[float],
    search_at: Callable[[nn.Module, dict[str, Any], bool], BudgetResult],
    calib_loader: Iterable | None,
    score_batches: int,
    metric: str,
    fits: Callable[[nn.Module], bool] | None = None,
    per_section: str | None = None,
) -> BudgetResult:
    """The best plan over pruning ``ratios``: ``search_at(pruned_model, reuse, final)`` at each, scored whole.

    With ``metric="kl"`` each ratio's plan (``final=False``: the additive search alone, no whole-plan
    re-scoring rounds) is scored as the pruned-and-shared model (act fit, BN recalibration) against the
    original's outputs on ``score_batches`` calibration batches; the lowest kl wins, and its pruning is
    searched once more with ``final=True`` (the re-scoring rounds, on the section scores already made). With
    ``fit`` nothing prices what pruning loses, so the smallest ratio that reaches the targets wins.
    After the ratios, with kl: with ``fits`` (:func:`meets`), the smallest ratio at which pruning alone meets the
    targets, between the best ratio and the next, is tried as well (where the best ratio's plan shares little,
    pruning a little more does the same without the extra layers a bank or low-rank pair adds: latency); with
    ``per_section`` ("macs" or "params"), per-section pruning (:func:`section_scores`,
    :func:`per_section_ratios`) removing as many of those as the best ratio and as the next one. Among plans
    within :data:`KL_TOLERANCE` of the lowest kl, the one with the fewest shared groups is kept.
    ``BudgetResult.prune_tries`` lists every pruning tried.

    Raises:
        TargetError: no ratio reaches the targets (the message of the deepest pruning tried).
    """
    params_before = count_params(pruned.model)
    # (ratio or the uniform ratio matched, per-section ratios or (), named layers, kl, the search's result)
    tries: list[tuple[float, tuple[float, ...], Layers, float | None, BudgetResult]] = []
    refused: TargetError | None = None
    reference: tuple[list[Any], list[Any]] | None = None
    grid = sorted(set(ratios))

    def attempt(level: float, by: tuple[float, ...] = (), layers: Layers = ()) -> bool:
        nonlocal refused, reference
        model, pruning = pruned.at(0.0 if layers else level, layers, by)
        try:
            found = search_at(model, pruned.reuse[0.0 if layers else level, layers], metric != "kl")
        except TargetError as exc:
            refused = _pruned_refusal(exc, pruning, model, params_before) if pruning is not None else exc
            return False
        found = _of_original(found, pruning, params_before)
        kl = None
        if metric == "kl":
            if reference is None:
                assert calib_loader is not None
                reference = calibration_reference(pruned.model, calib_loader, score_batches)
            inner = replace(found.plan, prune=None)
            kl = _whole_kl(model, inner, reference) if inner.groups or pruning is not None else 0.0
        tries.append((level, by, layers, kl, found))
        return True

    for ratio in grid:
        if attempt(ratio) and metric != "kl":
            break  # without kl: the least pruning that reaches the targets
    if metric == "kl" and tries:
        best_ratio, _, _, _, leader = min(tries, key=lambda t: (t[3] or 0.0, t[0]))
        higher = [r for r in grid if r > best_ratio]
        if fits is not None and leader.plan.groups:  # pruning alone, a little further
            alone = _alone(pruned, best_ratio, higher[0] if higher else MAX_RATIO, fits)
            if alone is not None and alone not in grid:
                attempt(alone)
        if per_section is not None:
            assert reference is not None
            try:
                if pruned.sections is None:
                    named = section_layers(pruned.model, pruned.input_size, pruned.leaf_modules)
                    pruned.sections = (named, section_scores(pruned, named, reference))
            except (TraceError, PlanError):  # a model fx cannot describe: the uniform ratios stand
                pruned.sections = ([], [])
            sections, scores = pruned.sections
            done: set[tuple[float, ...]] = set()
            for level in [r for r in [best_ratio, *higher[:1]] if r > 0] or [r for r in grid if r > 0][:1]:
                spec = pruned.at(level)[1]
                need = 0 if spec is None else spec.macs_saved if per_section == "macs" else spec.params_saved
                by = per_section_ratios(scores, len(sections), need, per_section) if sections else None
                if by is None or by in done or not any(by) or (len(set(by)) == 1 and by[0] in grid):
                    continue  # out of reach, already tried, nothing pruned, or a uniform ratio of the grid
                done.add(by)
                attempt(level, by, layers_at(sections, by))
    if not tries:
        assert refused is not None
        raise refused
    lowest = min(t[3] or 0.0 for t in tries)
    close = [t for t in tries if (t[3] or 0.0) <= lowest * (1 + KL_TOLERANCE)]
    level, by, layers, _, best = min(close, key=lambda t: (len(t[4].plan.groups), t[3] or 0.0, t[0], t[1]))
    if metric == "kl":
        key = (0.0 if layers else level, layers)
        model, pruning = pruned.at(*key, by)
        best = _of_original(search_at(model, pruned.reuse[key], True), pruning, params_before)
    macs_before = best.macs_before
    summary = tuple(
        (r, kl, f.plan.params_after, macs_before - f.plan.macs_saved if macs_before else 0, b)
        for r, b, _, kl, f in tries
    )
    return replace(best, prune_tries=summary)
