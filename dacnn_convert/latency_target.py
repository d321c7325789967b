"""A latency target: plan, build, time, and tighten the MAC budget until the measured time fits.

    target ms ─► MAC budget (the model's MACs x target / its measured time, or the MAC target given)
      ─► the planner at that budget ─► the plan built (random init: timing needs no fit) and timed
      ─► fits: done │ too slow: budget x max(target / measured, ...) x 0.95, again (at most TRIES)

Latency is not additive the way params and MACs are (a bank's 1x1 adds a layer, small convs run
below peak), so the MAC budget is only the knob; every answer is a measured figure on this machine,
the median of :data:`REPEATS` runs (``latency.measure_latency``), on the model's own device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from .amounts import resolve_macs
from .budget import BudgetResult
from .errors import TargetError, marked

TRIES = 6  # plans built and timed at most
REPEATS = 20  # timed runs per measurement (the median is used)
MARGIN = 0.95  # each tightening aims this much below the target, so noise does not stop it just short


def plan_for_latency(
    model: nn.Module,
    search_at: Callable[[int], BudgetResult],
    target_ms: float,
    input_size: tuple[int, int, int],
    batch: int = 1,
    target_macs: int | str | None = None,
) -> BudgetResult:
    """The planner's plan (``search_at(mac_budget)``) whose measured latency is at most ``target_ms``.

    Args:
        model: the original network (timed once as the reference; left untouched).
        search_at: the planner with every other target fixed, given a MAC budget per example.
        target_ms: milliseconds per batch of ``batch`` examples.
        input_size: (C, H, W) of one example.
        batch: the batch size the target is for.
        target_macs: a MAC target given as well (``40_000_000`` or ``"4x"``; the budget never goes above it).

    Returns:
        The search result with ``latency_ms`` (the measured median) and ``latency_tries`` ((MACs, ms) per plan).

    Raises:
        TargetError: no plan within :data:`TRIES` tries (or above the MAC floor) runs that fast; the
            fastest measured and the original's time are named.
    """
    first = next(model.parameters(), None)
    device = first.device if first is not None else None
    # random plan weights and timing inputs: drawn from a forked RNG, the caller's random state untouched
    with torch.random.fork_rng(devices=[device] if device is not None and device.type == "cuda" else []):
        return _tighten(model, search_at, target_ms, input_size, batch, target_macs, str(device or "cpu"))


def _tighten(
    model: nn.Module,
    search_at: Callable[[int], BudgetResult],
    target_ms: float,
    input_size: tuple[int, int, int],
    batch: int,
    target_macs: int | str | None,
    device: str,
) -> BudgetResult:
    from .core.convert import convert
    from .core.report import count_macs
    from .latency import measure_latency

    def timed(m: nn.Module) -> float:
        return measure_latency(m, input_size, batch, "fp32", device, repeats=REPEATS).median_ms

    macs_before = count_macs(model, input_size)
    macs_cap = None if target_macs is None else resolve_macs(macs_before, target_macs)
    original_ms = timed(model)
    budget = min(macs_cap or macs_before, int(macs_before * min(1.0, target_ms / original_ms)))
    tries: list[tuple[int, float]] = []
    floor_tried = False
    for _ in range(TRIES):
        try:
            found = search_at(max(budget, 1))
        except TargetError as exc:
            if not tries and (exc.nearest is None or (macs_cap is not None and budget >= macs_cap)):
                raise  # the size or MAC target itself is out of reach: its own message says what to raise
            within_cap = exc.nearest is not None and (macs_cap is None or exc.nearest <= macs_cap)
            if within_cap and not floor_tried:  # below the MAC floor: time the floor's plan itself
                budget, floor_tried = exc.nearest, True  # type: ignore[assignment]
                continue
            fastest = min(tries, key=lambda t: t[1]) if tries else None
            why = f"tightening further: {marked(exc)}"
            raise TargetError(_message(target_ms, batch, original_ms, fastest, why)) from None
        student = convert(model, replace(found.plan, init="random")).model
        ms = timed(student)
        macs = macs_before - found.plan.macs_saved
        tries.append((macs, ms))
        if ms <= target_ms:
            return replace(
                found, latency_ms=ms, latency_tries=tuple(tries), latency_before_ms=original_ms, latency_batch=batch
            )
        if floor_tried:
            break  # the floor's plan itself is too slow: no MAC budget helps
        budget = int(macs * min(MARGIN, MARGIN * target_ms / ms))
    why = "the plan with the fewest MACs the search reaches" if floor_tried else f"{len(tries)} plans timed"
    raise TargetError(_message(target_ms, batch, original_ms, min(tries, key=lambda t: t[1]), why))


def _message(target: float, batch: int, original: float, fastest: tuple[int, float] | None, why: str) -> str:
    best = f"the fastest plan measured {fastest[1]:.3g} ms at {fastest[0]:,} MACs" if fastest else "no plan was timed"
    return (
        f"no plan runs in {target:g} ms per batch of {batch} on this machine: {best}, the original "
        f"{original:.3g} ms ({why}). Raise «target-latency»"
    )
