"""Plain-mode latency at batch 1, where per-call overhead shows most: original vs anchored.

Three rounds of 200 interleaved runs each (after 10 warm-up runs) on torchvision ResNet-18.
    python benchmarks/plain_latency.py      # -> benchmarks/results/plain_latency.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torchvision
from _env import machine  # benchmarks/ is on sys.path when run as a script

from dacnn_convert import anchor
from dacnn_convert.latency import compare_latency


def main() -> None:
    torch.manual_seed(0)
    original = torchvision.models.resnet18(num_classes=10).eval()
    plain = anchor(original, mode="plain", input_size=(3, 32, 32)).eval()
    lines = [
        "# Plain-mode latency, batch 1",
        "",
        "Command: `python benchmarks/plain_latency.py`  ",
        f"Machine: {machine()}  ",
        "torchvision ResNet-18 (10 classes, random weights), 3x32x32, fp32, "
        "200 interleaved runs per round after 10 warm-up runs.",
        "",
        "| round | original median ms | plain median ms | ratio |",
        "|---:|---:|---:|---:|",
    ]
    for rnd in range(3):
        rows = compare_latency({"original": original, "plain": plain}, (3, 32, 32), 1, "fp32", repeats=200, warmup=10)
        a, b = rows[0].median_ms, rows[1].median_ms
        lines.append(f"| {rnd + 1} | {a:.3f} | {b:.3f} | {b / a:.3f}x |")
        print(lines[-1], file=sys.stderr)
    Path("benchmarks/results/plain_latency.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
