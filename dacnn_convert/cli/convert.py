"""``convert`` (also ``distill``) and ``demo``: conversion, then optionally calibration and distillation."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from ..defaults import CALIB_BATCHES, FINETUNE_LR, FINETUNE_WARMUP_STEPS, RESCORE_ROUNDS, SCORE_BATCHES
from ..errors import UsageError
from .common import DataOptions, JsonOpt, _Progress, console, print_json, recipe_from_command
from .guards import output_guard
from .options import (
    Augment,
    AugOpt,
    BankOpt,
    BatchOpt,
    CalibOpt,
    ChannelsLastOpt,
    CkptOpt,
    ClassesOpt,
    ClipOpt,
    DatasetOpt,
    DeviceOpt,
    DownloadOpt,
    DryOpt,
    Dtype,
    DtypeOpt,
    EpochsOpt,
    FactorOpt,
    FeatOpt,
    FeatureLoss,
    FeatWOpt,
    InitOpt,
    KdAOpt,
    KdTOpt,
    LatencyBatchOpt,
    LeafOpt,
    LimitOpt,
    LrOpt,
    MetricOpt,
    Mode,
    ModeOpt,
    Optimizer,
    OptimOpt,
    OptModelArg,
    OutOpt,
    OverwriteOpt,
    PlotOpt,
    Precision,
    PrecOpt,
    PruneImportance,
    PruneImportanceOpt,
    PruneOpt,
    RecipeOpt,
    ReconstructOpt,
    RegInitOpt,
    RegOpt,
    RegulatorStyle,
    RescoreOpt,
    ResumeOpt,
    SchedOpt,
    Schedule,
    ScoreBatchesOpt,
    SeedOpt,
    ShareAcrossOpt,
    ShareOpt,
    SizeOpt,
    SmoothOpt,
    StyleOpt,
    SweepOpt,
    TargetBytesOpt,
    TargetLatencyOpt,
    TargetMacsOpt,
    TargetParamsOpt,
    TargetRatioOpt,
    TrainLimitOpt,
    WarmOpt,
    WdOpt,
    WeightsOpt,
)
from .render import render_accuracy, render_plan, render_report
from .train import run_train


def run_convert(
    rec: Any,
    data: DataOptions | None = None,
    *,
    dry_run: bool = False,
    render: bool = True,
    write_recipe: bool = False,
    command: str | None = None,
    inputs: tuple[Any, ...] = (),
) -> Any:
    """Guard the output folder, run :func:`dacnn_convert.jobs.run_convert_job` on the resolved
    recipe ``rec`` (with ``data``: on its loaders and device), and render what it returns."""
    from ..jobs import output_folder, run_convert_job

    if rec.model is None:  # before any folder is made or checked
        raise UsageError("give a MODEL (e.g. resnet34) or a --recipe that names one")
    weights = rec.weights or "DEFAULT"
    with_data = data is not None and bool(data.dataset)
    from ..train.device import resolve_device

    # checked with data or without: a --device this machine lacks is refused, not ignored
    device = data.torch_device() if with_data else resolve_device(rec.device)  # type: ignore[union-attr]
    guarded = None if dry_run else output_folder(rec)
    with output_guard(guarded, data, (weights, *inputs)), _Progress() as progress:
        job = run_convert_job(
            rec,
            loaders_for=data.loaders if with_data else None,  # type: ignore[union-attr]
            device=device,
            dry_run=dry_run,
            write_recipe=write_recipe,
            command=command,
            resume=data.resume if data is not None else False,
            config=data.config() if with_data else None,  # type: ignore[union-attr]
            on_stage=progress.stage,
            on_step=progress.step,
            on_epoch=progress.epoch_end,
        )
    if not render:
        return job
    if job.search is not None:
        for line in job.search.explain():
            console.print(line, highlight=False, soft_wrap=True)
        advice = job.search.advice(cli=True)
        if advice:
            console.print(f"note: {advice}", highlight=False, soft_wrap=True)
    if dry_run:
        render_plan(job.plan, job.source, job.macs_before)
        return job
    if job.pipeline is not None:
        if data is not None and data.plot and job.pipeline.fit is not None and job.out is not None:
            from ..core.report import plot_accuracy

            marks = {"teacher": job.pipeline.teacher_acc, "after BN recalibration": job.pipeline.calibrated_acc}
            console.print(f"wrote {plot_accuracy(job.pipeline.fit.history, marks, job.out / 'accuracy.png')}")
        render_report(job.pipeline.report)
        render_accuracy(job.pipeline)
    else:
        render_report(job.report)
    console.print(f"wrote {', '.join(str(f) for f in job.files if f.name != 'recipe.yaml')}")
    return job


def command_line(ctx: typer.Context | None) -> str | None:
    """The command being run, rebuilt from the flags given on the command line (for model cards)."""
    import shlex

    if ctx is None:
        return None
    words = ["dacnn-convert"]
    for name, value in ctx.params.items():
        if getattr(ctx.get_parameter_source(name), "name", "") != "COMMANDLINE" or value is None:
            continue
        value = value.value if isinstance(value, Enum) else value
        if name == "model":
            words.insert(1, shlex.quote(str(value)))
        elif isinstance(value, bool):
            words.append(f"--{'' if value else 'no-'}{name.replace('_', '-')}")
        else:
            for v in value if isinstance(value, list) else [value]:
                words += [f"--{name.replace('_', '-')}", shlex.quote(str(v))]
    return " ".join(words)


def convert_command(
    ctx: typer.Context,
    model: OptModelArg = None,
    mode: ModeOpt = Mode.mix,
    regulators: RegOpt = "none",
    regulator_style: StyleOpt = RegulatorStyle.adapter,
    regulator_init: RegInitOpt = None,
    reconstruct: ReconstructOpt = None,
    bank_size: BankOpt = "0.5",
    factorize_unshared: FactorOpt = None,
    share: ShareOpt = None,
    init: InitOpt = None,
    weights: WeightsOpt = "DEFAULT",
    num_classes: ClassesOpt = None,
    input_size: SizeOpt = None,
    out: OutOpt = None,
    dry_run: DryOpt = False,
    leaf_module: LeafOpt = None,
    dtype: DtypeOpt = Dtype.fp32,
    dataset: DatasetOpt = None,
    epochs: EpochsOpt = 1,
    batch_size: BatchOpt = 128,
    lr: LrOpt = FINETUNE_LR,
    optimizer: OptimOpt = Optimizer.sgd,
    schedule: SchedOpt = Schedule.cosine,
    kd_temperature: KdTOpt = 4.0,
    kd_alpha: KdAOpt = 0.9,
    calib_batches: CalibOpt = CALIB_BATCHES,
    precision: PrecOpt = Precision.auto,
    limit_batches: LimitOpt = None,
    train_limit: TrainLimitOpt = None,
    download: DownloadOpt = False,
    seed: SeedOpt = 0,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    checkpoint_every: CkptOpt = None,
    feature_loss: FeatOpt = FeatureLoss.none,
    feature_weight: FeatWOpt = 1.0,
    plot: PlotOpt = False,
    augment: AugOpt = Augment.auto,
    weight_decay: WdOpt = 5e-4,
    label_smoothing: SmoothOpt = 0.0,
    warmup_steps: WarmOpt = FINETUNE_WARMUP_STEPS,
    clip_grad: ClipOpt = None,
    channels_last: ChannelsLastOpt = True,
    device: DeviceOpt = "auto",
    recipe: RecipeOpt = None,
    target_params: TargetParamsOpt = None,
    target_ratio: TargetRatioOpt = None,
    target_bytes: TargetBytesOpt = None,
    target_macs: TargetMacsOpt = None,
    target_latency: TargetLatencyOpt = None,
    latency_batch: LatencyBatchOpt = 1,
    metric: MetricOpt = None,
    score_batches: ScoreBatchesOpt = SCORE_BATCHES,
    rescore_rounds: RescoreOpt = RESCORE_ROUNDS,
    prune: PruneOpt = None,
    prune_importance: PruneImportanceOpt = PruneImportance.group,
    share_across: ShareAcrossOpt = False,
) -> None:
    """Convert a pretrained CNN into a deep anchored CNN (shared conv kernels, free BatchNorms).

    With --dataset, also recalibrate BatchNorm and distil the original into the anchored net.
    With --recipe FILE, the recipe's settings apply wherever no flag was given.
    """
    rec = recipe_from_command(ctx, "convert", recipe)
    if ctx.info_name == "distill" and not rec.dataset and not dry_run:
        raise UsageError(
            "dacnn distill needs --dataset: the data to calibrate and fine-tune on "
            "(to convert without data, use dacnn convert)"
        )
    data = DataOptions.from_recipe(rec, resume=resume, overwrite=overwrite)
    run_convert(
        rec,
        data,
        dry_run=dry_run,
        write_recipe=recipe is not None,
        command=command_line(ctx),
        inputs=(recipe,) if recipe is not None else (),
    )


def demo_command(
    out: Annotated[Path, typer.Option(help="output folder; a teacher found there is reused")] = Path("runs/demo"),
    teacher_epochs: Annotated[int, typer.Option(min=1, help="epochs to train the teacher")] = 4,
    epochs: EpochsOpt = 2,
    train_limit: Annotated[int, typer.Option(min=256, help="training images used (fixed random subset)")] = 15000,
    target_ratio: Annotated[float, typer.Option(min=1.0, help="how many times smaller the student is")] = 4.0,
    precision: PrecOpt = Precision.auto,
    device: DeviceOpt = "auto",
) -> None:
    """Quick start, offline: train a ResNet-18 teacher on Fashion-MNIST, shrink it 4x with filter banks, distil."""
    teacher = out / "teacher" / "best.safetensors"
    if teacher.is_file():
        console.print(f"reusing the teacher in {teacher}")
    else:
        console.print(f"training a ResNet-18 teacher on {train_limit} Fashion-MNIST images ({teacher_epochs} epochs)")
        # a warm-up and a lower peak lr than from-scratch recipes: short runs at 0.05 swung 83-86%
        run_train(
            "resnet18",
            "fashion-mnist",
            teacher.parent,
            "none",
            "32",
            DataOptions.of(
                "fashion-mnist",
                task="train",
                epochs=teacher_epochs,
                lr=0.03,
                precision=precision,
                train_limit=train_limit,
                warmup_steps=100,
                device=device,
                overwrite=True,  # no finished teacher there: start afresh
            ),
        )
    console.print(
        f"planning a {target_ratio:g}x smaller student (filter banks, searched with the data), "
        "fitting it to the activations; then BN recalibration and KD fine-tune"
    )
    from ..recipes import Recipe

    student = Recipe(
        model="resnet18",
        mode="bank",
        init="act",
        weights=str(teacher),
        num_classes=10,
        input_size="32",
        out=str(out / "student"),
        dataset="fashion-mnist",
        epochs=epochs,
        lr=0.02,  # as measured
        warmup_steps=0,
        calib_batches=50,
        precision=precision.value,
        train_limit=train_limit,
        device=device,
        target_ratio=target_ratio,
    )
    run_convert(student, DataOptions.from_recipe(student, overwrite=True))


def plan_command(
    ctx: typer.Context,
    model: OptModelArg = None,
    weights: WeightsOpt = "DEFAULT",
    num_classes: ClassesOpt = None,
    input_size: SizeOpt = None,
    mode: ModeOpt = Mode.mix,
    regulators: RegOpt = "none",
    bank_size: BankOpt = "0.5",
    factorize_unshared: FactorOpt = None,
    share: ShareOpt = None,
    target_params: TargetParamsOpt = None,
    target_ratio: TargetRatioOpt = None,
    target_bytes: TargetBytesOpt = None,
    target_macs: TargetMacsOpt = None,
    target_latency: TargetLatencyOpt = None,
    latency_batch: LatencyBatchOpt = 1,
    metric: MetricOpt = None,
    score_batches: ScoreBatchesOpt = SCORE_BATCHES,
    rescore_rounds: RescoreOpt = RESCORE_ROUNDS,
    prune: PruneOpt = None,
    prune_importance: PruneImportanceOpt = PruneImportance.group,
    share_across: ShareAcrossOpt = False,
    dataset: DatasetOpt = None,
    train_limit: TrainLimitOpt = None,
    explain: Annotated[
        bool, typer.Option(help="print the budget search: best candidates and each section's options")
    ] = False,
    leaf_module: LeafOpt = None,
    device: DeviceOpt = "auto",
    json_out: JsonOpt = False,
    sweep: SweepOpt = False,
) -> None:
    """Print the conversion plan, by mode or by a size target (nothing is converted or written)."""
    if model is None:
        raise UsageError("give a MODEL, e.g. dacnn plan resnet34 --target-ratio 4 --explain")
    rec = recipe_from_command(ctx, "convert")
    data = DataOptions.from_recipe(rec) if dataset else None
    if sweep:
        if any(t is not None for t in (target_params, target_ratio, target_bytes)):
            raise UsageError("--sweep plans at its own sizes (1.5x to 20x): leave out --target-params/ratio/bytes")
        if target_latency is not None:
            raise UsageError("--sweep predicts, it does not time plans: leave out --target-latency (or plan one size)")
        if share_across:
            raise UsageError(
                "--sweep predicts plans from the additive scores, within stages: leave out --share-across "
                "(or plan one size with it)"
            )
        _sweep(rec, data, json_out)
        return
    job = run_convert(rec, data, dry_run=True, render=False)
    if json_out:
        p = job.plan
        print_json(
            {
                "model": job.source,
                "params_before": p.params_before,
                "params_after": p.params_after,
                "ratio": p.params_before / max(p.params_after, 1),
                "macs_before": job.macs_before,
                "macs_after": job.macs_before - p.macs_saved,
                "plan": p.to_dict(),
                "search": job.search.to_dict() if job.search is not None else None,
            }
        )
        return
    for line in job.search.explain() if explain and job.search is not None else []:
        console.print(line, highlight=False, soft_wrap=True)
    render_plan(job.plan, model, job.macs_before)
    advice = job.search.advice(cli=True) if job.search is not None else None
    if advice:
        console.print(f"note: {advice}", highlight=False, soft_wrap=True)


def _sweep(rec: Any, data: DataOptions | None, json_out: bool) -> None:
    """Run and render ``dacnn plan --sweep``."""
    from ..jobs import run_sweep_job
    from ..train.device import resolve_device
    from .render import render_sweep

    device = data.torch_device() if data is not None else resolve_device(rec.device)
    with _Progress():
        job = run_sweep_job(rec, None, loaders_for=data.loaders if data is not None else None, device=device)
    if json_out:
        print_json(
            {
                "model": job.source,
                "params_before": job.params_before,
                "macs_before": job.macs_before,
                "points": [
                    p.to_dict() | ({"macs_after": job.macs_before - p.found.plan.macs_saved} if p.found else {})
                    for p in job.points
                ],
            }
        )
        return
    render_sweep(job)
