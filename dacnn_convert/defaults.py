"""Measured defaults shared by the library, the recipes and every CLI command (no torch import).

One place, so ``distill()``, ``compress()``, ``dacnn-convert --dataset`` and ``dacnn bench``
fine-tune the same way unless told otherwise.
"""

from __future__ import annotations

# Fine-tuning a converted pretrained network (TrainConfig.finetune, distill()'s default):
# benchmarks/results/python_api/sweep.json, one 12,800-image epoch of KD (100 steps) from the
# Fashion-MNIST ResNet-18 teacher (89.50%) into its mix + regulators student (79.9% after the
# act fit and BN recalibration); accuracy after the epoch, by peak lr, without / with a
# 20-step warm-up: 0.005: 87.53 / 87.29, 0.01: 87.75 / 87.87, 0.02: 87.13 / 87.79,
# 0.05 (the from-scratch default, which the issue measured): 77.70 / 87.08.
FINETUNE_LR = 0.01
FINETUNE_WARMUP_STEPS = 20

# Batches that re-estimate BatchNorm statistics after a conversion (and feed the data-aware
# fit): accuracy after recalibration was flat from 10 to 100 batches of 128 on that benchmark
# (80.1, 79.8, 79.9, 79.9%), 50 leaves room for larger models.
CALIB_BATCHES = 50

# Batches the budget planner scores each candidate on (its kl sensitivity and the act moments every
# candidate is fitted with): each candidate costs a pass over them, so fewer than the fit's. With 8 of
# 128 images the kl score ranked candidates by fine-tuned accuracy on the ResNet-18 teacher
# (benchmarks/results/budget_bench/sensitivity_rank: kl 55 s for all sections); other counts not swept.
SCORE_BATCHES = 8
# rounds of joint re-scoring after the additive search (budget.refine): each scores the chosen plan whole and
# with each converted section left out, n + 2 kl evaluations for n sections
RESCORE_ROUNDS = 2

# How adapter regulators start (Plan.regulator_init): "fit" (least squares to each member's residual)
# or "zero". Measured: benchmarks/results/python_api/ (issue 28).
REGULATOR_INIT = "fit"

# The example input when neither the data nor the model's own config says (ImageNet's, as torchvision's and
# timm's pretrained models expect).
DEFAULT_INPUT_SIZE = (3, 224, 224)

# What --device accepts (every command that runs a model; dacnn_convert.train.device).
DEVICE_HELP = "auto (the CUDA device when present; under torchrun the one of LOCAL_RANK), cpu, cuda or cuda:N"

# Training a network from scratch (TrainConfig's default, `dacnn train`, the paper's recipes).
TRAIN_LR = 0.05


# The paper's modes fit their anchors layer by layer on the converted student ("act-seq") when given
# data: on the Fashion-MNIST demo teacher (ResNet-18, 88.6% on 2,000 test images), mix + regulators
# right after conversion and BN recalibration (20 batches) scored 78.2% with "act" and 84.0% with
# "act-seq" (85.5% with fitted regulators, 81.2% "act"); banks and budget plans keep "act", whose input
# moments the budget search computes once for every candidate (issue 28, benchmarks/results/python_api/).
SEQUENTIAL_MODES = ("mix", "plain", "sharesnet")


def default_reconstruct(reconstruct: bool | None, with_data: bool, mode: str | None, prunes: bool = False) -> bool:
    """Whether a conversion reconstructs its sections after the fit (train.reconstruct) when not told:
    with data, for every plan that shares something (``mode`` not ``none``). Measured right after the fit
    and BN recalibration, 300 steps a section (benchmarks/results/reconstruct/): mix + regulators on the
    ResNet-18 teacher 86.55% -> 89.50% (teacher 90.35%); the budget planner's plans on the Fashion-MNIST
    teachers: ResNet-18 at 4x 88.92% -> 89.67% and at 10x 50.52% -> 73.11% (teacher 89.75%),
    MobileNetV3-Large at 4x 76.19% -> 81.64% (85.49%), ConvNeXt-atto at 10x 50.09% -> 52.63% (84.79%)."""
    if reconstruct is not None:
        return reconstruct
    # not after pruning: its target is then the pruned original (compensated), not the original, and on the
    # Fashion-MNIST ResNet-18 it lowered planner plans that prune, at group-norm's 25% point 86.85% -> 86.29%,
    # at its 10% point 83.66% -> 77.94% (benchmarks/results/speed_bench/NOTES.md)
    return with_data and mode != "none" and not prunes


def default_init(init: str | None, with_data: bool, mode: str | None = None) -> str:
    """The init a conversion uses when none is given — the one place this policy lives: without data
    fitted to the weights ("fit"); with data fitted to the activations, layer by layer on the converted
    student for the paper's modes (``mode`` in :data:`SEQUENTIAL_MODES`: "act-seq"), else "act"."""
    if init is not None:
        return init
    if not with_data:
        return "fit"
    return "act-seq" if mode in SEQUENTIAL_MODES else "act"


# Seeds are 32-bit, as NumPy's: the data order uses seed * 1000 + epoch, which a 64-bit torch
# generator must still hold (a 22-digit --seed overflowed it with a traceback: issue 23).
SEED_MAX = 2**32 - 1

# What the planner keeps across its candidates (both bounded; past the bound a candidate is scored the slow way):
# activations before each candidate's changed part (core.partial.PrefixCache: 8 batches of 32 images at 224 px
# before a ResNet-50's layer2 take about 1.6 GB, both modes), and each share group's whitened decomposition
# (core.fitting.BasisCache: a 3x3 conv of 512 channels' 4608 x 4608 Cholesky factor is 170 MB in float64).
PREFIX_CACHE_BYTES = 2 * 2**30
BASIS_CACHE_BYTES = 2 * 2**30
