"""Plans: which convs share which anchored kernel, where regulators go, and what it costs.

A :class:`Plan` is frozen, JSON-serialisable data. It can be printed (``--dry-run``),
stored in a checkpoint and re-applied by :func:`dacnn_convert.load`. Its parameter
arithmetic is exact, so the size of a conversion is known before any weight moves.

Modes (paper section 3, "Weights Sharing" and "Mixed Architecture"):

* ``mix`` — per spatial stage (output resolution), convs of identical configuration
  share one kernel; a group needs two or more members. Expansion convs and 1x1
  projections stay free because their configuration is unique in their stage.
* ``plain`` — one master kernel for the whole network. The paper uses a constant
  width C; we generalise to networks whose width changes: the master is sized to
  the largest 3x3 conv and every 3x3 conv (groups=1) uses its leading slice
  ``W[:c_out, :c_in]``. The conv fed by the image stays free (the paper's eq. 2).
* ``sharesnet`` — only the second conv of each residual block is shared per stage
  (Boulch 2017).
* ``bank`` — the groups of ``mix``, each sharing a bank of k filters with a free 1x1
  coefficient conv per member (see :mod:`dacnn_convert.core.banks`); ``bank_size`` sets k.
* ``none`` — nothing shared (a baseline that round-trips through the tool).

With any mode, ``factorize_unshared`` replaces each conv that shares with nothing by a
low-rank pair (a bank of one member).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Literal, cast

from torch import nn

from .. import validate
from ..defaults import DEFAULT_INPUT_SIZE, REGULATOR_INIT
from ..errors import PlanError, UsageError, choose, suggest
from ..names import INITS, REGULATOR_STYLES
from ..registry import Registry
from .banks import (
    BankSize,
    BankValue,
    bank_params,
    bankable,
    check_sections,
    check_value,
    factorizable,
    filters_for,
    parse_bank_size,
    rank_limit,
    resolve_rank,
)
from .graph import ConvSite, analyze
from .plan import REGULATOR_INITS, Group, Plan, RegulatorSpec, count_params

MODES: Registry[Callable[[list[ConvSite]], list[list[ConvSite]]]] = Registry("mode")
register_mode = MODES.register  # decorator: a grouping policy under a name

# The names a type checker knows (tests/test_convert.py keeps them equal to the registries)
ModeName = Literal["mix", "plain", "sharesnet", "bank", "none"]
InitName = Literal["fit", "act", "act-seq", "mean", "first", "random", "none"]
RegulatorStyleName = Literal["adapter", "paper"]


def _candidates(sites: list[ConvSite]) -> list[ConvSite]:
    """Convs a mode may group: the paper's modes share conv kernels; Linears enter by banks and low rank."""
    return [s for s in sites if not s.reused and s.layer == "conv"]


def _by_key(sites: list[ConvSite], key: Callable[[ConvSite], Any]) -> list[list[ConvSite]]:
    buckets: dict[Any, list[ConvSite]] = {}
    for s in sites:
        buckets.setdefault(key(s), []).append(s)
    return [b for b in buckets.values() if len(b) >= 2]


@register_mode("mix")
def _mix(sites: list[ConvSite]) -> list[list[ConvSite]]:
    return _by_key(_candidates(sites), lambda s: (s.out_size, s.config))


@register_mode("bank")
def _bank(sites: list[ConvSite]) -> list[list[ConvSite]]:
    return _mix(sites) + linear_groups(sites)  # make_plan turns them into banks


def linear_groups(sites: Sequence[ConvSite]) -> list[list[ConvSite]]:
    """Linears that can share a bank: two or more of one shape, bias and positions (Basis Sharing).

    The MLPs of a ConvNeXt stage (fc1s with fc1s, fc2s with fc2s); a classifier's Linears differ in
    shape and are factorised one by one instead. Only banks share Linears: a sliced anchor would
    need every member's full output, which is what a bank's coefficients give. A layer producing the
    model's outputs shares with none (two same-shape heads, DeiT's ``head``/``head_dist``): a shared bank
    would bound the logits' rank.
    """
    linears = [s for s in sites if s.layer == "linear" and not s.reused and not s.fed_by_input and not s.feeds_output]
    return _by_key(linears, lambda s: (s.out_size, s.weight_shape, s.bias))


def named_groups(
    sites: Sequence[ConvSite], share: Sequence[str], groups: Sequence[list[ConvSite]] = ()
) -> list[list[ConvSite]]:
    """``groups`` with the user's named share groups added (each taken out of the groups it was in).

    Each entry of ``share`` is one group: comma-separated module names or shell patterns
    (``"stages.1.*.mlp.fc1"``) of the convs and nn.Linears the traced forward pass calls. A group's members must
    have one weight shape and output size (a bank serves the same-shape layers of a stage) and be dense; the
    layer producing the model's outputs, a layer the model already calls twice and a layer named in two groups
    are refused.

    Raises:
        UsageError: a pattern that matches nothing, a group of one layer (no partner), members of different
            shapes or stages, a grouped or depthwise conv, the logits layer, a layer in two groups.
    """
    names = [s.name for s in sites]
    taken: dict[str, int] = {}
    named: list[list[ConvSite]] = []
    for g, entry in enumerate(share):
        members: list[ConvSite] = []
        for pattern in (p.strip() for p in entry.split(",") if p.strip()):
            hit = [s for s in sites if fnmatch.fnmatchcase(s.name, pattern)]
            if not hit:
                raise UsageError(
                    f"«share» names {pattern!r}, which matches no nn.Conv2d or nn.Linear of the traced forward "
                    f"pass.{suggest(pattern, names) or ' Its layers: ' + ', '.join(names[:6]) + ' ...'}"
                )
            members += [s for s in hit if s not in members]
        for s in members:
            why = (
                "produces the model's outputs: a shared bank would bound the logits' rank"
                if s.feeds_output
                else "is called more than once by the model: it is shared already"
                if s.reused
                else f"is a grouped or depthwise conv (groups={s.groups}): a bank's filters span every input channel"
                if s.layer == "conv" and s.groups != 1
                else f"group {taken[s.name] + 1} of «share» names too"
                if s.name in taken
                else None
            )
            if why:
                raise UsageError(f"«share» names {s.name}, which {why}")
            taken[s.name] = g
        if len(members) < 2:
            s = members[0]
            like = [t.name for t in sites if t is not s and _key(t) == _key(s) and not t.feeds_output and not t.reused]
            raise UsageError(
                f"«share» names only {s.name} ({_shape(s)}): a bank needs a partner of its shape in its stage ("
                + (f"there: {', '.join(like[:4])}{' ...' if len(like) > 4 else ''}" if like else "it has none")
                + "); name one, or leave it to «factorize-unshared», which factorises every layer sharing nothing"
            )
        odd = next((s for s in members if _key(s) != _key(members[0])), None)
        if odd is not None:
            first = members[0]
            raise UsageError(
                f"«share» groups layers of different shapes or stages: {first.name} "
                f"({_shape(first)}) and {odd.name} "
                f"({_shape(odd)}); a bank serves "
                "layers of one shape in one stage (the planner's «share-across» merges banks across stages)"
            )
        named.append(members)
    rest = [[s for s in g if s.name not in taken] for g in groups]
    return [g for g in rest if len(g) >= 2] + named


def _key(s: ConvSite) -> tuple[Any, ...]:
    """What the members of a named bank must share: layer kind, weight shape, output size, dense."""
    return (s.layer, s.weight_shape, s.out_size, s.groups)


def _shape(s: ConvSite) -> str:
    """A layer's shape and stage in words: ``Linear 8->16 at 16x16``, ``conv 16x8x3x3 at 8x8``."""
    co, ci, kh, kw = s.weight_shape
    what = f"Linear {ci}->{co}" if s.layer == "linear" else f"conv {co}x{ci}x{kh}x{kw}"
    return f"{what} at {s.out_size[0]}x{s.out_size[1]}"


@register_mode("sharesnet")
def _sharesnet(sites: list[ConvSite]) -> list[list[ConvSite]]:
    second = [s for s in _candidates(sites) if s.block is not None and s.depth_in_block == 2]
    return _by_key(second, lambda s: (s.out_size, s.config))


@register_mode("plain")
def _plain(sites: list[ConvSite]) -> list[list[ConvSite]]:
    members = [
        s
        for s in _candidates(sites)
        if s.kernel_size == (3, 3) and s.groups == 1 and not s.fed_by_input and s.padding_mode == "zeros"
    ]
    return [members] if len(members) >= 2 else []


@register_mode("none")
def _none(sites: list[ConvSite]) -> list[list[ConvSite]]:
    return []


def _untie(model: nn.Module, sites: list[ConvSite], notes: list[str]) -> list[ConvSite]:
    """Refuse convs whose kernel another parameter shares; leave tied Linears out of the plan.

    A plan counts each layer's weight once and conversion replaces it; a conv tied to another
    conv or module would be counted twice or emptied under the other. A Linear tied elsewhere
    (a head tied to an embedding) is left as it is, with a note.
    """
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(p.data_ptr(), []).append(f"{name}.{pname}" if name else pname)
    kept = []
    for s in sites:
        weight = cast(nn.Conv2d, model.get_submodule(s.name)).weight
        others = sorted({o for o in owners.get(weight.data_ptr(), []) if o != f"{s.name}.weight"})
        if not others:
            kept.append(s)
        elif s.layer == "linear":
            notes.append(f"{s.name} stays as it is: its weight is tied to {others[0]}")
        else:
            raise PlanError(
                f"{others[0].rsplit('.', 1)[0]} and {s.name} share one weight tensor (tied in the model), and a plan "
                "assumes each conv owns its kernel. Untie them first (conv.weight = "
                "nn.Parameter(conv.weight.detach().clone())), or make the module that ties them a leaf module so "
                "that it is left as it is"
            )
    return kept


def parse_regulators(value: str | Sequence[int] | None, n_sections: int) -> tuple[int, ...]:
    """``none`` / ``all`` / ``1,3`` (1-based sections) to a tuple of section indices.

    Raises:
        UsageError: a section index is not an integer or outside ``1..n_sections``.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return ()
    if isinstance(value, str) and value.strip().lower() == "all":
        return tuple(range(1, n_sections + 1))
    try:
        items = [int(v) for v in value.split(",")] if isinstance(value, str) else [int(v) for v in value]
    except ValueError as exc:
        raise UsageError(f"regulators takes none, all or section numbers like 1,3; got {value!r}") from exc
    bad = [i for i in items if not 1 <= i <= n_sections]
    if bad:
        raise UsageError(
            f"regulator section {bad[0]} is out of range: this network has {n_sections} anchored "
            f"section(s), numbered 1..{n_sections} (the plan lists them)"
        )
    return tuple(sorted(set(items)))


def make_plan(
    model: nn.Module,
    mode: ModeName = "mix",
    regulators: str | Sequence[int] | None = "none",
    regulator_style: RegulatorStyleName = "adapter",
    init: InitName = "fit",
    input_size: tuple[int, int, int] = DEFAULT_INPUT_SIZE,
    leaf_modules: Sequence[type[nn.Module]] = (),
    *,
    bank_size: BankSize = 0.5,
    factorize_unshared: BankValue | None = None,
    regulator_init: str | None = None,
    share: Sequence[str] = (),
) -> Plan:
    """Analyse ``model`` and decide what to share; the model is not modified.

    Args:
        model: the network to convert.
        mode: ``mix``, ``plain``, ``bank``, ``sharesnet`` or ``none`` (see module docstring).
        regulators: ``none``, ``all`` or 1-based section numbers (``"1,3"`` or ``[1, 3]``).
        regulator_style: ``adapter`` (parallel, zero-initialised: the function is
            unchanged at step 0) or ``paper`` (in series after the anchored conv).
        init: how :func:`apply` initialises anchors: ``fit``, ``act`` or ``act-seq`` (need
            calibration data), ``mean``, ``first``, ``random``.
        input_size: (C, H, W) of one example, used for shape propagation.
        leaf_modules: module types fx must not trace into.
        bank_size: for ``mode="bank"``, filters per bank: an integer k, a fraction of C_out
            (``0.25``), or per section (``"1:1.0,2:0.5,4:0.125"``, ``{1: 1.0, 4: 0.125}``);
            sections given no size stay free.
        regulator_init: how adapter regulators start: ``fit`` (least squares to each member's
            residual, on its calibration inputs with a data-aware init, else in weight space) or
            ``zero`` (add nothing); None: :data:`dacnn_convert.defaults.REGULATOR_INIT`.
        factorize_unshared: rank (an integer, or a fraction of C_out) of a low-rank
            factorisation for every conv and nn.Linear that shares with nothing in ``mode`` (not
            the layer fed by the image); None keeps them dense.
        share: share groups the user names (:func:`named_groups`), each a bank of ``bank_size`` filters; with
            ``mode="bank"`` added to the mode's banks, with ``mode="none"`` the only ones.

    Raises:
        UsageError: unknown mode, init, style, a regulator or bank section out of range,
            a bank size that is not positive or above what its group can use.
        TraceError, PlanError: the model cannot be traced or run on ``input_size``.
    """
    mode = cast(ModeName, choose("mode", mode, MODES))  # a str from the CLI or a recipe is checked here
    init = cast(InitName, choose("init", init, INITS))
    regulator_style = cast(RegulatorStyleName, choose("regulator style", regulator_style, REGULATOR_STYLES))
    regulator_init = choose(
        "regulator init", REGULATOR_INIT if regulator_init is None else regulator_init, REGULATOR_INITS
    )
    sites = analyze(model, input_size, leaf_modules)
    notes: list[str] = []
    if not any(s.layer == "conv" for s in sites) and factorize_unshared is None:
        linears = sum(s.layer == "linear" for s in sites)
        raise PlanError(
            f"{type(model).__name__} has no nn.Conv2d in its traced forward pass: nothing to anchor "
            "(convs inside leaf modules and subclasses such as timm's Conv2dSame are not converted)"
            + (f"; its {linears} nn.Linear layer(s) can be factorised with «factorize-unshared»" if linears else "")
        )
    sites = _untie(model, sites, notes)
    groups_sites = MODES[mode](sites)
    share = validate.share_groups(share)
    named: list[list[ConvSite]] = []
    if share:
        if mode not in ("bank", "none"):
            raise UsageError(
                f"«share» names banks: use it with «mode» bank (the mode's banks too) or none (only these), not {mode}"
            )
        groups_sites = named_groups(sites, share, groups_sites)
        named = groups_sites[len(groups_sites) - len(share) :]
    resolutions = sorted(
        {s.out_size for g in groups_sites for s in g},
        key=lambda r: (-r[0] * r[1], next(s.order for g in groups_sites for s in g if s.out_size == r)),
    )
    section_of = {r: i + 1 for i, r in enumerate(resolutions)}
    groups = []
    shared = [list(g) for g in groups_sites]
    if mode == "bank" or share:
        groups += _banks(groups_sites, parse_bank_size(bank_size), section_of, notes, named)
        groups_sites = []  # every share group became a bank or stays free
    for i, members in enumerate(groups_sites):
        co = max(s.weight_shape[0] for s in members)
        ci = max(s.weight_shape[1] for s in members)
        kh, kw = members[0].kernel_size
        res = {s.out_size for s in members}
        resolution = next(iter(res)) if len(res) == 1 else None
        # named by section, not resolution: the same model converted at 32 or 224 px gets the
        # same state-dict keys (files with the older "8px" names still load: their plan names them)
        where = f"s{section_of[resolution]}" if resolution else "all"
        groups.append(
            Group(
                name=f"g{i}_{where}_{co}x{ci}x{kh}x{kw}",
                members=tuple(s.name for s in members),
                shape=(co, ci, kh, kw),
                resolution=resolution,
                sections=tuple(sorted({section_of[s.out_size] for s in members})),
            )
        )
    if factorize_unshared is not None:
        grouped = {s.name for g in shared for s in g}  # the mode's groups and the named ones
        groups += _low_rank([s for s in sites if s.name not in grouped], factorize_unshared, section_of, notes)
    if not groups:
        notes.append(f"no two convs can share a kernel in mode {mode!r}: the model is unchanged (ratio 1.0)")
    chosen = parse_regulators(regulators, len(resolutions))
    regs = _place_regulators(sites, groups, section_of, chosen, regulator_style, notes)
    return Plan(
        mode="bank" if share else mode,  # mode none with named banks: the plan's groups are banks
        init=init,
        regulator_style=regulator_style,
        input_size=(input_size[0], input_size[1], input_size[2]),
        sites=tuple(sites),
        groups=tuple(groups),
        regulators=tuple(regs),
        params_before=count_params(model),
        sections=tuple(resolutions),
        notes=tuple(notes),
        regulator_init=regulator_init,
    )


def _banks(
    groups_sites: list[list[ConvSite]],
    spec: Any,
    section_of: dict[tuple[int, int], int],
    notes: list[str],
    named: Sequence[list[ConvSite]] = (),
) -> list[Group]:
    """A bank :class:`Group` per share group whose section has a size (a group the user named must have one).

    Raises:
        UsageError: a named group (``named``) in a section without a bank size.
    """
    check_sections(spec, len(section_of))  # every section holds a group: sections are where groups are
    for k in spec.sections():
        here = [members for members in groups_sites if section_of[members[0].out_size] == k]
        if spec.value(k) is not None and not any(bankable(m) for m in here):
            first = here[0][0]
            raise UsageError(
                f"bank size: section {k} holds only grouped or depthwise convs ({first.name}, groups="
                f"{first.groups}, and {sum(len(m) for m in here) - 1} other(s)), which a bank cannot share: "
                "a bank's filters span every input channel. They stay free (or share one kernel in mode mix); "
                f"leave section {k} out of «bank-size»"
            )
    out: list[Group] = []
    for members in groups_sites:
        section = section_of[members[0].out_size]
        value = spec.value(section)
        if value is None and any(members is g for g in named):
            raise UsageError(
                f"«share» names a bank of {', '.join(s.name for s in members)} in section {section}, which "
                f"«bank-size» gives no size: add {section}:0.25 (or a bare default) to «bank-size»"
            )
        if value is None:
            continue
        if not bankable(members):
            notes.append(
                f"{members[0].name} and {len(members) - 1} other(s) stay free: a bank needs dense convs (groups=1)"
            )
            continue
        limit = rank_limit(members[0], len(members))
        if isinstance(value, float) and filters_for(value, members[0]) > limit:
            # one fraction serves groups of many shapes in a section (bottleneck 1x1s): give this one all it can use
            notes.append(
                f"{members[0].name} and {len(members) - 1} other(s): bank size {value} clamped to the "
                f"{limit} filters the group can use"
            )
            k = limit
        else:
            k = resolve_rank(value, members[0], len(members))
        out.append(bank_group(members, k, section, len(out)))
    return out


def bank_group(members: Sequence[ConvSite], k: int, section: int | None, index: int | str) -> Group:
    """The :class:`Group` of a bank of ``k`` filters for ``members`` (one member: a low-rank conv)."""
    _, ci, kh, kw = members[0].weight_shape
    name = (
        f"lr_{members[0].name.replace('.', '_')}"
        if len(members) == 1
        else f"g{index}_s{section}_bank{k}x{ci}x{kh}x{kw}"
    )
    return Group(
        name,
        tuple(s.name for s in members),
        (k, ci, kh, kw),
        members[0].out_size,
        (section,) if section else (),
        "bank",
    )


def _low_rank(
    sites: list[ConvSite], value: BankValue, section_of: dict[tuple[int, int], int], notes: list[str]
) -> list[Group]:
    """A one-member bank (a low-rank pair) for each conv in ``sites`` that it makes smaller.

    The rank is clamped to each conv's own limit, min(C_out, C_in x kh x kw): one rank or
    fraction serves convs of many shapes, and a conv at its limit stays dense anyway. The layer that
    produces the model's outputs stays dense: its rank would bound the logits' (as pruning keeps
    classifier heads whole).
    """
    check_value(value, "factorize_unshared rank")
    out = []
    for s in sites:
        if not factorizable(s):
            continue
        if s.feeds_output:
            notes.append(f"{s.name} stays dense: it produces the model's outputs, whose rank it would bound")
            continue
        r = min(filters_for(value, s), rank_limit(s, 1))
        if bank_params(s, 1, r) >= s.weight_numel:
            notes.append(
                f"{s.name} stays dense: rank {r} would not make it smaller ({bank_params(s, 1, r):,} >= "
                f"{s.weight_numel:,})"
            )
            continue
        out.append(bank_group([s], r, section_of.get(s.out_size), 0))
    if not out:
        notes.append("factorize_unshared: no conv that shares with nothing can be factorised smaller; nothing changed")
    return out


def _place_regulators(
    sites: list[ConvSite],
    groups: list[Group],
    section_of: dict[tuple[int, int], int],
    chosen: tuple[int, ...],
    style: str,
    notes: list[str],
) -> list[RegulatorSpec]:
    """One regulator per residual block (on its last anchored conv), or per anchored conv outside blocks."""
    anchored = {m for g in groups if len(g.members) > 1 for m in g.members}  # not low-rank single convs
    hosts: dict[str, ConvSite] = {}
    for s in sites:  # execution order: a later conv in the same block replaces the earlier host
        if s.name not in anchored or s.layer != "conv" or section_of.get(s.out_size) not in chosen:
            continue
        if style == "adapter" and not _one_by_one_fits(s):
            notes.append(f"no adapter regulator on {s.name}: a 1x1 conv cannot match its output size")
            continue
        hosts[s.block if s.block is not None else s.name] = s
    regs = []
    for s in sorted(hosts.values(), key=lambda s: s.order):
        in_ch, stride = (s.in_channels, s.stride) if style == "adapter" else (s.out_channels, (1, 1))
        regs.append(RegulatorSpec(s.name, in_ch, s.out_channels, stride, section_of[s.out_size]))
    return regs


def _one_by_one_fits(s: ConvSite) -> bool:
    """Does a 1x1 conv with the host's stride give the host's output size?"""
    return all((size - 1) // st + 1 == out for size, st, out in zip(s.in_size, s.stride, s.out_size, strict=True))


def with_low_rank(plan: Plan, value: BankValue) -> Plan:
    """``plan`` (made with mode ``none``) with every factorisable conv low-rank at ``value``; no re-tracing.

    For searches over the rank (the ``lowrank`` baseline bisects it): the graph analysis is the
    expensive part of :func:`make_plan` and does not depend on the rank.
    """
    if plan.groups:
        raise PlanError("with_low_rank takes a plan of mode 'none' (nothing shared yet)")
    notes: list[str] = []
    section_of = {(r[0], r[1]): k for k, r in enumerate(plan.sections, start=1)}
    return replace(plan, groups=tuple(_low_rank(list(plan.sites), value, section_of, notes)), notes=tuple(notes))
