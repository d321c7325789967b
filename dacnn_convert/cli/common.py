"""What every command shares: consoles, choices, flag types, data options, progress, errors.

A thin typer layer: parse flags, call the library, render its result objects with
rich. Library errors become one line on stderr and exit code 1 (usage errors 2).
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from ..defaults import CALIBRATE_BATCHES, DEVICE_HELP, FINETUNE_LR, FINETUNE_WARMUP_STEPS
from ..errors import DacnnError, OutputError, UsageError, write_failed

console = Console()
err_console = Console(stderr=True)


class Choice(str, Enum):
    """A CLI choice: typer validates it and lists the values in --help; it prints as its value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Mode(Choice):
    mix = "mix"
    plain = "plain"
    bank = "bank"
    sharesnet = "sharesnet"
    none = "none"


class Init(Choice):
    fit = "fit"
    act = "act"
    act_seq = "act-seq"
    mean = "mean"
    first = "first"
    random = "random"


class RegulatorStyle(Choice):
    adapter = "adapter"
    paper = "paper"


class Dtype(Choice):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"


class Optimizer(Choice):
    sgd = "sgd"
    adamw = "adamw"
    adagrad = "adagrad"


class Schedule(Choice):
    cosine = "cosine"
    step = "step"


class Precision(Choice):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Augment(Choice):
    auto = "auto"
    flip = "flip"
    none = "none"


class Metric(Choice):
    kl = "kl"
    fit = "fit"


def parse_input_size(text: str | None) -> tuple[int, int, int] | None:
    """``224`` -> (3, 224, 224); ``1x28x28`` -> (1, 28, 28); None stays None."""
    if text is None:
        return None
    try:
        parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
    except ValueError as exc:
        raise UsageError(f"--input-size takes 224 or CxHxW like 3x32x32; got {text!r}") from exc
    if len(parts) == 1:
        parts = [3, parts[0], parts[0]]
    if len(parts) == 3 and min(parts) > 0:
        if max(parts[1:]) > MAX_SIDE or parts[0] > 64:
            raise UsageError(f"--input-size {text!r} is out of range: at most 64 channels and {MAX_SIDE} px a side")
        return (parts[0], parts[1], parts[2])
    raise UsageError(f"--input-size takes 224 or CxHxW like 3x32x32 (each >= 1); got {text!r}")


MAX_SIDE = 8192  # px: an example input of 3x8192x8192 is already 805 MB in fp32


def parse_rank(text: str | None, what: str) -> int | float | None:
    """``64`` -> 64 filters, ``0.25`` -> a quarter of C_out; raises UsageError naming ``what``."""
    from ..core.banks import parse_value

    return None if text is None else parse_value(text, what)


def parse_amount(text: str | None, what: str) -> int | None:
    """``6M`` -> 6,000,000; ``600K``, ``12MB`` (10^6), ``12MiB`` (2^20), ``5000`` as they read."""
    if text is None:
        return None
    units = {
        "": 1,
        "K": 10**3,
        "M": 10**6,
        "G": 10**9,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
    }
    body = text.strip().upper().replace(",", "").replace("_", "")
    number = body.rstrip("KMGIB")
    try:
        value = float(number) * units[body[len(number) :]]
    except (ValueError, KeyError):
        raise UsageError(f"{what} takes a number like 6M, 600K or 12MB; got {text!r}") from None
    if not math.isfinite(value) or value > 1e15:
        raise UsageError(f"{what} must be a finite size below 10^15; got {text!r}")
    return int(value)


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

    from ..io.checkpoint import load, read_metadata
    from ..io.sources import build_model, parse_spec

    meta = read_metadata(path)
    try:
        recorded = json.loads(meta["source"]) if "source" in meta else None
    except (json.JSONDecodeError, RecursionError):
        recorded = None  # load() names the malformed metadata
    if model is None:
        if isinstance(recorded, dict) and recorded.get("kind") == "module":
            raise UsageError(
                f"{path} comes from user code, which is never imported from a file: name it with "
                f"--model {recorded.get('name')}"
            )
        return load(path)
    classes = recorded.get("num_classes") if isinstance(recorded, dict) else None
    return load(path, model=build_model(parse_spec(model, classes), weights=None))


def check_input_size(model: Any, size: tuple[int, int, int]) -> None:
    """Run one zero example of ``size`` through ``model`` so that a wrong --input-size is one line
    here, not a traceback from deep inside an exporter or a timing loop."""
    import torch

    from ..core.modes import mode
    from ..train.device import device_of

    try:
        with mode(model), torch.no_grad():
            model(torch.zeros(1, *size, device=device_of(model)))
    except (RuntimeError, ValueError, IndexError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UsageError(
            f"the model fails on an input of size {tuple(size)}: {first}; is --input-size right?"
        ) from None


def source_of(model: Any, given: str | None = None) -> Any:
    """The model source of a loaded checkpoint: ``--model`` if given, else the one its file records."""
    from ..io.checkpoint import SOURCE_ATTR
    from ..io.sources import parse_spec

    recorded = getattr(model, SOURCE_ATTR, None)
    if given is None:
        return recorded
    return parse_spec(given, recorded.num_classes if recorded is not None else None)


SkelOpt = Annotated[
    str | None, typer.Option("--model", help="model source for checkpoints of user code (package.module:factory)")
]


def check_writable(out: Path) -> None:
    """Create ``out`` and write a probe file there, so a bad --out fails before any work.

    Raises:
        OutputError: the folder cannot be created or written.
    """
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write to {str(out)!r} ({exc.strerror or exc}); choose another --out") from exc


# What a run leaves in its --out folder: finding one of these there means a run lives there.
RUN_FILES = (
    "best.safetensors",
    "last.safetensors",
    "state.pt",
    "metrics.csv",
    "history.json",
    "model.safetensors",
    "report.json",
    "report.md",
    "bench.json",
    "bench.md",
)


def check_fresh_output(out: Path, resume: bool = False, overwrite: bool = False, inputs: tuple[Any, ...] = ()) -> None:
    """Refuse to write over a finished run or over this command's own inputs unless asked.

    ``--resume`` continues the run there; ``--overwrite`` replaces it (its files are removed
    first, so nothing of the old run is mixed into the new one, e.g. appended metrics).

    Raises:
        UsageError: ``out`` holds a run and neither flag was given, or an input file would be
            overwritten (never allowed: choose another --out).
    """
    for given in inputs:
        path = Path(given) if isinstance(given, str | Path) else None
        if path is not None and path.is_file() and path.parent.resolve() == out.resolve() and path.name in RUN_FILES:
            raise UsageError(f"--out {out} would overwrite this command's own input {path}; choose another --out")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise UsageError(
            f"{out} already holds a run ({', '.join(found)}); continue it with --resume, or replace it with --overwrite"
        )
    for name in found:
        (out / name).unlink()


@contextlib.contextmanager
def output_guard(out: Path | None, data: DataOptions | None = None, inputs: tuple[Any, ...] = ()) -> Iterator[None]:
    """Check ``out`` is writable and holds no other run; if the command then fails, remove ``out`` if it created it.

    Nothing half-written is left behind, except a resumable ``state.pt`` (training progress
    is never thrown away). An OSError while writing becomes a one-line :class:`OutputError`.
    With ``data``, its ``resume``/``overwrite`` decide what happens to a run already in ``out``
    (:func:`check_fresh_output`); ``inputs`` are files the command reads.
    """
    import shutil

    existed = out is None or out.exists()
    try:
        if out is not None:
            check_fresh_output(out, data.resume if data else False, data.overwrite if data else False, inputs)
            check_writable(out)
        yield
    except BaseException as exc:
        if out is not None and not existed and out.is_dir() and not (out / "state.pt").is_file():
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(exc, OSError):
            raise write_failed(getattr(exc, "filename", None) or out, exc) from exc
        raise


# options that act on one invocation rather than describe the run: not recipe fields
ACTIONS = frozenset({"recipe", "dry_run", "resume", "overwrite", "explain"})


def recipe_from_command(ctx: typer.Context, task: str, path: Path | None = None) -> Any:
    """The resolved :class:`~dacnn_convert.recipes.Recipe` of a command: the recipe file's values
    (if ``path``), overridden by every flag given on the command line; where neither says, the
    command's own default. Flags are recipe fields of the same name (the one mapping).

    Raises:
        RecipeError: the file is unreadable or invalid; UsageError: a recipe of another task.
    """
    from ..recipes import Recipe, load_recipe

    rec = load_recipe(path) if path is not None else Recipe(task=task)
    if rec.task != task:
        raise UsageError(f"{path} is a {rec.task!r} recipe: run it with `dacnn recipe run {path}`")
    # by name: typer vendors its own click, whose ParameterSource is not click's
    given = {k for k in ctx.params if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE"}
    fields = set(vars(rec))
    changes: dict[str, Any] = {}
    for key, value in ctx.params.items():
        if key in ACTIONS or key not in fields or (path is not None and key not in given):
            continue
        if isinstance(value, Enum):
            value = value.value
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, list | tuple):  # a repeatable flag (--leaf-module): comma-separated in a recipe
            value = ",".join(value) or None
        changes[key] = value
    return rec.override(**changes)


def fail(exc: DacnnError) -> typer.Exit:
    """Print a library error as one line and return the exit to raise."""
    err_console.print(f"[bold red]error:[/] {exc.cli_message()}", highlight=False, soft_wrap=True)
    return typer.Exit(exc.exit_code)


ModelArg = Annotated[
    str, typer.Argument(help="torchvision name (resnet34), timm:NAME (timm:resnet50d) or package.module:factory")
]
OptModelArg = Annotated[
    str | None,
    typer.Argument(
        help="torchvision name (resnet34), timm:NAME, dacnn:18-mix or package.module:factory; optional with --recipe"
    ),
]
RecipeOpt = Annotated[Path | None, typer.Option(help="a YAML recipe; flags given on the command line override it")]
ModeOpt = Annotated[
    Mode,
    typer.Option(
        help="mix: share per stage; plain: one network-wide kernel; bank: a bank of "
        "k filters per stage + a 1x1 per conv (--bank-size); sharesnet; none"
    ),
]
BankOpt = Annotated[
    str,
    typer.Option(
        help="with --mode bank, filters per bank: an integer (64), a fraction of C_out "
        "(0.25) or per section (1:1.0,2:0.5,4:0.125; unlisted sections stay free)"
    ),
]
FactorOpt = Annotated[
    str | None,
    typer.Option(
        help="low-rank factorise every conv that shares with nothing: rank as an integer or a fraction of C_out (0.25)"
    ),
]
RegOpt = Annotated[str, typer.Option(help="regulators in sections: none, all, or 1-based numbers like 1,3")]
StyleOpt = Annotated[
    RegulatorStyle, typer.Option(help="adapter: parallel, zero-init (function kept); paper: in series")
]
InitOpt = Annotated[
    Init | None,
    typer.Option(
        help="anchor init: act (data-aware; default with --dataset), act-seq (data-aware, layer by "
        "layer on the converted student), fit (weight least squares; default without data), mean, first, random"
    ),
]
WeightsOpt = Annotated[str, typer.Option(help="DEFAULT (pretrained, downloads), none (random), or a state-dict PATH")]
ClassesOpt = Annotated[int | None, typer.Option(help="classes of the classifier (replaces the head if pretrained)")]
SizeOpt = Annotated[
    str | None,
    typer.Option(
        help="example input: 224 or CxHxW; default 32 px with a registered dataset, else the model's pretrained "
        "config (timm data config, torchvision weights), else 224"
    ),
]
OutOpt = Annotated[Path | None, typer.Option(help="output folder (default runs/MODEL-MODE)")]
DryOpt = Annotated[bool, typer.Option(help="print the plan and write nothing")]
LeafOpt = Annotated[
    list[str] | None, typer.Option(help="package.module.Class that fx must not trace into (repeatable)")
]
DtypeOpt = Annotated[Dtype, typer.Option(help="storage type of the checkpoint's floating tensors")]
DatasetOpt = Annotated[
    str | None,
    typer.Option(help="fine-tune on fashion-mnist, cifar10, cifar100, svhn or synthetic (KD from the original)"),
]
EpochsOpt = Annotated[int, typer.Option(min=1, help="training epochs")]
BatchOpt = Annotated[int, typer.Option(min=1, help="batch size")]
LrOpt = Annotated[float, typer.Option(help="peak learning rate")]
OptimOpt = Annotated[Optimizer, typer.Option(help="sgd (momentum 0.9, nesterov), adamw or adagrad (the paper's)")]
SchedOpt = Annotated[Schedule, typer.Option(help="cosine, or step (x0.1 at half the epochs, as the paper)")]
KdTOpt = Annotated[float, typer.Option(help="distillation temperature T")]
KdAOpt = Annotated[float, typer.Option(help="weight of the KD term (1 - alpha goes to cross-entropy)")]
CalibOpt = Annotated[int, typer.Option(min=0, help="training batches to re-estimate BatchNorm statistics (0: skip)")]
PrecOpt = Annotated[
    Precision, typer.Option(help="auto (bf16 where the CPU/GPU has bf16 units), fp32, bf16, fp16 (CUDA)")
]
LimitOpt = Annotated[int | None, typer.Option(min=1, help="cap batches per epoch and per evaluation (smoke runs)")]
TrainLimitOpt = Annotated[int | None, typer.Option(min=1, help="train on a fixed random subset of N images")]
DownloadOpt = Annotated[bool, typer.Option(help="let torchvision download a missing dataset")]
SeedOpt = Annotated[int, typer.Option(help="random seed")]
ResumeOpt = Annotated[bool, typer.Option(help="continue from OUT/state.pt (optimiser, schedule, RNG, counters)")]
OverwriteOpt = Annotated[
    bool, typer.Option(help="replace a run already in --out (otherwise refused: use --resume to continue it)")
]
CkptOpt = Annotated[int | None, typer.Option(min=1, help="also checkpoint every N steps (atomic write)")]


class FeatureLoss(Choice):
    none = "none"
    mse = "mse"


FeatOpt = Annotated[FeatureLoss, typer.Option(help="also match stage outputs of teacher and student (mse)")]
FeatWOpt = Annotated[float, typer.Option(min=0.0, help="weight of the feature loss")]
PlotOpt = Annotated[bool, typer.Option(help="write OUT/accuracy.png, the accuracy curve of the fine-tune")]
AugOpt = Annotated[Augment, typer.Option(help="auto (random flip as the paper, none for SVHN), flip or none")]
WdOpt = Annotated[float, typer.Option(min=0.0, help="weight decay")]
SmoothOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="label smoothing of the cross-entropy term")]
WarmOpt = Annotated[int, typer.Option(min=0, help="linear learning-rate warm-up steps")]
ClipOpt = Annotated[float | None, typer.Option(min=0.0, help="clip the gradient norm to this value")]
ChannelsLastOpt = Annotated[bool, typer.Option(help="train in channels_last (NHWC) memory format")]
DeviceOpt = Annotated[str, typer.Option(help=DEVICE_HELP)]


@dataclass(frozen=True)
class DataOptions:
    """Data and fine-tuning flags shared by convert/distill/train."""

    dataset: str | None = None
    epochs: int = 1
    batch_size: int = 128
    lr: float = FINETUNE_LR
    optimizer: str = "sgd"
    schedule: str = "cosine"
    weight_decay: float = 5e-4
    step_every: int = 0
    kd_temperature: float = 4.0
    kd_alpha: float = 0.9
    calibrate_batches: int = CALIBRATE_BATCHES
    precision: str = "auto"
    limit_batches: int | None = None
    train_limit: int | None = None
    download: bool = False
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    checkpoint_every: int | None = None
    feature_weight: float = 0.0
    plot: bool = False
    augment: str = "auto"
    label_smoothing: float = 0.0
    warmup_steps: int = FINETUNE_WARMUP_STEPS
    clip_grad: float | None = None
    channels_last: bool = True
    device: str = "auto"

    def __post_init__(self) -> None:
        for key, value in vars(self).items():  # CLI choices arrive as Enums; the library takes their values
            if isinstance(value, Enum):
                object.__setattr__(self, key, value.value)

    @classmethod
    def from_recipe(cls, rec: Any, resume: bool = False, overwrite: bool = False) -> DataOptions:
        """The data and fine-tuning options of a resolved recipe (the one place they are mapped)."""
        return cls(
            dataset=rec.dataset,
            epochs=rec.epochs,
            batch_size=rec.batch_size,
            lr=rec.resolved_lr,
            optimizer=rec.optimizer,
            schedule=rec.schedule,
            weight_decay=rec.weight_decay,
            step_every=rec.step_every,
            kd_temperature=rec.kd_temperature,
            kd_alpha=rec.kd_alpha,
            calibrate_batches=rec.calibrate_batches,
            precision=rec.precision,
            limit_batches=rec.limit_batches,
            train_limit=rec.train_limit,
            download=rec.download,
            seed=rec.seed,
            resume=resume,
            overwrite=overwrite,
            checkpoint_every=rec.checkpoint_every,
            feature_weight=rec.feature_weight if rec.feature_loss == "mse" else 0.0,
            plot=rec.plot,
            augment=rec.augment,
            label_smoothing=rec.label_smoothing,
            warmup_steps=rec.resolved_warmup_steps,
            clip_grad=rec.clip_grad,
            channels_last=rec.channels_last,
            device=rec.device,
        )

    def config(self) -> Any:
        from ..train import TrainConfig

        return TrainConfig(
            catch_signals=True,  # a command checkpoints on Ctrl-C / SIGTERM
            epochs=self.epochs,
            lr=self.lr,
            optimizer=self.optimizer,
            schedule=self.schedule,
            step_every=self.step_every,
            weight_decay=self.weight_decay,
            kd_temperature=self.kd_temperature,
            kd_alpha=self.kd_alpha,
            precision=self.precision,
            limit_batches=self.limit_batches,
            seed=self.seed,
            checkpoint_every=self.checkpoint_every,
            feature_weight=self.feature_weight,
            label_smoothing=self.label_smoothing,
            warmup_steps=self.warmup_steps,
            clip_grad=self.clip_grad,
            channels_last=self.channels_last,
        )

    def torch_device(self) -> Any:
        """The resolved ``--device`` (see :func:`dacnn_convert.train.device.resolve_device`).

        A CUDA device also becomes the current one: the CLI owns its process, and autocast,
        pinned-memory copies and bf16 support checks then all speak of that GPU.
        """
        import torch

        from ..train.device import resolve_device

        device = resolve_device(self.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    def input_size(
        self, given: tuple[int, int, int] | None, model_default: tuple[int, int, int] = (3, 224, 224)
    ) -> tuple[int, int, int]:
        """``--input-size`` if given, else 32 px for the registered datasets, else the model's own size."""
        from ..train.data import native_size

        if given is not None:
            return given
        side = native_size(self.dataset) if self.dataset else None
        return (model_default[0], side, side) if side else model_default

    def loaders(self, size: tuple[int, int, int], image: Any = None) -> Any:
        """Train/val loaders at ``size``; ``image``: the model's preprocessing for imagefolder data."""
        from ..train import make_loaders
        from ..train.distributed import init_from_env

        assert self.dataset is not None
        device = self.torch_device()
        rank, world = init_from_env(device)  # under torchrun: this process's GPU first, then the group
        if rank != 0:
            console.quiet = True  # rank 0 alone reports
        return make_loaders(
            self.dataset,
            self.batch_size,
            size[1],
            size[0],
            download=self.download,
            train_limit=self.train_limit,
            seed=self.seed,
            rank=rank,
            world_size=world,
            augment=self.augment,
            pin_memory=device.type == "cuda",
            image=image,
        )


class _Progress:
    """Renders the library's progress callbacks with a rich progress bar."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
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


class ExportFormat(Choice):
    onnx = "onnx"
    torchscript = "torchscript"
    safetensors = "safetensors"
    pt = "pt"
    dense = "dense"


TargetParamsOpt = Annotated[str | None, typer.Option(help="plan by budget: at most this many unique params (6M, 600K)")]
TargetRatioOpt = Annotated[float | None, typer.Option(help="plan by budget: this many times fewer unique params")]
TargetBytesOpt = Annotated[str | None, typer.Option(help="plan by budget: at most this many fp32 bytes (12MB, 10MiB)")]
MetricOpt = Annotated[
    Metric | None,
    typer.Option(
        help="budget sensitivity: kl (needs data; default with --dataset, the better predictor) or fit (weights only)"
    ),
]
