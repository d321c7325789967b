"""Graph analysis: trace a model with torch.fx, propagate shapes, describe every conv and linear.

The result is plain data (:class:`ConvSite` per exact ``nn.Conv2d`` or ``nn.Linear``; a Linear
is described as the 1x1 conv it is over its positions) that planning groups into anchored
kernels and banks. Nothing here changes the model: the traced GraphModule
shares the model's submodules and is thrown away.
"""

from __future__ import annotations

import contextlib
import io
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .. import validate
from ..errors import PlanError, TraceError, first_line
from .kinds import is_plain, plain_kind
from .modes import mode

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


@dataclass(frozen=True)
class ConvSite:
    """One ``nn.Conv2d`` as it is used in the traced forward pass."""

    name: str  # qualified module name, e.g. "layer2.0.conv1"
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    groups: int
    bias: bool
    padding_mode: str
    in_size: tuple[int, int]  # (H, W) of the input feature map
    out_size: tuple[int, int]  # (H, W) of the output: the conv's spatial stage
    order: int  # position in execution order
    block: str | None  # residual block (module owning a skip addition) that contains it
    depth_in_block: int  # convs on the longest path from the block input, itself included
    bn: str | None  # BatchNorm2d that alone consumes the output (fold target), if any
    reused: bool  # the module is called more than once (already shared): left alone
    fed_by_input: bool  # consumes the network input directly (the paper's expansion layer)
    # "conv", or "linear" for an nn.Linear described as a 1x1 conv over its positions: in_size and
    # out_size are then the positions it is applied at ((1, 1) for a classifier on pooled features,
    # (H, W) for a channels-last MLP), so an MLP lands in its stage's section and a head in its own
    layer: str = "conv"
    # its output reaches the model's output without passing through another layer with weights (the logits
    # layer): its rank bounds the logits', so the planner ranks it on its own (kl only) and a hand-written
    # factorize_unshared leaves it dense
    feeds_output: bool = False

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def weight_numel(self) -> int:
        co, ci, kh, kw = self.weight_shape
        return co * ci * kh * kw

    @property
    def config(self) -> tuple[Any, ...]:
        """What must be identical for two convs to share one kernel in ``mix`` mode."""
        return (
            self.weight_shape,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias,
            self.padding_mode,
            self.layer,
        )

    @property
    def macs(self) -> int:
        return self.out_size[0] * self.out_size[1] * self.weight_numel

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["layer"] == "conv":  # files with only convs stay readable by releases before Linear sites
            del data["layer"]
        if not data["feeds_output"]:  # the field is new in 0.2: only the output layer's entry carries it
            del data["feeds_output"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConvSite:
        tuples = ("kernel_size", "stride", "dilation", "in_size", "out_size")
        fixed = {k: (tuple(v) if k in tuples else v) for k, v in data.items()}
        if isinstance(fixed["padding"], list):
            fixed["padding"] = tuple(fixed["padding"])
        return cls(**fixed)  # type: ignore[arg-type]  # a mistyped field raises TypeError: Plan.from_dict maps it


class _Tracer(fx.Tracer):
    """fx tracer that keeps exact ``nn.Conv2d`` and timm's untraceable modules as leaves."""

    def __init__(self, leaf_modules: Sequence[type[nn.Module]] = ()) -> None:
        super().__init__()
        self.extra_leaves = tuple(leaf_modules)
        try:
            from timm.layers import get_notrace_functions, get_notrace_modules

            self.extra_leaves += tuple(get_notrace_modules())
            self._autowrap_function_ids.update(id(f) for f in get_notrace_functions())
        except ImportError:  # timm is optional for analysis
            pass

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if is_plain(m) or isinstance(m, self.extra_leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, leaf_modules: Sequence[type[nn.Module]] = ()) -> fx.GraphModule:
    """Symbolically trace ``model``; modules of ``leaf_modules`` types are not entered.

    Raises:
        TraceError: naming the module being traced when fx failed, and the fix.
    """
    tracer = _Tracer(validate.leaf_modules(leaf_modules))
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types; the user needs the place and the fix
        stack = [w for w in reversed(getattr(tracer, "module_stack", None) or {}) if w and _has_submodule(model, w)]
        # the innermost module of the user's own (torch's modules are leaves already: leafing one changes nothing)
        where = next((w for w in stack if not _from_torch(model.get_submodule(w))), "")
        owner = model.get_submodule(where) if where else None
        place = f"module {where!r} ({type(owner).__name__})" if owner is not None else "the model's own forward"
        first = first_line(exc)
        fix = (
            f"mark it as a leaf module (anchor(model, leaf_modules=[{type(owner).__name__}]) "
            f"or --leaf-module {_qualified(owner)}); convs inside a leaf are not anchored."
            if owner is not None
            else "make the forward traceable by torch.fx (no Python control flow on tensor values), or wrap the "
            "part that is not in a module of its own and mark that module as a leaf («leaf-module»)."
        )
        raise TraceError(f"torch.fx cannot trace {place}: {first[:200]}. Fix: {fix}") from exc
    return fx.GraphModule(tracer.root, graph)


def _from_torch(module: nn.Module) -> bool:
    """A module class torch itself defines (nn.BatchNorm2d, nn.ReLU): fx treats those as leaves."""
    return type(module).__module__.startswith("torch.")


def _qualified(module: nn.Module | None) -> str:
    """``package.module.ClassName`` of a module, the form --leaf-module takes."""
    if module is None:
        return "package.module.ClassName"
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _stack_paths(node: fx.Node) -> list[str]:
    """Qualified names of the modules a node was traced inside, outermost first."""
    stack = node.meta.get("nn_module_stack", {}) or {}
    paths = []
    for key, value in stack.items():
        path = value[0] if isinstance(value, tuple) else key
        paths.append(str(path).split("@")[0])
    return paths


def _is_skip_add(node: fx.Node) -> bool:
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    )
    return is_add and sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def analyze(
    model: nn.Module,
    input_size: tuple[int, int, int],
    leaf_modules: Sequence[type[nn.Module]] = (),
) -> list[ConvSite]:
    """Describe every exact ``nn.Conv2d`` and ``nn.Linear`` that the forward pass calls, in execution order.

    Subclasses (timm's ``Conv2dSame``, ``NonDynamicallyQuantizableLinear`` inside attention) are
    not described: their forward differs from the base class's.

    Args:
        model: any fx-traceable module; it is run once in eval mode on zeros of shape
            ``(1, *input_size)`` and its train/eval flags are restored afterwards.
        input_size: (C, H, W) of one example.
        leaf_modules: extra module types not to trace into.

    Raises:
        TraceError: fx could not trace the model.
        PlanError: the forward pass failed on the example input (e.g. too small).
    """
    gm = trace(model, leaf_modules)
    try:
        with mode(model), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            # ShapeProp prints a traceback of its own before raising: keep the user's terminal clean
            p = next(model.parameters(), None)  # the example goes where the model is (CPU or GPU)
            ShapeProp(gm).propagate(torch.zeros(1, *input_size, device=p.device if p is not None else "cpu"))
    except Exception as exc:
        root = exc.__cause__ or exc
        node = next((str(n.target) for n in gm.graph.nodes if f"node=%{n.name} " in str(exc)), None)
        first = first_line(root)
        raise PlanError(
            f"the model fails on an input of size {tuple(input_size)}"
            + (f" at {node}" if node else "")
            + f": {first[:200]}. "
            "Is «input-size» right for this network (too small for its downsampling?)"
        ) from exc
    return _sites(gm, model)


def _sites(gm: fx.GraphModule, model: nn.Module) -> list[ConvSite]:
    nodes = list(gm.graph.nodes)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for n in nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    blocks = {(_stack_paths(n) or [""])[-1] for n in nodes if _is_skip_add(n)}
    blocks.discard("")
    layer_nodes = [n for n in nodes if n.op == "call_module" and is_plain(modules.get(n.target))]
    conv_nodes = [n for n in layer_nodes if plain_kind(modules.get(n.target)) is nn.Conv2d]
    block_of = {n: next((p for p in reversed(_stack_paths(n)[:-1]) if p in blocks), None) for n in layer_nodes}
    depth = _conv_depths(nodes, conv_nodes, block_of)
    fed = _fed_by_input(nodes, set(layer_nodes))
    heads = _feeds_output(nodes, set(layer_nodes), modules)

    sites = []
    for order, n in enumerate(layer_nodes):
        in_meta = n.args[0].meta.get("tensor_meta") if n.args and isinstance(n.args[0], fx.Node) else None
        out_meta = n.meta.get("tensor_meta")
        if in_meta is None or out_meta is None or not hasattr(in_meta, "shape"):
            continue  # not reached by shape propagation
        layer = modules[n.target]
        common = dict(
            name=str(n.target),
            order=order,
            block=block_of[n],
            depth_in_block=depth.get(n, 1),
            reused=calls[n.target] > 1,
            fed_by_input=n in fed,
            feeds_output=n in heads,
        )
        if isinstance(layer, nn.Linear):
            sites.append(_linear_site(layer, tuple(in_meta.shape), common))
            continue
        conv = layer
        assert isinstance(conv, nn.Conv2d)
        padding = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
        sites.append(
            ConvSite(
                in_channels=conv.in_channels,
                out_channels=conv.out_channels,
                kernel_size=_pair(conv.kernel_size),
                stride=_pair(conv.stride),
                padding=padding,
                dilation=_pair(conv.dilation),
                groups=conv.groups,
                bias=conv.bias is not None,
                padding_mode=conv.padding_mode,
                in_size=(int(in_meta.shape[2]), int(in_meta.shape[3])),
                out_size=(int(out_meta.shape[2]), int(out_meta.shape[3])),
                bn=_following_bn(n, modules, calls),
                **common,  # type: ignore[arg-type]
            )
        )
    return sites


def _positions(shape: tuple[int, ...]) -> tuple[int, int]:
    """Where a Linear applies, as (H, W): (1, 1) on (N, C), (L, 1) on (N, L, C), (H, W) on (N, H, W, C)."""
    inner = [int(d) for d in shape[1:-1]]
    if len(inner) == 2:
        return (inner[0], inner[1])
    return (math.prod(inner), 1)


def _linear_site(layer: nn.Linear, in_shape: tuple[int, ...], common: dict[str, Any]) -> ConvSite:
    """An nn.Linear as the 1x1 conv it is over its positions."""
    where = _positions(in_shape)
    return ConvSite(
        in_channels=layer.in_features,
        out_channels=layer.out_features,
        kernel_size=(1, 1),
        stride=(1, 1),
        padding=(0, 0),
        dilation=(1, 1),
        groups=1,
        bias=layer.bias is not None,
        padding_mode="zeros",
        in_size=where,
        out_size=where,
        bn=None,
        layer="linear",
        **common,
    )


def _conv_depths(nodes: Iterable[fx.Node], conv_nodes: list[fx.Node], block_of: dict) -> dict[fx.Node, int]:
    """Longest chain of convs from each conv's block input to the conv (ShaResNet's 'second conv')."""
    conv_set = set(conv_nodes)
    result: dict[fx.Node, int] = {}
    for block in {b for b in block_of.values() if b is not None}:
        inside = {n for n in nodes if block in _stack_paths(n)}
        depth: dict[fx.Node, int] = {}
        for n in nodes:
            if n not in inside:
                continue
            best = max((depth.get(a, 0) for a in n.all_input_nodes), default=0)
            depth[n] = best + (1 if n in conv_set else 0)
        for c in conv_nodes:
            if block_of[c] == block:
                result[c] = depth[c]
    for c in conv_nodes:
        result.setdefault(c, 1)
    return result


def _fed_by_input(nodes: list[fx.Node], convs: set[fx.Node]) -> set[fx.Node]:
    """Convs reached from a placeholder without passing through another conv."""
    reach: set[fx.Node] = set()
    fed = set()
    for n in nodes:
        if n.op == "placeholder":
            reach.add(n)
        elif any(a in reach for a in n.all_input_nodes):
            if n in convs:
                fed.add(n)
            else:
                reach.add(n)
    return fed


_WEIGHTED_FUNCTIONS = {torch.nn.functional.linear, torch.nn.functional.conv2d, torch.matmul, torch.mm, torch.einsum}


def _feeds_output(nodes: list[fx.Node], layers: set[fx.Node], modules: dict[str, nn.Module]) -> set[fx.Node]:
    """Convs and Linears whose output reaches the graph's output without passing through another layer with
    weights (a conv or Linear of any class, a leaf module holding a matrix, a functional linear or matmul);
    norms, activations, pooling, dropout and reshapes pass through."""

    def weighted(n: fx.Node) -> bool:
        if n.op == "call_function":
            return n.target in _WEIGHTED_FUNCTIONS
        if n.op != "call_module":
            return False
        m = modules.get(str(n.target))
        return isinstance(m, nn.Linear | nn.Conv2d) or any(p.dim() >= 2 for p in getattr(m, "parameters", list)())

    reach: set[fx.Node] = set()
    heads = set()
    for n in reversed(nodes):
        if n.op == "output" or any(u in reach for u in n.users):
            if n in layers:
                heads.add(n)
            elif not weighted(n):
                reach.add(n)
    return heads


def _following_bn(node: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int]) -> str | None:
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    bn = modules.get(str(users[0].target))
    if (
        isinstance(bn, nn.BatchNorm2d)
        and bn.affine
        and bn.track_running_stats
        and bn.running_var is not None
        and calls.get(str(users[0].target)) == 1
    ):
        return str(users[0].target)
    return None
