"""Which modules count as a plain ``nn.Conv2d`` or ``nn.Linear``: the layers the converter describes, shares,
factorises, prunes and exports.

Exact types (as the converter always took them), and subclasses that compute the same function: those that override
nothing on the call path (forward, ``_conv_forward``, ``__call__``), carry no hooks or patched forward, and hold
nothing but ``weight`` and ``bias`` (marker classes such as torch's ``NonDynamicallyQuantizableLinear``), and a short
list of library classes read and found equal (timm's ``Linear``, which casts its weights to the input's dtype under
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
    assert isinstance(module, nn.Module)
    hooked = bool(module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module))
    named = EQUIVALENT.get(f"{t.__module__}.{t.__qualname__}")
    if named is not None:
        return None if hooked else named  # type: ignore[return-value]
    stock = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
    # the function is the stock one only if nothing on the call path differs: the class's forward, conv
    # helper and call machinery, the weight and bias attributes, the instance (a patched forward, hooks)
    names = ("forward", "_conv_forward", "__call__", "_call_impl", "weight", "bias")
    unchanged = all(getattr(t, a, None) is getattr(stock, a, None) for a in names)
    own = {n for n, _ in module.named_parameters(recurse=False)} | {n for n, _ in module.named_buffers(recurse=False)}
    if unchanged and not hooked and not list(module.children()) and own <= {"weight", "bias"}:
        return stock
    return None


def is_plain(module: object) -> bool:
    """True for a module :func:`plain_kind` accepts."""
    return plain_kind(module) is not None
