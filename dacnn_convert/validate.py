"""Argument checks at the public API: a wrong type or value is one typed error that names the fix.

Every public function checks its arguments here before any work (issue 23): a string where a
size belongs, an int where an input size belongs, a loader that yields dicts, ``None`` for a
model. Errors are :class:`~dacnn_convert.errors.UsageError` with the setting named in the
library's own terms («setting»: ``target_params=`` in Python, ``--target-params`` on the CLI).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UsageError


def module(name: str, value: Any) -> nn.Module:
    """``value`` must be an ``nn.Module`` (the model, the teacher, the student)."""
    if not isinstance(value, nn.Module):
        raise UsageError(f"«{name}» must be a torch.nn.Module, got {type(value).__name__}")
    return value


def output_folder(name: str, value: Any) -> Path | None:
    """A folder to write into: None, a str or a path; not an existing file.

    Raises:
        UsageError: another type, or a path that is an existing file.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | os.PathLike):
        raise UsageError(f"«{name}» must be a folder path (str or pathlib.Path), got {type(value).__name__}")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise UsageError(f"«{name}» {str(path)!r} is a file; give a folder for the run's files")
    return path


def leaf_modules(value: Any) -> tuple[type[nn.Module], ...]:
    """Module classes fx must not trace into: a sequence of ``nn.Module`` subclasses (not names, not instances).

    Raises:
        UsageError: anything else, naming the item and what to give instead.
    """
    if isinstance(value, str | type) or not isinstance(value, Sequence | set | frozenset):
        raise UsageError(f"«leaf-module» is a list of nn.Module classes, e.g. [MyBlock], got {value!r:.80}")
    for item in value:
        if not (isinstance(item, type) and issubclass(item, nn.Module)):
            hint = " (import the class and pass it, not its name)" if isinstance(item, str) else ""
            raise UsageError(f"«leaf-module» {item!r:.80} is not an nn.Module class{hint}")
    return tuple(value)


def integer(name: str, value: Any, minimum: int = 0) -> int:
    """A true integer (not a bool, not a string) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"«{name}» must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise UsageError(f"«{name}» must be >= {minimum}, got {value}")
    return value


def flag(name: str, value: Any) -> bool:
    """A true bool (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise UsageError(f"«{name}» must be True or False, got {value!r} ({type(value).__name__})")
    return value


def optional_size(name: str, value: Any) -> int | None:
    """A count of parameters or bytes: a finite number >= 1 (a float such as ``0.5 * n`` is floored)."""
    if value is None:
        return None
    return int(number(name, value, 1.0, open_low=False))


def number(name: str, value: Any, low: float = 0.0, open_low: bool = True) -> float:
    """A finite real number above ``low`` (or at least ``low`` with ``open_low=False``)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UsageError(f"«{name}» must be a finite number, got {value!r} ({type(value).__name__})")
    if value < low or (open_low and value == low):
        raise UsageError(f"«{name}» must be {'>' if open_low else '>='} {low:g}, got {value}")
    return float(value)


def optional_number(name: str, value: Any, low: float = 0.0) -> float | None:
    return None if value is None else number(name, value, low)


def prune_ratio(value: Any) -> float | str | None:
    """A channel pruning ratio in (0, 1) (a string such as ``"0.25"`` from a command line is read), ``"auto"``
    or None; 0 is None (no pruning)."""
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise UsageError(f"«prune» is a fraction of channels in [0, 1) or auto, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not 0 <= value < 1:
        raise UsageError(f"«prune» is a fraction of channels in [0, 1) or auto, got {value!r}")
    return None if value == 0 else float(value)


def share_groups(value: Any) -> tuple[str, ...]:
    """Named share groups: a text (groups separated by ``;``), or a sequence of texts, one group each (module
    names or shell patterns separated by commas); None or empty: none."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(";")
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"«share» takes groups of layer names, e.g. 'a.fc1,b.fc1;c.*.fc2', got {value!r}")
    groups = tuple(",".join(p.strip() for p in v.split(",") if p.strip()) for v in value)
    if any(not g for g in groups) and len(groups) > 1:
        raise UsageError(f"«share» has an empty group in {value!r}: write 'a,b;c,d'")
    return tuple(g for g in groups if g)


def input_size(value: Any) -> tuple[int, int, int]:
    """(C, H, W) of one example: three positive integers."""
    ok = (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    )
    if not ok:
        hint = f" (for {value}x{value} images: ({3}, {value}, {value}))" if isinstance(value, int) else ""
        raise UsageError(f"«input-size» is (C, H, W) of one example, e.g. (3, 32, 32); got {value!r}{hint}")
    return (int(value[0]), int(value[1]), int(value[2]))


def regulators(value: Any) -> str | Sequence[int] | None:
    """``none``/``all``/``"1,3"``, a sequence of 1-based section numbers, or a single section number."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    raise UsageError(f"«regulators» takes none, all, '1,3' or section numbers like [1, 3]; got {value!r}")


def bank_size(value: Any) -> Any:
    """A bank size: a number, a string (``"1:0.5,2:0.25"``), a mapping of int sections, or None."""
    if isinstance(value, Mapping):
        bad = [k for k in value if isinstance(k, bool) or not isinstance(k, int)]
        if bad:
            raise UsageError(
                f"«bank-size» maps 1-based section numbers (integers) to sizes; got key {bad[0]!r}: "
                "write {1: 0.5}, not {'1': 0.5}"
            )
    elif value is not None and (isinstance(value, bool) or not isinstance(value, int | float | str)):
        raise UsageError(f"«bank-size» takes 0.25, 64, '1:1.0,2:0.5' or {{1: 0.5}}; got {value!r}")
    return value


def inputs_of(batch: Any) -> torch.Tensor:
    """The input tensor of one batch: a tensor, or the first item of an (inputs, labels, ...) tuple/list.

    Raises:
        UsageError: anything else (a dict, a string, a tuple whose first item is no tensor).
    """
    x = batch[0] if isinstance(batch, list | tuple) and batch else batch
    if not isinstance(x, torch.Tensor):
        what = f"dict with keys {sorted(map(str, batch))[:5]}" if isinstance(batch, Mapping) else type(batch).__name__
        raise UsageError(
            f"a batch must be an image tensor or an (images, labels) pair, got a {what}; wrap your loader in an "
            "object whose __iter__ yields (b['image'], b['label']) for each batch b"
        )
    if not x.is_floating_point():
        raise UsageError(
            f"the images are {str(x.dtype).removeprefix('torch.')} tensors: a model takes floating-point images, "
            "e.g. x.float() / 255 normalised as in training"
        )
    if x.device.type == "cpu" and not bool(torch.isfinite(x).all()):
        raise UsageError("the images hold NaN or infinite values: a fit or an accuracy on them means nothing")
    return x


def labelled(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of one batch; extra items (sample weights, paths) are ignored.

    Raises:
        UsageError: not a tuple/list of at least two tensors.
    """
    x = inputs_of(batch)
    if not isinstance(batch, list | tuple) or len(batch) < 2 or not isinstance(batch[1], torch.Tensor):
        raise UsageError(
            "a training or evaluation batch must be (images, labels) with labels a tensor of class indices; "
            f"got {type(batch).__name__}" + (f" of {len(batch)} item(s)" if isinstance(batch, list | tuple) else "")
        )
    y = batch[1]
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() != 1 or len(y) != len(x):
        hint = "; one-hot labels? give y.argmax(1)" if y.dim() == 2 else ""
        raise UsageError(
            f"labels must be class indices, an integer tensor of shape ({len(x)},) for {len(x)} images; got "
            f"{str(y.dtype).removeprefix('torch.')} of shape {tuple(y.shape)}{hint}"
        )
    return x, y


def class_indices(labels: torch.Tensor, classes: int) -> None:
    """Labels that the model's ``classes`` outputs can score: from 0 to classes - 1.

    Raises:
        UsageError: a label outside that range (cross-entropy would fail on it, an accuracy would
            silently count it wrong).
    """
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise UsageError(
            f"a label is {low if low < 0 else high}, but the model has {classes} outputs (classes 0 to {classes - 1}): "
            "give «num-classes» for the data's classes, or data whose labels the model predicts"
        )


def loader(name: str, value: Any) -> Iterable:
    """A re-iterable source of batches (a DataLoader, a list); not None, not a tensor or a string."""
    if value is None or isinstance(value, str | bytes | torch.Tensor) or not isinstance(value, Iterable):
        raise UsageError(
            f"«{name}» must be an iterable of batches such as a torch.utils.data.DataLoader, got {type(value).__name__}"
        )
    if isinstance(value, Iterator):  # a generator: the second pass (BN, fine-tune epochs) would find nothing
        raise UsageError(
            f"«{name}» is a one-shot iterator ({type(value).__name__}): fitting, BN calibration and every epoch "
            "each read the data again; give a DataLoader, a list, or an object whose __iter__ starts over"
        )
    return value
