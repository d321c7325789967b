"""The paper's own architectures, built from scratch (section 3, "Implementation details").

Plain DACNN-L: a 3x128x3x3 stem, then one shared 128x128x3x3 kernel for every other conv;
each conv is followed by its own (free) BatchNorm and a ReLU. Depth L counts weighted layers
(convs + the classifier), as VGG/ResNet names do:

- L <= 17, non-residual: L-1 convs in up to 4 sections split by 2x2 max-pooling
  (conv counts as even as possible, later sections taking the remainder).
- L > 17, residual: stem + basic blocks of two shared convs in 4 sections (ResNet layouts
  18: 2-2-2-2, 24: 2-3-4-2, 34: 3-4-6-3), 2x2 max-pooling between sections.

Mixed DACNN: channels 3 -> 64 -> 128 -> 256 -> 512; per section one free expansion conv
(the first conv of the section) and one kernel shared by all its other convs; residual nets
add a free 1x1 projection (+ BN) on the shortcut where the channels change.

Regulators (residual nets): one per residual block in the chosen sections, 1x1 conv + BN +
ReLU with free weights, after the block's first conv (it regulates a shared conv's output).

``shared=False`` builds the same network with every kernel free (Table 2, parentheses);
``bn=False`` drops every BatchNorm (Table 1); ``shared_bn=True`` ties the affine parameters (gamma, beta) of the
BatchNorms after the convs that read one kernel, each keeping its own running statistics (the paper's claim that
free BN is what makes a shared kernel work, checked from the other side). CIFAR-style head: global average pool +
one FC.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UsageError
from .layers import BANK_NAME, AnchorBank, AnchoredConv2d
from .planning import parse_regulators

LAYOUTS = {18: (2, 2, 2, 2), 24: (2, 3, 4, 2), 34: (3, 4, 6, 3)}
MIX_CHANNELS = (64, 128, 256, 512)
PLAIN_WIDTH = 128
VARIANTS = ("plain", "mix")


@dataclass(frozen=True)
class DacnnConfig:
    """Everything that defines a DACNN; ``name`` is its spelling as a model source."""

    depth: int = 18
    variant: str = "plain"
    regulators: tuple[int, ...] = ()
    shared: bool = True
    bn: bool = True
    num_classes: int = 100
    shared_bn: bool = False
    width: int = PLAIN_WIDTH
    layout: tuple[int, ...] = field(default=(), compare=False)

    @property
    def residual(self) -> bool:
        return self.depth > 17

    @property
    def name(self) -> str:
        regs = (
            ""
            if not self.regulators
            else "-reg"
            if self.regulators == (1, 2, 3, 4)
            else "-reg" + "".join(map(str, self.regulators))
        )
        norm = "-sharedbn" if self.shared_bn else "" if self.bn else "-nobn"
        return f"{self.depth}-{self.variant}{regs}{'' if self.shared else '-free'}{norm}"


def section_sizes(n_convs: int) -> list[int]:
    """Convs per section of a non-residual DACNN: up to 4 sections, as even as possible."""
    sections = min(4, n_convs)
    base, extra = divmod(n_convs, sections)
    return [base + (1 if i >= sections - extra else 0) for i in range(sections)]


class _Builder:
    """Creates convs: shared ones read an anchor of the bank, free ones are plain nn.Conv2d."""

    def __init__(self, cfg: DacnnConfig) -> None:
        self.cfg = cfg
        self.anchors: dict[str, tuple[int, ...]] = {}
        self.bank: AnchorBank | None = None
        self.pending: list[tuple[AnchoredConv2d, str]] = []
        self.norms: dict[str, nn.BatchNorm2d] = {}  # anchor -> the BN whose affine parameters its convs share

    def conv(self, cin: int, cout: int, anchor: str | None) -> nn.Module:
        if anchor is None or not self.cfg.shared:
            return nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.anchors.setdefault(anchor, (cout, cin, 3, 3))
        conv = AnchoredConv2d(AnchorBank({}), anchor, cin, cout, (3, 3), padding=(1, 1))
        self.pending.append((conv, anchor))
        return conv

    def norm(self, c: int, anchor: str | None = None) -> nn.Module:
        """The BN after a conv; with ``shared_bn``, the BNs after the convs reading ``anchor`` share gamma and beta."""
        if not self.cfg.bn:
            return nn.Identity()
        bn = nn.BatchNorm2d(c)
        if self.cfg.shared_bn and self.cfg.shared and anchor is not None:
            first = self.norms.setdefault(anchor, bn)
            assert first.num_features == c, "convs reading one kernel have one width in every DACNN layout"
            bn.weight, bn.bias = first.weight, first.bias  # one Parameter each; running statistics stay per layer
        return bn

    def finish(self) -> AnchorBank:
        bank = AnchorBank(self.anchors)
        for p in bank.parameters():
            nn.init.kaiming_normal_(p, mode="fan_out", nonlinearity="relu")
        for conv, _ in self.pending:
            object.__setattr__(conv, "_bank", bank)
        return bank


class Unit(nn.Sequential):
    """conv -> BN -> ReLU."""

    def __init__(self, b: _Builder, cin: int, cout: int, anchor: str | None) -> None:
        super().__init__(b.conv(cin, cout, anchor), b.norm(cout, anchor), nn.ReLU(inplace=True))


class Block(nn.Module):
    """A residual basic block of (possibly shared) convs, with an optional regulator."""

    def __init__(
        self, b: _Builder, cin: int, cout: int, first: str | None, second: str | None, regulator: bool
    ) -> None:
        super().__init__()
        self.conv1, self.bn1 = b.conv(cin, cout, first), b.norm(cout, first)
        self.regulator = (
            nn.Sequential(nn.Conv2d(cout, cout, 1, bias=False), b.norm(cout), nn.ReLU(inplace=True))
            if (regulator)
            else None
        )
        self.conv2, self.bn2 = b.conv(cout, cout, second), b.norm(cout, second)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), b.norm(cout)) if cin != cout else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        if self.regulator is not None:
            out = self.regulator(out)
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class DACNN(nn.Module):
    """A deep anchored CNN of the paper; see the module docstring for the exact layers."""

    def __init__(self, cfg: DacnnConfig) -> None:
        super().__init__()
        self.config = cfg
        b = _Builder(cfg)
        widths = [cfg.width] * 4 if cfg.variant == "plain" else list(MIX_CHANNELS)
        anchor = (lambda k: "shared") if cfg.variant == "plain" else (lambda k: f"section{k}")
        sections: list[nn.Module] = []
        if not cfg.residual:
            cin = 3
            for k, n in enumerate(section_sizes(cfg.depth - 1), start=1):
                c = widths[k - 1]
                units = [
                    Unit(
                        b, cin if i == 0 else c, c, None if (i == 0 and (k == 1 or cfg.variant == "mix")) else anchor(k)
                    )
                    for i in range(n)
                ]
                sections.append(nn.Sequential(*([nn.MaxPool2d(2)] if k > 1 else []), *units))
                cin = c
            self.stem: nn.Module = nn.Identity()
        else:
            self.stem = Unit(b, 3, widths[0], None)
            cin = widths[0]
            for k, n in enumerate(cfg.layout or LAYOUTS[cfg.depth], start=1):
                c, reg = widths[k - 1], k in cfg.regulators
                blocks = [
                    Block(b, cin if i == 0 else c, c, None if (i == 0 and cin != c) else anchor(k), anchor(k), reg)
                    for i in range(n)
                ]
                sections.append(nn.Sequential(*([nn.MaxPool2d(2)] if k > 1 else []), *blocks))
                cin = c
        self.sections = nn.Sequential(*sections)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, cfg.num_classes)
        if b.anchors:
            setattr(self, BANK_NAME, b.finish())
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.sections(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def dacnn(
    depth: int = 18,
    variant: str = "plain",
    regulators: str | Sequence[int] | None = "none",
    shared: bool = True,
    bn: bool = True,
    num_classes: int = 100,
    shared_bn: bool = False,
) -> DACNN:
    """Build a DACNN of the paper.

    Args:
        depth: weighted layers (convs + FC): 3..17 non-residual, or 18, 24, 34 residual.
        variant: ``plain`` (one 128-channel kernel for the whole network) or ``mix``
            (64/128/256/512 channels, one kernel per section).
        regulators: ``none``, ``all`` or 1-based sections like ``"3"``; residual depths only.
        shared: False builds the same network with free kernels (the paper's comparison).
        bn: False drops every BatchNorm (Table 1).
        num_classes: outputs of the final FC.
        shared_bn: the BNs after the convs that read one kernel share gamma and beta (not their statistics).

    Raises:
        UsageError: a depth, variant or regulator choice the paper's family does not have.
    """
    if variant not in VARIANTS:
        raise UsageError(f"variant must be plain or mix, got {variant!r}")
    if not (3 <= depth <= 17 or depth in LAYOUTS):
        raise UsageError(f"depth must be 3..17 (non-residual) or one of {sorted(LAYOUTS)} (residual); got {depth}")
    regs = parse_regulators(regulators, 4)  # a DACNN has 4 sections
    if regs and depth <= 17:
        raise UsageError("regulators attach to residual blocks: use depth 18, 24 or 34")
    if shared_bn and not (shared and bn):
        raise UsageError(
            "shared BN ties the BatchNorms of convs that share a kernel: it needs shared kernels and BatchNorms "
            "(drop -free / -nobn)"
        )
    return DACNN(DacnnConfig(depth, variant, regs, shared, bn, num_classes, shared_bn))


NAME = re.compile(r"^(\d+)-(plain|mix)(?:-reg(\d*))?(-free)?(-nobn|-sharedbn)?$")


def from_name(name: str, num_classes: int = 100) -> DACNN:
    """Build from a model-source name like ``18-mix-reg``, ``18-plain-reg3``, ``14-plain-free``, ``18-plain-nobn``,
    ``18-plain-sharedbn``.

    Raises:
        UsageError: the name does not follow DEPTH-VARIANT[-reg[SECTIONS]][-free][-nobn|-sharedbn].
    """
    m = NAME.match(name)
    if m is None:
        raise UsageError(
            f"unknown DACNN {name!r}: names are DEPTH-VARIANT[-reg[SECTIONS]][-free][-nobn|-sharedbn], e.g. "
            "dacnn:18-mix-reg, dacnn:18-plain-reg3, dacnn:14-plain-free"
        )
    depth, variant, reg, free, norm = m.groups()
    regulators = "none" if reg is None else ("all" if reg == "" else ",".join(reg))
    return dacnn(
        int(depth),
        variant,
        regulators,
        shared=free is None,
        bn=norm != "-nobn",
        num_classes=num_classes,
        shared_bn=norm == "-sharedbn",
    )


def kernel_and_fc_params(model: nn.Module) -> int:
    """Conv kernels (each anchor once) + FC weights and biases: how the paper counts (no BN)."""
    total = sum(p.numel() for p in getattr(model, BANK_NAME, nn.Module()).parameters())
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            total += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
        elif isinstance(m, nn.Linear):
            total += sum(p.numel() for p in m.parameters())
    return total
