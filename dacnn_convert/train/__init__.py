"""Recovering accuracy after conversion: data, losses, BN calibration and the training loop (on core/ and io/)."""

from .calibrate import recalibrate_bn
from .config import FitResult, TrainConfig
from .data import DATASETS, Loaders, make_loaders
from .evaluation import evaluate
from .loop import distill, train
from .losses import kd_loss
from .reconstruct import ReconstructConfig, ReconstructResult, reconstruct_sections

__all__ = [
    "DATASETS",
    "FitResult",
    "Loaders",
    "ReconstructConfig",
    "ReconstructResult",
    "TrainConfig",
    "distill",
    "evaluate",
    "kd_loss",
    "make_loaders",
    "recalibrate_bn",
    "reconstruct_sections",
    "train",
]
