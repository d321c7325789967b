"""Initialising an anchored kernel from the pretrained kernels of its group.

``fit`` solves  min  sum_l || W_l - diag(a_l) W_G[:co_l, :ci_l] ||^2  over the anchor W_G
and one scale per output channel and member (a_l). The per-channel scales are free
in the converted net because they fold exactly into the following BatchNorm (the
paper keeps every BN free, section 3, eq. 4): the layer then computes diag(a_l)(W_G * x).

For members of one shape this is, per output channel, the best rank-1 approximation
of the (members x kernel) matrix — the fixed point of alternating least squares —
so we take it in closed form from the top eigenvector of its Gram matrix. Members
of different shapes (``plain`` mode slices) are fitted by alternating least squares.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

FITS: dict[str, Callable[[list[torch.Tensor], tuple[int, ...]], Fit]] = {}


@dataclass
class Fit:
    """An anchor, the per-member output-channel scales (None means all ones), and fit errors."""

    anchor: torch.Tensor
    scales: list[torch.Tensor | None]
    errors: list[float]  # ||W_l - a_l W_G|| / ||W_l|| per member


def register_fit(name: str) -> Callable:
    """Decorator: register an initialisation under ``name``."""

    def wrap(fn: Callable) -> Callable:
        FITS[name] = fn
        return fn

    return wrap


def _slice(anchor: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return anchor[: w.shape[0], : w.shape[1]]


def _errors(weights: list[torch.Tensor], anchor: torch.Tensor, scales: list[torch.Tensor | None]) -> list[float]:
    out = []
    for w, a in zip(weights, scales, strict=True):
        approx = _slice(anchor, w) * (a.view(-1, 1, 1, 1) if a is not None else 1.0)
        norm = w.norm().item()
        out.append((w - approx).norm().item() / norm if norm > 0 else 0.0)
    return out


def _masked_mean(weights: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    total = torch.zeros(shape)
    count = torch.zeros(shape)
    for w in weights:
        total[: w.shape[0], : w.shape[1]] += w
        count[: w.shape[0], : w.shape[1]] += 1
    return total / count.clamp_min(1)


@register_fit("mean")
def fit_mean(weights: list[torch.Tensor], shape: tuple[int, ...]) -> Fit:
    """Element-wise mean of the members (over the members that cover each element)."""
    anchor = _masked_mean(weights, shape)
    scales: list[torch.Tensor | None] = [None] * len(weights)
    return Fit(anchor, scales, _errors(weights, anchor, scales))


@register_fit("first")
def fit_first(weights: list[torch.Tensor], shape: tuple[int, ...]) -> Fit:
    """The first member's kernel; elements it does not cover take the members' mean."""
    anchor = _masked_mean(weights, shape)
    anchor[: weights[0].shape[0], : weights[0].shape[1]] = weights[0]
    scales: list[torch.Tensor | None] = [None] * len(weights)
    return Fit(anchor, scales, _errors(weights, anchor, scales))


@register_fit("random")
def fit_random(weights: list[torch.Tensor], shape: tuple[int, ...]) -> Fit:
    """nn.Conv2d's default initialisation for the anchor's shape; pretrained weights are ignored."""
    anchor = torch.empty(shape)
    torch.nn.init.kaiming_uniform_(anchor, a=math.sqrt(5))
    scales: list[torch.Tensor | None] = [None] * len(weights)
    return Fit(anchor, scales, _errors(weights, anchor, scales))


@register_fit("fit")
def fit_scaled(weights: list[torch.Tensor], shape: tuple[int, ...], iters: int = 50, tol: float = 1e-6) -> Fit:
    """Least-squares anchor with per-output-channel scales (see module docstring)."""
    if all(tuple(w.shape) == tuple(shape) for w in weights):
        anchor, scales = _rank1(weights)
    else:
        anchor, scales = _als(weights, shape, iters, tol)
    return Fit(anchor, list(scales), _errors(weights, anchor, list(scales)))


def _rank1(weights: list[torch.Tensor], chunk: int = 64) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per output channel, the top singular pair of the stacked members (exact optimum).

    Output channels are solved in chunks so temporaries stay a fraction of the group's size.
    """
    co = weights[0].shape[0]
    anchor = torch.empty(weights[0].shape, dtype=torch.float32)
    scales = torch.empty(co, len(weights), dtype=torch.float64)
    flat_anchor = anchor.view(co, -1)
    for lo in range(0, co, chunk):
        hi = min(lo + chunk, co)
        m = torch.stack([w[lo:hi].reshape(hi - lo, -1).float() for w in weights], dim=1)  # (c, L, K)
        gram = (m @ m.transpose(1, 2)).double()  # (c, L, L): small, so solve it in double
        _, vecs = torch.linalg.eigh(gram)
        a = vecs[..., -1]  # (c, L) unit-norm top eigenvector; w = a^T m is the matching row
        # Choose the split between a and W_G so the mean scale of each channel is 1.
        s = a.mean(dim=1)
        fallback = a.gather(1, a.abs().argmax(dim=1, keepdim=True)).squeeze(1)
        s = torch.where(s.abs() > 1e-6 * a.abs().amax(dim=1).clamp_min(1e-30), s, fallback)
        s = torch.where(s == 0, torch.ones_like(s), s)
        flat_anchor[lo:hi] = torch.einsum("cl,clk->ck", (a * s[:, None]).float(), m)
        scales[lo:hi] = a / s[:, None]
    dtype = weights[0].dtype
    return anchor.to(dtype), [scales[:, i].to(dtype).contiguous() for i in range(len(weights))]


def _als(weights: list[torch.Tensor], shape: tuple[int, ...], iters: int, tol: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Alternating least squares when members cover different leading slices of the anchor."""
    # Start from the largest member: a mean of members with opposite-sign channels can
    # be near zero, a poor start for this non-convex problem.
    anchor = _masked_mean(weights, shape)
    largest = max(weights, key=lambda w: w.numel())
    anchor[: largest.shape[0], : largest.shape[1]] = largest
    scales = [torch.ones(w.shape[0]) for w in weights]
    for _ in range(iters):
        for i, w in enumerate(weights):  # a-step: per-channel projection on the anchor slice
            g = _slice(anchor, w)
            den = g.pow(2).sum(dim=(1, 2, 3))
            scales[i] = torch.where(den > 0, (w * g).sum(dim=(1, 2, 3)) / den.clamp_min(1e-30), torch.ones_like(den))
        num = torch.zeros(shape)
        den = torch.zeros(shape)
        for w, a in zip(weights, scales, strict=True):  # W-step: weighted mean of the members
            a4 = a.view(-1, 1, 1, 1)
            num[: w.shape[0], : w.shape[1]] += a4 * w
            den[: w.shape[0], : w.shape[1]] += a4 * a4
        new = torch.where(den > 0, num / den.clamp_min(1e-30), anchor)
        change = (new - anchor).norm() / anchor.norm().clamp_min(1e-30)
        anchor = new
        if change < tol:
            break
    # Normalise: mean scale 1 per anchor output channel over the members that use it.
    total = torch.zeros(shape[0])
    count = torch.zeros(shape[0])
    for a in scales:
        total[: a.shape[0]] += a
        count[: a.shape[0]] += 1
    s = total / count.clamp_min(1)
    s = torch.where(s.abs() > 1e-12, s, torch.ones_like(s))
    anchor = anchor * s.view(-1, 1, 1, 1)
    return anchor, [a / s[: a.shape[0]] for a in scales]
