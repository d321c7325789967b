"""The training loop: train a reference teacher, or distil the teacher into the anchored student.

The library never prints: progress goes to an optional ``on_step``/``on_epoch`` callback
that the CLI renders with rich. Checkpoints are written atomically (temp file + rename).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import validate
from ..errors import TrainingInterrupted, UsageError, deprecated, suggest
from ..validate import class_indices, labelled
from .calibrate import CALIB_BATCHES, needs_bn_calibration, recalibrate_bn
from .config import FitResult, TrainConfig
from .device import device_of
from .evaluation import evaluate, to_device
from .interrupts import Interrupts
from .losses import FeatureTaps, feature_mse, kd_loss
from .precision import autocast, resolve_precision
from .state import (
    NonFiniteLossError,
    ResumeError,
    append_csv,
    data_signature,
    resume_state,
    save_state,
    tensorboard_writer,
)


def _optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "step" and cfg.step_every:
        return 0.1 ** ((step * cfg.epochs // max(total, 1)) // cfg.step_every)  # x0.1 every step_every epochs
    if cfg.schedule == "step":
        return 0.1 if step >= total // 2 else 1.0
    progress = (step - cfg.warmup_steps) / max(total - cfg.warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _channels_last(model: nn.Module) -> bool:
    """Are ``model``'s 4-d weights stored channels_last (NHWC)?"""
    w = next((p for p in model.parameters() if p.dim() == 4), None)
    return w is not None and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _fit(
    model: nn.Module,
    step_loss: StepFn,
    train_batches: Any,
    val_batches: Iterable,
    cfg: TrainConfig,
    *args: Any,
    **kwargs: Any,
) -> FitResult:
    """The loop under ``cfg.seed`` in a forked RNG: the caller's random state is the same afterwards."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        return _fit_seeded(model, step_loss, train_batches, val_batches, cfg, *args, **kwargs)


def _fit_seeded(
    model: nn.Module,
    step_loss: StepFn,
    train_batches: Any,
    val_batches: Iterable,
    cfg: TrainConfig,
    out: Path | None,
    on_step: Callable[[dict[str, float]], None] | None,
    on_epoch: Callable[[dict[str, float]], None] | None,
    source: Any = None,
    resume: bool = False,
) -> FitResult:
    from ..io.checkpoint import save
    from .distributed import all_sum, is_main, world_size

    if out is not None and is_main():
        out.mkdir(parents=True, exist_ok=True)  # a library caller's folder need not exist yet
    device = next(model.parameters()).device
    precision = resolve_precision(cfg.precision, device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    net: nn.Module = model
    if world_size() > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(params, cfg)
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    per_epoch = len(train_batches) if cfg.limit_batches is None else min(cfg.limit_batches, len(train_batches))
    total_steps = per_epoch * cfg.epochs
    result = FitResult(precision=precision)
    state_path = out / "state.pt" if out is not None else None
    first_epoch, skip, step = 0, 0, 0
    if resume and state_path is not None and state_path.exists() and not state_path.is_file():
        raise ResumeError(f"cannot resume from {state_path}: it is not a file; to start over instead, use «overwrite»")
    if resume and state_path is not None and state_path.is_file():
        state = resume_state(state_path, device, model, opt, per_epoch, cfg, data_signature(train_batches))
        gone = [n for n in ("best.safetensors", "last.safetensors") if out is not None and not (out / n).is_file()]
        if state["epoch"] >= cfg.epochs and gone:  # a finished run resumes to its result: it must still be there
            raise ResumeError(
                f"the run in {out} has finished its {state['epoch']} epoch(s) but {', '.join(gone)} "
                f"{'is' if len(gone) == 1 else 'are'} gone: give more «epochs» to train it on, or «overwrite» to "
                "start again"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"].cpu())
        if state.get("cuda_rng") is not None and device.type == "cuda":  # this process's GPU only
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        first_epoch, skip, step = state["epoch"], state["batch"], state["step"]
        result.history, result.best_acc = state["history"], state["best_acc"]
    board = tensorboard_writer(out) if out is not None and is_main() else None
    start = time.perf_counter()
    seen = 0
    last_good: Path | None = state_path if state_path is not None and state_path.is_file() else None

    def checkpoint(epoch: int, batch: int) -> None:
        nonlocal last_good
        if state_path is None or not is_main():
            return
        last_good = save_state(
            state_path,
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "steps_per_epoch": per_epoch,
                "optimizer_name": cfg.optimizer,
                "data": data_signature(train_batches),
                "epoch": epoch,
                "batch": batch,
                "step": step,
                "history": result.history,
                "best_acc": result.best_acc,
            },
        )

    def interrupted(epoch: int, at_step: int) -> TrainingInterrupted:
        where = (
            f"checkpoint saved to {state_path}; run it again with «resume» to continue"
            if (state_path is not None)
            else "nothing saved (no output folder)"
        )
        by = signal.Signals(interrupts.signum).name if interrupts.signum else "SIGINT"
        return TrainingInterrupted(
            f"interrupted ({by}) at epoch {epoch + 1}, step {at_step}: {where}", interrupts.signum or 2
        )

    with Interrupts(cfg.catch_signals) as interrupts:
        for epoch in range(first_epoch, cfg.epochs):
            if hasattr(train_batches, "set_epoch"):
                train_batches.set_epoch(epoch)
            net.train()
            loss_sum = correct = count = 0.0
            for i, batch in enumerate(train_batches):
                if i >= per_epoch:
                    break
                x, y = labelled(batch)
                if i < skip:  # resumed mid-epoch: these batches were already trained on
                    continue
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * _lr_factor(step, total_steps, cfg)
                labels = y  # where the loader left them (the CPU, as a rule): checked there, no device sync
                x, y = to_device(x, device), to_device(y, device)
                if cfg.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(precision, device):
                    logits = net(x)
                    class_indices(labels, logits.shape[-1])
                    loss = step_loss(logits, x, y)
                if not torch.isfinite(loss):
                    where = (
                        f"; the last good checkpoint is {last_good}" if last_good else "; no checkpoint was written yet"
                    )
                    raise NonFiniteLossError(
                        f"loss became {loss.item()} at epoch {epoch + 1}, step {step}{where}. Lower «lr» or use fp32"
                    )
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.clip_grad:
                    scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
                    nn.utils.clip_grad_norm_(params, cfg.clip_grad)
                scaler.step(opt)
                scaler.update()
                step += 1
                seen += len(y)
                loss_sum += loss.item() * len(y)
                correct += float((logits.argmax(1) == y).sum())
                count += len(y)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    checkpoint(epoch, i + 1)
                if interrupts.requested:  # Ctrl-C: stop at this step boundary, a consistent state
                    checkpoint(epoch, i + 1)
                    raise interrupted(epoch, step)
                if on_step is not None and is_main():
                    elapsed = time.perf_counter() - start
                    on_step(
                        {
                            "epoch": epoch + 1,
                            "step": i + 1,
                            "steps": per_epoch,
                            "loss": loss_sum / count,
                            "acc": correct / count,
                            "images_per_s": seen / elapsed,
                        }
                    )
            skip = 0
            loss_sum, correct, count = all_sum([loss_sum, correct, count])
            val_acc = evaluate(model, val_batches, precision, cfg.limit_batches)
            row = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / max(count, 1),
                "train_acc": correct / max(count, 1),
                "val_acc": val_acc,
                "lr": opt.param_groups[0]["lr"],
                "wall_s": time.perf_counter() - start,
            }
            result.history.append(row)
            if out is not None and is_main():
                append_csv(out / "metrics.csv", row)
                if board is not None:
                    for key, value in row.items():
                        if key != "epoch":
                            board.add_scalar(key, value, epoch + 1)
                save(model, out / "last.safetensors", source=source)
                if val_acc >= result.best_acc:
                    result.checkpoint = save(model, out / "best.safetensors", source=source)
            result.best_acc = max(result.best_acc, val_acc)
            checkpoint(epoch + 1, 0)
            if interrupts.requested and epoch + 1 < cfg.epochs:
                raise interrupted(epoch + 1, step)
            if on_epoch is not None and is_main():
                on_epoch(row)
    if out is not None and result.checkpoint is None and (out / "best.safetensors").is_file():
        result.checkpoint = out / "best.safetensors"
    if board is not None:
        board.close()
    result.final_acc = result.history[-1]["val_acc"] if result.history else 0.0
    result.wall_s = time.perf_counter() - start
    result.images_per_s = seen / max(result.wall_s, 1e-9)
    return result


def train(
    model: nn.Module,
    train_batches: Any,
    val_batches: Iterable,
    config: TrainConfig | None = None,
    out: Path | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    source: Any = None,
    resume: bool = False,
) -> FitResult:
    """Train ``model`` with cross-entropy (a reference teacher). See :func:`distill` for arguments."""
    out = validate.output_folder("out", out)
    cfg = config or TrainConfig()

    def loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)

    return _fit(model, loss, train_batches, val_batches, cfg, out, on_step, on_epoch, source, resume)


def _check_feature_layers(names: Any, student: nn.Module, teacher: nn.Module) -> None:
    """Every name in ``feature_layers`` a module of both the student and the teacher."""
    if names is None:
        return
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise UsageError(f"«feature-layers» is a list of module names, got {names!r:.80}")
    theirs = dict(teacher.named_modules())
    mine = dict(student.named_modules())
    for name in names:
        if name not in mine or name not in theirs:
            whose = "the student" if name not in mine else "the teacher"
            raise UsageError(
                f"feature layer {name!r} is not a module of {whose}.{suggest(name, [n for n in mine if n in theirs])} "
                "Name modules both have, e.g. plan.stage_outputs()"
            )


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train_batches: Any,
    val_batches: Iterable,
    epochs: int | None = None,
    config: TrainConfig | None = None,
    out: Path | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    source: Any = None,
    resume: bool = False,
    feature_layers: list[str] | None = None,
    calib_batches: int = CALIB_BATCHES,
    **deprecated_names: Any,
) -> FitResult:
    """Fine-tune ``student`` on cross-entropy + Hinton KD from ``teacher`` (eval mode, no grad).

    A student fresh from conversion still carries the original's BatchNorm statistics, which
    no longer match its kernels; ``distill`` then re-estimates them first (on
    ``calib_batches`` training batches) and says so in the result's ``notes``. Without a
    ``config`` it uses :meth:`TrainConfig.finetune`, the settings measured for fine-tuning a
    converted pretrained network (not the from-scratch defaults of :func:`train`).

    Args:
        student: the anchored model; trained in place.
        teacher: the original model; never updated.
        train_batches: yields (images, labels); ``set_epoch`` is called when it exists.
        val_batches: yields (images, labels) for the per-epoch validation accuracy.
        epochs: shorthand overriding ``config.epochs``.
        config: optimisation settings (:class:`TrainConfig`); None = :meth:`TrainConfig.finetune`.
        out: folder for ``best.safetensors``, ``last.safetensors``, ``metrics.csv`` and the
            resumable ``state.pt`` (model, optimiser, RNG, counters; written atomically).
        on_step, on_epoch: progress callbacks receiving plain dicts.
        source: model source recorded in checkpoints (see :func:`dacnn_convert.save`).
        resume: continue from ``out/state.pt`` when it exists (same optimiser, schedule,
            RNG and counters; a run stopped mid-epoch skips the batches it already did).
        feature_layers: modules whose outputs are matched by MSE, weighted by
            ``config.feature_weight`` (e.g. ``plan.stage_outputs()``: names are shared by
            teacher and student).
        calib_batches: batches for the BN re-estimation of a fresh student (0: never);
            ``calibrate_batches``, its 0.1.0 name, still works for one release.

    Returns:
        :class:`FitResult` with the validation accuracy history and the best checkpoint.

    Raises:
        NonFiniteLossError: the loss became NaN/inf (names the step and the last checkpoint).
        UsageError: an argument of the wrong type, or the teacher is the student itself.
    """
    if "calibrate_batches" in deprecated_names:
        deprecated("distill(calibrate_batches=)", "write calib_batches=")
        calib_batches = deprecated_names.pop("calibrate_batches")
    if deprecated_names:
        raise UsageError(f"distill() got an unexpected keyword {next(iter(deprecated_names))!r}")
    validate.module("student", student)
    validate.module("teacher", teacher)
    if teacher is student:
        raise UsageError(
            "the teacher is the student itself: distil from the original model, e.g. distill(anchor(model), model, ...)"
        )
    validate.loader("train-batches", train_batches)
    validate.loader("val-batches", val_batches)
    out = validate.output_folder("out", out)
    if config is not None and not isinstance(config, TrainConfig):
        raise UsageError(f"«config» must be a TrainConfig, got {type(config).__name__}")
    if epochs is not None:
        validate.integer("epochs", epochs, 1)
    validate.integer("calib-batches", calib_batches, 0)
    cfg = config or TrainConfig.finetune()
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    _check_feature_layers(feature_layers, student, teacher)
    calibrated = 0
    resuming = resume and out is not None and (Path(out) / "state.pt").is_file()  # its BN stats are in there
    if calib_batches > 0 and needs_bn_calibration(student) and not resuming:
        calibrated = recalibrate_bn(student, train_batches, calib_batches)
    device = device_of(student)
    # the teacher is borrowed: moved beside the student, frozen, in eval mode, and given back as it came
    teacher_was = ([(m, m.training) for m in teacher.modules()], device_of(teacher), _channels_last(teacher))
    teacher.eval().to(device)
    if cfg.channels_last:
        teacher.to(memory_format=torch.channels_last)
    frozen = {p: p.requires_grad for p in teacher.parameters()}
    for p in frozen:
        p.requires_grad_(False)
    layers = list(feature_layers or [])
    taps = (FeatureTaps(student, layers), FeatureTaps(teacher, layers)) if layers and cfg.feature_weight > 0 else None

    def loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = teacher(x.to(device))
        if t.shape != logits.shape:
            raise UsageError(
                f"the teacher's outputs have shape {tuple(t.shape)} and the student's {tuple(logits.shape)}: "
                "distil from a teacher with the student's classes (the original model the student was converted from)"
            )
        value = kd_loss(logits, t, y, cfg.kd_temperature, cfg.kd_alpha, cfg.label_smoothing)
        if taps is not None:
            value = value + cfg.feature_weight * feature_mse(taps[0].outputs, taps[1].outputs)
        return value

    try:
        result = _fit(student, loss, train_batches, val_batches, cfg, out, on_step, on_epoch, source, resume)
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        teacher.to(teacher_was[1])
        for m, training in teacher_was[0]:  # each submodule's own flag: a partly frozen teacher stays so
            m.training = training
        if cfg.channels_last and not teacher_was[2]:
            teacher.to(memory_format=torch.contiguous_format)
        if taps is not None:
            taps[0].remove()
            taps[1].remove()
    if calibrated:
        result.calibrated_batches = calibrated
        result.notes.append(
            f"the student's BatchNorm statistics were those of the original network: re-estimated "
            f"on {calibrated} training batches before fine-tuning"
        )
    return result
