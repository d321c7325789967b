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
# one example per command, shown under its --help
EXAMPLES = {
    "bench": "dacnn bench resnet18 --weights runs/teacher/best.safetensors --num-classes 10 --dataset fashion-mnist "
    "--budget 0.25 --methods dacnn-bank,group-norm --epochs 2",
    "convert": "dacnn convert resnet34 --mode mix --regulators all --dataset fashion-mnist --epochs 1",
    "plan": "dacnn plan resnet50 --weights none --num-classes 10 --target-ratio 4 --explain",
    "demo": "dacnn demo",
    "export": "dacnn export runs/demo/student/model.safetensors --format onnx",
    "inspect": "dacnn inspect runs/demo/student/model.safetensors --json",
    "latency": "dacnn latency runs/demo/student/model.safetensors --batch 1,64",
    "distill": "dacnn distill resnet18 --weights runs/teacher/best.safetensors --num-classes 10 "
    "--dataset fashion-mnist",
    "train": "dacnn train resnet18 --dataset fashion-mnist --epochs 3 --out runs/teacher",
    "eval": "dacnn eval runs/demo/student/model.safetensors --dataset fashion-mnist --json",
    "visualize": "dacnn visualize runs/demo/student/model.safetensors --layers layer1.0.conv1",
}


def _example(name: str) -> str:
    return f"Example: {EXAMPLES[name]}"


app.command("bench", epilog=_example("bench"))(handled(bench_command))
app.command("convert", epilog=_example("convert"))(handled(convert_command))
app.command("plan", epilog=_example("plan"))(handled(plan_command))
app.command("demo", epilog=_example("demo"))(handled(demo_command))
app.command("export", epilog=_example("export"))(handled(export_command))
app.command("inspect", epilog=_example("inspect"))(handled(inspect_command))
app.command("latency", epilog=_example("latency"))(handled(latency_command))
app.command(
    "distill",
    help="Same as convert (kept for the paper's vocabulary): with --dataset it calibrates and distils.",
    epilog=_example("distill"),
)(handled(convert_command))
app.command("train", epilog=_example("train"))(handled(train_command))
app.command("eval", epilog=_example("eval"))(handled(eval_command))
app.command("visualize", epilog=_example("visualize"))(handled(visualize_command))
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
convert_app.command(epilog="Example: dacnn-convert resnet34 --mode mix --regulators all --dry-run")(
    handled(convert_command)
)


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
