"""Banks shared across stages (issue 26): merge bank groups whose members read input patches of one shape.

A planned share group lives inside one stage, but a bank of k filters of C_in x kh x kw can serve any dense convs
whose input patches have that shape, whatever their stage or C_out (each member keeps its own C_out x k
coefficients): ResNet-18's ``layer2.0.conv1`` (64 -> 128, stride 2) reads the same 64 x 3 x 3 patches as every conv
of ``layer1``. :func:`merge_banks` merges two bank groups (a low-rank layer is a bank of one member) when one joint
bank costs fewer parameters than both and fits the members at no larger summed error: the summed squared relative
output error of the members (on their calibration inputs when moments are given, else of their kernels), from the
same whitened SVD :func:`~dacnn_convert.core.fitting.fit_bank` that conversion runs. The bank's size is found by
bisection (the error falls as filters are added, though the SVD minimises the error under the members' summed
moments, not each member's relative error: a size the bisection skips may qualify too); pairs are merged greedily,
the largest saving first, until no merge saves a parameter. Similarity is measured, not assumed: groups whose
filters span different directions need as many joint filters as both together, which costs more coefficients, and
stay apart.

Plain data in, plain data out: the plan with merged groups and one :class:`Merge` record per merge, for the
planner to re-spend the saving and keep the result only where its whole-plan score is better.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch

from .fitting import BankBasis, bank_basis, fit_bank
from .plan import Group, Plan

TOLERANCE = 1e-9  # per member, on squared relative errors: float64 round-off of fits that are exact


@dataclass(frozen=True)
class Merge:
    """One merge: ``merged`` groups became ``group``, a bank of ``rank`` filters for all their members."""

    merged: tuple[str, ...]
    group: str
    members: tuple[str, ...]
    ranks: tuple[int, ...]  # the merged groups' filters
    rank: int
    params_saved: int
    error_before: float  # summed squared relative output error of the members, separately
    error_after: float  # the same with the joint bank

    def describe(self) -> str:
        return (
            f"{' + '.join(self.merged)} -> {self.group}: {'+'.join(map(str, self.ranks))} -> {self.rank} filters "
            f"for {len(self.members)} layers, {self.params_saved:,} params saved "
            f"(error {self.error_before:.4f} -> {self.error_after:.4f})"
        )


def _key(plan: Plan, g: Group) -> tuple[str, int, int, int] | None:
    """What a bank's filters must match to be shared: the layer kind and C_in x kh x kw; None for groups that
    never merge (anchors, grouped convs, the layer producing the outputs)."""
    if g.kind != "bank":
        return None
    sites = [plan.site(m) for m in g.members]
    if any(s.groups != 1 or s.feeds_output for s in sites):
        return None
    _, ci, kh, kw = g.shape
    return (sites[0].layer, ci, kh, kw)


def _name(index: int, sections: tuple[int, ...], k: int, shape: tuple[int, ...]) -> str:
    secs = "_".join(map(str, sections)) or "0"
    return f"x{index}_s{secs}_bank{k}x" + "x".join(map(str, shape))


def merge_banks(
    plan: Plan,
    kernels: Mapping[str, torch.Tensor],
    moments: Mapping[str, torch.Tensor] | None = None,
    allowed: Callable[[Plan], bool] | None = None,
) -> tuple[Plan, tuple[Merge, ...]]:
    """Merge the plan's bank groups across stages where a joint bank is smaller at no larger fitted error.

    Args:
        plan: any plan; only its ``bank`` groups of dense, non-output layers are candidates.
        kernels: every bank member's original kernel, (C_out, C_in, kh, kw) (a Linear's as (out, in, 1, 1)).
        moments: each member's input second moments (H, from :func:`~dacnn_convert.core.fitting.input_moments`);
            a group with a member that has none is not merged. None: errors of the kernels themselves.
        allowed: a further test of the merged plan (the planner's MAC budget); a merge it refuses is not made.

    Returns:
        The plan with merged groups (each in the sections of its members, named ``x{i}_s{sections}_bank...``)
        and one :class:`Merge` per merge, in the order made.
    """
    err: dict[tuple[tuple[str, ...], int], float] = {}
    bases: dict[tuple[str, ...], BankBasis] = {}  # one decomposition per member set, read at every size

    def error(members: tuple[str, ...], k: int) -> float:
        if (members, k) not in err:
            weights = [kernels[m].detach().float().cpu() for m in members]
            held = [moments[m] for m in members] if moments is not None else None
            if members not in bases:
                bases[members] = bank_basis(weights, held)
            fit = fit_bank(weights, k, held, basis=bases[members])
            err[members, k] = sum(e * e for e in fit.errors)
        return err[members, k]

    def usable(g: Group) -> bool:
        return _key(plan, g) is not None and (moments is None or all(m in moments for m in g.members))

    groups = list(plan.groups)
    merges: list[Merge] = []
    taken = {g.name for g in plan.groups}
    counter = (i for i in itertools.count() if not any(n.startswith(f"x{i}_") for n in taken))  # fresh on a merged plan
    refused: set[tuple[str, str]] = set()
    while True:
        best: tuple[int, int, int, int, float, tuple[str, ...]] | None = None  # saving, i, j, k, error, members
        for i, j in itertools.combinations(range(len(groups)), 2):
            bases.clear()  # a decomposition serves one pair's bisection (d x d each: up to 170 MB)
            a, b = groups[i], groups[j]
            if not (usable(a) and usable(b)) or _key(plan, a) != _key(plan, b) or (a.name, b.name) in refused:
                continue
            members = tuple(sorted(a.members + b.members, key=lambda m: plan.site(m).order))
            _, ci, kh, kw = a.shape
            d = ci * kh * kw
            per = d + sum(plan.site(m).out_channels for m in members)  # one joint filter and its coefficients
            separate = plan.group_params(a) + plan.group_params(b)
            cap = min((separate - 1) // per, d, sum(plan.site(m).out_channels for m in members))
            if cap < 1:
                continue
            target = error(a.members, a.rank) + error(b.members, b.rank) + TOLERANCE * len(members)
            if error(members, cap) > target:
                continue
            lo, hi = 1, cap  # the smallest size within the error: the error falls as filters are added
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if error(members, mid) <= target else (mid + 1, hi)
            saving = separate - lo * per
            if best is None or saving > best[0]:
                best = (saving, i, j, lo, error(members, lo), members)
        if best is None:
            break
        saving, i, j, k, after, members = best
        a, b = groups[i], groups[j]
        sections = tuple(sorted(set(a.sections) | set(b.sections)))
        sizes = {plan.site(m).out_size for m in members}
        merged = Group(
            _name(next(counter), sections, k, a.shape[1:]),
            members,
            (k, *a.shape[1:]),
            a.resolution if len(sizes) == 1 else None,
            sections,
            "bank",
        )
        trial = [g for n, g in enumerate(groups) if n not in (i, j)] + [merged]
        if allowed is not None and not allowed(replace(plan, groups=tuple(trial))):
            refused.add((a.name, b.name))  # this merge breaks the caller's budget; try the others
            continue
        merges.append(
            Merge(
                (a.name, b.name),
                merged.name,
                members,
                (a.rank, b.rank),
                k,
                saving,
                error(a.members, a.rank) + error(b.members, b.rank),
                after,
            )
        )
        groups = trial
    return replace(plan, groups=tuple(groups)), tuple(merges)
