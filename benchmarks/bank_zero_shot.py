"""Filter banks before any training: accuracy right after conversion and after BN recalibration.

Converts the Fashion-MNIST ResNet-18 teacher of benchmarks/prune_bench.sh in several bank
layouts (and the earlier mix mode, per-layer low-rank and the planner at a few budgets), each
with and without channel alignment, fitted to 20 calibration batches of 128, and evaluates on
the full test set. No gradient step is taken. Rows are appended to the output as they finish.

    python benchmarks/bank_zero_shot.py --teacher runs/prune-bench/teacher/best.safetensors
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _env import machine  # benchmarks/ is on sys.path when run as a script

from dacnn_convert import convert, count_params, load, plan
from dacnn_convert.train import evaluate, make_loaders, recalibrate_bn

LAYOUTS = [  # (label, plan keywords)
    ("mix, act init (earlier mode)", dict(mode="mix")),
    ("bank k=C_out in 1-3, C_out/4 in 4", dict(mode="bank", bank_size="1:1.0,2:1.0,3:1.0,4:0.25")),
    ("bank k=C_out/4 everywhere", dict(mode="bank", bank_size=0.25)),
    (
        "bank C_out/2 in 1-3, C_out/8 in 4 + low-rank C_out/4",
        dict(mode="bank", bank_size="1:0.5,2:0.5,3:0.5,4:0.125", factorize_unshared=0.25),
    ),
    (
        "bank C_out/4 in 1-3, C_out/16 in 4 + low-rank C_out/8",
        dict(mode="bank", bank_size="1:0.25,2:0.25,3:0.25,4:0.0625", factorize_unshared=0.125),
    ),
    ("per-layer low-rank C_out/4, no sharing", dict(mode="none", factorize_unshared=0.25)),
    ("planner (banks), 50% budget", dict(target_ratio=2.0)),
    ("planner (banks), 25% budget", dict(target_ratio=4.0)),
    ("planner (banks), 10% budget", dict(target_ratio=10.0)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--calib", type=int, default=20, help="batches of 128 for the fits and for BN recalibration")
    ap.add_argument("--align", default="off,on", help="channel alignment settings to run")
    ap.add_argument("--only", default=None, help="comma-separated row numbers (1-based) to run")
    ap.add_argument("--init", default="act", help="act (each fit on the original's inputs) or act-seq (sequential)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/bank_zero_shot.md"))
    args = ap.parse_args()
    loaders = make_loaders("fashion-mnist", 128, 32)
    teacher = load(args.teacher).eval()
    base = evaluate(teacher, loaders.val, precision="fp32")
    n0 = count_params(teacher)
    if not args.out.exists():
        args.out.write_text(
            "# Filter banks before training (`python benchmarks/bank_zero_shot.py --teacher "
            "runs/prune-bench/teacher/best.safetensors`)\n\n"
            f"Machine: {machine()}  \nTeacher: ResNet-18, {n0:,} params, {100 * base:.2f}% on the 10,000 test "
            f"images. Fits on {args.calib} calibration batches of 128 training images; BN recalibrated on the same "
            "number of batches; no training.\n\n| layout | align | params (of teacher) | after conversion | + BN recal | "
            "drop after recal | convert s |\n|---|---|---:|---:|---:|---:|---:|\n"
        )
    only = {int(i) for i in args.only.split(",")} if args.only else None
    for i, (label, kw) in enumerate(LAYOUTS, start=1):
        if only and i not in only:
            continue
        for align in args.align.split(","):
            if align == "on" and kw.get("mode") == "none":
                continue  # nothing is shared: nothing to align
            torch.manual_seed(0)
            start = time.time()
            p = plan(teacher, input_size=(3, 32, 32), init=args.init, calib_loader=loaders.train, **kw)
            student = convert(
                teacher, p, calib_loader=loaders.train, calib_batches=args.calib, align=align == "on"
            ).model
            took = time.time() - start
            after = evaluate(student, loaders.val, precision="fp32")
            recalibrate_bn(student, loaders.train, args.calib)
            recal = evaluate(student, loaders.val, precision="fp32")
            n = count_params(student)
            with args.out.open("a") as f:
                f.write(
                    f"| {label}{', ' + args.init if args.init != 'act' else ''} | {align} | {n:,} ({100 * n / n0:.1f}%) | {100 * after:.2f} | {100 * recal:.2f} | "
                    f"{100 * (base - recal):.2f} | {took:.0f} |\n"
                )


if __name__ == "__main__":
    main()
