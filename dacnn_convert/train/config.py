"""What a training run is told (TrainConfig) and what it gives back (FitResult)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..defaults import FINETUNE_LR, FINETUNE_WARMUP_STEPS, SEED_MAX, TRAIN_LR
from ..errors import UsageError, choose
from ..names import OPTIMIZERS, PRECISIONS, SCHEDULES

FINETUNE: dict[str, Any] = {"lr": FINETUNE_LR, "warmup_steps": FINETUNE_WARMUP_STEPS}  # TrainConfig.finetune()


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by ``train`` and ``distill`` (recipes set the same fields)."""

    epochs: int = 1
    lr: float = TRAIN_LR
    optimizer: str = "sgd"  # sgd (momentum 0.9, nesterov) | adamw | adagrad (the paper's)
    schedule: str = "cosine"  # cosine | step (x0.1 at half the epochs, as the paper)
    step_every: int = 0  # with schedule=step: x0.1 every N epochs instead (the paper's SVHN: 20)
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    clip_grad: float | None = None
    kd_temperature: float = 4.0
    kd_alpha: float = 0.9
    feature_weight: float = 0.0  # weight of the stage-feature MSE (used when feature layers are given)
    precision: str = "auto"
    limit_batches: int | None = None
    checkpoint_every: int | None = None  # steps; None = at the end of each epoch only
    channels_last: bool = True  # NHWC activations: measured +14% fp32 training throughput on a 2-core CPU
    seed: int = 0
    # Ctrl-C / SIGTERM stop at the next step boundary with a checkpoint and a resume hint. Off by
    # default: a library call installs no signal handler unless asked (the CLI asks).
    catch_signals: bool = False

    @classmethod
    def finetune(cls, **overrides: Any) -> TrainConfig:
        """The settings for fine-tuning a converted pretrained network (``distill``'s default).

        A converted student starts close to its teacher, so it wants a lower peak learning
        rate than training from scratch and a short warm-up; chosen by measurement (see
        :mod:`dacnn_convert.defaults`). ``overrides`` replace single fields.
        """
        return cls(**{**FINETUNE, **overrides})

    def __post_init__(self) -> None:
        for name, value in vars(self).items():  # NaN and infinities pass every comparison below unnoticed
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"{name} must be a finite number, got {value}")
        ranges = {  # name: (lowest, highest, lowest allowed itself)
            "epochs": (1, None, True),
            "lr": (0, None, False),
            "kd_temperature": (0, None, False),
            "kd_alpha": (0, 1, True),
            "weight_decay": (0, None, True),
            "label_smoothing": (0, 1, True),
            "feature_weight": (0, None, True),
            "warmup_steps": (0, None, True),
            "step_every": (0, None, True),
            "clip_grad": (0, None, False),
            "limit_batches": (1, None, True),
            "checkpoint_every": (1, None, True),
            "seed": (0, SEED_MAX, True),
        }
        integers = {"epochs", "warmup_steps", "step_every", "limit_batches", "checkpoint_every", "seed"}
        for name, (low, high, closed) in ranges.items():
            value = getattr(self, name)
            if value is None:
                continue
            kinds = int if name in integers else int | float
            if isinstance(value, bool) or not isinstance(value, kinds):
                what = "an integer" if name in integers else "a number"
                raise UsageError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
            if isinstance(value, int) and abs(value) > 2**53 and name not in integers:
                raise UsageError(f"{name} must be a finite number, got an integer of {len(str(value))} digits")
            if not math.isfinite(value):
                raise UsageError(f"{name} must be a finite number, got {value!r:.40}")
            if (value < low if closed else value <= low) or (high is not None and value > high):
                span = f"[{low}, {high}]" if high is not None else (f">= {low}" if closed else f"> {low}")
                why = " (the softmax temperature divides the logits)" if name == "kd_temperature" else ""
                raise UsageError(f"{name} must be {span}, got {value}{why}")
        choose("optimizer", self.optimizer, OPTIMIZERS)
        choose("schedule", self.schedule, SCHEDULES)
        choose("precision", self.precision, PRECISIONS)


@dataclass
class FitResult:
    """Accuracies (fractions in [0, 1]), the per-epoch history and where the best model went."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_acc: float = 0.0
    final_acc: float = 0.0
    checkpoint: Path | None = None
    wall_s: float = 0.0
    images_per_s: float = 0.0
    precision: str = "fp32"
    calibrated_batches: int = 0  # BN statistics re-estimated on this many batches before training
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checkpoint"] = str(self.checkpoint) if self.checkpoint else None
        return d
