"""Anchoring as a benchmark method: the conversion core with a fixed plan per method name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ..core.convert import convert
from ..core.plan import Plan, count_params
from ..defaults import RESCORE_ROUNDS, default_init
from ..io.checkpoint import save
from ..pipeline import plan
from ..prune_search import PRUNE_GRID, PrunedModels, meets, search_pruned
from . import Compressed, Context, register_method

if TYPE_CHECKING:
    from ..budget import BudgetResult


@dataclass(frozen=True)
class Anchored:
    """Convert with ``mode``/``regulators``; data-aware ``act`` init when calibration data is given."""

    name: str
    mode: str
    regulators: str
    description: str
    fixed_size: bool = True

    def compress(self, teacher: nn.Module, target_params: int | None, ctx: Context) -> Compressed:
        init = default_init(None, ctx.calib_loader is not None, self.mode)
        p = plan(teacher, mode=self.mode, regulators=self.regulators, init=init, input_size=ctx.input_size)
        model = convert(teacher, p, calib_loader=ctx.calib_loader, calib_batches=ctx.calib_batches).model

        def store(m: nn.Module, folder: Path) -> dict[str, int]:
            return {"safetensors": save(m, folder / "model.safetensors", source=ctx.source).stat().st_size}

        return Compressed(
            model, count_params(model), lambda m: m, store, f"plan: {self.mode}, regulators {self.regulators}"
        )


@dataclass(frozen=True)
class Budgeted:
    """The budget planner (``plan(target_params=...)``) searching one space.

    ``space="anchor"``: per-section free/mix/plain + regulators (issue 8's planner);
    ``space="bank"``: also filter banks per section and low-rank unshared convs.
    """

    name: str = "dacnn-budget"
    description: str = "budget-targeted anchoring: what to share chosen per section to fit the budget"
    fixed_size: bool = False
    space: str = "anchor"
    prune: bool = False  # channel pruning in the search too (prune_search: every ratio of PRUNE_GRID, scored whole)
    across: bool = False  # banks merged across stages after the search where that scores better (budget.share_across)

    @property
    def removes_macs(self) -> bool:
        """Only banks and low rank remove MACs; mix and plain share kernels and compute as much."""
        return self.space == "bank"

    def compress(self, teacher: nn.Module, target_params: int | None, ctx: Context) -> Compressed:
        from ..budget import search
        from ..errors import PlanError

        if target_params is None and ctx.target_macs is None:
            raise PlanError(f"{self.name} needs a parameter budget («budget» or «match») or «budget-macs»")

        def at(model: nn.Module, reuse: dict[str, Any], final: bool = True) -> BudgetResult:
            return search(
                model,
                target_params,
                ctx.input_size,
                ctx.calib_loader,
                min(ctx.calib_batches, 8),
                space=self.space,
                target_macs=ctx.target_macs if self.removes_macs else None,  # with «budget»: the params budget alone
                reuse=reuse,
                rescore_rounds=RESCORE_ROUNDS if final else 0,
                across=self.across and final,
            )

        if self.prune:
            metric = "kl" if ctx.calib_loader is not None else "fit"
            pruned = PrunedModels(teacher, ctx.input_size, "group", ctx.calib_loader, min(ctx.calib_batches, 8))
            fits = meets(target_params, ctx.target_macs, ctx.input_size)
            per_section = "macs" if ctx.target_macs is not None else "params"
            result = search_pruned(
                pruned, PRUNE_GRID, at, ctx.calib_loader, min(ctx.calib_batches, 8), metric, fits, per_section
            )
        else:
            result = at(teacher, {})
        model = convert(teacher, result.plan, calib_loader=ctx.calib_loader, calib_batches=ctx.calib_batches).model

        def store(m: nn.Module, folder: Path) -> dict[str, int]:
            return {"safetensors": save(m, folder / "model.safetensors", source=ctx.source).stat().st_size}

        regs = ",".join(map(str, result.regulator_sections)) or "none"
        note = f"sections {'/'.join(result.choice)}, regulators {regs}, {result.metric} sensitivity"
        if result.ranks:
            note += f", unshared convs {'/'.join(result.ranks)}"
        if result.grown:
            note += f"; grown: {'; '.join(result.grown)}"
        if result.across:
            note += f"; across stages: {'; '.join(result.across)}"
        if result.plan.prune is not None:
            note = f"pruned first: {result.plan.prune.label}; " + note
        if result.prune_tries:
            tried = ", ".join(
                ("/".join(f"{x:g}" for x in by) if by else f"{r:g}") + (f": kl {kl:.4g}" if kl is not None else "")
                for r, kl, _, _, by in result.prune_tries
            )
            note += f"; pruning ratios tried: {tried}"
        return Compressed(model, count_params(model), lambda m: m, store, note)


register_method(Budgeted())
register_method(
    Budgeted(
        "dacnn-bank",
        "budget planner with filter banks: free/mix/plain/bank per section + "
        "low-rank unshared convs, fitted to the activations",
        space="bank",
    )
)
register_method(
    Budgeted(
        "dacnn-prune",
        "the budget planner with channel pruning in its space: each pruning ratio of a grid, then banks and "
        "low rank for what the targets still ask, the best whole-plan kl kept",
        space="bank",
        prune=True,
    )
)
register_method(
    Budgeted(
        "dacnn-across",
        "dacnn-bank, then banks merged across stages where a joint bank of fewer parameters fits the members at "
        "no larger error, the saving spent on more filters, kept where the whole plan scores better",
        space="bank",
        across=True,
    )
)


@dataclass(frozen=True)
class LowRank:
    """Per-layer whitened low-rank factorisation, no sharing: every conv and Linear but the stem and the output
    layer at one rank fraction.

    The baseline that shows what sharing adds to banks: the same closed-form, activation-aware fit
    (SVD-LLM's whitening), each conv on its own. The fraction of C_out is bisected so the model
    fits the budget as closely as one uniform fraction allows.
    """

    name: str = "lowrank"
    description: str = (
        "per-layer whitened low-rank factorisation (no sharing), one rank fraction for every layer but the stem and "
        "the output layer"
    )
    fixed_size: bool = False

    def compress(self, teacher: nn.Module, target_params: int | None, ctx: Context) -> Compressed:
        from ..errors import PlanError

        if target_params is None and ctx.target_macs is None:
            raise PlanError("lowrank needs a parameter budget («budget» or «match») or «budget-macs»")
        init = default_init(None, ctx.calib_loader is not None)
        from ..core.planning import with_low_rank
        from ..core.report import count_macs

        base = plan(teacher, mode="none", init=init, input_size=ctx.input_size)  # traced once
        macs_before = count_macs(teacher, ctx.input_size) if target_params is None else 0

        def fits(p: Plan) -> bool:  # a MAC budget is exact plan arithmetic too (Plan.macs_saved)
            if target_params is not None:  # with «budget», the params budget alone, as the pruning methods
                return p.params_after <= target_params
            return macs_before - p.macs_saved <= ctx.target_macs  # type: ignore[operator]

        lo, hi = 1e-3, 1.0
        best = None
        for _ in range(30):  # params and MACs grow with the fraction: bisect for the largest that fits
            mid = (lo + hi) / 2
            p = with_low_rank(base, mid)
            if fits(p):
                best, lo = p, mid
            else:
                hi = mid
        if best is None:
            what = f"{target_params:,} params" if target_params is not None else f"{ctx.target_macs:,} MACs"
            raise PlanError(
                f"lowrank cannot reach {what}: even rank 1 everywhere is larger "
                "(the stem and the output layer stay dense)"
            )
        model = convert(teacher, best, calib_loader=ctx.calib_loader, calib_batches=ctx.calib_batches).model

        def store(m: nn.Module, folder: Path) -> dict[str, int]:
            return {"safetensors": save(m, folder / "model.safetensors", source=ctx.source).stat().st_size}

        ranks = sorted({g.rank for g in best.groups}) or [0]  # nothing factorisable: a plan of no groups
        return Compressed(
            model,
            count_params(model),
            lambda m: m,
            store,
            f"rank fraction {lo:.4f} of C_out ({len(best.groups)} convs, ranks {ranks[0]}-{ranks[-1]})",
        )


register_method(LowRank())

for _m in (
    Anchored("dacnn-mix", "mix", "none", "mixed DACNN: one kernel per stage and configuration"),
    Anchored("dacnn-mix-reg", "mix", "all", "mixed DACNN with 1x1 regulators in every section"),
    Anchored("dacnn-plain", "plain", "none", "plain DACNN: one network-wide sliced kernel"),
    Anchored("sharesnet", "sharesnet", "none", "ShaResNet: kernels shared between the blocks of a stage"),
):
    register_method(_m)
