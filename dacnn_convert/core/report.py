"""Measurements of a conversion: unique parameters, bytes on disk, MACs, and the report object."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import validate
from ..atomic import atomic_write
from .convert import Conversion
from .kinds import plain_kind
from .modes import mode
from .plan import Plan, count_params


def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one inference pass on one example (eval mode, no autograd).

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode` on the ops that actually run
    (convolutions, matrix products, attention: every one a model uses, Conv1d and einsum
    included), halved: the usual MAC convention, BatchNorm and activations not counted.
    Filter banks count the path inference takes (the merged kernel where that is cheaper,
    else the bank conv plus its 1x1); a first, uncounted pass builds the kernels a model
    caches, so one-time work such as merging a bank is not counted as per-image cost. The
    model's train/eval mode is restored.
    """
    validate.module("model", model)
    input_size = validate.input_size(input_size)
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters(), None)
    with mode(model), torch.no_grad():
        x = torch.zeros(1, *input_size, device=p.device if p is not None else "cpu")
        counter = FlopCounterMode(display=False)
        model(x)
        with counter:
            model(x)
    return int(counter.get_total_flops()) // 2


def conv_params(model: nn.Module) -> int:
    """Unique parameters held by conv kernels (anchors counted once, regulators included)."""
    from .layers import BANK_NAME

    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d) and plain_kind(m) is nn.Conv2d)
    bank = getattr(model, BANK_NAME, None)
    if bank is not None:
        total += sum(p.numel() for p in bank.parameters())
    return total


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s state dict written as a .safetensors file (measured, not estimated)."""
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        save_model(model, str(path))
        return path.stat().st_size


@dataclass(frozen=True)
class GroupRow:
    """One anchored group in the report."""

    anchor: str
    sections: tuple[int, ...]
    resolution: str
    kernel: str
    members: int
    params_before: int
    params_after: int
    max_fit_error: float | None
    fit_errors: tuple[tuple[str, float], ...] = ()  # (member, ||W_l - a_l W_G|| / ||W_l||; banks: output error)
    energy: float | None = None  # banks: the fraction of the (whitened) kernels' energy captured


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion did and what it saves; rendered by the CLI, written as JSON/Markdown."""

    source: str
    mode: str
    init: str
    regulator_style: str
    input_size: tuple[int, int, int]
    groups: tuple[GroupRow, ...]
    params_before: int
    params_after: int
    conv_params_before: int
    conv_params_after: int
    bytes_before: int | None
    bytes_after: int | None
    macs_before: int
    macs_after: int
    regulators: int
    regulator_params: int
    notes: tuple[str, ...]

    @property
    def ratio(self) -> float:
        """Compression ratio by unique parameters (before / after)."""
        return self.params_before / self.params_after

    @property
    def conv_ratio(self) -> float:
        return self.conv_params_before / max(self.conv_params_after, 1)

    @property
    def bytes_ratio(self) -> float | None:
        if self.bytes_before is None or not self.bytes_after:
            return None
        return self.bytes_before / self.bytes_after

    @property
    def prune_ratio(self) -> float:
        """1 - params after / params before, the paper's Table 8 measure."""
        return 1.0 - self.params_after / self.params_before

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            ratio=self.ratio, conv_ratio=self.conv_ratio, bytes_ratio=self.bytes_ratio, prune_ratio=self.prune_ratio
        )
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        lines = [
            f"# Conversion report: {self.source}",
            "",
            f"mode `{self.mode}`, init `{self.init}`, regulators `{self.regulator_style}` x{self.regulators}, "
            f"input {'x'.join(map(str, self.input_size))}",
            "",
            "| anchor | section | resolution | kernel | members | params before | params after | max fit error "
            "| energy captured |",
            "|---|---|---|---|---|---:|---:|---:|---:|",
        ]
        for g in self.groups:
            err = f"{g.max_fit_error:.3f}" if g.max_fit_error is not None else "-"
            energy = f"{g.energy:.3f}" if g.energy is not None else "-"
            lines.append(
                f"| {g.anchor} | {','.join(map(str, g.sections))} | {g.resolution} | {g.kernel} | {g.members} "
                f"| {g.params_before:,} | {g.params_after:,} | {err} | {energy} |"
            )
        lines += ["", "| measure | before | after | ratio |", "|---|---:|---:|---:|"]
        lines.append(f"| unique params | {self.params_before:,} | {self.params_after:,} | {self.ratio:.2f}x |")
        lines.append(
            f"| conv params | {self.conv_params_before:,} | {self.conv_params_after:,} | {self.conv_ratio:.2f}x |"
        )
        if self.bytes_ratio is not None:
            lines.append(f"| bytes on disk | {self.bytes_before:,} | {self.bytes_after:,} | {self.bytes_ratio:.2f}x |")
        lines.append(
            f"| MACs | {self.macs_before:,} | {self.macs_after:,} | {self.macs_after / self.macs_before:.2f}x |"
        )
        lines += [
            "",
            f"Prune ratio (1 - after/before): {self.prune_ratio:.1%}. Regulators add {self.regulator_params:,} params.",
            "Fit error: relative weight error of each member (filter banks fitted to data: relative output error "
            "on the calibration inputs); energy: the share of the (whitened) kernels' energy a bank keeps.",
            "Anchoring shares weights but computes the same convolutions: MACs change only by the regulators"
            + (
                " and the filter banks (bank conv + 1x1 coefficients where that is cheaper)."
                if any(g.kernel.startswith("bank") for g in self.groups)
                else "."
            ),
        ]
        lines += [f"- note: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def build_report(
    original: nn.Module,
    conversion: Conversion,
    source: str,
    bytes_before: int | None = None,
    bytes_after: int | None = None,
) -> ConversionReport:
    """Measure ``conversion`` against ``original`` (MACs by forward hooks, params by counting)."""
    plan: Plan = conversion.plan
    rows = []
    for g in plan.groups:
        errs = conversion.fit_errors.get(g.name)
        before = sum(plan.site(m).weight_numel for m in g.members)
        rows.append(
            GroupRow(
                anchor=g.name,
                sections=g.sections,
                resolution=f"{g.resolution[0]}x{g.resolution[1]}" if g.resolution else "all",
                kernel=("bank " if g.kind == "bank" else "") + "x".join(map(str, g.shape)),
                members=len(g.members),
                params_before=before,
                params_after=plan.group_params(g),
                max_fit_error=max(errs.values()) if errs else None,
                fit_errors=tuple(errs.items()) if errs else (),
                energy=conversion.fit_energy.get(g.name),
            )
        )
    return ConversionReport(
        source=source,
        mode=plan.mode,
        init=plan.init,
        regulator_style=plan.regulator_style,
        input_size=plan.input_size,
        groups=tuple(rows),
        params_before=count_params(original),
        params_after=count_params(conversion.model),
        conv_params_before=conv_params(original),
        conv_params_after=conv_params(conversion.model),
        bytes_before=bytes_before,
        bytes_after=bytes_after,
        macs_before=count_macs(original, plan.input_size),
        macs_after=count_macs(conversion.model, plan.input_size),
        regulators=len(plan.regulators),
        regulator_params=plan.regulator_params,
        notes=plan.notes,
    )


def figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (5, 3.5), grid: bool = False) -> tuple[Any, Any]:
    """A matplotlib figure outside pyplot (no backend is chosen, no global figure list grows);
    ``grid`` always returns a 2-D array of axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=120)
    return fig, fig.subplots(rows, cols, squeeze=not grid)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out, write as PNG, close; returns the path."""
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def plot_accuracy(history: list[dict[str, float]], marks: dict[str, float], path: str | Path) -> Path:
    """Write a PNG of validation accuracy per epoch, with horizontal marks (e.g. the teacher's).

    Args:
        history: rows with ``epoch`` and ``val_acc`` (fractions), as in FitResult.history.
        marks: label -> accuracy drawn as dashed lines.
        path: the PNG to write.
    """
    fig, ax = figure()
    epochs = [0] + [h["epoch"] for h in history]
    start = marks.get("after BN recalibration", history[0]["val_acc"] if history else 0.0)
    ax.plot(epochs, [100 * start] + [100 * h["val_acc"] for h in history], marker="o", label="student")
    for i, (label, value) in enumerate(marks.items()):
        ax.axhline(100 * value, linestyle="--", linewidth=1, color=f"C{i + 1}", label=label)
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
