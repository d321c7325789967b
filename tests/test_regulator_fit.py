"""Issue 28: adapter regulators fitted in closed form to each member's residual (regulator_init="fit")."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dacnn_convert import anchor, load, save
from dacnn_convert.core.convert import convert
from dacnn_convert.core.fitting import centre_tap, fit_adapter
from dacnn_convert.core.plan import Plan
from dacnn_convert.core.planning import make_plan
from dacnn_convert.errors import PlanError, UsageError
from dacnn_convert.train import recalibrate_bn

from .models import TinyResNet


class Pointwise(nn.Module):
    """Two 1x1 convs of one shape (one mix group), each followed by its BN."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.bn_a = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn_a(self.a(x)))
        x = torch.relu(self.bn_b(self.b(x)))
        return self.head(x.mean((2, 3)))


def _pointwise() -> nn.Module:
    torch.manual_seed(0)
    m = Pointwise().eval()
    for bn in (m.bn_a, m.bn_b):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
    return m


def test_centre_tap() -> None:
    assert centre_tap((3, 3), (1, 1), (1, 1)) == (1, 1)
    assert centre_tap((1, 1), (0, 0), (1, 1)) == (0, 0)
    assert centre_tap((3, 3), (2, 2), (2, 2)) == (1, 1)  # dilated: tap 1 reads offset 2
    assert centre_tap((2, 2), (0, 0), (1, 1)) == (0, 0)
    assert centre_tap((3, 3), (0, 0), (1, 1)) == (0, 0)  # unpadded: the corner tap reads pixel i*s
    assert centre_tap((3, 3), "same", (1, 1)) is None
    assert centre_tap((3, 3), (3, 3), (1, 1)) is None  # padding beyond the kernel


def test_fit_adapter_weight_space_is_the_residual_tap() -> None:
    torch.manual_seed(0)
    w, v = torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3)
    found = fit_adapter(w, v, (1, 1))
    torch.testing.assert_close(found.kernel[:, :, 0, 0], (w - v)[:, :, 1, 1])
    assert found.after < found.before


def test_fit_adapter_with_moments_is_least_squares() -> None:
    """The closed form equals lstsq on the patches themselves, and it beats the weight-space tap on them."""
    torch.manual_seed(0)
    x = torch.randn(200, 3, 6, 6)
    x = x + 0.8 * x.roll(1, dims=2)  # spatially correlated inputs, as real feature maps are
    patches = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27).double()
    w, v = torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3)
    h = patches.T @ patches
    found = fit_adapter(w, v, (1, 1), (h, h), ridge=0.0)
    centre = patches[:, torch.arange(3) * 9 + 4]
    target = patches @ (w - v).reshape(4, -1).double().T
    expected = torch.linalg.lstsq(centre, target).solution.T
    torch.testing.assert_close(found.kernel[:, :, 0, 0].double(), expected, rtol=1e-4, atol=1e-4)
    tap = fit_adapter(w, v, (1, 1))
    err = lambda r: (target - centre @ r.double().T).pow(2).sum()  # noqa: E731
    assert err(found.kernel[:, :, 0, 0]) < err(tap.kernel[:, :, 0, 0])


@pytest.mark.parametrize("init", ["fit", "act"])
def test_fitted_regulators_make_pointwise_members_exact(init: str) -> None:
    """A 1x1 member's residual is itself a 1x1 kernel: the fitted adapter restores the original function."""
    model = _pointwise()
    x = torch.randn(16, 3, 8, 8)
    data = [(x, None)] if init == "act" else None
    fitted = convert(
        model, make_plan(model, "mix", "all", init=init, input_size=(3, 8, 8), regulator_init="fit"), calib_loader=data
    )
    zero = convert(
        model, make_plan(model, "mix", "all", init=init, input_size=(3, 8, 8), regulator_init="zero"), calib_loader=data
    )
    with torch.no_grad():
        ref = model(x)
        gap_fit = (fitted.model.eval()(x) - ref).abs().max().item()
        gap_zero = (zero.model.eval()(x) - ref).abs().max().item()
    assert gap_fit < (1e-5 if init == "fit" else 2e-3) < gap_zero
    assert set(fitted.regulator_errors) == {"a", "b"}
    assert all(after < before for before, after in fitted.regulator_errors.values())
    assert zero.regulator_errors == {}


def test_recalibration_keeps_fitted_adapters_the_identity() -> None:
    """BN recalibration measures a fitted adapter's output and keeps its BN the identity (eval and train mode)."""
    model = _pointwise()
    x = torch.randn(32, 3, 8, 8)
    student = convert(model, make_plan(model, "mix", "all", init="fit", input_size=(3, 8, 8))).model
    reg = student.a.regulator
    assert reg.identity_pending
    recalibrate_bn(student, [x], 1)
    assert not reg.identity_pending
    z = reg.conv(torch.relu(student.stem(x)))
    with torch.no_grad():
        torch.testing.assert_close(reg.bn.eval()(z), z, rtol=1e-4, atol=1e-5)
        trained = reg.bn.train()(z)  # batch statistics = the calibration statistics here
        torch.testing.assert_close(trained, z, rtol=1e-3, atol=1e-3)
    # the host BNs were recalibrated on the regulated output, not on a re-normalised one
    assert student.bn_a.num_batches_tracked.item() == 1


def test_resnet_fitted_regulators_lower_the_error() -> None:
    """On 3x3 members the adapter takes part of the residual: every member's output error drops."""
    torch.manual_seed(0)
    model = TinyResNet().eval()
    x = torch.randn(8, 3, 16, 16)
    plan = make_plan(model, "mix", "all", init="act", input_size=(3, 16, 16))
    conversion = convert(model, plan, calib_loader=[(x, None)])
    assert conversion.regulator_errors
    assert all(after <= before for before, after in conversion.regulator_errors.values())


def test_paper_style_regulators_say_why_they_keep_their_init() -> None:
    model = _pointwise()
    plan = make_plan(model, "mix", "all", "paper", input_size=(3, 8, 8), regulator_init="fit")
    conversion = convert(model, plan)
    assert conversion.regulator_errors == {}
    assert any("ReLU inside" in n for n in conversion.notes)


def test_regulator_init_round_trips_and_old_plans_read_zero(tmp_path) -> None:
    model = _pointwise()
    plan = make_plan(model, "mix", "all", input_size=(3, 8, 8), regulator_init="fit")
    assert Plan.from_json(plan.to_json()).regulator_init == "fit"
    old = plan.to_dict()
    del old["regulator_init"]
    assert Plan.from_dict(old).regulator_init == "zero"
    student = anchor(model, mode="mix", regulators="all", input_size=(3, 8, 8))
    save(student, tmp_path / "m.safetensors")
    again = load(tmp_path / "m.safetensors", model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), student.eval()(x))


def test_bad_regulator_init_is_one_clear_error() -> None:
    model = _pointwise()
    with pytest.raises(UsageError, match="regulator init"):
        make_plan(model, "mix", "all", input_size=(3, 8, 8), regulator_init="ones")
    bad = make_plan(model, "mix", "all", input_size=(3, 8, 8)).to_dict()
    bad["regulator_init"] = "ones"
    with pytest.raises(PlanError, match="regulator_init"):
        Plan.from_dict(bad)


def test_fitted_regulators_run_under_bf16_autocast() -> None:
    model = _pointwise()
    x = torch.randn(4, 3, 8, 8)
    student = anchor(model, mode="mix", regulators="all", calib_loader=[(x, None)], calib_batches=1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = student.eval()(x)
    assert torch.isfinite(y.float()).all()


# -- section-wise reconstruction (train.reconstruct) --------------------------------------------


def _converted(seed: int = 0):
    torch.manual_seed(seed)
    model = TinyResNet().eval()
    x = [torch.randn(8, 3, 16, 16) for _ in range(3)]
    student = anchor(model, mode="mix", regulators="all", calib_loader=[(b, None) for b in x], reconstruct=False)
    return model, student, x


def test_sections_cover_every_layer_once_in_order() -> None:
    from dacnn_convert.train.reconstruct import sections_of

    _, student, _ = _converted()
    plan = student.dacnn_plan
    sections = sections_of(plan)
    layers = [name for names, _ in sections for name in names]
    assert len(layers) == len(set(layers))
    assert sections[-1][1] is None  # the last section ends at the model's output
    assert [end for _, end in sections[:-1]] == [names[0] for names, _ in sections[1:]]


def test_reconstruction_lowers_every_section_error_and_keeps_sharing() -> None:
    from dacnn_convert.core.plan import count_params
    from dacnn_convert.train.reconstruct import ReconstructConfig, reconstruct_sections

    model, student, x = _converted()
    params = count_params(student)
    anchors = {n: p.data_ptr() for n, p in student.dacnn_anchors.named_parameters()}
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    result = reconstruct_sections(student, model, [(b, None) for b in x], ReconstructConfig(steps=30, lr=1e-2))
    assert len(result.before) == len(result.after) == len(student.dacnn_plan.sections)
    assert all(a < b for a, b in zip(result.after, result.before, strict=True))
    assert count_params(student) == params  # nothing un-shared, nothing added
    assert {n: p.data_ptr() for n, p in student.dacnn_anchors.named_parameters()} == anchors
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags  # restored
    assert not student.training


def test_reconstruction_is_deterministic() -> None:
    from dacnn_convert.train.reconstruct import ReconstructConfig, reconstruct_sections

    outs = []
    for _ in range(2):
        model, student, x = _converted()
        reconstruct_sections(student, model, [(b, None) for b in x], ReconstructConfig(steps=10, lr=1e-2))
        with torch.no_grad():
            outs.append(student(x[0]))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_anchor_reconstructs_by_default_with_data_for_the_papers_modes(monkeypatch) -> None:
    from dacnn_convert import pipeline
    from dacnn_convert.train.reconstruct import ReconstructConfig

    monkeypatch.setattr(pipeline, "DEFAULT_RECONSTRUCT", ReconstructConfig())  # the library's own default
    model, without, x = _converted()
    data = [(b, None) for b in x]
    default = anchor(model, mode="mix", regulators="all", calib_loader=data)  # reconstruct=None: on
    with torch.no_grad():
        ref = model(x[0])
        gap_default = (default(x[0]) - ref).pow(2).mean()
        gap_without = (without(x[0]) - ref).pow(2).mean()
    assert gap_default < gap_without


def test_reconstruction_is_on_with_data_for_every_plan_that_shares() -> None:
    from dacnn_convert.defaults import default_reconstruct

    for mode in ("mix", "plain", "sharesnet", "bank", "budget"):
        assert default_reconstruct(None, True, mode) and not default_reconstruct(None, False, mode)
    assert not default_reconstruct(None, True, "none")  # nothing shared, nothing to reconstruct
    assert not default_reconstruct(False, True, "bank") and default_reconstruct(True, True, "none")


def test_reconstruction_bad_input_is_one_clear_error() -> None:
    from dacnn_convert.train.reconstruct import ReconstructConfig, reconstruct_sections

    model = TinyResNet().eval()
    with pytest.raises(UsageError, match="calib_loader"):
        anchor(model, mode="mix", input_size=(3, 16, 16), reconstruct=True)
    with pytest.raises(UsageError, match="ReconstructConfig"):
        anchor(model, mode="mix", input_size=(3, 16, 16), reconstruct="yes")
    with pytest.raises(UsageError, match="steps"):
        ReconstructConfig(steps=0)
    with pytest.raises(UsageError, match="lr"):
        ReconstructConfig(lr=5.0)
    with pytest.raises(UsageError, match="converted model"):
        reconstruct_sections(model, model, [(torch.randn(2, 3, 16, 16), None)])
    _, student, _ = _converted()
    with pytest.raises(UsageError, match="no batches"):
        reconstruct_sections(student, model, [])


def test_reconstruction_under_bf16_autocast() -> None:
    from dacnn_convert.train.reconstruct import ReconstructConfig, reconstruct_sections

    model, student, x = _converted()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = reconstruct_sections(student, model, [(b, None) for b in x], ReconstructConfig(steps=5))
    assert all(torch.isfinite(torch.tensor(result.after)))
    with torch.no_grad():
        assert torch.isfinite(student(x[0])).all()


def test_fitted_adapters_stay_pending_through_save_and_load(tmp_path) -> None:
    """Converted without data, saved, loaded, then recalibrated: the same function as recalibrating the original."""
    model = _pointwise()
    student = anchor(model, mode="mix", regulators="all", input_size=(3, 8, 8))
    assert student.a.regulator.identity_pending
    save(student, tmp_path / "m.safetensors")
    again = load(tmp_path / "m.safetensors", model)
    assert again.a.regulator.identity_pending and again.b.regulator.identity_pending
    x = torch.randn(16, 3, 8, 8)
    recalibrate_bn(student, [x], 1)
    recalibrate_bn(again, [x], 1)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), student.eval()(x))


def test_reconstruction_needs_recalibrated_bn() -> None:
    from dacnn_convert.train.reconstruct import reconstruct_sections

    model = TinyResNet().eval()
    x = [(torch.randn(4, 3, 16, 16), None)]
    with pytest.raises(UsageError, match="calib_batches"):
        anchor(model, mode="mix", calib_loader=x, calib_batches=0, reconstruct=True)
    stale = convert(model, make_plan(model, "mix", input_size=(3, 16, 16))).model
    with pytest.raises(UsageError, match="recalibrate_bn"):
        reconstruct_sections(stale, model, x)
    # no BN step, no default reconstruction
    assert anchor(model, mode="mix", calib_loader=x, calib_batches=0) is not None


def test_cli_regulator_init_reaches_the_file_and_reconstruct_needs_data(tmp_path) -> None:
    """--regulator-init is recorded in the written plan; --reconstruct without --dataset is one line, exit 2."""
    from typer.testing import CliRunner

    from dacnn_convert.cli import convert_app
    from dacnn_convert.io.checkpoint import read_metadata

    runner = CliRunner()
    tiny = ["tests.models:tiny_resnet", "--weights", "none", "--input-size", "16", "--regulators", "all"]
    for choice in ("zero", "fit"):
        out = tmp_path / choice
        result = runner.invoke(convert_app, [*tiny, "--regulator-init", choice, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert Plan.from_json(read_metadata(out / "model.safetensors")["plan"]).regulator_init == choice
    result = runner.invoke(convert_app, [*tiny, "--reconstruct", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "give --dataset" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_a_section_whose_held_out_error_rises_is_put_back() -> None:
    """With four or more calibration batches a fifth is held out; a section that gets worse on them (here: Adam at
    lr 0.9 wrecks every section it trains) is restored exactly, and the result says which were kept."""
    from dacnn_convert.train.reconstruct import ReconstructConfig, reconstruct_sections

    torch.manual_seed(0)
    model = TinyResNet().eval()
    x = [torch.randn(8, 3, 16, 16) for _ in range(5)]
    student = anchor(model, mode="mix", regulators="all", calib_loader=[(b, None) for b in x], reconstruct=False)
    state = {k: v.clone() for k, v in student.state_dict().items()}
    result = reconstruct_sections(student, model, [(b, None) for b in x], ReconstructConfig(steps=5, lr=0.9))
    assert len(result.kept) == len(result.before) and not any(result.kept)
    assert result.after == result.before  # put back exactly
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())
    gentle = reconstruct_sections(student, model, [(b, None) for b in x], ReconstructConfig(steps=30, lr=1e-2))
    assert any(gentle.kept) and all(a <= b for a, b in zip(gentle.after, gentle.before, strict=True))
