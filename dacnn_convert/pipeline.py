"""The good path in one call: convert, calibrate BatchNorm, distil, and measure each step.

    teacher ─► plan ─► convert (fit) ─► BN recalibration ─► KD fine-tune ─► report

:func:`compress` is the whole job (the CLI's ``dacnn-convert --dataset`` calls it), and
:func:`anchor` the conversion alone; both use the data-aware fit and recalibrate BatchNorm
whenever they are given data. Accuracy is measured after every step, so a user sees what each
one buys.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from . import validate
from .atomic import atomic_write_text
from .budget import resolve_target, search
from .core.banks import BankSize, BankValue
from .core.convert import convert
from .core.plan import REGULATOR_INITS, Plan, count_params
from .core.planning import InitName, ModeName, RegulatorStyleName, make_plan
from .core.report import ConversionReport, build_report, state_dict_bytes
from .defaults import default_init, default_reconstruct
from .errors import UsageError, choose
from .io.checkpoint import save, stored_overhead
from .train import FitResult, TrainConfig, distill, evaluate, recalibrate_bn
from .train.calibrate import CALIBRATE_BATCHES
from .train.reconstruct import ReconstructConfig, reconstruct_sections

DEFAULT_INPUT_SIZE = (3, 224, 224)


def plan(
    model: nn.Module,
    mode: ModeName = "mix",
    regulators: str | Sequence[int] | None = "none",
    regulator_style: RegulatorStyleName = "adapter",
    init: InitName | None = None,
    input_size: tuple[int, int, int] | None = (3, 224, 224),
    leaf_modules: Sequence[type[nn.Module]] = (),
    *,
    target_params: int | None = None,
    target_ratio: float | None = None,
    target_bytes: int | None = None,
    calib_loader: Iterable | None = None,
    calib_batches: int = 8,
    metric: str | None = None,
    bank_size: BankSize = 0.5,
    factorize_unshared: BankValue | None = None,
    regulator_init: str | None = None,
) -> Plan:
    """Decide what to share: by ``mode``, or — given a target size — by budget search.

    Without a target this is :func:`dacnn_convert.core.planning.make_plan` (see it for the
    arguments). With ``target_params``, ``target_ratio`` (times smaller) or ``target_bytes``
    (fp32), :func:`dacnn_convert.budget.search` picks free / mix / plain / bank per section and
    where regulators go, never exceeding the target; ``mode`` and ``regulators`` are then
    ignored, and ``calib_loader`` makes the search use the ``kl`` sensitivity. ``init`` None
    means ``act`` with ``calib_loader``, else ``fit``; an init given is kept as given.

    Raises:
        UsageError, TraceError, PlanError: as make_plan; PlanError also when nothing fits.
    """
    input_size, regulators = _check_plan_args(model, regulators, input_size, calib_loader, calib_batches, bank_size)
    target_params = validate.optional_size("target-params", target_params)
    target_bytes = validate.optional_size("target-bytes", target_bytes)
    target_ratio = validate.optional_number("target-ratio", target_ratio)
    by_budget = _targeted(target_params, target_ratio, target_bytes)
    init = default_init(init, calib_loader is not None, None if by_budget else mode)
    if not by_budget:
        return make_plan(
            model,
            mode,
            regulators,
            regulator_style,
            init,
            input_size,
            leaf_modules,
            bank_size=bank_size,
            factorize_unshared=factorize_unshared,
            regulator_init=regulator_init,
        )
    overhead = stored_overhead(model) if target_bytes is not None else 0
    target = resolve_target(count_params(model), target_params, target_ratio, target_bytes, overhead_bytes=overhead)
    found = search(
        model, target, input_size, calib_loader, calib_batches, metric, regulator_style, init, leaf_modules
    ).plan
    return (
        found
        if regulator_init is None
        else replace(found, regulator_init=choose("regulator init", regulator_init, REGULATOR_INITS))
    )


_plan = plan  # compress() takes a ``plan`` argument


def _targeted(*targets: Any) -> bool:
    """Is a size target given (the budget planner decides, and the paper's-mode defaults do not apply)?"""
    return any(t is not None for t in targets)


def _check_plan_args(
    model: Any, regulators: Any, input_size: Any, calib_loader: Any, calib_batches: Any, bank_size: Any
) -> tuple[tuple[int, int, int], str | Sequence[int] | None]:
    """The checks plan() and anchor() share, before any work; returns the input size to use (the
    one given, else the calibration images', else the default; the data's first batch is read once)
    and the regulators normalised."""
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
    regulators = validate.regulators(regulators)
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
    validate.integer("calib-batches", calib_batches, 0)
    validate.bank_size(bank_size)
    return input_size or found, regulators


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
    mode: ModeName = "mix",
    regulators: str | Sequence[int] | None = "none",
    regulator_style: RegulatorStyleName = "adapter",
    init: InitName | None = None,
    input_size: tuple[int, int, int] | None = None,
    leaf_modules: Sequence[type[nn.Module]] = (),
    calib_loader: Iterable | None = None,
    calib_batches: int = CALIBRATE_BATCHES,
    *,
    bank_size: BankSize = 0.5,
    factorize_unshared: BankValue | None = None,
    target_params: int | None = None,
    target_ratio: float | None = None,
    target_bytes: int | None = None,
    regulator_init: str | None = None,
    reconstruct: bool | ReconstructConfig | None = None,
) -> nn.Module:
    """Convert ``model`` into a deep anchored CNN in one call: plan, apply, and with data calibrate.

    With ``calib_loader`` the anchors are fitted to the inputs each layer really sees
    (``init="act"``) and the BatchNorm statistics are re-estimated on the same batches, the
    two steps that make the converted model accurate before any training. Without data the
    fit uses the weights alone and the model remembers that its BN statistics are stale, so
    :func:`dacnn_convert.distill` recalibrates it before fine-tuning.

    Args:
        model: any fx-traceable ``nn.Module``; it is left untouched.
        mode: ``mix`` (share per stage and configuration, the paper's mixed DACNN),
            ``plain`` (one network-wide sliced kernel), ``bank`` (the groups of ``mix``
            share k filters, each member keeps a 1x1 coefficient conv), ``sharesnet`` or ``none``.
        regulators: ``none``, ``all`` or 1-based section numbers, e.g. ``"1,3"``.
        regulator_style: ``adapter`` (parallel, function-preserving) or ``paper`` (series).
        init: anchor initialisation: ``fit`` (least squares with scales folded into BN),
            ``act``/``act-seq`` (data-aware, need ``calib_loader``), ``mean``, ``first`` or
            ``random``; None picks ``act`` with data, else ``fit``.
        input_size: (C, H, W) of one example, for shape propagation; None = the shape of
            ``calib_loader``'s images, else 3x224x224.
        leaf_modules: module types fx must not trace into.
        calib_loader: batches of (images, labels), e.g. a ``torch.utils.data.DataLoader``
            over training data.
        calib_batches: how many batches of ``calib_loader`` the fit and the BN step use.
        bank_size: filters per bank for ``mode="bank"``: an integer, a fraction of C_out
            or per section (``"1:1.0,2:0.5,4:0.125"``); see :mod:`dacnn_convert.core.banks`.
        factorize_unshared: rank (integer or fraction of C_out) of a low-rank factorisation
            of every conv that shares with nothing; None keeps them dense.
        target_params, target_ratio, target_bytes: a size target instead of ``mode``: the
            budget planner picks free / mix / plain / filter banks per section (scored on
            ``calib_loader`` when given; see :func:`dacnn_convert.plan`).
        regulator_init: ``fit`` (adapters fitted to each member's residual) or ``zero``; None:
            :data:`dacnn_convert.defaults.REGULATOR_INIT`.
        reconstruct: after the fit and the BN step, train each section on ``calib_loader`` to
            match ``model``'s output of that section (:mod:`dacnn_convert.train.reconstruct`);
            True, False or a :class:`ReconstructConfig`; None: on with data for the paper's modes
            (mix, plain, sharesnet), where it was measured.

    Returns:
        A copy of ``model`` (same class, same names for untouched modules) whose
        anchored convs read shared kernels from ``model.dacnn_anchors``.

    Raises:
        UsageError: an argument is outside its allowed values.
        TraceError, PlanError: the model cannot be traced, run or converted (or nothing fits the target).
    """
    size, regulators = _check_plan_args(model, regulators, input_size, calib_loader, calib_batches, bank_size)
    by_budget = _targeted(target_params, target_ratio, target_bytes)
    init = default_init(init, calib_loader is not None, None if by_budget else mode)
    p = _plan(
        model,
        mode,
        regulators,
        regulator_style,
        init,
        size,
        leaf_modules,
        target_params=target_params,
        target_ratio=target_ratio,
        target_bytes=target_bytes,
        calib_loader=calib_loader,
        bank_size=bank_size,
        factorize_unshared=factorize_unshared,
        regulator_init=regulator_init,
    )
    student = convert(model, p, calib_loader=calib_loader, calib_batches=calib_batches).model
    if calib_loader is not None and calib_batches > 0:
        recalibrate_bn(student, calib_loader, calib_batches)
    # reconstruction trains on the recalibrated statistics: no BN step (calib_batches=0), no default reconstruction
    rebuild = _reconstruct_config(
        reconstruct, calib_loader is not None, None if by_budget else mode, calibrated=calib_batches > 0
    )
    if rebuild is not None:
        reconstruct_sections(student, model, calib_loader, rebuild)  # type: ignore[arg-type]
    return student


DEFAULT_RECONSTRUCT = ReconstructConfig()  # what reconstruct=True or the default runs


def _reconstruct_config(
    reconstruct: bool | ReconstructConfig | None, with_data: bool, mode: str | None, calibrated: bool = True
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
    on = default_reconstruct(None if reconstruct is None else bool(reconstruct), with_data and calibrated, mode)
    if not on:
        return None
    return reconstruct if isinstance(reconstruct, ReconstructConfig) else DEFAULT_RECONSTRUCT


_PLAN_OPTIONS = frozenset(inspect.signature(_plan).parameters) - {"model", "calib_loader", "input_size"}


def compress(
    teacher: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    plan: Plan | None = None,
    *,
    epochs: int | None = None,
    config: TrainConfig | None = None,
    calibrate_batches: int = CALIBRATE_BATCHES,
    out: Path | None = None,
    dtype: str = "fp32",
    source: Any = None,
    on_stage: Callable[[str, float], None] | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    resume: bool = False,
    command: str | None = None,
    reconstruct: bool | ReconstructConfig | None = None,
    **plan_options: Any,
) -> PipelineResult:
    """The whole job: plan, convert with the data-aware fit, recalibrate BN, distil, measure.

        result = compress(teacher, train_loader, val_loader, mode="mix", regulators="all", epochs=1)
        result.model, result.drop, result.report.ratio

    Args:
        teacher: the trained original; left untouched (its train/eval mode is restored).
        train_loader: batches of (images, labels) for the fit, the BN step and the fine-tune.
        val_loader: batches of (images, labels) for the accuracy after each step.
        plan: the conversion plan (:func:`dacnn_convert.plan`); None makes one from
            ``plan_options`` at the data's input size with ``init="act"``.
        epochs: shorthand overriding ``config.epochs``.
        config: fine-tuning settings; None = :meth:`TrainConfig.finetune`.
        calibrate_batches: training batches for the ``act`` anchor fit and to re-estimate
            BN statistics (0 skips the BN step).
        out: where ``model.safetensors``, ``report.json`` and ``report.md`` go (plus the
            fine-tune's checkpoints); None writes nothing.
        dtype: storage dtype of ``model.safetensors`` (``fp32``, ``fp16`` or ``bf16``).
        source: model source recorded in the checkpoint (see :func:`dacnn_convert.save`).
        on_stage: called with (stage name, accuracy) after each measured step.
        on_step, on_epoch: fine-tune progress callbacks (see :func:`dacnn_convert.distill`).
        resume: continue an interrupted fine-tune from ``out/state.pt``.
        command: the command line recorded in ``out/README.md``, the model card.
        reconstruct: section-wise reconstruction after the BN step, as :func:`anchor` takes it
            (None: on for the paper's modes, off for banks and budget plans).
        **plan_options: keywords of :func:`dacnn_convert.plan` when ``plan`` is None (``mode``
            defaults to ``bank``; ``target_ratio=4`` asks the planner for a 4x smaller model).

    Returns:
        :class:`PipelineResult` (the student is ``result.model``).

    Raises:
        UsageError: a plan and plan options together, or an unknown option.
        TraceError, PlanError, NonFiniteLossError: from planning, conversion, fine-tuning.
    """
    unknown = sorted(set(plan_options) - _PLAN_OPTIONS)
    if unknown:
        raise UsageError(
            f"compress() got unknown option(s) {', '.join(unknown)}; plan options are "
            f"{', '.join(sorted(_PLAN_OPTIONS))}"
        )
    if plan is not None and plan_options:
        raise UsageError(f"give either plan= or plan options ({', '.join(sorted(plan_options))}), not both")
    validate.module("teacher", teacher)
    validate.loader("train-loader", train_loader)
    validate.loader("val-loader", val_loader)
    out = validate.output_folder("out", out)
    if plan is not None and not isinstance(plan, Plan):
        raise UsageError(f"«plan» must be a Plan from dacnn_convert.plan(), got {type(plan).__name__}")
    if config is not None and not isinstance(config, TrainConfig):
        raise UsageError(f"«config» must be a TrainConfig, got {type(config).__name__}")
    validate.integer("calibrate-batches", calibrate_batches, 0)
    if epochs is not None:
        validate.integer("epochs", epochs, 1)
    from .io.checkpoint import STORAGE_DTYPES

    choose("dtype", dtype, STORAGE_DTYPES)
    cfg = config or TrainConfig.finetune()
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

    calib = max(calibrate_batches, 1)
    if plan is None:
        options = {"mode": "bank", **plan_options}
        targeted = _targeted(*(options.get(k) for k in ("target_params", "target_ratio", "target_bytes")))
        options["init"] = default_init(options.get("init"), True, None if targeted else options["mode"])
        plan = timed(
            "plan",
            lambda: _plan(
                teacher,
                input_size=input_size_of(train_loader),
                calib_loader=train_loader if targeted else None,
                **options,
            ),
        )
    teacher_acc = timed("eval_teacher", lambda: evaluate(teacher, val_loader, cfg.precision, limit))
    notify("teacher", teacher_acc)
    conversion = timed("convert", lambda: convert(teacher, plan, calib_loader=train_loader, calib_batches=calib))
    student = conversion.model
    converted_acc = timed("eval_converted", lambda: evaluate(student, val_loader, cfg.precision, limit))
    notify("converted", converted_acc)
    if calibrate_batches > 0:
        timed("calibrate", lambda: recalibrate_bn(student, train_loader, calibrate_batches))
    calibrated_acc = timed("eval_calibrated", lambda: evaluate(student, val_loader, cfg.precision, limit))
    notify("calibrated", calibrated_acc)
    rebuild = _reconstruct_config(reconstruct, True, plan.mode, calibrated=calibrate_batches > 0)
    reconstructed_acc = None
    resuming = resume and out is not None and (out / "state.pt").is_file()
    if rebuild is not None and not resuming:  # a resumed fine-tune starts from its own checkpoint
        timed("reconstruct", lambda: reconstruct_sections(student, teacher, train_loader, rebuild))
        reconstructed_acc = timed("eval_reconstructed", lambda: evaluate(student, val_loader, cfg.precision, limit))
        notify("reconstructed", reconstructed_acc)
    fit = timed(
        "finetune",
        lambda: distill(
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
            calibrate_batches=0,
        ),
    )
    finetuned_acc = fit.final_acc
    notify("finetuned", finetuned_acc)
    from .train.distributed import is_main

    main = out is not None and is_main()
    ckpt = save(student, out / "model.safetensors", source=source, dtype=dtype) if main else None
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
    if main:
        from .io.card import model_card

        atomic_write_text(out / "report.json", json.dumps(result.to_dict(), indent=2))
        atomic_write_text(out / "report.md", result.to_markdown())
        steps_acc = {
            "original": teacher_acc,
            "right after conversion": converted_acc,
            "after BN recalibration": calibrated_acc,
            **({"after reconstruction": reconstructed_acc} if reconstructed_acc is not None else {}),
            "after KD fine-tune": finetuned_acc,
        }
        dataset = getattr(train_loader, "name", None) or getattr(getattr(train_loader, "dataset", None), "name", None)
        atomic_write_text(out / "README.md", model_card(report, command, steps_acc, dataset))
    return result
