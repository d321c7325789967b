"""``export``, ``inspect`` and ``latency``: shipping a converted model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..defaults import DEFAULT_INPUT_SIZE
from ..errors import DacnnError, UsageError, write_failed
from ..recipes import parse_input_size
from .common import JsonOpt, console, fail, load_checkpoint, print_json, source_of
from .guards import check_input_size, check_output_file
from .options import Dtype, DtypeOpt, ExportFormat, FileOverwriteOpt, SizeOpt, SkelOpt


def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="a .safetensors file written by dacnn")],
    format: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="onnx, torchscript, safetensors, pt, or dense (the "
            "original architecture's state dict: loads with strict=True, no dacnn needed)",
        ),
    ] = ExportFormat.onnx,  # noqa: A002
    out: Annotated[Path | None, typer.Option(help="file to write (default: next to the checkpoint)")] = None,
    dtype: DtypeOpt = Dtype.fp32,
    input_size: SizeOpt = None,
    model_source: SkelOpt = None,
    opset: Annotated[int, typer.Option(help="ONNX opset version: 18 to the newest the installed onnx knows")] = 18,
    quantize: Annotated[
        str | None,
        typer.Option(help="ONNX: int8 = static int8 (per-channel weights, activations calibrated on --dataset)"),
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="with --quantize: calibration batches and the accuracy check")
    ] = None,
    calib_batches: Annotated[
        int, typer.Option("--calib-batches", "--calibrate-batches", min=1, help="with --quantize: calibration batches")
    ] = 20,
    limit_batches: Annotated[
        int | None, typer.Option(min=1, help="with --quantize: cap the accuracy check's batches")
    ] = None,
    dynamic_spatial: Annotated[
        bool, typer.Option(help="ONNX: leave height and width free, not only the batch")
    ] = False,
    overwrite: FileOverwriteOpt = False,
) -> None:
    """Export a saved model keeping each anchored kernel stored once."""
    import torch

    from ..core.plan import Plan
    from ..io.checkpoint import read_metadata, save
    from ..io.export import export_onnx, export_torchscript

    try:
        if quantize is not None and (quantize != "int8" or format is not ExportFormat.onnx or dataset is None):
            raise UsageError("--quantize int8 applies to --format onnx and needs --dataset for calibration")
        if dtype is Dtype.int8 and format is not ExportFormat.safetensors:
            raise UsageError(
                f"--dtype int8 (per-channel int8 weights) applies to --format safetensors; --format {format.value} "
                "takes fp32, fp16 or bf16"
                + ("; for an int8 ONNX model use --quantize int8" if format is ExportFormat.onnx else "")
            )
        model = load_checkpoint(checkpoint, model_source)
        meta = read_metadata(checkpoint)
        size = parse_input_size(input_size) or (
            Plan.from_json(meta["plan"]).input_size if "plan" in meta else DEFAULT_INPUT_SIZE
        )
        check_input_size(model, size)
        suffix = {
            "onnx": ".onnx",
            "torchscript": ".torchscript.pt",
            "safetensors": ".safetensors",
            "pt": ".pt",
            "dense": ".dense.safetensors",
        }
        out = out or checkpoint.with_name(checkpoint.name.split(".")[0] + f"-{dtype.value}" + suffix[format.value])
        check_output_file(out, (checkpoint,), overwrite)  # before any work: never the input, nothing unasked
        if format is ExportFormat.dense:
            _export_dense(checkpoint, model, out, size, dtype.value, model_source)
            return
        if format is ExportFormat.onnx and quantize is not None:
            _export_int8_onnx(model, out, size, opset, dataset, calib_batches, limit_batches)  # type: ignore[arg-type]
            return
        if format is ExportFormat.onnx:
            result = export_onnx(model, out, size, dtype.value, opset=opset, dynamic_spatial=dynamic_spatial)
            diff = f", onnxruntime max |diff| {result.max_abs_diff:.2e}" if result.max_abs_diff is not None else ""
            console.print(f"wrote {out} ({result.bytes:,} bytes, {result.initializers} initialisers{diff})")
            return
        if dtype is not Dtype.fp32 and format is ExportFormat.torchscript:
            raise UsageError("--dtype applies to onnx, safetensors and pt; TorchScript is written in fp32")
        if format is ExportFormat.torchscript:
            export_torchscript(model, out, size)
        elif format is ExportFormat.safetensors:  # save() records the source load() found: it loads again
            save(model, out, source=source_of(model, model_source), dtype=dtype.value)
        else:
            from ..io.checkpoint import DTYPES

            state = {
                k: v.to(DTYPES[dtype.value]) if v.is_floating_point() else v for k, v in model.state_dict().items()
            }
            from ..atomic import atomic_write

            atomic_write(out, lambda tmp: torch.save(state, tmp))
        console.print(f"wrote {out} ({out.stat().st_size:,} bytes)")
    except OSError as exc:  # the target folder is missing, read-only or full
        raise fail(write_failed(exc.filename or out, exc)) from None


def _export_int8_onnx(
    model: Any, out: Path, size: Any, opset: int, dataset: str, batches: int, limit: int | None
) -> None:
    """fp32 ONNX, then static int8 with calibration batches; both scored on the validation split."""
    import tempfile

    from ..io.export import export_onnx, onnx_accuracy, quantize_onnx_int8
    from .common import DataOptions

    loaders = DataOptions.of(dataset, device="cpu").loaders(size)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", size, opset=opset)
        result = quantize_onnx_int8(fp32.path, out, loaders.train, batches)
        acc32 = onnx_accuracy(fp32.path, loaders.val, limit)
    acc8 = onnx_accuracy(out, loaders.val, limit)
    console.print(
        f"wrote {out}: {result.bytes:,} bytes ({result.bytes / result.fp32_bytes:.1%} of fp32's "
        f"{result.fp32_bytes:,}), {result.int8_weights} int8 weights ({result.shared_int8} shared by several "
        f"convs, each stored once); onnxruntime top-1 on {dataset}: fp32 {100 * acc32:.2f}% -> int8 "
        f"{100 * acc8:.2f}%"
    )


def _export_dense(checkpoint: Path, model: Any, out: Path, size: Any, dtype: str, model_source: str | None) -> None:
    """Write the stock-architecture state dict, checked against a fresh instance of the original class."""
    import math

    from ..io.dense import DenseExportError, export_dense
    from ..io.sources import build_model

    spec = source_of(model, model_source)
    if spec is None:
        raise UsageError(f"{checkpoint} does not say which architecture it came from: give --model NAME")
    stock = build_model(spec, weights=None)
    result = export_dense(model, out, stock, size, dtype)
    diff = result.max_abs_diff
    if diff is None or not math.isfinite(diff) or diff > 1e-3:
        out.unlink(missing_ok=True)
        raise DenseExportError(
            f"the stock {spec.display} does not reproduce the anchored model (max |diff| {diff}); nothing written"
        )
    plan = getattr(model, "dacnn_plan", None)
    narrowed = (
        f" narrowed by the plan's pruning ({plan.prune.label}: dacnn_convert.io.resize.resize_to_state(model, "
        "{key: tensor.shape}) narrows a fresh one)"
        if plan is not None and plan.prune is not None
        else ""
    )
    console.print(
        f"wrote {out} ({result.bytes:,} bytes, {result.tensors} tensors): loads into {spec.display}{narrowed} "
        f"with strict=True, max |diff| vs the anchored model {diff:.2e} (eval mode)"
    )


def inspect_command(
    path: Annotated[Path, typer.Argument(help=".safetensors, .pt (state dict or TorchScript) or .onnx")],
    json_out: JsonOpt = False,
) -> None:
    """Unique parameters, bytes and the sharing structure (anchor -> members) of a saved model."""
    from ..io.inspection import inspect_file

    info = inspect_file(path)
    if json_out:
        print_json(info.to_dict())
        return
    console.print(
        f"{info.path}: {info.format}, {info.bytes:,} bytes, {info.tensors} tensors, {info.params:,} unique "
        f"parameters ({info.param_bytes:,} bytes; file/params {info.bytes / max(info.param_bytes, 1):.3f})"
    )
    if info.source:
        console.print(f"source: {info.source}")
    table = Table(title=f"shared tensors ({len(info.shared)})")
    for col in ("tensor", "shape", "users"):
        table.add_column(col)
    for name, shape, users in info.shared:
        table.add_row(name, "x".join(map(str, shape)), f"{len(users)}: " + ", ".join(users) if users else "-")
    console.print(table)
    for n in info.notes:
        console.print(f"note: {n}")


def latency_command(
    checkpoint: Annotated[Path, typer.Argument(help="a .safetensors file written by dacnn-convert")],
    batch: Annotated[str, typer.Option(help="batch sizes, comma-separated")] = "1,64",
    precision: Annotated[str, typer.Option(help="precisions, comma-separated: fp32, bf16, fp16 (CUDA)")] = "fp32",
    device: Annotated[str, typer.Option(help="cpu (the default: deployment latency), auto, cuda or cuda:N")] = "cpu",
    repeats: Annotated[int, typer.Option(min=1, help="timed runs per setting")] = 20,
    input_size: SizeOpt = None,
    model_source: SkelOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Latency (median, p90) of the original, the anchored model, and with its regulators (anchored+reg)."""
    import dataclasses

    from ..core.convert import convert
    from ..errors import CheckpointError
    from ..io.checkpoint import load, recorded
    from ..io.sources import build_model, parse_spec
    from ..latency import compare_latency

    try:
        from ..train.device import resolve_device

        device = str(resolve_device(device))
        plan, spec = recorded(checkpoint, rebuild=model_source is None)
        if plan is None or spec is None:
            raise CheckpointError(f"{checkpoint} has no conversion plan or source: was it written by dacnn-convert?")
        if model_source is not None:
            spec = parse_spec(model_source, spec.num_classes)
        elif spec.kind == "module":
            raise UsageError(f"{checkpoint} comes from user code: name it with --model {spec.name}")
        original = build_model(spec, weights=None)
        models = {"original": original}
        if plan.regulators:
            models["anchored"] = convert(original, dataclasses.replace(plan, regulators=()), init="none").model
        models["anchored+reg" if plan.regulators else "anchored"] = load(checkpoint, model=original)
        size = parse_input_size(input_size) or plan.input_size
        try:
            batches = [int(b) for b in batch.split(",")]
        except ValueError:
            raise UsageError(f"--batch takes batch sizes like 1,64; got {batch!r}") from None
        check_input_size(models["original"], size)
        rows = [
            row
            for p in precision.split(",")
            for b in batches
            for row in compare_latency(models, size, b, p, device, repeats)
        ]
    except (DacnnError, ValueError) as exc:
        raise fail(exc if isinstance(exc, DacnnError) else UsageError(str(exc))) from None
    base = {(r.batch, r.precision): r.median_ms for r in rows if r.model == "original"}
    if json_out:
        print_json(
            {
                "checkpoint": str(checkpoint),
                "device": device,
                "input_size": list(size),
                "rows": [{**r.to_dict(), "vs_original": r.median_ms / base[(r.batch, r.precision)]} for r in rows],
            }
        )
        return
    table = Table(title=f"latency on {device} ({repeats} interleaved runs after warm-up)")
    for col in ("model", "batch", "precision", "median ms", "p90 ms", "vs original"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        ratio = r.median_ms / base[(r.batch, r.precision)]
        table.add_row(r.model, str(r.batch), r.precision, f"{r.median_ms:.2f}", f"{r.p90_ms:.2f}", f"{ratio:.3f}x")
    console.print(table)
