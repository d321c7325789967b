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
    """The training loop: restore (when resuming), then per epoch :meth:`_Run.train_one_epoch` and
    :meth:`_Run.end_epoch` (validate, write the files, checkpoint), as timm's ``train_one_epoch`` / ``validate``."""
    run = _Run(model, step_loss, train_batches, cfg, out, source)
    if resume:
        run.restore()
    run.begin()  # after a restore: the clock and the TensorBoard writer start with the training
    with Interrupts(cfg.catch_signals) as interrupts:
        run.interrupts = interrupts
        for epoch in range(run.first_epoch, cfg.epochs):
            stats = run.train_one_epoch(epoch, on_step)
            row = run.end_epoch(epoch, stats, val_batches)
            if interrupts.requested and epoch + 1 < cfg.epochs:
                raise run.interrupted(epoch + 1)
            if on_epoch is not None and run.main:
                on_epoch(row)
    return run.finish()


class _Run:
    """The state of one training run (model, optimiser, scaler, counters, result) and its steps."""

    def __init__(
        self, model: nn.Module, step_loss: StepFn, train_batches: Any, cfg: TrainConfig, out: Path | None, source: Any
    ) -> None:
        from .distributed import is_main, world_size

        self.model, self.step_loss, self.train_batches = model, step_loss, train_batches
        self.cfg, self.out, self.source = cfg, out, source
        self.main = is_main()
        if out is not None and self.main:
            out.mkdir(parents=True, exist_ok=True)  # a library caller's folder need not exist yet
        self.device = next(model.parameters()).device
        self.precision = resolve_precision(cfg.precision, self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.net: nn.Module = model
        if world_size() > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = _optimizer(self.params, cfg)
        # fp16 gradients underflow without loss scaling; bf16 and fp32 need none
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        n = len(train_batches)
        self.per_epoch = n if cfg.limit_batches is None else min(cfg.limit_batches, n)
        self.total_steps = self.per_epoch * cfg.epochs
        self.result = FitResult(precision=self.precision)
        self.state_path = out / "state.pt" if out is not None else None
        self.first_epoch, self.skip, self.step = 0, 0, 0
        self.board: Any = None
        self.start = time.perf_counter()
        self.seen = 0
        had_state = self.state_path is not None and self.state_path.is_file()
        self.last_good: Path | None = self.state_path if had_state else None
        self.interrupts: Any = None

    def restore(self) -> None:
        """Continue from ``out/state.pt`` when it exists: model, optimiser, RNG, scaler, counters, history."""
        path, out = self.state_path, self.out
        if path is None or not path.exists():
            return
        if not path.is_file():
            raise ResumeError(f"cannot resume from {path}: it is not a file; to start over instead, use «overwrite»")
        state = resume_state(
            path, self.device, self.model, self.opt, self.per_epoch, self.cfg, data_signature(self.train_batches)
        )
        gone = [n for n in ("best.safetensors", "last.safetensors") if out is not None and not (out / n).is_file()]
        if state["epoch"] >= self.cfg.epochs and gone:  # a finished run resumes to its result: it must still be there
            raise ResumeError(
                f"the run in {out} has finished its {state['epoch']} epoch(s) but {', '.join(gone)} "
                f"{'is' if len(gone) == 1 else 'are'} gone: give more «epochs» to train it on, or «overwrite» to "
                "start again"
            )
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"].cpu())
        if state.get("cuda_rng") is not None and self.device.type == "cuda":  # this process's GPU only
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.first_epoch, self.skip, self.step = state["epoch"], state["batch"], state["step"]
        self.result.history, self.result.best_acc = state["history"], state["best_acc"]

    def begin(self) -> None:
        """Start the clock and open the TensorBoard writer (once restored: a refused resume leaves none open)."""
        self.board = tensorboard_writer(self.out) if self.out is not None and self.main else None
        self.start = time.perf_counter()

    def checkpoint(self, epoch: int, batch: int) -> None:
        """Write the resumable ``state.pt`` (atomically), on the main process only."""
        if self.state_path is None or not self.main:
            return
        device = self.device
        self.last_good = save_state(
            self.state_path,
            {
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "steps_per_epoch": self.per_epoch,
                "optimizer_name": self.cfg.optimizer,
                "data": data_signature(self.train_batches),
                "epoch": epoch,
                "batch": batch,
                "step": self.step,
                "history": self.result.history,
                "best_acc": self.result.best_acc,
            },
        )

    def interrupted(self, epoch: int) -> TrainingInterrupted:
        where = (
            f"checkpoint saved to {self.state_path}; run it again with «resume» to continue"
            if (self.state_path is not None)
            else "nothing saved (no output folder)"
        )
        signum = self.interrupts.signum if self.interrupts is not None else None
        by = signal.Signals(signum).name if signum else "SIGINT"
        return TrainingInterrupted(f"interrupted ({by}) at epoch {epoch + 1}, step {self.step}: {where}", signum or 2)

    def train_one_epoch(self, epoch: int, on_step: Callable[[dict[str, float]], None] | None) -> list[float]:
        """One pass over the training batches; returns [loss sum, correct, count] summed over processes."""
        from .distributed import all_sum

        cfg, opt, device = self.cfg, self.opt, self.device
        if hasattr(self.train_batches, "set_epoch"):
            self.train_batches.set_epoch(epoch)
        self.net.train()
        loss_sum = correct = count = 0.0
        for i, batch in enumerate(self.train_batches):
            if i >= self.per_epoch:
                break
            x, y = labelled(batch)
            if i < self.skip:  # resumed mid-epoch: these batches were already trained on
                continue
            for group in opt.param_groups:
                group["lr"] = cfg.lr * _lr_factor(self.step, self.total_steps, cfg)
            labels = y  # where the loader left them (the CPU, as a rule): checked there, no device sync
            x, y = to_device(x, device), to_device(y, device)
            if cfg.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(self.precision, device):
                logits = self.net(x)
                class_indices(labels, logits.shape[-1])
                loss = self.step_loss(logits, x, y)
            if not torch.isfinite(loss):
                last = self.last_good
                where = f"; the last good checkpoint is {last}" if last else "; no checkpoint was written yet"
                raise NonFiniteLossError(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {self.step}{where}. Lower «lr» or use fp32"
                )
            opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.clip_grad:
                self.scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
                nn.utils.clip_grad_norm_(self.params, cfg.clip_grad)
            self.scaler.step(opt)
            self.scaler.update()
            self.step += 1
            self.seen += len(y)
            loss_sum += loss.item() * len(y)
            correct += float((logits.argmax(1) == y).sum())
            count += len(y)
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.checkpoint(epoch, i + 1)
            if self.interrupts is not None and self.interrupts.requested:  # Ctrl-C: stop at a step boundary
                self.checkpoint(epoch, i + 1)
                raise self.interrupted(epoch)
            if on_step is not None and self.main:
                elapsed = time.perf_counter() - self.start
                on_step(
                    {
                        "epoch": epoch + 1,
                        "step": i + 1,
                        "steps": self.per_epoch,
                        "loss": loss_sum / count,
                        "acc": correct / count,
                        "images_per_s": self.seen / elapsed,
                    }
                )
        self.skip = 0
        return all_sum([loss_sum, correct, count])

    def end_epoch(self, epoch: int, stats: list[float], val_batches: Iterable) -> dict[str, float]:
        """Validate, append the epoch's row (metrics.csv, TensorBoard), save last/best, checkpoint."""
        from ..io.checkpoint import save

        loss_sum, correct, count = stats
        val_acc = evaluate(self.model, val_batches, self.precision, self.cfg.limit_batches)
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(count, 1),
            "train_acc": correct / max(count, 1),
            "val_acc": val_acc,
            "lr": self.opt.param_groups[0]["lr"],
            "wall_s": time.perf_counter() - self.start,
        }
        result, out = self.result, self.out
        result.history.append(row)
        if out is not None and self.main:
            append_csv(out / "metrics.csv", row)
            if self.board is not None:
                for key, value in row.items():
                    if key != "epoch":
                        self.board.add_scalar(key, value, epoch + 1)
            save(self.model, out / "last.safetensors", source=self.source)
            if val_acc >= result.best_acc:
                result.checkpoint = save(self.model, out / "best.safetensors", source=self.source)
        result.best_acc = max(result.best_acc, val_acc)
        self.checkpoint(epoch + 1, 0)
        return row

    def finish(self) -> FitResult:
        """The result: the best checkpoint, the final accuracy, wall time and throughput."""
        result, out = self.result, self.out
        if out is not None and result.checkpoint is None and (out / "best.safetensors").is_file():
            result.checkpoint = out / "best.safetensors"
        if self.board is not None:
            self.board.close()
        result.final_acc = result.history[-1]["val_acc"] if result.history else 0.0
        result.wall_s = time.perf_counter() - self.start
        result.images_per_s = self.seen / max(result.wall_s, 1e-9)
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
