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
    kl = F.kl_div(F.log_softmax(s / temperature, dim=1), F.log_softmax(t / temperature, dim=1), log_target=True,
                  reduction="batchmean")  # fmt: skip
    return (1.0 - alpha) * ce + alpha * temperature**2 * kl
