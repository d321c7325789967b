"""``convert`` (also ``distill``) and ``demo``: conversion, then optionally calibration and distillation."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import typer
from rich.table import Table

from ..defaults import CALIBRATE_BATCHES, FINETUNE_LR, FINETUNE_WARMUP_STEPS
from ..errors import DacnnError, UsageError, choose
from .common import (
    Augment,
    AugOpt,
    BankOpt,
    BatchOpt,
    CalibOpt,
    ChannelsLastOpt,
    CkptOpt,
    ClassesOpt,
    ClipOpt,
    DataOptions,
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
    Init,
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
    _leaf_types,
    _Progress,
    console,
    fail,
    output_guard,
    parse_amount,
    parse_input_size,
    parse_rank,
)
from .train import run_train


def run_convert(
    model: str,
    mode: Mode = Mode.mix,
    regulators: str = "none",
    regulator_style: RegulatorStyle = RegulatorStyle.adapter,
    init: Init | None = None,
    weights: str = "DEFAULT",
    num_classes: int | None = None,
    input_size: str | None = None,
    out: Path | None = None,
    dry_run: bool = False,
    leaf_module: list[str] | None = None,
    dtype: Dtype = Dtype.fp32,
    data: DataOptions | None = None,
    recipe: Any = None,
    budget: tuple[int | None, float | None, int | None, str | None] | None = None,
    render: bool = True,
    bank_size: str = "0.5",
    factorize_unshared: str | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Load, plan, convert, measure and write; with ``data``, also calibrate and distil.

    ``recipe`` (the resolved :class:`Recipe`) is written to ``OUT/recipe.yaml``; ``budget``
    (target params, ratio, bytes, metric) replaces mode and regulators by a budget search.
    """
    import torch

    from ..core.convert import convert
    from ..core.planning import make_plan
    from ..core.report import build_report, state_dict_bytes
    from ..io.card import model_card
    from ..io.checkpoint import save
    from ..io.sources import build_model, input_config, parse_spec

    spec = parse_spec(model, num_classes)
    size = parse_input_size(input_size)
    leaves = _leaf_types(leaf_module or [])
    out = out or Path("runs") / f"{spec.name.replace(':', '_').replace('/', '_')}-{mode.value}"
    with output_guard(None if dry_run else out, data, (weights,)):
        torch.manual_seed(data.seed if data is not None else 0)  # random weights (--weights none) are reproducible
        original = build_model(spec, weights).eval()
        if data is not None and data.dataset:  # calibration, search and fine-tune run where the data goes
            original.to(data.torch_device())
        preprocess = input_config(original, spec, weights)  # timm's data config / torchvision's transforms
        size = data.input_size(size, preprocess.input_size) if data and data.dataset else size or preprocess.input_size
        init = init or (Init.act if data and data.dataset else Init.fit)
        if init in (Init.act, Init.act_seq) and not (data and data.dataset):
            raise UsageError(f"--init {init.value} fits anchors to real inputs: give --dataset (or use --init fit)")
        by_budget = budget is not None and any(v is not None for v in budget[:3])
        wants_data = data is not None and data.dataset and (by_budget or not dry_run)
        loaders = data.loaders(size, preprocess) if wants_data else None  # loaded once: search and fine-tune
        explanation: list[str] = []
        advice: str | None = None
        if by_budget:
            found = _budget_search(original, budget, regulator_style.value, init.value, size, leaves, loaders)
            plan, explanation, advice = found.plan, found.explain(), found.advice(cli=True)
            if render:
                for line in explanation:
                    console.print(line, highlight=False, soft_wrap=True)
                if advice:
                    console.print(f"note: {advice}", highlight=False, soft_wrap=True)
        else:
            plan = make_plan(
                original,
                mode.value,
                regulators,
                regulator_style.value,
                init.value,
                size,
                leaves,
                bank_size=bank_size,
                factorize_unshared=parse_rank(factorize_unshared, "--factorize-unshared"),
            )
        if dry_run:
            if render:
                render_plan(plan, spec.display)
            return {"plan": plan, "explain": explanation, "advice": advice}
        if recipe is not None:
            (out / "recipe.yaml").write_text(recipe.to_yaml())
        if data is not None and data.dataset:
            return _run_pipeline(original, plan, spec, out, data, loaders, dtype.value, command)
        conversion = convert(original, plan)
        ckpt = save(conversion.model, out / "model.safetensors", source=spec, dtype=dtype.value)
        report = build_report(original, conversion, spec.display, state_dict_bytes(original), ckpt.stat().st_size)
        (out / "report.json").write_text(report.to_json())
        (out / "report.md").write_text(report.to_markdown())
        (out / "README.md").write_text(model_card(report, command))
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
    from ..core.planning import unique_params

    target = resolve_target(unique_params(original), *budget[:3])
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
        a = SimpleNamespace(**ctx.params)
        resolved = None
        if recipe is not None:
            resolved = apply_recipe(ctx, recipe, a)
        if a.model is None:
            raise UsageError("give a MODEL (e.g. resnet34) or a --recipe that names one")
        data = DataOptions(
            dataset=a.dataset,
            epochs=a.epochs,
            batch_size=a.batch_size,
            lr=a.lr,
            optimizer=a.optimizer,
            schedule=a.schedule,
            weight_decay=a.weight_decay,
            kd_temperature=a.kd_temperature,
            kd_alpha=a.kd_alpha,
            calibrate_batches=a.calibrate_batches,
            precision=a.precision,
            limit_batches=a.limit_batches,
            train_limit=a.train_limit,
            download=a.download,
            seed=a.seed,
            resume=a.resume,
            overwrite=a.overwrite,
            checkpoint_every=a.checkpoint_every,
            feature_weight=a.feature_weight if a.feature_loss is FeatureLoss.mse else 0.0,
            plot=a.plot,
            augment=a.augment,
            label_smoothing=a.label_smoothing,
            warmup_steps=a.warmup_steps,
            clip_grad=a.clip_grad,
            channels_last=a.channels_last,
            device=a.device,
        )
        run_convert(
            a.model,
            a.mode,
            a.regulators,
            a.regulator_style,
            a.init,
            a.weights,
            a.num_classes,
            a.input_size,
            a.out,
            a.dry_run,
            a.leaf_module,
            a.dtype,
            data,
            resolved,
            (
                parse_amount(a.target_params, "--target-params"),
                a.target_ratio,
                parse_amount(a.target_bytes, "--target-bytes"),
                a.metric,
            ),
            bank_size=a.bank_size,
            factorize_unshared=a.factorize_unshared,
            command=command_line(ctx),
        )
    except DacnnError as exc:
        raise fail(exc) from None


def apply_recipe(ctx: typer.Context, path: Path, a: SimpleNamespace) -> Any:
    """Fill ``a`` from the recipe wherever the flag was not given; return the resolved recipe."""
    from ..recipes import load_recipe

    rec = load_recipe(path)
    if rec.task != "convert":
        raise UsageError(f"{path} is a {rec.task!r} recipe: run it with `dacnn recipe run {path}`")
    enums = {"mode": Mode, "regulator_style": RegulatorStyle, "init": Init}
    # by name: typer vendors its own click, whose ParameterSource is not click's
    given = {k for k in ctx.params if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE"}
    for key, value in vars(rec).items():
        if key in vars(a) and key not in given and value is not None:
            value = Path(value) if key == "out" else value
            setattr(a, key, enums[key](choose(key, value, [e.value for e in enums[key]])) if key in enums else value)
    return rec.override(
        **{
            k: (v.value if isinstance(v, Enum) else str(v) if isinstance(v, Path) else v)
            for k, v in vars(a).items()
            if k in vars(rec)
        }
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
        run_convert(
            "resnet18",
            Mode.bank,
            "none",
            RegulatorStyle.adapter,
            Init.act,
            str(teacher),
            10,
            "32",
            out / "student",
            data=DataOptions(
                "fashion-mnist",
                epochs,
                lr=0.02,
                precision=precision,
                train_limit=train_limit,
                calibrate_batches=50,
                warmup_steps=0,
                device=device,
                overwrite=True,
            ),  # as measured
            budget=(None, target_ratio, None, None),
        )
    except DacnnError as exc:
        raise fail(exc) from None


def plan_command(
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
        budget = (
            parse_amount(target_params, "--target-params"),
            target_ratio,
            parse_amount(target_bytes, "--target-bytes"),
            metric,
        )
        data = DataOptions(dataset=dataset, train_limit=train_limit, device=device) if dataset else None
        found = run_convert(
            model,
            mode,
            regulators,
            RegulatorStyle.adapter,
            None,
            weights,
            num_classes,
            input_size,
            None,
            True,
            leaf_module,
            Dtype.fp32,
            data,
            None,
            budget,
            render=False,
            bank_size=bank_size,
            factorize_unshared=factorize_unshared,
        )
    except DacnnError as exc:
        raise fail(exc) from None
    for line in found["explain"] if explain else []:
        console.print(line, highlight=False, soft_wrap=True)
    render_plan(found["plan"], model)
    if found["advice"]:
        console.print(f"note: {found['advice']}", highlight=False, soft_wrap=True)
