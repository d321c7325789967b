"""Amounts as people write them: ``6M`` parameters, ``12MB``, ``40M`` MACs or ``4x`` fewer.

Torch-free: the CLI reads recipes (which parse these) before anything heavy is imported.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import UsageError


def _at_least_one(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UsageError(f"«target-macs» must be a finite number, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise UsageError(f"«target-macs» must be >= 1, got {value}")
    return float(value)


def parse_amount(text: str | None, what: str) -> int | None:
    """``6M`` -> 6,000,000; ``600K``, ``12MB`` (10^6), ``12MiB`` (2^20), ``5000`` as they read."""
    if text is None:
        return None
    units = {
        "": 1,
        "K": 10**3,
        "M": 10**6,
        "G": 10**9,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
    }
    body = text.strip().upper().replace(",", "").replace("_", "")
    number = body.rstrip("KMGIB")
    try:
        value = float(number) * units[body[len(number) :]]
    except (ValueError, KeyError):
        raise UsageError(f"{what} takes a number like 6M, 600K or 12MB; got {text!r}") from None
    if not math.isfinite(value) or value > 1e15:
        raise UsageError(f"{what} must be a finite size below 10^15; got {text!r}")
    return int(value)


def macs_target(value: Any) -> int | str | None:
    """A MAC target as a recipe or a call writes it: MACs per example (an integer, ``40M``, ``1.2G``) or
    how many times fewer (``4x``); returned as an int, or as the ratio's text (``"4x"``) for
    :func:`resolve_macs` once the model's MACs are known."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower().endswith("x"):
        try:
            ratio = float(value.strip()[:-1])
        except ValueError:
            raise UsageError(f"«target-macs» takes MACs like 40M or a ratio like 4x; got {value!r}") from None
        if not math.isfinite(ratio) or ratio <= 1:
            raise UsageError(f"«target-macs» ratio must be > 1, got {value!r} (4x is four times fewer MACs)")
        return f"{ratio:g}x"
    if isinstance(value, str):
        try:
            amount = parse_amount(value, "«target-macs»")
        except UsageError:
            raise UsageError(f"«target-macs» takes MACs like 40M or a ratio like 4x; got {value!r}") from None
        return int(_at_least_one(amount))
    return int(_at_least_one(value))


def resolve_macs(macs_before: int, target: int | str) -> int:
    """The MAC budget per example of :func:`macs_target`'s value for a model of ``macs_before`` MACs."""
    if isinstance(target, str):
        return int(macs_before / float(target[:-1]))
    return target
