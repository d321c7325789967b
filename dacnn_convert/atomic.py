"""Atomic file writes: a reader never sees half a file, and a crash never leaves one behind.

Every file the toolkit writes (checkpoints, resumable state, exports, unpacked datasets) goes
through :func:`atomic_write`: written to a temporary name beside the target, flushed to disk,
renamed over the target, and the folder entry flushed too.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

from .errors import write_failed


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file, then move it to ``path`` in one step.

    The temporary file is created with mode 0666 masked by the process umask, so the result
    has the permissions any other file written by the user would have (not mkstemp's 0600).
    Data and rename are fsynced: after a power cut the target is the old file or the new one.

    Raises:
        OutputError: the folder cannot be created or written (names the path and the reason).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # umask applies here
        mode = tmp.stat().st_mode & 0o777
        write(tmp)
        os.chmod(tmp, mode)  # writers that replace the file (safetensors) create it 0600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise write_failed(path, exc) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _fsync_dir(folder: Path) -> None:
    """Flush the folder entry of a rename (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: readers see the old file or the whole new one."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
