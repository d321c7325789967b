"""Compute targets (issue 25): the planner meets a MAC budget exactly, alone or with a size budget."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dacnn_convert import AnchorConfig, anchor, convert, count_params
from dacnn_convert.amounts import macs_target, resolve_macs
from dacnn_convert.budget import search
from dacnn_convert.cli import app
from dacnn_convert.core.report import count_macs
from dacnn_convert.errors import PlanError, TargetError, UsageError
from dacnn_convert.train import make_loaders

from .models import TinyResNet

SIZE = (3, 16, 16)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyResNet().eval()


def test_mac_targets_are_read_as_written() -> None:
    assert macs_target("40M") == 40_000_000 and macs_target("1.5G") == 1_500_000_000
    assert macs_target(5_000) == 5_000 and macs_target(4e7) == 40_000_000
    assert macs_target("4x") == "4x" and macs_target("2.5X") == "2.5x" and macs_target(None) is None
    assert resolve_macs(1_000, "4x") == 250 and resolve_macs(1_000, 300) == 300
    for bad, match in [("0.5x", "> 1"), ("abc", "40M or a ratio like 4x"), (-3, ">= 1"), (True, "finite number")]:
        with pytest.raises(UsageError, match=match):
            macs_target(bad)
    assert AnchorConfig(target_macs="40M").target_macs == 40_000_000
    assert AnchorConfig(target_macs="3x", target_ratio=2).by_budget
    assert AnchorConfig(target_macs="3x").by_budget and not AnchorConfig(target_macs="3x").by_size
    with pytest.raises(UsageError, match="target_macs="):
        AnchorConfig(target_macs="fast")


@pytest.mark.parametrize("target_params", [None, 8_000, 4_000])
@pytest.mark.parametrize("macs", ["2x", "4x", 700_000])
def test_the_converted_model_meets_both_budgets_exactly(model, target_params, macs) -> None:
    before = count_macs(model, SIZE)
    cap = resolve_macs(before, macs_target(macs))
    found = search(model, target_params, SIZE, target_macs=macs)
    student = convert(model, found.plan).model
    assert count_macs(student, SIZE) == before - found.plan.macs_saved <= cap  # the arithmetic is the model's
    assert count_params(student) == found.plan.params_after <= (target_params or count_params(model))
    assert found.target_macs == cap and found.macs_before == before
    assert student(torch.randn(2, *SIZE)).shape == (2, 10)


def test_a_mac_target_changes_the_plan_towards_compute(model) -> None:
    by_size = search(model, 8_000, SIZE)
    both = search(model, 8_000, SIZE, target_macs="3x")
    before = count_macs(model, SIZE)
    assert before - by_size.plan.macs_saved > before / 3 >= before - both.plan.macs_saved


def test_a_mac_target_below_the_floor_names_the_floor(model) -> None:
    with pytest.raises(
        TargetError, match=r"no conversion reaches [\d,]+ MACs per example: the fewest possible is"
    ) as e:
        search(model, None, SIZE, target_macs="100x")
    assert isinstance(e.value, PlanError) and e.value.exit_code == 2
    assert e.value.nearest is not None and f"at least {e.value.nearest:,}" in str(e.value)
    assert search(model, None, SIZE, target_macs=e.value.nearest).plan  # the floor named is reachable
    with pytest.raises(UsageError, match="give a size target"):
        search(model, None, SIZE)


def test_the_kl_search_and_its_rescoring_keep_the_mac_budget(model) -> None:
    loaders = make_loaders("synthetic", batch_size=32, input_size=16)
    found = search(model, None, SIZE, calib_loader=loaders.train, calib_batches=2, target_macs="2x", rescore_rounds=1)
    assert found.rescored and count_macs(model, SIZE) - found.plan.macs_saved <= found.target_macs
    student = anchor(model, target_macs="2x", calib_loader=loaders.train, calib_batches=2, reconstruct=False)
    assert count_macs(student, SIZE) <= count_macs(model, SIZE) // 2
    assert any("MACs per example; chosen" in line for line in found.explain())


def test_cli_plan_takes_a_mac_target(tmp_path) -> None:
    runner = CliRunner()
    args = ["plan", "tests.models:tiny_resnet", "--weights", "none", "--input-size", "16"]
    result = runner.invoke(app, [*args, "--target-macs", "3x", "--target-params", "6000", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["macs_after"] <= doc["macs_before"] / 3 and doc["params_after"] <= 6000
    assert doc["search"]["target_macs"] == doc["macs_before"] // 3
    for bad, says in [("100x", "the fewest possible is"), ("fast", "40M or a ratio like 4x"), ("1x", "> 1")]:
        result = runner.invoke(app, [*args, "--target-macs", bad])
        assert result.exit_code == 2 and says in result.output and "Traceback" not in result.output
    out = tmp_path / "never"
    result = runner.invoke(app, ["convert", *args[1:], "--target-macs", "100x", "--out", str(out)])
    assert result.exit_code == 2 and not out.exists()


def test_sweep_plans_every_ratio_from_one_scoring_and_stops_at_the_floor(model) -> None:
    from dacnn_convert.budget import sweep

    points = sweep(model, (2, 4, 8, 1000), SIZE)
    found = [p for p in points if p.found is not None]
    assert [p.ratio for p in found] == [2, 4, 8] and points[-1].refused and "smallest possible" in points[-1].refused
    sizes = [p.found.plan.params_after for p in found]
    assert all(s <= p.target for s, p in zip(sizes, found, strict=True)) and sizes == sorted(sizes, reverse=True)
    assert [p.found.sensitivity for p in found] == sorted(p.found.sensitivity for p in found)  # smaller costs more
    before = count_macs(model, SIZE)
    capped = sweep(model, (2, 4), SIZE, target_macs="3x")
    assert all(before - p.found.plan.macs_saved <= before // 3 for p in capped)
    with pytest.raises(UsageError, match="sweep ratio"):
        sweep(model, (0.5,), SIZE)


def test_cli_plan_sweep(tmp_path) -> None:
    runner = CliRunner()
    args = ["plan", "tests.models:tiny_resnet", "--weights", "none", "--input-size", "16", "--sweep"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    ok = [p for p in doc["points"] if p["refused"] is None]
    assert len(ok) >= 5 and all(p["params"] <= p["target"] for p in ok)
    assert all(p["macs_after"] == doc["macs_before"] - p["macs_saved"] for p in ok)
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "the planner's front" in result.output and "12x" in result.output
    result = runner.invoke(app, [*args, "--target-ratio", "4"])
    assert result.exit_code == 2 and "leave out" in result.output
