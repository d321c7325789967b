"""The plan as data: frozen, printable, JSON-serialisable groups, regulators and their arithmetic.

Made by :mod:`dacnn_convert.core.planning` (or the budget search), applied by
:mod:`dacnn_convert.core.convert`, stored in every checkpoint and re-applied by ``load()``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..errors import PlanError, UsageError
from ..names import REGULATOR_INITS  # how adapter regulators start (Plan.regulator_init)
from .banks import bank_macs
from .graph import ConvSite
from .pruning import Pruning

# One example of a recorded input size: 3x8192x8192 fits; a tampered 3x100000x100000 would ask for 120 GB.
MAX_EXAMPLE_NUMEL = 3 * 8192 * 8192

GROUP_KINDS = ("anchor", "bank")


@dataclass(frozen=True)
class Group:
    """One anchored tensor and the convs that use it.

    ``kind="anchor"``: members use the leading slice ``W[:c_out, :c_in]`` of one kernel.
    ``kind="bank"``: ``shape`` is (k, C_in, kh, kw), k shared filters; each member adds its
    own 1x1 coefficient conv (C_out x k). A bank with one member is a low-rank conv.
    """

    name: str  # parameter name inside the model's ``dacnn_anchors`` module
    members: tuple[str, ...]
    shape: tuple[int, int, int, int]  # the anchor's shape; members use its leading slice
    resolution: tuple[int, int] | None  # output (H, W) of the stage, None for network-wide
    sections: tuple[int, ...]  # 1-based sections its members live in
    kind: str = "anchor"

    def __post_init__(self) -> None:
        if self.kind not in GROUP_KINDS:
            raise PlanError(f"group {self.name!r} has kind {self.kind!r}; expected one of: {', '.join(GROUP_KINDS)}")

    @property
    def rank(self) -> int:
        """Filters in a bank (its first dimension)."""
        return self.shape[0]


@dataclass(frozen=True)
class RegulatorSpec:
    """A regulator (1x1 conv + BN [+ ReLU]) attached to one anchored conv (paper section 3)."""

    host: str
    in_channels: int
    out_channels: int
    stride: tuple[int, int]
    section: int

    @property
    def params(self) -> int:
        return self.in_channels * self.out_channels + 2 * self.out_channels


@dataclass(frozen=True)
class Plan:
    """Everything a conversion will do, as data."""

    mode: str
    init: str
    regulator_style: str
    input_size: tuple[int, int, int]
    sites: tuple[ConvSite, ...]
    groups: tuple[Group, ...]
    regulators: tuple[RegulatorSpec, ...]
    params_before: int  # unique parameters of the original model
    sections: tuple[tuple[int, int], ...]  # output resolution of each 1-based section
    notes: tuple[str, ...] = field(default_factory=tuple)
    # adapter regulators: "zero" (add nothing at conversion) or "fit" (least squares to the member's
    # residual, core.fitting.fit_adapter); plans saved before this field existed were "zero"
    regulator_init: str = "zero"
    # channel pruning applied to the model before anything is shared; ``sites`` are then the pruned
    # model's layers and ``params_before`` stays the original's (None: nothing pruned; not serialised)
    prune: Pruning | None = None

    def __post_init__(self) -> None:
        if self.regulator_init not in REGULATOR_INITS:
            raise PlanError(f"regulator_init must be one of {', '.join(REGULATOR_INITS)}, got {self.regulator_init!r}")

    # -- lookups ---------------------------------------------------------------
    def site(self, name: str) -> ConvSite:
        """The conv called ``name``; raises PlanError naming the valid convs otherwise."""
        for s in self.sites:
            if s.name == name:
                return s
        raise PlanError(f"no conv {name!r} in this plan; convs: {', '.join(s.name for s in self.sites)}")

    def group_of(self, name: str) -> Group | None:
        return next((g for g in self.groups if name in g.members), None)

    def stage_outputs(self) -> list[str]:
        """Per section, the module whose output ends it (the BN after its last conv, else the conv).

        Names are the same in the original and the converted model, so these match teacher
        and student features stage by stage (for feature distillation).
        """
        names = []
        for res in self.sections:
            convs = [s for s in self.sites if s.out_size == tuple(res) and s.layer == "conv"]
            if convs:  # a section of Linears alone (a classifier head) is no stage
                last = max(convs, key=lambda s: s.order)
                names.append(last.bn or last.name)
        return names

    # -- arithmetic ------------------------------------------------------------
    @property
    def conv_params_before(self) -> int:
        return sum(s.weight_numel for s in self.sites)

    @property
    def saved_params(self) -> int:
        """Kernel parameters removed by sharing: members' kernels minus one anchor each."""
        return sum(sum(self.site(m).weight_numel for m in g.members) - self.group_params(g) for g in self.groups)

    def group_params(self, group: Group) -> int:
        """Parameters a group stores: its anchor, plus every member's 1x1 coefficients for a bank."""
        co, ci, kh, kw = group.shape
        coeff = sum(self.site(m).out_channels for m in group.members) * co if group.kind == "bank" else 0
        return co * ci * kh * kw + coeff

    @property
    def regulator_params(self) -> int:
        return sum(r.params for r in self.regulators)

    def has_scale(self, name: str) -> bool:
        """A ``fit``-initialised member with no BatchNorm to fold into keeps its own channel scales."""
        g = self.group_of(name)
        return (
            self.init in ("fit", "act", "act-seq")
            and g is not None
            and g.kind == "anchor"
            and self.site(name).bn is None
        )

    @property
    def scale_params(self) -> int:
        return sum(self.site(m).out_channels for g in self.groups for m in g.members if self.has_scale(m))

    @property
    def params_after(self) -> int:
        """Unique parameters of the converted model: exact, no model needs to be built."""
        pruned = self.prune.params_saved if self.prune is not None else 0
        return self.params_before - pruned - self.saved_params + self.regulator_params + self.scale_params

    @property
    def conv_params_after(self) -> int:
        return self.conv_params_before - self.saved_params

    @property
    def macs_saved(self) -> int:
        """Multiply-accumulates per example the conversion removes, minus what its regulators add: exact
        arithmetic of the path inference takes, known before any weight moves. A member of a bank (or a
        low-rank conv) costs k·d + C_out·k per output position (d = C_in·kh·kw) for the bank conv and its
        1x1, or C_out·d with the merged kernel where that is no dearer (as the layers decide); a slice of an
        anchor costs what the conv did; a regulator adds its 1x1 at the host's output positions. So
        ``count_macs(converted) == count_macs(original) - plan.macs_saved`` (tests/test_macs.py); a plan that
        prunes first adds what the pruning removed (:attr:`Pruning.macs_saved`)."""
        saved = self.prune.macs_saved if self.prune is not None else 0
        for g in self.groups:
            if g.kind != "bank":
                continue
            k = g.shape[0]
            for m in g.members:
                site = self.site(m)
                co, ci, kh, kw = site.weight_shape
                d = ci * kh * kw
                saved += (co * d - bank_macs(co, d, k)) * site.out_size[0] * site.out_size[1]
        for r in self.regulators:
            h, w = self.site(r.host).out_size
            saved -= r.in_channels * r.out_channels * h * w
        return saved

    # -- serialisation ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.prune is None:  # files of plans that prune nothing stay as they were
            del data["prune"]
        elif not self.prune.layers:  # and those that prune every layer alike
            del data["prune"]["layers"], data["prune"]["sections"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Rebuild a plan from :meth:`to_dict` output; raises PlanError on malformed data."""
        size = data.get("input_size") if isinstance(data, dict) else None
        if (
            not isinstance(size, list | tuple)
            or len(size) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in size)
            or size[0] * size[1] * size[2] > MAX_EXAMPLE_NUMEL
        ):
            raise PlanError(
                f"malformed conversion plan: input_size {size!r} is not three positive sizes of at most "
                f"{MAX_EXAMPLE_NUMEL:,} values in all (C, H, W)"
            )
        try:
            return cls(
                mode=str(data["mode"]),
                init=str(data["init"]),
                regulator_style=str(data["regulator_style"]),
                input_size=tuple(data["input_size"]),
                sites=tuple(ConvSite.from_dict(s) for s in data["sites"]),
                groups=tuple(
                    Group(
                        name=str(g["name"]),
                        members=tuple(g["members"]),
                        shape=tuple(g["shape"]),
                        resolution=tuple(g["resolution"]) if g["resolution"] is not None else None,
                        sections=tuple(g["sections"]),
                        kind=str(g.get("kind", "anchor")),
                    )
                    for g in data["groups"]
                ),
                regulators=tuple(
                    RegulatorSpec(
                        host=str(r["host"]),
                        in_channels=int(r["in_channels"]),
                        out_channels=int(r["out_channels"]),
                        stride=tuple(r["stride"]),
                        section=int(r["section"]),
                    )
                    for r in data["regulators"]
                ),
                params_before=int(data["params_before"]),
                sections=tuple(tuple(s) for s in data["sections"]),
                notes=tuple(data.get("notes", ())),
                regulator_init=str(data.get("regulator_init", "zero")),
                prune=_pruning(data.get("prune")),
            )
        except (KeyError, TypeError, ValueError, UsageError) as exc:
            raise PlanError(f"malformed conversion plan ({type(exc).__name__}: {exc})") from exc

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise PlanError(f"conversion plan is not valid JSON: {exc}") from exc


def _pruning(data: Any) -> Pruning | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise TypeError(f"prune must be an object, got {type(data).__name__}")
    counts = [data.get("params_saved", 0), data.get("macs_saved", 0)]
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in counts):
        raise TypeError(f"prune's counts must be integers, got {counts!r}")
    layers = data.get("layers", [])
    if not isinstance(layers, list) or not all(
        isinstance(e, list | tuple) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], int | float)
        for e in layers
    ):
        raise TypeError(f"prune's layers must be [name, ratio] pairs, got {layers!r}")
    sections = data.get("sections", [])
    if not isinstance(sections, list) or not all(isinstance(r, int | float) for r in sections):
        raise TypeError(f"prune's sections must be ratios, got {sections!r}")
    return Pruning(
        float(data["ratio"]),
        str(data.get("importance", "group")),
        params_saved=counts[0],
        macs_saved=counts[1],
        layers=tuple((n, float(r)) for n, r in layers),
        sections=tuple(float(r) for r in sections),
    )


def count_params(model: nn.Module) -> int:
    """Number of parameters counting each shared tensor once (by storage).

    Raises:
        UsageError: ``model`` is not an ``nn.Module``.
    """
    from .. import validate

    validate.module("model", model)
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    total = 0
    for p in model.parameters():
        key = (p.data_ptr(), p.numel(), tuple(p.shape))
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total
