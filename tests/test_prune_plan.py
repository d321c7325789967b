"""Prune, then share (issue 25 item 2): channel pruning as a step of a plan, exact and round-tripping."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from dacnn_convert import AnchorConfig, anchor, convert, count_macs, count_params, load, save
from dacnn_convert.cli import app
from dacnn_convert.core.plan import Plan
from dacnn_convert.core.pruning import Pruning
from dacnn_convert.errors import PlanError, TargetError, UsageError
from dacnn_convert.io.dense import export_dense
from dacnn_convert.io.sources import ModelSpec
from dacnn_convert.pipeline import plan_search
from dacnn_convert.prune_search import prune
from dacnn_convert.train import make_loaders, recalibrate_bn, reconstruct_sections
from dacnn_convert.train.reconstruct import ReconstructConfig

from .models import TinyResNet

SIZE = (3, 16, 16)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyResNet(width=16).eval()


def _logits(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m.eval()(x)


def test_a_pruning_plan_counts_exactly_and_converts_the_unpruned_model(model) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan, _ = plan_search(model, AnchorConfig(mode="bank", bank_size=0.5, prune=0.25), input_size=SIZE)
    assert plan.prune is not None and plan.prune.ratio == 0.25 and plan.prune.importance == "group"
    narrow, spec = prune(model, 0.25, "group", SIZE)
    assert plan.prune == spec  # what it removes is counted on the model itself
    assert spec.params_saved == count_params(model) - count_params(narrow) > 0
    assert plan.params_before == count_params(model)  # sizes count from the original
    student = convert(model, plan).model
    assert count_params(student) == plan.params_after < count_params(narrow)
    assert count_macs(student, SIZE) == count_macs(model, SIZE) - plan.macs_saved
    assert plan.groups and student.layer2[1].conv1.in_channels == 24  # 32 channels, a quarter pruned
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the original untouched
    assert model.layer2[1].conv1.in_channels == 32


def test_the_plan_round_trips_and_old_files_read_as_unpruned(model) -> None:
    plan, _ = plan_search(model, AnchorConfig(mode="bank", prune=0.5, prune_importance="l1"), input_size=SIZE)
    assert Plan.from_json(plan.to_json()) == plan
    assert json.loads(plan.to_json())["prune"]["importance"] == "l1"
    plain, _ = plan_search(model, AnchorConfig(mode="bank"), input_size=SIZE)
    assert "prune" not in plain.to_dict() and plain.prune is None  # files of plans that prune nothing unchanged
    bad = plan.to_dict()
    for value, match in [(1.5, "in \\(0, 1\\)"), ("x", "could not convert|malformed")]:
        bad["prune"] = {"ratio": value}
        with pytest.raises(PlanError, match=match):
            Plan.from_dict(bad)
    bad["prune"] = {"ratio": 0.5, "importance": "taylor"}
    with pytest.raises(PlanError, match="pruning importance"):
        Plan.from_dict(bad)


def test_save_load_int8_and_dense_export_of_a_pruned_and_shared_model(model, tmp_path) -> None:
    student = anchor(model, AnchorConfig(mode="bank", bank_size=0.25, prune=0.25), input_size=SIZE)
    x = torch.randn(4, *SIZE)
    spec = ModelSpec("module", "tests.models:TinyResNet", 10)
    for dtype in ("fp32", "int8"):
        path = save(student, tmp_path / f"m-{dtype}.safetensors", source=spec, dtype=dtype)
        back = load(path, model=TinyResNet(width=16))  # the unpruned skeleton: the plan narrows it
        assert count_params(back) == count_params(student)
        tol = 0 if dtype == "fp32" else 0.2
        assert (_logits(back, x) - _logits(student, x)).abs().max() <= tol
    dense = export_dense(student, tmp_path / "dense.safetensors", TinyResNet(width=16), SIZE)
    assert dense.max_abs_diff is not None and dense.max_abs_diff < 1e-4  # into a narrower stock network


def test_a_search_with_pruning_meets_both_targets_exactly(model) -> None:
    macs = count_macs(model, SIZE)
    cfg = AnchorConfig(target_ratio=3, target_macs="3x", prune=0.25)
    plan, found = plan_search(model, cfg, input_size=SIZE)
    student = convert(model, plan).model
    assert count_params(student) == plan.params_after <= count_params(model) // 3
    assert count_macs(student, SIZE) == macs - plan.macs_saved <= macs // 3
    assert found is not None and found.macs_before == macs  # the original's, not the pruned model's
    assert any("pruned first: 0.25" in line for line in found.explain())
    assert found.to_dict()["prune"] == 0.25


def test_auto_without_data_takes_the_least_pruning_that_reaches_the_targets(model) -> None:
    cfg = AnchorConfig(target_ratio=2, prune="auto")
    plan, found = plan_search(model, cfg, input_size=SIZE)
    assert plan.prune is None and found is not None and [t[0] for t in found.prune_tries] == [0.0]
    # a MAC target banks cannot reach alone at this size: pruning is what gets there
    hard = AnchorConfig(target_ratio=1.5, target_macs="20x", prune="auto")
    plan, found = plan_search(model, hard, input_size=SIZE)
    assert plan.prune is not None and count_macs(convert(model, plan).model, SIZE) <= count_macs(model, SIZE) // 20
    with pytest.raises(TargetError):
        plan_search(model, AnchorConfig(target_ratio=1.5, target_macs="20x"), input_size=SIZE)


def test_a_target_below_the_pruned_floor_is_refused_in_the_originals_terms(model) -> None:
    with pytest.raises(TargetError) as caught:
        plan_search(model, AnchorConfig(target_params=100, prune=0.5), input_size=SIZE)
    said = str(caught.value)
    assert said.startswith("after pruning 0.5 of every layer's channels (")
    assert f"of the original's {count_params(model):,} params left" in said
    assert said.endswith("or prune more (a ratio above 0.5)") and "prune as well" not in said
    assert caught.value.nearest is None  # a params floor: ``nearest`` is a MAC budget where set
    with pytest.raises(TargetError, match=r"or prune as well \(prune=\)$"):  # no pruning asked: the advice stands
        plan_search(model, AnchorConfig(target_params=100), input_size=SIZE)


def test_each_ratio_is_scored_whole_against_the_original(model) -> None:
    from dacnn_convert.budget import search
    from dacnn_convert.prune_search import PrunedModels, search_pruned

    loaders = make_loaders("synthetic", batch_size=16, input_size=16)
    small = TinyResNet(width=8).eval()
    pruned = PrunedModels(small, SIZE, "group")

    finals = []

    def at(narrow, reuse, final):
        finals.append(final)
        return search(narrow, count_params(small) // 2, SIZE, loaders.train, 1, "kl", rescore_rounds=0, reuse=reuse)

    found = search_pruned(pruned, (0.0, 0.5), at, loaders.train, 1, "kl")
    assert [t[0] for t in found.prune_tries] == [0.0, 0.5]
    assert all(kl is not None and kl >= 0 for _, kl, _, _, _ in found.prune_tries)
    lowest = min(kl for _, kl, _, _, _ in found.prune_tries)
    chosen = found.plan.prune.ratio if found.plan.prune else 0.0
    assert dict((r, kl) for r, kl, _, _, _ in found.prune_tries)[chosen] <= lowest * 1.02  # within the tolerance
    assert found.plan.params_after <= count_params(small) // 2
    assert finals == [False, False, True]  # each ratio by the additive search, the best searched once more


@pytest.mark.slow
def test_auto_with_data_scores_every_ratio_against_the_original(model) -> None:
    loaders = make_loaders("synthetic", batch_size=16, input_size=16)
    cfg = AnchorConfig(target_ratio=2, target_macs="2x", prune="auto", score_batches=2, rescore_rounds=0)
    plan, found = plan_search(model, cfg, calib_loader=loaders.train, input_size=SIZE)
    assert found is not None and len(found.prune_tries) >= 2
    assert all(kl is not None and kl >= 0 for _, kl, _, _, _ in found.prune_tries)
    lowest = min(kl for _, kl, _, _, _ in found.prune_tries)
    chosen = (plan.prune.ratio, plan.prune.sections) if plan.prune else (0.0, ())
    scored = {(0.0 if by else r, by): kl for r, kl, _, _, by in found.prune_tries}  # per section: ratio 0 + sections
    assert scored[chosen] <= lowest * 1.02
    assert any("channel pruning" in line and "kl" in line for line in found.explain())


def test_reconstruction_after_pruning_matches_the_pruned_original(model) -> None:
    loaders = make_loaders("synthetic", batch_size=16, input_size=16)
    student = anchor(model, AnchorConfig(mode="bank", bank_size=0.25, prune=0.25), calib_loader=loaders.train)
    recalibrate_bn(student, loaders.train, 2)
    result = reconstruct_sections(student, model, loaders.train, ReconstructConfig(steps=2, batches=4))
    assert len(result.before) == len(result.sections) and all(e >= 0 for e in result.before)


def test_bad_pruning_settings_are_one_line_each() -> None:
    for value, match in [(1.0, "in \\[0, 1\\)"), (-0.1, "in \\[0, 1\\)"), ("lots", "or auto"), (True, "or auto")]:
        with pytest.raises(UsageError, match=match):
            AnchorConfig(mode="bank", prune=value)
    assert AnchorConfig(prune=0).prune is None and AnchorConfig(prune="0.25").prune == 0.25
    with pytest.raises(UsageError, match="needs a target|for a target"):
        AnchorConfig(mode="bank", prune="auto")
    with pytest.raises(UsageError, match="prune importance"):
        AnchorConfig(prune=0.2, prune_importance="taylor")
    with pytest.raises(PlanError, match="in \\(0, 1\\)"):
        Pruning(0.0)


def test_the_cli_prunes_then_shares(tmp_path) -> None:
    runner = CliRunner()
    args = ["plan", "tests.models:TinyResNet", "--num-classes", "10", "--input-size", "3x16x16"]
    out = runner.invoke(app, [*args, "--target-ratio", "3", "--prune", "0.25", "--explain"])
    assert out.exit_code == 0, out.output
    assert "pruned first: 0.25" in out.output
    bad = runner.invoke(app, [*args, "--mode", "bank", "--prune", "auto"])
    assert bad.exit_code == 2 and "--prune auto searches" in bad.output
    bad = runner.invoke(app, [*args, "--mode", "bank", "--prune", "2"])
    assert bad.exit_code == 2 and "--prune is a fraction" in bad.output
    bad = runner.invoke(app, [*args, "--sweep", "--prune", "0.25"])
    assert bad.exit_code == 2 and "leave out --prune for the sweep" in bad.output


def test_feature_distillation_is_refused_for_a_pruned_plan(model) -> None:
    from dacnn_convert import TrainConfig, compress

    loaders = make_loaders("synthetic", batch_size=16, input_size=16, train_limit=64)
    plan, _ = plan_search(model, AnchorConfig(mode="bank", prune=0.25), input_size=SIZE)
    with pytest.raises(UsageError, match="feature-loss"):
        compress(model, loaders.train, loaders.val, plan, train=TrainConfig(epochs=1, feature_weight=1.0))


def test_bf16_autocast_runs_a_pruned_and_shared_model(model) -> None:
    student = anchor(model, AnchorConfig(mode="bank", bank_size=0.25, prune=0.25), input_size=SIZE)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        y = student.eval()(torch.randn(2, *SIZE))
    assert y.shape == (2, 10) and torch.isfinite(y.float()).all()


def test_replace_keeps_a_plan_valid() -> None:
    p = Pruning(0.25, "group", 10, 20)
    assert replace(p, ratio=0.5).ratio == 0.5 and p.label == "prune 0.25 (group)"


def test_compensation_refits_each_pruned_layer_to_the_originals_outputs() -> None:
    """Closed-form compensation (core.pruning.compensate): every layer that lost input channels reproduces the
    original's kept outputs better than its pruned slice did, on the original's inputs."""
    import copy

    from dacnn_convert.core.pruning import channel_prune, compensate

    torch.manual_seed(0)
    original = TinyResNet(width=16).eval()
    loaders = make_loaders("synthetic", batch_size=32, input_size=16)
    batches = [b for _, b in zip(range(3), loaders.train, strict=False)]
    pruned = copy.deepcopy(original)
    removed: dict = {}
    channel_prune(pruned, 0.5, "group", SIZE, removed=removed)
    sliced = copy.deepcopy(pruned).eval()
    done = compensate(pruned, original, removed, batches, 3)
    assert "layer2.1.conv1" in done and "fc" in done and "conv1" not in done  # the stem lost no input
    x = batches[0][0]

    def output_of(m: torch.nn.Module, name: str, inputs_from: torch.nn.Module) -> torch.Tensor:
        """``m``'s layer ``name`` applied to the input the original feeds it, kept input channels only."""
        seen = {}
        hook = dict(inputs_from.named_modules())[name].register_forward_hook(lambda _m, i, _o: seen.update(x=i[0]))
        with torch.no_grad():
            inputs_from(x)
        hook.remove()
        gone = set(removed[name]["in"])
        kept = [c for c in range(seen["x"].shape[1]) if c not in gone]
        return dict(m.named_modules())[name](seen["x"][:, kept])

    for name in ("layer1.1.conv2", "layer2.1.conv1", "fc"):
        layer = dict(original.named_modules())[name]
        gone = set(removed[name].get("out", ()))
        rows = [i for i in range(layer.weight.shape[0]) if i not in gone]
        out: dict = {}
        hook = layer.register_forward_hook(lambda _m, _i, o, out=out: out.update(y=o))
        with torch.no_grad():
            original(x)
        hook.remove()
        target = out["y"][:, rows]
        with torch.no_grad():
            before = (output_of(sliced, name, original) - target).pow(2).mean()
            after = (output_of(pruned, name, original) - target).pow(2).mean()
        assert after < 0.8 * before, (name, float(before), float(after))


def test_a_data_aware_conversion_compensates_the_pruning(model) -> None:
    from dacnn_convert.core.pruning import pruned_copy

    loaders = make_loaders("synthetic", batch_size=16, input_size=16)
    batches = [b for _, b in zip(range(2), loaders.train, strict=False)]
    plan, _ = plan_search(model, AnchorConfig(mode="bank", bank_size=1.0, prune=0.5), input_size=SIZE)
    assert plan.prune is not None
    compensated = pruned_copy(model, plan.prune, SIZE, batches, 2)
    with_data = convert(model, replace(plan, init="act"), calib_loader=batches, calib_batches=2).model
    without = convert(model, replace(plan, init="fit")).model
    # the logits layer is never banked: it keeps exactly what the pruning (and its compensation) left
    assert torch.equal(with_data.fc.weight, compensated.fc.weight)
    assert not torch.allclose(without.fc.weight, compensated.fc.weight)
    assert torch.equal(without.fc.weight, pruned_copy(model, plan.prune, SIZE).fc.weight)


def test_onnx_of_a_pruned_and_shared_model_stores_each_bank_once(model, tmp_path) -> None:
    from dacnn_convert import export_onnx, inspect_file

    student = anchor(model, AnchorConfig(mode="bank", bank_size=0.5, prune=0.25), input_size=SIZE)
    result = export_onnx(student, tmp_path / "m.onnx", SIZE)
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    users = {name: len(u) for name, _, u in inspect_file(result.path).shared}
    for g in student.dacnn_plan.groups:
        assert users[f"dacnn_anchors.{g.name}"] == len(g.members)


def test_pruning_alone_is_found_at_the_smallest_ratio_that_meets_the_targets() -> None:
    from dacnn_convert.core.pruning import pruned_copy
    from dacnn_convert.prune_search import PrunedModels, _alone, meets

    torch.manual_seed(0)
    small = TinyResNet(width=16).eval()
    target = count_params(pruned_copy(small, Pruning(0.3), SIZE))
    fits = meets(target, None, SIZE)
    r = _alone(PrunedModels(small, SIZE, "group"), 0.0, 0.5, fits)
    assert r is not None and 0.25 < r <= 0.33 and fits(pruned_copy(small, Pruning(r), SIZE))
    assert not fits(pruned_copy(small, Pruning(r - 0.5 / 32), SIZE))
    assert _alone(PrunedModels(small, SIZE, "group"), 0.0, 0.1, fits) is None  # not within reach


class ConcatNet(torch.nn.Module):
    """Two branches concatenated into one conv (DenseNet / Inception): the consumer is pruned by two groups."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b = torch.nn.Conv2d(3, 12, 3, padding=1)
        self.mix = torch.nn.Conv2d(20, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return self.fc(torch.relu(self.mix(y)).mean((2, 3)))


def test_removed_channels_of_a_concatenation_are_in_the_original_numbering() -> None:
    import copy

    from dacnn_convert.core.pruning import channel_prune

    torch.manual_seed(0)
    original = ConcatNet().eval()
    pruned = copy.deepcopy(original)
    removed: dict = {}
    channel_prune(pruned, 0.5, "group", SIZE, removed=removed)
    gone = sorted(removed["mix"]["in"])
    kept = [c for c in range(20) if c not in gone]
    assert len(gone) == 10 and len(set(gone)) == 10 and all(0 <= c < 20 for c in gone)
    # the consumer's kept slice is exactly the original kernel at the recorded kept channels
    out_kept = [o for o in range(16) if o not in set(removed["mix"].get("out", ()))]
    assert torch.equal(pruned.mix.weight, original.mix.weight[out_kept][:, kept])
    assert {c - 8 for c in gone if c >= 8} == set(removed["b"]["out"])  # branch b's channels, shifted by a's 8


def test_pruning_leaves_the_random_state_and_each_modules_mode_alone(model) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    model.train()
    model.layer1[0].bn1.eval()  # a frozen BatchNorm inside a model in train mode
    try:
        plan, _ = plan_search(model, AnchorConfig(mode="bank", prune=0.25), input_size=SIZE)
        assert torch.equal(torch.get_rng_state(), state)  # (building layers in convert draws, as torch does)
        student = convert(model, plan).model
        assert model.training and not model.layer1[0].bn1.training
        assert student.training and not student.layer1[0].bn1.training
    finally:
        model.eval()


def test_no_default_reconstruction_after_pruning() -> None:
    from dacnn_convert.defaults import default_reconstruct

    assert default_reconstruct(None, True, "budget") and not default_reconstruct(None, True, "budget", prunes=True)
    assert default_reconstruct(True, True, "budget", prunes=True)  # asked for, it runs
