"""Anchoring as a benchmark method: the conversion core with a fixed plan per method name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..checkpoint import save
from ..convert import convert, plan
from ..planning import unique_params
from . import Compressed, Context, register_method


@dataclass(frozen=True)
class Anchored:
    """Convert with ``mode``/``regulators``; data-aware ``act`` init when calibration data is given."""

    name: str
    mode: str
    regulators: str
    description: str
    fixed_size: bool = True

    def compress(self, teacher: nn.Module, target_params: int | None, ctx: Context) -> Compressed:
        init = "act" if ctx.calib_loader is not None else "fit"
        p = plan(teacher, self.mode, self.regulators, init=init, input_size=ctx.input_size)
        model = convert(teacher, p, calib_loader=ctx.calib_loader, calib_batches=ctx.calib_batches).model

        def store(m: nn.Module, folder: Path) -> dict[str, int]:
            return {"safetensors": save(m, folder / "model.safetensors", source=ctx.source).stat().st_size}

        return Compressed(model, unique_params(model), lambda m: m, store, f"plan: {self.mode}, regulators {self.regulators}")


@dataclass(frozen=True)
class Budgeted:
    """The budget planner (``plan(target_params=...)``): per-section free/mix/plain + regulators."""

    name: str = "dacnn-budget"
    description: str = "budget-targeted anchoring: what to share chosen per section to fit the budget"
    fixed_size: bool = False

    def compress(self, teacher: nn.Module, target_params: int | None, ctx: Context) -> Compressed:
        from ..budget import search
        from ..errors import PlanError

        if target_params is None:
            raise PlanError("dacnn-budget needs a parameter budget (--budget or --match)")
        result = search(teacher, target_params, ctx.input_size, ctx.calib_loader, min(ctx.calib_batches, 8))
        model = convert(teacher, result.plan, calib_loader=ctx.calib_loader, calib_batches=ctx.calib_batches).model

        def store(m: nn.Module, folder: Path) -> dict[str, int]:
            return {"safetensors": save(m, folder / "model.safetensors", source=ctx.source).stat().st_size}

        regs = ",".join(map(str, result.regulator_sections)) or "none"
        note = f"sections {'/'.join(result.choice)}, regulators {regs}, {result.metric} sensitivity"
        return Compressed(model, unique_params(model), lambda m: m, store, note)


register_method(Budgeted())

for _m in (
    Anchored("dacnn-mix", "mix", "none", "mixed DACNN: one kernel per stage and configuration"),
    Anchored("dacnn-mix-reg", "mix", "all", "mixed DACNN with 1x1 regulators in every section"),
    Anchored("dacnn-plain", "plain", "none", "plain DACNN: one network-wide sliced kernel"),
    Anchored("sharesnet", "sharesnet", "none", "ShaResNet: kernels shared between the blocks of a stage"),
):
    register_method(_m)
