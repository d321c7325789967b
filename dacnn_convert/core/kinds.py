"""Which modules count as a plain ``nn.Conv2d`` or ``nn.Linear``: the layers the converter describes, shares,
factorises, prunes and exports.

Exact types, and subclasses that compute the same function: those that override no forward and hold nothing but
``weight`` and ``bias`` (marker classes such as torch's ``NonDynamicallyQuantizableLinear``), and a short list of
library classes read and found equal (timm's ``Linear``, which casts its weights to the input's dtype under
TorchScript only). Subclasses that change the function (timm's ``Conv2dSame`` pads at run time, ``StdConv2d``
standardises its weights, parametrised layers) are not plain: matching by ``isinstance`` would convert them wrong.
"""

from __future__ import annotations

from torch import nn

# Qualified class name -> the stock class it equals (forward read: same output, same parameters).
EQUIVALENT: dict[str, type[nn.Module]] = {
    "timm.layers.linear.Linear": nn.Linear,
}

_STOCK: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


def plain_kind(module: object) -> type[nn.Conv2d] | type[nn.Linear] | None:
    """``nn.Conv2d`` or ``nn.Linear`` when ``module`` computes exactly what that stock layer computes, else None."""
    t = type(module)
    if t is nn.Conv2d or t is nn.Linear:
        return t
    if not isinstance(module, _STOCK):
        return None
    named = EQUIVALENT.get(f"{t.__module__}.{t.__qualname__}")
    if named is not None:
        return named  # type: ignore[return-value]
    stock = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
    assert isinstance(module, nn.Module)
    unchanged = all(
        getattr(t, attr) is getattr(stock, attr) for attr in ("forward", "_conv_forward") if hasattr(stock, attr)
    )
    own = {n for n, _ in module.named_parameters(recurse=False)} | {n for n, _ in module.named_buffers(recurse=False)}
    if unchanged and not list(module.children()) and own <= {"weight", "bias"}:
        return stock
    return None


def is_plain(module: object) -> bool:
    """True for a module :func:`plain_kind` accepts."""
    return plain_kind(module) is not None
