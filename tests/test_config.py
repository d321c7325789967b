"""AnchorConfig (issue 24): one frozen, checked, serialisable object for what to share; plan(), anchor()
and compress() take it, keyword shorthands build it, and the 0.1.0 spellings still work with a warning."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dacnn_convert import AnchorConfig, TrainConfig, anchor, compress, distill, plan
from dacnn_convert.config import FIELDS
from dacnn_convert.errors import UsageError
from dacnn_convert.recipes import Recipe
from dacnn_convert.train.data import make_loaders
from tests.models import TinyResNet

SIZE = (3, 16, 16)


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    return make_loaders("synthetic", batch_size=16, input_size=16)


def _groups(p) -> list[tuple[str, ...]]:
    return [tuple(g.members) for g in p.groups]


def test_defaults_are_the_mission_call_and_the_config_is_frozen_and_hashable() -> None:
    cfg = AnchorConfig()
    assert (cfg.mode, cfg.regulators, cfg.regulator_style, cfg.by_budget) == ("mix", "none", "adapter", False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mode = "plain"  # type: ignore[misc]
    assert hash(AnchorConfig(regulators=[1, 3])) == hash(AnchorConfig(regulators=(1, 3)))  # a list is kept as a tuple
    assert AnchorConfig(bank_size={2: 0.5, 1: 1.0}).bank_size == "1:1.0,2:0.5"  # a mapping as the CLI writes it
    assert AnchorConfig(target_ratio=4).by_budget


def test_round_trips_through_a_dict_and_refuses_unknown_keys_with_the_nearest() -> None:
    cfg = AnchorConfig(mode="bank", bank_size=0.25, regulators=(1, 2), target_params=1000, score_batches=3)
    back = AnchorConfig.from_dict(cfg.to_dict())
    assert back == cfg and back.to_dict()["regulators"] == [1, 2]
    assert set(cfg.to_dict()) == set(FIELDS)
    with pytest.raises(UsageError, match="no setting 'bank_sise'.*Did you mean: bank_size"):
        AnchorConfig.from_dict({"bank_sise": 0.5})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "mixx"}, "mode.*mix"),
        ({"target_params": 1000, "target_ratio": 4}, "one size target, not target.params.* and target.ratio"),
        ({"target_ratio": 0.5}, "must be > 1"),
        ({"target_params": -3}, "target.params"),
        ({"regulators": "1;3"}, None),  # the section text is parsed where the model's sections are known
        ({"regulators": 2.5}, "regulators"),
        ({"factorize_unshared": 0}, "factorize.unshared.*(positive|integer)"),
        ({"factorize_unshared": True}, "factorize.unshared.*(positive|integer)"),
        ({"metric": "mse"}, "metric"),
        ({"init": "acts"}, "init"),
        ({"regulator_init": "ones"}, "regulator init"),
        ({"score_batches": 0}, "score.batches"),
        ({"bank_size": [0.5]}, "bank.size"),
    ],
)
def test_bad_settings_are_refused_when_the_config_is_made(kwargs, message) -> None:
    if message is None:
        AnchorConfig(**kwargs)
        return
    with pytest.raises(UsageError, match=message):
        AnchorConfig(**kwargs)


def test_config_and_keyword_shorthands_plan_the_same() -> None:
    model = TinyResNet()
    a = plan(model, AnchorConfig(mode="bank", bank_size=0.5, regulators="all"), input_size=SIZE)
    b = plan(model, mode="bank", bank_size=0.5, regulators="all", input_size=SIZE)
    c = plan(model, AnchorConfig(mode="plain"), mode="bank", bank_size=0.5, regulators="all", input_size=SIZE)
    assert a.mode == b.mode == c.mode == "bank"  # shorthands override the config's fields
    assert _groups(a) == _groups(b) == _groups(c) and a.params_after == b.params_after == c.params_after


def test_a_size_target_in_the_config_runs_the_planner() -> None:
    model = TinyResNet()
    p = plan(model, AnchorConfig(target_ratio=2), input_size=SIZE)
    assert p.params_after <= p.params_before / 2
    assert plan(model, target_ratio=2, input_size=SIZE).params_after == p.params_after


def test_anchor_keeps_its_one_call_forms() -> None:
    torch.manual_seed(0)
    model = TinyResNet().eval()
    x = torch.randn(2, *SIZE)
    for student in (
        anchor(model, input_size=SIZE),
        anchor(model, AnchorConfig(mode="mix", regulators="all"), input_size=SIZE),
        anchor(model, mode="mix", regulators="all", input_size=SIZE),
    ):
        assert hasattr(student, "dacnn_anchors") and student.eval()(x).shape == (2, 10)


def test_wrong_second_argument_and_unknown_shorthand_teach_the_fix() -> None:
    model = TinyResNet()
    with pytest.raises(UsageError, match="second argument is an AnchorConfig.*got TrainConfig"):
        anchor(model, TrainConfig(), input_size=SIZE)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="unknown option.*regulator.*Did you mean: regulators"):
        plan(model, regulator="all", input_size=SIZE)


def test_the_0_1_0_positional_form_still_works_with_a_deprecation_warning() -> None:
    model = TinyResNet()
    with pytest.warns(DeprecationWarning, match=r"plan\(model, mode, regulators\) by position is deprecated"):
        old = plan(model, "mix", "all", input_size=SIZE)
    assert _groups(old) == _groups(plan(model, mode="mix", regulators="all", input_size=SIZE))
    with pytest.warns(DeprecationWarning, match="by position"):
        student = anchor(model, "mix", "none", "adapter", "fit", SIZE)  # input size by position too
    assert student.dacnn_plan.input_size == SIZE
    with pytest.raises(UsageError, match="mode= twice"), pytest.warns(DeprecationWarning):
        plan(model, "mix", mode="plain", input_size=SIZE)
    with pytest.warns(DeprecationWarning, match="score_batches"):
        plan(model, calib_batches=3, input_size=SIZE)


def test_compress_takes_a_config_or_a_plan_and_the_old_names_warn(data, tmp_path) -> None:
    teacher = TinyResNet().eval()
    fast = TrainConfig(epochs=1, lr=0.01, precision="fp32", limit_batches=1)
    result = compress(teacher, data.train, data.val, AnchorConfig(mode="plain"), train=fast, calib_batches=1)
    assert result.report.mode == "plain"
    p = plan(teacher, mode="bank", input_size=SIZE)
    assert compress(teacher, data.train, data.val, p, train=fast, calib_batches=1).report.mode == "bank"
    with pytest.warns(DeprecationWarning, match=r"compress\(plan=\)"):
        compress(teacher, data.train, data.val, plan=p, train=fast, calib_batches=1)
    with pytest.warns(DeprecationWarning, match=r"compress\(config=TrainConfig"):
        compress(teacher, data.train, data.val, config=fast, calib_batches=1, mode="mix")  # type: ignore[arg-type]
    with pytest.warns(DeprecationWarning, match=r"compress\(calibrate_batches=\)"):
        compress(teacher, data.train, data.val, train=fast, calibrate_batches=1, mode="mix")
    with pytest.raises(UsageError, match="either a Plan or settings"):
        compress(teacher, data.train, data.val, p, mode="mix")


def test_distill_old_calibration_name_warns_and_a_typo_is_refused(data) -> None:
    teacher = TinyResNet().eval()
    student = anchor(teacher, input_size=SIZE)
    fast = TrainConfig(epochs=1, lr=0.01, precision="fp32", limit_batches=1)
    with pytest.warns(DeprecationWarning, match=r"distill\(calibrate_batches=\)"):
        distill(student, teacher, data.train, data.val, config=fast, calibrate_batches=1)
    with pytest.raises(UsageError, match="unexpected keyword 'calib_batch'"):
        distill(student, teacher, data.train, data.val, config=fast, calib_batch=1)


def test_a_recipe_is_read_into_the_same_config() -> None:
    rec = Recipe(mode="bank", bank_size="1:1.0,2:0.5", target_params="6M", factorize_unshared="0.25", metric="fit")
    cfg = rec.anchor_config()
    assert isinstance(cfg, AnchorConfig)
    got = (cfg.target_params, cfg.factorize_unshared, cfg.bank_size, cfg.metric)
    assert got == (6_000_000, 0.25, "1:1.0,2:0.5", "fit")


def test_the_old_recipe_key_is_read_with_a_warning_and_never_beside_the_new(tmp_path) -> None:
    from dacnn_convert.errors import RecipeError
    from dacnn_convert.recipes import load_recipe

    old = tmp_path / "old.yaml"
    old.write_text("task: convert\nmodel: resnet18\ncalibrate_batches: 7\n")
    with pytest.warns(DeprecationWarning, match="recipe key calibrate_batches.*write calib_batches"):
        assert load_recipe(old).calib_batches == 7
    both = tmp_path / "both.yaml"
    both.write_text("task: convert\nmodel: resnet18\ncalibrate_batches: 7\ncalib_batches: 8\n")
    with pytest.raises(RecipeError, match="same key"):
        load_recipe(both)


def test_the_cli_takes_the_old_flag_name_too() -> None:
    import typer

    from dacnn_convert.cli import app

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for name in ("convert", "bench", "export"):
        opts = [p.opts for p in commands[name].params if p.name == "calib_batches"]
        assert opts and {"--calib-batches", "--calibrate-batches"} <= set(opts[0]), name


def test_review_findings_old_compress_combinations_and_collisions(data) -> None:
    teacher = TinyResNet().eval()
    fast = TrainConfig(epochs=1, lr=0.01, precision="fp32", limit_batches=1)
    p = plan(teacher, mode="bank", input_size=SIZE)
    with pytest.warns(DeprecationWarning) as heard:  # 0.1.0: plan= and config=TrainConfig together
        result = compress(teacher, data.train, data.val, plan=p, config=fast, calib_batches=1)  # type: ignore[arg-type]
    assert result.report.mode == "bank" and len(heard) == 2
    with pytest.raises(UsageError, match="fourth argument is an AnchorConfig or a Plan.*mode='plain'"):
        compress(teacher, data.train, data.val, "plain")  # type: ignore[arg-type]
    # compress plans with leaf modules as plan() does
    compress(teacher, data.train, data.val, train=fast, calib_batches=1, mode="mix", leaf_modules=[torch.nn.ReLU])
    loader = [(torch.randn(2, *SIZE), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(UsageError, match="calib-loader.* twice|calib_loader.* twice"), pytest.warns(DeprecationWarning):
        anchor(teacher, "mix", "none", "adapter", None, SIZE, (), loader, calib_loader=loader)


def test_a_renamed_flag_or_key_is_a_note_on_stderr(tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from dacnn_convert.cli import app

    args = ["convert", "tests.models:tiny_resnet", "--weights", "none", "--input-size", "16", "--dry-run"]
    args += ["--calibrate-batches", "3"]
    monkeypatch.setattr("sys.argv", ["dacnn", *args])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "note: --calibrate-batches is deprecated" in result.stderr and "calibrate" not in result.stdout


def test_every_search_setting_is_a_recipe_key_and_a_flag() -> None:
    from dacnn_convert.recipes import Recipe

    rec = Recipe(task="convert").override(
        score_batches=3, rescore_rounds=0, target_macs="4x", target_latency=5.0, latency_batch=8
    )
    cfg = rec.anchor_config()
    assert (cfg.score_batches, cfg.rescore_rounds, cfg.target_macs, cfg.target_latency, cfg.latency_batch) == (
        3,
        0,
        "4x",
        5.0,
        8,
    )
    from typer.testing import CliRunner

    from dacnn_convert.cli import app

    result = CliRunner().invoke(app, ["plan", "--help"], terminal_width=200)
    for flag in (
        "--score-batches",
        "--rescore-rounds",
        "--target-macs",
        "--target-latency",
        "--latency-batch",
        "--sweep",
    ):
        assert flag in result.output
