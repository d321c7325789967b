"""Running a changed copy of a model from where it first differs, on batches seen before.

The planner scores hundreds of candidate conversions, each converting one section of the model and
running the calibration batches through the whole copy (twice: to recalibrate its BatchNorms, then
to measure). The part of the network that feeds the converted section is the original's in every
candidate, so its activations are the same each time. :class:`PrefixCache` traces the model once
per mode (torch.fx), finds in each candidate the layers that differ from the original and every node
that depends on them, and runs only those, reading what flows into them from a cache filled once per
frontier by a *reference* copy of the original (its BatchNorms recalibrated on the same batches,
exactly as each candidate's prefix would be).

Train-mode values (what a BatchNorm recalibration pass sees: batch statistics) and eval-mode values
are cached separately, each from a graph traced in that mode (stochastic depth and functional dropout
branch on ``self.training`` at trace time), so recalibrating a candidate's BatchNorms and measuring it
give the numbers running the whole copy gives — except that a random op in the unchanged part (dropout
in train mode) draws its mask once for every candidate instead of once each. Inputs other than the
cached batches, and frontiers larger than the cache may hold, run the whole copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from ..defaults import PREFIX_CACHE_BYTES
from .graph import trace
from .modes import mode

_ALWAYS_RUN = ("placeholder", "get_attr")  # the input, and parameters read by name: free to run, never cached


class PrefixCache:
    """Activations of ``reference`` at the inputs of any changed part of ``original``, per batch and mode.

    Args:
        original: the model candidates are converted from (what "unchanged" is compared with).
        reference: the same network as it runs inside every candidate before the changed part (the
            original with its BatchNorms recalibrated on ``batches``); left in eval mode, its buffers as given.
        batches: the input batches candidates are run on (the same tensor objects).
        leaf_modules: module types fx must not trace into (as for the plan).
        max_bytes: activations held at once, both modes and every batch; a frontier larger than this is not
            cached (those candidates run whole).

    Raises:
        TraceError: the model cannot be traced (the caller then runs candidates whole).
    """

    def __init__(
        self,
        original: nn.Module,
        reference: nn.Module,
        batches: Sequence[torch.Tensor],
        leaf_modules: Sequence[type[nn.Module]] = (),
        max_bytes: int = PREFIX_CACHE_BYTES,
    ) -> None:
        self.graphs: dict[bool, fx.Graph] = {}
        for train in (True, False):  # code that branches on self.training is fixed at trace time
            with mode(reference, train=train):
                self.graphs[train] = trace(reference, leaf_modules).graph
        self.reference = reference.eval()
        self.original = dict(original.named_modules())
        self.batches = list(batches)
        self.max_bytes = max_bytes
        self.values: dict[tuple[bool, str], list[Any]] = {}  # (train mode, node) -> value per batch
        self.too_big: set[tuple[bool, frozenset[str]]] = set()
        self.runs = 0  # reference passes made to fill the cache (each: every batch, one mode)

    def partial(self, student: nn.Module) -> nn.Module:
        """``student`` (a changed copy of the original, same module names) as a module that runs only the
        nodes that depend on a changed layer; ``student`` itself where nothing can be skipped."""
        modules = dict(student.named_modules())
        plans = {}
        for train, graph in self.graphs.items():
            found = self._split(graph, student, modules)
            if found is None:
                return student
            later, frontier = found
            key = (train, frozenset(n.name for n in frontier))
            if key in self.too_big or not self._fill(train, graph, frontier):
                self.too_big.add(key)
                return student
            skip = [n for n in graph.nodes if n not in later and n.op not in _ALWAYS_RUN and n not in frontier]
            plans[train] = (skip, frontier)
        return _Partial(student, self.graphs, plans, self)

    def release(self) -> None:
        """Drop the cached activations (they are made again on demand)."""
        self.values = {}

    def index(self, x: torch.Tensor) -> int | None:
        """Which cached batch ``x`` is (the same tensor object), or None."""
        return next((i for i, b in enumerate(self.batches) if x is b), None)

    def _split(
        self, graph: fx.Graph, student: nn.Module, modules: dict[str, nn.Module]
    ) -> tuple[set[fx.Node], list[fx.Node]] | None:
        """The nodes that depend on a changed layer, and the unchanged ones they read; None: nothing to skip."""
        nodes = list(graph.nodes)
        later = {
            n
            for n in nodes
            if (n.op == "call_module" and self._differs(str(n.target), modules))
            or (n.op == "get_attr" and self._attr_differs(str(n.target), student))
        }
        if not later:
            return None
        for n in nodes:  # topological order: a node depends on a change if any input does
            if n not in later and any(a in later for a in n.all_input_nodes):
                later.add(n)
        if not any(n.op == "output" for n in later):
            return None
        frontier = [n for n in nodes if n not in later and n.op not in _ALWAYS_RUN and any(u in later for u in n.users)]
        return (later, frontier) if frontier else None  # none: the changed part reads the input itself

    def _differs(self, target: str, modules: dict[str, nn.Module]) -> bool:
        mine, theirs = modules.get(target), self.original.get(target)
        if mine is None or theirs is None or type(mine) is not type(theirs) or repr(mine) != repr(theirs):
            return True
        a, b = dict(mine.named_buffers()) | mine.state_dict(), dict(theirs.named_buffers()) | theirs.state_dict()
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

    def _fill(self, train: bool, graph: fx.Graph, frontier: list[fx.Node]) -> bool:
        """Cache the frontier's values in one mode; False where they would pass ``max_bytes``."""
        missing = [n for n in frontier if (train, n.name) not in self.values]
        if not missing:
            return True
        keep = {(t, n) for t in (True, False) for n in (f.name for f in frontier)}
        wanted = set(missing)
        needed = _ancestors(wanted)
        skip = {n: None for n in graph.nodes if n not in needed and n.op not in _ALWAYS_RUN}
        found: dict[str, list[Any]] = {n.name: [] for n in missing}
        buffers = {k: v.clone() for k, v in self.reference.named_buffers()}  # running stats move in train mode
        try:
            with mode(self.reference, train=train), torch.no_grad():
                for i, x in enumerate(self.batches):
                    rec = _Recorder(self.reference, graph, wanted)
                    rec.run(x, initial_env=dict(skip))
                    for name, v in rec.found.items():
                        found[name].append(v)
                    if i == 0:  # the first batch tells the size of all (both modes)
                        need = 2 * len(self.batches) * sum(_size(v) for v in rec.found.values())
                        if need > self.max_bytes:
                            return False
                        if self._bytes() + need > self.max_bytes:  # another frontier's values go first
                            self.values = {k: v for k, v in self.values.items() if k in keep}
        finally:
            with torch.no_grad():
                for k, v in self.reference.named_buffers():
                    v.copy_(buffers[k])
        self.values.update({(train, name): v for name, v in found.items()})
        self.runs += 1
        return True

    def _bytes(self) -> int:
        return sum(_size(v) for vs in self.values.values() for v in vs)


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps a copy of the wanted nodes' values (later in-place ops of the run cannot reach it)."""

    def __init__(self, module: nn.Module, graph: fx.Graph, wanted: set[fx.Node]) -> None:
        super().__init__(module, graph=graph)
        self.wanted = wanted
        self.found: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        v = super().run_node(n)
        if n in self.wanted:
            self.found[n.name] = _copy(v)
        return v


class _Partial(nn.Module):
    """The student, running from its first changed layer on the cached batches (whole on any other input)."""

    def __init__(
        self,
        student: nn.Module,
        graphs: dict[bool, fx.Graph],
        plans: dict[bool, tuple[list[fx.Node], list[fx.Node]]],
        cache: PrefixCache,
    ) -> None:
        super().__init__()
        self.student = student
        self.graphs = graphs
        self.plans = plans
        self.cache = cache

    def forward(self, x: torch.Tensor) -> Any:
        i = self.cache.index(x)
        if i is None:
            return self.student(x)
        skip, frontier = self.plans[self.training]
        env: dict[fx.Node, Any] = dict.fromkeys(skip)
        # copies: an in-place op of the changed part (x.add_(identity)) would otherwise write into the cache
        env.update({n: _copy(self.cache.values[self.training, n.name][i]) for n in frontier})
        return fx.Interpreter(self.student, graph=self.graphs[self.training]).run(x, initial_env=env)


def _copy(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, list | tuple):
        return type(v)(_copy(x) for x in v)
    return v


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
