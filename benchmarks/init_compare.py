"""Which anchor initialisation recovers a trained network best: mean, fit, act or act-seq?

For a teacher trained by `dacnn train` (or the demo), converts it with each init and
measures top-1 accuracy right after conversion, after BN recalibration, and after a
short KD fine-tune with identical settings for every init.

    python benchmarks/init_compare.py --teacher runs/demo/teacher/best.safetensors \
        [--mode mix] [--regulators none] [--calib 20] [--kd-batches 40]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _env import machine  # benchmarks/ is on sys.path when run as a script

from dacnn_convert import convert, load, plan
from dacnn_convert.train import TrainConfig, distill, evaluate, make_loaders, recalibrate_bn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--mode", default="mix")
    ap.add_argument("--regulators", default="none")
    ap.add_argument("--inits", default="mean,fit,act,act-seq")
    ap.add_argument("--calib", type=int, default=20, help="batches for the act fits")
    ap.add_argument("--bn-batches", type=int, default=50)
    ap.add_argument("--kd-batches", type=int, default=40)
    ap.add_argument("--train-limit", type=int, default=15000)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/init_compare.md"))
    args = ap.parse_args()
    loaders = make_loaders(args.dataset, 128, 32, train_limit=args.train_limit)
    teacher = load(args.teacher).eval()
    teacher_acc = evaluate(teacher, loaders.val, "fp32")
    rows = []
    for init in args.inits.split(","):
        torch.manual_seed(0)
        p = plan(teacher, mode=args.mode, regulators=args.regulators, init=init, input_size=(3, 32, 32))
        t = time.perf_counter()
        student = convert(teacher, p, calib_loader=loaders.train, calib_batches=args.calib).model
        seconds = time.perf_counter() - t
        converted = evaluate(student, loaders.val, "fp32")
        recalibrate_bn(student, loaders.train, args.bn_batches)
        calibrated = evaluate(student, loaders.val, "fp32")
        cfg = TrainConfig(lr=0.02, precision="fp32", limit_batches=args.kd_batches)
        tuned = distill(student, teacher, loaders.train, loaders.val, config=cfg).final_acc
        rows.append({"init": init, "convert_s": seconds, "converted": converted, "calibrated": calibrated, "kd": tuned})
        print(json.dumps(rows[-1]), flush=True)
    cmd = (
        f"python benchmarks/init_compare.py --teacher {args.teacher} --mode {args.mode} --regulators "
        f"{args.regulators} --calib {args.calib} --kd-batches {args.kd_batches}"
    )
    lines = [
        f"# Anchor initialisation on a trained network ({args.dataset}, mode {args.mode}, regulators {args.regulators})",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {machine()}  ",
        f"Teacher: torchvision ResNet-18 from `dacnn demo` ({args.train_limit} training images, 3 epochs), "
        f"top-1 {100 * teacher_acc:.2f}% on the 10,000 test images. BN recalibration on {args.bn_batches} batches; "
        f"KD fine-tune: {args.kd_batches} batches of 128 (SGD, lr 0.02, cosine, T=4, alpha=0.9), the same for every init.",
        "",
        "| init | conversion time (s) | right after conversion | after BN recalibration | after short KD |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| `{r['init']}` | {r['convert_s']:.1f} | {100 * r['converted']:.2f}% | {100 * r['calibrated']:.2f}% "
        f"| {100 * r['kd']:.2f}% |"
        for r in rows
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
