"""The whole job on data: convert, calibrate BatchNorm, distil, and measure each step.

    teacher ─► plan ─► convert (fit) ─► BN recalibration ─► KD fine-tune ─► report

Accuracy is measured after every step, so a user sees what each one buys.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import save
from .convert import convert
from .distill import FitResult, Loaders, TrainConfig, distill, evaluate, recalibrate_bn
from .planning import Plan
from .report import ConversionReport, build_report, state_dict_bytes


@dataclass
class PipelineResult:
    """Accuracies (fractions) after each step, the conversion report and the fine-tune history."""

    teacher_acc: float
    converted_acc: float
    calibrated_acc: float
    finetuned_acc: float
    report: ConversionReport
    fit: FitResult | None
    wall_s: float
    checkpoint: Path | None = None
    steps: dict[str, float] = field(default_factory=dict)

    @property
    def drop(self) -> float:
        """Teacher accuracy minus the final student accuracy, in fraction points."""
        return self.teacher_acc - self.finetuned_acc

    def to_dict(self) -> dict[str, Any]:
        return {
            "teacher_acc": self.teacher_acc,
            "converted_acc": self.converted_acc,
            "calibrated_acc": self.calibrated_acc,
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
            f"| after KD fine-tune | {pct(self.finetuned_acc)} |",
            f"| drop vs teacher | {100 * self.drop:.2f} points |",
            "",
            f"Wall time {self.wall_s:.0f} s.",
        ]
        return "\n".join(lines) + "\n"


def compress(
    teacher: nn.Module,
    plan: Plan,
    loaders: Loaders,
    config: TrainConfig,
    calibrate_batches: int = 100,
    out: Path | None = None,
    source: Any = None,
    on_stage: Callable[[str, float], None] | None = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    resume: bool = False,
) -> PipelineResult:
    """Convert ``teacher`` by ``plan``, recalibrate BN, distil for ``config.epochs`` and measure.

    Args:
        teacher: the trained original; left untouched.
        plan: the conversion plan (``dacnn_convert.plan``).
        loaders: training and validation data.
        config: fine-tuning settings.
        calibrate_batches: training batches used for the ``act`` anchor fit and to re-estimate
            BN statistics (0 skips the BN step).
        out: where ``model.safetensors``, ``report.json`` and ``report.md`` go; None writes nothing.
        source: model source recorded in the checkpoint.
        on_stage: called with (stage name, accuracy) after each measured step.
        resume: continue an interrupted fine-tune from ``out/state.pt``.

    Returns:
        :class:`PipelineResult`.
    """
    start = time.perf_counter()
    steps: dict[str, float] = {}
    notify = on_stage or (lambda name, acc: None)
    limit = config.limit_batches

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        value = fn()
        steps[name] = time.perf_counter() - t
        return value

    teacher_acc = timed("eval_teacher", lambda: evaluate(teacher, loaders.val, config.precision, limit))
    notify("teacher", teacher_acc)
    calib = max(calibrate_batches, 1)
    conversion = timed("convert", lambda: convert(teacher, plan, calib_loader=loaders.train, calib_batches=calib))
    student = conversion.model
    converted_acc = timed("eval_converted", lambda: evaluate(student, loaders.val, config.precision, limit))
    notify("converted", converted_acc)
    if calibrate_batches > 0:
        timed("calibrate", lambda: recalibrate_bn(student, loaders.train, calibrate_batches))
    calibrated_acc = timed("eval_calibrated", lambda: evaluate(student, loaders.val, config.precision, limit))
    notify("calibrated", calibrated_acc)
    fit = timed(
        "finetune",
        lambda: distill(student, teacher, loaders.train, loaders.val, config=config, out=out, on_step=on_step,
                        on_epoch=on_epoch, source=source, resume=resume, feature_layers=plan.stage_outputs()),  # fmt: skip
    )
    finetuned_acc = fit.final_acc
    notify("finetuned", finetuned_acc)
    from .distill.distributed import is_main

    ckpt = save(student, out / "model.safetensors", source=source) if out is not None and is_main() else None
    report = build_report(
        teacher,
        conversion,
        getattr(source, "display", str(source)),
        state_dict_bytes(teacher),
        ckpt.stat().st_size if ckpt else state_dict_bytes(student),
    )
    result = PipelineResult(
        teacher_acc, converted_acc, calibrated_acc, finetuned_acc, report, fit, time.perf_counter() - start, ckpt, steps
    )
    if out is not None and is_main():
        (out / "report.json").write_text(json.dumps(result.to_dict(), indent=2))
        (out / "report.md").write_text(result.to_markdown())
    return result
