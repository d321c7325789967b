"""Numeric precision of a run: fp32, bf16 or fp16 autocast, and whether this CPU has bf16 units."""

from __future__ import annotations

import contextlib

import torch

from ..errors import UsageError, choose
from .config import PRECISIONS


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the hardware runs it fast (CUDA, CPUs with bf16 units), else fp32.

    Raises:
        UsageError: fp16 requested on a CPU.
    """
    precision = choose("precision", precision, PRECISIONS)
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("«precision=fp16» needs a CUDA device; on CPU use «precision=bf16» or «precision=fp32»")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16_units() else "fp32"


def cpu_has_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Does this CPU compute in bf16 natively (AVX512-BF16 or AMX-BF16)?

    oneDNN reports bf16 as supported on any AVX-512 CPU, where it emulates it: measured on an
    AVX-512 Xeon without bf16 units, a ResNet-18 training step under bf16 autocast took 1.6x
    as long as in fp32 (and ~50x on an AVX2-only EPYC). Only native units make bf16 pay.
    """
    from pathlib import Path

    try:
        flags = Path(cpuinfo).read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
