"""Distillation loss (Hinton et al. 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 0.9,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """(1 - alpha) * CE(student, targets) + alpha * T^2 * KL(teacher_T || student_T).

    The T^2 factor keeps the soft-target gradients on the scale of the hard-target ones
    as T changes. Computed in fp32 whatever the autocast dtype of the logits.
    """
    s, t = student_logits.float(), teacher_logits.float()
    ce = F.cross_entropy(s, targets, label_smoothing=label_smoothing)
    kl = F.kl_div(
        F.log_softmax(s / temperature, dim=1),
        F.log_softmax(t / temperature, dim=1),
        log_target=True,
        reduction="batchmean",
    )
    return (1.0 - alpha) * ce + alpha * temperature**2 * kl


class FeatureTaps:
    """Keeps the latest outputs of named modules (forward hooks), for feature distillation."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self.handles = [modules[n].register_forward_hook(self._keep(n)) for n in names]

    def _keep(self, name: str):  # noqa: ANN202
        def hook(module: torch.nn.Module, inp: object, out: torch.Tensor) -> None:
            self.outputs[name] = out

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def feature_mse(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over matched stages of the MSE between student and teacher feature maps."""
    losses = [F.mse_loss(student[k].float(), teacher[k].float()) for k in teacher]
    return torch.stack(losses).mean()
