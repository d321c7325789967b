"""``convert`` (also ``distill``) and ``demo``: conversion, then optionally calibration and distillation."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..atomic import atomic_write_text
from ..defaults import CALIBRATE_BATCHES, FINETUNE_LR, FINETUNE_WARMUP_STEPS, default_init
from ..errors import DacnnError, UsageError
from .common import (
    DataOptions,
    _leaf_types,
    _Progress,
    console,
    fail,
    parse_amount,
    parse_input_size,
    parse_rank,
    recipe_from_command,
)
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
    RecipeOpt,
    RegOpt,
    RegulatorStyle,
    ResumeOpt,
    SchedOpt,
    Schedule,
    SeedOpt,
    SizeOpt,
    SmoothOpt,
    StyleOpt,
    TargetBytesOpt,
    TargetParamsOpt,
    TargetRatioOpt,
    TrainLimitOpt,
    WarmOpt,
    WdOpt,
    WeightsOpt,
)
from .train import run_train


def run_convert(
    rec: Any,
    data: DataOptions | None = None,
    *,
    dry_run: bool = False,
    render: bool = True,
    write_recipe: bool = False,
    command: str | None = None,
) -> dict[str, Any]:
    """Load, plan, convert, measure and write, as the resolved recipe ``rec`` says; with
    ``data`` (and ``rec.dataset``), also calibrate and distil.

    ``write_recipe`` writes ``rec`` to ``OUT/recipe.yaml``; a size target in ``rec``
    (``target_params``/``target_ratio``/``target_bytes``) replaces mode and regulators by a
    budget search.
    """
    import torch

    from ..core.convert import convert
    from ..core.planning import make_plan
    from ..core.report import build_report, state_dict_bytes
    from ..io.card import model_card
    from ..io.checkpoint import save
    from ..io.sources import build_model, input_config, parse_spec

    if rec.model is None:
        raise UsageError("give a MODEL (e.g. resnet34) or a --recipe that names one")
    weights = rec.weights or "DEFAULT"
    spec = parse_spec(rec.model, rec.num_classes)
    size = parse_input_size(rec.input_size)
    leaves = _leaf_types([n for n in (rec.leaf_module or "").split(",") if n.strip()])
    out = Path(rec.out) if rec.out else Path("runs") / f"{spec.name.replace(':', '_').replace('/', '_')}-{rec.mode}"
    with_data = data is not None and bool(data.dataset)
    with output_guard(None if dry_run else out, data, (weights,)):
        torch.manual_seed(rec.seed)  # random weights (--weights none) are reproducible
        original = build_model(spec, weights).eval()
        if with_data:  # calibration, search and fine-tune run where the data goes
            original.to(data.torch_device())  # type: ignore[union-attr]
        preprocess = input_config(original, spec, weights)  # timm's data config / torchvision's transforms
        size = data.input_size(size, preprocess.input_size) if with_data else size or preprocess.input_size  # type: ignore[union-attr]
        init = default_init(rec.init, with_data)
        if init in ("act", "act-seq") and not with_data:
            raise UsageError(f"--init {init} fits anchors to real inputs: give --dataset (or use --init fit)")
        budget = (
            parse_amount(None if rec.target_params is None else str(rec.target_params), "--target-params"),
            rec.target_ratio,
            parse_amount(None if rec.target_bytes is None else str(rec.target_bytes), "--target-bytes"),
            rec.metric,
        )
        by_budget = any(v is not None for v in budget[:3])
        wants_data = with_data and (by_budget or not dry_run)
        loaders = data.loaders(size, preprocess) if wants_data else None  # type: ignore[union-attr]
        explanation: list[str] = []
        advice: str | None = None
        if by_budget:
            found = _budget_search(original, budget, rec.regulator_style, init, size, leaves, loaders)
            plan, explanation, advice = found.plan, found.explain(), found.advice(cli=True)
            if render:
                for line in explanation:
                    console.print(line, highlight=False, soft_wrap=True)
                if advice:
                    console.print(f"note: {advice}", highlight=False, soft_wrap=True)
        else:
            plan = make_plan(
                original,
                rec.mode,
                rec.regulators,
                rec.regulator_style,
                init,
                size,
                leaves,
                bank_size=rec.bank_size,
                factorize_unshared=parse_rank(rec.factorize_unshared, "--factorize-unshared"),
            )
        if dry_run:
            if render:
                render_plan(plan, spec.display)
            return {"plan": plan, "explain": explanation, "advice": advice}
        if write_recipe:
            atomic_write_text(out / "recipe.yaml", rec.resolved().to_yaml())
        if with_data:
            return _run_pipeline(original, plan, spec, out, data, loaders, rec.dtype, command)  # type: ignore[arg-type]
        conversion = convert(original, plan)
        ckpt = save(conversion.model, out / "model.safetensors", source=spec, dtype=rec.dtype)
        report = build_report(original, conversion, spec.display, state_dict_bytes(original), ckpt.stat().st_size)
        atomic_write_text(out / "report.json", report.to_json())
        atomic_write_text(out / "report.md", report.to_markdown())
        atomic_write_text(out / "README.md", model_card(report, command))
    render_report(report)
    console.print(f"wrote {ckpt}, {out / 'report.json'}, {out / 'report.md'}")
    return {"plan": plan, "report": report, "out": out}


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


def _budget_search(original: Any, budget: tuple, style: str, init: str, size: Any, leaves: Any, loaders: Any) -> Any:
    """The budget search for (target params, ratio, bytes, metric); scored on the training data when given."""
    from ..budget import resolve_target, search
    from ..core.plan import count_params

    target = resolve_target(count_params(original), *budget[:3])
    loader = loaders.train if loaders is not None else None
    metric = None if budget[3] is None else str(budget[3])
    return search(original, target, size, loader, 8, metric, style, init, leaves)


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
        console.print(f"[yellow]warning:[/] {n}")


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
        console.print(f"[yellow]warning:[/] {n}")


def _run_pipeline(
    original: Any, plan: Any, spec: Any, out: Path, data: DataOptions, loaders: Any, dtype: str, command: str | None
) -> dict[str, Any]:
    from ..pipeline import compress

    out.mkdir(parents=True, exist_ok=True)
    with _Progress() as progress:
        result = compress(
            original,
            loaders.train,
            loaders.val,
            plan,
            config=data.config(),
            calibrate_batches=data.calibrate_batches,
            out=out,
            dtype=dtype,
            source=spec,
            on_stage=progress.stage,
            on_step=progress.step,
            on_epoch=progress.epoch_end,
            resume=data.resume,
            command=command,
        )
    if data.plot and result.fit is not None:
        from ..core.report import plot_accuracy

        marks = {"teacher": result.teacher_acc, "after BN recalibration": result.calibrated_acc}
        console.print(f"wrote {plot_accuracy(result.fit.history, marks, out / 'accuracy.png')}")
    render_report(result.report)
    render_accuracy(result)
    console.print(f"wrote {out / 'model.safetensors'}, {out / 'report.json'}, {out / 'report.md'}")
    return {"plan": plan, "result": result, "out": out}


def render_accuracy(result: Any) -> None:
    """Print the accuracy after each step of the pipeline."""
    table = Table(title="accuracy")
    table.add_column("step")
    table.add_column("accuracy", justify="right")
    for name, value in (
        ("teacher", result.teacher_acc),
        ("right after conversion", result.converted_acc),
        ("after BN recalibration", result.calibrated_acc),
        ("after KD fine-tune", result.finetuned_acc),
    ):
        table.add_row(name, f"{100 * value:.2f}%")
    table.add_row("drop vs teacher", f"{100 * result.drop:.2f} points")
    console.print(table)
    console.print(f"wall time {result.wall_s:.0f} s")


def convert_command(
    ctx: typer.Context,
    model: OptModelArg = None,
    mode: ModeOpt = Mode.mix,
    regulators: RegOpt = "none",
    regulator_style: StyleOpt = RegulatorStyle.adapter,
    bank_size: BankOpt = "0.5",
    factorize_unshared: FactorOpt = None,
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
    calibrate_batches: CalibOpt = CALIBRATE_BATCHES,
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
    metric: MetricOpt = None,
) -> None:
    """Convert a pretrained CNN into a deep anchored CNN (shared conv kernels, free BatchNorms).

    With --dataset, also recalibrate BatchNorm and distil the original into the anchored net.
    With --recipe FILE, the recipe's settings apply wherever no flag was given.
    """
    try:
        rec = recipe_from_command(ctx, "convert", recipe)
        if ctx.info_name == "distill" and not rec.dataset and not dry_run:
            raise UsageError(
                "dacnn distill needs --dataset: the data to calibrate and fine-tune on "
                "(to convert without data, use dacnn convert)"
            )
        data = DataOptions.from_recipe(rec, resume=resume, overwrite=overwrite)
        run_convert(rec, data, dry_run=dry_run, write_recipe=recipe is not None, command=command_line(ctx))
    except DacnnError as exc:
        raise fail(exc) from None


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
    try:
        if teacher.is_file():
            console.print(f"reusing the teacher in {teacher}")
        else:
            console.print(
                f"training a ResNet-18 teacher on {train_limit} Fashion-MNIST images ({teacher_epochs} epochs)"
            )
            # a warm-up and a lower peak lr than from-scratch recipes: short runs at 0.05 swung 83-86%
            run_train(
                "resnet18",
                "fashion-mnist",
                teacher.parent,
                "none",
                "32",
                DataOptions(
                    "fashion-mnist",
                    teacher_epochs,
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
            calibrate_batches=50,
            precision=precision.value,
            train_limit=train_limit,
            device=device,
            target_ratio=target_ratio,
        )
        run_convert(student, DataOptions.from_recipe(student, overwrite=True))
    except DacnnError as exc:
        raise fail(exc) from None


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
    target_params: TargetParamsOpt = None,
    target_ratio: TargetRatioOpt = None,
    target_bytes: TargetBytesOpt = None,
    metric: MetricOpt = None,
    dataset: DatasetOpt = None,
    train_limit: TrainLimitOpt = None,
    explain: Annotated[
        bool, typer.Option(help="print the budget search: best candidates and each section's options")
    ] = False,
    leaf_module: LeafOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Print the conversion plan, by mode or by a size target (nothing is converted or written)."""
    try:
        if model is None:
            raise UsageError("give a MODEL, e.g. dacnn plan resnet34 --target-ratio 4 --explain")
        rec = recipe_from_command(ctx, "convert")
        data = DataOptions.from_recipe(rec) if dataset else None
        found = run_convert(rec, data, dry_run=True, render=False)
    except DacnnError as exc:
        raise fail(exc) from None
    for line in found["explain"] if explain else []:
        console.print(line, highlight=False, soft_wrap=True)
    render_plan(found["plan"], model)
    if found["advice"]:
        console.print(f"note: {found['advice']}", highlight=False, soft_wrap=True)
