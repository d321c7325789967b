"""Filter banks as plan data: parse bank sizes, turn share groups into bank and low-rank groups.

A **bank** generalises the paper's anchor plus serial regulator (section 3): the n member convs
of one group (same stage, same configuration) share k filters B (k x C_in x kh x kw, stored
once) and each member l keeps its own 1x1 coefficient conv C_l (C_out x k) and its BatchNorm.
Member l computes C_l * (B * x). A group costs

    k * C_in * kh * kw  +  sum_l C_out_l * k       instead of   sum_l C_out_l * C_in * kh * kw,

and MACs fall too when k is small. A conv that shares with nothing is the case n = 1: a
low-rank factorisation of its own kernel (``factorize_unshared``).

Sizes are given as an integer k, a fraction of C_out (``0.25``), or per 1-based section
(``"1:1.0,2:0.5,4:0.125"``; a bare value is the default for unlisted sections; a section
neither listed nor covered by a default stays free). Everything here is arithmetic on
:class:`~dacnn_convert.core.graph.ConvSite` data: no weights are read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import UsageError
from .graph import ConvSite

BankValue = int | float
BankSize = BankValue | str | Mapping[int, BankValue | None] | None


@dataclass(frozen=True)
class BankSpec:
    """Bank sizes resolved per section: a value per section, or None (that section stays free)."""

    default: BankValue | None
    per_section: tuple[tuple[int, BankValue | None], ...] = ()

    def value(self, section: int) -> BankValue | None:
        return dict(self.per_section).get(section, self.default)

    def sections(self) -> tuple[int, ...]:
        return tuple(s for s, _ in self.per_section)


def parse_value(text: str, what: str) -> BankValue | None:
    """``64`` -> 64 filters, ``0.25`` -> a quarter of C_out, ``free``/``none`` -> None.

    Raises:
        UsageError: not a number, or not positive.
    """
    t = text.strip().lower()
    if t in ("free", "none"):
        return None
    try:
        value: BankValue = float(t) if any(c in t for c in ".e") else int(t)
    except ValueError:
        raise UsageError(
            f"{what} {text!r} is not a bank size: give an integer number of filters (64), a fraction of "
            "C_out (0.25), or per section 1:1.0,2:0.5"
        ) from None
    check_value(value, what)
    return value


def check_value(value: BankValue, what: str = "bank size") -> None:
    """A bank size must be a positive integer or a positive, finite fraction of C_out."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageError(f"{what} must be an integer or a fraction of C_out, got {value!r}")
    if not value > 0 or value != value or value == float("inf"):
        raise UsageError(f"{what} must be positive (an integer k >= 1 or a fraction of C_out > 0), got {value}")


def parse_bank_size(value: BankSize, what: str = "bank size") -> BankSpec:
    """``0.5`` / ``64`` / ``"1:1.0,2:0.5,4:0.125"`` / ``{1: 1.0, 4: 0.125}`` to a :class:`BankSpec`.

    Raises:
        UsageError: zero, negative, non-finite or malformed values, a section given twice.
    """
    if value is None:
        return BankSpec(None)
    if isinstance(value, Mapping):
        items = []
        for k, size in value.items():
            if size is not None:
                check_value(size, f"{what} of section {k}")
            items.append((int(k), size))
        return BankSpec(None, tuple(sorted(items)))
    if not isinstance(value, str):
        check_value(value, what)
        return BankSpec(value)
    default: BankValue | None = None
    seen_default = False
    per: dict[int, BankValue | None] = {}
    for item in (i for i in value.split(",") if i.strip()):
        if ":" not in item:
            if seen_default:
                raise UsageError(
                    f"{what}: two sizes for every section in {value!r}; give one default and per-section "
                    "sizes as SECTION:SIZE, e.g. 0.5,4:0.25"
                )
            seen_default = True
            default = parse_value(item, what)
            continue
        sec, _, v = item.partition(":")
        try:
            k = int(sec)
        except ValueError:
            raise UsageError(
                f"{what}: {sec!r} is not a section number (in {value!r}; sections are 1, 2, ...)"
            ) from None
        if k in per:
            raise UsageError(f"{what}: section {k} is given twice in {value!r}")
        per[k] = parse_value(v, f"{what} of section {k}")
    if default is None and not per:
        raise UsageError(f"{what} is empty; give e.g. 0.25, 64 or 1:1.0,2:0.5")
    return BankSpec(default, tuple(sorted(per.items())))


def rank_limit(site: ConvSite, members: int) -> int:
    """The most filters a group can use: the rank of its stacked kernels, min(members x C_out, C_in x kh x kw)."""
    co, ci, kh, kw = site.weight_shape
    return min(members * co, ci * kh * kw)


def filters_for(value: BankValue, site: ConvSite) -> int:
    """Filters for ``value``: an integer as it is, a fraction of C_out rounded (at least 1)."""
    return value if isinstance(value, int) else max(1, round(value * site.out_channels))


def resolve_rank(value: BankValue, site: ConvSite, members: int, what: str = "bank size") -> int:
    """Filters k for ``value`` (an integer, or a fraction of the members' C_out) in a group of ``members``.

    Raises:
        UsageError: k above what the group can use: the rank of its stacked kernels,
            min(members x C_out, C_in x kh x kw). (Planning clamps fractions to that limit
            instead, with a note: one fraction serves groups of many shapes.)
    """
    co, ci, kh, kw = site.weight_shape
    k = filters_for(value, site)
    limit = rank_limit(site, members)
    if k > limit:
        raise UsageError(
            f"{what} {value} means {k} filters for {site.name} and the {members - 1} other conv(s) of its group, "
            f"above the {limit} the group can use (min(members x C_out, C_in x kh x kw) = "
            f"min({members} x {co}, {ci * kh * kw})); give at most {limit} or a fraction <= {limit / co:g}"
        )
    return k


def bank_params(site: ConvSite, members: int, k: int) -> int:
    """Parameters a bank of ``k`` filters costs for ``members`` convs shaped like ``site``."""
    co, ci, kh, kw = site.weight_shape
    return k * ci * kh * kw + members * co * k


def merged_is_cheaper(c_out: int, d: int, k: int) -> bool:
    """A bank member's one rule of inference: the merged kernel ``coeff @ B`` (C_out x d MACs per output
    position, d = C_in·kh·kw) when that costs no more than the bank conv then its 1x1 (k·d + C_out·k)."""
    return c_out * d <= k * d + c_out * k


def bank_macs(c_out: int, d: int, k: int) -> int:
    """MACs per output position of a bank member (or low-rank layer) on the path inference takes."""
    return c_out * d if merged_is_cheaper(c_out, d, k) else k * d + c_out * k


def factorizable(site: ConvSite) -> bool:
    """Convs a low-rank factorisation can replace: dense (groups=1), not fed by the image."""
    return site.groups == 1 and not site.fed_by_input and not site.reused


def check_sections(spec: BankSpec, n_sections: int, what: str = "bank size") -> None:
    """Every section named in ``spec`` exists.

    Raises:
        UsageError: a section outside 1..n_sections.
    """
    for k in spec.sections():
        if not 1 <= k <= n_sections:
            raise UsageError(
                f"{what}: section {k} has no group to give a bank; this network has {n_sections} section(s) "
                f"where two or more convs of one configuration can share, numbered 1..{n_sections} (see them "
                "with «dry-run»); a conv that shares with nothing can be factorised instead "
                "(«factorize-unshared»)"
            )


def bankable(members: Sequence[ConvSite]) -> bool:
    """A share group can become a bank when its convs are dense and of one shape."""
    return all(s.groups == 1 and s.weight_shape == members[0].weight_shape for s in members)
