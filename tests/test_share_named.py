"""Banks the user names (issue 22 items 1 and 6): any same-shape convs or nn.Linears of a stage, by name or pattern;
a named layer without a partner, the logits layer, a depthwise conv: one line each."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dacnn_convert import AnchorConfig, convert, count_params, load, plan, save
from dacnn_convert.cli import app
from dacnn_convert.errors import UsageError
from dacnn_convert.io.dense import export_dense
from dacnn_convert.io.sources import ModelSpec

from .models import TinyMixer, VGGHead

SIZE = (3, 16, 16)


@pytest.fixture(scope="module")
def mixer():
    torch.manual_seed(0)
    return TinyMixer().eval()


def test_named_linears_share_one_bank_and_nothing_else_with_mode_none(mixer, tmp_path) -> None:
    p = plan(mixer, AnchorConfig(mode="none", share="stage1.*.fc1", bank_size=4), input_size=SIZE)
    assert [(g.members, g.kind, g.rank) for g in p.groups] == [(("stage1.0.fc1", "stage1.1.fc1"), "bank", 4)]
    student = convert(mixer, p).model
    assert count_params(student) == p.params_after < count_params(mixer)
    bases = [k for k in student.state_dict() if k.startswith("dacnn_anchors.")]
    assert len(bases) == 1  # one key for the shared basis
    path = save(student, tmp_path / "m.safetensors", source=ModelSpec("module", "tests.models:TinyMixer", 10))
    back = load(path, model=TinyMixer())
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.allclose(back.eval()(x), student.eval()(x), atol=1e-5)
    dense = export_dense(student, tmp_path / "dense.safetensors", TinyMixer(), SIZE)
    assert dense.max_abs_diff is not None and dense.max_abs_diff < 1e-4


def test_named_groups_take_their_members_out_of_the_modes_banks(mixer) -> None:
    by_mode = plan(mixer, AnchorConfig(mode="bank", bank_size=0.5), input_size=SIZE)
    assert any(set(g.members) == {"stage1.0.fc1", "stage1.1.fc1"} for g in by_mode.groups)
    both = plan(mixer, AnchorConfig(mode="bank", bank_size=0.5, share=("stage2.0.fc2,stage2.1.fc2",)), input_size=SIZE)
    assert [g.members for g in both.groups if "stage2.0.fc2" in g.members] == [("stage2.0.fc2", "stage2.1.fc2")]
    assert {m for g in both.groups for m in g.members} >= {"stage1.0.fc1", "stage1.1.fc1"}  # the mode's stay


def test_bad_named_groups_are_one_line_each(mixer) -> None:
    for share, match in [
        (
            "stage1.0.fc1",
            "names only stage1.0.fc1 \\(Linear 8->16 at 16x16\\): a bank needs a partner.*there: stage1.1.fc1",
        ),
        ("stage1.0.fc1,stage2.0.fc1", "different shapes or stages"),
        ("head,stage1.0.fc1", "produces the model's outputs"),
        ("stage1.*.dw", "grouped or depthwise conv"),
        ("stage1.0.fc9", "matches no nn.Conv2d or nn.Linear.*Did you mean: .*stage1.0.fc1"),
        ("stage1.*.fc1;stage1.0.fc1,stage1.1.fc1", "which group 1 of share= names too"),
    ]:
        with pytest.raises(UsageError, match=match):
            plan(mixer, AnchorConfig(mode="none", share=share), input_size=SIZE)
    with pytest.raises(UsageError, match="use it with mode= bank"):
        AnchorConfig(mode="mix", share="a,b")
    with pytest.raises(UsageError, match="the planner picks its own groups"):
        AnchorConfig(mode="bank", share="a,b", target_ratio=4)
    with pytest.raises(UsageError, match="empty group"):
        AnchorConfig(mode="bank", share="a,b;;c,d")
    assert AnchorConfig(mode="bank", share=["a, b", "c"]).share == ("a,b", "c")
    assert AnchorConfig.from_dict(AnchorConfig(mode="bank", share="a,b;c").to_dict()).share == ("a,b", "c")


def test_a_classifier_linear_without_a_partner_is_refused_by_the_cli_and_nothing_is_written(tmp_path) -> None:
    runner = CliRunner()
    out = tmp_path / "out"
    args = ["convert", "tests.models:VGGHead", "--weights", "none", "--num-classes", "10", "--input-size", "16"]
    result = runner.invoke(app, [*args, "--mode", "none", "--share", "classifier.2", "--out", str(out)])
    assert result.exit_code == 2 and "a bank needs a partner" in result.output
    assert not out.exists()
    with pytest.raises(UsageError, match="a bank needs a partner"):  # the same in Python
        plan(VGGHead(), AnchorConfig(mode="none", share="classifier.2"), input_size=SIZE)


def test_the_cli_converts_a_named_bank(tmp_path) -> None:
    runner = CliRunner()
    out = tmp_path / "out"
    args = ["convert", "tests.models:TinyMixer", "--weights", "none", "--num-classes", "10", "--input-size", "16"]
    result = runner.invoke(
        app, [*args, "--mode", "none", "--share", "stage2.*.fc1", "--bank-size", "8", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    groups = json.loads((out / "report.json").read_text())["groups"]
    assert [(g["kernel"], [m for m, _ in g["fit_errors"]]) for g in groups] == [
        ("bank 8x16x1x1", ["stage2.0.fc1", "stage2.1.fc1"])
    ]


def test_a_named_bank_and_factorize_unshared_never_take_one_layer_twice(mixer) -> None:
    p = plan(
        mixer, AnchorConfig(mode="none", share="stage1.*.fc1", bank_size=4, factorize_unshared=0.25), input_size=SIZE
    )
    members = [m for g in p.groups for m in g.members]
    assert len(members) == len(set(members))  # each layer in one group
    assert p.mode == "bank"  # the plan's groups are banks (reconstruction's default follows it)
    assert [g.members for g in p.groups if g.rank == 4 and len(g.members) == 2] == [("stage1.0.fc1", "stage1.1.fc1")]
    student = convert(mixer, p).model
    assert count_params(student) == p.params_after


def test_a_named_bank_needs_a_size_and_the_sweep_refuses_share(mixer) -> None:
    from dacnn_convert.pipeline import plan_sweep

    with pytest.raises(UsageError, match="section 2, which bank_size= gives no size: add 2:0.25"):
        plan(mixer, AnchorConfig(mode="none", share="stage1.*.fc1;stage2.*.fc1", bank_size="1:0.5"), input_size=SIZE)
    with pytest.raises(UsageError, match="leave out share= for the sweep"):
        plan_sweep(mixer, AnchorConfig(mode="bank", share="stage1.*.fc1"), input_size=SIZE)
