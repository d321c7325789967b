"""Filter visualisation by gradient ascent on the input (paper section 4.3, Figure 7).

Start from random noise and optimise the image so that one filter of one layer responds as
strongly as possible (mean activation), with a small L2 penalty keeping the image bounded —
the "network fooling" technique the paper cites. Works on any model, anchored or not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core.modes import mode
from .errors import UsageError, suggest


@dataclass
class FilterImages:
    """``images[layer]`` is a (filters, C, H, W) tensor in [0, 1]; ``activation`` the final responses."""

    images: dict[str, torch.Tensor]
    activation: dict[str, list[float]]

    def save_grid(self, path: str | Path) -> Path:
        """One row per layer, one column per filter, as a PNG."""
        from .core.report import figure, save_figure

        rows, cols = len(self.images), max(len(v) for v in self.images.values())
        fig, axes = figure(rows, cols, size=(1.4 * cols, 1.5 * rows), grid=True)
        for r, (layer, imgs) in enumerate(self.images.items()):
            for c in range(cols):
                ax = axes[r][c]
                ax.axis("off")
                if c < len(imgs):
                    img = imgs[c].permute(1, 2, 0).squeeze(-1).numpy()
                    ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
                    ax.set_title(f"{layer}[{c}]" if c == 0 else f"[{c}]", fontsize=6)
        return save_figure(fig, path)


def visualize_filters(
    model: nn.Module,
    layers: Sequence[str],
    filters: int | Sequence[int] = 5,
    input_size: tuple[int, int, int] = (3, 32, 32),
    steps: int = 100,
    lr: float = 0.05,
    l2: float = 1e-3,
    seed: int = 0,
) -> FilterImages:
    """Optimise one input image per (layer, filter) to maximise that filter's mean response.

    Args:
        model: any model; run in eval mode, its modes and ``requires_grad`` flags come back as they were.
        layers: qualified module names (``sections.0.1.0`` or ``layer1.0.conv2``).
        filters: the first N output channels, or explicit channel indices.
        input_size: (C, H, W) of the optimised image.
        steps, lr: Adam steps and learning rate on the image.
        l2: weight of the image's L2 penalty.
        seed: seed of the starting noise.

    Raises:
        UsageError: no layer given; a layer name is not a module of the model, or its output is no
            feature map (a Linear, a module the forward pass never calls); a filter index is out of range.
    """
    modules = dict(model.named_modules())
    for name in layers:
        if name not in modules:
            raise UsageError(f"no layer {name!r} in the model.{suggest(name, modules)} Layers are module names")
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    try:
        with mode(model):
            channels = _feature_maps(model, modules, input_size)
            _check_layers(layers, channels, modules)
            images, activation = _optimise(model, modules, layers, channels, filters, input_size, steps, lr, l2, seed)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return FilterImages(images, activation)


def _feature_maps(model: nn.Module, modules: dict[str, nn.Module], input_size: tuple[int, int, int]) -> dict[str, Any]:
    """Each module whose output is a feature map (N, C, H, W) -> its channel count; every other module
    the forward pass calls -> what it outputs, in words; from one forward pass of a zero image."""
    found: dict[str, Any] = {}

    def record(name: str, out: object) -> None:
        if isinstance(out, torch.Tensor):
            found[name] = out.shape[1] if out.dim() == 4 else f"shape {tuple(out.shape)}"
        else:
            found[name] = f"a {type(out).__name__}"

    hooks = [m.register_forward_hook(lambda m, i, o, n=n: record(n, o)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    finally:
        for h in hooks:
            h.remove()
    return found


def _check_layers(layers: Sequence[str], channels: dict[str, Any], modules: dict[str, nn.Module]) -> None:
    """Refuse an empty list, or a layer with no feature map, naming the layers that can be visualised."""
    maps = [n for n, c in channels.items() if n and isinstance(c, int)]
    convs = [n for n in maps if "Conv" in type(modules[n]).__name__]  # nn.Conv2d, AnchoredConv2d...
    shown = (convs or maps)[:6]
    can = (
        f"layers that can be visualised: {', '.join(shown)}{', ...' if len(maps) > len(shown) else ''} "
        f"({len(maps)} modules output a feature map (N, C, H, W))"
    )
    if not layers:
        raise UsageError(f"«layers» names no layer; {can}")
    for name in layers:
        if name not in channels:
            raise UsageError(f"layer {name!r} is not called by the forward pass (a bank of weights, or unused); {can}")
        if not isinstance(channels[name], int):
            raise UsageError(f"layer {name!r} outputs {channels[name]}, not a feature map (N, C, H, W); {can}")


def _optimise(
    model: nn.Module,
    modules: dict[str, nn.Module],
    layers: Sequence[str],
    maps: dict[str, int],
    filters: int | Sequence[int],
    input_size: tuple[int, int, int],
    steps: int,
    lr: float,
    l2: float,
    seed: int,
) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    images: dict[str, torch.Tensor] = {}
    activation: dict[str, list[float]] = {}
    for name in layers:
        captured: list[torch.Tensor] = []
        hook = modules[name].register_forward_hook(lambda m, i, o, into=captured: into.append(o))
        try:
            channels = maps[name]
            chosen = list(range(min(filters, channels))) if isinstance(filters, int) else list(filters)
            if any(not 0 <= f < channels for f in chosen):
                raise UsageError(f"{name} has {channels} filters; got indices {chosen}")
            g = torch.Generator().manual_seed(seed)
            x = (0.1 * torch.randn(len(chosen), *input_size, generator=g)).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr)
            index = torch.tensor(chosen)
            for _ in range(steps):
                captured.clear()
                opt.zero_grad()
                model(x)
                out = captured[-1]
                response = out[torch.arange(len(chosen)), index].mean(dim=(1, 2))
                (-(response.sum()) + l2 * x.square().sum()).backward()
                opt.step()
        finally:
            hook.remove()
        img = x.detach()
        lo = img.amin(dim=(1, 2, 3), keepdim=True)
        hi = img.amax(dim=(1, 2, 3), keepdim=True)
        images[name] = (img - lo) / (hi - lo).clamp_min(1e-8)
        activation[name] = [float(v) for v in response.detach()]
    return images, activation
