"""Running a changed copy of a model from where it first differs, on batches seen before.

The planner scores hundreds of candidate conversions, each converting one section of the model and
running the calibration batches through the whole copy (twice: to recalibrate its BatchNorms, then
to measure). The part of the network that feeds the converted section is the original's in every
candidate, so its activations are the same each time. :class:`PrefixCache` traces the model once
(torch.fx), finds in each candidate the layers that differ from the original and every node that
depends on them, and runs only those, reading what flows into them from a cache filled once per
frontier by a *reference* copy of the original (its BatchNorms recalibrated on the same batches,
exactly as each candidate's prefix would be).

Train-mode values (what a BatchNorm recalibration pass sees: batch statistics, dropout on) and
eval-mode values are cached separately, so recalibrating a candidate's BatchNorms and measuring it
give the same numbers as running the whole copy. Inputs that are not the cached batches run the
whole copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from .graph import trace
from .modes import mode

CACHE_BYTES = 2 * 2**30  # frontier activations kept at once (both modes, every batch)


class PrefixCache:
    """Activations of ``reference`` at the inputs of any changed part of ``original``, per batch and mode.

    Args:
        original: the model candidates are converted from (what "unchanged" is compared with).
        reference: the same network as it runs inside every candidate before the changed part (the
            original with its BatchNorms recalibrated on ``batches``); left in eval mode.
        batches: the input batches candidates are run on (matched by storage, as the same tensors).
        leaf_modules: module types fx must not trace into (as for the plan).

    Raises:
        TraceError: the model cannot be traced (the caller then runs candidates whole).
    """

    def __init__(
        self,
        original: nn.Module,
        reference: nn.Module,
        batches: Sequence[torch.Tensor],
        leaf_modules: Sequence[type[nn.Module]] = (),
    ) -> None:
        self.graph = trace(reference, leaf_modules).graph
        self.reference = reference.eval()
        self.original = dict(original.named_modules())
        self.batches = list(batches)
        self.values: dict[str, tuple[list[Any], list[Any]]] = {}  # node -> (train values, eval values) per batch
        self.nodes = list(self.graph.nodes)
        self.runs = 0  # reference passes made to fill the cache (each: every batch, both modes)

    def partial(self, student: nn.Module) -> nn.Module:
        """``student`` (a changed copy of the original, same module names) as a module that runs only the
        nodes that depend on a changed layer; ``student`` itself where nothing or everything changed."""
        modules = dict(student.named_modules())
        changed = [
            n
            for n in self.nodes
            if (n.op == "call_module" and self._differs(str(n.target), modules))
            or (n.op == "get_attr" and self._attr_differs(str(n.target), student))
        ]
        if not changed:
            return student
        later = set(changed)
        for n in self.nodes:  # topological order: a node depends on a change if any input does
            if n not in later and any(a in later for a in n.all_input_nodes):
                later.add(n)
        if not any(n.op == "output" for n in later):
            return student
        frontier = [n for n in self.nodes if n not in later and n.op != "placeholder" and _feeds(n, later)]
        if not frontier:
            return student  # the changed part reads the input itself: nothing to skip
        self._fill(frontier)
        skip = [n for n in self.nodes if n not in later and n.op != "placeholder" and n not in frontier]
        return _Partial(student, self.graph, skip, frontier, self)

    def index(self, x: torch.Tensor) -> int | None:
        """Which cached batch ``x`` is (the same storage and shape), or None."""
        for i, b in enumerate(self.batches):
            if x.data_ptr() == b.data_ptr() and x.shape == b.shape and x.dtype == b.dtype:
                return i
        return None

    def _differs(self, target: str, modules: dict[str, nn.Module]) -> bool:
        mine, theirs = modules.get(target), self.original.get(target)
        if mine is None or theirs is None or type(mine) is not type(theirs) or repr(mine) != repr(theirs):
            return True
        a, b = mine.state_dict(), theirs.state_dict()
        if a.keys() != b.keys():
            return True
        return any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in a)

    def _attr_differs(self, target: str, student: nn.Module) -> bool:
        owner, _, name = target.rpartition(".")
        try:
            mine = getattr(student.get_submodule(owner), name)
            theirs = getattr(self.original[owner], name)
        except (AttributeError, KeyError):
            return True
        if not isinstance(mine, torch.Tensor) or not isinstance(theirs, torch.Tensor):
            return mine is not theirs
        return mine.shape != theirs.shape or not torch.equal(mine, theirs)

    def _fill(self, frontier: list[fx.Node]) -> None:
        missing = [n for n in frontier if n.name not in self.values]
        if not missing:
            return
        if self._bytes() > CACHE_BYTES:  # another section's frontier: drop what this one does not read
            keep = {n.name for n in frontier}
            self.values = {k: v for k, v in self.values.items() if k in keep}
        wanted = set(missing)
        needed = _ancestors(wanted)
        skip = {n: None for n in self.nodes if n not in needed and n.op != "placeholder"}
        found: dict[str, tuple[list[Any], list[Any]]] = {n.name: ([], []) for n in missing}
        bns = [m for m in self.reference.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [(m, m.momentum, _clone(m.num_batches_tracked)) for m in bns]
        try:
            for train in (True, False):
                for m in bns:  # batch statistics in train mode, the running ones left as they are
                    m.momentum = 0.0
                with mode(self.reference, train=train), torch.no_grad():
                    for x in self.batches:
                        rec = _Recorder(self.reference, self.graph, wanted)
                        rec.run(x, initial_env=dict(skip))
                        for name, v in rec.found.items():
                            found[name][0 if train else 1].append(v)
        finally:
            for m, momentum, tracked in saved:
                m.momentum = momentum
                if tracked is not None and m.num_batches_tracked is not None:
                    m.num_batches_tracked.copy_(tracked)
        self.values.update(found)
        self.runs += 1

    def _bytes(self) -> int:
        return sum(_size(v) for train, ev in self.values.values() for v in (*train, *ev))


class _Recorder(fx.Interpreter):
    def __init__(self, module: nn.Module, graph: fx.Graph, wanted: set[fx.Node]) -> None:
        super().__init__(module, graph=graph)
        self.wanted = wanted
        self.found: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        v = super().run_node(n)
        if n in self.wanted:
            self.found[n.name] = v
        return v


class _Partial(nn.Module):
    """The student, running from its first changed layer on the cached batches (whole on any other input)."""

    def __init__(
        self, student: nn.Module, graph: fx.Graph, skip: list[fx.Node], frontier: list[fx.Node], cache: PrefixCache
    ) -> None:
        super().__init__()
        self.student = student
        self.graph = graph
        self.skip = skip
        self.frontier = frontier
        self.cache = cache

    def forward(self, x: torch.Tensor) -> Any:
        i = self.cache.index(x)
        if i is None:
            return self.student(x)
        which = 0 if self.training else 1
        env: dict[fx.Node, Any] = dict.fromkeys(self.skip)
        env.update({n: self.cache.values[n.name][which][i] for n in self.frontier})
        return fx.Interpreter(self.student, graph=self.graph).run(x, initial_env=env)


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()


def _feeds(n: fx.Node, later: set[fx.Node]) -> bool:
    return any(u in later for u in n.users)


def _ancestors(nodes: set[fx.Node]) -> set[fx.Node]:
    seen = set(nodes)
    todo = list(nodes)
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def _size(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, list | tuple):
        return sum(_size(x) for x in v)
    return 0
