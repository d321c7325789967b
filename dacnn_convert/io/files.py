"""What is wrong with a path the tool was asked to read, said precisely (not always "does not exist")."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def unreadable(path: Path, what: str) -> str | None:
    """Why ``path`` cannot be read as ``what`` (e.g. "checkpoint"), or None when it is a readable file.

    A directory, a FIFO or a device is named as such: reading a FIFO would block forever, and a
    directory given where a file is expected usually means the file inside it was meant.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return f"{what} {str(path)!r} does not exist"
    except OSError as exc:
        return f"cannot read {what} {str(path)!r} ({exc.strerror or exc})"
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
