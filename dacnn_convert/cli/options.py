"""The typed options the commands share (typer ``Annotated`` types) and the choices they take."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..defaults import DEVICE_HELP, SEED_MAX

# --help groups the options of the long commands into these panels
PANEL_MODEL = "Model"
PANEL_SHARE = "What to share"
PANEL_TARGET = "Size target (the planner decides)"
PANEL_DATA = "Data"
PANEL_FINETUNE = "Fine-tune"
PANEL_OUTPUT = "Output"
PANEL_RUNTIME = "Runtime"


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


class PruneImportance(Choice):
    group = "group"
    l1 = "l1"


SkelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="model source for checkpoints of user code (package.module:factory)",
        rich_help_panel=PANEL_MODEL,
    ),
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


RecipeOpt = Annotated[
    Path | None,
    typer.Option(help="a YAML recipe; flags given on the command line override it", rich_help_panel=PANEL_MODEL),
]


ModeOpt = Annotated[
    Mode,
    typer.Option(
        help="mix: share per stage; plain: one network-wide kernel; bank: a bank of "
        "k filters per stage + a 1x1 per conv (--bank-size); sharesnet; none",
        rich_help_panel=PANEL_SHARE,
    ),
]


BankOpt = Annotated[
    str,
    typer.Option(
        help="with --mode bank, filters per bank: an integer (64), a fraction of C_out "
        "(0.25) or per section (1:1.0,2:0.5,4:0.125; unlisted sections stay free)",
        rich_help_panel=PANEL_SHARE,
    ),
]


ShareOpt = Annotated[
    str | None,
    typer.Option(
        help="banks you name: layer names or patterns of one shape and stage, comma-separated, groups separated by ; "
        "('layer1.0.conv2,layer1.1.conv2' or 'stages.1.*.fc1;stages.2.*.fc1'), each of --bank-size filters; "
        "with --mode bank beside the mode's banks, with --mode none the only ones",
        rich_help_panel=PANEL_SHARE,
    ),
]


FactorOpt = Annotated[
    str | None,
    typer.Option(
        help="low-rank factorise every conv that shares with nothing: rank as an integer or a fraction of C_out (0.25)",
        rich_help_panel=PANEL_SHARE,
    ),
]


RegOpt = Annotated[
    str,
    typer.Option(help="regulators in sections: none, all, or 1-based numbers like 1,3", rich_help_panel=PANEL_SHARE),
]


StyleOpt = Annotated[
    RegulatorStyle,
    typer.Option(help="adapter: parallel, zero-init (function kept); paper: in series", rich_help_panel=PANEL_SHARE),
]


ReconstructOpt = Annotated[
    bool | None,
    typer.Option(
        "--reconstruct/--no-reconstruct",
        help="with --dataset, train each section on calibration batches to match the original's output "
        "after the fit (default: on with --dataset)",
        rich_help_panel=PANEL_SHARE,
    ),
]


RegInitOpt = Annotated[
    RegulatorInit | None,
    typer.Option(
        help="adapter regulators start fitted by least squares to each member's residual (fit, the default; "
        "on the calibration inputs with --dataset) or adding nothing (zero)",
        rich_help_panel=PANEL_SHARE,
    ),
]


InitOpt = Annotated[
    Init | None,
    typer.Option(
        help="anchor init: act (data-aware; default with --dataset), act-seq (data-aware, layer by "
        "layer on the converted student), fit (weight least squares; default without data), mean, first, random",
        rich_help_panel=PANEL_SHARE,
    ),
]


WeightsOpt = Annotated[
    str,
    typer.Option(
        help="DEFAULT (pretrained, downloads), none (random), or a state-dict PATH", rich_help_panel=PANEL_MODEL
    ),
]


ClassesOpt = Annotated[
    int | None,
    typer.Option(help="classes of the classifier (replaces the head if pretrained)", rich_help_panel=PANEL_MODEL),
]


SizeOpt = Annotated[
    str | None,
    typer.Option(
        help="example input: 224 or CxHxW; default 32 px with a registered dataset, else the model's pretrained "
        "config (timm data config, torchvision weights), else 224",
        rich_help_panel=PANEL_MODEL,
    ),
]


OutOpt = Annotated[
    Path | None, typer.Option(help="output folder (default runs/MODEL-MODE)", rich_help_panel=PANEL_OUTPUT)
]


DryOpt = Annotated[bool, typer.Option(help="print the plan and write nothing", rich_help_panel=PANEL_OUTPUT)]


LeafOpt = Annotated[
    list[str] | None,
    typer.Option(help="package.module.Class that fx must not trace into (repeatable)", rich_help_panel=PANEL_MODEL),
]


DtypeOpt = Annotated[
    Dtype, typer.Option(help="storage type of the checkpoint's floating tensors", rich_help_panel=PANEL_OUTPUT)
]


DatasetOpt = Annotated[
    str | None,
    typer.Option(
        help="fine-tune on fashion-mnist, cifar10, cifar100, svhn or synthetic (KD from the original)",
        rich_help_panel=PANEL_DATA,
    ),
]


EpochsOpt = Annotated[int, typer.Option(min=1, help="training epochs", rich_help_panel=PANEL_FINETUNE)]


BatchOpt = Annotated[int, typer.Option(min=1, help="batch size", rich_help_panel=PANEL_DATA)]


LrOpt = Annotated[float, typer.Option(help="peak learning rate", rich_help_panel=PANEL_FINETUNE)]


OptimOpt = Annotated[
    Optimizer,
    typer.Option(help="sgd (momentum 0.9, nesterov), adamw or adagrad (the paper's)", rich_help_panel=PANEL_FINETUNE),
]


SchedOpt = Annotated[
    Schedule,
    typer.Option(help="cosine, or step (x0.1 at half the epochs, as the paper)", rich_help_panel=PANEL_FINETUNE),
]


KdTOpt = Annotated[float, typer.Option(help="distillation temperature T", rich_help_panel=PANEL_FINETUNE)]


KdAOpt = Annotated[
    float, typer.Option(help="weight of the KD term (1 - alpha goes to cross-entropy)", rich_help_panel=PANEL_FINETUNE)
]


CalibOpt = Annotated[
    int,
    typer.Option(
        "--calib-batches",
        "--calibrate-batches",  # the 0.1.0 name, kept for one release
        min=0,
        help="training batches for the data-aware fit and to re-estimate BatchNorm statistics (0: skip BN)",
        rich_help_panel=PANEL_DATA,
    ),
]


PrecOpt = Annotated[
    Precision,
    typer.Option(
        help="auto (bf16 where the CPU/GPU has bf16 units), fp32, bf16, fp16 (CUDA)", rich_help_panel=PANEL_RUNTIME
    ),
]


LimitOpt = Annotated[
    int | None,
    typer.Option(min=1, help="cap batches per epoch and per evaluation (smoke runs)", rich_help_panel=PANEL_FINETUNE),
]


TrainLimitOpt = Annotated[
    int | None, typer.Option(min=1, help="train on a fixed random subset of N images", rich_help_panel=PANEL_DATA)
]


DownloadOpt = Annotated[
    bool, typer.Option(help="let torchvision download a missing dataset", rich_help_panel=PANEL_DATA)
]


SeedOpt = Annotated[int, typer.Option(help=f"random seed, 0 to {SEED_MAX:,}", rich_help_panel=PANEL_RUNTIME)]


ResumeOpt = Annotated[
    bool,
    typer.Option(help="continue from OUT/state.pt (optimiser, schedule, RNG, counters)", rich_help_panel=PANEL_OUTPUT),
]


OverwriteOpt = Annotated[
    bool,
    typer.Option(
        help="replace a run already in --out (otherwise refused: use --resume to continue it)",
        rich_help_panel=PANEL_OUTPUT,
    ),
]


FileOverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="replace --out if it exists (never this command's own input)", rich_help_panel=PANEL_OUTPUT
    ),
]


CkptOpt = Annotated[
    int | None, typer.Option(min=1, help="also checkpoint every N steps (atomic write)", rich_help_panel=PANEL_FINETUNE)
]


class FeatureLoss(Choice):
    none = "none"
    mse = "mse"


FeatOpt = Annotated[
    FeatureLoss,
    typer.Option(help="also match stage outputs of teacher and student (mse)", rich_help_panel=PANEL_FINETUNE),
]


FeatWOpt = Annotated[float, typer.Option(min=0.0, help="weight of the feature loss", rich_help_panel=PANEL_FINETUNE)]


PlotOpt = Annotated[
    bool, typer.Option(help="write OUT/accuracy.png, the accuracy curve of the fine-tune", rich_help_panel=PANEL_OUTPUT)
]


AugOpt = Annotated[
    Augment,
    typer.Option(help="auto (random flip as the paper, none for SVHN), flip or none", rich_help_panel=PANEL_DATA),
]


WdOpt = Annotated[float, typer.Option(min=0.0, help="weight decay", rich_help_panel=PANEL_FINETUNE)]


SmoothOpt = Annotated[
    float,
    typer.Option(min=0.0, max=1.0, help="label smoothing of the cross-entropy term", rich_help_panel=PANEL_FINETUNE),
]


WarmOpt = Annotated[int, typer.Option(min=0, help="linear learning-rate warm-up steps", rich_help_panel=PANEL_FINETUNE)]


ClipOpt = Annotated[
    float | None, typer.Option(min=0.0, help="clip the gradient norm to this value", rich_help_panel=PANEL_FINETUNE)
]


ChannelsLastOpt = Annotated[
    bool, typer.Option(help="train in channels_last (NHWC) memory format", rich_help_panel=PANEL_FINETUNE)
]


DeviceOpt = Annotated[str, typer.Option(help=DEVICE_HELP, rich_help_panel=PANEL_RUNTIME)]


class ExportFormat(Choice):
    onnx = "onnx"
    torchscript = "torchscript"
    safetensors = "safetensors"
    pt = "pt"
    dense = "dense"


TargetParamsOpt = Annotated[
    str | None,
    typer.Option(help="plan by budget: at most this many unique params (6M, 600K)", rich_help_panel=PANEL_TARGET),
]


TargetRatioOpt = Annotated[
    float | None, typer.Option(help="plan by budget: this many times fewer unique params", rich_help_panel=PANEL_TARGET)
]


TargetBytesOpt = Annotated[
    str | None,
    typer.Option(help="plan by budget: at most this many fp32 bytes (12MB, 10MiB)", rich_help_panel=PANEL_TARGET),
]


TargetMacsOpt = Annotated[
    str | None,
    typer.Option(
        help="plan by compute: at most this many MACs per example (40M) or this many times fewer (4x); "
        "alone or with a size target",
        rich_help_panel=PANEL_TARGET,
    ),
]


TargetLatencyOpt = Annotated[
    float | None,
    typer.Option(
        help="plan by speed: at most this many ms per batch of --latency-batch on this machine, measured "
        "(the plan is built and timed, its MAC budget tightened until it fits)",
        rich_help_panel=PANEL_TARGET,
    ),
]


LatencyBatchOpt = Annotated[
    int, typer.Option(min=1, help="the batch size --target-latency is measured at", rich_help_panel=PANEL_TARGET)
]


ScoreBatchesOpt = Annotated[
    int, typer.Option(min=1, help="calibration batches the budget search scores on", rich_help_panel=PANEL_TARGET)
]


RescoreOpt = Annotated[
    int,
    typer.Option(
        min=0,
        help="rounds of whole-plan re-scoring after the budget search (kl; 0: the additive search alone)",
        rich_help_panel=PANEL_TARGET,
    ),
]


PruneOpt = Annotated[
    str | None,
    typer.Option(
        help="channel pruning before sharing: a fraction of every layer's channels (0.25; the logits kept, "
        "residual couplings kept by Torch-Pruning's dependency graph) or auto: the planner tries ratios and keeps "
        "the best-scored plan (needs a target). Prunes MACs where banks do not",
        rich_help_panel=PANEL_TARGET,
    ),
]


PruneImportanceOpt = Annotated[
    PruneImportance,
    typer.Option(
        help="how --prune ranks channels: group (group L2 norm, DepGraph) or l1 (each filter's L1 norm)",
        rich_help_panel=PANEL_TARGET,
    ),
]


ShareAcrossOpt = Annotated[
    bool,
    typer.Option(
        "--share-across/--no-share-across",
        help="after the budget search, merge banks across stages where one joint bank of fewer parameters fits "
        "the layers at no larger error (convs reading patches of one shape), spend the saving on more filters, "
        "and keep that plan where it scores better whole (needs a target)",
        rich_help_panel=PANEL_TARGET,
    ),
]


SweepOpt = Annotated[
    bool,
    typer.Option(
        help="print the planner's own front instead: the plan it picks at 1.5x to 20x fewer params, "
        "with MACs and its predicted score (scored once; a --target-macs holds at every size)",
        rich_help_panel=PANEL_TARGET,
    ),
]


MetricOpt = Annotated[
    Metric | None,
    typer.Option(
        help="budget sensitivity: kl (needs data; default with --dataset, the better predictor) or fit (weights only)",
        rich_help_panel=PANEL_TARGET,
    ),
]
