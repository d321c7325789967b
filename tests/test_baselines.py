"""Pruning baselines and the same-budget benchmark: budgets hit, sparsity exact, reports complete."""

from __future__ import annotations

import copy
import csv
import json
from dataclasses import replace

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dacnn_convert import anchor, load
from dacnn_convert.baselines import METHODS, Context, get_method
from dacnn_convert.baselines.magnitude import load_sparse, magnitude_prune, make_permanent, save_sparse
from dacnn_convert.bench import COLUMNS, BenchConfig, run_bench
from dacnn_convert.cli import app
from dacnn_convert.core.plan import count_params
from dacnn_convert.errors import PlanError, UsageError
from dacnn_convert.train import TrainConfig, make_loaders
from tests.models import TinyResNet

CTX = Context(input_size=(3, 16, 16))


def wide() -> nn.Module:
    torch.manual_seed(0)
    return TinyResNet(width=64).eval()  # 676,682 params: channel steps fine enough for a 1% budget


@pytest.mark.parametrize("method", ["l1-filter", "group-norm"])
@pytest.mark.parametrize("fraction", [0.5, 0.25])
def test_channel_pruning_hits_the_budget_within_one_percent(method: str, fraction: float) -> None:
    teacher = wide()
    target = round(fraction * count_params(teacher))
    out = get_method(method).compress(teacher, target, CTX)
    assert abs(out.params - target) / target <= 0.01
    assert out.params == count_params(out.model)
    assert out.model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert count_params(teacher) == 676_682  # the teacher is untouched


def test_magnitude_pruning_reaches_the_exact_sparsity() -> None:
    teacher = wide()
    total = count_params(teacher)
    target = total // 3
    out = get_method("magnitude").compress(teacher, target, CTX)
    zeros = sum(int((m.weight == 0).sum()) for m in out.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert zeros == total - target and out.params == target
    model = make_permanent(out.model)
    assert not any(name.endswith(("_orig", "_mask")) for name, _ in model.state_dict().items())
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sum(int((w == 0).sum()) for w in weights) == total - target  # the zeros stay after the masks go


def test_magnitude_prunes_the_globally_smallest_weights() -> None:
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.1, -5.0], [3.0, 0.2]]))
        model[1].weight.copy_(torch.tensor([[-0.05, 4.0]]))
    make_permanent(magnitude_prune(model, 3))
    assert model[0].weight.tolist() == [[0.0, -5.0], [3.0, 0.0]]
    assert model[1].weight.tolist() == [[0.0, 4.0]]


def test_sparse_file_round_trips_and_is_smaller(tmp_path) -> None:
    model = make_permanent(magnitude_prune(wide(), 400_000))
    path = save_sparse(model, tmp_path / "m.sparse.safetensors")
    state = load_sparse(path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    dense = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert path.stat().st_size < 0.55 * dense  # 59% of the weights are zero: 1 bit each + values


@pytest.mark.parametrize("method", ["l1-filter", "group-norm", "magnitude"])
def test_pruning_an_anchored_model_is_refused(method: str) -> None:
    anchored = anchor(TinyResNet(), input_size=(3, 16, 16))
    with pytest.raises(UsageError, match="shared weights"):
        get_method(method).compress(anchored, 1000, CTX)


def test_pruning_tied_weights_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 3), nn.Conv2d(3, 3, 3))
    model[1].weight = model[0].weight
    with pytest.raises(UsageError, match="un-shares"):
        get_method("l1-filter").compress(model, 10, CTX)


def test_unreachable_budget_names_the_closest() -> None:
    with pytest.raises(PlanError, match="closest"):
        get_method("l1-filter").compress(TinyResNet(), 2000, CTX)  # 8/16 channels: steps far above 1%


def test_unknown_method_suggests_the_closest() -> None:
    with pytest.raises(UsageError, match="Did you mean: l1-filter"):
        get_method("l1-filtr")
    assert {"dacnn-mix", "dacnn-mix-reg", "dacnn-plain", "sharesnet", "magnitude", "l1-filter", "group-norm"} <= set(
        METHODS
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budget": 1.5}, "fraction"),
        ({"budget": 0.5, "match": "dacnn-mix"}, "either"),
        ({"match": "magnitude"}, "fixed size"),
    ],
)
def test_bench_config_rejects_bad_budgets(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        BenchConfig(("dacnn-mix",), **kwargs)


def test_two_method_bench_writes_every_column_and_a_png(tmp_path) -> None:
    loaders = make_loaders("synthetic", batch_size=32, input_size=16)
    config = BenchConfig(
        ("dacnn-mix", "l1-filter"),
        match="dacnn-mix",
        calib_batches=1,
        latency_repeats=2,
        train=TrainConfig(epochs=1, limit_batches=2),
    )
    teacher = wide()
    result = run_bench(teacher, loaders, (3, 16, 16), config, out=tmp_path)
    rows = list(csv.DictReader((tmp_path / "bench.csv").open()))
    assert [r["method"] for r in rows] == ["teacher", "dacnn-mix", "l1-filter"]
    assert all(rows[0][c] != "" for c in COLUMNS if c not in ("sparse_bytes", "acc_reconstructed", "reconstruct_s"))
    mix, l1 = result.rows
    # the anchoring method's conversion ends with section-wise reconstruction; pruning has no such step
    assert mix.acc_reconstructed is not None and mix.reconstruct_s and l1.acc_reconstructed is None
    assert abs(l1.params - mix.params) / mix.params <= 0.01  # pruned to the anchored size
    assert mix.latency_b1_ms and l1.latency_b64_ms and l1.macs < result.teacher.macs
    assert l1.bytes == (tmp_path / "l1-filter" / "model.safetensors").stat().st_size
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "bench.md").read_text()
    for header in (
        "unique params",
        "bytes on disk",
        "compression",
        "prune ratio",
        "MACs",
        "latency b1",
        "latency b64",
        "acc compressed",
        "acc reconstructed",
        "acc fine-tuned",
        "drop vs teacher",
        "wall",
    ):
        assert header in md
    assert json.loads((tmp_path / "bench.json").read_text())["target_params"] == mix.params
    # the pruned artefact is a real smaller model that reloads from shapes alone
    reloaded = load(tmp_path / "l1-filter" / "model.safetensors", model=copy.deepcopy(wide()))
    assert count_params(reloaded) == l1.params


def test_bench_cli_refuses_pruning_without_a_budget(tmp_path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "tests.models:tiny_resnet",
            "--dataset",
            "synthetic",
            "--input-size",
            "16",
            "--methods",
            "dacnn-mix,magnitude",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 2
    assert "--budget" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "bench.md").exists()


def test_a_method_that_diverges_is_a_row_that_says_so_and_the_bench_goes_on(tmp_path, monkeypatch) -> None:
    import math

    import dacnn_convert.bench as bench
    from dacnn_convert.train.state import NonFiniteLossError

    calls = {"n": 0}
    real = bench.distill

    def first_diverges(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise NonFiniteLossError("loss became nan at epoch 1, step 3")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "distill", first_diverges)
    loaders = make_loaders("synthetic", batch_size=32, input_size=16)
    config = BenchConfig(
        ("dacnn-mix", "l1-filter"),
        match="dacnn-mix",
        calib_batches=1,
        latency_batches=(1,),
        latency_repeats=2,
        train=TrainConfig(epochs=1, limit_batches=1),
    )
    result = run_bench(wide(), loaders, (3, 16, 16), config, out=tmp_path)
    mix, l1 = result.rows
    assert math.isnan(mix.acc_finetuned) and "DIVERGED: loss became nan" in mix.notes
    assert not math.isnan(l1.acc_finetuned)
    assert "DIVERGED" in (tmp_path / "bench.md").read_text()


def test_only_conversions_that_share_get_the_reconstruction_step(tmp_path) -> None:
    loaders = make_loaders("synthetic", batch_size=32, input_size=16)
    config = BenchConfig(
        ("dacnn-bank", "lowrank"),
        budget=0.5,
        calib_batches=1,
        latency_batches=(1,),
        latency_repeats=1,
        train=TrainConfig(epochs=1, limit_batches=1, precision="fp32"),
    )
    bank, lowrank = run_bench(wide(), loaders, (3, 16, 16), config).rows
    assert bank.acc_reconstructed is not None and bank.reconstruct_s is not None and bank.reconstruct_s > 0
    assert lowrank.acc_reconstructed is None and lowrank.reconstruct_s is None  # its plan shares nothing
    off = run_bench(wide(), loaders, (3, 16, 16), replace(config, methods=("dacnn-bank",), reconstruct=False))
    assert off.rows[0].acc_reconstructed is None


@pytest.mark.parametrize("method", ["group-norm", "lowrank", "dacnn-bank"])
def test_a_mac_budget_is_hit_by_pruning_and_met_by_the_planner(method: str) -> None:
    from dacnn_convert.core.report import count_macs

    teacher = wide()
    target = count_macs(teacher, (3, 16, 16)) // 2
    out = get_method(method).compress(teacher, None, replace(CTX, target_macs=target))
    got = count_macs(out.model, (3, 16, 16))
    if method == "group-norm":
        assert abs(got - target) / target <= 0.01
    else:  # plan arithmetic: never over, and the planner's and lowrank's searches use the budget
        assert 0.8 * target <= got <= target
    assert count_params(teacher) == 676_682  # the teacher is untouched


@pytest.mark.slow  # six pruning ratios, each a kl-scored search: ~45 s on 2 cores
def test_the_planner_with_pruning_meets_both_budgets_and_says_what_it_pruned() -> None:
    from dacnn_convert.core.report import count_macs

    teacher = TinyResNet(width=16).eval()
    macs = count_macs(teacher, (3, 16, 16))
    loaders = make_loaders("synthetic", batch_size=16, input_size=16)
    ctx = replace(CTX, calib_loader=loaders.train, calib_batches=1, target_macs=macs // 20)
    out = get_method("dacnn-prune").compress(teacher, count_params(teacher) // 2, ctx)
    assert count_macs(out.model, (3, 16, 16)) <= macs // 20  # banks alone stop at 7.7% of the MACs here
    assert out.params == count_params(out.model) <= count_params(teacher) // 2
    assert "pruned first: prune" in out.notes and "pruning ratios tried: 0" in out.notes


def test_magnitude_refuses_a_mac_budget_and_the_bench_takes_one(tmp_path) -> None:
    with pytest.raises(PlanError, match="removes no MACs"):
        get_method("magnitude").compress(wide(), None, replace(CTX, target_macs=1000))
    with pytest.raises(UsageError, match="fraction of the teacher's MACs"):
        BenchConfig(("group-norm",), budget_macs=1.5)
    with pytest.raises(UsageError, match="magnitude, dacnn-budget cannot remove MACs"):  # before anything runs
        BenchConfig(("group-norm", "magnitude", "dacnn-budget"), budget_macs=0.5)
    both = get_method("dacnn-budget").compress(wide(), 400_000, replace(CTX, target_macs=1000))
    assert both.params <= 400_000  # with «budget» too, the mix/plain planner keeps the parameter budget
    assert BenchConfig(("magnitude",), budget=0.5, budget_macs=0.5).budget_macs == 0.5  # params for magnitude
    loaders = make_loaders("synthetic", batch_size=32, input_size=16)
    config = BenchConfig(
        ("dacnn-bank", "group-norm"),
        budget_macs=0.5,
        calib_batches=1,
        latency_batches=(1,),
        latency_repeats=1,
        train=TrainConfig(epochs=1, limit_batches=1, precision="fp32"),
        reconstruct=False,
    )
    result = run_bench(wide(), loaders, (3, 16, 16), config, out=tmp_path)
    teacher_macs = result.teacher.macs
    assert all(r.macs <= 0.5 * teacher_macs * 1.01 for r in result.rows)
    assert "Compute budget: 50% of the teacher's MACs" in (tmp_path / "bench.md").read_text()


def test_non_dominated_points_and_the_bench_fronts(tmp_path) -> None:
    from dacnn_convert.bench import non_dominated

    # (cost, accuracy): b dominates c (cheaper and as accurate); a and b trade off; d is beaten by a
    assert non_dominated([(10, 0.9), (5, 0.8), (6, 0.8), (12, 0.85)]) == [True, True, False, False]
    assert non_dominated([(1, 0.5), (1, 0.5)]) == [True, True]  # ties dominate nothing
    loaders = make_loaders("synthetic", batch_size=32, input_size=16)
    config = BenchConfig(
        ("dacnn-mix", "l1-filter"),
        match="dacnn-mix",
        calib_batches=1,
        latency_batches=(1,),
        latency_repeats=1,
        train=TrainConfig(epochs=1, limit_batches=1, precision="fp32"),
        reconstruct=False,
    )
    result = run_bench(wide(), loaders, (3, 16, 16), config, out=tmp_path)
    fronts = result.fronts()
    assert set(fronts) == {"params", "macs", "latency_b1_ms"} and all(fronts.values())
    summary = {s["method"]: s for s in result.summary()}
    for cost, kept in fronts.items():
        for name in set(summary) - set(kept):  # every method left out is beaten by one kept
            s = summary[name]
            assert any(summary[k][cost] <= s[cost] and summary[k]["acc_finetuned"] >= s["acc_finetuned"] for k in kept)
    assert "Non-dominated" in (tmp_path / "bench.md").read_text()
    assert json.loads((tmp_path / "bench.json").read_text())["fronts"] == fronts
    assert (tmp_path / "bench.png").stat().st_size > 10_000
