"""Compression methods compared at one parameter budget: anchoring and pruning baselines.

Every method is looked up by name in :data:`METHODS` and turns a trained teacher into a
:class:`Compressed` model that the benchmark fine-tunes the same way (KD from the teacher)::

    dacnn-mix, dacnn-mix-reg, dacnn-plain, sharesnet  fixed size, set by the conversion plan
    magnitude                                         global unstructured (Han et al. 2015)
    l1-filter, group-norm                             structured, through Torch-Pruning

Pruning methods take ``target_params`` (unique parameters after compression) and hit it
within 1%; anchoring methods have one size per plan and report it. With a MAC budget instead
(``Context.target_macs``), the structured methods hit that within 1%, the planner meets it exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from ..defaults import CALIB_BATCHES
from ..registry import Registry


@dataclass(frozen=True)
class Context:
    """What a method may use besides the teacher: input shape, calibration data, seed."""

    input_size: tuple[int, int, int]
    calib_loader: Iterable | None = None
    calib_batches: int = CALIB_BATCHES
    seed: int = 0
    source: Any = None
    # a compute budget, MACs per example (bench --budget-macs): with no parameter budget the pruning methods
    # hit it within 1%; the planner meets it (with the parameter budget, if one is given); magnitude cannot
    target_macs: int | None = None


@dataclass
class Compressed:
    """A compressed model ready for fine-tuning, and how to finish and store it.

    Attributes:
        model: the model to fine-tune (for ``magnitude`` it still carries its masks).
        params: unique parameters that count against the budget (non-zero ones for
            unstructured pruning).
        finalize: called after fine-tuning (e.g. makes masks permanent); returns the model.
        save: writes the artefact(s) to a folder and returns ``{format: bytes}``.
        notes: anything a reader of the benchmark must know about this method.
    """

    model: nn.Module
    params: int
    finalize: Callable[[nn.Module], nn.Module]
    save: Callable[[nn.Module, Path], dict[str, int]]
    notes: str = ""


class Method(Protocol):
    """A compression method: ``fixed_size`` ones ignore ``target_params``."""

    # read-only members: frozen dataclasses and plain classes both provide them
    @property
    def name(self) -> str: ...

    @property
    def fixed_size(self) -> bool: ...

    @property
    def description(self) -> str: ...

    def compress(self, teacher: nn.Module, target_params: int | None, ctx: Context) -> Compressed: ...


METHODS: Registry[Method] = Registry("method")


def register_method(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` under its name."""
    return METHODS.add(method.name, method)


def get_method(name: str) -> Method:
    """Look up a method; an unknown name lists the valid ones and the closest match."""
    return METHODS.get_or_raise(name)


from . import anchored, magnitude, structured  # noqa: E402,F401  (they register themselves)

__all__ = ["METHODS", "Compressed", "Context", "Method", "get_method", "register_method"]
