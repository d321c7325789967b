"""Checkpoints of anchored models: one .safetensors file, each anchor stored once.

The file's metadata holds the model source (torchvision/timm name and num_classes)
and the conversion plan, so :func:`load` rebuilds the anchored model — sharing
restored — without the user's code. Sources given as ``package.module:factory`` are
never imported from a file's metadata: pass the skeleton with ``load(path, model=...)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import torch
from torch import nn

from ..atomic import atomic_write
from ..core.convert import BN_STALE_ATTR, PLAN_ATTR, convert
from ..core.kinds import is_plain, plain_kind
from ..core.layers import Regulator
from ..core.plan import Plan
from ..errors import CheckpointError, DacnnError, UsageError, first_line, marked
from .files import unreadable
from .resize import resize_to_state
from .sources import ModelSpec, build_model, check_state_dict, fill_tied, parse_spec, with_module_versions

FORMAT = "dacnn-convert/1"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STORAGE_DTYPES = (*DTYPES, "int8")  # what save() writes; int8 is per-channel quantized (quantize_int8)


def save(
    model: nn.Module,
    path: str | Path,
    source: ModelSpec | str | None = None,
    dtype: str = "fp32",
    pruned: bool = False,
) -> Path:
    """Write ``model`` (anchored or not) to ``path`` as .safetensors, atomically.

    Args:
        model: the model; if it came from :func:`anchor` its plan is stored with it.
        path: destination, conventionally ``*.safetensors``.
        source: the model source (``"resnet18"``, ``"timm:resnet50d"`` or a
            :class:`ModelSpec`) so :func:`load` can rebuild it; optional.
        dtype: storage type of floating tensors: ``fp32``, ``fp16``, ``bf16``, or ``int8``:
            every weight of two or more dimensions (each anchor and bank once, free convs,
            coefficients, linears) as per-output-channel symmetric int8 with an fp16 scale per
            channel, dequantized by :func:`load`; vectors (BatchNorm, biases) stay fp32.
        pruned: the model's layers were narrowed by channel pruning; :func:`load` rebuilds
            the source architecture and shrinks it to the stored tensor shapes.

    Returns:
        The path written. A crash mid-write leaves any previous file intact.

    Raises:
        OutputError: the file cannot be written (disk full, not writable); the previous one is kept.
    """
    from safetensors.torch import save_file

    from .. import validate
    from ..errors import choose

    validate.module("model", model)
    choose("dtype", dtype, STORAGE_DTYPES)
    if source is not None and not isinstance(source, str | ModelSpec):
        raise UsageError(
            f"«source» is where the model comes from, e.g. 'resnet18' or 'timm:convnext_atto', "
            f"got {type(source).__name__}"
        )
    if source is None:
        source = getattr(model, SOURCE_ATTR, None)  # a model from load() keeps the source its file named
    if isinstance(source, str):
        source = parse_spec(source, _num_classes(model))
    if source is not None and source.num_classes is None:
        source = ModelSpec(source.kind, source.name, _num_classes(model))
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if source is not None and source.name.startswith("hf-hub:") and isinstance(arch, str):
        source = ModelSpec("timm", arch, source.num_classes)  # the skeleton, rebuilt without the hub
    full = model.state_dict()
    tied = tied_keys(full)  # tensors the user's model ties (anchors are already stored once)
    full = {k: v for k, v in full.items() if k not in tied}
    if dtype == "int8":
        state, quantized = quantize_int8(full)
    else:
        target = DTYPES[dtype]
        state = {
            k: (v.detach().to(target) if v.is_floating_point() else v.detach()).contiguous().cpu()
            for k, v in full.items()
        }
        quantized = []
    meta = {"format": FORMAT, "dtype": dtype}
    if tied:
        meta["tied"] = json.dumps(tied)  # stored once; load() ties them again
    if quantized:
        meta["int8"] = "per-channel"  # the quantized tensors are those with a KEY.int8_scale beside them
    if pruned:
        meta["structure"] = "pruned"
    plan = getattr(model, PLAN_ATTR, None)
    if plan is not None:
        meta["plan"] = plan.to_json()
        if getattr(model, BN_STALE_ATTR, False):  # so distill() still recalibrates it after load()
            meta["bn_stale"] = "1"
        pending = [n for n, m in model.named_modules() if isinstance(m, Regulator) and m.identity_pending]
        if pending:  # fitted adapters whose BN the next recalibration must keep the identity
            meta["identity_pending"] = json.dumps(pending)
    if source is not None:
        meta["source"] = json.dumps(source.to_dict())
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


SOURCE_ATTR = "dacnn_source"  # set by load(): save() of the same model records the same source


def tied_keys(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{key: first key}`` for every state-dict entry that is the same tensor as an earlier one
    (a user's tied weights): safetensors refuses to store a tensor twice."""
    first: dict[tuple[int, int | torch.SymInt, tuple[int, ...], tuple[int, ...]], str] = {}
    tied: dict[str, str] = {}
    for key, value in state.items():
        if value.numel() == 0:
            continue
        ident = (value.data_ptr(), value.storage_offset(), tuple(value.shape), tuple(value.stride()))
        if ident in first:
            tied[key] = first[ident]
        else:
            first[ident] = key
    return tied


def _retie(model: nn.Module, tied: dict[str, str]) -> None:
    """Make each tied parameter the very tensor it was tied to when saved (not a copy of it)."""
    for alias, key in tied.items():
        owner_name, _, leaf = alias.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        try:
            target = model.get_parameter(key)
        except AttributeError:
            continue  # tied to a buffer: the values were loaded, there is no parameter to share
        if leaf in owner._parameters:
            owner.register_parameter(leaf, target)


INT8_SCALE = ".int8_scale"  # suffix of the per-channel scales of an int8-stored tensor


def quantize_int8(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Per-output-channel symmetric int8 of every floating tensor with two or more dimensions.

    ``w ≈ q * s`` with ``q`` in [-127, 127] and ``s = max|w_c| / 127`` per output channel
    (dim 0), the scales stored in fp16 beside each tensor as ``KEY.int8_scale`` (as GGUF does:
    their 2^-11 relative rounding is small beside int8's half step; with fp32 scales the 10% bank
    model of benchmarks/results/int8_storage.md took 27.1% of its fp32 file, with fp16 26.9%). Returns the
    state to write and the keys quantized.
    """
    out: dict[str, torch.Tensor] = {}
    keys = []
    for k, v in state.items():
        v = v.detach().cpu()
        if v.is_floating_point() and v.dim() >= 2:
            flat = v.float().reshape(v.shape[0], -1)
            scale = (flat.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float16).tiny).half()
            out[k] = (
                (flat / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8).reshape(v.shape).contiguous()
            )
            out[k + INT8_SCALE] = scale.contiguous()
            keys.append(k)
        else:
            out[k] = v.contiguous()
    return out, keys


def dequantize_int8(state: dict[str, torch.Tensor], keys: list[str]) -> dict[str, torch.Tensor]:
    """Undo :func:`quantize_int8` (fp32 tensors back, scales removed)."""
    state = dict(state)
    for k in keys:
        scale = state.pop(k + INT8_SCALE, None)
        if scale is None or k not in state or state[k].dtype != torch.int8 or scale.shape[0] != state[k].shape[0]:
            raise CheckpointError(f"int8 tensor {k} has no matching per-channel scale; the file is damaged")
        q = state[k]
        state[k] = (q.float().reshape(q.shape[0], -1) * scale.float()[:, None]).reshape(q.shape)
    return state


def _mark_pending(model: nn.Module, recorded: str | None, path: str | Path) -> None:
    """Mark again the fitted adapters a file recorded as awaiting BN recalibration (Regulator.set_fitted)."""
    if recorded is None:
        return
    modules = dict(model.named_modules())
    try:
        names = json.loads(recorded)
        if not isinstance(names, list) or not all(isinstance(modules.get(n), Regulator) for n in names):
            raise ValueError("not a list of regulator names")
    except ValueError as exc:
        raise CheckpointError(
            f"{str(path)!r}: malformed identity_pending metadata ({exc}); the file was altered"
        ) from exc
    for n in names:
        cast(Regulator, modules[n]).identity_pending = True


def _num_classes(model: nn.Module) -> int | None:
    """The classifier's width: what the model says (timm's ``num_classes``), else the last Linear the
    forward pass calls (a converted model's plan records the order), else the last one declared."""
    said = getattr(model, "num_classes", None)
    if isinstance(said, int) and not isinstance(said, bool) and said > 0:
        return said
    plan = getattr(model, PLAN_ATTR, None)
    linears = [s for s in plan.sites if s.layer == "linear"] if plan is not None else []
    if linears:
        return max(linears, key=lambda s: s.order).out_channels
    last = [m for m in model.modules() if isinstance(m, nn.Linear) and plain_kind(m) is nn.Linear]
    return last[-1].out_features if last else None


HEADER_BYTES_PER_LAYER = 640  # a conv or Linear's site and group in the plan's JSON (measured: 300-560)
HEADER_BYTES_PER_TENSOR = 120  # one tensor's name, dtype, shape and offsets in the safetensors index (~100)


def stored_overhead(model: nn.Module) -> int:
    """Bytes a :func:`save` file of ``model`` (converted by any plan) holds beyond its fp32 parameters,
    estimated from above: its buffers (BatchNorm statistics, kept by every plan) and a header of the
    plan's metadata and the tensor index, counted for twice the tensors the model has now (banks,
    coefficients and regulators add tensors). A byte target spends the rest on parameters.
    """
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    layers = sum(1 for m in model.modules() if is_plain(m))
    tensors = len(model.state_dict())
    return buffers + 1024 + HEADER_BYTES_PER_LAYER * layers + HEADER_BYTES_PER_TENSOR * 2 * tensors


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a .safetensors file (empty when it has none).

    Raises:
        CheckpointError: the file is missing or not a valid safetensors file.
    """
    from safetensors import safe_open

    path = Path(path)
    why = unreadable(path, "checkpoint")
    if why is not None:
        raise CheckpointError(why)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise CheckpointError(f"{str(path)!r} is not a valid .safetensors file ({str(exc)[:120]})") from exc


def recorded(
    path: str | Path, meta: dict[str, str] | None = None, rebuild: bool = True
) -> tuple[Plan | None, ModelSpec | None]:
    """The conversion plan and model source a checkpoint's metadata records (None where absent).

    Each is checked as a file can be tampered with: an unknown source kind or model name, a class
    count or input size no model has. With ``rebuild`` (the skeleton will be built from the source),
    a source naming a hub model (``hf-hub:``) is refused, as a file never makes a network call, and
    so is a model name this installation does not have.

    Raises:
        CheckpointError: malformed metadata, or a source this installation cannot rebuild.
    """
    meta = read_metadata(path) if meta is None else meta
    try:
        plan = Plan.from_json(meta["plan"]) if "plan" in meta else None
        spec = ModelSpec.from_dict(json.loads(meta["source"])) if "source" in meta else None
    except Exception as exc:
        raise CheckpointError(f"{str(path)!r} has malformed metadata ({first_line(exc)}); was it edited?") from exc
    if not rebuild or spec is None:
        return plan, spec
    if spec.name.startswith("hf-hub:"):
        raise CheckpointError(
            f"{str(path)!r} names the hub model {spec.name}, and rebuilding it would contact the hub: a file never "
            f"makes a network call; pass its skeleton, load(path, model=...) (on the command line «model=timm:ARCH»)"
        )
    if spec.kind != "module":
        try:
            parse_spec(spec.display, spec.num_classes)
        except DacnnError as exc:
            raise CheckpointError(
                f"{str(path)!r} names the model {spec.display}, which this installation cannot build "
                f"({first_line(exc)}); pass its skeleton, load(path, model=...)"
            ) from None
    return plan, spec


def load(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save`, with its anchored kernels shared again.

    Args:
        path: a .safetensors file written by :func:`save`.
        model: the original (unconverted) skeleton; needed only when the file's source is
            user code (``package.module:factory``) or unrecorded.

    Raises:
        CheckpointError: the file is missing, corrupt, tampered with, or its tensors do not
            match its plan; nothing is half-loaded.
    """
    from safetensors.torch import load_file

    meta = read_metadata(path)
    if meta.get("format") != FORMAT and model is None:
        raise CheckpointError(
            f"{str(path)!r} was not written by dacnn_convert.save (no {FORMAT!r} metadata); "
            "load it with load(path, model=your_model) or as a plain state dict"
        )
    plan, spec = recorded(path, meta, rebuild=model is None)
    if model is None:
        if spec is None or spec.kind == "module":
            raise CheckpointError(
                f"{str(path)!r} comes from user code ({spec.name if spec else 'unknown source'}); code is never "
                "imported from a file: pass the skeleton, load(path, model=make_model())"
            )
        model = build_model(spec, weights=None)
    try:
        state = load_file(str(path))
        if "int8" in meta:
            state = dequantize_int8(state, [k[: -len(INT8_SCALE)] for k in state if k.endswith(INT8_SCALE)])
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read tensors of {str(path)!r}: {str(exc)[:160]}") from exc
    tied = fill_tied(state, meta.get("tied"), path, CheckpointError)
    if meta.get("structure") == "pruned":
        model = resize_to_state(model, {k: v.shape for k, v in state.items()})
    elif plan is not None and plan.prune is not None:  # narrow the skeleton to the shapes the plan records
        shapes: dict[str, tuple[int, ...]] = {k: tuple(v.shape) for k, v in state.items()}
        for s in plan.sites:
            shapes[f"{s.name}.weight"] = s.weight_shape[:2] if s.layer == "linear" else s.weight_shape
        model = resize_to_state(model, shapes)
    skeleton = convert(model, plan, init="none").model if plan is not None else model
    try:
        check_state_dict(state, skeleton, str(path))
    except Exception as exc:
        raise CheckpointError(
            f"{marked(exc)}; the file does not match its recorded plan (tampered or wrong model)"
        ) from exc
    expected = skeleton.state_dict()
    state = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    skeleton.load_state_dict(with_module_versions(state, skeleton), strict=True)
    _retie(skeleton, tied)
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        bad = next(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
        raise CheckpointError(
            f"{str(path)!r}: tensor {bad} holds NaN or infinite values; the file is damaged or the "
            "run that wrote it diverged"
        )
    if plan is not None:
        setattr(skeleton, BN_STALE_ATTR, meta.get("bn_stale") == "1")
        _mark_pending(skeleton, meta.get("identity_pending"), path)
    if spec is not None:
        setattr(skeleton, SOURCE_ATTR, spec)
    return skeleton
