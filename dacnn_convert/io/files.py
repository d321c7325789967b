"""What is wrong with a path the tool was asked to read, said precisely (not always "does not exist")."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def _mode(path: Path, what: str) -> tuple[int, str | None]:
    """``path``'s file mode, or why it cannot be had (missing, unreadable)."""
    try:
        return path.stat().st_mode, None
    except FileNotFoundError:
        return 0, f"{what} {str(path)!r} does not exist"
    except OSError as exc:
        return 0, f"cannot read {what} {str(path)!r} ({exc.strerror or exc})"


def unreadable(path: Path, what: str) -> str | None:
    """Why ``path`` cannot be read as ``what`` (e.g. "checkpoint"), or None when it is a readable file.

    A directory, a FIFO or a device is named as such: reading a FIFO would block forever, and a
    directory given where a file is expected usually means the file inside it was meant.
    """
    mode, why = _mode(path, what)
    if why is not None:
        return why
    if stat.S_ISDIR(mode):
        inside = sorted(p.name for p in path.glob("*.safetensors"))[:3]
        hint = f" (it holds {', '.join(inside)}: give one of them)" if inside else ""
        return f"{what} {str(path)!r} is a directory, not a file{hint}"
    if not stat.S_ISREG(mode):
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a file"
        )
        return f"{what} {str(path)!r} is {kind}, not a regular file"
    if not os.access(path, os.R_OK):
        return f"cannot read {what} {str(path)!r} (permission denied)"
    return None


def not_a_folder(path: Path, what: str) -> str | None:
    """Why ``path`` cannot be searched as ``what`` (e.g. "results folder"), or None when it is a folder.

    Searching a missing folder finds nothing, which would read as "there is nothing there".
    """
    mode, why = _mode(path, what)
    if why is not None:
        return why
    if not stat.S_ISDIR(mode):
        return f"{what} {str(path)!r} is {'a file' if stat.S_ISREG(mode) else 'a FIFO or device'}, not a folder"
    return None


def is_safetensors(path: Path) -> bool:
    """Whether the regular file ``path`` holds safetensors data, whatever its name: an 8-byte
    little-endian header length, then a JSON header of that many bytes starting with ``{``."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            return False  # reading a FIFO would block
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size
