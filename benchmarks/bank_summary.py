"""Merge issue 13's bench runs (benchmarks/bank_bench.sh) into one table and plot per budget.

    python benchmarks/bank_summary.py [--results benchmarks/results/bank_bench]

Every BUDGET-TAG[-seedN]/bench.json is read; rows of one method at one budget are averaged over
the seeds present (each seed shown too). Targets of the issue are checked for dacnn-bank:
drop <= 0.1 / 0.3 / 1.0 points at 50% / 25% / 10%, ahead of group-norm at every budget, and
within 1.5 points of the teacher after BN recalibration alone at 25%.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

TARGET_DROP = {0.5: 0.1, 0.25: 0.3, 0.1: 1.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results/bank_bench"))
    args = ap.parse_args()
    rows: dict[float, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    teachers: dict[float, float] = {}
    meta: dict[str, str] = {}
    for f in sorted(args.results.glob("*/bench.json")):
        d = json.loads(f.read_text())
        budget = float(d["config"]["budget"])
        teachers[budget] = d["teacher"]["acc_finetuned"]
        meta = d.get("meta", meta)
        for r in d["rows"]:
            rows[budget][r["method"]].append(r)
    lines = ["# Filter banks vs the baselines at 50%, 25% and 10% of the teacher (issue 13)", ""]
    lines += [f"{k}: {v}  " for k, v in meta.items()]
    lines += ["", "Per budget: `bash benchmarks/bank_bench.sh` (each run's bench.md beside this file); "
              "accuracies in %, mean over the data seeds present (each seed in brackets).", ""]
    verdicts = []
    for budget in sorted(rows, reverse=True):
        t = 100 * teachers[budget]
        lines += [f"## {budget:.0%} of the teacher's parameters (teacher {t:.2f}%)", "",
                  "| method | unique params | MACs | CPU ms b1 / b64 | after compression | + BN recal | fine-tuned | drop |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        means = {}
        for method, rs in sorted(rows[budget].items(), key=lambda kv: -statistics.fmean(r["acc_finetuned"] for r in kv[1])):
            fine = [100 * r["acc_finetuned"] for r in rs]
            mean = statistics.fmean(fine)
            means[method] = (mean, statistics.fmean(100 * r["acc_calibrated"] for r in rs))
            seeds = f" ({' / '.join(f'{v:.2f}' for v in fine)})" if len(rs) > 1 else ""
            r0 = rs[0]
            lines.append(f"| {method} | {r0['params']:,} | {r0['macs'] / 1e6:.1f}M | {r0['latency_b1_ms'] or 0:.2f} / "
                         f"{r0['latency_b64_ms'] or 0:.1f} | {statistics.fmean(100 * r['acc_compressed'] for r in rs):.2f} | "
                         f"{means[method][1]:.2f} | {mean:.2f}{seeds} | {t - mean:.2f} |")  # fmt: skip
        lines.append("")
        if "dacnn-bank" in means:
            bank, recal = means["dacnn-bank"]
            target = TARGET_DROP.get(round(budget, 2))
            if target is not None:
                verdicts.append(f"- {budget:.0%}: drop {t - bank:.2f} (target <= {target}): "
                                f"{'met' if t - bank <= target else 'missed'}")  # fmt: skip
            if "group-norm" in means:
                gap = bank - means["group-norm"][0]
                verdicts.append(f"- {budget:.0%}: vs group-norm {gap:+.2f} points: {'ahead' if gap > 0 else 'behind'}")
            if round(budget, 2) == 0.25:
                verdicts.append(f"- 25%: after BN recalibration alone {t - recal:.2f} points below the teacher "
                                f"(target <= 1.5): {'met' if t - recal <= 1.5 else 'missed'}")  # fmt: skip
    lines += ["## Targets (dacnn-bank)", "", *verdicts]
    (args.results / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
