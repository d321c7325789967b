"""Latency targets (issue 25): plan, build, time, tighten the MAC budget until the measured time fits."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from dacnn_convert import AnchorConfig, plan
from dacnn_convert.cli import app
from dacnn_convert.core.report import count_macs
from dacnn_convert.errors import TargetError, UsageError
from dacnn_convert.latency import LatencyRow

from .models import TinyResNet

SIZE = (3, 16, 16)


@pytest.fixture
def fake_clock(monkeypatch):
    """Latency = 0.5 ms + 1 ms per 100k MACs, and every timing recorded: deterministic, like a machine
    whose time grows with compute but has a fixed overhead no plan removes."""
    timed: list[int] = []

    def measure(model, input_size, batch=1, precision="fp32", device="cpu", repeats=20, warmup=3, label="m"):
        macs = count_macs(model, input_size)
        timed.append(macs)
        ms = 0.5 + macs / 1e5
        return LatencyRow(label, batch, precision, device, ms, ms, repeats)

    monkeypatch.setattr("dacnn_convert.latency.measure_latency", measure)
    return timed


def test_the_mac_budget_is_tightened_until_the_measured_time_fits(fake_clock) -> None:
    torch.manual_seed(0)
    model = TinyResNet().eval()
    before = count_macs(model, SIZE)  # 1,169,568 MACs: 12.2 ms on the fake clock
    p = plan(model, AnchorConfig(target_latency=6.0), input_size=SIZE)
    assert 0.5 + (before - p.macs_saved) / 1e5 <= 6.0
    from dacnn_convert.pipeline import plan_search

    _, found = plan_search(model, AnchorConfig(target_latency=6.0), input_size=SIZE)
    assert found.latency_ms is not None and found.latency_ms <= 6.0
    assert found.latency_tries[-1][1] == found.latency_ms and all(m < before for m, _ in found.latency_tries)
    assert any(line.startswith("measured latency") for line in found.explain())
    assert found.to_dict()["latency_ms"] == found.latency_ms


def test_a_latency_no_plan_reaches_names_the_fastest_measured(fake_clock) -> None:
    model = TinyResNet().eval()
    with pytest.raises(TargetError, match=r"no plan runs in 0.6 ms per batch of 1 on this machine: the fastest plan"):
        plan(model, AnchorConfig(target_latency=0.6), input_size=SIZE)
    assert len(fake_clock) <= 1 + 6  # the original and at most TRIES plans


def test_latency_settings_are_checked_and_a_generous_target_is_met_at_once() -> None:
    with pytest.raises(UsageError, match="target_latency="):
        AnchorConfig(target_latency=0)
    with pytest.raises(UsageError, match="latency_batch="):
        AnchorConfig(target_latency=5, latency_batch=0)
    from dacnn_convert.pipeline import plan_search

    _, found = plan_search(TinyResNet().eval(), AnchorConfig(target_latency=1e6, target_ratio=2), input_size=SIZE)
    assert len(found.latency_tries) == 1 and found.latency_ms < 1e6  # measured for real, once


def test_cli_target_latency(fake_clock, tmp_path) -> None:
    args = ["plan", "tests.models:tiny_resnet", "--weights", "none", "--input-size", "16"]
    result = CliRunner().invoke(app, [*args, "--target-latency", "6", "--explain"])
    assert result.exit_code == 0, result.output
    assert "measured latency" in result.output
    result = CliRunner().invoke(app, [*args, "--target-latency", "0.6"])
    assert result.exit_code == 2 and "the fastest plan measured" in result.output
    out = tmp_path / "never"
    result = CliRunner().invoke(app, ["convert", *args[1:], "--target-latency", "0.6", "--out", str(out)])
    assert result.exit_code == 2 and not out.exists()


def test_a_mac_target_below_the_floor_is_not_bent_by_a_latency_target(fake_clock) -> None:
    model = TinyResNet().eval()
    with pytest.raises(TargetError, match=r"no conversion reaches [\d,]+ MACs per example") as caught:
        plan(model, AnchorConfig(target_latency=1e6, target_macs="100x"), input_size=SIZE)
    assert caught.value.exit_code == 2 and caught.value.nearest is not None
    assert len(fake_clock) <= 1  # the original only: no plan over the MAC target was built or timed


def test_a_latency_target_leaves_the_callers_random_state_alone(fake_clock) -> None:
    model = TinyResNet().eval()
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    plan(model, AnchorConfig(target_latency=6.0), input_size=SIZE)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_sweep_refuses_a_latency_target() -> None:
    args = ["plan", "tests.models:tiny_resnet", "--weights", "none", "--input-size", "16", "--sweep"]
    result = CliRunner().invoke(app, [*args, "--target-latency", "5"])
    assert result.exit_code == 2 and "does not time plans" in result.output


def test_the_model_card_shows_the_measured_latency(fake_clock, tmp_path) -> None:
    out = tmp_path / "student"
    args = ["convert", "tests.models:tiny_resnet", "--weights", "none", "--input-size", "16"]
    result = CliRunner().invoke(app, [*args, "--target-latency", "6", "--latency-batch", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    assert "| latency, batch 2 (fp32, measured when planned, on that machine) | 12.2 ms |" in card
