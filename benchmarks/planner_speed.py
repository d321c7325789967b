"""Issue 22's planner budget: time and peak memory of the size-targeted search, per model.

Each model is planned in a fresh process (which reports its own peak RSS) with
randomly initialised weights (speed does not depend on them):

    python benchmarks/planner_speed.py                      # every torchvision classification model, 64 px, no data
    python benchmarks/planner_speed.py --models resnet50 --side 224 --dataset fashion-mnist   # kl, 8 batches

Rows are appended to the markdown table as they finish (``--out``), so a stopped run keeps what
it measured and a rerun skips the models already there. Targets (issue 22): under 3 minutes and
3 GB per model without data; under 5 minutes for ResNet-50 at 224 with 8 calibration batches.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _env import machine  # noqa: E402

CHILD = r"""
import json, sys, time
import torch
from dacnn_convert.budget import search
from dacnn_convert.core.plan import count_params
from dacnn_convert.errors import DacnnError
from dacnn_convert.io.sources import build_model, parse_spec
name, side, ratio, dataset = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
model = build_model(parse_spec(name, 10), weights=None).eval()
total = count_params(model)
loader = None
if dataset != "none":
    from dacnn_convert.train import make_loaders
    loader = make_loaders(dataset, batch_size=32, input_size=side, channels=3).train
start = time.perf_counter()
try:
    r = search(model, int(total / ratio), (3, side, side), calib_loader=loader)
    row = {"params": total, "after": r.plan.params_after, "sections": len(r.plan.sections), "result": "planned"}
except DacnnError as exc:
    row = {"params": total, "after": None, "sections": None, "result": str(exc).split(":")[0][:80]}
row["seconds"] = time.perf_counter() - start
import resource
row["rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
print(json.dumps(row))
"""


def _side(name: str, side: int) -> int:
    """The smallest input some families run on."""
    need = {"inception_v3": 75, "maxvit_t": 224}
    return max(side, need.get(name, 224 if name.startswith("vit_") else 0))


def main() -> None:
    import torchvision

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="", help="comma-separated; default every torchvision classification model")
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=4.0)
    ap.add_argument("--dataset", default="none")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/planner_speed.md"))
    args = ap.parse_args()
    names = args.models.split(",") if args.models else torchvision.models.list_models(module=torchvision.models)
    done = set()
    if args.out.exists():
        done = {line.split("|")[1].strip() for line in args.out.read_text().splitlines() if line.startswith("| ")}
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"# Planner time and memory (issue 22)\n\n`{' '.join(sys.argv)}` on {machine()}, "
            f"{time.strftime('%Y-%m-%d')}; target {args.ratio}x fewer unique params, data: {args.dataset}, "
            "random weights, one fresh process per model (peak RSS of that process).\n\n"
            "| model | side | params | planned params | sections | result | seconds | peak RSS GB |\n"
            "|---|---:|---:|---:|---:|---|---:|---:|\n"
        )
    for name in names:
        if name in done or name == "model":
            continue
        side = _side(name, args.side)
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, name, str(side), str(args.ratio), args.dataset],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            out, err = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        try:
            row = json.loads(out.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            row = {"params": None, "after": None, "sections": None, "seconds": None, "rss_gb": float("nan")}
            row["result"] = "timeout" if proc.returncode in (-9, None) else (err.strip().splitlines() or ["?"])[-1][:80]
        after = f"{row['after']:,}" if row["after"] else "-"
        params = f"{row['params']:,}" if row["params"] else "-"
        secs = f"{row['seconds']:.1f}" if row["seconds"] is not None else "-"
        line = f"| {name} | {side} | {params} | {after} | {row['sections'] or '-'} | {row['result']} | {secs} | {row['rss_gb']:.2f} |\n"
        with args.out.open("a") as f:
            f.write(line)
        print(line, end="", flush=True)


if __name__ == "__main__":
    main()
