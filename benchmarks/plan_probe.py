"""The planner's plan for a Fashion-MNIST teacher and how much it keeps right after conversion (act fit on
20 batches + BN recalibration), no reconstruction, no training; the search's whole-plan kl printed.

    python benchmarks/plan_probe.py timm:efficientnet_b0 \
        runs/family-bench/teacher-timm-efficientnet_b0/best.safetensors 4
    python benchmarks/plan_probe.py MODEL WEIGHTS RATIO reconstruct   # then section-wise reconstruction too

Used in session 11 for EfficientNet-B0 at 25% (results/family_bench/NOTES.md): 26.45% on the 10,000 test
images with per-group bank sizes, 499 s of search (AMD EPYC, 2 cores, fp32, 2026-12-07). Session 12, with the
output layer kept at full rank and per-group re-scoring: 79.13% (whole-plan kl 0.152), 597 s of search.
"""

import sys
import time

import torch

from dacnn_convert import AnchorConfig, count_params
from dacnn_convert.core.convert import convert
from dacnn_convert.io.sources import build_model, parse_spec
from dacnn_convert.pipeline import plan_search
from dacnn_convert.train.calibrate import recalibrate_bn
from dacnn_convert.train.data import make_loaders
from dacnn_convert.train.evaluation import evaluate

torch.manual_seed(0)
name, w, ratio = sys.argv[1], sys.argv[2], float(sys.argv[3])
teacher = build_model(parse_spec(name, 10), w).eval()
data = make_loaders("fashion-mnist", batch_size=128, train_limit=10000, seed=0)
t = time.time()
plan, found = plan_search(teacher, AnchorConfig(target_ratio=ratio), data.train, (3, 32, 32))
print(f"search {time.time() - t:.0f}s", "/".join(found.choice), "/".join(found.ranks), flush=True)
print("\n".join(line for line in found.explain() if "re-scored" in line or line.startswith("target")), flush=True)
calib = [b for i, b in enumerate(data.train) if i < 20]
st = convert(teacher, plan, calib_loader=calib, calib_batches=20).model
recalibrate_bn(st, calib, 20)
print(
    f"params {count_params(st):,} acc after fit+BN {evaluate(st, data.val, precision='fp32'):.4f} (teacher {evaluate(teacher, data.val, precision='fp32'):.4f})",
    flush=True,
)
if sys.argv[4:] == ["reconstruct"]:
    from dacnn_convert.train.reconstruct import reconstruct_sections

    done = reconstruct_sections(st, teacher, calib)
    kept = ", ".join(f"{s}: {'kept' if k else 'put back'}" for s, k in zip(done.sections, done.kept, strict=True))
    print(f"acc after reconstruction {evaluate(st, data.val, precision='fp32'):.4f} ({done.wall_s:.0f} s; {kept})")
