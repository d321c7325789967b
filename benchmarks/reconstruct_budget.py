"""Does section-wise reconstruction help the budget planner's plans? (the default of defaults.default_reconstruct)

For one Fashion-MNIST teacher and a size target: plan with the planner (kl on 8 batches), convert with the
act fit, recalibrate BN on 20 batches of 128, measure; then reconstruct each section (ReconstructConfig,
STEPS steps) and measure again. No end-to-end training. Teachers: benchmarks/prune_bench.sh (ResNet-18) and
benchmarks/family_bench.sh (the timm families).

    python benchmarks/reconstruct_budget.py resnet18 runs/prune-bench/teacher/best.safetensors 4
    python benchmarks/reconstruct_budget.py timm:mobilenetv3_large_100 \
        runs/family-bench/teacher-timm-mobilenetv3_large_100/best.safetensors 4 [STEPS]

Appends one row to benchmarks/results/reconstruct/results.md (machine and date in the row).
"""

from __future__ import annotations

import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from dacnn_convert import ReconstructConfig, anchor, count_params
from dacnn_convert.io.sources import build_model, parse_spec
from dacnn_convert.train.data import make_loaders
from dacnn_convert.train.evaluation import evaluate
from dacnn_convert.train.reconstruct import reconstruct_sections

RESULTS = Path(__file__).resolve().parent / "results" / "reconstruct" / "results.md"
HEAD = (
    "| model | target | params | teacher | after fit + BN | after reconstruction | reconstruction wall | "
    "steps | machine | date |\n|---|---:|---:|---:|---:|---:|---:|---:|---|---|\n"
)


def main() -> None:
    name, weights, ratio = sys.argv[1], sys.argv[2], float(sys.argv[3])
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else ReconstructConfig().steps
    torch.manual_seed(0)
    teacher = build_model(parse_spec(name, 10), weights).eval()
    data = make_loaders("fashion-mnist", batch_size=128, train_limit=10000, seed=0)
    t_acc = evaluate(teacher, data.val, precision="fp32")
    student = anchor(teacher, target_ratio=ratio, calib_loader=data.train, calib_batches=20, reconstruct=False)
    before = evaluate(student, data.val, precision="fp32")
    start = time.perf_counter()
    reconstruct_sections(student, teacher, data.train, ReconstructConfig(steps=steps))
    wall = time.perf_counter() - start
    after = evaluate(student, data.val, precision="fp32")
    params = count_params(student)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, fp32"
    row = (
        f"| {name} | {ratio:g}x | {params:,} | {100 * t_acc:.2f}% | {100 * before:.2f}% | {100 * after:.2f}% | "
        f"{wall:.0f} s | {steps} | {machine} | {date.today()} |\n"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if not RESULTS.exists():
        RESULTS.write_text("# Section-wise reconstruction on the planner's plans (no end-to-end training)\n\n" + HEAD)
    with RESULTS.open("a") as f:
        f.write(row)
    print(row, end="")


if __name__ == "__main__":
    main()
