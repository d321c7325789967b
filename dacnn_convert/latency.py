"""Inference latency: median and 90th percentile over repeated runs after warm-up."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .distill.trainer import autocast, resolve_precision


@dataclass(frozen=True)
class LatencyRow:
    """One measurement: milliseconds per forward pass of a whole batch."""

    model: str
    batch: int
    precision: str
    device: str
    median_ms: float
    p90_ms: float
    repeats: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_latency(
    model: nn.Module,
    input_size: tuple[int, int, int],
    batch: int = 1,
    precision: str = "fp32",
    device: str = "cpu",
    repeats: int = 20,
    warmup: int = 3,
    label: str = "model",
) -> LatencyRow:
    """Time ``model`` (eval mode, no grad) on random inputs of ``(batch, *input_size)``.

    Raises:
        UsageError: fp16 on CPU, or an unknown precision.
    """
    dev = torch.device(device)
    precision = resolve_precision(precision, dev)
    model = model.to(dev).eval()
    x = torch.randn(batch, *input_size, device=dev)
    times = []
    with torch.no_grad(), autocast(precision, dev):
        for i in range(warmup + repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    times.sort()
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return LatencyRow(label, batch, precision, dev.type, statistics.median(times), p90, repeats)
