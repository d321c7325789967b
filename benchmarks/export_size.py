"""Export sizes and CPU latency: do anchored models stay small on disk and as fast as the original?

For each torchvision model and conversion (mix, mix + regulators, plain): unique-parameter
bytes vs the .safetensors, .onnx and TorchScript files; then CPU latency (median of repeated
runs) of the original and the anchored model at batch 1 and 64, fp32 and bf16.

    python benchmarks/export_size.py [--models resnet18,resnet34,vgg16_bn] [--size 32] [--repeats 10]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torchvision
from _env import machine  # benchmarks/ is on sys.path when run as a script

from dacnn_convert import anchor, count_params, export_onnx, export_torchscript, save
from dacnn_convert.latency import compare_latency

CONVERSIONS = [("mix", "none"), ("mix", "all"), ("plain", "none")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,resnet34,vgg16_bn")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/export_size.md"))
    args = ap.parse_args()
    size = (3, args.size, args.size)
    sizes, lat = [], []
    for name in args.models.split(","):
        torch.manual_seed(0)
        original = torchvision.models.get_model(name, num_classes=10).eval()
        variants = {"original": original}
        for mode, regs in CONVERSIONS:
            student = anchor(original, mode=mode, regulators=regs, input_size=size).eval()
            label = mode + (" + regulators" if regs == "all" else "")
            variants[label] = student
            with tempfile.TemporaryDirectory() as tmp:
                st = save(student, Path(tmp) / "m.safetensors", source=name).stat().st_size
                onnx = export_onnx(student, Path(tmp) / "m.onnx", size)
                ts = export_torchscript(student, Path(tmp) / "m.pt", size).stat().st_size
            pbytes = 4 * count_params(student)
            sizes.append((name, label, 4 * count_params(original), pbytes, st, onnx.bytes, ts, onnx.max_abs_diff))
            print(sizes[-1], flush=True)
        for b in map(int, args.batches.split(",")):
            for p in args.precisions.split(","):
                reps = args.repeats if p == "fp32" else max(2, args.repeats // 5)  # bf16 is slow without bf16 units
                for row in compare_latency(variants, size, b, p, repeats=reps):
                    lat.append((name, row.model, b, p, row.median_ms))
                    print(lat[-1], flush=True)
    cmd = (
        f"python benchmarks/export_size.py --models {args.models} --size {args.size} --repeats {args.repeats} "
        f"--batches {args.batches} --precisions {args.precisions}"
    )
    lines = [
        "# Export sizes and CPU latency of anchored models",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {machine()}  ",
        f"torchvision models with 10 classes, random weights, input 3x{args.size}x{args.size}. Bytes in fp32.",
        "",
        "| model | conversion | original params bytes | unique params bytes | .safetensors | .onnx | TorchScript | onnx/params | ORT max abs diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label, ob, pb, st, ox, ts, diff in sizes:
        lines.append(f"| {name} | {label} | {ob:,} | {pb:,} | {st:,} | {ox:,} | {ts:,} | {ox / pb:.4f} | {diff:.1e} |")
    lines += [
        "",
        "Latency: median ms per batch (ratio to the original at the same batch and precision); the "
        "variants of a model run interleaved, so they share the machine's background load.",
        "",
        "| model | variant | batch | precision | median ms | vs original |",
        "|---|---|---:|---|---:|---:|",
    ]
    base = {(n, b, p): ms for n, v, b, p, ms in lat if v == "original"}
    for n, v, b, p, ms in lat:
        lines.append(f"| {n} | {v} | {b} | {p} | {ms:.2f} | {ms / base[(n, b, p)]:.3f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
