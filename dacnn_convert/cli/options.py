"""The typed options the commands share (typer ``Annotated`` types) and the choices they take."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..defaults import DEVICE_HELP, SEED_MAX


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


class RegulatorInit(Choice):
    fit = "fit"
    zero = "zero"


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


SkelOpt = Annotated[
    str | None, typer.Option("--model", help="model source for checkpoints of user code (package.module:factory)")
]


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


ReconstructOpt = Annotated[
    bool | None,
    typer.Option(
        "--reconstruct/--no-reconstruct",
        help="with --dataset, train each section on calibration batches to match the original's output "
        "after the fit (default: on for mix, plain and sharesnet, off for banks and size targets)",
    ),
]


RegInitOpt = Annotated[
    RegulatorInit | None,
    typer.Option(
        help="adapter regulators start fitted by least squares to each member's residual (fit, the default; "
        "on the calibration inputs with --dataset) or adding nothing (zero)"
    ),
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


CalibOpt = Annotated[
    int,
    typer.Option(
        "--calib-batches",
        "--calibrate-batches",  # the 0.1.0 name, kept for one release
        min=0,
        help="training batches for the data-aware fit and to re-estimate BatchNorm statistics (0: skip BN)",
    ),
]


PrecOpt = Annotated[
    Precision, typer.Option(help="auto (bf16 where the CPU/GPU has bf16 units), fp32, bf16, fp16 (CUDA)")
]


LimitOpt = Annotated[int | None, typer.Option(min=1, help="cap batches per epoch and per evaluation (smoke runs)")]


TrainLimitOpt = Annotated[int | None, typer.Option(min=1, help="train on a fixed random subset of N images")]


DownloadOpt = Annotated[bool, typer.Option(help="let torchvision download a missing dataset")]


SeedOpt = Annotated[int, typer.Option(help=f"random seed, 0 to {SEED_MAX:,}")]


ResumeOpt = Annotated[bool, typer.Option(help="continue from OUT/state.pt (optimiser, schedule, RNG, counters)")]


OverwriteOpt = Annotated[
    bool, typer.Option(help="replace a run already in --out (otherwise refused: use --resume to continue it)")
]


FileOverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="replace --out if it exists (never this command's own input)")
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
