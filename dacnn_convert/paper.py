"""The paper's printed numbers (Tables 1-8), and ours computed from the builders, side by side.

Parameter counts follow the paper's apparent convention — conv kernels (each shared kernel
once) + the classifier's weights and biases, no BatchNorm — printed in millions (M) or
K = 1024 as the paper does; ``all`` counts every unique parameter, BatchNorm included.
Reference networks are torchvision's ResNet-18/34 and VGG-16's conv stack with one FC.
docs/paper-tables.md explains every row that does not round to the paper's value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .core.models import from_name, kernel_and_fc_params
from .core.plan import count_params


@dataclass(frozen=True)
class PaperRow:
    """One printed cell of the paper: a parameter count (in ``unit``) and, when given, an error (%)."""

    table: str
    row: str
    model: str  # dacnn:NAME, a torchvision name, or "vgg16-1fc"
    printed: str | None  # the parameter count exactly as printed ("4.90"), trailing zeros kept
    unit: str = "M"  # "M" (10^6) or "K" (1024), as printed
    error: float | None = None
    classes: int = 100
    extra_over: str | None = None  # the printed value is params(model) - params(extra_over)
    dataset: str = "cifar100"

    @property
    def params(self) -> float | None:
        return None if self.printed is None else float(self.printed)

    @property
    def decimals(self) -> int:
        return len(self.printed.split(".")[1]) if self.printed and "." in self.printed else 0


def _d(name: str) -> str:
    return f"dacnn:{name}"


PAPER: list[PaperRow] = [
    PaperRow("1", "DACNN14 (VGG based), no BN", _d("14-plain-nobn"), None, error=97.48),
    PaperRow("1", "DACNN14 (VGG based), BN", _d("14-plain"), None, error=42.29),
    PaperRow("1", "DACNN18 (ResNet based), no BN", _d("18-plain-nobn"), None, error=97.17),
    PaperRow("1", "DACNN18 (ResNet based), BN", _d("18-plain"), None, error=38.63),
    *[
        PaperRow("2", f"{d} layers, shared", _d(f"{d}-plain"), p, "M", e)
        for d, p, e in [
            (3, "0.164", 56.91),
            (5, "0.164", 40.11),
            (7, "0.164", 42.22),
            (9, "0.164", 42.40),
            (11, "0.165", 42.37),
            (14, "0.165", 42.29),
            (18, "0.166", 38.63),
            (34, "0.168", 38.88),
        ]
    ],
    *[
        PaperRow("2", f"{d} layers, free (no sharing)", _d(f"{d}-plain-free"), p, "M", e)
        for d, p, e in [
            (3, "0.45", 54.41),
            (5, "0.74", 33.74),
            (7, "1.03", 32.66),
            (9, "1.33", 32.67),
            (11, "1.63", 30.36),
            (14, "2.06", 30.44),
            (18, "2.66", 28.31),
            (34, "5.02", 27.22),
        ]
    ],
    PaperRow("3", "VGG", "vgg16-1fc", "14.90", "M", 30.20),
    PaperRow("3", "DACNN-14 (MIX)", _d("14-mix"), "4.73", "M", 30.54),
    PaperRow("3", "ResNet-18", "resnet18", "11.13", "M", 27.31),
    PaperRow("3", "DACNN-18 (MIX)", _d("18-mix"), "4.90", "M", 27.72),
    PaperRow("3", "ResNet-34", "resnet34", "21.24", "M", 26.10),
    PaperRow("3", "DACNN-34 (MIX)", _d("34-mix"), "4.91", "M", 27.70),
    PaperRow("4", "regulators: none", _d("18-plain"), None, "K", 38.63),
    *[
        PaperRow("4", f"regulators: section {k}", _d(f"18-plain-reg{k}"), "32", "K", e, extra_over=_d("18-plain"))
        for k, e in [(1, 38.28), (2, 38.09), (3, 37.46), (4, 38.07)]
    ],
    PaperRow("4", "regulators: all", _d("18-plain-reg"), "128", "K", 35.39, extra_over=_d("18-plain")),
    *[
        PaperRow(
            "5",
            f"DACNN-{d} (REG), extra over plain DACNN-18",
            _d(f"{d}-plain-reg"),
            p,
            "M",
            e,
            extra_over=_d("18-plain"),
        )
        for d, p, e in [(18, "0.32", 35.39), (24, "0.52", 34.86), (34, "0.68", 33.88)]
    ],
    PaperRow("6", "VGG (1-fc)", "vgg16-1fc", "14.90", "M", 31.20),
    PaperRow("6", "ResNet18", "resnet18", "11.13", "M", 27.31),
    PaperRow("6", "ResNet34", "resnet34", "21.24", "M", 26.10),
    PaperRow("6", "DACNN-14 (plain)", _d("14-plain"), "0.16", "M", 42.20),
    PaperRow("6", "DACNN-18 (plain)", _d("18-plain"), "0.16", "M", 38.63),
    PaperRow("6", "DACNN-34 (plain)", _d("34-plain"), "0.17", "M", 38.88),
    PaperRow("6", "DACNN-18 (REG)", _d("18-plain-reg"), "0.46", "M", 35.39),
    PaperRow("6", "DACNN-24 (REG)", _d("24-plain-reg"), "0.56", "M", 34.86),
    PaperRow("6", "DACNN-34 (REG)", _d("34-plain-reg"), "0.72", "M", 33.88),
    PaperRow("6", "DACNN-14 (MIX)", _d("14-mix"), "4.73", "M", 30.54),
    PaperRow("6", "DACNN-18 (MIX)", _d("18-mix"), "4.90", "M", 27.72),
    PaperRow("6", "DACNN-34 (MIX)", _d("34-mix"), "4.91", "M", 27.80),
    PaperRow("6", "DACNN-18 (MIX, REG)", _d("18-mix-reg"), "5.60", "M", 27.55),
    PaperRow("6", "DACNN-34 (MIX, REG)", _d("34-mix-reg"), "6.10", "M", 26.66),
    PaperRow("7", "ResNet-18, CIFAR-10", "resnet18", None, error=6.47, classes=10, dataset="cifar10"),
    PaperRow("7", "ResNet-34, CIFAR-10", "resnet34", None, error=6.18, classes=10, dataset="cifar10"),
    PaperRow("7", "DACNN-18 (MIX,REG), CIFAR-10", _d("18-mix-reg"), None, error=7.26, classes=10, dataset="cifar10"),
    PaperRow("7", "DACNN-34 (MIX,REG), CIFAR-10", _d("34-mix-reg"), None, error=7.23, classes=10, dataset="cifar10"),
    PaperRow("7", "ResNet-18, SVHN", "resnet18", None, error=4.38, classes=10, dataset="svhn"),
    PaperRow("7", "ResNet-34, SVHN", "resnet34", None, error=4.08, classes=10, dataset="svhn"),
    PaperRow("7", "DACNN-18 (MIX,REG), SVHN", _d("18-mix-reg"), None, error=4.37, classes=10, dataset="svhn"),
    PaperRow("7", "DACNN-34 (MIX,REG), SVHN", _d("34-mix-reg"), None, error=4.06, classes=10, dataset="svhn"),
]

# Table 8: prune ratio (%) = 1 - params(DACNN) / params(ResNet-18), CIFAR-10.
TABLE8 = [("DACNN (M,R)", _d("18-mix-reg"), "49.6", 0.79), ("DACNN (plain)", _d("18-plain"), "98.5", 10.2)]


def build_reference(model: str, classes: int) -> nn.Module:
    """A network of the tables by name: ``dacnn:NAME``, a torchvision name, or ``vgg16-1fc``."""
    import torchvision

    if model.startswith("dacnn:"):
        return from_name(model.split(":", 1)[1], classes)
    if model == "vgg16-1fc":  # VGG-16's 13 convs (BN) + global pool + one FC, the paper's "VGG (1-fc)"
        features = torchvision.models.vgg16_bn().features
        return nn.Sequential(features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))
    return torchvision.models.get_model(model, num_classes=classes)


@dataclass(frozen=True)
class ParamRow:
    """Paper value vs ours for one row; ``ours`` in the paper's unit and convention."""

    table: str
    row: str
    model: str
    paper: float | None
    unit: str
    ours: float
    ours_exact: int
    all_params: int
    matches: bool | None


def _scale(n: int, unit: str) -> float:
    return n / 1024 if unit == "K" else n / 1e6


def param_rows(count: Callable[[nn.Module], int] = kernel_and_fc_params) -> list[ParamRow]:
    """Every parameter count of Tables 2-6 and 8, paper vs ours (``matches``: ours rounds to the paper's print)."""
    cache: dict[tuple[str, int], tuple[int, int]] = {}

    def measure(model: str, classes: int) -> tuple[int, int]:
        if (model, classes) not in cache:
            m = build_reference(model, classes)
            cache[model, classes] = (count(m), count_params(m))
        return cache[model, classes]

    rows = []
    for r in PAPER:
        if r.table in ("1", "7"):
            continue
        n, everything = measure(r.model, r.classes)
        if r.extra_over is not None:
            base = measure(r.extra_over, r.classes)
            n, everything = n - base[0], everything - base[1]
        ours = _scale(n, r.unit)
        match = None if r.printed is None else f"{ours:.{r.decimals}f}" == r.printed
        rows.append(ParamRow(r.table, r.row, r.model, r.params, r.unit, ours, n, everything, match))
    resnet, resnet_all = measure("resnet18", 10)
    for label, model, paper_ratio, _ in TABLE8:
        n, everything = measure(model, 10)
        ratio = 100 * (1 - n / resnet)
        rows.append(
            ParamRow(
                "8",
                f"{label}: prune ratio vs ResNet-18",
                model,
                float(paper_ratio),
                "%",
                ratio,
                n,
                everything,
                f"{ratio:.1f}" == paper_ratio,
            )
        )
    return rows
