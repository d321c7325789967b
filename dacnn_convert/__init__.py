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
import sys
import types
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "Conversion": ".convert",
    "apply": ".convert",
    "convert": ".convert",
    "plan": ".convert",
    "ConversionReport": ".report",
    "build_report": ".report",
    "count_macs": ".report",
    "count_params": ".report",
    "DacnnError": ".errors",
    "PipelineResult": ".pipeline",
    "from_pretrained": ".card",
    "model_card": ".card",
    "save_pretrained": ".card",
    "anchor": ".pipeline",
    "compress": ".pipeline",
    "Plan": ".planning",
    "TrainConfig": ".distill",
    "distill": ".distill",
    "recalibrate_bn": ".distill",
    "export_onnx": ".export",
    "export_torchscript": ".export",
    "inspect_file": ".inspection",
    "measure_latency": ".latency",
    "load": ".checkpoint",
    "save": ".checkpoint",
}
__all__ = [
    "Conversion",
    "ConversionReport",
    "DacnnError",
    "PipelineResult",
    "Plan",
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
    "save",
    "save_pretrained",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .card import from_pretrained, model_card, save_pretrained
    from .checkpoint import load, save
    from .convert import Conversion, apply, convert, plan
    from .distill import TrainConfig, distill, recalibrate_bn
    from .errors import DacnnError
    from .export import export_onnx, export_torchscript
    from .inspection import inspect_file
    from .latency import measure_latency
    from .pipeline import PipelineResult, anchor, compress
    from .planning import Plan
    from .report import ConversionReport, build_report, count_macs, count_params


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dacnn_convert' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    if name not in _SHADOWED:
        globals()[name] = value  # later lookups skip this function
    return value


# Functions named like a submodule: importing the submodule binds its name on the package,
# so these are looked up on every access (as the eager ``from .distill import distill`` did).
_SHADOWED = frozenset({"convert", "distill"})


class _Package(types.ModuleType):
    def __getattribute__(self, name: str) -> Any:
        if name in _SHADOWED:
            return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        return super().__getattribute__(name)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
