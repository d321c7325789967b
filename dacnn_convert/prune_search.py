"""Prune, then share: channel pruning as the first step of a plan, at a ratio given or searched.

    ratio given ─► prune a copy (core.pruning) ─► plan on it (by mode, or the budget search with the targets
                   made absolute against the original) ─► the plan records the pruning and the original's size
    "auto"      ─► the same at every ratio of PRUNE_GRID that can reach the targets ─► each plan scored whole:
                   kl of the pruned-and-shared model (act fit + BN recalibration) against the original's
                   outputs with data; without data, the least pruning that reaches the targets

Pruning narrows every layer, so it removes MACs where banks do not (banks go where the parameters are:
the last, low-resolution stages); sharing then takes what the parameter target still asks. A MAC target
that banks and low rank alone reach only by cutting far below the size target is where pruning first
pays (benchmarks/results/speed_bench/NOTES.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from .amounts import macs_target, resolve_macs
from .budget import PRUNE_ADVICE, BudgetResult, _kl_score, calibration_reference
from .core.plan import Plan, count_params
from .core.pruning import Pruning, pruned_copy
from .errors import TargetError, marked

# channel ratios "auto" tries (0: no pruning); beyond a half, a uniform ratio leaves a quarter of the MACs
# and of the params before anything is shared
PRUNE_GRID = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625)
MAX_RATIO = 0.875  # the furthest "pruning alone" looks above the grid's last ratio
# plans whose whole-plan kl is within this fraction of the lowest count as equal (8 scoring batches do not
# tell them apart); the one with the fewest shared groups runs fastest at the same MACs
KL_TOLERANCE = 0.02


def prune(
    model: nn.Module,
    ratio: float,
    importance: str,
    input_size: tuple[int, int, int],
    calib_loader: Iterable | None = None,
    calib_batches: int = 0,
) -> tuple[nn.Module, Pruning]:
    """A pruned copy of ``model`` and the :class:`Pruning` that makes it, with what it removes counted; with
    calibration data, the layers that lost input channels refitted to the original's outputs
    (:func:`dacnn_convert.core.pruning.compensate`).

    Raises:
        PlanError: the ratio is not in (0, 1) (Torch-Pruning keeps at least one channel in every layer).
    """
    from .core.report import count_macs

    spec = Pruning(ratio, importance)
    student = pruned_copy(model, spec, input_size, calib_loader, calib_batches)
    saved = count_params(model) - count_params(student)
    macs = count_macs(model, input_size) - count_macs(student, input_size)
    return student, Pruning(ratio, importance, max(saved, 0), max(macs, 0))


@dataclass
class PrunedModels:
    """Pruned copies of one model, one per ratio, made once (a latency target plans several times)."""

    model: nn.Module
    input_size: tuple[int, int, int]
    importance: str
    calib_loader: Iterable | None = None  # with data, each pruned copy is compensated (core.pruning.compensate)
    calib_batches: int = 0
    made: dict[float, tuple[nn.Module, Pruning | None]] = field(default_factory=dict)
    reuse: dict[float, dict[str, Any]] = field(default_factory=dict)  # the budget search's cache, per ratio

    def at(self, ratio: float) -> tuple[nn.Module, Pruning | None]:
        if ratio not in self.made:
            if ratio == 0.0:
                self.made[ratio] = (self.model, None)
            else:
                self.made[ratio] = prune(
                    self.model, ratio, self.importance, self.input_size, self.calib_loader, self.calib_batches
                )
        self.reuse.setdefault(ratio, {})
        return self.made[ratio]


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


def _pruned_refusal(exc: TargetError, ratio: float, model: nn.Module, params_before: int) -> TargetError:
    """The search's refusal on a pruned model, in the original's terms: how much pruning left, and "prune more"."""
    said = marked(exc)  # with its «» marks: the CLI renders them as flags, Python as keywords
    said = (
        said.removesuffix(PRUNE_ADVICE) + f", or prune more (a ratio above {ratio:g})"
        if said.endswith(PRUNE_ADVICE)
        else said
    )
    return TargetError(
        f"after pruning {ratio:g} of every layer's channels ({count_params(model):,} of the original's "
        f"{params_before:,} params left): {said}",
        nearest=exc.nearest,
    )


def search_pruned(
    pruned: PrunedModels,
    ratios: Iterable[float],
    search_at: Callable[[nn.Module, dict[str, Any], bool], BudgetResult],
    calib_loader: Iterable | None,
    score_batches: int,
    metric: str,
    fits: Callable[[nn.Module], bool] | None = None,
) -> BudgetResult:
    """The best plan over pruning ``ratios``: ``search_at(pruned_model, reuse, final)`` at each, scored whole.

    With ``metric="kl"`` each ratio's plan (``final=False``: the additive search alone, no whole-plan
    re-scoring rounds) is scored as the pruned-and-shared model (act fit, BN recalibration) against the
    original's outputs on ``score_batches`` calibration batches; the lowest kl wins, and its ratio is
    searched once more with ``final=True`` (the re-scoring rounds, on the section scores already made). With
    ``fit`` nothing prices what pruning loses, so the smallest ratio that reaches the targets wins.
    With ``fits`` (:func:`meets`), the smallest ratio at which pruning alone meets the targets, between the
    best ratio and the next, is tried as well: where the best ratio's plan shares little, pruning a little
    more does the same without the extra layers a bank or low-rank pair adds (latency). Among plans within
    :data:`KL_TOLERANCE` of the lowest kl, the one with the fewest shared groups is kept.
    ``BudgetResult.prune_tries`` lists every ratio tried.

    Raises:
        TargetError: no ratio reaches the targets (the message of the deepest pruning tried).
    """
    params_before = count_params(pruned.model)
    tries: list[tuple[float, float | None, BudgetResult]] = []
    refused: TargetError | None = None
    reference: tuple[list[Any], list[Any]] | None = None
    grid = sorted(set(ratios))
    queue = list(grid)
    while queue:
        ratio = queue.pop(0)
        model, pruning = pruned.at(ratio)
        try:
            found = search_at(model, pruned.reuse[ratio], metric != "kl")
        except TargetError as exc:
            refused = _pruned_refusal(exc, ratio, model, params_before) if ratio > 0 else exc
            continue
        found = _of_original(found, pruning, params_before)
        if metric != "kl":
            tries.append((ratio, None, found))
            break  # the least pruning that reaches the targets
        if reference is None:
            assert calib_loader is not None
            reference = calibration_reference(pruned.model, calib_loader, score_batches)
        inner = replace(found.plan, prune=None)
        kl = _kl_score(model, inner, *reference) if inner.groups or pruning is not None else 0.0
        tries.append((ratio, kl, found))
        if not queue and fits is not None and ratio in grid:  # the grid done: pruning alone, a little further
            best_ratio, _, leader = min(tries, key=lambda t: (t[1] or 0.0, t[0]))
            if leader.plan.groups:
                higher = [r for r in grid if r > best_ratio]
                alone = _alone(pruned, best_ratio, higher[0] if higher else MAX_RATIO, fits)
                if alone is not None and alone not in grid:
                    queue.append(alone)
    if not tries:
        assert refused is not None
        raise refused
    lowest = min(t[1] or 0.0 for t in tries)
    close = [t for t in tries if (t[1] or 0.0) <= lowest * (1 + KL_TOLERANCE)]
    ratio, _, best = min(close, key=lambda t: (len(t[2].plan.groups), t[1] or 0.0, t[0]))
    if metric == "kl":
        model, pruning = pruned.at(ratio)
        best = _of_original(search_at(model, pruned.reuse[ratio], True), pruning, params_before)
    macs_before = best.macs_before
    summary = tuple(
        (r, kl, f.plan.params_after, macs_before - f.plan.macs_saved if macs_before else 0) for r, kl, f in tries
    )
    return replace(best, prune_tries=summary)
