"""Issue 27: the paper's claims, one table each, from the rows benchmarks/paper_claims.sh wrote.

Reads RESULTS/*.json (one `dacnn recipe run` record per recipe and seed), writes RESULTS/README.md and the
same tables between the claims markers of docs/paper-tables.md. Each claim's verdict is computed from the
two-seed means, and a difference no larger than the seeds' own spread is called what it is: seed noise.

    python benchmarks/paper_claims_summary.py [RESULTS] [--docs docs/paper-tables.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dacnn_convert.core.models import from_name, kernel_and_fc_params


@dataclass(frozen=True)
class Row:
    recipe: str  # recipes/fashion-mnist/claims_<recipe>.yaml
    label: str
    paper_error: float | None  # CIFAR-100 top-1 error (%), as printed
    paper_params: str  # as printed


@dataclass(frozen=True)
class Claim:
    title: str
    statement: str  # the paper's claim, quoted or paraphrased with its table
    rows: tuple[Row, ...]


CLAIMS = (
    Claim(
        "Sharing within sections keeps the reference's accuracy (Tables 3, 6)",
        '"Mixed DACNN18 has only 0.41% performance drop compared to ResNet18, but model number of parameters is '
        'reduced by 55%"; plain < mixed <= mixed + regulators in accuracy (Table 6: 38.63 / 27.72 / 27.55% error).',
        (
            Row("resnet18", "ResNet-18 (torchvision)", 27.31, "11.13M"),
            Row("dacnn_18_plain", "DACNN-18 plain", 38.63, "0.16M"),
            Row("dacnn_18_mix", "DACNN-18 mix", 27.72, "4.90M"),
            Row("dacnn_18_mix_reg", "DACNN-18 mix + regulators", 27.55, "5.60M"),
        ),
    ),
    Claim(
        "Depth: parameters barely grow, residual depth helps (Table 2)",
        '"model sizes of DACNNs do not increase much as the networks go deeper" (0.165M -> 0.166M -> 0.168M); the '
        "error drops when residual learning comes in at 18 layers (42.37% at 11 -> 38.63% at 18), and 34 layers "
        "are no better than 18 (38.88%).",
        (
            Row("dacnn_11_plain", "plain, 11 layers (non-residual)", 42.37, "0.165M"),
            Row("dacnn_18_plain", "plain, 18 layers (residual)", 38.63, "0.166M"),
            Row("dacnn_34_plain", "plain, 34 layers (residual)", 38.88, "0.168M"),
        ),
    ),
    Claim(
        "Regulators: one per block, more sections are better (Table 4)",
        "Plain DACNN-18: no regulators 38.63%, regulators in section 3 only 37.46% (the best single section), in "
        "all sections 35.39% error.",
        (
            Row("dacnn_18_plain", "none", 38.63, "-"),
            Row("dacnn_18_plain_reg3", "section 3", 37.46, "32K"),
            Row("dacnn_18_plain_reg", "all sections", 35.39, "128K"),
        ),
    ),
    Claim(
        "Free BatchNorm is what makes a shared kernel work (Table 1)",
        '"the network performs poorly without batch normalization ... giving an error of almost random guessing" '
        "(DACNN-18: 38.63% with free BN, 97.17% without). Shared BN (gamma and beta tied across the layers of the "
        "kernel, statistics per layer) is not in the paper: the other side of the same claim.",
        (
            Row("dacnn_18_plain", "free BN (the paper's DACNN)", 38.63, "-"),
            Row("dacnn_18_plain_sharedbn", "shared BN (gamma, beta tied)", None, "-"),
            Row("dacnn_18_plain_nobn", "no BN", 97.17, "-"),
        ),
    ),
)


@dataclass(frozen=True)
class Measured:
    accs: tuple[float, ...]  # top-1 (%) per seed, in seed order
    params: int  # all unique parameters
    paper_count: int  # kernels (each shared one once) + FC: the paper's convention
    wall_s: float

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accs)

    @property
    def spread(self) -> float:
        return max(self.accs) - min(self.accs)


def _model(record: dict) -> str:
    return str(record["model"])


def read(results: Path) -> dict[str, Measured]:
    """Every recipe's seeds, keyed by the recipe's stem without ``claims_``."""
    by: dict[str, list[dict]] = {}
    for path in _rows(results):
        record = json.loads(path.read_text())
        stem = Path(record["recipe"]).stem.removeprefix("claims_")
        by.setdefault(stem, []).append(record)
    out = {}
    for stem, records in by.items():
        records.sort(key=lambda r: r.get("seed", 0))
        name = _model(records[0])
        model = from_name(name.removeprefix("dacnn:"), 10) if name.startswith("dacnn:") else None
        if model is None:
            import torchvision

            model = getattr(torchvision.models, name)(num_classes=10)
        out[stem] = Measured(
            tuple(100 * r["accuracy"] for r in records),
            int(records[0]["params"]),
            kernel_and_fc_params(model),
            sum(r["wall_s"] for r in records),
        )
    return out


def _rows(results: Path) -> list[Path]:
    return [p for p in sorted(results.glob("*.json")) if not p.stem.endswith("_history")]


def _beats(a: Measured, b: Measured) -> str:
    """'yes', 'no' or 'seed noise': whether ``a`` is more accurate than ``b`` beyond either row's seed spread."""
    diff = a.mean - b.mean
    if len(a.accs) < 2 or len(b.accs) < 2:
        return "yes (one seed)" if diff > 0 else "no (one seed)"
    if abs(diff) <= max(a.spread, b.spread):
        return "seed noise"
    return "yes" if diff > 0 else "no"


def verdicts(claim: Claim, got: dict[str, Measured]) -> list[str]:
    """What the measurement says about each part of the claim."""
    m = {r.recipe: got.get(r.recipe) for r in claim.rows}
    if any(v is None for v in m.values()):
        missing = ", ".join(k for k, v in m.items() if v is None)
        return [f"not measured yet ({missing} missing)"]
    v: dict[str, Measured] = {k: x for k, x in m.items() if x is not None}
    if claim.rows[0].recipe == "resnet18":
        gap = v["resnet18"].mean - v["dacnn_18_mix"].mean
        ratio = v["dacnn_18_mix"].paper_count / v["resnet18"].paper_count
        return [
            f"mix vs ResNet-18: {gap:+.2f} points below it at {100 * ratio:.0f}% of its parameters (paper: 0.41 "
            f"at 44%): {'holds' if gap <= 1.0 else 'does not hold'} (within 1 point)",
            f"mix more accurate than plain: {_beats(v['dacnn_18_mix'], v['dacnn_18_plain'])}",
            f"regulators add to mix: {_beats(v['dacnn_18_mix_reg'], v['dacnn_18_mix'])}",
        ]
    if claim.rows[0].recipe == "dacnn_11_plain":
        growth = v["dacnn_34_plain"].paper_count / v["dacnn_11_plain"].paper_count - 1
        return [
            f"parameters 11 -> 34 layers: +{100 * growth:.1f}% (paper: +1.8%): "
            f"{'holds' if growth < 0.05 else 'does not hold'}",
            f"18 (residual) more accurate than 11: {_beats(v['dacnn_18_plain'], v['dacnn_11_plain'])}",
            f"34 more accurate than 18 (the paper: no, 38.88 vs 38.63): "
            f"{_beats(v['dacnn_34_plain'], v['dacnn_18_plain'])}",
        ]
    if claim.rows[0].recipe == "dacnn_18_plain" and claim.rows[1].recipe == "dacnn_18_plain_reg3":
        return [
            f"section 3 better than none: {_beats(v['dacnn_18_plain_reg3'], v['dacnn_18_plain'])}",
            f"all sections better than section 3: {_beats(v['dacnn_18_plain_reg'], v['dacnn_18_plain_reg3'])}",
        ]
    drop = v["dacnn_18_plain"].mean - v["dacnn_18_plain_nobn"].mean
    return [
        f"no BN costs {drop:.2f} points (paper: 58.5, to chance): "
        f"{'holds' if drop > max(10.0, v['dacnn_18_plain'].spread) else 'does not hold'} (more than 10 points)",
        f"free BN more accurate than shared BN: {_beats(v['dacnn_18_plain'], v['dacnn_18_plain_sharedbn'])}",
    ]


def render(got: dict[str, Measured], setting: str) -> str:
    lines = [setting, ""]
    for claim in CLAIMS:
        lines += [f"### {claim.title}", "", f"Paper (CIFAR-100): {claim.statement}", ""]
        lines += [
            "| model | paper err. (CIFAR-100) | paper params | params (kernels + FC) | all params | "
            "top-1 per seed (%) | mean (%) | err. (%) |",
            "|---|---:|---:|---:|---:|---|---:|---:|",
        ]
        for r in claim.rows:
            x = got.get(r.recipe)
            paper = "-" if r.paper_error is None else f"{r.paper_error:.2f}"
            if x is None:
                lines.append(f"| {r.label} | {paper} | {r.paper_params} | | | not run yet | | |")
                continue
            seeds = " / ".join(f"{a:.2f}" for a in x.accs)
            lines.append(
                f"| {r.label} | {paper} | {r.paper_params} | {x.paper_count:,} | {x.params:,} | {seeds} | "
                f"{x.mean:.2f} | {100 - x.mean:.2f} |"
            )
        lines += [""] + [f"- {v}" for v in verdicts(claim, got)] + [""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="?", default="benchmarks/results/paper_claims", type=Path)
    ap.add_argument("--docs", default="docs/paper-tables.md", type=Path)
    ap.add_argument("--block", default="cpu", help="which marked block of the docs to replace (cpu or full)")
    args = ap.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    got = read(args.results)
    records = [json.loads(p.read_text()) for p in _rows(args.results)]
    record = records[0] if records else {}

    def one(key: str) -> Any:
        """The rows' common value of ``key``, or 'mixed'."""
        values = {str(r.get(key)) for r in records}
        return record.get(key, "?") if len(values) <= 1 else f"mixed ({', '.join(sorted(values))})"

    setting = (
        f"Fashion-MNIST at 32 px, trained from scratch: {one('epochs')} epochs on {one('train_limit') or 'all'} "
        "training images (a subset drawn with each seed), the recipes' AdaGrad lr 0.1 (x0.1 at half), random flip, "
        f"batch 128, fp32; top-1 is the best epoch on the 10,000 test images; device {one('device')}; "
        f"`bash benchmarks/paper_claims.sh` (rows: `{args.results}`). Verdicts from the two-seed means; a "
        "difference within either row's seed range is called seed noise. Parameters are for 10 classes (the "
        "paper's for 100)."
        + (
            f" SMOKE RUN: {one('limit_batches')} batches per epoch."
            if any(r.get("limit_batches") for r in records)
            else ""
        )
    )
    text = render(got, setting)
    (args.results / "README.md").write_text("# The paper's claims, measured (issue 27)\n\n" + text + "\n")
    start, end = f"<!-- paper-claims:{args.block}:start -->", f"<!-- paper-claims:{args.block}:end -->"
    doc = args.docs.read_text()
    if start not in doc or end not in doc or doc.index(end) < doc.index(start):
        raise SystemExit(f"{args.docs} has no {start} ... {end} block to fill")
    head, rest = doc.split(start, 1)
    args.docs.write_text(head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
