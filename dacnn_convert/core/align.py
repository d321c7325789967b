"""Channel alignment before sharing: permute each block's private channels to match a reference block.

The channels between two convs of a residual block (conv1's outputs = conv2's inputs, through
conv1's BatchNorm and an elementwise activation) are private: permuting them, together with that
BN's parameters and statistics, does not change the function. The convs of different blocks
can only share filters meaningfully where their input channels correspond, so before fitting
an anchor or a bank to a group, each member's private input channels are matched to the first
member's by weight matching (Ainsworth et al., Git Re-Basin, 2023): a linear assignment that
maximises the similarity of the producing conv's filters plus that of the consuming conv's
input slices.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import trace
from .kinds import plain_kind
from .plan import Plan

_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Mish)
_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.leaky_relu}
_METHODS = {"relu", "relu_"}


@dataclass(frozen=True)
class Chain:
    """Conv ``producer`` feeds only conv ``consumer``, through BatchNorm ``bn`` (or none) and activations."""

    producer: str
    consumer: str
    bn: str | None


@dataclass(frozen=True)
class Alignment:
    """What alignment did: per member conv, the similarity to its reference before and after."""

    permuted: tuple[tuple[str, float, float], ...]  # (consumer conv, cosine before, cosine after)


def private_chains(model: nn.Module, leaf_modules: Sequence[type[nn.Module]] = ()) -> dict[str, Chain]:
    """Per consumer conv, the chain that makes its input channels private (permutable)."""
    gm = trace(model, leaf_modules)
    modules = dict(model.named_modules())
    chains: dict[str, Chain] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or plain_kind(modules.get(node.target)) is not nn.Conv2d:
            continue
        cur: fx.Node = node
        bn: str | None = None
        while len(cur.users) == 1:
            (user,) = cur.users
            m = modules.get(user.target) if user.op == "call_module" else None
            if isinstance(m, nn.Conv2d) and plain_kind(m) is nn.Conv2d:
                a, b = modules[node.target], m
                if a.groups == b.groups == 1 and a.out_channels == b.in_channels:
                    chains[str(user.target)] = Chain(str(node.target), str(user.target), bn)
                break
            if isinstance(m, nn.BatchNorm2d) and bn is None and m.num_features == modules[node.target].out_channels:
                bn = str(user.target)
            elif not (
                isinstance(m, _ELEMENTWISE)
                or (user.op == "call_function" and user.target in _FUNCTIONS)
                or (user.op == "call_method" and user.target in _METHODS)
            ):
                break
            cur = user
    return chains


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _similarity(ref_a: torch.Tensor, ref_b: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(C x C): cosine of producer filters plus cosine of consumer input slices, channel by channel."""
    rows = _unit(ref_a.reshape(ref_a.shape[0], -1)) @ _unit(a.reshape(a.shape[0], -1)).T
    cols = _unit(ref_b.transpose(0, 1).reshape(ref_b.shape[1], -1)) @ _unit(b.transpose(0, 1).reshape(b.shape[1], -1)).T
    return rows + cols


def _permute(modules: dict[str, nn.Module], chain: Chain, perm: torch.Tensor) -> None:
    """Reorder the private channels of ``chain``: producer rows, BN entries, consumer input slices."""
    a: nn.Conv2d = modules[chain.producer]  # type: ignore[assignment]
    b: nn.Conv2d = modules[chain.consumer]  # type: ignore[assignment]
    with torch.no_grad():
        a.weight.copy_(a.weight[perm])
        if a.bias is not None:
            a.bias.copy_(a.bias[perm])
        if chain.bn is not None:
            bn: nn.BatchNorm2d = modules[chain.bn]  # type: ignore[assignment]
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                if t is not None:
                    t.copy_(t[perm])
        b.weight.copy_(b.weight[:, perm])


def align_channels(
    model: nn.Module, plan: Plan, leaf_modules: Sequence[type[nn.Module]] = ()
) -> tuple[nn.Module, Alignment]:
    """A copy of ``model``, same function, whose group members' private input channels match the first member's.

    Only members whose input channels are private (see :func:`private_chains`) and whose producer
    and consumer have the reference's shapes are permuted; the rest are left as they are.
    ``model`` is untouched.
    """
    from scipy.optimize import linear_sum_assignment

    aligned = copy.deepcopy(model)
    modules = dict(aligned.named_modules())
    chains = private_chains(aligned, leaf_modules)
    done = []
    for g in plan.groups:
        members = [m for m in g.members if m in chains]
        if len(members) < 2:
            continue
        ref = chains[members[0]]
        # copies: aligning a later chain may permute the reference's producer rows in place
        ref_a, ref_b = modules[ref.producer].weight.detach().clone(), modules[ref.consumer].weight.detach().clone()
        for name in members[1:]:
            c = chains[name]
            a, b = modules[c.producer].weight.detach(), modules[c.consumer].weight.detach()
            if a.shape != ref_a.shape or b.shape != ref_b.shape:
                continue
            sim = _similarity(ref_a, ref_b, a, b).double()
            _, perm = linear_sum_assignment(sim.numpy(), maximize=True)
            perm_t = torch.as_tensor(perm, dtype=torch.long)
            before = float(sim.diagonal().mean()) / 2
            after = float(sim[torch.arange(len(perm_t)), perm_t].mean()) / 2
            _permute(modules, c, perm_t)
            done.append((name, before, after))
    return aligned, Alignment(tuple(done))
