"""One conversion job, as a resolved recipe describes it: build the model, plan, convert (with
data: calibrate and distil too), write the files, and return what happened as one typed result.

``dacnn-convert``, ``dacnn distill``, ``dacnn plan``, ``dacnn demo`` and ``dacnn recipe run`` all
call :func:`run_convert_job`; the CLI only resolves the recipe, guards the output folder,
supplies data loaders and renders the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .atomic import atomic_write_text
from .core.plan import Plan
from .core.report import ConversionReport
from .defaults import default_init
from .errors import UsageError
from .pipeline import PipelineResult, measured_latency, plan_search
from .recipes import Recipe, leaf_types, parse_input_size

LoadersFor = Callable[[tuple[int, int, int], Any], Any]  # (input size, preprocessing) -> Loaders


@dataclass
class ConvertJobResult:
    """What a job did: the plan (and, for a size target, the search), and either the conversion
    report (no data) or the whole pipeline's result (with data); ``out`` None for a dry run."""

    plan: Plan
    source: str
    out: Path | None = None
    search: Any = None  # budget.SearchResult when the plan came from a size target
    report: ConversionReport | None = None
    pipeline: PipelineResult | None = None
    files: list[Path] = field(default_factory=list)
    macs_before: int | None = None  # of the original at the plan's input size (its after: minus plan.macs_saved)


def output_folder(rec: Recipe) -> Path:
    """Where a job writes: ``rec.out``, else ``runs/MODEL-MODE``."""
    from .io.sources import parse_spec

    if rec.out:
        return Path(rec.out)
    name = parse_spec(rec.model, rec.num_classes).name if rec.model else "model"
    return Path("runs") / f"{name.replace(':', '_').replace('/', '_')}-{rec.mode}"


def run_convert_job(
    rec: Recipe,
    *,
    loaders_for: LoadersFor | None = None,
    device: torch.device | None = None,
    dry_run: bool = False,
    write_recipe: bool = False,
    command: str | None = None,
    resume: bool = False,
    config: Any = None,
    on_stage: Callable[[str, float], None] | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> ConvertJobResult:
    """Run the conversion ``rec`` describes.

    Args:
        rec: the resolved recipe (task ``convert``).
        loaders_for: builds the train/val loaders once the input size is known; with it (and
            ``rec.dataset``) the job fits to the activations, recalibrates BatchNorm and distils.
        device: where the model and data go (default: CPU).
        dry_run: plan only; nothing is built beyond the plan, nothing is written.
        write_recipe: write ``rec`` (resolved) to ``OUT/recipe.yaml``.
        command: the command line, for the model card.
        resume, config, on_stage, on_step, on_epoch: as :func:`dacnn_convert.compress`;
            ``config`` defaults to ``rec.train_config()``.

    Raises:
        UsageError: the recipe asks for something impossible (a data-aware init without data, ...);
        DacnnError: from loading, planning, converting or training.
    """
    # ``rec.seed`` seeds everything random here (weights "none", regulators, init "random") in a
    # forked RNG: the same recipe gives the same model, and the caller's random state is untouched
    with torch.random.fork_rng(devices=[device] if device is not None and device.type == "cuda" else []):
        torch.manual_seed(rec.seed)
        from .core.convert import convert
        from .core.report import build_report, state_dict_bytes
        from .io.card import model_card
        from .io.checkpoint import save

        ready = _prepare(rec, loaders_for, device, dry_run)
        original, spec, size, leaves, settings, with_data, loaders = ready
        out = output_folder(rec)
        scored_on = loaders.train if loaders is not None and settings.by_budget else None
        plan, search = plan_search(original, settings, scored_on, size, leaves, with_data=with_data)
        result = ConvertJobResult(plan, spec.display, None if dry_run else out, search)
        if dry_run:
            from .core.report import count_macs

            result.macs_before = count_macs(original, plan.input_size)
            return result
        if write_recipe:
            result.files.append(atomic_write_text(out / "recipe.yaml", rec.resolved().to_yaml()))
        if with_data:
            from .pipeline import compress

            assert loaders is not None
            result.pipeline = compress(
                original,
                loaders.train,
                loaders.val,
                plan,
                train=config if config is not None else rec.train_config(),
                calib_batches=rec.calib_batches,
                out=out,
                dtype=rec.dtype,
                source=spec,
                on_stage=on_stage,
                on_step=on_step,
                on_epoch=on_epoch,
                resume=resume,
                command=command,
                reconstruct=rec.reconstruct,
            )
            result.report = result.pipeline.report
            result.files += [out / "model.safetensors", out / "report.json", out / "report.md"]
            return result
        conversion = convert(original, plan)
        ckpt = save(conversion.model, out / "model.safetensors", source=spec, dtype=rec.dtype)
        report = build_report(original, conversion, spec.display, state_dict_bytes(original), ckpt.stat().st_size)
        result.report = report
        result.files += [
            ckpt,
            atomic_write_text(out / "report.json", report.to_json()),
            atomic_write_text(out / "report.md", report.to_markdown()),
            atomic_write_text(out / "README.md", model_card(report, command, latency=measured_latency(search))),
        ]
        return result


class _Ready(NamedTuple):
    """A job's model and settings, built the same way for a conversion and a sweep."""

    original: torch.nn.Module
    spec: Any
    size: tuple[int, int, int]
    leaves: list[type]
    settings: Any  # AnchorConfig
    with_data: bool
    loaders: Any


def _prepare(
    rec: Recipe, loaders_for: LoadersFor | None, device: torch.device | None, dry_run: bool, sweep: bool = False
) -> _Ready:
    """Build the model the recipe names (on ``device``), its input size, and (with a dataset) its loaders:
    for a conversion, for a dry run that searches a size target, and for a ``sweep``."""
    from .io.sources import build_model, input_config, parse_spec

    if rec.model is None:
        raise UsageError("give a model (e.g. resnet34), or a recipe that names one")
    weights = rec.weights or "DEFAULT"
    spec = parse_spec(rec.model, rec.num_classes)
    size = parse_input_size(rec.input_size)
    leaves = leaf_types([n for n in (rec.leaf_module or "").split(",") if n.strip()])
    with_data = loaders_for is not None and bool(rec.dataset)
    original = build_model(spec, weights).eval()
    if device is not None:
        original.to(device)  # calibration, search and fine-tune run where the data goes
    preprocess = input_config(original, spec, weights)  # timm's data config / torchvision's transforms
    if size is None:
        from .train.data import native_size

        side = native_size(rec.dataset) if with_data and rec.dataset else None
        size = (preprocess.input_size[0], side, side) if side else preprocess.input_size
    settings = rec.anchor_config()
    init = default_init(settings.init, with_data, None if settings.by_budget else settings.mode)
    if rec.reconstruct and not with_data:
        raise UsageError("«reconstruct» matches the original's outputs on calibration images: give «dataset»")
    if init in ("act", "act-seq") and not with_data:
        raise UsageError(f"«init={init}» fits anchors to real inputs: give «dataset» data (or use «init=fit»)")
    # a size target is scored on the training data (kl); a plan by mode needs none
    want = sweep or settings.by_budget or not dry_run
    loaders = loaders_for(size, preprocess) if with_data and want else None  # type: ignore[misc]
    return _Ready(original, spec, size, leaves, settings, with_data, loaders)


@dataclass
class SweepJobResult:
    """The planner's front for one model: a point per size ratio (budget.SweepPoint), and its MACs."""

    source: str
    points: tuple[Any, ...]
    params_before: int
    macs_before: int


def run_sweep_job(
    rec: Recipe,
    ratios: Any,
    *,
    loaders_for: LoadersFor | None = None,
    device: torch.device | None = None,
) -> SweepJobResult:
    """Plan the model ``rec`` names at each size ratio (scored once; with ``rec.dataset``, by kl on its
    training data), nothing converted or written; ``rec``'s MAC target, if any, holds at every ratio."""
    from .core.plan import count_params
    from .core.report import count_macs
    from .pipeline import plan_sweep

    with torch.random.fork_rng(devices=[device] if device is not None and device.type == "cuda" else []):
        torch.manual_seed(rec.seed)
        unsized = rec.override(target_ratio=None, target_params=None, target_bytes=None)  # the sweep sets the sizes
        ready = _prepare(unsized, loaders_for, device, True, sweep=True)
        scored_on = ready.loaders.train if ready.loaders is not None else None
        points = plan_sweep(ready.original, ready.settings, ratios, scored_on, ready.size, ready.leaves)
        return SweepJobResult(
            ready.spec.display, points, count_params(ready.original), count_macs(ready.original, ready.size)
        )
