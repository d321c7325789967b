"""What is inside a saved model: unique parameters, bytes, and which tensors are shared by whom.

Works on .safetensors (ours or any), .pt state dicts (read with ``weights_only=True``),
TorchScript archives written by :func:`export_torchscript`, and .onnx files.
"""

from __future__ import annotations

import io
import math
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, DacnnError, first_line
from .files import is_safetensors, unreadable
from .sources import unwrap_state_dict

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Inspection:
    """The contents of one file, format-independent."""

    path: str
    format: str  # safetensors | state-dict | torchscript | onnx
    bytes: int
    tensors: int
    params: int  # unique parameter elements (buffers such as BN running stats excluded)
    param_bytes: int
    shared: tuple[tuple[str, tuple[int, ...], tuple[str, ...]], ...] = ()  # (tensor, shape, users)
    source: dict[str, Any] | None = None
    dtype: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def inspect_file(path: str | Path) -> Inspection:
    """Inspect ``path`` by its content where a format says what it is (safetensors, a TorchScript
    zip), else by its suffix (.onnx, .safetensors; anything else is read as a torch state dict).

    Raises:
        CheckpointError: missing or unreadable file, or an unknown format.
    """
    path = Path(path)
    why = unreadable(path, "file")
    if why is not None:
        raise CheckpointError(why)
    if path.suffix == ".safetensors" or is_safetensors(path):  # save() writes safetensors under any name
        return _inspect_safetensors(path)
    if path.suffix == ".onnx":
        return _inspect_onnx(path)
    if _is_torchscript(path):
        return _inspect_torchscript(path)
    return _inspect_state_dict(path)


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a zip archive holding a TorchScript program (a damaged zip is not)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False


def _is_param(name: str, dtype: str = "F32") -> bool:
    """Whether a stored tensor is a parameter: not a BatchNorm statistic, not an int8 weight's scale,
    and floating (or int8: a quantized weight); integer tensors are buffers (Swin's position index)."""
    return not name.endswith((*_BUFFERS, ".int8_scale")) and dtype in ("F64", "F32", "F16", "BF16", "I8")


def _inspect_safetensors(path: Path) -> Inspection:
    from safetensors import safe_open

    from .checkpoint import read_metadata, recorded

    meta = read_metadata(path)
    params = param_bytes = tensors = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            t = f.get_slice(key)
            numel = 1
            for d in t.get_shape():
                numel *= d
            tensors += 1
            if _is_param(key, t.get_dtype()):
                params += numel
                param_bytes += numel * _itemsize(t.get_dtype())
    shared: list[tuple[str, tuple[int, ...], tuple[str, ...]]] = []
    plan, spec = recorded(path, meta, rebuild=False)  # checked: a tampered entry is one CheckpointError
    for g in plan.groups if plan is not None else ():
        shared.append((f"dacnn_anchors.{g.name}", tuple(g.shape), tuple(g.members)))
    source = spec.to_dict() if spec is not None else None
    if not shared and spec is not None and spec.kind == "dacnn":  # sharing is in the architecture
        from ..core.models import from_name

        try:
            shared = _architecture_sharing(from_name(spec.name, spec.num_classes or 100))
        except (DacnnError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"{str(path)!r} names the DACNN {spec.name!r}, which cannot be built: {first_line(exc)}"
            ) from None
    return Inspection(
        str(path),
        "safetensors",
        path.stat().st_size,
        tensors,
        params,
        param_bytes,
        tuple(shared),
        source,
        meta.get("dtype"),
    )


def _architecture_sharing(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], tuple[str, ...]]]:
    """(anchor tensor, shape, member convs) read from a built model's anchored convs."""
    from ..core.layers import BANK_NAME, AnchoredConv2d, AnchoredLinear

    users: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, AnchoredConv2d | AnchoredLinear):
            users.setdefault(m.anchor, []).append(name)
    bank = getattr(model, BANK_NAME)
    return [(f"{BANK_NAME}.{a}", tuple(getattr(bank, a).shape), tuple(u)) for a, u in users.items()]


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}.get(
        dtype, 4
    )


def _inspect_state_dict(path: Path) -> Inspection:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read {str(path)!r} as a weights-only torch file: {first_line(exc, 160)}"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
    state, notes = unwrap_state_dict(state, path, CheckpointError)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    seen: dict[tuple[int, int | torch.SymInt], list[str]] = {}
    for k, v in tensors.items():
        seen.setdefault((v.untyped_storage().data_ptr(), v.storage_offset()), []).append(k)
    kept = [n[0] for n in seen.values() if _is_param(n[0]) and tensors[n[0]].dtype in (*_FLOATS, torch.int8)]
    params = sum(tensors[n].numel() for n in kept)
    pbytes = sum(tensors[n].numel() * tensors[n].element_size() for n in kept)
    shared = tuple((n[0], tuple(tensors[n[0]].shape), tuple(n)) for n in seen.values() if len(n) > 1)
    return Inspection(str(path), "state-dict", path.stat().st_size, len(tensors), params, pbytes, shared, notes=notes)


class _Opaque:
    """Stands in for every class a TorchScript archive names: holds its state, runs nothing."""

    def __init__(self, *args: object) -> None:
        self.args = args

    def __setstate__(self, state: object) -> None:
        self.state = state


@dataclass(frozen=True)
class _TensorRecord:
    storage: str
    offset: int
    shape: tuple[int, ...]
    itemsize: int
    kind: str = "FloatStorage"


_ITEMSIZE = {
    "DoubleStorage": 8,
    "LongStorage": 8,
    "FloatStorage": 4,
    "IntStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
}


class _ArchiveUnpickler(pickle.Unpickler):
    """Reads a TorchScript ``data.pkl`` without importing or calling anything it names.

    ``torch.jit.load`` would run the archive's code (its ``__setstate__`` methods): a file
    handed to ``inspect`` must not be able to do that. Every global becomes a stand-in class,
    tensors become records of (storage, offset, shape), storages stay names.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild
        if module == "collections" and name == "OrderedDict":
            return dict
        return type(name, (_Opaque,), {"__module__": "dacnn_convert.io.inspection.archive"})

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.60}")
        kind = getattr(pid[1], "__name__", str(pid[1]))
        return (str(pid[2]), _ITEMSIZE.get(kind, 4), kind)


def _rebuild(storage: tuple[str, int, str], offset: int, size: Any, *rest: object) -> _TensorRecord:
    return _TensorRecord(storage[0], int(offset), tuple(int(d) for d in size), storage[1], storage[2])


def _walk(obj: object, prefix: str, out: dict[str, _TensorRecord], depth: int = 0) -> None:
    """Named tensors of the module tree, by attribute path (``layer1.0.conv1.weight``)."""
    if depth > 200:
        raise CheckpointError("the archive's module tree is nested more than 200 levels deep")
    state = getattr(obj, "state", obj)
    if isinstance(state, tuple) and len(state) == 1:
        state = state[0]
    if not isinstance(state, dict):
        return
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, _TensorRecord):
            out[name] = value
        elif isinstance(value, _Opaque):
            _walk(value, f"{name}.", out, depth + 1)


def _inspect_torchscript(path: Path) -> Inspection:
    try:
        with zipfile.ZipFile(path) as z:
            data = next(n for n in z.namelist() if n.endswith("/data.pkl"))
            tensors: dict[str, _TensorRecord] = {}
            _walk(_ArchiveUnpickler(io.BytesIO(z.read(data))).load(), "", tensors)
    except CheckpointError:
        raise
    except Exception as exc:  # a damaged or foreign archive: say so in one line
        raise CheckpointError(f"{str(path)!r} is not a readable TorchScript archive: {str(exc)[:160]}") from exc
    parameter_kinds = ("DoubleStorage", "FloatStorage", "HalfStorage", "BFloat16Storage", "CharStorage")
    named = {k: t for k, t in tensors.items() if _is_param(k) and t.kind in parameter_kinds}
    by_storage: dict[tuple[str, int, tuple[int, ...]], list[str]] = {}
    for name, t in named.items():
        by_storage.setdefault((t.storage, t.offset, t.shape), []).append(name)
    unique = [named[names[0]] for names in by_storage.values()]
    params = sum(math.prod(t.shape) for t in unique)
    pbytes = sum(math.prod(t.shape) * t.itemsize for t in unique)
    shared: list[tuple[str, tuple[int, ...], tuple[str, ...]]] = [
        (k, named[k].shape, ()) for k in named if k.startswith("dacnn_anchors.")
    ]
    shared += [(n[0], named[n[0]].shape, tuple(n)) for n in by_storage.values() if len(n) > 1]
    notes = ("read without running the archive's code; users of an anchor are not recorded",)
    return Inspection(
        str(path), "torchscript", path.stat().st_size, len(tensors), params, pbytes, tuple(shared), notes=notes
    )


def _inspect_onnx(path: Path) -> Inspection:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise CheckpointError("inspecting .onnx needs onnx: pip install 'dacnn-convert[onnx]'") from exc
    try:
        proto = onnx.load(str(path))
    except Exception as exc:
        raise CheckpointError(f"{str(path)!r} is not a readable ONNX file: {str(exc)[:160]}") from exc
    inits = {i.name: i for i in proto.graph.initializer}
    # Follow Identity/Cast chains so a kernel read through them counts each real consumer.
    alias = {i: i for i in inits}
    for node in proto.graph.node:
        if node.op_type in ("Identity", "Cast") and node.input and node.input[0] in alias:
            alias[node.output[0]] = alias[node.input[0]]
    users: dict[str, list[str]] = {}
    for node in proto.graph.node:
        if node.op_type in ("Identity", "Cast", "Shape", "Size"):  # plumbing, not uses of the values
            continue
        for name in node.input:
            if name in alias:
                users.setdefault(alias[name], []).append(node.name or node.op_type)
    params = pbytes = 0
    for init in inits.values():
        try:
            arr = numpy_helper.to_array(init)
        except Exception as exc:  # declared dims that disagree with the data, external data missing...
            raise CheckpointError(
                f"{str(path)!r} is not a readable ONNX file: initializer {init.name!r} of shape "
                f"{tuple(init.dims)} cannot be read ({first_line(exc, 120)}); was it edited?"
            ) from exc
        if _is_param(init.name):
            params += arr.size
            pbytes += arr.nbytes
    shared = tuple(
        (name, tuple(inits[name].dims), tuple(u))
        for name, u in users.items()
        if len(u) > 1 and len(inits[name].dims) == 4
    )
    return Inspection(str(path), "onnx", path.stat().st_size, len(inits), params, pbytes, shared)
