"""Global unstructured magnitude pruning (Han et al. 2015) and a sparse file format fair to it.

The smallest-magnitude weights of all convolutions and linear layers are zeroed at once
(one global threshold), fine-tuned with the masks kept, then made permanent. A dense file
does not shrink, so the artefact is also written as bitmask + non-zero values: 1 bit per
weight plus the kept values, the cheapest standard encoding above ~3% density.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune

from ..core.plan import count_params
from ..errors import CheckpointError, PlanError
from ..io.checkpoint import save
from . import Compressed, Context, register_method
from .structured import ensure_unshared


def prunable(model: nn.Module) -> list[tuple[nn.Conv2d | nn.Linear, str]]:
    """(module, "weight") for every convolution and linear layer."""
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def magnitude_prune(model: nn.Module, n_prune: int) -> nn.Module:
    """Zero exactly ``n_prune`` weights of ``model`` in place by global L1 magnitude; masks stay attached."""
    targets = prunable(model)
    available = sum(m.weight.numel() for m, _ in targets)
    if not 0 <= n_prune <= available:
        raise PlanError(f"cannot prune {n_prune:,} weights: conv and linear layers hold {available:,}")
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=int(n_prune))
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold the masks into the weights (``prune.remove``) so the model is a plain module again."""
    for m, name in prunable(model):
        if prune.is_pruned(m) and hasattr(m, f"{name}_mask"):
            prune.remove(m, name)
    return model


def save_sparse(model: nn.Module, path: str | Path) -> Path:
    """Write ``model``'s state dict with each mostly-zero float tensor as a packed bitmask + values.

    A tensor is stored sparse only when that is smaller than dense (density below ~97%).
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for key, value in model.state_dict().items():
        v = value.detach().cpu().contiguous()
        nz = v != 0
        sparse_bytes = math.ceil(v.numel() / 8) + int(nz.sum()) * v.element_size()
        if v.is_floating_point() and v.numel() > 0 and sparse_bytes < v.numel() * v.element_size():
            tensors[f"{key}::mask"] = torch.from_numpy(np.packbits(nz.flatten().numpy()))
            tensors[f"{key}::values"] = v[nz].contiguous()
            shapes[key] = list(v.shape)
        else:
            tensors[key] = v
    path = Path(path)
    save_file(tensors, str(path), metadata={"format": "dacnn-convert/sparse-1", "shapes": json.dumps(shapes)})
    return path


def load_sparse(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_sparse` back into a dense state dict.

    Raises:
        CheckpointError: the file is not a sparse dacnn file or its masks and values disagree.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "dacnn-convert/sparse-1":
            raise CheckpointError(f"{str(path)!r} is not a sparse file written by save_sparse")
        raw = {k: f.get_tensor(k) for k in f.keys()}
    state = {k: v for k, v in raw.items() if "::" not in k}
    for key, shape in json.loads(meta["shapes"]).items():
        numel = math.prod(shape)
        mask = torch.from_numpy(np.unpackbits(raw[f"{key}::mask"].numpy())[:numel].astype(bool))
        values = raw[f"{key}::values"]
        if int(mask.sum()) != values.numel():
            raise CheckpointError(f"{str(path)!r}: mask and values of {key!r} disagree; the file is corrupt")
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[mask] = values
        state[key] = dense.view(shape)
    return state


class Magnitude:
    """Global magnitude pruning down to ``target_params`` non-zero parameters."""

    name = "magnitude"
    fixed_size = False
    removes_macs = False  # zeros in dense kernels: a MAC budget cannot be met this way
    description = "global unstructured magnitude pruning (Han et al. 2015), masks kept while fine-tuning"

    def compress(self, teacher: nn.Module, target_params: int | None, ctx: Context) -> Compressed:
        ensure_unshared(teacher, self.name)
        if target_params is None and ctx.target_macs is not None:
            raise PlanError(
                "magnitude pruning removes no MACs (dense kernels run every zero): it cannot meet «budget-macs»; "
                "leave it out of «methods» or give «budget»"
            )
        if target_params is None:
            raise PlanError("magnitude pruning needs a parameter budget («budget» or «match»)")
        import copy

        model = copy.deepcopy(teacher).to(memory_format=torch.contiguous_format)  # global pruning flattens weights
        total = count_params(model)
        magnitude_prune(model, total - target_params)

        def store(m: nn.Module, folder: Path) -> dict[str, int]:
            dense = save(m, folder / "model.safetensors", source=ctx.source).stat().st_size
            return {"safetensors": dense, "sparse": save_sparse(m, folder / "model.sparse.safetensors").stat().st_size}

        return Compressed(
            model,
            target_params,
            make_permanent,
            store,
            "dense compute: no speed-up without sparse kernels; bytes also given as bitmask + values",
        )


register_method(Magnitude())
