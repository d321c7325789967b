"""The good path in one call: convert, calibrate BatchNorm, distil, and measure each step.

    teacher ─► plan ─► convert (fit) ─► BN recalibration ─► KD fine-tune ─► report

:func:`compress` is the whole job (the CLI's ``dacnn-convert --dataset`` calls it), and
:func:`anchor` the conversion alone; both use the data-aware fit and recalibrate BatchNorm
whenever they are given data. Accuracy is measured after every step, so a user sees what each
one buys.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from . import validate
from .atomic import atomic_write_text
from .budget import SWEEP_RATIOS, BudgetResult, SweepPoint, resolve_target, search, sweep
from .config import LEGACY_ANCHOR, AnchorConfig, resolve_config
from .core.convert import convert
from .core.plan import Plan, count_params
from .core.planning import make_plan
from .core.report import ConversionReport, build_report, state_dict_bytes
from .defaults import CALIB_BATCHES, DEFAULT_INPUT_SIZE, default_init, default_reconstruct
from .errors import UsageError, choose, deprecated
from .io.checkpoint import save, stored_overhead
from .prune_search import PRUNE_GRID, PrunedModels, absolute_macs, meets, search_pruned, with_pruning
from .train import FitResult, TrainConfig, distill, evaluate, recalibrate_bn
from .train.reconstruct import ReconstructConfig, reconstruct_sections


def plan(
    model: nn.Module,
    config: AnchorConfig | None = None,
    *legacy: Any,
    calib_loader: Iterable | None = None,
    input_size: tuple[int, int, int] | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    **shorthands: Any,
) -> Plan:
    """Decide what to share: by ``config.mode``, or — given a size target — by the budget planner.

        plan(model, AnchorConfig(mode="mix", regulators="all"))
        plan(model, mode="mix", regulators="all")                    # the same, keyword shorthands
        plan(model, target_ratio=4, calib_loader=loader)             # the planner, scored on data

    Without a target this is :func:`dacnn_convert.core.planning.make_plan`. With ``target_params``,
    ``target_ratio`` (times smaller) or ``target_bytes`` (fp32), :func:`dacnn_convert.budget.search` picks
    free / mix / plain / banks / low rank per section, never exceeding the target; ``mode`` and
    ``regulators`` are then not used, and ``calib_loader`` makes the search score candidates by ``kl``
    on ``config.score_batches`` batches. ``init`` None means ``act`` with ``calib_loader`` (``act-seq``
    for the paper's modes), else ``fit``; an init given is kept as given.

    Args:
        model: any fx-traceable ``nn.Module``; left untouched.
        config: the :class:`AnchorConfig`; None: its defaults. Keyword ``shorthands`` (its field names)
            override it.
        calib_loader: batches of (images, labels) the planner scores on and the plan's input size is read from.
        input_size: (C, H, W) of one example; None: the calibration images', else 3x224x224.
        leaf_modules: module types fx must not trace into.

    Raises:
        UsageError, TraceError, PlanError: as make_plan; PlanError also when nothing fits.
    """
    if "calib_batches" in shorthands:  # 0.1.0: plan()'s scoring batches had the fit's name
        deprecated("plan(calib_batches=)", "the planner's batches are AnchorConfig.score_batches (score_batches=)")
        shorthands["score_batches"] = shorthands.pop("calib_batches")
    call: dict[str, Any] = {"input_size": input_size, "leaf_modules": leaf_modules}
    cfg = resolve_config("plan", config, legacy, shorthands, call, defaults={"input_size": None, "leaf_modules": ()})
    return plan_search(model, cfg, calib_loader, call["input_size"], call["leaf_modules"])[0]


def plan_search(
    model: nn.Module,
    config: AnchorConfig,
    calib_loader: Iterable | None = None,
    input_size: tuple[int, int, int] | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    with_data: bool | None = None,
) -> tuple[Plan, BudgetResult | None]:
    """The plan ``config`` asks for and, for a size target, the search that found it (every caller —
    plan(), anchor(), compress(), the CLI's jobs — plans through here). ``with_data`` (default: whether
    ``calib_loader`` is given) is whether the conversion that follows fits to data, which picks the
    default init."""
    input_size = _check_plan_args(model, input_size, calib_loader)
    with_data = calib_loader is not None if with_data is None else with_data
    init = default_init(config.init, with_data, None if config.by_budget else config.mode)
    leaves = validate.leaf_modules(leaf_modules)
    # the planner compensates its pruned copies (core.pruning.compensate) where the conversion will: with data,
    # for a data-aware init; a plan by mode needs the pruned shapes alone
    fitted = config.by_budget and init in ("act", "act-seq")
    pruned = PrunedModels(
        model, input_size, config.prune_importance, calib_loader if fitted else None, config.score_batches, leaves
    )
    if not config.by_budget:
        ratio = config.prune if isinstance(config.prune, float) else 0.0
        narrow, pruning = pruned.at(ratio)
        made = make_plan(
            narrow,
            config.mode,  # type: ignore[arg-type]  # checked by AnchorConfig
            config.regulators,
            config.regulator_style,  # type: ignore[arg-type]
            init,  # type: ignore[arg-type]
            input_size,
            leaves,
            bank_size=config.bank_size,
            factorize_unshared=config.factorize_unshared,
            share=config.share,
            regulator_init=config.regulator_init,
        )
        return with_pruning(made, pruning, count_params(model)), None
    overhead = stored_overhead(model) if config.target_bytes is not None else 0
    target = (
        resolve_target(
            count_params(model), config.target_params, config.target_ratio, config.target_bytes, overhead_bytes=overhead
        )
        if config.by_size
        else None
    )
    ratios = (0.0,) if config.prune is None else PRUNE_GRID if config.prune == "auto" else (float(config.prune),)

    def search_at(target_macs: int | str | None) -> BudgetResult:
        if ratios != (0.0,):  # a pruned model's own MACs are not the original's: «4x» counts from the original
            target_macs = absolute_macs(model, input_size, target_macs)

        def at(narrow: nn.Module, reuse: dict[str, Any], final: bool = True) -> BudgetResult:
            return search(
                narrow,
                target,
                input_size,
                calib_loader,
                config.score_batches,
                config.metric,
                config.regulator_style,
                init,
                leaves,
                rescore_rounds=config.rescore_rounds if final else 0,
                target_macs=target_macs,
                reuse=reuse,  # a latency target searches several MAC budgets on one scoring
                across=config.share_across and final,
            )

        if ratios == (0.0,):
            return at(model, pruned.reuse.setdefault((0.0, ()), {}))
        metric = config.metric or ("kl" if calib_loader is not None else "fit")
        fits = meets(target, target_macs, input_size) if config.prune == "auto" else None  # type: ignore[arg-type]
        # per-section pruning removes what the targets ask for most: MACs where a MAC target is set
        per_section = ("macs" if target_macs is not None else "params") if config.prune == "auto" else None
        return search_pruned(pruned, ratios, at, calib_loader, config.score_batches, metric, fits, per_section)

    if config.target_latency is None:
        found = search_at(config.target_macs)
    else:
        from .latency_target import plan_for_latency

        found = plan_for_latency(
            model, search_at, config.target_latency, input_size, config.latency_batch, config.target_macs
        )
    if config.regulator_init is not None:
        found = replace(found, plan=replace(found.plan, regulator_init=config.regulator_init))
    return found.plan, found


def plan_sweep(
    model: nn.Module,
    config: AnchorConfig,
    ratios: Sequence[float] | None = None,
    calib_loader: Iterable | None = None,
    input_size: tuple[int, int, int] | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
) -> tuple[SweepPoint, ...]:
    """The planner's front for ``model`` (:func:`dacnn_convert.budget.sweep`): the plan it picks at each size
    ratio (default :data:`~dacnn_convert.budget.SWEEP_RATIOS`), with ``config``'s metric, scoring batches,
    regulator style, init and MAC target; ``config``'s own size target is not used."""
    input_size = _check_plan_args(model, input_size, calib_loader)
    if config.prune is not None:
        raise UsageError(
            "the planner's front is made without pruning: leave out «prune» for the sweep, or plan each target "
            "with it («target-ratio» with «prune»)"
        )
    if config.share:
        raise UsageError(
            "the planner's front picks its own groups: leave out «share» for the sweep (it names banks for a plan by "
            "«mode»)"
        )
    if config.share_across:
        raise UsageError(
            "the planner's front is predicted from its additive scores, within stages: leave out «share-across» "
            "for the sweep, or plan each target with it («target-ratio» with «share-across»)"
        )
    init = default_init(config.init, calib_loader is not None, None)
    return sweep(
        model,
        SWEEP_RATIOS if ratios is None else tuple(ratios),
        input_size,
        calib_loader,
        config.score_batches,
        config.metric,
        config.regulator_style,
        init,
        validate.leaf_modules(leaf_modules),
        config.target_macs,
    )


def measured_latency(found: BudgetResult | None) -> tuple[float, float, int] | None:
    """(original ms, plan's ms, batch) when the search timed its plan for a latency target, else None."""
    if found is None or found.latency_ms is None or found.latency_before_ms is None:
        return None
    return found.latency_before_ms, found.latency_ms, found.latency_batch


def _targeted(*targets: Any) -> bool:
    """Is a size target given (the budget planner decides, and the paper's-mode defaults do not apply)?"""
    return any(t is not None for t in targets)


def _check_plan_args(model: Any, input_size: Any, calib_loader: Any) -> tuple[int, int, int]:
    """The checks of the model and the data every plan makes before any work; returns the input size
    to use (the one given, else the calibration images', else the default; the data's first batch is
    read once)."""
    validate.module("model", model)
    if any(p.is_meta for p in model.parameters()):
        raise UsageError(
            "the model's parameters are on the meta device (shapes without values): materialise it first, "
            "e.g. model.to_empty(device='cpu') and load its weights"
        )
    kinds = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()})
    if kinds and kinds != ["float32"]:
        raise UsageError(
            f"the model's parameters are {', '.join(kinds)}: planning fits kernels in float32, so convert a float32 "
            "model (model.float()) and keep bf16 for storage (save(..., dtype='bf16')) or autocast for inference"
        )
    if input_size is not None:
        input_size = validate.input_size(input_size)
    found = input_size_of(None)
    if calib_loader is not None:
        validate.loader("calib-loader", calib_loader)  # re-iterable: the probe below reads no batch away
        found = input_size_of(calib_loader)  # refuses an empty loader and batches that are not images
        if input_size is not None and found[0] != input_size[0]:
            raise UsageError(
                f"the calibration images have {found[0]} channel(s) ({tuple(found)}) but «input-size» "
                f"{tuple(input_size)} has {input_size[0]}: give data the model takes (e.g. grayscale repeated "
                "to 3 channels)"
            )
    return input_size or found


@dataclass
class PipelineResult:
    """The student, accuracies (fractions) after each step, the conversion report and the fine-tune history."""

    model: nn.Module
    teacher_acc: float
    converted_acc: float
    calibrated_acc: float
    finetuned_acc: float
    report: ConversionReport
    fit: FitResult | None
    wall_s: float
    checkpoint: Path | None = None
    steps: dict[str, float] = field(default_factory=dict)
    reconstructed_acc: float | None = None  # after section-wise reconstruction, when it ran

    @property
    def drop(self) -> float:
        """Teacher accuracy minus the final student accuracy, in fraction points."""
        return self.teacher_acc - self.finetuned_acc

    def to_dict(self) -> dict[str, Any]:
        return {
            "teacher_acc": self.teacher_acc,
            "converted_acc": self.converted_acc,
            "calibrated_acc": self.calibrated_acc,
            "reconstructed_acc": self.reconstructed_acc,
            "finetuned_acc": self.finetuned_acc,
            "drop": self.drop,
            "wall_s": self.wall_s,
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "step_seconds": self.steps,
            "conversion": self.report.to_dict(),
            "finetune": self.fit.to_dict() if self.fit else None,
        }

    def to_markdown(self) -> str:
        pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
        lines = [
            self.report.to_markdown(),
            "## Accuracy",
            "",
            "| step | accuracy |",
            "|---|---:|",
            f"| teacher | {pct(self.teacher_acc)} |",
            f"| right after conversion | {pct(self.converted_acc)} |",
            f"| after BN recalibration | {pct(self.calibrated_acc)} |",
            *(
                [f"| after reconstruction | {pct(self.reconstructed_acc)} |"]
                if self.reconstructed_acc is not None
                else []
            ),
            f"| after KD fine-tune | {pct(self.finetuned_acc)} |",
            f"| drop vs teacher | {100 * self.drop:.2f} points |",
            "",
            f"Wall time {self.wall_s:.0f} s.",
        ]
        return "\n".join(lines) + "\n"


def input_size_of(batches: Iterable | None, default: tuple[int, int, int] = DEFAULT_INPUT_SIZE) -> tuple[int, int, int]:
    """(C, H, W) of the first batch of ``batches`` (images or (images, labels)); ``default`` without data."""
    if batches is None:
        return default
    batch = next(iter(batches), None)
    if batch is None:
        raise UsageError("«calib-loader» yielded no batches: give at least one batch of images")
    x = validate.inputs_of(batch)
    if x.dim() != 4:
        raise UsageError(f"calibration batches must hold images of shape (N, C, H, W), got {tuple(x.shape)}")
    return tuple(x.shape[1:])  # type: ignore[return-value]


def anchor(
    model: nn.Module,
    config: AnchorConfig | None = None,
    *legacy: Any,
    calib_loader: Iterable | None = None,
    calib_batches: int = CALIB_BATCHES,
    input_size: tuple[int, int, int] | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    reconstruct: bool | ReconstructConfig | None = None,
    **shorthands: Any,
) -> nn.Module:
    """Convert ``model`` into a deep anchored CNN in one call: plan, apply, and with data calibrate.

        student = anchor(model)                                          # mix, fitted to the weights
        student = anchor(model, mode="mix", regulators="all", calib_loader=loader)
        student = anchor(model, AnchorConfig(target_ratio=4), calib_loader=loader)

    With ``calib_loader`` the anchors are fitted to the inputs each layer really sees
    (``init="act"``, ``act-seq`` for the paper's modes) and the BatchNorm statistics are
    re-estimated on the same batches, the two steps that make the converted model accurate before
    any training. Without data the fit uses the weights alone and the model remembers that its BN
    statistics are stale, so :func:`dacnn_convert.distill` recalibrates it before fine-tuning.

    Args:
        model: any fx-traceable ``nn.Module``; it is left untouched.
        config: what to share and how small (:class:`AnchorConfig`: mode, regulators, banks, low
            rank, a size target...); None: its defaults (``mix``). Keyword ``shorthands`` (the
            config's field names, e.g. ``mode="bank", bank_size=0.25``) override it.
        calib_loader: batches of (images, labels), e.g. a ``torch.utils.data.DataLoader``
            over training data.
        calib_batches: how many batches of ``calib_loader`` the fit and the BN step use
            (:data:`dacnn_convert.defaults.CALIB_BATCHES`).
        input_size: (C, H, W) of one example, for shape propagation; None = the shape of
            ``calib_loader``'s images, else 3x224x224.
        leaf_modules: module types fx must not trace into.
        reconstruct: after the fit and the BN step, train each section on ``calib_loader`` to
            match ``model``'s output of that section (:mod:`dacnn_convert.train.reconstruct`);
            True, False or a :class:`ReconstructConfig`; None: on with data for every plan that
            shares something (:func:`dacnn_convert.defaults.default_reconstruct` has the measurements).

    Returns:
        A copy of ``model`` (same class, same names for untouched modules) whose
        anchored convs read shared kernels from ``model.dacnn_anchors``.

    Raises:
        UsageError: an argument is outside its allowed values.
        TraceError, PlanError: the model cannot be traced, run or converted (or nothing fits the target).
    """
    call: dict[str, Any] = {
        "input_size": input_size,
        "leaf_modules": leaf_modules,
        "calib_loader": calib_loader,
        "calib_batches": calib_batches,
    }
    unset = {"input_size": None, "leaf_modules": (), "calib_loader": None, "calib_batches": CALIB_BATCHES}
    cfg = resolve_config("anchor", config, legacy, shorthands, call, LEGACY_ANCHOR, unset)
    calib_loader, calib_batches = call["calib_loader"], call["calib_batches"]
    validate.integer("calib-batches", calib_batches, 0)
    p, _ = plan_search(model, cfg, calib_loader, call["input_size"], call["leaf_modules"])
    student = convert(model, p, calib_loader=calib_loader, calib_batches=calib_batches).model
    if calib_loader is not None and calib_batches > 0:
        recalibrate_bn(student, calib_loader, calib_batches)
    # reconstruction trains on the recalibrated statistics: no BN step (calib_batches=0), no default reconstruction
    rebuild = _reconstruct_config(
        reconstruct, calib_loader is not None, p.mode, calibrated=calib_batches > 0, prunes=p.prune is not None
    )
    if rebuild is not None:
        reconstruct_sections(student, model, calib_loader, rebuild)
    return student


DEFAULT_RECONSTRUCT = ReconstructConfig()  # what reconstruct=True or the default runs


def _reconstruct_config(
    reconstruct: bool | ReconstructConfig | None,
    with_data: bool,
    mode: str | None,
    calibrated: bool = True,
    prunes: bool = False,
) -> ReconstructConfig | None:
    """The reconstruction to run, or None; refuses one asked for without data or without the BN step."""
    if reconstruct is not None and not isinstance(reconstruct, bool | ReconstructConfig):
        raise UsageError(f"«reconstruct» must be True, False or a ReconstructConfig, got {reconstruct!r:.60}")
    if reconstruct and not with_data:
        raise UsageError("reconstruction matches the original's outputs on calibration images: give «calib-loader»")
    if reconstruct and not calibrated:
        raise UsageError(
            "reconstruction trains on recalibrated BatchNorm statistics: "
            "give «calib-batches» above 0 or turn «reconstruct» off"
        )
    on = default_reconstruct(None if reconstruct is None else bool(reconstruct), with_data and calibrated, mode, prunes)
    if not on:
        return None
    return reconstruct if isinstance(reconstruct, ReconstructConfig) else DEFAULT_RECONSTRUCT


@dataclass
class Measured:
    """Accuracies (fractions) after each step that follows a conversion, each step's seconds, and the final
    model (the student itself, or what ``finalize`` made of it)."""

    model: nn.Module
    converted: float
    calibrated: float
    reconstructed: float | None
    finetuned: float
    fit: FitResult | None
    seconds: dict[str, float]


def after_conversion(
    student: nn.Module,
    teacher: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    train: TrainConfig,
    *,
    calib_batches: int,
    reconstruct: ReconstructConfig | None,
    fine_tune: Callable[[], FitResult],
    finalize: Callable[[nn.Module], nn.Module] | None = None,
    on_stage: Callable[[str, float], None] | None = None,
) -> Measured:
    """The measured steps after a conversion, the same for :func:`compress` and ``dacnn bench``: accuracy,
    BN recalibration on ``calib_batches`` (0: none), accuracy, section-wise reconstruction (when given), accuracy,
    ``fine_tune()`` (a :func:`distill` call), then, for a method that finishes its model after training (a
    pruning mask made permanent), ``finalize`` and the final accuracy measured on the result; otherwise the
    fine-tune's own final accuracy. ``on_stage(name, accuracy)`` hears each step as it ends, so a caller keeps
    what was measured when a later step fails."""
    seconds: dict[str, float] = {}
    notify = on_stage or (lambda name, acc: None)
    precision, limit = train.precision, train.limit_batches

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        value = fn()
        seconds[name] = time.perf_counter() - t
        return value

    def measure(stage: str) -> float:
        acc = timed(f"eval_{stage}", lambda: evaluate(student, val_loader, precision, limit))
        notify(stage, acc)
        return float(acc)

    converted = measure("converted")
    if calib_batches > 0:
        timed("calibrate", lambda: recalibrate_bn(student, train_loader, calib_batches))
    calibrated = measure("calibrated")
    reconstructed = None
    if reconstruct is not None:
        timed("reconstruct", lambda: reconstruct_sections(student, teacher, train_loader, reconstruct))
        reconstructed = measure("reconstructed")
    fit = timed("finetune", fine_tune)
    final = student
    if finalize is None:
        finetuned = fit.final_acc
    else:
        final = timed("finalize", lambda: finalize(student))
        finetuned = timed("eval_finetuned", lambda: evaluate(final, val_loader, precision, limit))
    notify("finetuned", finetuned)
    return Measured(final, converted, calibrated, reconstructed, finetuned, fit, seconds)


def compress(
    teacher: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    config: AnchorConfig | Plan | None = None,
    *,
    train: TrainConfig | None = None,
    epochs: int | None = None,
    calib_batches: int = CALIB_BATCHES,
    out: Path | None = None,
    dtype: str = "fp32",
    source: Any = None,
    on_stage: Callable[[str, float], None] | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    resume: bool = False,
    command: str | None = None,
    reconstruct: bool | ReconstructConfig | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    **shorthands: Any,
) -> PipelineResult:
    """The whole job: plan, convert with the data-aware fit, recalibrate BN, distil, measure.

        result = compress(teacher, train_loader, val_loader, mode="mix", regulators="all", epochs=1)
        result = compress(teacher, train_loader, val_loader, AnchorConfig(target_ratio=4), train=TrainConfig.finetune())
        result.model, result.drop, result.report.ratio

    Args:
        teacher: the trained original; left untouched (its train/eval mode is restored).
        train_loader: batches of (images, labels) for the fit, the BN step and the fine-tune.
        val_loader: batches of (images, labels) for the accuracy after each step.
        config: what to share (:class:`AnchorConfig`; keyword ``shorthands`` override it), or a
            :class:`Plan` made by :func:`dacnn_convert.plan`; None: AnchorConfig's defaults. The plan is
            made at the data's input size, and a size target is scored on ``train_loader``.
        train: fine-tuning settings; None = :meth:`TrainConfig.finetune`.
        epochs: shorthand overriding ``train.epochs``.
        calib_batches: training batches for the data-aware anchor fit and to re-estimate BN
            statistics (0 skips the BN step).
        out: where ``model.safetensors``, ``report.json`` and ``report.md`` go (plus the
            fine-tune's checkpoints); None writes nothing.
        dtype: storage dtype of ``model.safetensors`` (``fp32``, ``fp16`` or ``bf16``).
        source: model source recorded in the checkpoint (see :func:`dacnn_convert.save`).
        on_stage: called with (stage name, accuracy) after each measured step.
        on_step, on_epoch: fine-tune progress callbacks (see :func:`dacnn_convert.distill`).
        resume: continue an interrupted fine-tune from ``out/state.pt``.
        command: the command line recorded in ``out/README.md``, the model card.
        reconstruct: section-wise reconstruction after the BN step, as :func:`anchor` takes it
            (None: on, as with data :func:`anchor` does).
        leaf_modules: module types fx must not trace into (when the plan is made here).

    Returns:
        :class:`PipelineResult` (the student is ``result.model``).

    Raises:
        UsageError: a plan and settings together, or an unknown setting.
        TraceError, PlanError, NonFiniteLossError: from planning, conversion, fine-tuning.
    """
    # 0.1.0 names, kept for one release: config=TrainConfig (now train=), plan= (now the config argument),
    # calibrate_batches= (now calib_batches=). (0.1.0's compress(t, tr, va, plan, config=TrainConfig(...)) cannot
    # be caught: Python refuses it before this body runs, "multiple values for argument 'config'".)
    if isinstance(config, TrainConfig):
        deprecated("compress(config=TrainConfig(...))", "write compress(..., train=TrainConfig(...))")
        if train is not None:
            raise UsageError("give the fine-tune settings once: train=TrainConfig(...)")
        config, train = None, config
    if "plan" in shorthands:
        deprecated("compress(plan=)", "pass the Plan as the config argument: compress(teacher, train, val, plan)")
        if config is not None:
            raise UsageError("give the plan once: as compress()'s fourth argument, not also as plan=")
        config = shorthands.pop("plan")
    if isinstance(config, str):  # never a 0.1.0 spelling here: compress took no positional mode
        raise UsageError(
            f"compress()'s fourth argument is an AnchorConfig or a Plan, got the text {config!r}: "
            f"write mode={config!r} (or AnchorConfig(mode={config!r}))"
        )
    if "calibrate_batches" in shorthands:
        deprecated("compress(calibrate_batches=)", "write calib_batches=")
        calib_batches = shorthands.pop("calibrate_batches")
    if isinstance(config, Plan):
        if shorthands:
            raise UsageError(
                f"give either a Plan or settings ({', '.join(sorted(shorthands))}), not both: "
                "a Plan already decides what to share"
            )
        plan_given: Plan | None = config
        settings = None
    else:
        plan_given = None
        settings = resolve_config("compress", config, (), shorthands, {})
    validate.module("teacher", teacher)
    validate.loader("train-loader", train_loader)
    validate.loader("val-loader", val_loader)
    out = validate.output_folder("out", out)
    if train is not None and not isinstance(train, TrainConfig):
        raise UsageError(f"«train» must be a TrainConfig, got {type(train).__name__}")
    validate.integer("calib-batches", calib_batches, 0)
    if epochs is not None:
        validate.integer("epochs", epochs, 1)
    from .io.checkpoint import STORAGE_DTYPES

    choose("dtype", dtype, STORAGE_DTYPES)
    cfg = train or TrainConfig.finetune()
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    start = time.perf_counter()
    steps: dict[str, float] = {}
    notify = on_stage or (lambda name, acc: None)
    limit = cfg.limit_batches

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        value = fn()
        steps[name] = time.perf_counter() - t
        return value

    calib = max(calib_batches, 1)
    found: BudgetResult | None = None
    prunes = plan_given.prune is not None if plan_given is not None else settings is not None and settings.prune
    if prunes and cfg.feature_weight > 0:  # refused before any search runs
        raise UsageError(
            "the plan prunes channels first, so its stage outputs are narrower than the teacher's and cannot be "
            "matched channel by channel: distil the logits alone (--feature-loss none, TrainConfig(feature_weight=0)), "
            "or plan without «prune»"
        )
    if plan_given is None:
        assert settings is not None
        plan, found = timed(
            "plan",
            lambda: plan_search(
                teacher,
                settings,
                train_loader if settings.by_budget else None,  # only a size target scores on data
                input_size_of(train_loader),
                leaf_modules,
                with_data=True,
            ),
        )
    else:
        plan = plan_given
    teacher_acc = timed("eval_teacher", lambda: evaluate(teacher, val_loader, cfg.precision, limit))
    notify("teacher", teacher_acc)
    conversion = timed("convert", lambda: convert(teacher, plan, calib_loader=train_loader, calib_batches=calib))
    student = conversion.model
    rebuild = _reconstruct_config(
        reconstruct, True, plan.mode, calibrated=calib_batches > 0, prunes=plan.prune is not None
    )
    resuming = resume and out is not None and (out / "state.pt").is_file()
    measured = after_conversion(
        student,
        teacher,
        train_loader,
        val_loader,
        cfg,
        calib_batches=calib_batches,
        reconstruct=None if resuming else rebuild,  # a resumed fine-tune starts from its own checkpoint
        on_stage=on_stage,
        fine_tune=lambda: distill(
            student,
            teacher,
            train_loader,
            val_loader,
            config=cfg,
            out=out,
            on_step=on_step,
            on_epoch=on_epoch,
            source=source,
            resume=resume,
            feature_layers=plan.stage_outputs(),
            calib_batches=0,
        ),
    )
    steps.update(measured.seconds)
    converted_acc, calibrated_acc = measured.converted, measured.calibrated
    reconstructed_acc, finetuned_acc, fit = measured.reconstructed, measured.finetuned, measured.fit
    from .train.distributed import is_main

    written = out if is_main() else None  # the folder this process writes to (one process under torchrun)
    ckpt = save(student, written / "model.safetensors", source=source, dtype=dtype) if written else None
    report = build_report(
        teacher,
        conversion,
        getattr(source, "display", str(source)),
        state_dict_bytes(teacher),
        ckpt.stat().st_size if ckpt else state_dict_bytes(student),
    )
    result = PipelineResult(
        student,
        teacher_acc,
        converted_acc,
        calibrated_acc,
        finetuned_acc,
        report,
        fit,
        time.perf_counter() - start,
        ckpt,
        steps,
        reconstructed_acc,
    )
    if written is not None:
        from .io.card import model_card

        atomic_write_text(written / "report.json", json.dumps(result.to_dict(), indent=2))
        atomic_write_text(written / "report.md", result.to_markdown())
        steps_acc = {
            "original": teacher_acc,
            "right after conversion": converted_acc,
            "after BN recalibration": calibrated_acc,
            **({"after reconstruction": reconstructed_acc} if reconstructed_acc is not None else {}),
            "after KD fine-tune": finetuned_acc,
        }
        dataset = getattr(train_loader, "name", None) or getattr(getattr(train_loader, "dataset", None), "name", None)
        card = model_card(report, command, steps_acc, dataset, latency=measured_latency(found))
        atomic_write_text(written / "README.md", card)
    return result
