"""Checks a command makes before it runs: the output folder is writable and fresh, inputs fit the model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import OutputError, UsageError, write_failed

if TYPE_CHECKING:
    from .common import DataOptions


def check_writable(out: Path) -> None:
    """Create ``out`` and write a probe file there, so a bad --out fails before any work.

    Raises:
        OutputError: the folder cannot be created or written.
    """
    import tempfile

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write to {str(out)!r} ({exc.strerror or exc}); choose another --out") from exc


# What a run leaves in its --out folder: finding one of these there means a run lives there.
RUN_FILES = (
    "best.safetensors",
    "last.safetensors",
    "state.pt",
    "metrics.csv",
    "history.json",
    "model.safetensors",
    "report.json",
    "report.md",
    "bench.json",
    "bench.md",
)


def check_fresh_output(out: Path, resume: bool = False, overwrite: bool = False, inputs: tuple[Any, ...] = ()) -> None:
    """Refuse to write over a finished run or over this command's own inputs unless asked.

    ``--resume`` continues the run there; ``--overwrite`` replaces it (its files are removed
    first, so nothing of the old run is mixed into the new one, e.g. appended metrics).

    Raises:
        UsageError: ``out`` holds a run and neither flag was given, or an input file would be
            overwritten (never allowed: choose another --out).
    """
    for given in inputs:
        path = Path(given) if isinstance(given, str | Path) else None
        if path is not None and path.is_file() and path.parent.resolve() == out.resolve() and path.name in RUN_FILES:
            raise UsageError(f"--out {out} would overwrite this command's own input {path}; choose another --out")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise UsageError(
            f"{out} already holds a run ({', '.join(found)}); continue it with --resume, or replace it with --overwrite"
        )
    for name in found:
        (out / name).unlink()


@contextlib.contextmanager
def output_guard(out: Path | None, data: DataOptions | None = None, inputs: tuple[Any, ...] = ()) -> Iterator[None]:
    """Check ``out`` is writable and holds no other run; if the command then fails, remove ``out`` if it created it.

    Nothing half-written is left behind, except a resumable ``state.pt`` (training progress
    is never thrown away). An OSError while writing becomes a one-line :class:`OutputError`.
    With ``data``, its ``resume``/``overwrite`` decide what happens to a run already in ``out``
    (:func:`check_fresh_output`); ``inputs`` are files the command reads.
    """
    import shutil

    existed = out is None or out.exists()
    try:
        if out is not None:
            check_fresh_output(out, data.resume if data else False, data.overwrite if data else False, inputs)
            check_writable(out)
        yield
    except BaseException as exc:
        if out is not None and not existed and out.is_dir() and not (out / "state.pt").is_file():
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(exc, OSError):
            raise write_failed(getattr(exc, "filename", None) or out, exc) from exc
        raise


def check_input_size(model: Any, size: tuple[int, int, int]) -> int:
    """Run one zero example of ``size`` through ``model`` so that a wrong --input-size is one line
    here, not a traceback from deep inside an exporter or a timing loop; returns the output width."""
    import torch

    from ..core.modes import mode
    from ..train.device import device_of

    try:
        with mode(model), torch.no_grad():
            return int(model(torch.zeros(1, *size, device=device_of(model))).shape[-1])
    except (RuntimeError, ValueError, IndexError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UsageError(
            f"the model fails on an input of size {tuple(size)}: {first}; is --input-size right?"
        ) from None
