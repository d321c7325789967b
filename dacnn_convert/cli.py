"""Command line: ``dacnn-convert MODEL ...`` and ``dacnn <command> ...``.

A thin typer layer: parse flags, call the library, render its result objects with
rich. Library errors become one line on stderr and exit code 1 (usage errors 2).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .errors import DacnnError, UsageError

console = Console()
err_console = Console(stderr=True)


class Mode(str, Enum):
    mix = "mix"
    plain = "plain"
    sharesnet = "sharesnet"
    none = "none"


class Init(str, Enum):
    fit = "fit"
    act = "act"
    act_seq = "act-seq"
    mean = "mean"
    first = "first"
    random = "random"


class RegulatorStyle(str, Enum):
    adapter = "adapter"
    paper = "paper"


class Dtype(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


def parse_input_size(text: str | None) -> tuple[int, int, int] | None:
    """``224`` -> (3, 224, 224); ``1x28x28`` -> (1, 28, 28); None stays None."""
    if text is None:
        return None
    try:
        parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
    except ValueError as exc:
        raise UsageError(f"--input-size takes 224 or CxHxW like 3x32x32; got {text!r}") from exc
    if len(parts) == 1:
        return (3, parts[0], parts[0])
    if len(parts) == 3 and min(parts) > 0:
        return (parts[0], parts[1], parts[2])
    raise UsageError(f"--input-size takes 224 or CxHxW like 3x32x32; got {text!r}")


def _leaf_types(names: list[str]) -> list[type]:
    types = []
    for name in names:
        module, _, cls = name.rpartition(".")
        try:
            types.append(getattr(importlib.import_module(module), cls))
        except (ImportError, AttributeError, ValueError) as exc:
            raise UsageError(f"--leaf-module {name!r} is not an importable class (package.module.ClassName)") from exc
    return types


def load_checkpoint(path: Path, model: str | None = None) -> Any:
    """Load a dacnn checkpoint; ``model`` (a source given on the command line) builds the skeleton.

    Sources written in a file are never imported; user code must be named by the user.
    """
    import json

    from .checkpoint import load, read_metadata
    from .sources import build_model, parse_spec

    if model is None:
        return load(path)
    meta = read_metadata(path)
    classes = json.loads(meta["source"]).get("num_classes") if "source" in meta else None
    return load(path, model=build_model(parse_spec(model, classes), weights=None))


SkelOpt = Annotated[
    str | None, typer.Option("--model", help="model source for checkpoints of user code (package.module:factory)")
]


def fail(exc: DacnnError) -> typer.Exit:
    """Print a library error as one line and return the exit to raise."""
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(exc.exit_code)


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
) -> dict[str, Any]:
    """Load, plan, convert, measure and write; with ``data``, also calibrate and distil."""
    from .checkpoint import save
    from .convert import convert
    from .planning import make_plan
    from .report import build_report, state_dict_bytes
    from .sources import build_model, default_input_size, parse_spec

    spec = parse_spec(model, num_classes)
    size = parse_input_size(input_size)
    leaves = _leaf_types(leaf_module or [])
    original = build_model(spec, weights).eval()
    size = size or ((3, 32, 32) if data and data.dataset else default_input_size(original, spec))
    init = init or (Init.act if data and data.dataset else Init.fit)
    if init in (Init.act, Init.act_seq) and not (data and data.dataset):
        raise UsageError(f"--init {init.value} fits anchors to real inputs: give --dataset (or use --init fit)")
    plan = make_plan(original, mode.value, regulators, regulator_style.value, init.value, size, leaves)
    if dry_run:
        render_plan(plan, spec.display)
        return {"plan": plan}
    out = out or Path("runs") / f"{spec.name.replace(':', '_')}-{mode.value}"
    if data is not None and data.dataset:
        return _run_pipeline(original, plan, spec, size, out, data)
    conversion = convert(original, plan)
    ckpt = save(conversion.model, out / "model.safetensors", source=spec, dtype=dtype.value)
    report = build_report(original, conversion, spec.display, state_dict_bytes(original), ckpt.stat().st_size)
    (out / "report.json").write_text(report.to_json())
    (out / "report.md").write_text(report.to_markdown())
    render_report(report)
    console.print(f"wrote {ckpt}, {out / 'report.json'}, {out / 'report.md'}")
    return {"plan": plan, "report": report, "out": out}


def render_plan(plan: Any, source: str) -> None:
    """Print a plan as a table (``--dry-run``)."""
    table = Table(title=f"plan for {source}: mode {plan.mode}, init {plan.init}")
    for col in ("anchor", "section", "members", "kernel"):
        table.add_column(col)
    for g in plan.groups:
        table.add_row(g.name, ",".join(map(str, g.sections)), "\n".join(g.members), "x".join(map(str, g.shape)))
    console.print(table)
    for r in plan.regulators:
        console.print(f"regulator ({plan.regulator_style}) on {r.host}: {r.in_channels}->{r.out_channels}, section {r.section}")
    console.print(
        f"unique params {plan.params_before:,} -> {plan.params_after:,} "
        f"({plan.params_before / plan.params_after:.2f}x); dry run: nothing written"
    )
    for n in plan.notes:
        console.print(f"[yellow]warning:[/] {n}")


def render_report(report: Any) -> None:
    """Print the per-group table and the summary of a conversion."""
    table = Table(title=f"{report.source}: mode {report.mode}, init {report.init}")
    for col in ("anchor", "section", "resolution", "kernel", "members", "params before", "params after", "fit err"):
        table.add_column(col, justify="right" if col.startswith(("params", "fit", "members")) else "left")
    for g in report.groups:
        err = f"{g.max_fit_error:.3f}" if g.max_fit_error is not None else "-"
        table.add_row(
            g.anchor, ",".join(map(str, g.sections)), g.resolution, g.kernel, str(g.members),
            f"{g.params_before:,}", f"{g.params_after:,}", err,
        )  # fmt: skip
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
    summary.add_row("MACs (unchanged by sharing)", f"{report.macs_before:,}", f"{report.macs_after:,}", "")
    summary.add_row("regulators added", "", f"{report.regulators} ({report.regulator_params:,} params)", "")
    console.print(summary)
    for n in report.notes:
        console.print(f"[yellow]warning:[/] {n}")


ModelArg = Annotated[
    str, typer.Argument(help="torchvision name (resnet34), timm:NAME (timm:resnet50d) or package.module:factory")
]
ModeOpt = Annotated[Mode, typer.Option(help="mix: share per stage; plain: one network-wide kernel; sharesnet; none")]
RegOpt = Annotated[str, typer.Option(help="regulators in sections: none, all, or 1-based numbers like 1,3")]
StyleOpt = Annotated[
    RegulatorStyle, typer.Option(help="adapter: parallel, zero-init (function kept); paper: in series")
]
InitOpt = Annotated[
    Init | None,
    typer.Option(help="anchor init: act (data-aware; default with --dataset), act-seq (data-aware, layer by "
                 "layer on the converted student), fit (weight least squares; default without data), mean, first, random"),
]
WeightsOpt = Annotated[str, typer.Option(help="DEFAULT (pretrained, downloads), none (random), or a state-dict PATH")]
ClassesOpt = Annotated[int | None, typer.Option(help="classes of the classifier (replaces the head if pretrained)")]
SizeOpt = Annotated[str | None, typer.Option(help="example input: 224 or CxHxW; default from the model's config or 224")]
OutOpt = Annotated[Path | None, typer.Option(help="output folder (default runs/MODEL-MODE)")]
DryOpt = Annotated[bool, typer.Option(help="print the plan and write nothing")]
LeafOpt = Annotated[list[str] | None, typer.Option(help="package.module.Class that fx must not trace into (repeatable)")]
DtypeOpt = Annotated[Dtype, typer.Option(help="storage type of the checkpoint's floating tensors")]
DatasetOpt = Annotated[
    str | None, typer.Option(help="fine-tune on fashion-mnist, cifar10, cifar100, svhn or synthetic (KD from the original)")
]
EpochsOpt = Annotated[int, typer.Option(min=1, help="training epochs")]
BatchOpt = Annotated[int, typer.Option(min=1, help="batch size")]
LrOpt = Annotated[float, typer.Option(help="peak learning rate")]
OptimOpt = Annotated[str, typer.Option(help="sgd (momentum 0.9, nesterov), adamw or adagrad (the paper's)")]
SchedOpt = Annotated[str, typer.Option(help="cosine, or step (x0.1 at half the epochs, as the paper)")]
KdTOpt = Annotated[float, typer.Option(help="distillation temperature T")]
KdAOpt = Annotated[float, typer.Option(help="weight of the KD term (1 - alpha goes to cross-entropy)")]
CalibOpt = Annotated[int, typer.Option(min=0, help="training batches to re-estimate BatchNorm statistics (0: skip)")]
PrecOpt = Annotated[str, typer.Option(help="auto (bf16 where the CPU/GPU has bf16 units), fp32, bf16, fp16 (CUDA)")]
LimitOpt = Annotated[int | None, typer.Option(min=1, help="cap batches per epoch and per evaluation (smoke runs)")]
TrainLimitOpt = Annotated[int | None, typer.Option(min=1, help="train on a fixed random subset of N images")]
DownloadOpt = Annotated[bool, typer.Option(help="let torchvision download a missing dataset")]
SeedOpt = Annotated[int, typer.Option(help="random seed")]
ResumeOpt = Annotated[bool, typer.Option(help="continue from OUT/state.pt (optimiser, schedule, RNG, counters)")]
CkptOpt = Annotated[int | None, typer.Option(min=1, help="also checkpoint every N steps (atomic write)")]


class FeatureLoss(str, Enum):
    none = "none"
    mse = "mse"


FeatOpt = Annotated[FeatureLoss, typer.Option(help="also match stage outputs of teacher and student (mse)")]
FeatWOpt = Annotated[float, typer.Option(min=0.0, help="weight of the feature loss")]
PlotOpt = Annotated[bool, typer.Option(help="write OUT/accuracy.png, the accuracy curve of the fine-tune")]
AugOpt = Annotated[str, typer.Option(help="auto (random flip as the paper, none for SVHN), flip or none")]
WdOpt = Annotated[float, typer.Option(min=0.0, help="weight decay")]
SmoothOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="label smoothing of the cross-entropy term")]
WarmOpt = Annotated[int, typer.Option(min=0, help="linear learning-rate warm-up steps")]
ClipOpt = Annotated[float | None, typer.Option(min=0.0, help="clip the gradient norm to this value")]


@dataclass(frozen=True)
class DataOptions:
    """Data and fine-tuning flags shared by convert/distill/train."""

    dataset: str | None = None
    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    schedule: str = "cosine"
    weight_decay: float = 5e-4
    kd_temperature: float = 4.0
    kd_alpha: float = 0.9
    calibrate_batches: int = 100
    precision: str = "auto"
    limit_batches: int | None = None
    train_limit: int | None = None
    download: bool = False
    seed: int = 0
    resume: bool = False
    checkpoint_every: int | None = None
    feature_weight: float = 0.0
    plot: bool = False
    augment: str = "auto"
    label_smoothing: float = 0.0
    warmup_steps: int = 0
    clip_grad: float | None = None

    def config(self) -> Any:
        from .distill import TrainConfig

        return TrainConfig(
            epochs=self.epochs, lr=self.lr, optimizer=self.optimizer, schedule=self.schedule,
            weight_decay=self.weight_decay, kd_temperature=self.kd_temperature, kd_alpha=self.kd_alpha,
            precision=self.precision, limit_batches=self.limit_batches, seed=self.seed,
            checkpoint_every=self.checkpoint_every, feature_weight=self.feature_weight,
            label_smoothing=self.label_smoothing, warmup_steps=self.warmup_steps, clip_grad=self.clip_grad,
        )  # fmt: skip

    def loaders(self, size: tuple[int, int, int]) -> Any:
        from .distill import make_loaders
        from .distill.distributed import init_from_env

        assert self.dataset is not None
        rank, world = init_from_env()
        if rank != 0:
            console.quiet = True  # rank 0 alone reports
        return make_loaders(
            self.dataset, self.batch_size, size[1], size[0], download=self.download, train_limit=self.train_limit,
            seed=self.seed, rank=rank, world_size=world, augment=self.augment,
        )  # fmt: skip


class _Progress:
    """Renders the library's progress callbacks with a rich progress bar."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
            console=console, transient=True,
        )  # fmt: skip
        self.task: Any = None
        self.epoch = 0

    def __enter__(self) -> _Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def step(self, s: dict[str, float]) -> None:
        if self.task is None or s["epoch"] != self.epoch:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.epoch = int(s["epoch"])
            self.task = self.bar.add_task(f"epoch {self.epoch}", total=s["steps"], info="")
        info = f"loss {s['loss']:.3f} acc {100 * s['acc']:.1f}% {s['images_per_s']:.0f} img/s"
        self.bar.update(self.task, completed=s["step"], info=info)

    def epoch_end(self, row: dict[str, float]) -> None:
        console.print(
            f"epoch {row['epoch']:.0f}: train loss {row['train_loss']:.3f}, train acc {100 * row['train_acc']:.2f}%, "
            f"val acc {100 * row['val_acc']:.2f}% ({row['wall_s']:.0f} s)"
        )

    def stage(self, name: str, acc: float) -> None:
        console.print(f"accuracy {name}: {100 * acc:.2f}%")


def _run_pipeline(original: Any, plan: Any, spec: Any, size: Any, out: Path, data: DataOptions) -> dict[str, Any]:
    from .pipeline import compress

    loaders = data.loaders(size)
    out.mkdir(parents=True, exist_ok=True)
    with _Progress() as progress:
        result = compress(
            original, plan, loaders, data.config(), data.calibrate_batches, out, spec,
            on_stage=progress.stage, on_step=progress.step, on_epoch=progress.epoch_end, resume=data.resume,
        )  # fmt: skip
    if data.plot and result.fit is not None:
        from .report import plot_accuracy

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
    model: ModelArg,
    mode: ModeOpt = Mode.mix,
    regulators: RegOpt = "none",
    regulator_style: StyleOpt = RegulatorStyle.adapter,
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
    lr: LrOpt = 0.05,
    optimizer: OptimOpt = "sgd",
    schedule: SchedOpt = "cosine",
    kd_temperature: KdTOpt = 4.0,
    kd_alpha: KdAOpt = 0.9,
    calibrate_batches: CalibOpt = 100,
    precision: PrecOpt = "auto",
    limit_batches: LimitOpt = None,
    train_limit: TrainLimitOpt = None,
    download: DownloadOpt = False,
    seed: SeedOpt = 0,
    resume: ResumeOpt = False,
    checkpoint_every: CkptOpt = None,
    feature_loss: FeatOpt = FeatureLoss.none,
    feature_weight: FeatWOpt = 1.0,
    plot: PlotOpt = False,
    augment: AugOpt = "auto",
    weight_decay: WdOpt = 5e-4,
    label_smoothing: SmoothOpt = 0.0,
    warmup_steps: WarmOpt = 0,
    clip_grad: ClipOpt = None,
) -> None:
    """Convert a pretrained CNN into a deep anchored CNN (shared conv kernels, free BatchNorms).

    With --dataset, also recalibrate BatchNorm and distil the original into the anchored net.
    """
    data = DataOptions(
        dataset, epochs, batch_size, lr, optimizer, schedule, weight_decay, kd_temperature, kd_alpha,
        calibrate_batches, precision, limit_batches, train_limit, download, seed, resume, checkpoint_every,
        feature_weight if feature_loss is FeatureLoss.mse else 0.0, plot, augment, label_smoothing, warmup_steps,
        clip_grad,
    )  # fmt: skip
    try:
        run_convert(
            model, mode, regulators, regulator_style, init, weights, num_classes, input_size, out, dry_run,
            leaf_module, dtype, data,
        )  # fmt: skip
    except DacnnError as exc:
        raise fail(exc) from None


def train_command(
    model: ModelArg,
    dataset: Annotated[str, typer.Option(help="fashion-mnist, cifar10, cifar100, svhn or synthetic")],
    out: Annotated[Path, typer.Option(help="folder for best.safetensors, last.safetensors and history.json")],
    weights: WeightsOpt = "none",
    input_size: SizeOpt = None,
    epochs: EpochsOpt = 1,
    batch_size: BatchOpt = 128,
    lr: LrOpt = 0.05,
    optimizer: OptimOpt = "sgd",
    schedule: SchedOpt = "cosine",
    precision: PrecOpt = "auto",
    limit_batches: LimitOpt = None,
    train_limit: TrainLimitOpt = None,
    download: DownloadOpt = False,
    seed: SeedOpt = 0,
    resume: ResumeOpt = False,
    checkpoint_every: CkptOpt = None,
    augment: AugOpt = "auto",
    weight_decay: WdOpt = 5e-4,
    label_smoothing: SmoothOpt = 0.0,
    warmup_steps: WarmOpt = 0,
    clip_grad: ClipOpt = None,
) -> None:
    """Train a reference teacher from scratch (or from --weights) with cross-entropy."""
    try:
        run_train(model, dataset, out, weights, input_size, DataOptions(
            dataset, epochs, batch_size, lr, optimizer, schedule, weight_decay, precision=precision,
            limit_batches=limit_batches, train_limit=train_limit, download=download, seed=seed, resume=resume,
            checkpoint_every=checkpoint_every, augment=augment, label_smoothing=label_smoothing,
            warmup_steps=warmup_steps, clip_grad=clip_grad,
        ))  # fmt: skip
    except DacnnError as exc:
        raise fail(exc) from None


def run_train(model: str, dataset: str, out: Path, weights: str, input_size: str | None, data: DataOptions) -> Any:
    """Train ``model`` on ``dataset``; returns the FitResult."""
    import json

    from .distill import train
    from .sources import build_model, parse_spec

    size = parse_input_size(input_size) or (3, 32, 32)
    loaders = data.loaders(size)
    spec = parse_spec(model, loaders.num_classes)
    net = build_model(spec, weights)
    out.mkdir(parents=True, exist_ok=True)
    with _Progress() as progress:
        result = train(
            net, loaders.train, loaders.val, data.config(), out, progress.step, progress.epoch_end, spec, data.resume
        )
    (out / "history.json").write_text(json.dumps(result.to_dict(), indent=2))
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
    precision: PrecOpt = "auto",
    limit_batches: LimitOpt = None,
    download: DownloadOpt = False,
    model: SkelOpt = None,
) -> None:
    """Top-1 accuracy of a saved model (anchored or not) on a dataset's validation split."""
    from .distill import evaluate
    from .report import count_params

    try:
        size = parse_input_size(input_size) or (3, 32, 32)
        loaders = DataOptions(dataset, batch_size=batch_size, download=download).loaders(size)
        net = load_checkpoint(checkpoint, model)
        acc = evaluate(net, loaders.val, precision, limit_batches)
    except DacnnError as exc:
        raise fail(exc) from None
    console.print(f"{checkpoint}: top-1 {100 * acc:.2f}% on {dataset} ({count_params(net):,} unique params)")


app = typer.Typer(
    help="dacnn: deep anchored CNNs — convert, and more.", no_args_is_help=True, pretty_exceptions_enable=False
)
def demo_command(
    out: Annotated[Path, typer.Option(help="output folder; a teacher found there is reused")] = Path("runs/demo"),
    teacher_epochs: Annotated[int, typer.Option(min=1, help="epochs to train the teacher")] = 3,
    epochs: EpochsOpt = 2,
    train_limit: Annotated[int, typer.Option(min=256, help="training images used (fixed random subset)")] = 15000,
    precision: PrecOpt = "auto",
) -> None:
    """Quick start, offline: train a ResNet-18 teacher on Fashion-MNIST, convert it (mix + regulators), distil."""
    teacher = out / "teacher" / "best.safetensors"
    try:
        if teacher.is_file():
            console.print(f"reusing the teacher in {teacher}")
        else:
            console.print(f"training a ResNet-18 teacher on {train_limit} Fashion-MNIST images ({teacher_epochs} epochs)")
            run_train("resnet18", "fashion-mnist", teacher.parent, "none", "32", DataOptions(
                "fashion-mnist", teacher_epochs, lr=0.05, precision=precision, train_limit=train_limit,
            ))  # fmt: skip
        console.print("converting: mode mix, regulators all, init act (data-aware); then BN recalibration and KD fine-tune")
        run_convert(
            "resnet18", Mode.mix, "all", RegulatorStyle.adapter, Init.act, str(teacher), 10, "32", out / "student",
            data=DataOptions("fashion-mnist", epochs, lr=0.02, precision=precision, train_limit=train_limit,
                             calibrate_batches=50),
        )  # fmt: skip
    except DacnnError as exc:
        raise fail(exc) from None


class ExportFormat(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"
    safetensors = "safetensors"
    pt = "pt"


def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="a .safetensors file written by dacnn")],
    format: Annotated[ExportFormat, typer.Option("--format", help="onnx, torchscript, safetensors or pt")] = ExportFormat.onnx,  # noqa: A002
    out: Annotated[Path | None, typer.Option(help="file to write (default: next to the checkpoint)")] = None,
    dtype: DtypeOpt = Dtype.fp32,
    input_size: SizeOpt = None,
    model_source: SkelOpt = None,
) -> None:
    """Export a saved model keeping each anchored kernel stored once."""
    import torch

    from .checkpoint import read_metadata, save
    from .export import export_onnx, export_torchscript
    from .planning import Plan

    try:
        model = load_checkpoint(checkpoint, model_source)
        meta = read_metadata(checkpoint)
        size = parse_input_size(input_size) or (
            tuple(Plan.from_json(meta["plan"]).input_size) if "plan" in meta else (3, 224, 224)
        )
        suffix = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors", "pt": ".pt"}
        out = out or checkpoint.with_name(checkpoint.name.split(".")[0] + f"-{dtype.value}" + suffix[format.value])
        if format is ExportFormat.onnx:
            result = export_onnx(model, out, size, dtype.value)
            diff = f", onnxruntime max |diff| {result.max_abs_diff:.2e}" if result.max_abs_diff is not None else ""
            console.print(f"wrote {out} ({result.bytes:,} bytes, {result.initializers} initialisers{diff})")
            return
        if dtype is not Dtype.fp32 and format is ExportFormat.torchscript:
            raise UsageError("--dtype applies to onnx, safetensors and pt; TorchScript is written in fp32")
        if format is ExportFormat.torchscript:
            export_torchscript(model, out, size)  # type: ignore[arg-type]
        elif format is ExportFormat.safetensors:
            save(model, out, source=None, dtype=dtype.value)
        else:
            from .checkpoint import DTYPES

            state = {k: v.to(DTYPES[dtype.value]) if v.is_floating_point() else v for k, v in model.state_dict().items()}
            torch.save(state, out)
        console.print(f"wrote {out} ({out.stat().st_size:,} bytes)")
    except DacnnError as exc:
        raise fail(exc) from None


def inspect_command(
    path: Annotated[Path, typer.Argument(help=".safetensors, .pt (state dict or TorchScript) or .onnx")],
    json_out: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
) -> None:
    """Unique parameters, bytes and the sharing structure (anchor -> members) of a saved model."""
    import json

    from .inspection import inspect_file

    try:
        info = inspect_file(path)
    except DacnnError as exc:
        raise fail(exc) from None
    if json_out:
        console.print_json(json.dumps(info.to_dict()))
        return
    console.print(
        f"{info.path}: {info.format}, {info.bytes:,} bytes, {info.tensors} tensors, {info.params:,} unique "
        f"parameters ({info.param_bytes:,} bytes; file/params {info.bytes / max(info.param_bytes, 1):.3f})"
    )
    if info.source:
        console.print(f"source: {info.source}")
    table = Table(title=f"shared tensors ({len(info.shared)})")
    for col in ("tensor", "shape", "users"):
        table.add_column(col)
    for name, shape, users in info.shared:
        table.add_row(name, "x".join(map(str, shape)), f"{len(users)}: " + ", ".join(users) if users else "-")
    console.print(table)
    for n in info.notes:
        console.print(f"note: {n}")


def latency_command(
    checkpoint: Annotated[Path, typer.Argument(help="a .safetensors file written by dacnn-convert")],
    batch: Annotated[str, typer.Option(help="batch sizes, comma-separated")] = "1,64",
    precision: Annotated[str, typer.Option(help="precisions, comma-separated: fp32, bf16, fp16 (CUDA)")] = "fp32",
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    repeats: Annotated[int, typer.Option(min=1, help="timed runs per setting")] = 20,
    input_size: SizeOpt = None,
    model_source: SkelOpt = None,
) -> None:
    """Latency (median, p90) of the original, the anchored model, and with its regulators (anchored+reg)."""
    import dataclasses
    import json

    import torch

    from .checkpoint import load, read_metadata
    from .convert import convert
    from .errors import CheckpointError
    from .latency import measure_latency
    from .planning import Plan
    from .sources import ModelSpec, build_model, parse_spec

    try:
        if device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda requested but no CUDA device is available; use --device cpu")
        meta = read_metadata(checkpoint)
        if "plan" not in meta or "source" not in meta:
            raise CheckpointError(f"{checkpoint} has no conversion plan or source: was it written by dacnn-convert?")
        plan = Plan.from_json(meta["plan"])
        spec = ModelSpec.from_dict(json.loads(meta["source"]))
        if model_source is not None:
            spec = parse_spec(model_source, spec.num_classes)
        elif spec.kind == "module":
            raise UsageError(f"{checkpoint} comes from user code: name it with --model {spec.name}")
        original = build_model(spec, weights=None)
        models = {"original": original}
        if plan.regulators:
            models["anchored"] = convert(original, dataclasses.replace(plan, regulators=()), init="none").model
        models["anchored+reg" if plan.regulators else "anchored"] = load(checkpoint, model=original)
        size = parse_input_size(input_size) or tuple(plan.input_size)
        batches = [int(b) for b in batch.split(",")]
        rows = [
            measure_latency(m, size, b, p, device, repeats, label=name)  # type: ignore[arg-type]
            for p in precision.split(",") for b in batches for name, m in models.items()
        ]  # fmt: skip
    except (DacnnError, ValueError) as exc:
        raise fail(exc if isinstance(exc, DacnnError) else UsageError(str(exc))) from None
    table = Table(title=f"latency on {device} ({repeats} runs after warm-up)")
    for col in ("model", "batch", "precision", "median ms", "p90 ms", "vs original"):
        table.add_column(col, justify="left" if col == "model" else "right")
    base = {(r.batch, r.precision): r.median_ms for r in rows if r.model == "original"}
    for r in rows:
        ratio = r.median_ms / base[(r.batch, r.precision)]
        table.add_row(r.model, str(r.batch), r.precision, f"{r.median_ms:.2f}", f"{r.p90_ms:.2f}", f"{ratio:.3f}x")
    console.print(table)


app.command("convert")(convert_command)
app.command("demo")(demo_command)
app.command("export")(export_command)
app.command("inspect")(inspect_command)
app.command("latency")(latency_command)
app.command("distill", help="Same as convert; give --dataset to calibrate and distil.")(convert_command)
app.command("train")(train_command)
app.command("eval")(eval_command)


@app.callback()
def _dacnn() -> None:
    """dacnn: deep anchored CNNs (Huang, Dwivedi, Roig) — convert, fine-tune, evaluate."""

convert_app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
convert_app.command()(convert_command)


def main() -> None:
    """Entry point of ``dacnn``."""
    app()


def convert_main() -> None:
    """Entry point of ``dacnn-convert``."""
    convert_app()


if __name__ == "__main__":
    main()
