"""What is inside a saved model: unique parameters, bytes, and which tensors are shared by whom.

Works on .safetensors (ours or any), .pt state dicts (read with ``weights_only=True``),
TorchScript archives written by :func:`export_torchscript`, and .onnx files.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


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
    """Inspect ``path`` by its suffix (and, for .pt, by its content).

    Raises:
        CheckpointError: missing or unreadable file, or an unknown format.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} does not exist")
    if path.suffix == ".onnx":
        return _inspect_onnx(path)
    if path.suffix == ".safetensors":
        return _inspect_safetensors(path)
    if zipfile.is_zipfile(path) and any(n.endswith("/constants.pkl") for n in zipfile.ZipFile(path).namelist()):
        return _inspect_torchscript(path)
    return _inspect_state_dict(path)


def _is_param(name: str) -> bool:
    return not name.endswith(_BUFFERS)


def _inspect_safetensors(path: Path) -> Inspection:
    from safetensors import safe_open

    from .checkpoint import read_metadata

    meta = read_metadata(path)
    params = param_bytes = tensors = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            t = f.get_slice(key)
            numel = 1
            for d in t.get_shape():
                numel *= d
            tensors += 1
            if _is_param(key):
                params += numel
                param_bytes += numel * _itemsize(t.get_dtype())
    shared: list[tuple[str, tuple[int, ...], tuple[str, ...]]] = []
    if "plan" in meta:
        plan = json.loads(meta["plan"])
        for g in plan["groups"]:
            shared.append((f"dacnn_anchors.{g['name']}", tuple(g["shape"]), tuple(g["members"])))
    source = json.loads(meta["source"]) if "source" in meta else None
    if not shared and source is not None and source.get("kind") == "dacnn":  # sharing is in the architecture
        from .models.dacnn import from_name

        shared = _architecture_sharing(from_name(source["name"], source.get("num_classes") or 100))
    return Inspection(str(path), "safetensors", path.stat().st_size, tensors, params, param_bytes, tuple(shared),
                      source, meta.get("dtype"))  # fmt: skip


def _architecture_sharing(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], tuple[str, ...]]]:
    """(anchor tensor, shape, member convs) read from a built model's anchored convs."""
    from .layers import BANK_NAME, AnchoredConv2d

    users: dict[str, list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, AnchoredConv2d):
            users.setdefault(m.anchor, []).append(name)
    bank = getattr(model, BANK_NAME)
    return [(f"{BANK_NAME}.{a}", tuple(getattr(bank, a).shape), tuple(u)) for a, u in users.items()]


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}.get(dtype, 4)


def _inspect_state_dict(path: Path) -> Inspection:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read {str(path)!r} as a weights-only torch file: {str(exc).splitlines()[0][:160]}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    seen: dict[tuple[int, int], list[str]] = {}
    for k, v in tensors.items():
        seen.setdefault((v.untyped_storage().data_ptr(), v.storage_offset()), []).append(k)
    params = sum(tensors[names[0]].numel() for names in seen.values() if _is_param(names[0]))
    pbytes = sum(tensors[n[0]].numel() * tensors[n[0]].element_size() for n in seen.values() if _is_param(n[0]))
    shared = tuple((n[0], tuple(tensors[n[0]].shape), tuple(n)) for n in seen.values() if len(n) > 1)
    return Inspection(str(path), "state-dict", path.stat().st_size, len(tensors), params, pbytes, shared)


def _inspect_torchscript(path: Path) -> Inspection:
    module = torch.jit.load(str(path), map_location="cpu")
    named = dict(module.named_parameters())
    shared = []
    for name, p in named.items():
        if name.startswith("dacnn_anchors."):
            shared.append((name, tuple(p.shape), ()))
    params = sum(p.numel() for p in named.values())
    pbytes = sum(p.numel() * p.element_size() for p in named.values())
    notes = ("TorchScript archives keep each parameter once; users of an anchor are not recorded",)
    return Inspection(str(path), "torchscript", path.stat().st_size, len(named), params, pbytes, tuple(shared),
                      notes=notes)  # fmt: skip


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
        arr = numpy_helper.to_array(init)
        if _is_param(init.name):
            params += arr.size
            pbytes += arr.nbytes
    shared = tuple(
        (name, tuple(inits[name].dims), tuple(u)) for name, u in users.items() if len(u) > 1 and len(inits[name].dims) == 4
    )
    return Inspection(str(path), "onnx", path.stat().st_size, len(inits), params, pbytes, shared)
