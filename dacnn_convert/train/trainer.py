"""The training loop: train a reference teacher, or distil the teacher into the anchored student.

The library never prints: progress goes to an optional ``on_step``/``on_epoch`` callback
that the CLI renders with rich. Checkpoints are written atomically (temp file + rename).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.modes import mode
from ..defaults import FINETUNE_LR, FINETUNE_WARMUP_STEPS, TRAIN_LR
from ..errors import DacnnError, TrainingInterrupted, UsageError, choose
from ..io.atomic import atomic_write
from .calibrate import CALIBRATE_BATCHES, needs_bn_calibration, recalibrate_bn
from .device import device_of
from .losses import FeatureTaps, feature_mse, kd_loss

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FINETUNE: dict[str, Any] = {"lr": FINETUNE_LR, "warmup_steps": FINETUNE_WARMUP_STEPS}  # TrainConfig.finetune()


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by ``train`` and ``distill`` (recipes set the same fields)."""

    epochs: int = 1
    lr: float = TRAIN_LR
    optimizer: str = "sgd"  # sgd (momentum 0.9, nesterov) | adamw | adagrad (the paper's)
    schedule: str = "cosine"  # cosine | step (x0.1 at half the epochs, as the paper)
    step_every: int = 0  # with schedule=step: x0.1 every N epochs instead (the paper's SVHN: 20)
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    label_smoothing: float = 0.0
    clip_grad: float | None = None
    kd_temperature: float = 4.0
    kd_alpha: float = 0.9
    feature_weight: float = 0.0  # weight of the stage-feature MSE (used when feature layers are given)
    precision: str = "auto"
    limit_batches: int | None = None
    checkpoint_every: int | None = None  # steps; None = at the end of each epoch only
    channels_last: bool = True  # NHWC activations: measured +14% fp32 training throughput on a 2-core CPU
    seed: int = 0
    # Ctrl-C / SIGTERM stop at the next step boundary with a checkpoint and a resume hint. Off by
    # default: a library call installs no signal handler unless asked (the CLI asks).
    catch_signals: bool = False

    @classmethod
    def finetune(cls, **overrides: Any) -> TrainConfig:
        """The settings for fine-tuning a converted pretrained network (``distill``'s default).

        A converted student starts close to its teacher, so it wants a lower peak learning
        rate than training from scratch and a short warm-up; chosen by measurement (see
        :mod:`dacnn_convert.defaults`). ``overrides`` replace single fields.
        """
        return cls(**{**FINETUNE, **overrides})

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise UsageError(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise UsageError(f"lr must be > 0, got {self.lr}")
        choose("optimizer", self.optimizer, ("sgd", "adamw", "adagrad"))
        choose("schedule", self.schedule, ("cosine", "step"))
        choose("precision", self.precision, PRECISIONS)
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise UsageError(f"kd_alpha must be in [0, 1], got {self.kd_alpha}")


@dataclass
class FitResult:
    """Accuracies (fractions in [0, 1]), the per-epoch history and where the best model went."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_acc: float = 0.0
    final_acc: float = 0.0
    checkpoint: Path | None = None
    wall_s: float = 0.0
    images_per_s: float = 0.0
    precision: str = "fp32"
    calibrated_batches: int = 0  # BN statistics re-estimated on this many batches before training
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checkpoint"] = str(self.checkpoint) if self.checkpoint else None
        return d


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the hardware runs it fast (CUDA, CPUs with bf16 units), else fp32.

    Raises:
        UsageError: fp16 requested on a CPU.
    """
    precision = choose("precision", precision, PRECISIONS)
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device; on CPU use bf16 or fp32")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16_units() else "fp32"


def cpu_has_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Does this CPU compute in bf16 natively (AVX512-BF16 or AMX-BF16)?

    oneDNN reports bf16 as supported on any AVX-512 CPU, where it emulates it: measured on an
    AVX-512 Xeon without bf16 units, a ResNet-18 training step under bf16 autocast took 1.6x
    as long as in fp32 (and ~50x on an AVX2-only EPYC). Only native units make bf16 pay.
    """
    from pathlib import Path

    try:
        flags = Path(cpuinfo).read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def evaluate(model: nn.Module, batches: Iterable, precision: str = "auto", limit_batches: int | None = None) -> float:
    """Top-1 accuracy (fraction) of ``model`` in eval mode; its train/eval mode is restored."""
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    correct = total = 0
    with mode(model), torch.no_grad(), autocast(precision, device):
        for i, (x, y) in enumerate(batches):
            if limit_batches is not None and i >= limit_batches:
                break
            pred = model(to_device(x, device)).argmax(dim=1)
            correct += int((pred.cpu() == y).sum())
            total += len(y)
    return correct / max(total, 1)


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


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch to ``device``; from pinned memory (the loaders' ``pin_memory``) without blocking the host."""
    return t.to(device, non_blocking=device.type == "cuda" and t.is_pinned())


class NonFiniteLossError(DacnnError):
    """The loss became NaN or infinite."""


class ResumeError(DacnnError):
    """``state.pt`` cannot continue this run (unreadable, or from another model, optimiser or data)."""


StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _save_state(path: Path, state: dict[str, Any]) -> Path:
    """torch.save, atomically: a crash never leaves a half-written checkpoint."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


STATE_KEYS = ("model", "optimizer", "rng", "epoch", "batch", "step", "history", "best_acc")


def _resume_state(
    path: Path, device: torch.device, model: nn.Module, opt: torch.optim.Optimizer, per_epoch: int, cfg: TrainConfig
) -> dict[str, Any]:
    """``path`` read and checked against this run before anything is restored from it.

    Raises:
        ResumeError: unreadable or truncated, not a training state, or written by a run with
            another model, optimiser or number of steps per epoch (says which).
    """

    def refuse(why: str) -> ResumeError:
        return ResumeError(f"cannot resume from {path}: {why}; to start over instead, use --overwrite (resume=False)")

    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise refuse(
            f"it is not a readable training state ({str(exc).splitlines()[0][:120] or type(exc).__name__})"
        ) from exc
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise refuse("it is not a dacnn training state (keys missing)")
    mine, theirs = model.state_dict(), state["model"]
    if not isinstance(theirs, dict):
        raise refuse("its model entry is not a state dict")
    missing = [k for k in mine if k not in theirs]
    if missing or len(theirs) != len(mine):
        raise refuse(
            f"it belongs to another model ({len(missing)} of this model's tensors missing, e.g. {missing[:2]})"
        )
    shape = next((k for k in mine if tuple(theirs[k].shape) != tuple(mine[k].shape)), None)
    if shape is not None:
        raise refuse(
            f"it belongs to another model ({shape} has shape {tuple(theirs[shape].shape)}, here "
            f"{tuple(mine[shape].shape)})"
        )
    name = state.get("optimizer_name")
    groups = state["optimizer"].get("param_groups", []) if isinstance(state["optimizer"], dict) else []
    if (name is not None and name != cfg.optimizer) or len(groups) != len(opt.param_groups):
        raise refuse(f"it was written with optimizer {name or 'another'}, this run uses {cfg.optimizer}")
    written = state.get("steps_per_epoch")
    if written is not None and written != per_epoch:
        raise refuse(
            f"it was written with {written} steps per epoch and this run has {per_epoch} "
            "(another --batch-size, --train-limit or --limit-batches?)"
        )
    return state


def _append_csv(path: Path, row: dict[str, float]) -> None:
    new = not path.exists()
    with path.open("a") as f:
        if new:
            f.write(",".join(row) + "\n")
        f.write(",".join(f"{v:.6g}" for v in row.values()) + "\n")


class _Interrupts:
    """The first Ctrl-C or SIGTERM (what schedulers and ``kill`` send) becomes a flag the loop
    checks between steps; a second one aborts at once. The caller's handlers come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.requested = False
        self.signum = 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Interrupts:
        if self.enabled and threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _tensorboard(out: Path) -> Any:
    """A TensorBoard writer in ``out/tb`` when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tb"))


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
    stop_after: int | None = None,
) -> FitResult:
    from ..io.checkpoint import save
    from .distributed import all_sum, is_main, world_size

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
    if resume and state_path is not None and state_path.is_file():
        state = _resume_state(state_path, device, model, opt, per_epoch, cfg)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"].cpu())
        if state.get("cuda_rng") is not None and device.type == "cuda":  # this process's GPU only
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        first_epoch, skip, step = state["epoch"], state["batch"], state["step"]
        result.history, result.best_acc = state["history"], state["best_acc"]
    board = _tensorboard(out) if out is not None and is_main() else None
    start = time.perf_counter()
    seen = 0
    last_good: Path | None = state_path if state_path is not None and state_path.is_file() else None

    def checkpoint(epoch: int, batch: int) -> None:
        nonlocal last_good
        if state_path is None or not is_main():
            return
        last_good = _save_state(
            state_path,
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "steps_per_epoch": per_epoch,
                "optimizer_name": cfg.optimizer,
                "epoch": epoch,
                "batch": batch,
                "step": step,
                "history": result.history,
                "best_acc": result.best_acc,
            },
        )

    def interrupted(epoch: int, at_step: int) -> TrainingInterrupted:
        where = (
            f"checkpoint saved to {state_path}; run the same command with --resume to continue"
            if (state_path is not None)
            else "nothing saved (no output folder)"
        )
        by = signal.Signals(interrupts.signum).name if interrupts.signum else "SIGINT"
        return TrainingInterrupted(
            f"interrupted ({by}) at epoch {epoch + 1}, step {at_step}: {where}", interrupts.signum or 2
        )

    with _Interrupts(cfg.catch_signals) as interrupts:
        for epoch in range(first_epoch, cfg.epochs):
            if hasattr(train_batches, "set_epoch"):
                train_batches.set_epoch(epoch)
            net.train()
            loss_sum = correct = count = 0.0
            for i, (x, y) in enumerate(train_batches):
                if i >= per_epoch:
                    break
                if i < skip:  # resumed mid-epoch: these batches were already trained on
                    continue
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * _lr_factor(step, total_steps, cfg)
                x, y = to_device(x, device), to_device(y, device)
                if cfg.channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(precision, device):
                    logits = net(x)
                    loss = step_loss(logits, x, y)
                if not torch.isfinite(loss):
                    where = (
                        f"; the last good checkpoint is {last_good}" if last_good else "; no checkpoint was written yet"
                    )
                    raise NonFiniteLossError(
                        f"loss became {loss.item()} at epoch {epoch + 1}, step {step}{where}. Lower --lr or use fp32"
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
                if stop_after is not None and step >= stop_after:  # test hook: simulate a killed run
                    if board is not None:
                        board.close()
                    return result
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
            val_acc = evaluate(model, val_batches, precision)
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
                _append_csv(out / "metrics.csv", row)
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
    stop_after: int | None = None,
) -> FitResult:
    """Train ``model`` with cross-entropy (a reference teacher). See :func:`distill` for arguments."""
    cfg = config or TrainConfig()

    def loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)

    return _fit(model, loss, train_batches, val_batches, cfg, out, on_step, on_epoch, source, resume, stop_after)


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
    stop_after: int | None = None,
    feature_layers: list[str] | None = None,
    calibrate_batches: int = CALIBRATE_BATCHES,
) -> FitResult:
    """Fine-tune ``student`` on cross-entropy + Hinton KD from ``teacher`` (eval mode, no grad).

    A student fresh from conversion still carries the original's BatchNorm statistics, which
    no longer match its kernels; ``distill`` then re-estimates them first (on
    ``calibrate_batches`` training batches) and says so in the result's ``notes``. Without a
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
        stop_after: stop after this many steps in total (a test hook that simulates a crash).
        feature_layers: modules whose outputs are matched by MSE, weighted by
            ``config.feature_weight`` (e.g. ``plan.stage_outputs()``: names are shared by
            teacher and student).
        calibrate_batches: batches for the BN re-estimation of a fresh student (0: never).

    Returns:
        :class:`FitResult` with the validation accuracy history and the best checkpoint.

    Raises:
        NonFiniteLossError: the loss became NaN/inf (names the step and the last checkpoint).
    """
    cfg = config or TrainConfig.finetune()
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    calibrated = 0
    resuming = resume and out is not None and (Path(out) / "state.pt").is_file()  # its BN stats are in there
    if calibrate_batches > 0 and needs_bn_calibration(student) and not resuming:
        calibrated = recalibrate_bn(student, train_batches, calibrate_batches)
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
        value = kd_loss(logits, t, y, cfg.kd_temperature, cfg.kd_alpha, cfg.label_smoothing)
        if taps is not None:
            value = value + cfg.feature_weight * feature_mse(taps[0].outputs, taps[1].outputs)
        return value

    try:
        result = _fit(
            student, loss, train_batches, val_batches, cfg, out, on_step, on_epoch, source, resume, stop_after
        )
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
