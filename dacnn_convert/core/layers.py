"""Anchored convolution, the bank that owns anchored kernels, and regulators (paper section 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .banks import merged_is_cheaper

BANK_NAME = "dacnn_anchors"


class AnchorBank(nn.Module):
    """Owns every anchored kernel exactly once, so each is one tensor in ``state_dict()``.

    It is attached to the converted model's root as ``dacnn_anchors``; anchored convs
    read their kernel from it at every forward, so ``.to()``, DDP and optimisers see
    one parameter per anchor and its gradient is the sum over its uses.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={tuple(p.shape)}" for n, p in self.named_parameters())


class Regulator(nn.Module):
    """A regulator: 1x1 conv + BN (+ ReLU), all weights free (paper section 3, Figure 3 right).

    ``adapter=True`` builds the parallel form used for conversions: its BN weight starts
    at zero so it adds exactly nothing at step 0, and it has no ReLU of its own — the
    derivative of ReLU at 0 is 0, which would keep a zero-initialised branch at zero
    forever; the host's BN + ReLU follow the sum instead.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: tuple[int, int] = (1, 1), adapter: bool = False
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act: nn.Module = nn.Identity() if adapter else nn.ReLU(inplace=True)
        # set by a conversion that fitted this adapter (regulator_init="fit"): its BN is the identity
        # and the next BN recalibration keeps it so (train.calibrate.recalibrate_bn)
        self.identity_pending = False
        if adapter:
            nn.init.zeros_(self.bn.weight)

    def set_fitted(self, kernel: torch.Tensor) -> None:
        """Make this adapter compute ``kernel`` * x exactly: the 1x1 conv holds it, the BN is the identity.

        In eval mode BN(z) = z with running statistics (0, 1 - eps), weight 1 and bias 0. BN
        recalibration then measures z's statistics and sets weight = sqrt(var + eps), bias = mean,
        so the BN stays the identity in eval mode and close to it in train mode (batch statistics).
        """
        with torch.no_grad():
            self.conv.weight.copy_(kernel.to(self.conv.weight))
            self.bn.reset_running_stats()
            self.bn.running_var.fill_(1 - self.bn.eps)  # type: ignore[union-attr]
            self.bn.weight.fill_(1.0)
            self.bn.bias.zero_()
        self.identity_pending = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def _merged(module: AnchoredConv2d | AnchoredLinear, full: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """``module.weight`` (coefficients x bank), cached on the module until either tensor changes.

    Keyed on both tensors' storage and version counters, dtype and device, and always merged
    outside autocast in the parameters' own dtype: a kernel merged under bf16 autocast and
    reused in fp32 crashed every bank model on bf16 hardware (issue 23). Autocast still casts
    the merged kernel per call, as it does any layer's weight. Never in ``state_dict`` or on disk.
    """
    key = (full.data_ptr(), full._version, coeff.data_ptr(), coeff._version, full.dtype, full.device)
    cached = module.__dict__.get("_dense")
    if cached is None or cached[0] != key:
        with torch.autocast(full.device.type, enabled=False):
            merged = module.weight.to(full.dtype).contiguous()
        module.__dict__["_dense"] = cached = (key, merged)
    return cached[1]


def _inference() -> bool:
    """No autograd and no tracing, scripting, export or compilation: caches may be used."""
    return not (torch.is_grad_enabled() or torch.jit.is_scripting() or _exporting())


def _exporting() -> bool:
    """True inside torch.jit tracing, ONNX export or torch.compile, where no cache may be used."""
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or compiling()


class AnchoredConv2d(nn.Module):
    """A conv whose kernel is (the leading slice of) an anchor held by an :class:`AnchorBank`.

    Computes ``conv(x, W_G[:c_out, :c_in]) * scale + bias`` — ``scale`` only exists when a
    ``fit`` initialisation could not be folded into a following BatchNorm — then the
    regulator: added in parallel (``adapter``) or applied in series (``paper``).
    With ``coefficients=k`` the anchor is a filter bank B (k x C_in x kh x kw) and the conv
    computes ``coeff(conv(x, B))`` with its own 1x1 ``coeff`` (C_out x k): the paper's anchor
    and serial regulator, linear (:mod:`dacnn_convert.core.banks`). In eval mode without autograd
    it applies the merged kernel ``coeff @ B`` instead when that costs fewer MACs; that kernel
    is cached per member (C_out x C_in x kh x kw in memory, never in ``state_dict`` or on disk),
    so banks with k near C_out trade RAM for speed at inference. Saved files stay small.
    It keeps nn.Conv2d's attribute names so code that reads them keeps working.
    """

    def __init__(
        self,
        bank: AnchorBank,
        anchor: str,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        scale: bool = False,
        regulator: Regulator | None = None,
        regulator_style: str = "adapter",
        coefficients: int | None = None,
    ) -> None:
        super().__init__()
        # A plain attribute, not a submodule: the bank is registered once, at the root.
        object.__setattr__(self, "_bank", bank)
        self.anchor = anchor
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.groups, self.padding_mode = dilation, groups, padding_mode
        # F.pad's order (left, right, top, bottom); only used with a non-zeros padding_mode, never with 'same'
        self._reversed_padding: list[int] = (
            [p for p in reversed(padding) for _ in range(2)] if not isinstance(padding, str) else []
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.scale = nn.Parameter(torch.ones(out_channels)) if scale else None
        self.regulator = regulator
        self.regulator_style = regulator_style
        self.coeff = nn.Conv2d(coefficients, out_channels, 1, bias=False) if coefficients is not None else None

    @property
    def weight(self) -> torch.Tensor:
        """The kernel this conv applies: a view of the shared anchor, or ``coeff @ bank`` for a bank."""
        full = getattr(self._bank, self.anchor)
        if self.coeff is not None:
            return torch.einsum("ok,kchw->ochw", self.coeff.weight[:, :, 0, 0], full)
        return full[: self.out_channels, : self.in_channels // self.groups]

    @property
    def merged_is_cheaper(self) -> bool:
        """For a bank: one conv with ``coeff @ B`` costs fewer MACs than the bank conv then the 1x1."""
        if self.coeff is None:
            return False
        d = (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]
        return merged_is_cheaper(self.out_channels, d, self.coeff.in_channels)

    def _inference_kernel(self) -> torch.Tensor:
        """The kernel, made contiguous once per anchor version when that saves a copy per call.

        Plain-mode slices ``W[:c_out, :c_in]`` are strided views; the conv backend copies them
        to a dense layout on every call (measured: up to +11% latency on ResNet-18, batch 1).
        In eval mode without autograd the copy is kept until the anchor changes (its version
        counter moves on every in-place update). Never while training, tracing or exporting:
        exported graphs must read the one shared initialiser, not a private copy.
        """
        if self.training or torch.is_grad_enabled() or _exporting():
            return self.weight
        full = getattr(self._bank, self.anchor)
        key = (full.data_ptr(), full._version, full.dtype, full.device)
        cached = self.__dict__.get("_dense")
        if cached is not None and cached[0] == key:  # the common case: one lookup, no slicing
            return cached[1]
        w = full[: self.out_channels, : self.in_channels // self.groups]
        if w.is_contiguous():
            return w
        self.__dict__["_dense"] = (key, w.contiguous())  # a plain attribute: never in state_dict or on disk
        return self.__dict__["_dense"][1]

    def _bank_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``coeff(conv(x, B))``, or one conv with the merged kernel (cached) at inference when cheaper."""
        full = getattr(self._bank, self.anchor)
        coeff = self.coeff
        assert coeff is not None, "only banked convs (with coefficients) take this path"
        if not self.training and _inference() and self.merged_is_cheaper:
            return self._conv(x, _merged(self, full, coeff.weight))
        return coeff(self._conv(x, full))

    def _conv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            return F.conv2d(
                F.pad(x, self._reversed_padding, mode=self.padding_mode),
                w,
                None,
                self.stride,
                0,
                self.dilation,
                self.groups,
            )
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.coeff is not None:
            y = self._bank_forward(x)
        else:
            y = self._conv(x, self.weight if torch.jit.is_scripting() else self._inference_kernel())
        if self.scale is not None:
            y = y * self.scale.view(1, -1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        if self.regulator is None:
            return y
        if self.regulator_style == "adapter":
            return y + self.regulator(x)
        return self.regulator(y)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"anchor={self.anchor!r}" + (f", bank={self.coeff.in_channels}" if self.coeff is not None else "")
        )


class AnchoredLinear(nn.Module):
    """An ``nn.Linear`` whose weight is ``coeff @ B``: B (k x in_features) is a bank held by an
    :class:`AnchorBank` and shared by the same-shape Linears of a stage (Basis Sharing), ``coeff``
    its own ``nn.Linear(k, out_features)``; one member is a low-rank factorisation.

    The bank is stored as (k, in_features, 1, 1), the shape of a 1x1 conv bank, so plans, fits and
    exports treat Linears as the 1x1 convs they are over their positions. Computes
    ``coeff(x B^T) + bias`` on inputs of any leading shape, or in eval mode without autograd the
    merged (cached) weight when that costs fewer MACs. Keeps nn.Linear's attribute names.
    """

    def __init__(
        self, bank: AnchorBank, anchor: str, in_features: int, out_features: int, rank: int, bias: bool
    ) -> None:
        super().__init__()
        object.__setattr__(self, "_bank", bank)  # registered once, at the root
        self.anchor = anchor
        self.in_features, self.out_features = in_features, out_features
        self.coeff = nn.Linear(rank, out_features, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @property
    def basis(self) -> torch.Tensor:
        """The shared bank as a (k, in_features) matrix (a view)."""
        return getattr(self._bank, self.anchor).flatten(1)

    @property
    def weight(self) -> torch.Tensor:
        """The (out_features, in_features) matrix this layer applies: ``coeff @ B``."""
        return self.coeff.weight @ self.basis

    @property
    def merged_is_cheaper(self) -> bool:
        return merged_is_cheaper(self.out_features, self.in_features, self.coeff.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = getattr(self._bank, self.anchor)
        if not self.training and _inference() and self.merged_is_cheaper:
            return F.linear(x, _merged(self, full, self.coeff.weight), self.bias)
        return F.linear(F.linear(x, full.flatten(1)), self.coeff.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, anchor={self.anchor!r}, "
            f"bank={self.coeff.in_features}"
        )
