"""Checks a command makes before it runs: the output folder is writable and fresh, inputs fit the model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DacnnError, OutputError, UsageError, first_line, write_failed

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
# Also written into a run's folder (model card, resolved recipe, tables, plots, result): a command
# never writes over one of these unless --overwrite is given (`--out .` held the user's README.md).
ALSO_WRITTEN = ("README.md", "recipe.yaml", "result.json", "bench.csv", "bench.png", "tb")
LOCK = ".dacnn.lock"  # held by the run writing into a folder: a second run there is refused


def check_fresh_output(
    out: Path, resume: bool = False, overwrite: bool = False, inputs: tuple[Any, ...] = ()
) -> Path | None:
    """Refuse to write over a finished run, a file the run would replace, or this command's own inputs.

    ``--resume`` continues the run there; ``--overwrite`` replaces it: its files are moved aside
    first, into the folder returned (nothing of the old run is mixed into the new one, e.g.
    appended metrics), and :func:`output_guard` puts them back if the new run fails, or removes
    them once it has succeeded: a run that fails never costs the one it was to replace.

    Raises:
        UsageError: ``out`` holds a run or a file the run writes and neither flag was given, or
            an input file would be overwritten (never allowed, not even with --overwrite).
    """
    if resume and overwrite:
        raise UsageError(f"--resume continues the run in {out} and --overwrite replaces it: give one of them")
    for given in inputs:
        path = Path(given) if isinstance(given, str | Path) else None
        if path is not None and path.is_file() and path.parent.resolve() == out.resolve():
            if path.name in RUN_FILES or path.name in ALSO_WRITTEN:
                raise UsageError(f"--out {out} would overwrite this command's own input {path}; choose another --out")
    found = [name for name in RUN_FILES if (out / name).exists()]
    others = [name for name in ALSO_WRITTEN if (out / name).exists()]
    if resume or (not found and not others):
        return None
    if not overwrite:
        what = f"already holds a run ({', '.join(found)})" if found else f"already holds {', '.join(others)}"
        hint = "continue it with --resume, or replace it with --overwrite" if found else "replace with --overwrite"
        raise UsageError(f"{out} {what}, which this command would write over; {hint} (or choose another --out)")
    import uuid

    aside = out / f".dacnn-replaced-{uuid.uuid4().hex[:8]}"
    aside.mkdir()
    for name in [*found, *others]:
        (out / name).rename(aside / name)
    return aside


def _restore(out: Path, aside: Path) -> None:
    """Put the files a failed --overwrite run moved aside back in place of what it wrote."""
    import shutil

    for old in aside.iterdir():
        new = out / old.name
        if new.is_dir() and not new.is_symlink():
            shutil.rmtree(new, ignore_errors=True)
        elif new.exists() or new.is_symlink():
            new.unlink()
        old.rename(new)
    aside.rmdir()


def check_output_file(out: Path, inputs: tuple[Any, ...] = (), overwrite: bool = False) -> None:
    """A single-file output (an export, a plot) may not replace an input, and replaces nothing else unasked.

    Raises:
        UsageError: ``out`` is a folder; ``out`` is one of the command's inputs (never allowed, not
            even with --overwrite); ``out`` exists and --overwrite was not given.
    """
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give the file to write, e.g. {out / 'model.onnx'}")
    for given in inputs:
        path = Path(given) if isinstance(given, str | Path) else None
        if path is not None and path.exists() and out.exists() and out.resolve() == path.resolve():
            raise UsageError(f"--out {out} is this command's own input; choose another file")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; replace it with --overwrite, or choose another --out")


def _rank() -> int:
    """This process's rank in a torchrun job (0 outside one)."""
    from ..train.distributed import launch_rank

    return launch_rank()


def _pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def folder_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.dacnn.lock`` while a run writes there; a second run into the same folder is refused.

    The lock is written whole to a temporary file and linked into place (no reader sees it
    half-written), names its process, host and a token, and is removed on exit only if it is
    still ours. A lock whose process is gone (a killed run, on this host) is taken over; an
    unreadable or other-host lock counts as held.

    Raises:
        UsageError: another run holds the folder (its process id and command are named).
    """
    import os
    import socket
    import sys
    import uuid

    lock = out / LOCK
    token = uuid.uuid4().hex
    host = socket.gethostname()
    tmp = out / f".dacnn.lock.{token}"
    tmp.write_text(f"{os.getpid()} {host} {token} {' '.join(sys.argv)[:300]}")
    try:
        for _ in range(3):
            try:
                os.link(tmp, lock)
                break
            except FileExistsError:
                held = lock.read_text(errors="replace").split(" ", 3) if lock.is_file() else []
                pid = int(held[0]) if held and held[0].isdigit() else 0
                stale = len(held) >= 3 and held[1] == host and pid and not _pid_alive(pid)
                if not stale:
                    who = f"process {pid}: {held[3] if len(held) > 3 else '?'}" if pid else "a run starting"
                    raise UsageError(
                        f"{out} is being written by another run ({who}); wait for it, or choose another --out "
                        f"(if no run is there, remove {lock})"
                    ) from None
                lock.unlink(missing_ok=True)  # stale: its process is gone
        else:
            raise UsageError(f"could not take the lock {lock}: other runs keep starting there; choose another --out")
    finally:
        tmp.unlink(missing_ok=True)
    try:
        yield
    finally:
        try:
            if token in lock.read_text(errors="replace"):
                lock.unlink()
        except OSError:
            pass


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
    locked = False  # only a run that holds the lock may clean up: a refused one leaves the other run's folder be
    aside: Path | None = None  # the replaced run's files, kept until this one succeeds
    try:
        if out is None:
            yield
        else:
            lead = _rank() == 0  # read first: a broken torchrun environment is refused before the folder exists
            check_writable(out)
            # under torchrun every rank runs this command into one folder: rank 0 holds the lock for the job
            with folder_lock(out) if lead else contextlib.nullcontext():
                locked = True
                if lead:
                    aside = check_fresh_output(
                        out, data.resume if data else False, data.overwrite if data else False, inputs
                    )
                yield
                if aside is not None:
                    shutil.rmtree(aside, ignore_errors=True)
    except BaseException as exc:
        if aside is not None and aside.is_dir():
            _restore(out, aside)  # type: ignore[arg-type]
        elif locked and out is not None and not existed and out.is_dir() and not (out / "state.pt").is_file():
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _os_error(exc, out) from exc
        raise


def _os_error(exc: OSError, out: Path | None) -> DacnnError:
    """An OSError as one line, blamed on what it was about: a write into ``out`` (disk full, not
    writable), or a file read elsewhere (a dataset, an image), where freeing space is no advice."""
    name = getattr(exc, "filename", None)
    where = Path(name) if isinstance(name, str | Path) else None
    inside = where is not None and out is not None and (where == out or out in where.parents)
    if inside:
        return write_failed(where, exc)
    text = str(exc)
    if "DataLoader worker" in first_line(exc):  # the worker's own error is the last line of its traceback
        text = next((line for line in reversed(text.splitlines()) if line.strip()), text)
    what = f" {str(where)!r}" if where is not None else ""
    return DacnnError(f"could not read{what}: {exc.strerror or first_line(ValueError(text), 240)}")


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
        first = first_line(exc, 200)
        raise UsageError(
            f"the model fails on an input of size {tuple(size)}: {first}; is --input-size right?"
        ) from None
