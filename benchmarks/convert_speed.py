"""Conversion speed and memory: trace + plan + apply + fit init, per model, on 2 threads.

Each model runs in a fresh subprocess so peak RSS is its own. Targets (issue #2):
under 1 s for resnet50 and under 3 s for every model; peak RSS above the interpreter's
baseline (torch and timm imported) under 3x the model's parameter bytes.

    python benchmarks/convert_speed.py [--mode mix] [--repeats 3] [--out benchmarks/results/convert_speed.md]

Filter banks fitted to activations (issue 13: resnet50 at 224 with 20 calibration batches of 32
under 2 minutes and 3 GB peak RSS; ResNet-18 at 32 px under 30 s), calibration batches of random
images (speed and memory do not depend on their content):

    python benchmarks/convert_speed.py --mode bank --bank-size 0.25 --calib 20 --calib-batch 32 \
        --models resnet50,resnet18@32 --repeats 1 --out benchmarks/results/convert_speed_bank.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MODELS = ["resnet18", "resnet34", "resnet50", "vgg16_bn", "timm:resnet50d", "timm:efficientnet_b0", "timm:regnetx_002"]

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(2)
import timm, torchvision
from dacnn_convert import convert, plan
from dacnn_convert.io.sources import build_model, parse_spec, default_input_size

name, mode, repeats, bank, calib, calib_batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
name, _, px = name.partition("@")
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
spec = parse_spec(name)
# Warm up on a tiny net so lazily imported modules and allocator pools count as baseline.
tiny = torch.nn.Sequential(*[m for _ in range(3) for m in (torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4))])
convert(tiny, plan(tiny, input_size=(4, 8, 8)))
base = rss()
model = build_model(spec, weights="none").eval()
size = (3, int(px), int(px)) if px else default_input_size(model)
g = torch.Generator().manual_seed(0)
data = [(torch.randn(calib_batch, *size, generator=g), None) for _ in range(calib)] if calib else None
init = "act" if calib else "fit"
model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
times = []
for _ in range(repeats):
    t = time.perf_counter()
    p = plan(model, mode=mode, input_size=size, init=init, bank_size=float(bank) if "." in bank else int(bank))
    student = convert(model, p, calib_loader=data, calib_batches=calib).model
    times.append(time.perf_counter() - t)
    del student
print(json.dumps({"model": name, "input": "x".join(map(str, size)), "groups": len(p.groups),
                  "params": p.params_before, "params_after": p.params_after, "best_s": min(times),
                  "median_s": sorted(times)[len(times) // 2], "model_mb": model_bytes / 2**20,
                  "peak_over_base_mb": (rss() - base) / 2**20, "rss_ratio": (rss() - base) / model_bytes,
                  "peak_mb": rss() / 2**20}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="mix")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bank-size", default="0.5", help="with --mode bank")
    ap.add_argument("--calib", type=int, default=0, help="calibration batches for the data-aware fit (0: weights only)")
    ap.add_argument("--calib-batch", type=int, default=32)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/convert_speed.md"))
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        res = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                name,
                args.mode,
                str(args.repeats),
                args.bank_size,
                str(args.calib),
                str(args.calib_batch),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    from _env import machine  # benchmarks/ is on sys.path when run as a script

    lines = [
        f"# Conversion speed ({args.mode})",
        "",
        f"Command: `python benchmarks/convert_speed.py --mode {args.mode} --repeats {args.repeats}"
        + (f" --bank-size {args.bank_size}" if args.mode == "bank" else "")
        + (f" --calib {args.calib} --calib-batch {args.calib_batch}" if args.calib else "")
        + f" --models {args.models}`  ",
        f"Machine: {machine()} (each conversion pinned to 2 threads)  ",
        "Time = trace + shape propagation + plan + deep copy + fit init + apply (best of repeats; random weights).  ",
        "RSS = peak resident memory (model build included) above the baseline after imports and a warm-up conversion of a "
        "3-conv toy net, over the model's parameter bytes.",
        "",
        "| model | input | groups | params | params after | time best (s) | time median (s) | model MB | peak RSS over base (MB) | RSS / model | peak RSS (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['input']} | {r['groups']} | {r['params']:,} | {r['params_after']:,} | {r['best_s']:.3f} "
            f"| {r['median_s']:.3f} | {r['model_mb']:.1f} | {r['peak_over_base_mb']:.1f} | {r['rss_ratio']:.2f} | {r['peak_mb']:.0f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
