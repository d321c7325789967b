"""Command line: ``dacnn-convert MODEL ...`` and ``dacnn <command> ...``.

A thin typer layer: parse flags, call the library, render its result objects with
rich. Library errors become one line on stderr and exit code 1 (usage errors 2).
"""

from __future__ import annotations

import importlib
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .errors import DacnnError, UsageError

console = Console()
err_console = Console(stderr=True)


class Mode(str, Enum):
    mix = "mix"
    plain = "plain"
    sharesnet = "sharesnet"
    none = "none"


class Init(str, Enum):
    fit = "fit"
    mean = "mean"
    first = "first"
    random = "random"


class RegulatorStyle(str, Enum):
    adapter = "adapter"
    paper = "paper"


class Dtype(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


def parse_input_size(text: str | None) -> tuple[int, int, int] | None:
    """``224`` -> (3, 224, 224); ``1x28x28`` -> (1, 28, 28); None stays None."""
    if text is None:
        return None
    try:
        parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
    except ValueError as exc:
        raise UsageError(f"--input-size takes 224 or CxHxW like 3x32x32; got {text!r}") from exc
    if len(parts) == 1:
        return (3, parts[0], parts[0])
    if len(parts) == 3 and min(parts) > 0:
        return (parts[0], parts[1], parts[2])
    raise UsageError(f"--input-size takes 224 or CxHxW like 3x32x32; got {text!r}")


def _leaf_types(names: list[str]) -> list[type]:
    types = []
    for name in names:
        module, _, cls = name.rpartition(".")
        try:
            types.append(getattr(importlib.import_module(module), cls))
        except (ImportError, AttributeError, ValueError) as exc:
            raise UsageError(f"--leaf-module {name!r} is not an importable class (package.module.ClassName)") from exc
    return types


def fail(exc: DacnnError) -> typer.Exit:
    """Print a library error as one line and return the exit to raise."""
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(exc.exit_code)


def run_convert(
    model: str,
    mode: Mode = Mode.mix,
    regulators: str = "none",
    regulator_style: RegulatorStyle = RegulatorStyle.adapter,
    init: Init = Init.fit,
    weights: str = "DEFAULT",
    num_classes: int | None = None,
    input_size: str | None = None,
    out: Path | None = None,
    dry_run: bool = False,
    leaf_module: list[str] | None = None,
    dtype: Dtype = Dtype.fp32,
) -> dict[str, Any]:
    """Load, plan, convert, measure and write; returns what was written (for tests and callers)."""
    from .checkpoint import save
    from .convert import convert
    from .planning import make_plan
    from .report import build_report, state_dict_bytes
    from .sources import build_model, default_input_size, parse_spec

    spec = parse_spec(model, num_classes)
    size = parse_input_size(input_size)
    leaves = _leaf_types(leaf_module or [])
    original = build_model(spec, weights).eval()
    size = size or default_input_size(original, spec)
    plan = make_plan(original, mode.value, regulators, regulator_style.value, init.value, size, leaves)
    if dry_run:
        render_plan(plan, spec.display)
        return {"plan": plan}
    conversion = convert(original, plan)
    out = out or Path("runs") / f"{spec.name.replace(':', '_')}-{mode.value}"
    ckpt = save(conversion.model, out / "model.safetensors", source=spec, dtype=dtype.value)
    report = build_report(original, conversion, spec.display, state_dict_bytes(original), ckpt.stat().st_size)
    (out / "report.json").write_text(report.to_json())
    (out / "report.md").write_text(report.to_markdown())
    render_report(report)
    console.print(f"wrote {ckpt}, {out / 'report.json'}, {out / 'report.md'}")
    return {"plan": plan, "report": report, "out": out}


def render_plan(plan: Any, source: str) -> None:
    """Print a plan as a table (``--dry-run``)."""
    table = Table(title=f"plan for {source}: mode {plan.mode}, init {plan.init}")
    for col in ("anchor", "section", "members", "kernel"):
        table.add_column(col)
    for g in plan.groups:
        table.add_row(g.name, ",".join(map(str, g.sections)), "\n".join(g.members), "x".join(map(str, g.shape)))
    console.print(table)
    for r in plan.regulators:
        console.print(f"regulator ({plan.regulator_style}) on {r.host}: {r.in_channels}->{r.out_channels}, section {r.section}")
    console.print(
        f"unique params {plan.params_before:,} -> {plan.params_after:,} "
        f"({plan.params_before / plan.params_after:.2f}x); dry run: nothing written"
    )
    for n in plan.notes:
        console.print(f"[yellow]warning:[/] {n}")


def render_report(report: Any) -> None:
    """Print the per-group table and the summary of a conversion."""
    table = Table(title=f"{report.source}: mode {report.mode}, init {report.init}")
    for col in ("anchor", "section", "resolution", "kernel", "members", "params before", "params after", "fit err"):
        table.add_column(col, justify="right" if col.startswith(("params", "fit", "members")) else "left")
    for g in report.groups:
        err = f"{g.max_fit_error:.3f}" if g.max_fit_error is not None else "-"
        table.add_row(
            g.anchor, ",".join(map(str, g.sections)), g.resolution, g.kernel, str(g.members),
            f"{g.params_before:,}", f"{g.params_after:,}", err,
        )  # fmt: skip
    console.print(table)
    summary = Table(title="summary")
    for col in ("measure", "before", "after", "ratio"):
        summary.add_column(col, justify="left" if col == "measure" else "right")
    summary.add_row("unique params", f"{report.params_before:,}", f"{report.params_after:,}", f"{report.ratio:.2f}x")
    summary.add_row(
        "conv params", f"{report.conv_params_before:,}", f"{report.conv_params_after:,}", f"{report.conv_ratio:.2f}x"
    )
    if report.bytes_ratio is not None:
        summary.add_row(
            "bytes on disk", f"{report.bytes_before:,}", f"{report.bytes_after:,}", f"{report.bytes_ratio:.2f}x"
        )
    summary.add_row("MACs (unchanged by sharing)", f"{report.macs_before:,}", f"{report.macs_after:,}", "")
    summary.add_row("regulators added", "", f"{report.regulators} ({report.regulator_params:,} params)", "")
    console.print(summary)
    for n in report.notes:
        console.print(f"[yellow]warning:[/] {n}")


ModelArg = Annotated[
    str, typer.Argument(help="torchvision name (resnet34), timm:NAME (timm:resnet50d) or package.module:factory")
]
ModeOpt = Annotated[Mode, typer.Option(help="mix: share per stage; plain: one network-wide kernel; sharesnet; none")]
RegOpt = Annotated[str, typer.Option(help="regulators in sections: none, all, or 1-based numbers like 1,3")]
StyleOpt = Annotated[
    RegulatorStyle, typer.Option(help="adapter: parallel, zero-init (function kept); paper: in series")
]
InitOpt = Annotated[Init, typer.Option(help="anchor init: fit (least squares, scales folded into BN), mean, first, random")]
WeightsOpt = Annotated[str, typer.Option(help="DEFAULT (pretrained, downloads), none (random), or a state-dict PATH")]
ClassesOpt = Annotated[int | None, typer.Option(help="classes of the classifier (replaces the head if pretrained)")]
SizeOpt = Annotated[str | None, typer.Option(help="example input: 224 or CxHxW; default from the model's config or 224")]
OutOpt = Annotated[Path | None, typer.Option(help="output folder (default runs/MODEL-MODE)")]
DryOpt = Annotated[bool, typer.Option(help="print the plan and write nothing")]
LeafOpt = Annotated[list[str] | None, typer.Option(help="package.module.Class that fx must not trace into (repeatable)")]
DtypeOpt = Annotated[Dtype, typer.Option(help="storage type of the checkpoint's floating tensors")]


def convert_command(
    model: ModelArg,
    mode: ModeOpt = Mode.mix,
    regulators: RegOpt = "none",
    regulator_style: StyleOpt = RegulatorStyle.adapter,
    init: InitOpt = Init.fit,
    weights: WeightsOpt = "DEFAULT",
    num_classes: ClassesOpt = None,
    input_size: SizeOpt = None,
    out: OutOpt = None,
    dry_run: DryOpt = False,
    leaf_module: LeafOpt = None,
    dtype: DtypeOpt = Dtype.fp32,
) -> None:
    """Convert a pretrained CNN into a deep anchored CNN (shared conv kernels, free BatchNorms)."""
    try:
        run_convert(
            model, mode, regulators, regulator_style, init, weights, num_classes, input_size, out, dry_run,
            leaf_module, dtype,
        )  # fmt: skip
    except DacnnError as exc:
        raise fail(exc) from None


app = typer.Typer(
    help="dacnn: deep anchored CNNs — convert, and more.", no_args_is_help=True, pretty_exceptions_enable=False
)
app.command("convert")(convert_command)
convert_app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
convert_app.command()(convert_command)


def main() -> None:
    """Entry point of ``dacnn``."""
    app()


def convert_main() -> None:
    """Entry point of ``dacnn-convert``."""
    convert_app()


if __name__ == "__main__":
    main()
