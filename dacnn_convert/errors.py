"""Typed errors. Each message says what went wrong, what was expected and how to fix it.

The CLI turns :class:`DacnnError` into one line and exit code 1; :class:`UsageError`
(a bad flag value) into exit code 2. Library callers catch them like any exception.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DacnnError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 1


class UsageError(DacnnError, ValueError):
    """A flag or argument has a value outside its allowed set."""

    exit_code = 2


class UnknownModelError(DacnnError, KeyError):
    """The model name is not in torchvision, timm or the DACNN builders."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class WeightsError(DacnnError):
    """Pretrained weights could not be fetched or a weights file does not fit the model."""


class TraceError(DacnnError):
    """torch.fx could not trace the model."""


class PlanError(DacnnError):
    """The conversion plan cannot be built or applied to this model."""


class CheckpointError(DacnnError):
    """A checkpoint file is missing, tampered with or does not match its plan."""


class DatasetError(DacnnError):
    """A dataset is missing or malformed."""


class OutputError(DacnnError):
    """An output file or folder cannot be written (not writable, disk full)."""


class RecipeError(UsageError):
    """A recipe file has unknown keys, wrong types or values out of range."""


class TrainingInterrupted(DacnnError):
    """Ctrl-C or SIGTERM during training: a checkpoint was saved; the message says how to resume."""

    exit_code = 130  # the shell's code for SIGINT

    def __init__(self, message: str, signum: int = 2) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them


def write_failed(path: object, exc: OSError) -> OutputError:
    """The error for a failed write, saying what was kept."""
    reason = exc.strerror or str(exc)
    return OutputError(
        f"could not write {str(path)!r} ({reason}); any previous file there is intact. "
        "Free some space or choose another --out"
    )


def suggest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ' Did you mean: a, b?' for the closest choices, or '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def choose(kind: str, value: str, choices: Iterable[str]) -> str:
    """Validate ``value`` against ``choices`` and return the plain string (never a str Enum member).

    Raises:
        UsageError: ``value`` is not one of ``choices``; the message lists them and the closest match.
    """
    options = list(choices)
    if value in options:
        return options[options.index(value)]
    raise UsageError(f"unknown {kind} {value!r}; expected one of: {', '.join(options)}.{suggest(value, options)}")
