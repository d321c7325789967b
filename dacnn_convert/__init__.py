"""dacnn-convert: turn pretrained CNNs into deep anchored CNNs (shared convolution kernels).

Implements "Deep Anchored Convolutional Neural Networks" (Huang, Dwivedi, Roig):
kernels shared across the layers of a stage (``mix``) or of the whole network
(``plain``), every BatchNorm kept free, optional 1x1 regulators; and filter banks
(``bank``: k shared filters per stage, a 1x1 per layer, fitted to the activations).

    >>> from dacnn_convert import compress
    >>> result = compress(teacher, train_loader, val_loader, mode="mix", regulators="all", epochs=1)
    >>> student = result.model

The public names are imported on first use, so ``import dacnn_convert`` (and the CLI's
``--help``) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "AnchorConfig": ".config",
    "Conversion": ".core.convert",
    "apply": ".core.convert",
    "convert": ".core.convert",
    "plan": ".pipeline",
    "ConversionReport": ".core.report",
    "build_report": ".core.report",
    "count_macs": ".core.report",
    "count_params": ".core.report",
    "DacnnError": ".errors",
    "PipelineResult": ".pipeline",
    "from_pretrained": ".io.card",
    "model_card": ".io.card",
    "save_pretrained": ".io.card",
    "anchor": ".pipeline",
    "compress": ".pipeline",
    "Plan": ".core.plan",
    "TrainConfig": ".train",
    "distill": ".train",
    "recalibrate_bn": ".train",
    "ReconstructConfig": ".train",
    "reconstruct_sections": ".train",
    "export_onnx": ".io.export",
    "export_torchscript": ".io.export",
    "inspect_file": ".io.inspection",
    "measure_latency": ".latency",
    "load": ".io.checkpoint",
    "save": ".io.checkpoint",
}
__all__ = [
    "AnchorConfig",
    "Conversion",
    "ConversionReport",
    "DacnnError",
    "PipelineResult",
    "Plan",
    "ReconstructConfig",
    "TrainConfig",
    "anchor",
    "apply",
    "build_report",
    "compress",
    "convert",
    "count_macs",
    "count_params",
    "distill",
    "export_onnx",
    "export_torchscript",
    "from_pretrained",
    "inspect_file",
    "load",
    "measure_latency",
    "model_card",
    "plan",
    "recalibrate_bn",
    "reconstruct_sections",
    "save",
    "save_pretrained",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .config import AnchorConfig
    from .core.convert import Conversion, apply, convert
    from .core.plan import Plan
    from .core.report import ConversionReport, build_report, count_macs, count_params
    from .errors import DacnnError
    from .io.card import from_pretrained, model_card, save_pretrained
    from .io.checkpoint import load, save
    from .io.export import export_onnx, export_torchscript
    from .io.inspection import inspect_file
    from .latency import measure_latency
    from .pipeline import PipelineResult, anchor, compress, plan
    from .train import ReconstructConfig, TrainConfig, distill, recalibrate_bn, reconstruct_sections


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dacnn_convert' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
