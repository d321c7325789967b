"""Rendering a conversion's results with rich: the plan, the size report, the accuracy after each step."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from .common import console, labelled


def render_plan(plan: Any, source: str) -> None:
    """Print a plan as a table (``--dry-run``)."""
    table = Table(title=f"plan for {source}: mode {plan.mode}, init {plan.init}")
    for col in ("anchor", "section", "members", "kernel"):
        table.add_column(col)
    for g in plan.groups:
        kernel = ("bank " if g.kind == "bank" else "") + "x".join(map(str, g.shape))
        table.add_row(g.name, ",".join(map(str, g.sections)), "\n".join(g.members), kernel)
    console.print(table)
    for r in plan.regulators:
        console.print(
            f"regulator ({plan.regulator_style}) on {r.host}: {r.in_channels}->{r.out_channels}, section {r.section}"
        )
    console.print(
        f"unique params {plan.params_before:,} -> {plan.params_after:,} "
        f"({plan.params_before / plan.params_after:.2f}x); dry run: nothing written"
    )
    for n in plan.notes:
        console.print(labelled("warning:", "yellow", n))


def render_report(report: Any) -> None:
    """Print the per-group table and the summary of a conversion."""
    table = Table(title=f"{report.source}: mode {report.mode}, init {report.init}")
    for col in (
        "anchor",
        "section",
        "resolution",
        "kernel",
        "members",
        "params before",
        "params after",
        "fit err",
        "energy",
    ):
        table.add_column(col, justify="right" if col.startswith(("params", "fit", "members", "energy")) else "left")
    for g in report.groups:
        err = f"{g.max_fit_error:.3f}" if g.max_fit_error is not None else "-"
        table.add_row(
            g.anchor,
            ",".join(map(str, g.sections)),
            g.resolution,
            g.kernel,
            str(g.members),
            f"{g.params_before:,}",
            f"{g.params_after:,}",
            err,
            f"{g.energy:.3f}" if g.energy is not None else "-",
        )
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
    summary.add_row(
        "MACs", f"{report.macs_before:,}", f"{report.macs_after:,}", f"{report.macs_after / report.macs_before:.2f}x"
    )
    summary.add_row("regulators added", "", f"{report.regulators} ({report.regulator_params:,} params)", "")
    console.print(summary)
    for n in report.notes:
        console.print(labelled("warning:", "yellow", n))


def render_accuracy(result: Any) -> None:
    """Print the accuracy after each step of the pipeline."""
    table = Table(title="accuracy")
    table.add_column("step")
    table.add_column("accuracy", justify="right")
    for name, value in (
        ("teacher", result.teacher_acc),
        ("right after conversion", result.converted_acc),
        ("after BN recalibration", result.calibrated_acc),
        ("after reconstruction", getattr(result, "reconstructed_acc", None)),
        ("after KD fine-tune", result.finetuned_acc),
    ):
        if value is not None:
            table.add_row(name, f"{100 * value:.2f}%")
    table.add_row("drop vs teacher", f"{100 * result.drop:.2f} points")
    console.print(table)
    console.print(f"wall time {result.wall_s:.0f} s")
