"""Structured channel pruning as a step of a plan: narrow every layer first, then share what is left.

A :class:`Pruning` says how (a fraction of every layer's channels, or per named layer: the planner's
per-section pruning; ranked by an importance) and
what it removes (exact parameter and MAC counts, measured when the plan is made:
:func:`dacnn_convert.prune_search.prune`), so a plan that prunes
stays data: :func:`dacnn_convert.core.convert.convert` prunes a copy of the model before it shares
anything, and ``load`` narrows the skeleton to the shapes the plan records (no weights needed).

The pruning itself is Torch-Pruning's: its dependency graph keeps residual additions, depthwise convs
and concatenations consistent; the layers producing the logits keep their outputs. Importance by
group L2 norm (DepGraph, Fang et al. 2023) or by the L1 norm of each filter (Li et al. 2017). The
channels removed depend on the weights, so a plan that prunes is tied to the weights it was made for;
``convert`` checks every pruned shape against the plan and names the first that differs.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PlanError, choose
from ..names import PRUNE_IMPORTANCES
from .kinds import is_plain
from .modes import mode


@dataclass(frozen=True)
class Pruning:
    """Prune ``ratio`` of the channels of every layer (the logits layer's outputs kept) before sharing.

    ``layers`` gives named layers a ratio of their own (0 leaves a layer whole; the planner's per-section
    pruning lists every layer of each section: :func:`dacnn_convert.prune_search.section_layers`); a
    layer's ratio sets how many of the channels it produces go, with everything coupled to them
    (Torch-Pruning's ``pruning_ratio_dict``). ``params_saved`` and ``macs_saved`` (per example, at the
    plan's input size) are what the pruning alone removes from the original model, filled in when the
    plan is made (:func:`dacnn_convert.prune_search.prune`).
    """

    ratio: float
    importance: str = "group"
    params_saved: int = 0
    macs_saved: int = 0
    layers: tuple[tuple[str, float], ...] = ()
    # with ``layers`` from per-section pruning: each section's ratio, for display (sections by output size, largest
    # first, a stem at its own size included: prune_search.section_layers; the planner's numbers may differ)
    sections: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple((n, r) for n, r in self.layers))  # JSON lists -> tuples
        object.__setattr__(self, "sections", tuple(self.sections))
        if self.sections and not self.layers:
            raise PlanError("a pruning's per-section ratios come with the layers they name")
        ratios = [self.ratio, *(r for _, r in self.layers)]
        if not all(isinstance(r, int | float) and not isinstance(r, bool) and 0.0 <= r < 1.0 for r in ratios) or (
            not any(r > 0 for r in ratios)
        ):
            what = repr(self.ratio) if not self.layers else f"{ratios!r} (0 leaves a layer whole; one must prune)"
            raise PlanError(f"a pruning ratio is a fraction of channels in (0, 1), got {what}")
        names = [n for n, _ in self.layers]
        if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise PlanError(f"a pruning's layers are distinct module names, got {names!r}")
        choose("pruning importance", self.importance, PRUNE_IMPORTANCES)
        if self.params_saved < 0 or self.macs_saved < 0:
            raise PlanError(f"a pruning cannot add parameters or MACs ({self.params_saved}, {self.macs_saved})")

    @property
    def amount(self) -> str:
        """How much it prunes, in words: "0.5 of every layer's channels", or the range of its per-layer ratios."""
        if not self.layers:
            return f"{self.ratio:g} of every layer's channels"
        if self.sections:
            return f"{self._by_section} of the channels of each section's layers"
        ratios = [r for _, r in self.layers]
        return f"{min(ratios):g}-{max(ratios):g} of the named layers' channels, {self.ratio:g} of the others'"

    @property
    def label(self) -> str:
        if not self.layers:
            return f"prune {self.ratio:g} ({self.importance})"
        if self.sections:
            return f"prune {self._by_section} by section ({self.importance})"
        return f"prune {len(self.layers)} layers ({self.importance})"

    @property
    def _by_section(self) -> str:
        return "/".join(f"{r:g}" for r in self.sections)


def output_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """The layers whose outputs are the model's outputs (Linear or conv whose output width is the task's).

    Raises:
        PlanError: the model's output is not one tensor of logits.
    """
    with torch.no_grad():
        out = model(example)
    if not isinstance(out, torch.Tensor):
        raise PlanError(
            f"channel pruning needs a model that returns one tensor of logits, this one returns {type(out).__name__}"
        )
    width = out.shape[1] if out.dim() > 1 else out.shape[-1]
    return [
        m
        for m in model.modules()
        if (isinstance(m, nn.Linear) and m.out_features == width)
        or (isinstance(m, nn.Conv2d) and m.out_channels == width)
    ]


def _width(module: nn.Module, side: str) -> int | None:
    """Channels of ``module`` on ``side`` ("in" or "out") for the layers compensation refits, else None."""
    if isinstance(module, nn.Conv2d):
        return module.in_channels if side == "in" else module.out_channels
    if isinstance(module, nn.Linear):
        return module.in_features if side == "in" else module.out_features
    return None


def channel_prune(
    model: nn.Module,
    ratio: float,
    importance: str,
    input_size: tuple[int, int, int],
    widest_ratio: float | None = None,
    removed: dict[str, dict[str, list[int]]] | None = None,
    layers: Iterable[tuple[str, float]] = (),
) -> nn.Module:
    """Prune ``ratio`` of the channels of every layer of ``model`` in place (the logits layer's outputs kept).

    ``widest_ratio`` prunes the widest layers (the last stage of a ResNet) at their own ratio:
    the fine adjustment that brings the count within 1% of a budget when one uniform ratio
    steps over it. ``layers`` gives named layers their own ratio (:attr:`Pruning.layers`). ``removed``, when
    given, receives per conv and Linear name the channel indices removed (``{"in": [...], "out": [...]}``, in
    the original numbering: a layer fed by a concatenation is pruned by several groups, each numbering the
    channels left by the ones before). Every submodule's train/eval flag
    and the global random state are as they were.

    Raises:
        PlanError: the model does not return one tensor, pruning changed the width of its output, or a
            layer named in ``layers`` is not a module of the model.
    """
    import torch_pruning as tp

    choose("pruning importance", importance, PRUNE_IMPORTANCES)
    if importance == "l1":
        imp = tp.importance.MagnitudeImportance(p=1, group_reduction="first")
    else:  # named GroupNormImportance before Torch-Pruning 1.5
        group = getattr(tp.importance, "GroupMagnitudeImportance", None) or tp.importance.GroupNormImportance
        imp = group(p=2)
    for p in model.parameters():  # Torch-Pruning leaves frozen parameters alone
        p.requires_grad_(True)
    first = next(model.parameters(), None)
    example = torch.zeros(1, *input_size, device=first.device if first is not None else "cpu")  # traced, not scored
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    per_layer: dict[nn.Module, float] = {}
    if widest_ratio is not None and convs:
        widest = max(m.out_channels for m in convs)
        per_layer = {m: widest_ratio for m in convs if m.out_channels == widest}
    named = dict(model.named_modules())
    for layer, r in layers:
        if layer not in named or not layer:
            raise PlanError(
                f"the pruning names a layer {layer!r} that this model does not have: was the plan made for "
                "another model?"
            )
        per_layer[named[layer]] = r
    with mode(model):  # a batch of one example would break BatchNorm in train mode
        heads = output_layers(model, example)
        logits = [n for n, r in layers if r > 0 and any(named[n] is h for h in heads)]
        if logits:
            raise PlanError(
                f"the pruning names {logits[0]!r}, which produces the model's outputs: it keeps them (give it 0, "
                "or leave it out)"
            )
        before = model(example).shape
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            importance=imp,
            pruning_ratio=ratio,
            pruning_ratio_dict=per_layer or None,
            ignored_layers=heads,
            global_pruning=False,
        )
        if removed is None:
            pruner.step()
        else:
            names = {id(m): n for n, m in model.named_modules()}
            alive: dict[tuple[str, str], list[int]] = {}  # original indices still there, per layer and side
            for group in pruner.step(interactive=True):
                for item in group:
                    module = item.dep.target.module
                    name = names.get(id(module))
                    side = {"prune_in_channels": "in", "prune_out_channels": "out"}.get(
                        getattr(item.dep.handler, "__name__", "")
                    )
                    width = _width(module, side) if side is not None else None
                    if name is None or side is None or width is None:
                        continue
                    kept = alive.setdefault((name, side), list(range(width)))
                    gone = {int(i) for i in item.idxs}
                    removed.setdefault(name, {}).setdefault(side, []).extend(kept[i] for i in sorted(gone))
                    alive[name, side] = [c for i, c in enumerate(kept) if i not in gone]
                group.prune()
        with torch.no_grad():
            after = model(example).shape
    if after != before:
        raise PlanError(f"channel pruning changed the model's output from {tuple(before)} to {tuple(after)}")
    return model


COMPENSATE_MAX_DIM = 8192  # input patch length above which a layer keeps its pruned weights (d x d moments)
COMPENSATE_BYTES = 1 << 30  # float64 moments held at once; more layers take another calibration pass
COMPENSATE_DAMPING = 1e-4  # ridge on the student's input moments, relative to their mean eigenvalue


def compensate(
    pruned: nn.Module,
    original: nn.Module,
    removed: dict[str, dict[str, list[int]]],
    calib_loader: Iterable,
    calib_batches: int,
) -> list[str]:
    """Refit, in closed form, every layer whose inputs lost channels to the original's outputs.

    Channel pruning (He et al. 2017, "Channel Pruning for Accelerating Very Deep Neural Networks";
    ThiNet) leaves each consumer of a pruned map with the kernel slice it had, though the channels it
    lost carried part of its output. Here each such conv (groups 1) or Linear gets the least-squares
    kernel W' = W_o H[:, K] H[K, K]^-1 that best reproduces the original's kept outputs from the kept input
    channels alone: H = sum t t^T over the original's input patches
    (:func:`dacnn_convert.core.fitting.input_moments`), K the patch entries of the kept channels, W_o the
    original kernel's kept output rows. Every layer is fitted on the original's inputs, so the fits do not
    chase each other (fitting all layers at once to the pruned network's own inputs diverged: kl 0.6 -> 119
    on the Fashion-MNIST ResNet-18 at half the channels). ``pruned`` is updated in place; returns the names
    refitted. Layers with patches longer than :data:`COMPENSATE_MAX_DIM`, grouped convs and convs with
    string padding keep their pruned slice.
    """
    from .fitting import input_moments

    mods = dict(pruned.named_modules())
    orig = dict(original.named_modules())
    todo: list[tuple[str, int]] = []
    for name, sides in removed.items():
        m, o = mods.get(name), orig.get(name)
        if not sides.get("in") or not is_plain(m) or type(o) is not type(m):
            continue
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or isinstance(m.padding, str)):
            continue
        d_t = o.weight[0].numel()  # type: ignore[union-attr]
        if d_t <= COMPENSATE_MAX_DIM:
            todo.append((name, 8 * d_t * d_t))
    chunks: list[list[str]] = [[]]
    used = 0
    for name, need in todo:
        if chunks[-1] and used + need > COMPENSATE_BYTES:
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += need
    done: list[str] = []
    for chunk in chunks:
        if not chunk:
            continue
        moments = input_moments(original, chunk, calib_loader, calib_batches)
        for name in chunk:
            h = moments[name][0]
            m, o = mods[name], orig[name]
            w = o.weight.detach()
            per = w[0, 0].numel() if w.dim() > 2 else 1  # patch entries per input channel (kh * kw)
            gone_in, gone_out = set(removed[name]["in"]), set(removed[name].get("out", ()))
            cols = torch.tensor(
                [c * per + j for c in range(w.shape[1]) if c not in gone_in for j in range(per)], dtype=torch.long
            )
            rows = [i for i in range(w.shape[0]) if i not in gone_out]
            w_o = w[rows].reshape(len(rows), -1).double().cpu()
            h_kk = h[cols][:, cols]
            damp = COMPENSATE_DAMPING * float(h_kk.diagonal().mean().clamp_min(1e-12))
            lhs = h_kk + damp * torch.eye(len(cols), dtype=h.dtype)
            fitted = torch.linalg.solve(lhs, (w_o @ h[:, cols]).T).T  # lhs is symmetric
            if fitted.shape[1] != m.weight[0].numel() or not torch.isfinite(fitted).all():
                continue
            with torch.no_grad():
                m.weight.copy_(fitted.reshape(m.weight.shape).to(m.weight.dtype))
            done.append(name)
    return done


def pruned_copy(
    model: nn.Module,
    pruning: Pruning,
    input_size: tuple[int, int, int],
    calib_loader: Iterable | None = None,
    calib_batches: int = 0,
) -> nn.Module:
    """A copy of ``model`` with ``pruning`` applied (``model`` and its train/eval mode untouched); with
    calibration data, every layer that lost input channels is refitted to the original's outputs
    (:func:`compensate`)."""
    student = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    flags = [p.requires_grad for p in student.parameters()]
    removed: dict[str, dict[str, list[int]]] = {}
    channel_prune(student, pruning.ratio, pruning.importance, input_size, removed=removed, layers=pruning.layers)
    if len(flags) == len(list(student.parameters())):  # give frozen parameters their flag back
        for p, flag in zip(student.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    if calib_loader is not None and calib_batches > 0:
        with mode(model, student):
            compensate(student, model, removed, calib_loader, calib_batches)
    return student
