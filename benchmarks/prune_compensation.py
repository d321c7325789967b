"""Channel pruning with and without the closed-form compensation of core.pruning.compensate, no training.

On the Fashion-MNIST ResNet-18 teacher of benchmarks/prune_bench.sh: every layer's channels pruned at each
ratio (group-norm importance, Torch-Pruning), then BN recalibrated on the same 8 batches of 128 training
images; the compensated copy also refits every layer that lost input channels to the teacher's outputs on
those batches. kl to the teacher on 4 of those batches, accuracy on the 10,000 test images.

    python benchmarks/prune_compensation.py        # writes benchmarks/results/prune_compensation.md
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _env import machine

from dacnn_convert.core.pruning import Pruning, pruned_copy
from dacnn_convert.io.checkpoint import load
from dacnn_convert.train import make_loaders, recalibrate_bn
from dacnn_convert.train.evaluation import evaluate

TEACHER = "runs/prune-bench/teacher/best.safetensors"
RATIOS = (0.25, 0.5)
SIZE = (3, 32, 32)


def main() -> None:
    torch.manual_seed(0)
    teacher = load(TEACHER).eval()
    loaders = make_loaders("fashion-mnist", batch_size=128, input_size=32, train_limit=4096, seed=0)
    batches = [b for _, b in zip(range(8), loaders.train, strict=False)]

    def kl(m: torch.nn.Module) -> float:
        m.eval()
        total = 0.0
        with torch.no_grad():
            for x, _ in batches[:4]:
                ref = F.log_softmax(teacher(x), 1)
                total += float(F.kl_div(F.log_softmax(m(x), 1), ref, log_target=True, reduction="batchmean"))
        return total / 4

    rows = [f"| teacher | - | - | {100 * evaluate(teacher, loaders.val, 'fp32'):.2f}% | - |"]
    for ratio in RATIOS:
        for compensated in (False, True):
            start = time.perf_counter()
            data = (batches, 8) if compensated else (None, 0)
            student = pruned_copy(teacher, Pruning(ratio), SIZE, *data)
            recalibrate_bn(student, batches, 8)
            seconds = time.perf_counter() - start
            acc = evaluate(student, loaders.val, "fp32")
            rows.append(
                f"| {ratio:g} | {'yes' if compensated else 'no'} | {kl(student):.3f} | {100 * acc:.2f}% | {seconds:.0f} |"
            )
    text = "\n".join(
        [
            "# Channel pruning: closed-form compensation (core.pruning.compensate), no training",
            "",
            f"`python benchmarks/prune_compensation.py` on {machine()}, fp32.",
            "",
            "| channels pruned | compensated | kl to the teacher | test accuracy | seconds (prune + fit + BN) |",
            "|---|---|---:|---:|---:|",
            *rows,
            "",
        ]
    )
    out = Path("benchmarks/results/prune_compensation.md")
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
