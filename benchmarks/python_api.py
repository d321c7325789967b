"""Issue 14's benchmark: the README's Python snippets, run verbatim with plain torchvision loaders.

A user who writes Python instead of using the CLI must get the same good result. This script
reads the snippets marked ``<!-- python-api: NAME -->`` in README.md and executes them
unchanged, with ``teacher``, ``train_loader`` and ``val_loader`` defined the way a user would
define them: a stock ``torchvision.models.resnet18(num_classes=10)`` loaded from the
Fashion-MNIST teacher of benchmarks/prune_bench.sh, and ``torchvision.datasets.FashionMNIST``
with ordinary transforms, one epoch = a fixed 12,800-image subset (100 batches of 128).

    python benchmarks/python_api.py                        # every README snippet + the issue's original call
    python benchmarks/python_api.py --sweep                # the fine-tune defaults: lr x warm-up, BN batches
    python benchmarks/python_api.py --regulators           # issue 28: mix/plain/sharesnet, fitted vs zero regulators

Results (markdown + json, with machine and date) go to benchmarks/results/python_api/.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import re
import shutil
import time
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Subset
from torchvision import transforms as T

ROOT = Path(__file__).resolve().parents[1]
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
RESULTS = ROOT / "benchmarks" / "results" / "python_api"
# What torchvision's own example code would do before README snippets: the measured call.
ORIGINAL = """\
from dacnn_convert import anchor, distill

student = anchor(teacher, mode="mix", regulators="all")
result = distill(student, teacher, train_loader, val_loader, epochs=1)
"""


def readme_snippets() -> dict[str, str]:
    """The code blocks of README.md that follow a ``<!-- python-api: NAME -->`` marker."""
    text = (ROOT / "README.md").read_text()
    found = re.findall(r"<!-- python-api: ([\w-]+) -->\s*```python\n(.*?)```", text, flags=re.S)
    if not found:
        raise SystemExit("README.md has no <!-- python-api: NAME --> snippets")
    return dict(found)


def fashion_root(cache: Path) -> Path:
    """torchvision's FashionMNIST folder layout, unpacked from Debian's dataset-fashion-mnist (offline)."""
    raw = cache / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for gz in DEBIAN.glob("*.gz"):
        target = raw / gz.stem
        if not target.exists():
            with gzip.open(gz) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst)
    return cache


def loaders(seed: int, images: int) -> tuple[DataLoader, DataLoader]:
    """Plain torchvision loaders: the teacher's 32 px, 3-channel, normalised input, random flips."""
    norm = T.Normalize([0.2860] * 3, [0.3530] * 3)  # Fashion-MNIST's training-set mean and std
    train_tf = T.Compose([T.Resize(32), T.Grayscale(3), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    val_tf = T.Compose([T.Resize(32), T.Grayscale(3), T.ToTensor(), norm])
    root = fashion_root(Path.home() / ".cache" / "dacnn-bench")
    train = torchvision.datasets.FashionMNIST(str(root), train=True, transform=train_tf)
    val = torchvision.datasets.FashionMNIST(str(root), train=False, transform=val_tf)
    keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:images]
    g = torch.Generator().manual_seed(seed)
    return (
        DataLoader(Subset(train, keep.tolist()), batch_size=128, shuffle=True, generator=g),
        DataLoader(val, batch_size=256),
    )


def teacher_model(weights: Path) -> torch.nn.Module:
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


def run_snippet(code: str, teacher: torch.nn.Module, train_loader: DataLoader, val_loader: DataLoader) -> dict:
    """Execute ``code`` as a user's script would and read back the student and its accuracy."""
    from dacnn_convert import count_params
    from dacnn_convert.train import evaluate

    scope = {"teacher": teacher, "train_loader": train_loader, "val_loader": val_loader}
    start = time.perf_counter()
    exec(compile(code, "<README snippet>", "exec"), scope)  # noqa: S102 - the README's own code
    wall = time.perf_counter() - start
    result = scope["result"]
    student = getattr(result, "model", None) or scope["student"]
    return {
        "student_acc": evaluate(student, val_loader, "fp32"),
        "student_params": count_params(student),
        "notes": list((result.fit if hasattr(result, "fit") else result).notes),
        "wall_s": wall,
    }


def sweep(teacher: torch.nn.Module, train_loader: DataLoader, val_loader: DataLoader, teacher_acc: float) -> list[dict]:
    """Fine-tune settings for distill()'s default, and BN calibration batches, on the mix + regulators student."""
    import copy

    from dacnn_convert import TrainConfig, anchor, distill, recalibrate_bn
    from dacnn_convert.train import evaluate

    rows = []
    base = anchor(teacher, mode="mix", regulators="all", calib_loader=train_loader, calib_batches=50)
    for batches in (10, 20, 50, 100):
        student = copy.deepcopy(base)
        recalibrate_bn(student, train_loader, batches)
        rows.append(
            {
                "what": f"BN recalibration on {batches} batches (no training)",
                "acc": evaluate(student, val_loader, "fp32"),
                "teacher_acc": teacher_acc,
            }
        )
        print(rows[-1], flush=True)
    for lr in (0.005, 0.01, 0.02, 0.05):
        for warmup in (0, 20):
            student = copy.deepcopy(base)
            cfg = TrainConfig.finetune(lr=lr, warmup_steps=warmup, precision="fp32")
            fit = distill(student, teacher, train_loader, val_loader, epochs=1, config=cfg)
            rows.append(
                {
                    "what": f"distill 1 epoch, lr {lr}, warm-up {warmup} steps",
                    "acc": fit.final_acc,
                    "teacher_acc": teacher_acc,
                    "wall_s": fit.wall_s,
                }
            )
            print(rows[-1], flush=True)
    return rows


# Issue 28: the paper's modes through anchor() + distill(epochs=1), with and without data, regulators
# fitted in closed form ("fit") or zero-initialised ("zero"), section-wise reconstruction on or off
# (None: the default, on with data for these modes); (mode, regulator_init, with data, reconstruct)
REGULATOR_ROWS = (
    ("mix", "fit", True, None),
    ("mix", "fit", True, False),
    ("mix", "zero", True, False),
    ("mix", "fit", False, None),
    ("mix", "zero", False, None),
    ("plain", "fit", True, None),
    ("sharesnet", "fit", True, None),
    ("plain", "fit", False, None),
    ("sharesnet", "fit", False, None),
)


def regulator_rows(
    teacher: torch.nn.Module, train_loader: DataLoader, val_loader: DataLoader, header: dict, seed: int
) -> list[dict]:
    """anchor(teacher, mode=M, regulators="all"[, calib_loader=train_loader], regulator_init=R) + distill(epochs=1).

    Accuracy right after conversion (with data: after the fit and anchor()'s BN recalibration; without:
    after recalibrating a copy on 50 batches, as distill() does first) and after the epoch. Rows are
    written as they finish (regulators.json / regulators.md).
    """
    import copy

    from dacnn_convert import anchor, count_params, distill, recalibrate_bn
    from dacnn_convert.train import evaluate

    rows: list[dict] = []
    for mode, reg_init, with_data, rebuild in REGULATOR_ROWS:
        torch.manual_seed(seed)
        start = time.perf_counter()
        kwargs = {"calib_loader": train_loader, "reconstruct": rebuild} if with_data else {}
        student = anchor(teacher, mode=mode, regulators="all", regulator_init=reg_init, **kwargs)
        convert_s = time.perf_counter() - start
        probe = student if with_data else copy.deepcopy(student)
        if not with_data:
            recalibrate_bn(probe, train_loader, 50)
        converted = evaluate(probe, val_loader, "fp32")
        fit = distill(student, teacher, train_loader, val_loader, epochs=1)
        rows.append(
            {
                "mode": mode,
                "regulator_init": reg_init,
                "data": with_data,
                "reconstruct": with_data and rebuild is not False,
                "init": student.dacnn_plan.init,
                "params": count_params(student),
                "converted_acc": converted,
                "finetuned_acc": fit.final_acc,
                "convert_s": convert_s,
                "wall_s": time.perf_counter() - start,
            }
        )
        print(rows[-1], flush=True)
        (RESULTS / "regulators.json").write_text(json.dumps({**header, "rows": rows}, indent=2))
        (RESULTS / "regulators.md").write_text(regulators_markdown(header, rows))
    return rows


def regulators_markdown(header: dict, rows: list[dict]) -> str:
    t = 100 * header["teacher_acc"]
    lines = [
        "# The paper's modes through anchor() + distill(epochs=1): fitted vs zero regulators (issue 28)",
        "",
        f"`{header['command']}` on {header['machine']}; {header['versions']}; {header['date']}. Teacher "
        f"`{header['teacher']}` {t:.2f}%; one epoch = {header['train_images']:,} images (100 steps of 128). "
        "Converted: with data, after the fit, anchor()'s BN recalibration (50 batches) and, where marked, "
        "section-wise reconstruction (300 steps per section on 20 batches); without data, after "
        "recalibrating a copy on 50 batches (what distill() does first).",
        "",
        "| mode | regulators | data | init | reconstruction | params | converted | drop | after 1 epoch | drop "
        "| convert s | wall s |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c, f = 100 * r["converted_acc"], 100 * r["finetuned_acc"]
        lines.append(
            f"| {r['mode']} | all, {r['regulator_init']} | {'calib_loader' if r['data'] else 'weights only'} | "
            f"{r['init']} | {'yes' if r['reconstruct'] else 'no'} | {r['params']:,} | {c:.2f}% | {t - c:.2f} | "
            f"{f:.2f}% | {t - f:.2f} | "
            f"{r['convert_s']:.0f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", type=Path, default=ROOT / "runs/prune-bench/teacher/best.safetensors")
    ap.add_argument("--images", type=int, default=12800, help="training images per epoch (a fixed subset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep", action="store_true", help="measure distill()'s defaults instead of the snippets")
    ap.add_argument("--only", default=None, help="comma-separated snippet names")
    ap.add_argument("--regulators", action="store_true", help="issue 28: the paper's modes, fitted vs zero regulators")
    args = ap.parse_args()
    if not args.teacher.is_file():
        raise SystemExit(f"no teacher at {args.teacher}: run benchmarks/prune_bench.sh first (it trains it)")
    from dacnn_convert.train import evaluate

    torch.manual_seed(args.seed)
    teacher = teacher_model(args.teacher)
    train_loader, val_loader = loaders(args.seed, args.images)
    teacher_acc = evaluate(teacher, val_loader, "fp32")
    print(f"teacher {100 * teacher_acc:.2f}%", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    header = {
        "command": "python benchmarks/python_api.py"
        + (" --sweep" if args.sweep else "")
        + (" --regulators" if args.regulators else ""),
        "machine": f"{cpu_name()} ({platform.machine()}), {torch.get_num_threads()} threads, "
        + (
            f"GPU {torch.cuda.get_device_name()} (unused: the snippets run on the CPU)"
            if torch.cuda.is_available()
            else "no GPU"
        ),
        "versions": f"torch {torch.__version__}, torchvision {torchvision.__version__}, python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "teacher": str(args.teacher.relative_to(ROOT)) if args.teacher.is_relative_to(ROOT) else str(args.teacher),
        "teacher_acc": teacher_acc,
        "train_images": args.images,
        "seed": args.seed,
    }
    if args.regulators:
        regulator_rows(teacher, train_loader, val_loader, header, args.seed)
        return
    if args.sweep:
        rows = sweep(teacher, train_loader, val_loader, teacher_acc)
        (RESULTS / "sweep.json").write_text(json.dumps({**header, "rows": rows}, indent=2))
        return
    snippets = {**readme_snippets(), "issue-14-original": ORIGINAL}
    if args.only:
        snippets = {k: v for k, v in snippets.items() if k in args.only.split(",")}
    done = RESULTS / "snippets.json"
    rows = (
        [r for r in json.loads(done.read_text())["rows"] if r["snippet"] not in snippets]
        if (args.only and done.is_file())
        else []
    )  # --only reruns some rows and keeps the others
    for name, code in snippets.items():
        torch.manual_seed(args.seed)
        row = {"snippet": name, "code": code, **run_snippet(code, teacher, train_loader, val_loader)}
        row["drop_points"] = 100 * (teacher_acc - row["student_acc"])
        rows.append(row)
        print(
            f"{name}: {100 * row['student_acc']:.2f}% (drop {row['drop_points']:.2f} points, "
            f"{row['student_params']:,} params, {row['wall_s']:.0f} s)",
            flush=True,
        )
        done.write_text(json.dumps({**header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
