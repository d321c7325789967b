"""``recipe list|run`` and ``table params|accuracy``: the paper's tables, reproduced and compared."""

from __future__ import annotations

import json
import shlex
import sys
import time
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..atomic import atomic_write_text
from ..defaults import DEVICE_HELP, SEED_MAX
from ..errors import DacnnError, OutputError, UsageError, first_line, marked
from ..io.files import not_a_folder
from .common import DataOptions, console, handled, load_checkpoint
from .options import DownloadOpt, LimitOpt, OverwriteOpt, TrainLimitOpt

recipe_app = typer.Typer(
    help="Recipes: YAML files that fix every setting of a paper table row or a conversion.", no_args_is_help=True
)
table_app = typer.Typer(help="The paper's tables next to ours.", no_args_is_help=True)


@recipe_app.command("list")
@handled
def recipe_list(root: Annotated[Path, typer.Option(help="folder searched for *.yaml")] = Path("recipes")) -> None:
    """Every recipe under ROOT with its task, model, data and the paper's figure for that row."""
    from ..recipes import find_recipes, load_recipe

    table = Table(title=f"recipes in {root}")
    for col in ("recipe", "task", "model", "dataset", "epochs", "paper"):
        table.add_column(col)
    for path in find_recipes(root):
        r = load_recipe(path)
        paper = f"Table {r.paper_table}: {r.paper_error}% err" if r.paper_table and r.paper_error else ""
        table.add_row(str(path), r.task, r.model or "", r.dataset or "", str(r.epochs), paper)
    console.print(table)


@recipe_app.command("run")
@handled
def recipe_run(
    recipe: Annotated[Path, typer.Argument(help="a recipe .yaml")],
    epochs: Annotated[int | None, typer.Option(min=1, help="override the recipe's epochs (short runs)")] = None,
    limit_batches: LimitOpt = None,
    train_limit: TrainLimitOpt = None,
    dataset: Annotated[str | None, typer.Option(help="override the dataset (e.g. fashion-mnist offline)")] = None,
    precision: Annotated[str | None, typer.Option(help="override the precision")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="override the batch size")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder (default runs/recipes/RECIPE)")] = None,
    download: DownloadOpt = False,
    weights: Annotated[str | None, typer.Option(help="override the weights: DEFAULT, none or a PATH")] = None,
    device: Annotated[str | None, typer.Option(help="override the device: " + DEVICE_HELP)] = None,
    seed: Annotated[
        int | None, typer.Option(min=0, max=SEED_MAX, help="override the seed (data order, initialisation)")
    ] = None,
    overwrite: OverwriteOpt = False,
    model: Annotated[
        str | None,
        typer.Option(help="override the model; a recipe naming user code (pkg.mod:factory) runs only when named here"),
    ] = None,
) -> None:
    """Run a recipe: train (paper rows) or convert + distil; writes recipe.yaml and result.json."""
    from ..recipes import check_recipe_code, load_recipe

    loaded = load_recipe(recipe)
    if loaded.task != "bench":  # a bench recipe is refused first (run_recipe names dacnn bench)
        check_recipe_code(loaded, recipe, model)
    r = loaded.override(
        model=model,
        epochs=epochs,
        dataset=dataset,
        precision=precision,
        batch_size=batch_size,
        train_limit=train_limit,
        out=str(out) if out else None,
        weights=weights,
        seed=seed,
    )
    result = run_recipe(r, recipe, limit_batches, download, device, overwrite)
    console.print(
        f"{recipe}: top-1 {100 * result['accuracy']:.2f}% ({result['params']:,} params, "
        f"{result['wall_s']:.0f} s); wrote {result['out']}/result.json"
    )


def run_recipe(
    r: Any,
    path: Path,
    limit_batches: int | None = None,
    download: bool = False,
    device: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the resolved recipe ``r``; return (and write) its result record."""
    import torch

    from ..core.plan import count_params
    from .convert import run_convert
    from .train import run_train

    if r.task == "bench":
        raise UsageError(f"{path} is a bench recipe: run it with `dacnn bench --recipe {path}`")
    if r.model is None or r.dataset is None:
        from ..errors import RecipeError

        raise RecipeError(f"{path}: a runnable recipe names a model and a dataset")
    out = Path(r.out) if r.out else Path("runs/recipes") / path.stem
    r = r.override(limit_batches=limit_batches, download=download or None, device=device, out=str(out))
    limit_batches = r.limit_batches  # the recipe's own cap counts as a short run too
    data = DataOptions.from_recipe(r, overwrite=overwrite)
    start = time.perf_counter()
    if r.task == "train":
        fit = run_train(r.model, r.dataset, out, r.weights or "none", r.input_size, data)
        atomic_write_text(out / "recipe.yaml", r.resolved().to_yaml())
        # the model just trained builds the skeleton: user code was named on the command line to train it
        model = load_checkpoint(Path(fit.checkpoint), r.model) if fit.checkpoint else None
        accuracy, params = fit.best_acc, count_params(model) if model is not None else 0
    else:
        done = run_convert(r, data, write_recipe=True)
        res = done.pipeline
        accuracy = res.finetuned_acc if res is not None else float("nan")
        params = done.report.params_after
    where = data.torch_device()
    device = torch.cuda.get_device_name(where) if where.type == "cuda" else "CPU"
    record = {
        "recipe": str(path),
        "model": r.model,
        "dataset": r.dataset,
        "epochs": r.epochs,
        "limit_batches": limit_batches,
        "train_limit": r.train_limit,
        "seed": r.seed,
        "accuracy": accuracy,
        "error": 100 * (1 - accuracy),
        "params": params,
        "wall_s": time.perf_counter() - start,
        "device": device,
        "date": str(date.today()),
        "command": " ".join(["dacnn", *map(shlex.quote, sys.argv[1:])]),
        "paper_table": r.paper_table,
        "paper_row": r.paper_row,
        "paper_error": r.paper_error,
        "paper_params": r.paper_params,
        "out": str(out),
    }
    atomic_write_text(out / "result.json", json.dumps(record, indent=2))
    return record


@table_app.command("params")
@handled
def table_params(
    markdown: Annotated[bool, typer.Option("--markdown", help="print a Markdown table instead")] = False,
) -> None:
    """Parameter counts of Tables 2-6 and 8: paper vs ours (conv kernels + FC; all params too)."""
    from ..paper import param_rows

    rows = param_rows()
    if markdown:
        console.print(
            "| table | row | paper | ours (kernels + FC) | ours, all params | rounds to paper |", soft_wrap=True
        )
        console.print("|---|---|---:|---:|---:|:---:|", soft_wrap=True)
    else:
        table = Table(title="parameters: paper vs ours")
        for col in ("table", "row", "paper", "ours", "exact", "all params", "="):
            table.add_column(col, justify="left" if col in ("table", "row") else "right")
    for r in rows:
        paper = "–" if r.paper is None else f"{r.paper:g}{r.unit}"
        ours = f"{r.ours:.3f}{r.unit}" if r.unit != "K" else f"{r.ours:.1f}K"
        mark = "–" if r.matches is None else ("yes" if r.matches else "no")
        if markdown:
            console.print(
                f"| {r.table} | {r.row} | {paper} | {ours} ({r.ours_exact:,}) | {r.all_params:,} | {mark} |",
                soft_wrap=True,
            )
        else:
            table.add_row(r.table, r.row, paper, ours, f"{r.ours_exact:,}", f"{r.all_params:,}", mark)
    if not markdown:
        console.print(table)
    n = sum(r.matches is not None for r in rows)
    console.print(
        f"{sum(bool(r.matches) for r in rows)} of {n} printed counts reproduced; docs/paper-tables.md "
        "explains the others."
    )


@table_app.command("accuracy")
@handled
def table_accuracy(
    results: Annotated[Path, typer.Option(help="folder of result.json files (recipe runs)")] = Path(
        "benchmarks/results/paper"
    ),
    png: Annotated[Path | None, typer.Option(help="also plot error vs parameters here (Figure 5 style)")] = None,
) -> None:
    """Paper error vs ours for every recipe result found, as Markdown (and a PNG)."""
    if png is not None and png.is_dir():  # refused before the table, not after it
        raise UsageError(f"«png» {png} is a folder; give the file to write, e.g. {png / 'accuracy.png'}")
    records = _result_records(results)
    console.print(
        "| recipe | model | dataset | epochs | paper err (%) | ours err (%) | params | device | wall (s) |",
        soft_wrap=True,
    )
    console.print("|---|---|---|---:|---:|---:|---:|---|---:|", soft_wrap=True)
    for r in records:
        short = "" if r.get("limit_batches") is None and r.get("train_limit") is None else " (short run)"
        paper = "–" if r["paper_error"] is None else f"{r['paper_error']:.2f}"
        console.print(
            f"| {Path(r['recipe']).stem}{short} | {r['model']} | {r['dataset']} | {r['epochs']} | {paper} | "
            f"{r['error']:.2f} | {r['params']:,} | {r['device']} | {r['wall_s']:.0f} |",
            soft_wrap=True,
        )
    if png is not None and records:
        from ..core.report import figure, save_figure

        fig, ax = figure(size=(6, 4))
        for r in records:
            ax.scatter(r["params"], r["error"], color="C0")
            if r["paper_error"] is not None and r.get("paper_params"):
                ax.scatter(r["paper_params"] * 1e6, r["paper_error"], color="C1", marker="x")
            ax.annotate(Path(r["recipe"]).stem, (r["params"], r["error"]), fontsize=5)
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("top-1 error (%)")
        ax.set_title("ours (dots) vs paper (crosses)")
        try:
            console.print(f"wrote {save_figure(fig, png)}")
        except OutputError as exc:  # its advice names «out»; the flag here is «png»
            raise OutputError(marked(exc).replace("«out»", "«png»")) from None


# what a row of the accuracy table prints from a result.json (paper_error may be null)
_RESULT_KEYS = ("recipe", "model", "dataset", "epochs", "paper_error", "error", "params", "device", "wall_s")


def _result_records(folder: Path) -> list[dict[str, Any]]:
    """The recipe results (``result.json`` records with a ``paper_error``) under ``folder``, sorted by path.

    Raises:
        UsageError: ``folder`` is missing or not a folder. DacnnError: a .json file there cannot be
            read, or a result lacks a field of the table (named, with the file).
    """
    why = not_a_folder(folder, "results folder")
    if why is not None:
        raise UsageError(f"{why}; «results» is the folder holding the result.json files of `dacnn recipe run`")
    records = []
    for path in sorted(folder.rglob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise DacnnError(
                f"{str(path)!r} under «results» is not readable JSON ({first_line(exc)}); remove or repair it"
            ) from None
        if not isinstance(record, dict) or "paper_error" not in record:
            continue  # another JSON file (a history, a report): not a recipe result
        missing = [k for k in _RESULT_KEYS if k not in record]
        wrong = [k for k in ("error", "params", "wall_s") if k in record and not _is_number(record[k])]
        wrong += [k for k in ("paper_error", "paper_params") if record.get(k) is not None and not _is_number(record[k])]
        wrong += [] if isinstance(record.get("recipe", ""), str) else ["recipe"]
        if missing or wrong:
            what = f"lacks {', '.join(missing)}" if missing else f"has a wrong type of {', '.join(wrong)}"
            raise DacnnError(f"{str(path)!r} is a recipe result that {what}; was it edited? Run its recipe again")
        records.append(record)
    return records


def _is_number(value: object) -> bool:
    """A JSON number (a bool is not one)."""
    return isinstance(value, int | float) and not isinstance(value, bool)
