"""dacnn-convert: turn pretrained CNNs into deep anchored CNNs (shared convolution kernels).

Implements "Deep Anchored Convolutional Neural Networks" (Huang, Dwivedi, Roig):
kernels shared across the layers of a stage (``mix``) or of the whole network
(``plain``), every BatchNorm kept free, optional 1x1 regulators.

    >>> from dacnn_convert import anchor, count_params
    >>> student = anchor(model, mode="mix", regulators="all")
"""

from .checkpoint import load, save
from .distill import distill
from .convert import Conversion, anchor, apply, convert, plan
from .errors import DacnnError
from .export import export_onnx, export_torchscript
from .inspection import inspect_file
from .latency import measure_latency
from .planning import Plan
from .report import ConversionReport, build_report, count_macs, count_params

__all__ = [
    "Conversion",
    "ConversionReport",
    "DacnnError",
    "Plan",
    "anchor",
    "apply",
    "build_report",
    "convert",
    "count_macs",
    "count_params",
    "distill",
    "export_onnx",
    "export_torchscript",
    "inspect_file",
    "measure_latency",
    "load",
    "plan",
    "save",
]
__version__ = "0.1.0"
