"""``train`` a reference teacher and ``eval`` a saved model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..atomic import atomic_write_text
from ..defaults import TRAIN_LR
from ..recipes import parse_input_size
from .common import (
    DataOptions,
    JsonOpt,
    _Progress,
    console,
    err_console,
    load_checkpoint,
    print_json,
    recipe_from_command,
    source_of,
)
from .guards import check_input_size, output_guard
from .options import (
    Augment,
    AugOpt,
    BatchOpt,
    ChannelsLastOpt,
    CkptOpt,
    ClipOpt,
    DeviceOpt,
    DownloadOpt,
    EpochsOpt,
    LimitOpt,
    LrOpt,
    ModelArg,
    Optimizer,
    OptimOpt,
    OverwriteOpt,
    Precision,
    PrecOpt,
    ResumeOpt,
    SchedOpt,
    Schedule,
    SeedOpt,
    SizeOpt,
    SkelOpt,
    SmoothOpt,
    TrainLimitOpt,
    WarmOpt,
    WdOpt,
    WeightsOpt,
)


def train_command(
    ctx: typer.Context,
    model: ModelArg,
    dataset: Annotated[str, typer.Option(help="fashion-mnist, cifar10, cifar100, svhn or synthetic")],
    out: Annotated[Path, typer.Option(help="folder for best.safetensors, last.safetensors and history.json")],
    weights: WeightsOpt = "none",
    input_size: SizeOpt = None,
    epochs: EpochsOpt = 1,
    batch_size: BatchOpt = 128,
    lr: LrOpt = TRAIN_LR,
    optimizer: OptimOpt = Optimizer.sgd,
    schedule: SchedOpt = Schedule.cosine,
    precision: PrecOpt = Precision.auto,
    limit_batches: LimitOpt = None,
    train_limit: TrainLimitOpt = None,
    download: DownloadOpt = False,
    seed: SeedOpt = 0,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    checkpoint_every: CkptOpt = None,
    augment: AugOpt = Augment.auto,
    weight_decay: WdOpt = 5e-4,
    label_smoothing: SmoothOpt = 0.0,
    warmup_steps: WarmOpt = 0,
    clip_grad: ClipOpt = None,
    channels_last: ChannelsLastOpt = True,
    device: DeviceOpt = "auto",
) -> None:
    """Train a reference teacher from scratch (or from --weights) with cross-entropy."""
    rec = recipe_from_command(ctx, "train")
    run_train(model, dataset, out, weights, input_size, DataOptions.from_recipe(rec, resume, overwrite))


def run_train(model: str, dataset: str, out: Path, weights: str, input_size: str | None, data: DataOptions) -> Any:
    """Train ``model`` on ``dataset``; returns the FitResult."""
    import json

    import torch

    from ..io.sources import build_model, input_config, parse_spec
    from ..train import train

    preprocess = input_config(None, parse_spec(model, None), weights)
    size = data.input_size(parse_input_size(input_size), preprocess.input_size)
    config = data.config()
    with output_guard(out, data, (weights,)):
        loaders = data.loaders(size, preprocess)
        spec = parse_spec(model, loaders.num_classes)
        torch.manual_seed(data.seed)  # the random init too: same seed, same run, in any process
        net = build_model(spec, weights).to(data.torch_device())
        with _Progress() as progress:
            result = train(
                net, loaders.train, loaders.val, config, out, progress.step, progress.epoch_end, spec, data.resume
            )
        atomic_write_text(out / "history.json", json.dumps(result.to_dict(), indent=2))
    console.print(
        f"best val acc {100 * result.best_acc:.2f}% in {result.wall_s:.0f} s ({result.images_per_s:.0f} img/s, "
        f"{result.precision}); wrote {result.checkpoint}"
    )
    return result


def eval_command(
    checkpoint: Annotated[Path, typer.Argument(help="a .safetensors file written by dacnn (convert/train/distill)")],
    dataset: Annotated[str, typer.Option(help="fashion-mnist, cifar10, cifar100, svhn or synthetic")],
    input_size: SizeOpt = None,
    batch_size: BatchOpt = 256,
    precision: PrecOpt = Precision.auto,
    limit_batches: LimitOpt = None,
    download: DownloadOpt = False,
    model: SkelOpt = None,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Top-1 accuracy of a saved model (anchored or not) on a dataset's validation split."""
    from ..core.report import count_params
    from ..io.sources import input_config
    from ..train.evaluation import evaluate_counts

    data = DataOptions.of(dataset, batch_size=batch_size, download=download, device=device)
    net = load_checkpoint(checkpoint, model)
    preprocess = input_config(net, source_of(net, model))  # as the model was fine-tuned
    size = data.input_size(parse_input_size(input_size), preprocess.input_size)
    loaders = data.loaders(size, preprocess)
    net = net.to(data.torch_device())
    outputs = check_input_size(net, size)
    acc, seen = evaluate_counts(net, loaders.val, precision, limit_batches)
    from ..train.precision import resolve_precision

    used = resolve_precision(str(precision), next(net.parameters()).device)  # what "auto" became here
    if outputs != loaders.num_classes:
        (err_console if json_out else console).print(
            f"warning: the model has {outputs} outputs and {dataset} {loaders.num_classes} classes: its predictions "
            "include classes the dataset does not have, so this accuracy says little (fine-tune it on the dataset)",
            highlight=False,
            soft_wrap=True,
        )
    if json_out:
        print_json(
            {
                "checkpoint": str(checkpoint),
                "dataset": dataset,
                "top1": acc,
                "images": seen,
                "unique_params": count_params(net),
                "precision": used,
            }
        )
        return
    console.print(
        f"{checkpoint}: top-1 {100 * acc:.2f}% on {seen:,} {dataset} validation images "
        f"({count_params(net):,} unique params)"
    )
