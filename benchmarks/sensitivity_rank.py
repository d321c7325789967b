"""Which training-free sensitivity predicts post-fine-tune accuracy better: ``fit`` or ``kl``?

Issue 8's rank-correlation study. On the Fashion-MNIST ResNet-18 teacher of
benchmarks/prune_bench.sh, a fixed set of candidate conversions (per-section free/mix/plain,
no regulators: neither score can value them) is scored the way the budget planner scores
them — the sum over sections of each section's sensitivity converted alone — and then each
candidate gets the same short KD fine-tune. Spearman's rho between each score and the
accuracy after fine-tuning says which one ranks candidates better; it is reported over all
candidates and within size bands (the planner only compares candidates that fit one budget).

    python benchmarks/sensitivity_rank.py                  # ~35 min on 2 CPU cores
    python benchmarks/sensitivity_rank.py --epochs 1 --train-limit 10000 \
        --out benchmarks/results/budget_bench/sensitivity_rank
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dacnn_convert.budget import OPTIONS, Scorer, calibration_reference, compose, score_sections
from dacnn_convert.core.convert import convert
from dacnn_convert.core.plan import count_params
from dacnn_convert.core.planning import make_plan
from dacnn_convert.io.sources import build_model, parse_spec
from dacnn_convert.train import TrainConfig, distill, evaluate, make_loaders
from dacnn_convert.train.calibrate import recalibrate_bn

# Every distinct single-section option, the two hand modes without regulators, and the combinations the
# planner picked or ranked near the top at 25/40/60% of the teacher's size.
CANDIDATES = [
    ("mix", "free", "free", "free"),  # section 1 has one configuration: plain there is the same plan
    ("free", "mix", "free", "free"),
    ("free", "plain", "free", "free"),
    ("free", "free", "mix", "free"),
    ("free", "free", "plain", "free"),
    ("free", "free", "free", "mix"),
    ("free", "free", "free", "plain"),
    ("free", "free", "mix", "mix"),
    ("free", "free", "mix", "plain"),
    ("free", "mix", "mix", "plain"),
    ("free", "plain", "plain", "plain"),
    ("mix", "mix", "mix", "mix"),
    ("plain", "plain", "plain", "plain"),
]


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho: the Pearson correlation of the ranks."""
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx and vy else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="runs/prune-bench/teacher/best.safetensors")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-limit", type=int, default=10000)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--calib-batches", type=int, default=8, help="scoring batches, as the planner in dacnn bench")
    ap.add_argument("--candidates", type=int, default=len(CANDIDATES), help="only the first N (a smoke run)")
    ap.add_argument("--out", default="benchmarks/results/budget_bench/sensitivity_rank")
    args = ap.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    size = (3, 32, 32)
    loaders = make_loaders("fashion-mnist", 128, size[1], size[0], train_limit=args.train_limit, seed=0)
    teacher = build_model(parse_spec("resnet18", 10), args.teacher).eval()
    teacher_acc = evaluate(teacher, loaders.val)
    mix = make_plan(teacher, "mix", "none", "adapter", "act", size)
    plain = make_plan(teacher, "plain", "none", "adapter", "act", size)
    batches, reference = calibration_reference(teacher, loaders.train, args.calib_batches)
    scores = {}
    for metric in ("fit", "kl"):
        t0 = time.perf_counter()
        scores[metric] = {
            (s.section, s.option): s.sensitivity
            for s in score_sections(teacher, mix, plain, metric, Scorer(teacher, batches, reference))
        }
        scores[f"{metric}_s"] = time.perf_counter() - t0
    # distill's per-epoch validation sees one batch (it is not used); accuracy is measured after, on all 10k
    probe = [next(iter(loaders.val))]
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for choice in CANDIDATES[: args.candidates]:
        t0 = time.perf_counter()
        p = compose(mix, plain, choice)
        student = convert(teacher, p, calib_loader=loaders.train, calib_batches=20).model
        for q in student.parameters():
            q.requires_grad_(True)
        recalibrate_bn(student, loaders.train, 20)
        acc_cal = evaluate(student, loaders.val)
        cfg = TrainConfig(epochs=args.epochs, lr=args.lr, seed=0)
        distill(student, teacher, loaders.train, probe, config=cfg)
        acc = evaluate(student, loaders.val)
        row = {
            "choice": "/".join(choice),
            "params": count_params(student),
            "plan_params": p.params_after,
            "fit": sum(scores["fit"][k, o] for k, o in enumerate(choice, 1)),
            "kl": sum(scores["kl"][k, o] for k, o in enumerate(choice, 1)),
            "acc_calibrated": acc_cal,
            "acc_finetuned": acc,
            "wall_s": time.perf_counter() - t0,
        }
        rows.append(row)
        (out / "rows.partial.json").write_text(json.dumps(rows, indent=2))
    acc = [r["acc_finetuned"] for r in rows]
    # a lower sensitivity should mean a higher accuracy: correlate -score with accuracy
    corr = {m: spearman([-r[m] for r in rows], acc) for m in ("fit", "kl")}
    corr["params"] = spearman([r["params"] for r in rows], acc)
    corr_cal = {m: spearman([-r[m] for r in rows], [r["acc_calibrated"] for r in rows]) for m in ("fit", "kl")}
    bands = {}
    for lo, hi in ((0, 0.45), (0.45, 1.01)):
        members = [r for r in rows if lo * count_params(teacher) < r["params"] <= hi * count_params(teacher)]
        if len(members) >= 3:
            a = [r["acc_finetuned"] for r in members]
            bands[f"{lo:.0%}-{min(hi, 1):.0%}"] = {
                "n": len(members),
                **{m: spearman([-r[m] for r in members], a) for m in ("fit", "kl")},
            }
    result = {
        "teacher_acc": teacher_acc,
        "teacher_params": count_params(teacher),
        "options": OPTIONS,
        "section_scores": {m: {f"{k}:{o}": v for (k, o), v in scores[m].items()} for m in ("fit", "kl")},
        "score_seconds": {m: scores[f"{m}_s"] for m in ("fit", "kl")},
        "rows": rows,
        "spearman_finetuned": corr,
        "spearman_calibrated": corr_cal,
        "spearman_bands": bands,
        "config": vars(args),
        "wall_s": time.perf_counter() - started,
    }
    (out / "sensitivity_rank.json").write_text(json.dumps(result, indent=2))
    (out / "rows.partial.json").unlink(missing_ok=True)
    lines = [
        "# Sensitivity vs accuracy after fine-tuning (ResNet-18, Fashion-MNIST)",
        "",
        (
            f"`python benchmarks/sensitivity_rank.py --epochs {args.epochs} --train-limit {args.train_limit}` — "
            f"teacher {100 * teacher_acc:.2f}%, {count_params(teacher):,} params; each candidate: act init, BN "
            f"recalibration (20 batches), KD fine-tune {args.epochs} epoch(s) on {args.train_limit:,} images, lr {args.lr}. "
            f"Scores: the planner's summed per-section sensitivity on {args.calib_batches} calibration batches "
            f"(fit {scores['fit_s']:.0f} s, kl {scores['kl_s']:.0f} s for all sections). Wall time {result['wall_s'] / 60:.0f} min."
        ),
        "",
        "| sections 1/2/3/4 | params | fit | kl | acc calibrated | acc fine-tuned |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: -r["acc_finetuned"]):
        lines.append(
            f"| {r['choice']} | {r['params']:,} | {r['fit']:.4g} | {r['kl']:.4g} | "
            f"{100 * r['acc_calibrated']:.2f} | {100 * r['acc_finetuned']:.2f} |"
        )
    lines += [
        "",
        "Spearman's rho between −sensitivity and accuracy (1 = ranks candidates perfectly):",
        "",
        "| candidates | n | fit | kl |",
        "|---|---:|---:|---:|",
        f"| all, accuracy after fine-tune | {len(rows)} | {corr['fit']:.3f} | {corr['kl']:.3f} |",
        f"| all, accuracy after BN recalibration only | {len(rows)} | {corr_cal['fit']:.3f} | {corr_cal['kl']:.3f} |",
    ]
    for name, b in bands.items():
        lines.append(f"| size {name} of the teacher, after fine-tune | {b['n']} | {b['fit']:.3f} | {b['kl']:.3f} |")
    lines += ["", f"For reference, unique params alone: rho = {corr['params']:.3f}.", ""]
    (out / "sensitivity_rank.md").write_text("\n".join(lines))
    _plot(rows, out / "sensitivity_rank.png")


def _plot(rows: list[dict], path: Path) -> None:
    from dacnn_convert.core.report import figure, save_figure

    fig, axes = figure(1, 2, size=(10, 4))
    for ax, metric in zip(axes, ("fit", "kl"), strict=True):
        ax.scatter(
            [r[metric] for r in rows], [100 * r["acc_finetuned"] for r in rows], c=[r["params"] / 1e6 for r in rows]
        )
        for r in rows:
            ax.annotate(r["choice"], (r[metric], 100 * r["acc_finetuned"]), fontsize=6)
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_xlabel(f"summed {metric} sensitivity")
        ax.set_ylabel("accuracy after fine-tune (%)")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
