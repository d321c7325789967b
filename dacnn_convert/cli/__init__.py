"""Command line: ``dacnn-convert MODEL ...`` and ``dacnn <command> ...``.

A thin typer layer: parse flags, call the library, render its result objects with
rich. Library errors become one line on stderr and exit code 1 (usage errors 2).
"""

from __future__ import annotations

import sys

import typer

from .bench import bench_command
from .common import handled
from .convert import convert_command, demo_command, plan_command
from .deploy import export_command, inspect_command, latency_command
from .paper import recipe_app, table_app
from .train import eval_command, train_command
from .visualize import visualize_command

app = typer.Typer(
    help="dacnn: deep anchored CNNs — convert, and more.", no_args_is_help=True, pretty_exceptions_enable=False
)
app.command("bench")(handled(bench_command))
app.command("convert")(handled(convert_command))
app.command("plan")(handled(plan_command))
app.command("demo")(handled(demo_command))
app.command("export")(handled(export_command))
app.command("inspect")(handled(inspect_command))
app.command("latency")(handled(latency_command))
app.command("distill", help="Same as convert; give --dataset to calibrate and distil.")(handled(convert_command))
app.command("train")(handled(train_command))
app.command("eval")(handled(eval_command))
app.command("visualize")(handled(visualize_command))
app.add_typer(recipe_app, name="recipe")
app.add_typer(table_app, name="table")


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"dacnn-convert {__version__}")
        raise typer.Exit()


@app.callback()
def _dacnn(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
    """dacnn: deep anchored CNNs (Huang, Dwivedi, Roig) — convert, fine-tune, evaluate."""


convert_app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
convert_app.command()(handled(convert_command))


def _leave_process_group() -> None:
    """Under torchrun, leave the process group a command joined (without importing torch for --help)."""
    distributed = sys.modules.get("dacnn_convert.train.distributed")
    if distributed is not None:
        distributed.shutdown()


def main() -> None:
    """Entry point of ``dacnn``."""
    try:
        app()
    finally:
        _leave_process_group()


def convert_main() -> None:
    """Entry point of ``dacnn-convert``."""
    try:
        convert_app()
    finally:
        _leave_process_group()
