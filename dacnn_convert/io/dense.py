"""Dense export: an anchored model's weights in the original architecture's own state dict.

A converted model is only useful to someone who has this package; the dense form is loaded by
the original class (``torchvision.models.resnet18()``, a timm model) with ``strict=True``:

* each member's kernel written out: its slice of the anchor, or ``coeff @ bank`` for a filter
  bank or a low-rank pair, times its unfolded ``scale`` if it has one (folded scales already
  live in the BatchNorm after it);
* an adapter regulator (parallel 1x1 conv + BN) merged exactly into its host, in eval mode:
  its BN is an affine map, so the branch is a 1x1 kernel added to the host kernel's centre tap,
  and its constant goes into the host's bias or, without one, into the running mean of the
  BatchNorm after the host;
* a serial (paper-style) regulator cannot be written in the stock architecture (it adds a
  conv, a BN and a ReLU after the host): refused, with the reason.

The file is larger than the anchored one (every member holds its own kernel): it trades the
sharing for compatibility, as ONNX and TorchScript exports do not have to.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.convert import PLAN_ATTR
from ..core.layers import BANK_NAME, AnchoredConv2d, AnchoredLinear
from ..core.modes import mode
from ..defaults import DEFAULT_INPUT_SIZE
from ..errors import DacnnError, first_line
from .resize import resize_to_state
from .sources import with_module_versions


class DenseExportError(DacnnError):
    """The anchored model holds something the original architecture cannot express."""


@dataclass(frozen=True)
class DenseExport:
    """What a dense export wrote and how closely the stock model reproduces the anchored one."""

    path: Path
    bytes: int
    tensors: int
    max_abs_diff: float | None  # stock model vs anchored model, eval mode, on a random batch; None unchecked


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict the original architecture has, holding the anchored model's function.

    Equal outputs hold in eval mode (BatchNorm with running statistics), which is what a
    shipped model runs; the returned tensors are independent copies (no two share storage).

    Raises:
        DenseExportError: a serial regulator, or an adapter that cannot be merged (names the
            conv and why).
    """
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(f"{BANK_NAME}.")}
    plan = getattr(model, PLAN_ATTR, None)
    bn_after = {s.name: s.bn for s in plan.sites} if plan is not None else {}
    for name, m in model.named_modules():
        if isinstance(m, AnchoredLinear):  # back to a stock nn.Linear: the merged (out, in) weight
            for key in [k for k in state if k.startswith(f"{name}.coeff.")]:
                del state[key]
            state[f"{name}.weight"] = m.weight.detach().clone().contiguous()
            continue
        if not isinstance(m, AnchoredConv2d):
            continue
        prefix = f"{name}."
        for key in [
            k
            for k in state
            if k.startswith(prefix) and k[len(prefix) :].split(".")[0] in ("scale", "coeff", "regulator")
        ]:
            del state[key]
        with torch.no_grad():
            w = m.weight.detach().clone()
            if m.scale is not None:
                w = w * m.scale.detach().view(-1, 1, 1, 1)
            if m.regulator is not None:
                constant = _merge_adapter(name, m, w)
                _absorb_constant(state, name, m, bn_after.get(name), constant)
        state[f"{name}.weight"] = w.contiguous()
    return state


def _merge_adapter(name: str, m: AnchoredConv2d, w: torch.Tensor) -> torch.Tensor:
    """Add the adapter's eval-mode 1x1 kernel to ``w``'s centre tap (in place); return its constant term."""
    if m.regulator_style != "adapter":
        raise DenseExportError(
            f"{name} has a serial (paper-style) regulator: a 1x1 conv, BN and ReLU after the conv, which the "
            "original architecture has no place for; convert with regulator_style='adapter' or without regulators"
        )
    kh, kw = m.kernel_size
    ph, pw = m.padding if not isinstance(m.padding, str) else (kh // 2 * m.dilation[0], kw // 2 * m.dilation[1])
    dh, dw = m.dilation
    ch, cw = ph // dh, pw // dw
    if m.groups != 1 or ph % dh or pw % dw or not (0 <= ch < kh and 0 <= cw < kw):
        raise DenseExportError(
            f"{name}: its adapter regulator (a 1x1 conv) does not line up with one tap of the {kh}x{kw} kernel "
            f"(padding {m.padding}, dilation {m.dilation}, groups {m.groups}), so it cannot be merged into it"
        )
    assert m.regulator is not None  # the caller merges only a regulator that is there
    reg_conv, bn = m.regulator.conv, m.regulator.bn
    # a Regulator's BatchNorm2d tracks running statistics (track_running_stats=True)
    assert bn.running_mean is not None and bn.running_var is not None
    inv = (bn.running_var + bn.eps).rsqrt()
    gain = bn.weight.detach() * inv if bn.weight is not None else inv
    w[:, :, ch, cw] += gain.view(-1, 1) * reg_conv.weight.detach()[:, :, 0, 0]
    shift = bn.bias.detach() if bn.bias is not None else torch.zeros_like(gain)
    return shift - gain * bn.running_mean


def _absorb_constant(
    state: dict[str, torch.Tensor], name: str, m: AnchoredConv2d, bn: str | None, constant: torch.Tensor
) -> None:
    """Put a per-channel constant added to ``name``'s output into its bias, else its BatchNorm's mean."""
    if m.bias is not None:
        state[f"{name}.bias"] = state[f"{name}.bias"] + constant
    elif bn is not None and f"{bn}.running_mean" in state:
        state[f"{bn}.running_mean"] = state[f"{bn}.running_mean"] - constant  # BN(y + c) == BN'(y), mean m - c
    elif bool((constant != 0).any()):
        raise DenseExportError(
            f"{name}: its adapter regulator adds a constant per channel, and the conv has neither a bias nor a "
            "BatchNorm right after it to hold it"
        )


def check_dense(
    anchored: nn.Module, stock: nn.Module, state: Mapping[str, torch.Tensor], input_size: tuple[int, int, int]
) -> float:
    """Load ``state`` into ``stock`` with ``strict=True`` and return the largest output difference.

    Both run in eval mode on the same random batch of 2; their modes are restored.

    Raises:
        DenseExportError: ``stock`` is not the architecture ``state`` was made for.
    """
    plan = getattr(anchored, PLAN_ATTR, None)
    if plan is not None and plan.prune is not None:  # pruned before it was shared: a narrower stock network
        resize_to_state(stock, {k: v.shape for k, v in state.items()})
    try:
        stock.load_state_dict(with_module_versions(state, stock), strict=True)
    except RuntimeError as exc:
        first = first_line(exc, 240)
        raise DenseExportError(f"the dense weights do not load into {type(stock).__name__}: {first}") from exc
    with mode(anchored, stock), torch.no_grad():
        x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
        return float((anchored(x) - stock(x)).abs().max())


def export_dense(
    model: nn.Module,
    path: str | Path,
    stock: nn.Module | None = None,
    input_size: tuple[int, int, int] = DEFAULT_INPUT_SIZE,
    dtype: str = "fp32",
) -> DenseExport:
    """Write ``model``'s dense state dict (:func:`dense_state_dict`) as .safetensors, atomically.

    Args:
        model: the anchored model.
        path: the file to write.
        stock: a fresh instance of the original architecture (e.g. ``torchvision.models.resnet18()``):
            the weights are loaded into it with ``strict=True`` and its outputs compared with the
            anchored model's before anything is written; None skips the check.
        input_size: (C, H, W) of the example for the check.
        dtype: storage of floating tensors: ``fp32``, ``fp16`` or ``bf16``.

    Raises:
        DenseExportError: as :func:`dense_state_dict`, or ``stock`` does not take the weights.
        OutputError: the file cannot be written.
    """
    from safetensors.torch import save_file

    from ..atomic import atomic_write
    from .checkpoint import DTYPES

    state = dense_state_dict(model)
    diff = check_dense(model, stock, state, input_size) if stock is not None else None
    target = DTYPES[dtype]
    out = {k: (v.to(target) if v.is_floating_point() else v).contiguous().cpu() for k, v in state.items()}
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(out, str(tmp), metadata={"format": "pt", "dacnn": "dense"}))
    return DenseExport(path, path.stat().st_size, len(out), diff)
