"""Ctrl-C and SIGTERM as a flag the loop checks between steps (only when a run asks for it)."""

from __future__ import annotations

import signal
import threading
from typing import Any


class Interrupts:
    """The first Ctrl-C or SIGTERM (what schedulers and ``kill`` send) becomes a flag the loop
    checks between steps; a second one aborts at once. The caller's handlers come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.requested = False
        self.signum = 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        if self.enabled and threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
