"""``bench``: anchoring against pruning baselines at one parameter budget, the same fine-tune for all."""

from __future__ import annotations

import platform
import shlex
import sys
from datetime import date
from pathlib import Path
from typing import Annotated

import typer

from ..defaults import CALIB_BATCHES, FINETUNE_LR, FINETUNE_WARMUP_STEPS
from ..errors import UsageError
from ..recipes import parse_input_size
from .common import DataOptions, console, recipe_from_command
from .guards import output_guard
from .options import (
    PANEL_SHARE,
    Augment,
    AugOpt,
    BatchOpt,
    CalibOpt,
    ChannelsLastOpt,
    ClassesOpt,
    ClipOpt,
    DeviceOpt,
    DownloadOpt,
    EpochsOpt,
    KdAOpt,
    KdTOpt,
    LimitOpt,
    LrOpt,
    Optimizer,
    OptimOpt,
    OptModelArg,
    OverwriteOpt,
    Precision,
    PrecOpt,
    RecipeOpt,
    SchedOpt,
    Schedule,
    SeedOpt,
    SizeOpt,
    SmoothOpt,
    TrainLimitOpt,
    WarmOpt,
    WdOpt,
    WeightsOpt,
)
from .render import fitted_table, left_out

DEFAULT_METHODS = "dacnn-mix-reg,dacnn-mix,magnitude,l1-filter,group-norm"


def _environment() -> dict[str, str]:
    """Command, machine, versions and date, written at the top of bench.md."""
    import torch

    gpu = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"
    return {
        "Command": " ".join(["dacnn bench", *map(shlex.quote, sys.argv[2:])]),
        "Machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {gpu}",
        "Versions": f"torch {torch.__version__}, python {platform.python_version()}",
        "Date": str(date.today()),
    }


def bench_command(
    ctx: typer.Context,
    model: OptModelArg = None,
    dataset: Annotated[
        str | None, typer.Option(help="fashion-mnist, cifar10, cifar100, svhn, synthetic or imagefolder:PATH")
    ] = None,
    weights: WeightsOpt = "none",
    num_classes: ClassesOpt = None,
    methods: Annotated[
        str,
        typer.Option(
            help="comma-separated: dacnn-mix, dacnn-mix-reg, dacnn-plain, sharesnet, "
            "dacnn-budget, dacnn-bank, lowrank, magnitude, l1-filter, group-norm"
        ),
    ] = DEFAULT_METHODS,
    budget: Annotated[
        float | None, typer.Option(help="size budget as a fraction of the teacher's params (0.25 keeps a quarter)")
    ] = None,
    match: Annotated[str | None, typer.Option(help="prune to the size of this anchoring method")] = None,
    budget_macs: Annotated[
        float | None,
        typer.Option(
            help="compute budget as a fraction of the teacher's MACs: alone (pruning hits it within 1%, the "
            "planner meets it), or with --budget (the planner meets both, pruning keeps the params budget)"
        ),
    ] = None,
    repeats: Annotated[int, typer.Option(min=1, help="seeds per method; mean ± std reported")] = 1,
    out: Annotated[Path, typer.Option(help="folder for bench.md/json/csv/png and each method's artefact")] = Path(
        "runs/bench"
    ),
    input_size: SizeOpt = None,
    epochs: EpochsOpt = 1,
    batch_size: BatchOpt = 128,
    lr: LrOpt = FINETUNE_LR,
    optimizer: OptimOpt = Optimizer.sgd,
    schedule: SchedOpt = Schedule.cosine,
    warmup_steps: WarmOpt = FINETUNE_WARMUP_STEPS,
    weight_decay: WdOpt = 5e-4,
    kd_temperature: KdTOpt = 4.0,
    kd_alpha: KdAOpt = 0.9,
    label_smoothing: SmoothOpt = 0.0,
    clip_grad: ClipOpt = None,
    calib_batches: CalibOpt = CALIB_BATCHES,
    reconstruct: Annotated[
        bool | None,
        typer.Option(
            "--reconstruct/--no-reconstruct",
            help="the anchoring methods reconstruct each section after the BN step, as their conversion "
            "does with data [default: reconstruct]",
            rich_help_panel=PANEL_SHARE,
        ),
    ] = None,
    precision: PrecOpt = Precision.auto,
    channels_last: ChannelsLastOpt = True,
    augment: AugOpt = Augment.auto,
    limit_batches: LimitOpt = None,
    train_limit: TrainLimitOpt = None,
    latency_repeats: Annotated[int, typer.Option(min=1, help="timed runs per model and batch size")] = 20,
    download: DownloadOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    recipe: RecipeOpt = None,
) -> None:
    """Compare compression methods on one teacher at the same size, with the same KD fine-tune.

    With --recipe FILE (``task: bench``), the recipe's settings apply wherever no flag was given.
    """
    import torch

    from ..bench import BenchConfig, run_bench
    from ..io.sources import build_model, input_config, parse_spec

    rec = recipe_from_command(ctx, "bench", recipe)
    if rec.model is None or rec.dataset is None:
        raise UsageError("dacnn bench needs a MODEL and --dataset (on the command line or in the --recipe)")
    model, weights, out = rec.model, rec.weights or "none", Path(rec.out or "runs/bench")
    num_classes, input_size, seed, repeats = rec.num_classes, rec.input_size, rec.seed, rec.repeats
    data = DataOptions.from_recipe(rec, overwrite=overwrite)
    config = BenchConfig(
        tuple(m.strip() for m in (rec.methods or DEFAULT_METHODS).split(",") if m.strip()),
        rec.budget,
        rec.match,
        rec.repeats,
        rec.calib_batches,
        budget_macs=rec.budget_macs,
        latency_repeats=rec.latency_repeats,
        train=data.config(),
        reconstruct=rec.reconstruct is not False,
    )
    preprocess = input_config(None, parse_spec(model, num_classes), weights)
    size = data.input_size(parse_input_size(input_size), preprocess.input_size)
    with output_guard(out, data, (weights,)), console.status("benchmarking") as status:
        loaders = data.loaders(size, preprocess)
        spec = parse_spec(model, num_classes or loaders.num_classes)
        torch.manual_seed(seed)
        teacher = build_model(spec, weights).eval().to(data.torch_device())

        def on_event(event: str, d: dict) -> None:
            if event == "method":
                status.update(f"{d['method']} (seed {d['seed']}): compressing, calibrating, fine-tuning")
            elif event == "done":
                console.print(
                    f"{d['method']} seed {d['seed']}: {d['params']:,} params, accuracy "
                    f"{100 * d['acc_compressed']:.2f}% -> {100 * d['acc_finetuned']:.2f}% ({d['wall_s']:.0f} s)"
                )
            elif event == "latency":
                status.update(f"timing every model at batch {d['batch']}")

        result = run_bench(teacher, loaders, size, config, out, spec, on_event, meta=_environment())
    columns = [  # (name, kind, priority: higher is left out first on a narrow console)
        ("method", "text", 0),
        ("params", "num", 0),
        ("bytes", "num", 5),
        ("prune", "num", 4),
        ("MACs", "num", 1),
        ("b1 ms", "num", 3),
        ("b64 ms", "num", 6),
        ("acc before", "num", 2),
        ("acc after", "num", 0),
        ("drop", "num", 1),
    ]
    t = result.teacher
    rows = [
        [
            "teacher",
            f"{t.params:,}",
            f"{t.bytes:,}",
            "0%",
            f"{t.macs / 1e6:.0f}M",
            f"{t.latency_b1_ms or 0:.2f}",
            f"{t.latency_b64_ms or 0:.1f}",
            "",
            f"{100 * t.acc_finetuned:.2f}%",
            "",
        ]
    ]
    for s in result.summary():
        std = f" ± {100 * s['acc_std']:.2f}" if repeats > 1 else ""
        rows.append(
            [
                s["method"],
                f"{s['params']:,}",
                f"{s['bytes']:,}",
                f"{100 * s['prune_ratio']:.1f}%",
                f"{s['macs'] / 1e6:.0f}M",
                f"{s['latency_b1_ms'] or 0:.2f}",
                f"{s['latency_b64_ms'] or 0:.1f}",
                f"{100 * s['acc_calibrated']:.2f}%",
                f"{100 * s['acc_finetuned']:.2f}%{std}",
                f"{100 * s['drop']:.2f}",
            ]
        )
    budgets = [f"{result.target_params:,} params"] if result.target_params else []
    budgets += [f"{result.config.budget_macs:.0%} of its MACs"] if result.config.budget_macs else []
    title = f"{spec.display}: budget {', '.join(budgets) or 'none (fixed-size methods)'}"
    table, dropped = fitted_table(title, columns, rows)
    console.print(table)
    left_out(dropped)
    console.print(f"wrote {out}/bench.md, bench.json, bench.csv, bench.png ({result.wall_s / 60:.1f} min)")
