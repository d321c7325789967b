"""Issue 16's int8 benchmark: int8 weight storage on top of anchoring, accuracy and bytes.

Each model of the bank benchmark (benchmarks/bank_bench.sh, seed 0 artefacts in
runs/prune-bench/bank-BUDGET-core/) and the teacher is saved again with `--dtype int8`
(per-output-channel symmetric int8 weights, fp32 scales, BN in fp32), loaded back and
evaluated on the 10,000 Fashion-MNIST test images, beside its fp32 file.

    python benchmarks/int8_storage.py        # -> benchmarks/results/int8_storage.md
"""

from __future__ import annotations

import platform
import tempfile
import time
from pathlib import Path

import torch

from dacnn_convert import load, save
from dacnn_convert.train import evaluate, make_loaders

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "prune-bench"


def main() -> None:
    models = {"teacher ResNet-18": RUNS / "teacher" / "best.safetensors"}
    for budget in ("0.5", "0.25", "0.1"):
        models[f"dacnn-bank at {float(budget):.0%}"] = RUNS / f"bank-{budget}-core" / "dacnn-bank" / "model.safetensors"
    missing = [str(p) for p in models.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"run benchmarks/bank_bench.sh first; missing {missing}")
    val = make_loaders("fashion-mnist", batch_size=256).val
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in models.items():
            model = load(path).eval()
            fp32 = save(model, Path(tmp) / "fp32.safetensors")
            int8 = save(model, Path(tmp) / "int8.safetensors", dtype="int8")
            acc32 = evaluate(model, val, "fp32")
            acc8 = evaluate(load(int8).eval(), val, "fp32")
            rows.append((name, fp32.stat().st_size, int8.stat().st_size, acc32, acc8))
            print(rows[-1], flush=True)
    teacher_acc = rows[0][3]
    lines = [
        "# int8 weight storage on top of anchoring (issue 16)",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, no GPU. torch {torch.__version__}. "
        f"Date: {time.strftime('%Y-%m-%d')}.",
        "Command: `python benchmarks/int8_storage.py`; models: the seed-0 "
        'artefacts of `benchmarks/bank_bench.sh` (fine-tuned), saved again with `dtype="int8"` '
        "(per-output-channel symmetric int8, fp32 scales; BatchNorm and biases fp32), loaded back, evaluated "
        "on the 10,000 Fashion-MNIST test images.",
        "",
        "| model | fp32 file (bytes) | int8 file (bytes) | int8 / fp32 | top-1 fp32 | top-1 int8 | int8 loses | vs teacher fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, b32, b8, a32, a8 in rows:
        lines.append(
            f"| {name} | {b32:,} | {b8:,} | {b8 / b32:.1%} | {100 * a32:.2f}% | {100 * a8:.2f}% | "
            f"{100 * (a32 - a8):.2f} | {100 * (teacher_acc - a8):+.2f} |"
        )
    within = [(b8, name) for name, _, b8, _, a8 in rows if teacher_acc - a8 <= 0.01]
    if within:
        b8, name = min(within)
        lines += [
            "",
            f"Smallest file within 1 point of the teacher: {name} in int8, {b8:,} bytes "
            f"({rows[0][1] / b8:.1f}x smaller than the teacher's fp32 file).",
        ]
    out = ROOT / "benchmarks" / "results" / "int8_storage.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
