"""Exact multiple-choice knapsack by Pareto fronts: one option per class, least cost for a saving.

The budget planner picks one option per section (free, mix, a bank size, a rank, ...). Each option
saves an exact integer number of parameters and costs a sensitivity; the scores add up over
sections. The question "least summed cost with savings >= need" is a multiple-choice knapsack.

It is solved exactly, to the last parameter, by dynamic programming over non-dominated states
(Nemhauser and Ullmann, 1969): after each class only the partial choices that no other beats on
both savings and cost are kept, since a dominated partial choice can never complete to a better
plan than the one dominating it. States that cannot reach ``need`` even with the largest saving of
every remaining class are dropped as well. No budget is discretised, so the result is exact; the
front stays small in practice (its size is bounded by the number of distinct savings, and every
option beaten on both counts within its own class is removed first).

Pure arithmetic: no torch, nothing of the package imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Option(Generic[T]):
    """One choice for one class: what it is, the parameters it saves and the score it costs."""

    label: T
    saved: int
    cost: float


@dataclass(frozen=True)
class Solution(Generic[T]):
    """A complete choice (one label per class) with its summed savings and cost."""

    labels: tuple[T, ...]
    saved: int
    cost: float


def pareto(options: Sequence[Option[T]]) -> list[Option[T]]:
    """The options no other beats on both counts (lower or equal cost and higher or equal saving), cheapest first.

    Ties keep the first option in the given order, so the result is deterministic.
    """
    return [o for _, _, o in _non_dominated([(o.cost, o.saved, o) for o in options])]


def front(classes: Sequence[Sequence[Option[T]]], need: int = 0) -> list[Solution[T]]:
    """Every non-dominated complete choice whose savings reach ``need``, cheapest first.

    Args:
        classes: per class, the options (at least one each); one is picked from every class.
        need: the savings a complete choice must reach (may be <= 0: every choice qualifies).

    Returns:
        The Pareto front of (cost, saved) over the choices that save at least ``need``; empty
        when none does. Its first element is the optimum: least cost, then most saved.
    """
    if any(len(c) == 0 for c in classes):
        return []
    pruned = [pareto(c) for c in classes]
    reach = [0] * (len(pruned) + 1)  # the most the classes from i on can still save
    for i in range(len(pruned) - 1, -1, -1):
        reach[i] = reach[i + 1] + max(o.saved for o in pruned[i])
    states: list[tuple[float, int, tuple[T, ...]]] = [(0.0, 0, ())]
    for i, options in enumerate(pruned):
        grown = [
            (cost + o.cost, saved + o.saved, (*labels, o.label))
            for cost, saved, labels in states
            for o in options
            if saved + o.saved + reach[i + 1] >= need
        ]
        states = _non_dominated(grown)
    return [Solution(labels, saved, cost) for cost, saved, labels in states if saved >= need]


U = TypeVar("U")


def _non_dominated(states: list[tuple[float, int, U]]) -> list[tuple[float, int, U]]:
    """(cost, saved, payload) triples no other beats on both counts, cheapest first (stable on ties)."""
    kept: list[tuple[float, int, U]] = []
    for s in sorted(states, key=lambda s: (s[0], -s[1])):
        if not kept or s[1] > kept[-1][1]:
            kept.append(s)
    return kept
