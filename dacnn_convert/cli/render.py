"""Rendering a conversion's results with rich: the plan, the size report, the accuracy after each step."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from .common import console, labelled

# columns of this priority or lower are never left out: text in them folds instead
_KEEP = 2


def fitted_table(title: str, columns: list[tuple[str, str, int]], rows: list[list[str]]) -> tuple[Table, list[str]]:
    """A table that never cuts a number: ``columns`` are (name, ``"num"`` or ``"text"``, priority).

    Numbers never wrap or shorten. When the table is wider than the console, the columns of lowest
    priority (the highest number, above ``_KEEP``) are left out first, and their names returned so the
    caller can say so; if it is still too wide, text folds onto more lines.
    """
    width = console.width
    keep = list(range(len(columns)))

    def need(idx: list[int]) -> int:
        total = 1
        for i in idx:
            cells = [len(line) for r in rows for line in r[i].split("\n")] or [0]
            total += 3 + max(max(cells), max(len(w) for w in columns[i][0].split()))
        return total

    dropped: list[str] = []
    while need(keep) > width:
        optional = [i for i in keep if columns[i][2] > _KEEP]
        if not optional:
            break
        worst = max(optional, key=lambda i: (columns[i][2], i))
        keep.remove(worst)
        dropped.append(columns[worst][0])
    table = Table(title=title)
    for i in keep:
        name, kind, _ = columns[i]
        if kind == "num":
            cells = [len(r[i]) for r in rows] or [0]
            table.add_column(name, justify="right", no_wrap=True, min_width=max(cells))
        else:
            table.add_column(name, overflow="fold")
    for r in rows:
        table.add_row(*(r[i] for i in keep))
    return table, dropped


def left_out(dropped: list[str], elsewhere: str = "read the .md report") -> None:
    """Say which columns a narrow console left out of the table just printed, and where else to read them."""
    if dropped:
        console.print(
            f"(left out at {console.width} columns: {', '.join(dropped)}; widen the terminal or {elsewhere})",
            highlight=False,
        )


def render_plan(plan: Any, source: str, macs_before: int | None = None) -> None:
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
    if plan.prune is not None:
        p = plan.prune
        console.print(
            f"pruned first: {p.amount} ({p.importance} importance), "
            f"-{p.params_saved:,} params, -{p.macs_saved:,} MACs; the groups above share the pruned layers"
        )
    macs = ""
    if macs_before is not None:
        after = macs_before - plan.macs_saved
        macs = f"; MACs {macs_before:,} -> {after:,} ({macs_before / max(after, 1):.2f}x fewer)"
    console.print(
        f"unique params {plan.params_before:,} -> {plan.params_after:,} "
        f"({plan.params_before / plan.params_after:.2f}x){macs}; dry run: nothing written"
    )
    for n in plan.notes:
        console.print(labelled("warning:", "yellow", n))


def render_report(report: Any) -> None:
    """Print the per-group table and the summary of a conversion."""
    columns = [  # (name, kind, priority: 0 always shown, higher is left out first when narrow)
        ("anchor", "text", 0),
        ("section", "text", 3),
        ("resolution", "text", 5),
        ("kernel", "text", 2),
        ("members", "num", 4),
        ("params before", "num", 0),
        ("params after", "num", 0),
        ("fit err", "num", 1),
        ("energy", "num", 6),
    ]
    rows = [
        [
            g.anchor,
            ",".join(map(str, g.sections)),
            g.resolution,
            g.kernel,
            str(g.members),
            f"{g.params_before:,}",
            f"{g.params_after:,}",
            f"{g.max_fit_error:.3f}" if g.max_fit_error is not None else "-",
            f"{g.energy:.3f}" if g.energy is not None else "-",
        ]
        for g in report.groups
    ]
    table, dropped = fitted_table(f"{report.source}: mode {report.mode}, init {report.init}", columns, rows)
    console.print(table)
    left_out(dropped)
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


def render_sweep(job: Any) -> None:
    """``dacnn plan --sweep``: one row per size ratio, the planner's pick with its params, MACs and score."""
    columns = [
        ("ratio", "num", 0),
        ("params", "num", 0),
        ("fp32 MB", "num", 1),
        ("MACs", "num", 0),
        ("MACs fewer", "num", 2),
        ("score", "num", 0),
        ("sections", "text", 3),
    ]
    rows = []
    for p in job.points:
        if p.found is None:
            continue
        plan = p.found.plan
        macs = job.macs_before - plan.macs_saved
        ranks = p.found.ranks or ("dense",) * len(p.found.choice)
        picks = "/".join(c if r == "dense" else f"{c}+{r}" for c, r in zip(p.found.choice, ranks, strict=True))
        rows.append(
            [
                f"{p.ratio:g}x",
                f"{plan.params_after:,}",
                f"{4 * plan.params_after / 1e6:.2f}",
                f"{macs:,}",
                f"{job.macs_before / max(macs, 1):.2f}x",
                f"{p.found.sensitivity:.4g}",
                picks,
            ]
        )
    metric = job.points[0].found.metric if job.points and job.points[0].found is not None else "fit"
    title = (
        f"{job.source}: the planner's front ({job.params_before:,} params, {job.macs_before:,} MACs; "
        f"score: summed {metric}, lower is better)"
    )
    table, dropped = fitted_table(title, columns, rows)
    console.print(table)
    left_out(dropped, "add --json")
    refused = [p for p in job.points if p.found is None]
    if refused:
        console.print(f"{refused[0].ratio:g}x: {refused[0].refused}", highlight=False, soft_wrap=True)
