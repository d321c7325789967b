"""Typed errors. Each message says what went wrong, what was expected and how to fix it.

The CLI turns :class:`DacnnError` into one line and exit code 1; :class:`UsageError`
(a bad flag value) into exit code 2. Library callers catch them like any exception.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

# A setting named in a message is written «name» (the CLI flag's name): str(error) shows how a
# Python caller sets it (``budget=``), the CLI how a command does (``--budget``).
PYTHON_SPELLING = {
    "dataset": "calib_loader=",
    "leaf-module": "leaf_modules=",
    "dry-run": "plan()",
    "overwrite": "resume=False",
    "resume": "resume=True",
    "download": "download=True",
}
_SETTING = re.compile(r"«([a-z][a-z0-9-]*)(?:=([^»]+))?»")


def _python(match: re.Match[str]) -> str:
    name, value = match[1], match[2]
    if value is None:
        return PYTHON_SPELLING.get(name, name.replace("-", "_") + "=")
    literal = value if re.fullmatch(r"[0-9.eE+-]+|True|False|None", value) else repr(value)
    return f"{name.replace('-', '_')}={literal}"


def render(message: str, cli: bool) -> str:
    """``message`` with each «setting» (or «setting=value») spelled for the CLI (``--name value``)
    or for Python (``name=value``)."""
    if cli:
        return _SETTING.sub(lambda m: f"--{m[1]}" + (f" {m[2]}" if m[2] is not None else ""), message)
    return _SETTING.sub(_python, message)


class DacnnError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 1

    def __str__(self) -> str:
        return render(super().__str__(), cli=False)

    def cli_message(self) -> str:
        """The message with settings named as command-line flags (what the CLI prints)."""
        return render(super().__str__(), cli=True)


def marked(exc: BaseException) -> str:
    """The message of ``exc`` with its «settings» still marked, to wrap it in another DacnnError."""
    return str(exc.args[0]) if isinstance(exc, DacnnError) and exc.args else str(exc)


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-blank line of ``exc``'s message (at most ``limit`` characters), or its type's
    name when the message is empty: a library's bare ``raise ValueError()`` still says something."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__


class UsageError(DacnnError, ValueError):
    """A flag or argument has a value outside its allowed set."""

    exit_code = 2


class UnknownModelError(DacnnError, KeyError):
    """The model name is not in torchvision, timm or the DACNN builders."""

    def __str__(self) -> str:  # KeyError would quote the message
        return render(str(self.args[0]), cli=False)

    def cli_message(self) -> str:
        return render(str(self.args[0]), cli=True)


class WeightsError(DacnnError):
    """Pretrained weights could not be fetched or a weights file does not fit the model."""


class TraceError(DacnnError):
    """torch.fx could not trace the model."""


class PlanError(DacnnError):
    """The conversion plan cannot be built or applied to this model."""


class TargetError(PlanError, UsageError):
    """No plan meets the size or compute target asked for: bad input (exit 2), the message names the
    nearest reachable point. A :class:`PlanError` for code that catches those."""

    exit_code = 2

    def __init__(self, message: str, nearest: int | None = None) -> None:
        super().__init__(message)
        self.nearest = nearest  # the nearest reachable value of the target's unit (params or MACs), if known


class CheckpointError(DacnnError):
    """A checkpoint file is missing, tampered with or does not match its plan."""


class DatasetError(DacnnError):
    """A dataset is missing or malformed."""


class OutputError(DacnnError):
    """An output file or folder cannot be written (not writable, disk full)."""


class NonFiniteOutputError(DacnnError):
    """A model's outputs are NaN or infinite: no accuracy or difference computed from them is reported."""


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
        "Free some space or choose another «out»"
    )


def deprecated(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that the 0.1.0 spelling ``old`` goes in the next release, and what to write instead."""
    import warnings

    warnings.warn(f"{old} is deprecated and goes in the next release: {new}", DeprecationWarning, stacklevel=stacklevel)


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
    if not isinstance(value, str):
        raise UsageError(f"{kind} must be one of: {', '.join(options)} (a string), got {value!r}")
    if value in options:
        return options[options.index(value)]
    raise UsageError(f"unknown {kind} {value!r}; expected one of: {', '.join(options)}.{suggest(value, options)}")
