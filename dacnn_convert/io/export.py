"""Exports that keep anchored kernels stored once: ONNX, TorchScript, safetensors.

ONNX goes through the dynamo-based exporter with its graph optimiser off: the optimiser
would constant-fold each BatchNorm into the conv before it and write one folded kernel
per use, undoing the sharing (the legacy exporter does the same). Unfolded, each anchor
is one initialiser that every conv using it reads. Node metadata (stack traces) is
stripped so the file is essentially its weights.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import validate
from ..atomic import atomic_write
from ..core.modes import mode
from ..defaults import DEFAULT_INPUT_SIZE
from ..errors import DacnnError, UsageError, first_line
from ..validate import inputs_of

ONNX_DTYPES = ("fp32", "fp16", "bf16")
MIN_OPSET = 18  # torch.onnx's dynamo exporter: an older opset is silently written as 18


@dataclass(frozen=True)
class OnnxExport:
    """What an ONNX export wrote and how closely onnxruntime reproduces PyTorch."""

    path: Path
    bytes: int
    initializers: int
    max_abs_diff: float | None  # onnxruntime vs PyTorch on a batch of 3 (fp32 storage); None if not checked


def _require(module: str, extra: str = "onnx") -> None:
    try:
        __import__(module)
    except ImportError as exc:
        raise DacnnError(f"{module} is not installed: pip install 'dacnn-convert[{extra}]'") from exc


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: tuple[int, int, int] = DEFAULT_INPUT_SIZE,
    dtype: str = "fp32",
    opset: int = 18,
    check: bool = True,
    dynamic_spatial: bool = False,
) -> OnnxExport:
    """Export ``model`` to ONNX with a dynamic batch axis, one initialiser per anchored kernel.

    Args:
        model: an anchored (or any) model; exported in eval mode.
        path: the .onnx file to write.
        input_size: (C, H, W) of one example.
        dtype: storage of floating initialisers: ``fp32``, ``fp16`` or ``bf16`` (a Cast back
            to fp32 follows each one, so the graph still computes in fp32).
        opset: ONNX opset version, from 18 to the newest the installed onnx knows (28 for onnx 1.23).
        check: run the file with onnxruntime (if installed) and report the largest
            difference from PyTorch.
        dynamic_spatial: also leave height and width free (a fully convolutional model
            then runs at any input size); the check runs at another size as well.

    Raises:
        UsageError: ``dtype`` unknown, or ``opset`` outside what the exporter can write.
        DacnnError: onnx/onnxscript missing, the export failed, or onnxruntime's outputs
            are not finite or (fp32 storage) differ from PyTorch's by more than 1e-3; the file
            is removed.
    """
    validate.module("model", model)
    input_size = validate.input_size(input_size)
    _require("onnxscript")
    import onnx

    if dtype not in ONNX_DTYPES:
        raise UsageError(f"unknown ONNX dtype {dtype!r}; expected one of: {', '.join(ONNX_DTYPES)}")
    top = onnx.defs.onnx_opset_version()  # the installed onnx converts the exporter's graph up to here
    if not MIN_OPSET <= opset <= top:
        raise UsageError(
            f"opset {opset}: the exporter (torch.onnx, dynamo) writes opset {MIN_OPSET} or later, and the installed "
            f"onnx {onnx.__version__} converts up to {top}; choose «opset» from {MIN_OPSET} to {top}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.randn(2, *input_size)
    try:
        with (
            mode(model),
            tempfile.TemporaryDirectory() as tmp,
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            raw = Path(tmp) / "raw.onnx"
            torch.onnx.export(
                model,
                (x,),
                str(raw),
                dynamo=True,
                optimize=False,
                opset_version=opset,
                dynamic_shapes=(_dynamic_axes(dynamic_spatial),),
                input_names=["input"],
                output_names=["output"],
            )
            proto = onnx.load(str(raw))
    except Exception as exc:
        raise DacnnError(f"ONNX export failed: {first_line(exc, 200)}") from exc
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:  # the exporter logs a failed conversion and keeps its own opset
        raise DacnnError(f"the exporter wrote opset {written}, not the {opset} asked for; nothing written")
    _strip_metadata(proto)
    if dtype != "fp32":
        _store_floats_as(proto, dtype)
    atomic_write(path, lambda tmp: onnx.save(proto, str(tmp)))
    diff = None
    if check:
        sizes = [input_size] + ([(input_size[0], input_size[1] + 32, input_size[2] + 32)] if dynamic_spatial else [])
        diffs = [_check_onnxruntime(model, path, s) for s in sizes]
        diff = None if diffs[0] is None else max(d for d in diffs if d is not None)
        limit = 1e-3 if dtype == "fp32" else float("inf")  # half storage rounds every weight: finite is the test
        if diff is not None and not diff <= limit:  # NaN compares false: a NaN output fails too
            path.unlink(missing_ok=True)
            raise DacnnError(
                f"onnxruntime does not reproduce the model (max |diff| {diff}); nothing written. "
                "Non-finite weights, or an op the exporter got wrong"
            )
    return OnnxExport(path, path.stat().st_size, len(proto.graph.initializer), diff)


def _dynamic_axes(spatial: bool) -> dict[int, Any]:
    """The batch axis, and with ``spatial`` height and width, left free in the exported graph."""
    axes: dict[int, Any] = {0: torch.export.Dim("batch")}
    if spatial:
        axes[2] = axes[3] = torch.export.Dim.DYNAMIC  # the exporter derives each range itself
    return axes


def _strip_metadata(proto) -> None:  # noqa: ANN001
    """Drop per-node stack traces and names scopes: they can outweigh a small model's weights."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in proto.graph.initializer:
        del value.metadata_props[:]


def _store_floats_as(proto, dtype: str) -> None:  # noqa: ANN001
    """Store float initialisers in fp16/bf16, each followed by a Cast back to fp32 under its old name."""
    from onnx import TensorProto, helper, numpy_helper

    target = {"fp16": (TensorProto.FLOAT16, torch.float16), "bf16": (TensorProto.BFLOAT16, torch.bfloat16)}[dtype]
    casts = []
    for init in proto.graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        values = torch.from_numpy(numpy_helper.to_array(init).copy()).to(target[1])
        name = init.name
        init.CopyFrom(
            helper.make_tensor(
                f"{name}__{dtype}", target[0], list(values.shape), values.view(torch.int16).numpy().tobytes(), raw=True
            )
        )
        casts.append(helper.make_node("Cast", [f"{name}__{dtype}"], [name], to=TensorProto.FLOAT))
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(casts + nodes)


def _check_onnxruntime(model: nn.Module, path: Path, input_size: tuple[int, int, int]) -> float | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    x = torch.randn(3, *input_size)  # another batch size than the export's: the axis is dynamic
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with mode(model), torch.no_grad():
        expected = model(x).numpy()
    return float(abs(got - expected).max())


def export_torchscript(
    model: nn.Module, path: str | Path, input_size: tuple[int, int, int] = DEFAULT_INPUT_SIZE
) -> Path:
    """Trace ``model`` to TorchScript and save it; each anchor stays one tensor in the archive."""
    validate.module("model", model)
    input_size = validate.input_size(input_size)
    path = Path(path)
    with mode(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.randn(1, *input_size))
    atomic_write(path, lambda tmp: traced.save(str(tmp)))
    return path


@dataclass(frozen=True)
class QuantizedExport:
    """A static int8 ONNX export: where it went, how big, and how its weights were stored."""

    path: Path
    bytes: int
    fp32_bytes: int
    int8_weights: int  # initialisers stored as int8
    shared_int8: int  # int8 initialisers read by more than one conv (anchors quantized once)


def quantize_onnx_int8(fp32: str | Path, path: str | Path, batches: Iterable, num_batches: int = 20) -> QuantizedExport:
    """Static int8 quantization of an exported model: per-channel int8 weights, int8 activations.

    onnxruntime's static quantizer skips initialisers that reach a Conv through an Identity
    node — exactly how an exported anchor is shared — and would leave every anchor in fp32;
    those Identity nodes are removed first (onnx_ir's IdentityEliminationPass), so each conv
    reads its anchor directly and each anchor is quantized once. Activation ranges come from
    ``num_batches`` calibration batches (QDQ format, MinMax).

    Raises:
        DacnnError: onnxruntime or onnx_ir missing, or quantization failed.
    """
    _require("onnxruntime", "onnx")
    import onnx
    import onnx_ir
    from onnx_ir.passes.common import IdentityEliminationPass
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    fp32, path = Path(fp32), Path(path)
    model = onnx_ir.load(str(fp32))
    IdentityEliminationPass()(model)
    name = onnx.load(str(fp32)).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)
            self.left = num_batches

        def get_next(self) -> dict | None:
            if self.left <= 0:
                return None
            batch = next(self.it, None)
            if batch is None:
                return None
            self.left -= 1
            return {name: inputs_of(batch).float().cpu().numpy()}

    import logging

    logging.disable(logging.WARNING)  # the quantizer logs a warning per BatchNorm on the root logger
    try:
        with tempfile.TemporaryDirectory() as tmp:
            clean = Path(tmp) / "clean.onnx"
            onnx_ir.save(model, str(clean))
            out = Path(tmp) / "int8.onnx"
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_static(
                    str(clean),
                    str(out),
                    Reader(),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    weight_type=QuantType.QInt8,
                    activation_type=QuantType.QInt8,
                )
            proto = onnx.load(str(out))
            atomic_write(path, lambda t: onnx.save(proto, str(t)))
    except DacnnError:
        raise
    except Exception as exc:
        raise DacnnError(f"int8 quantization failed: {first_line(exc, 200)}") from exc
    finally:
        logging.disable(logging.NOTSET)
    int8 = {i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    readers: dict[str, set[str]] = {}
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in int8:
            consumers = {n.name for n in proto.graph.node if node.output[0] in n.input}
            readers.setdefault(node.input[0], set()).update(consumers)
    shared = sum(1 for users in readers.values() if len(users) > 1)
    return QuantizedExport(path, path.stat().st_size, fp32.stat().st_size, len(int8), shared)


def onnx_accuracy(path: str | Path, batches: Iterable, limit_batches: int | None = None) -> float:
    """Top-1 accuracy (fraction) of an ONNX classifier under onnxruntime (CPU) on (images, labels) batches."""
    _require("onnxruntime", "onnx")
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    correct = total = 0
    for i, (x, y) in enumerate(batches):
        if limit_batches is not None and i >= limit_batches:
            break
        logits = sess.run(None, {name: x.float().cpu().numpy()})[0]
        correct += int((torch.from_numpy(logits).argmax(1) == y).sum())
        total += len(y)
    return correct / max(total, 1)
