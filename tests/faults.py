"""Faults for tests: a run that crashes between two checkpoints."""

from __future__ import annotations


class Killed(Exception):
    """What a crash looks like to the files on disk: the run stops between two checkpoints."""


def kill_after(steps: int):
    """An on_step callback that crashes the run after ``steps`` steps in total."""

    def on_step(row: dict[str, float]) -> None:
        if (row["epoch"] - 1) * row["steps"] + row["step"] >= steps:
            raise Killed

    return on_step
