"""Compare compression methods on one teacher at one parameter budget, with the same fine-tune.

    teacher ─► target size (--budget / --match) ─► for each method and seed:
        compress ─► pipeline.after_conversion (BN recalibration, reconstruction for the anchoring
        methods, KD fine-tune, finalize; accuracy after each: the same steps as compress())
        ─► save artefact ─► measure
    ─► latency of every final model, interleaved with the teacher ─► bench.{md,json,csv,png}

Every method gets the same BN recalibration, the same epochs, optimiser, schedule and KD
loss from the teacher, so differences come from the methods, not the training budget.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import pipeline
from .atomic import atomic_write_text
from .baselines import Context, get_method
from .core.plan import count_params
from .core.report import count_macs, figure, save_figure, state_dict_bytes
from .defaults import CALIB_BATCHES, default_reconstruct
from .errors import NonFiniteOutputError, UsageError
from .latency import compare_latency
from .train import Loaders, TrainConfig, distill, evaluate
from .train.state import NonFiniteLossError

COLUMNS = (
    "method",
    "seed",
    "params",
    "bytes",
    "sparse_bytes",
    "ratio",
    "prune_ratio",
    "macs",
    "latency_b1_ms",
    "latency_b64_ms",
    "acc_compressed",
    "acc_calibrated",
    "acc_reconstructed",
    "reconstruct_s",
    "acc_finetuned",
    "drop",
    "wall_s",
)


@dataclass(frozen=True)
class BenchConfig:
    """What to compare and how (the fine-tune is ``train``, identical for every method)."""

    methods: tuple[str, ...]
    budget: float | None = None
    match: str | None = None
    repeats: int = 1
    calib_batches: int = CALIB_BATCHES
    latency_batches: tuple[int, ...] = (1, 64)
    latency_repeats: int = 20
    train: TrainConfig = field(default_factory=TrainConfig.finetune)
    # the anchoring methods' section-wise reconstruction after the BN step (the last step of their
    # conversion, as anchor() and compress() do with data); other methods have no such step
    reconstruct: bool = True
    budget_macs: float | None = None  # a fraction of the teacher's MACs: alone, or with «budget» for the planner

    def __post_init__(self) -> None:
        if not self.methods:
            raise UsageError("«methods» is empty; name at least one method")
        for name in (*self.methods, *([self.match] if self.match else [])):
            get_method(name)
        if self.budget is not None and self.match is not None:
            raise UsageError("give either «budget» or «match», not both")
        if self.budget is not None and not 0 < self.budget < 1:
            raise UsageError(f"«budget» is a fraction of the teacher's parameters in (0, 1); got {self.budget}")
        if self.budget_macs is not None and not 0 < self.budget_macs < 1:
            raise UsageError(f"«budget-macs» is a fraction of the teacher's MACs in (0, 1); got {self.budget_macs}")
        blind = [m for m in self.methods if not getattr(get_method(m), "removes_macs", True)]  # magnitude, mix/plain
        if self.budget_macs is not None and self.budget is None and self.match is None and blind:
            raise UsageError(
                f"{', '.join(blind)} cannot remove MACs (zeros in dense kernels, or kernels shared at full compute): "
                "it cannot meet «budget-macs» alone; leave it out of «methods», or give «budget» as well (it then "
                "keeps the parameter budget)"
            )
        if self.match is not None and not get_method(self.match).fixed_size:
            raise UsageError(f"«match» needs a method with a fixed size (an anchoring method), not {self.match!r}")
        if self.repeats < 1:
            raise UsageError(f"«repeats» must be >= 1, got {self.repeats}")


@dataclass
class BenchRow:
    """One method, one seed. Accuracies and drop (teacher - fine-tuned) are fractions; latency in ms per batch
    (median)."""

    method: str
    seed: int
    params: int
    bytes: int
    sparse_bytes: int | None
    ratio: float
    prune_ratio: float
    macs: int
    latency_b1_ms: float | None
    latency_b64_ms: float | None
    acc_compressed: float
    acc_calibrated: float
    acc_finetuned: float
    drop: float
    wall_s: float
    notes: str = ""
    acc_reconstructed: float | None = None  # after the anchoring methods' reconstruction step
    reconstruct_s: float | None = None  # its wall time


@dataclass
class BenchResult:
    """Rows for the teacher and every (method, seed), plus how they were obtained."""

    teacher: BenchRow
    rows: list[BenchRow]
    target_params: int | None
    config: BenchConfig
    latency: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    meta: dict[str, str] = field(default_factory=dict)  # command, machine, versions: set by the caller

    def summary(self) -> list[dict[str, Any]]:
        """Per method: the mean of every number over seeds, and the std of the fine-tuned accuracy."""
        out = []
        for name in dict.fromkeys(r.method for r in self.rows):
            rows = [r for r in self.rows if r.method == name]
            accs = [r.acc_finetuned for r in rows]
            mean: dict[str, float | None] = {
                c: statistics.fmean(getattr(r, c) for r in rows)
                for c in ("acc_compressed", "acc_calibrated", "acc_finetuned", "drop", "wall_s")
            }
            for c in ("acc_reconstructed", "reconstruct_s"):  # None for methods without the step
                got = [getattr(r, c) for r in rows]
                mean[c] = statistics.fmean(got) if all(v is not None for v in got) else None
            out.append(
                {**asdict(rows[0]), **mean, "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "n": len(rows)}
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        cfg = asdict(self.config)
        return {
            "target_params": self.target_params,
            "teacher": asdict(self.teacher),
            "rows": [asdict(r) for r in self.rows],
            "summary": self.summary(),
            "fronts": self.fronts(),
            "latency": self.latency,
            "config": cfg,
            "wall_s": self.wall_s,
            "meta": self.meta,
        }

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=[*COLUMNS, "notes"], lineterminator="\n")
        writer.writeheader()
        for r in [self.teacher, *self.rows]:
            writer.writerow(asdict(r))
        return buf.getvalue()

    def to_markdown(self) -> str:
        many = self.config.repeats > 1
        pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
        ms = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731

        def recon(s: dict[str, Any]) -> str:
            if s["acc_reconstructed"] is None:
                return "–"
            took = f" ({s['reconstruct_s']:.0f} s)" if s["reconstruct_s"] is not None else ""
            return pct(s["acc_reconstructed"]) + took

        head = (
            "| method | unique params | bytes on disk | compression | prune ratio | MACs | latency b1 (ms) | "
            "latency b64 (ms) | acc compressed | acc BN-recal | acc reconstructed | acc fine-tuned | "
            "drop vs teacher (points) | wall (s) |"
        )
        lines = [f"{k}: {v}  " for k, v in self.meta.items()] + ([""] if self.meta else [])
        lines += [head, "|" + "---|" + "---:|" * 13]
        t = self.teacher
        lines.append(
            f"| teacher | {t.params:,} | {t.bytes:,} | 1.00x | 0.0% | {t.macs / 1e6:.1f}M | {ms(t.latency_b1_ms)} | "
            f"{ms(t.latency_b64_ms)} | – | – | – | {pct(t.acc_finetuned)} | – | – |"
        )
        for s in self.summary():
            size = f"{s['bytes']:,}" + (f" (sparse {s['sparse_bytes']:,})" if s["sparse_bytes"] else "")
            acc = pct(s["acc_finetuned"]) + (f" ± {100 * s['acc_std']:.2f}" if many else "")
            lines.append(
                f"| {s['method']} | {s['params']:,} | {size} | {s['ratio']:.2f}x | {100 * s['prune_ratio']:.1f}% | "
                f"{s['macs'] / 1e6:.1f}M | {ms(s['latency_b1_ms'])} | {ms(s['latency_b64_ms'])} | "
                f"{pct(s['acc_compressed'])} | "
                f"{pct(s['acc_calibrated'])} | {recon(s)} | {acc} | {100 * s['drop']:.2f} | {s['wall_s']:.0f} |"
            )
        cfg = self.config
        target = (
            f"{self.target_params:,} unique parameters"
            if self.target_params
            else "none (the compute budget below)"
            if cfg.budget_macs
            else "none (fixed-size methods only)"
        )
        fronts = self.fronts()
        lines += [
            "",
            "Non-dominated (no other method is as accurate after fine-tuning for less): "
            + "; ".join(f"by {AXES[c]}: {', '.join(m)}" for c, m in fronts.items())
            + " (bench.png: one panel each, ringed).",
            f"Budget for the pruning methods: {target}"
            + (
                f" (the size of {cfg.match})"
                if cfg.match
                else f" ({cfg.budget:.0%} of the teacher)"
                if cfg.budget
                else ""
            )
            + ". Pruning methods hit it within 1%; anchoring methods have the size their plan gives."
            + (
                f" Compute budget: {cfg.budget_macs:.0%} of the teacher's MACs"
                + (
                    " (the planners, dacnn-bank and dacnn-prune, meet it as well as the parameter budget; every other "
                    "method keeps "
                    "the parameter budget)."
                    if self.target_params
                    else " (structured pruning and lowrank hit it within 1%, the planner meets it; magnitude "
                    "removes no MACs)."
                )
                if cfg.budget_macs
                else ""
            ),
            f"Same for every method: BN recalibration on {cfg.calib_batches} batches"
            + (
                " (the anchoring methods then reconstruct each section on calibration batches, the last step of "
                "their conversion: acc reconstructed, with its wall time)"
                if cfg.reconstruct
                else ""
            )
            + ", then "
            f"{cfg.train.epochs} epochs of "
            f"KD fine-tuning ({cfg.train.optimizer}, lr {cfg.train.lr}, {cfg.train.schedule}, "
            f"T={cfg.train.kd_temperature}, "
            f"alpha={cfg.train.kd_alpha}), precision {cfg.train.precision}; seeds 0..{cfg.repeats - 1}.",
            f"Total wall time {self.wall_s / 60:.1f} min. Drop = teacher accuracy minus fine-tuned accuracy "
            f"(positive: worse than the teacher). Latency: median over "
            f"{cfg.latency_repeats} runs, every model interleaved with the teacher, CPU.",
        ]
        notes = {s["method"]: s["notes"] for s in self.summary() if s["notes"]}
        lines += ["", *[f"- **{k}**: {v}" for k, v in notes.items()]] if notes else []
        return "\n".join(lines) + "\n"

    def fronts(self) -> dict[str, list[str]]:
        """Per cost (``params``, ``macs``, ``latency_b1_ms``): the methods no other beats on both that cost and
        the mean accuracy after fine-tuning (the teacher is not a competitor). Latency only where measured."""
        out: dict[str, list[str]] = {}
        summary = [s for s in self.summary() if s["acc_finetuned"] == s["acc_finetuned"]]  # NaN: diverged
        for cost in AXES:
            points = [(s[cost], s["acc_finetuned"]) for s in summary if s.get(cost) is not None]
            if len(points) == len(summary) and points:
                out[cost] = [s["method"] for s, keep in zip(summary, non_dominated(points), strict=True) if keep]
        return out

    def plot(self, path: str | Path) -> Path:
        """PNG: accuracy after fine-tuning against unique parameters, MACs and batch-1 latency (one panel
        each, log x), the non-dominated methods ringed and joined by the front's steps, the teacher starred."""
        fronts = self.fronts() or {"params": []}  # every method diverged: the points alone
        axes_used = [c for c in AXES if c in fronts]
        fig, axes = figure(1, len(axes_used), size=(4.2 * len(axes_used), 3.8))
        axes = list(axes) if len(axes_used) > 1 else [axes]
        summary = self.summary()
        t = self.teacher
        for ax, cost in zip(axes, axes_used, strict=True):
            for i, s in enumerate(summary):
                ax.errorbar(
                    s[cost],
                    100 * s["acc_finetuned"],
                    yerr=100 * s["acc_std"],
                    fmt="o",
                    color=f"C{i}",
                    capsize=3,
                    label=s["method"],
                )
                if s["method"] in fronts[cost]:
                    ax.plot(
                        s[cost],
                        100 * s["acc_finetuned"],
                        "o",
                        markersize=13,
                        markerfacecolor="none",
                        markeredgecolor=f"C{i}",
                        linewidth=1.5,
                    )
            best = sorted((s[cost], 100 * s["acc_finetuned"]) for s in summary if s["method"] in fronts[cost])
            if len(best) > 1:
                ax.step(
                    [b[0] for b in best], [b[1] for b in best], where="post", color="gray", linewidth=0.8, linestyle=":"
                )
            t_cost = getattr(t, cost)
            if t_cost is not None:
                ax.plot(
                    t_cost,
                    100 * t.acc_finetuned,
                    marker="*",
                    markersize=14,
                    color="black",
                    linestyle="",
                    label="teacher",
                )
            ax.axhline(100 * t.acc_finetuned, color="black", linewidth=0.8, linestyle="--")
            ax.set_xscale("log")
            ax.set_xlabel(AXES[cost])
            ax.grid(alpha=0.3, which="both")
        axes[0].set_ylabel("top-1 after fine-tuning (%)")
        fig.suptitle("ringed: non-dominated (no other method as accurate for less)", fontsize=9)
        axes[0].legend(fontsize=7)
        return save_figure(fig, path)

    def write(self, out: str | Path) -> dict[str, Path]:
        """Write bench.md, bench.json, bench.csv and bench.png into ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        files = {"md": out / "bench.md", "json": out / "bench.json", "csv": out / "bench.csv"}
        atomic_write_text(files["md"], self.to_markdown())
        atomic_write_text(files["json"], json.dumps(self.to_dict(), indent=2))
        atomic_write_text(files["csv"], self.to_csv())
        files["png"] = self.plot(out / "bench.png")
        return files


AXES = {"params": "unique parameters", "macs": "MACs per example", "latency_b1_ms": "latency, batch 1 (ms)"}


def non_dominated(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (cost, accuracy) points: True where no other point costs no more and scores no less, one strictly."""
    return [
        not any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for j, (c2, a2) in enumerate(points) if j != i)
        for i, (c, a) in enumerate(points)
    ]


def target_size(teacher: nn.Module, config: BenchConfig, ctx: Context) -> int | None:
    """The parameter budget of the pruning methods, from ``--budget`` or the size of ``--match``."""
    if config.budget is not None:
        return round(config.budget * count_params(teacher))
    if config.match is not None:
        return get_method(config.match).compress(teacher, None, replace(ctx, calib_loader=None)).params
    return None


def _measure(
    name: str,
    seed: int,
    compressed: Any,
    teacher: nn.Module,
    loaders: Loaders,
    config: BenchConfig,
    notify: Callable[[str, dict[str, Any]], None],
) -> tuple[nn.Module, dict[str, float], str, float | None]:
    """One method's steps after compression (:func:`dacnn_convert.pipeline.after_conversion`, as compress()
    runs them): the final model, the accuracies measured (kept when a later step diverges), the notes, and
    the reconstruction's seconds. A method that diverges is a row that says so, not the end of the bench."""
    model = compressed.model
    got: dict[str, float] = {}
    finalized: list[nn.Module] = []

    def heard(stage: str, acc: float) -> None:
        got[stage] = acc
        notify("stage", {"method": name, "stage": "compressed" if stage == "converted" else stage, "acc": acc})

    def finalize(m: nn.Module) -> nn.Module:
        finalized.append(compressed.finalize(m))
        return finalized[-1]

    # the anchoring methods' conversion ends with reconstruction, as anchor() with data does
    plan = getattr(model, "dacnn_plan", None)  # a shared conversion reconstructs as anchor() does (not "none")
    anchored = (
        config.reconstruct
        and config.calib_batches > 0
        and plan is not None
        and default_reconstruct(None, True, plan.mode, plan.prune is not None)
    )
    try:
        measured = pipeline.after_conversion(
            model,
            teacher,
            loaders.train,
            loaders.val,
            config.train,
            calib_batches=config.calib_batches,
            reconstruct=pipeline.DEFAULT_RECONSTRUCT if anchored else None,
            fine_tune=lambda: distill(
                model,
                teacher,
                loaders.train,
                loaders.val,
                config=replace(config.train, seed=seed),
                calib_batches=0,  # the BN step above is the bench's, the same for every method
            ),
            finalize=finalize,
            on_stage=heard,
        )
        return measured.model, got, compressed.notes, measured.seconds.get("reconstruct")
    except (NonFiniteLossError, NonFiniteOutputError) as exc:
        notes = f"{compressed.notes}; DIVERGED: {exc}" if compressed.notes else f"DIVERGED: {exc}"
        notify("stage", {"method": name, "stage": "diverged", "acc": float("nan")})
        return (finalized[-1] if finalized else compressed.finalize(model)), got, notes, None


def run_bench(
    teacher: nn.Module,
    loaders: Loaders,
    input_size: tuple[int, int, int],
    config: BenchConfig,
    out: Path | None = None,
    source: Any = None,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
    meta: dict[str, str] | None = None,
) -> BenchResult:
    """Compress ``teacher`` with every method of ``config`` and measure each the same way.

    Args:
        teacher: the trained original; left untouched.
        loaders: training data (calibration, BN statistics, fine-tuning) and validation data.
        input_size: (C, H, W) of one example.
        config: methods, budget, repeats and the shared fine-tuning settings.
        out: artefacts go to ``out/METHOD[-seedN]/``; None keeps them in memory only.
        source: the teacher's model source, recorded in the saved artefacts.
        on_event: progress callback ``(event, data)``: ``method`` when one starts, ``stage``
            after each measured step, ``done`` with the row.
        meta: command, machine and versions, printed at the top of bench.md.

    Raises:
        UsageError: a pruning method without a budget; PlanError: a budget out of reach.
    """
    start = time.perf_counter()
    notify = on_event or (lambda event, data: None)
    target_macs = None if config.budget_macs is None else round(config.budget_macs * count_macs(teacher, input_size))
    ctx = Context(input_size, loaders.train, config.calib_batches, 0, source, target_macs)
    target = target_size(teacher, config, ctx)
    if target is None and target_macs is None and any(not get_method(m).fixed_size for m in config.methods):
        raise UsageError("pruning methods need a size: give «budget» FRACTION, «match» METHOD or «budget-macs»")
    teacher_params = count_params(teacher)
    precision, limit = config.train.precision, config.train.limit_batches
    teacher_acc = evaluate(teacher, loaders.val, precision, limit)
    rows: list[BenchRow] = []
    finals: dict[str, nn.Module] = {}
    base_seed = getattr(loaders.train, "seed", None)
    first = next(teacher.parameters(), None)
    cuda = [first.device] if first is not None and first.device.type == "cuda" else []
    for seed in range(config.repeats):
        if base_seed is not None:  # a new data order per repeat, the same for every method
            loaders.train.seed = base_seed + seed
        for name in config.methods:
            began = time.perf_counter()
            notify("method", {"method": name, "seed": seed})
            with torch.random.fork_rng(devices=cuda):  # seeded for the method, the caller's RNG untouched
                torch.manual_seed(seed)
                compressed = get_method(name).compress(teacher, target, replace(ctx, seed=seed))
            model = compressed.model
            for p in model.parameters():  # a frozen teacher's copies inherit its flags
                p.requires_grad_(True)
            nan = float("nan")
            model, got, notes, recon_s = _measure(name, seed, compressed, teacher, loaders, config, notify)
            folder = (out / (name if config.repeats == 1 else f"{name}-seed{seed}")) if out is not None else None
            sizes = compressed.save(model, folder) if folder is not None else {"safetensors": state_dict_bytes(model)}
            row = BenchRow(
                name,
                seed,
                compressed.params,
                sizes["safetensors"],
                sizes.get("sparse"),
                teacher_params / compressed.params,
                1 - compressed.params / teacher_params,
                count_macs(model, input_size),
                None,
                None,
                got.get("converted", nan),
                got.get("calibrated", nan),
                got.get("finetuned", nan),
                teacher_acc - got.get("finetuned", nan),
                time.perf_counter() - began,
                notes,
                got.get("reconstructed"),
                recon_s,
            )
            rows.append(row)
            if out is not None:  # a long benchmark cut short keeps what it measured
                atomic_write_text(out / "bench.partial.json", json.dumps([asdict(r) for r in rows], indent=2))
            if seed == 0:
                finals[name] = model.to(memory_format=torch.contiguous_format)
            notify("done", asdict(row))
    t_row = BenchRow(
        "teacher",
        0,
        teacher_params,
        state_dict_bytes(teacher),
        None,
        1.0,
        0.0,
        count_macs(teacher, input_size),
        None,
        None,
        teacher_acc,
        teacher_acc,
        teacher_acc,
        0.0,
        0.0,
    )
    latency: list[dict[str, Any]] = []
    for batch in config.latency_batches:
        notify("latency", {"batch": batch})
        models = {"teacher": teacher.to(memory_format=torch.contiguous_format), **finals}
        timed = compare_latency(models, input_size, batch, "fp32", repeats=config.latency_repeats)
        latency += [r.to_dict() for r in timed]
        by_name = {r.model: r.median_ms for r in timed}
        for r in [t_row, *rows]:
            if batch == 1:
                r.latency_b1_ms = by_name.get(r.method)
            elif batch == 64:
                r.latency_b64_ms = by_name.get(r.method)
    result = BenchResult(t_row, rows, target, config, latency, time.perf_counter() - start, dict(meta or {}))
    if out is not None:
        result.write(out)
        (out / "bench.partial.json").unlink(missing_ok=True)
    return result
