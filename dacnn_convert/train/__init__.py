"""Recovering accuracy after conversion: data, losses, BN calibration and the training loop (on core/ and io/)."""

from .calibrate import recalibrate_bn
from .data import DATASETS, Loaders, make_loaders
from .losses import kd_loss
from .trainer import FitResult, TrainConfig, distill, evaluate, train

__all__ = [
    "DATASETS",
    "FitResult",
    "Loaders",
    "TrainConfig",
    "distill",
    "evaluate",
    "kd_loss",
    "make_loaders",
    "recalibrate_bn",
    "train",
]
