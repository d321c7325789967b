"""What every committed benchmark result records: command, machine, versions, date."""

from __future__ import annotations

import platform
from datetime import date
from pathlib import Path

import torch


def machine() -> str:
    """CPU model, threads and versions, in one line."""
    cpuinfo = Path("/proc/cpuinfo")
    cpu = platform.machine()
    if cpuinfo.is_file():
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")), cpu
        )
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (
        f"{cpu}, {torch.get_num_threads()} threads{gpu}; torch {torch.__version__}; "
        f"python {platform.python_version()}; {date.today()}"
    )
