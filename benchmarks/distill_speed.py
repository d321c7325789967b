"""Throughput of one distillation step: the toolkit's loop vs a minimal hand-written loop.

One step = teacher forward (no grad) + student forward/backward + SGD step, KD loss,
ResNet-18 teacher vs its anchored student (mix + regulators), 32x32 inputs, batch 128,
same data in both loops. Target (issue #3): the toolkit reaches >= 0.9x the hand loop.

    python benchmarks/distill_speed.py [--steps 12] [--precisions fp32,bf16]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torchvision
from _env import machine  # benchmarks/ is on sys.path when run as a script

from dacnn_convert import anchor
from dacnn_convert.train import TrainConfig, distill, kd_loss
from dacnn_convert.train.precision import autocast


class Batches:
    """A fixed list of batches with the loader interface the trainer expects."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    teacher = torchvision.models.resnet18(num_classes=10).eval()
    student = anchor(teacher, mode="mix", regulators="all", input_size=(3, 32, 32))
    return teacher, student


def hand_loop(batches, precision: str, warmup: int) -> float:
    teacher, student = models()
    teacher.to(memory_format=torch.channels_last)  # the same work as the toolkit's default
    student.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    student.train()
    dev = torch.device("cpu")
    seen, start = 0, 0.0
    for i, (x, y) in enumerate(batches):
        x = x.contiguous(memory_format=torch.channels_last)
        if i == warmup:
            seen, start = 0, time.perf_counter()
        with autocast(precision, dev):
            with torch.no_grad():
                t = teacher(x)
            loss = kd_loss(student(x), t, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
    return seen / (time.perf_counter() - start)


def toolkit_loop(batches, precision: str, warmup: int) -> float:
    teacher, student = models()
    cfg = TrainConfig(lr=0.01, precision=precision)
    distill(student, teacher, Batches(batches[:warmup]), [], config=cfg)  # same warm-up as the hand loop
    start = time.perf_counter()
    distill(student, teacher, Batches(batches[warmup:]), [], config=cfg)
    return len(batches[warmup:]) * len(batches[0][1]) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--precisions", default="fp32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/distill_speed.md"))
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(args.batch, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch,), generator=g))
        for _ in range(args.steps + args.warmup)
    ]
    rows = []
    for precision in args.precisions.split(","):
        # alternate the two loops and keep each one's best, so neither gains from running second
        hand = ours = 0.0
        for _ in range(args.rounds):
            hand = max(hand, hand_loop(batches, precision, args.warmup))
            ours = max(ours, toolkit_loop(batches, precision, args.warmup))
        rows.append((precision, hand, ours))
        print(f"{precision}: hand {hand:.1f} img/s, toolkit {ours:.1f} img/s, ratio {ours / hand:.3f}", flush=True)
    lines = [
        "# Distillation step throughput",
        "",
        f"Command: `python benchmarks/distill_speed.py --steps {args.steps} --warmup {args.warmup} "
        f"--rounds {args.rounds} --precisions {args.precisions}`  ",
        f"Machine: {machine()}  ",
        f"ResNet-18 teacher -> anchored student (mix + regulators), channels_last in both loops, batch {args.batch}, 32x32, "
        f"{args.steps} timed steps after {args.warmup} warm-up steps; the two loops alternate for "
        f"{args.rounds} rounds and each keeps its best.",
        "",
        "| precision | hand-written loop (img/s) | toolkit `distill()` (img/s) | ratio |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {p} | {h:.1f} | {o:.1f} | {o / h:.3f} |" for p, h, o in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
