"""``visualize``: the input images that excite chosen filters most (paper section 4.3)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import write_failed
from ..recipes import parse_input_size
from .common import console, load_checkpoint
from .guards import check_output_file
from .options import FileOverwriteOpt, SizeOpt, SkelOpt


def visualize_command(
    checkpoint: Annotated[
        str, typer.Argument(help="a .safetensors file, or a model source (dacnn:5-plain) for random weights")
    ],
    layers: Annotated[str, typer.Option(help="comma-separated module names, e.g. sections.0.1.0,sections.1.0.0")],
    filters: Annotated[int, typer.Option(min=1, help="the first N filters of each layer")] = 5,
    steps: Annotated[int, typer.Option(min=1, help="gradient-ascent steps per layer")] = 100,
    input_size: SizeOpt = None,
    out: Annotated[Path, typer.Option(help="the PNG grid to write")] = Path("filters.png"),
    model_source: SkelOpt = None,
    overwrite: FileOverwriteOpt = False,
) -> None:
    """Images that excite chosen filters most, by gradient ascent on the input (paper section 4.3)."""
    from ..visualize import visualize_filters

    check_output_file(out, (checkpoint,), overwrite)
    if Path(checkpoint).suffix == ".safetensors":
        model = load_checkpoint(Path(checkpoint), model_source)
    else:
        from ..io.sources import build_model, parse_spec

        model = build_model(parse_spec(checkpoint), weights="none")
    size = parse_input_size(input_size) or (3, 32, 32)
    result = visualize_filters(model, [s.strip() for s in layers.split(",") if s.strip()], filters, size, steps)
    try:
        path = result.save_grid(out)
    except OSError as exc:  # a missing, read-only or full folder: one line
        raise write_failed(exc.filename or out, exc) from None
    for layer, acts in result.activation.items():
        console.print(f"{layer}: mean responses " + ", ".join(f"{a:.2f}" for a in acts))
    console.print(f"wrote {path}")
