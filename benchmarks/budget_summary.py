"""Merge issue 8's benchmark runs into one table and plot: planner vs hand modes vs group-norm.

Reads the bench.json files that benchmarks/budget_bench.sh writes (``hand/`` and one folder per
budget) and, optionally, an earlier bench.json with hand-mode rows made with the same teacher and
fine-tune (``--reuse``). At each budget it compares the planner with (a) the best hand-written
mode that fits the same budget and (b) group-norm pruning at the same budget, and says which wins.

    python benchmarks/budget_summary.py --results benchmarks/results/budget_bench \
        --reuse benchmarks/results/prune_bench/mix-reg/bench.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HAND = ("dacnn-mix", "dacnn-mix-reg", "dacnn-plain")


def load_rows(results: Path, reuse: Path | None) -> tuple[dict, dict[str, dict], dict[str, list[dict]]]:
    """The teacher row, the hand-mode rows by method, and the rows of each budget folder."""
    hand: dict[str, dict] = {}
    teacher: dict = {}
    if reuse is not None:
        data = json.loads(reuse.read_text())
        teacher = data["teacher"]
        for r in data["rows"]:
            if r["method"] in HAND:
                hand[r["method"]] = {**r, "source": str(reuse)}
    if (results / "hand" / "bench.json").exists():
        data = json.loads((results / "hand" / "bench.json").read_text())
        teacher = teacher or data["teacher"]
        for r in data["rows"]:
            hand[r["method"]] = {**r, "source": str(results / "hand" / "bench.json")}
    budgets: dict[str, list[dict]] = {}
    for folder in sorted(results.iterdir()):  # BUDGET/ (seed 0) and BUDGET-seedN/ (repeats)
        if folder.is_dir() and (folder / "bench.json").exists() and folder.name != "hand":
            data = json.loads((folder / "bench.json").read_text())
            budget, _, seed = folder.name.partition("-seed")
            rows = [{**r, "target": data["target_params"], "data_seed": int(seed or 0)} for r in data["rows"]]
            budgets.setdefault(budget, []).extend(rows)
            teacher = teacher or data["teacher"]
    return teacher, hand, budgets


def aggregate(rows: list[dict]) -> dict[str, dict]:
    """Per method: the seed-0 row with ``acc_finetuned`` replaced by the mean over data seeds."""
    out: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: r["data_seed"]):
        entry = out.setdefault(r["method"], {**r, "accs": []})
        entry["accs"].append(r["acc_finetuned"])
        entry["acc_finetuned"] = sum(entry["accs"]) / len(entry["accs"])
    return out


def compare(teacher: dict, hand: dict[str, dict], budgets: dict[str, list[dict]]) -> list[dict]:
    """One verdict per budget."""
    out = []
    for name, rows in budgets.items():
        by = aggregate(rows)
        planner, gn = by.get("dacnn-budget"), by.get("group-norm")
        target = rows[0]["target"]
        fitting = [r for r in hand.values() if r["params"] <= target]
        best_hand = max(fitting, key=lambda r: r["acc_finetuned"]) if fitting else None
        out.append(
            {
                "budget": name,
                "target": target,
                "planner": planner,
                "group_norm": gn,
                "best_hand": best_hand,
                "beats_hand": None
                if best_hand is None or planner is None
                else planner["acc_finetuned"] > best_hand["acc_finetuned"],
                "beats_group_norm": None
                if gn is None or planner is None
                else planner["acc_finetuned"] > gn["acc_finetuned"],
            }
        )
    return out


def _pct(r: dict | None) -> str:
    """Accuracy in percent; the mean and each seed when there are repeats."""
    if r is None:
        return "—"
    accs = r.get("accs", [r["acc_finetuned"]])
    each = f" ({' / '.join(f'{100 * a:.2f}' for a in accs)})" if len(accs) > 1 else ""
    return f"{100 * r['acc_finetuned']:.2f}{each}"


def to_markdown(teacher: dict, hand: dict[str, dict], budgets: dict[str, list[dict]], verdicts: list[dict]) -> str:
    yes = {True: "yes", False: "**no**", None: "—"}
    lines = [
        "# Budget planner vs hand-written modes vs group-norm (ResNet-18, Fashion-MNIST)",
        "",
        (
            f"Teacher: {teacher['params']:,} unique params, {100 * teacher['acc_finetuned']:.2f}%. "
            "Every model: BN recalibration, then the same KD fine-tune (see each bench.md for the command). "
            "With repeats (BUDGET-seedN/: another training subset and data order), accuracies are means, "
            "each seed in brackets. Hand modes have one size whatever the budget; the best one that fits "
            "the budget is compared."
        ),
        "",
        (
            "| budget | target params | planner: sections, params, acc | best hand mode within budget | group-norm: params, acc "
            "| planner beats hand mode | planner beats group-norm |"
        ),
        "|---|---:|---|---|---|---|---|",
    ]
    for v in verdicts:
        p, h, g = v["planner"], v["best_hand"], v["group_norm"]
        if p is None:
            ptxt = "—"
        else:  # notes: "sections free/mix/..., regulators 2,3, kl sensitivity"
            secs, _, rest = p["notes"].removeprefix("sections ").partition(", regulators ")
            regs = rest.rsplit(",", 1)[0]
            ptxt = f"{secs}, regulators in {regs}, {p['params']:,}, {_pct(p)}"
        htxt = "none fits" if h is None else f"{h['method']}, {h['params']:,}, {_pct(h)}"
        gtxt = "—" if g is None else f"{g['params']:,}, {_pct(g)}"
        lines.append(
            f"| {float(v['budget']):.0%} | {v['target']:,} | {ptxt} | {htxt} | {gtxt} | "
            f"{yes[v['beats_hand']]} | {yes[v['beats_group_norm']]} |"
        )
    lines += [
        "",
        "All rows:",
        "",
        "| run | method | data seed | params | acc calibrated | acc fine-tuned | drop | notes |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in hand.values():
        lines.append(
            f"| hand ({Path(r['source']).parent.name}) | {r['method']} | 0 | {r['params']:,} | "
            f"{100 * r['acc_calibrated']:.2f} | {_pct(r)} | {100 * r['drop']:.2f} | {r['notes']} |"
        )
    for name, rows in budgets.items():
        for r in rows:
            lines.append(
                f"| {float(name):.0%} | {r['method']} | {r['data_seed']} | {r['params']:,} | {100 * r['acc_calibrated']:.2f} | "
                f"{_pct(r)} | {100 * r['drop']:.2f} | {r['notes']} |"
            )
    return "\n".join(lines) + "\n"


def plot(teacher: dict, hand: dict[str, dict], budgets: dict[str, list[dict]], path: Path) -> None:
    from dacnn_convert.core.report import figure, save_figure

    fig, ax = figure(size=(6.5, 4))
    series: dict[str, list[tuple[float, float]]] = {}
    for r in hand.values():
        series.setdefault(r["method"], []).append((r["params"] / 1e6, 100 * r["acc_finetuned"]))
    for rows in budgets.values():
        for r in aggregate(rows).values():
            series.setdefault(r["method"], []).append((r["params"] / 1e6, 100 * r["acc_finetuned"]))
    styles = {"dacnn-budget": "o-", "group-norm": "s--"}
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot(*zip(*pts, strict=True), styles.get(name, "^"), label=name, markersize=7)
    ax.axhline(100 * teacher["acc_finetuned"], color="grey", lw=0.8, ls=":", label="teacher")
    for name in budgets:
        ax.axvline(float(name) * teacher["params"] / 1e6, color="lightgrey", lw=0.8)
    ax.set_xlabel("unique params (M)")
    ax.set_ylabel("accuracy after fine-tune (%)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/budget_bench"))
    ap.add_argument("--reuse", type=Path, default=None, help="an earlier bench.json with hand-mode rows")
    args = ap.parse_args()
    teacher, hand, budgets = load_rows(args.results, args.reuse)
    verdicts = compare(teacher, hand, budgets)
    (args.results / "summary.md").write_text(to_markdown(teacher, hand, budgets, verdicts))
    (args.results / "summary.json").write_text(json.dumps({"teacher": teacher, "verdicts": verdicts}, indent=2))
    plot(teacher, hand, budgets, args.results / "summary.png")


if __name__ == "__main__":
    main()
