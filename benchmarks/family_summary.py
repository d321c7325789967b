"""Issue 22's family-by-budget table, computed from benchmarks/results/family_bench/ (no figure typed by hand).

Each run folder MODEL-BUDGET[-seedN]/bench.json holds the methods run there; a method missing from it (a re-run
of dacnn-bank and lowrank only, after the planner's output-layer fix of session 12) is read from
before-head-fix/ (group-norm, l1-filter and magnitude do not use the planner, so their rows stand). Folders with
another suffix (-norecon) are variants, not seeds. Where two seeds exist every figure is their mean.

    python benchmarks/family_summary.py            # writes results/family_bench/summary.md and README's block
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "family_bench"
README = ROOT.parent / "README.md"
START, END = "<!-- family-table:start -->", "<!-- family-table:end -->"
METHODS = ("dacnn-bank", "group-norm", "l1-filter", "lowrank", "magnitude")
FAMILIES = ("timm-mobilenetv3_large_100", "timm-efficientnet_b0", "timm-convnext_atto", "vgg11_bn")
BUDGETS = ("0.5", "0.25", "0.1")
RUN = re.compile(r"^(?P<model>.+)-(?P<budget>0\.\d+)(?:-seed(?P<seed>\d+))?$")


def runs() -> dict[tuple[str, str], dict[int, dict]]:
    """(model, budget) -> seed -> {method: row, "teacher": row}."""
    out: dict[tuple[str, str], dict[int, dict]] = {}
    for path in sorted(RESULTS.glob("*/bench.json")):
        m = RUN.match(path.parent.name)
        if m is None:
            continue
        data = json.loads(path.read_text())
        rows = {r["method"]: r for r in data["rows"]}
        old = RESULTS / "before-head-fix" / path.parent.name / "bench.json"
        if old.exists():
            for r in json.loads(old.read_text())["rows"]:
                rows.setdefault(r["method"], r)
        rows["teacher"] = data["teacher"]
        out.setdefault((m["model"], m["budget"]), {})[int(m["seed"] or 0)] = rows
    return out


def _mean(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.fmean(got) if len(got) == len(values) and got else None


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


def table() -> tuple[str, list[str]]:
    found = runs()
    head = (
        "| family | budget | seeds | " + " | ".join(METHODS) + " | dacnn-bank − group-norm "
        "| dacnn-bank before training: after BN recal. / after reconstruction | teacher "
        "| MACs dacnn-bank / group-norm | latency at batch 1, x the teacher's: dacnn-bank / group-norm |"
    )
    lines = [head, "|" + "---|" * 3 + "---:|" * (len(METHODS) + 3) + "---|---|"]
    verdicts = []
    for family in FAMILIES:
        for budget in BUDGETS:
            seeds = found.get((family, budget))
            if not seeds:
                continue
            per = [seeds[s] for s in sorted(seeds)]

            def mean(method: str, key: str, per: list[dict] = per) -> float | None:
                return _mean([r[method].get(key) if method in r else None for r in per])

            accs = {m: mean(m, "acc_finetuned") for m in METHODS}
            bank, gn = accs["dacnn-bank"], accs["group-norm"]
            gap = "–" if bank is None or gn is None else f"{100 * (bank - gn):+.2f}"
            before = f"{_pct(mean('dacnn-bank', 'acc_calibrated'))} / {_pct(mean('dacnn-bank', 'acc_reconstructed'))}"
            teacher = mean("teacher", "acc_finetuned")
            macs = [mean(m, "macs") for m in ("dacnn-bank", "group-norm")]
            lat = [  # each against the teacher timed in the same run (interleaved): contention cancels out
                _mean([r[m]["latency_b1_ms"] / r["teacher"]["latency_b1_ms"] if m in r else None for r in per])
                for m in ("dacnn-bank", "group-norm")
            ]
            best = max((v, m) for m, v in accs.items() if v is not None)[1] if any(accs.values()) else None
            cells = [f"**{_pct(v)}**" if m == best else _pct(v) for m, v in accs.items()]
            lines.append(
                f"| {family.removeprefix('timm-')} | {float(budget):.0%} | {len(per)} | "
                + " | ".join(cells)
                + f" | {gap} | {before} | {_pct(teacher)} | "
                + " / ".join("–" if v is None else f"{v / 1e6:.1f}M" for v in macs)
                + " | "
                + " / ".join("–" if v is None else f"{v:.2f}x" for v in lat)
                + " |"
            )
            name = f"{family.removeprefix('timm-')} at {float(budget):.0%}"
            if budget in ("0.25", "0.1") and bank is not None and gn is not None:
                ok = "ahead of" if bank > gn else "behind"
                seeds_said = "mean of 2 seeds" if len(per) >= 2 else "1 seed: the target needs 2"
                verdicts.append(f"- {name}: dacnn-bank {ok} group-norm by {100 * abs(bank - gn):.2f} ({seeds_said})")
            calibrated = mean("dacnn-bank", "acc_calibrated")
            if budget == "0.25" and calibrated is not None and teacher is not None:
                within = "within" if teacher - calibrated <= 0.02 else "not within"
                verdicts.append(
                    f"- {name}: after conversion + BN recalibration {100 * (teacher - calibrated):.2f} below the "
                    f"teacher: {within} 2 points"
                )
    return "\n".join(lines), verdicts


def main() -> int:
    body, verdicts = table()
    text = body + "\n\nAgainst issue 22's targets (computed):\n" + "\n".join(verdicts) + "\n"
    (RESULTS / "summary.md").write_text(
        "# Issue 22: every family (computed by benchmarks/family_summary.py)\n\n" + text
    )
    readme = README.read_text()
    if START in readme and END in readme:
        before, rest = readme.split(START, 1)
        _, after = rest.split(END, 1)
        README.write_text(before + START + "\n" + text + END + after)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
