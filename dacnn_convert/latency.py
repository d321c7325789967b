"""Inference latency: median and 90th percentile over repeated runs after warm-up."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .core.modes import mode
from .errors import UsageError
from .train.precision import autocast, resolve_precision

MAX_BATCH = 4096  # the largest batch timed: larger ones only fill memory (issue 23: 100,000 hung)


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


def compare_latency(
    models: dict[str, nn.Module],
    input_size: tuple[int, int, int],
    batch: int = 1,
    precision: str = "fp32",
    device: str = "cpu",
    repeats: int = 20,
    warmup: int = 3,
) -> list[LatencyRow]:
    """Time several models on the same input, interleaved run by run (the order rotating each round).

    Interleaving makes the models share whatever else the machine is doing, so their ratio is
    meaningful on a busy or throttling machine where back-to-back timings drift by 10%.
    ``device`` is ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; every model goes back to its own
    device and train/eval mode afterwards.
    """
    from .train.device import device_of, resolve_device

    if batch > MAX_BATCH:
        raise UsageError(
            f"latency at «batch» {batch:,} would allocate {batch:,} inputs at once; at most {MAX_BATCH:,} "
            "(throughput beyond that scales linearly: time a smaller batch)"
        )
    if batch < 1 or repeats < 1 or warmup < 0:
        raise UsageError(
            f"latency needs «batch» >= 1 and «repeats» >= 1 (got batch {batch}, repeats {repeats}, warmup {warmup})"
        )
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev)
    was = {name: device_of(m) for name, m in models.items()}
    try:
        with mode(*models.values()):
            return _time(models, input_size, batch, precision, dev, repeats, warmup)
    finally:
        for name, m in models.items():
            m.to(was[name])


def _time(
    models: dict[str, nn.Module],
    input_size: tuple[int, int, int],
    batch: int,
    precision: str,
    dev: torch.device,
    repeats: int,
    warmup: int,
) -> list[LatencyRow]:
    nets = {name: m.to(dev) for name, m in models.items()}
    x = torch.randn(batch, *input_size, device=dev)
    times: dict[str, list[float]] = {name: [] for name in nets}
    names = list(nets)
    with torch.no_grad(), autocast(precision, dev):
        for i in range(warmup + repeats):
            order = names[i % len(names) :] + names[: i % len(names)]
            for name in order:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                start = time.perf_counter()
                nets[name](x)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                if i >= warmup:
                    times[name].append((time.perf_counter() - start) * 1000)
    return [_row(name, t, batch, precision, dev.type) for name, t in times.items()]


def _row(name: str, times: list[float], batch: int, precision: str, device: str) -> LatencyRow:
    times = sorted(times)
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return LatencyRow(name, batch, precision, device, statistics.median(times), p90, len(times))


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
    return compare_latency({label: model}, input_size, batch, precision, device, repeats, warmup)[0]
