"""Numerical truths of the conversion: equivalences, gradients, names and parameter arithmetic."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from dacnn_convert import anchor, convert, count_params, plan
from dacnn_convert.core.layers import AnchoredConv2d
from dacnn_convert.errors import PlanError, TraceError, UsageError

from .models import NoConv, TinyResNet, TinyVGG, Untraceable, randomize_bn

SIZE = (3, 16, 16)


def _tie(model: nn.Module, p, scales: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Give every member of each group the same kernel (times optional per-channel scales)."""
    g = torch.Generator().manual_seed(1)
    mods = dict(model.named_modules())
    for grp in p.groups:
        kernel = torch.randn(grp.shape, generator=g) * 0.2
        for m in grp.members:
            w = mods[m].weight
            a = scales[m].view(-1, 1, 1, 1) if scales and m in scales else 1.0
            with torch.no_grad():
                w.copy_(kernel[: w.shape[0], : w.shape[1]] * a)
    return model


def test_mix_groups_tiny_resnet() -> None:
    p = plan(TinyResNet(), mode="mix", input_size=SIZE)
    assert [g.members for g in p.groups] == [
        ("layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"),
        ("layer2.0.conv2", "layer2.1.conv1", "layer2.1.conv2"),
    ]
    assert [g.sections for g in p.groups] == [(1,), (2,)]


def test_mean_init_reproduces_identical_members() -> None:
    model = randomize_bn(TinyResNet()).eval()
    p = plan(model, mode="mix", init="mean", input_size=SIZE)
    _tie(model, p)
    student = convert(model, p).model.eval()
    x = torch.randn(4, *SIZE)
    torch.testing.assert_close(student(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["mix", "plain"])
def test_fit_folding_preserves_scaled_members(mode: str) -> None:
    """Members that are per-channel scalings (some negative) of one kernel are fitted exactly."""
    model = randomize_bn(TinyResNet()).eval()
    p = plan(model, mode=mode, init="fit", input_size=SIZE)
    g = torch.Generator().manual_seed(2)
    scales = {}
    for grp in p.groups:
        for m in grp.members:
            co = p.site(m).out_channels
            scales[m] = (torch.rand(co, generator=g) + 0.5) * torch.where(torch.rand(co, generator=g) < 0.3, -1.0, 1.0)
    _tie(model, p, scales)
    conversion = convert(model, p)
    assert max(e for errs in conversion.fit_errors.values() for e in errs.values()) < 1e-5
    x = torch.randn(4, *SIZE)
    torch.testing.assert_close(conversion.model.eval()(x), model(x), atol=1e-4, rtol=1e-4)


def test_fit_without_bn_keeps_a_scale_and_bias() -> None:
    """TinyVGG's last conv has a bias and no BN: the fitted scale lives in the anchored conv."""
    model = randomize_bn(TinyVGG()).eval()
    p = plan(model, mode="mix", init="fit", input_size=SIZE)
    last = "features.16"
    assert p.site(last).bn is None and p.has_scale(last)
    scales = {m: torch.rand(p.site(m).out_channels) + 0.5 for grp in p.groups for m in grp.members}
    _tie(model, p, scales)
    student = convert(model, p).model.eval()
    assert isinstance(student.get_submodule(last), AnchoredConv2d)
    assert student.get_submodule(last).scale is not None
    x = torch.randn(2, *SIZE)
    torch.testing.assert_close(student(x), model(x), atol=1e-4, rtol=1e-4)
    assert count_params(student) == p.params_after


def test_adapter_regulators_preserve_function() -> None:
    model = randomize_bn(TinyResNet()).eval()
    p = plan(
        model,
        mode="mix",
        init="mean",
        regulators="all",
        regulator_style="adapter",
        input_size=SIZE,
        regulator_init="zero",
    )
    _tie(model, p)
    student = convert(model, p).model
    # one regulator per residual block that holds an anchored conv: 2 + 2 blocks
    assert [r.host for r in p.regulators] == ["layer1.0.conv2", "layer1.1.conv2", "layer2.0.conv2", "layer2.1.conv2"]
    x = torch.randn(4, *SIZE)
    torch.testing.assert_close(student.eval()(x), model(x), atol=1e-5, rtol=1e-5)
    # and the regulators can learn: their BN weight receives a gradient
    student.train()
    student(x).square().sum().backward()
    grad = student.get_submodule("layer1.0.conv2").regulator.bn.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # fitted adapters (the default) start as the identity BN over their fitted 1x1: the conv learns
    fitted = convert(model, replace(p, regulator_init="fit")).model.train()
    fitted(x).square().sum().backward()
    assert fitted.get_submodule("layer1.0.conv2").regulator.conv.weight.grad.abs().sum() > 0


def test_paper_regulators_are_in_series() -> None:
    p = plan(TinyResNet(), mode="mix", regulators="2", regulator_style="paper", input_size=SIZE)
    assert [(r.host, r.in_channels, r.out_channels, r.section) for r in p.regulators] == [
        ("layer2.0.conv2", 16, 16, 2),
        ("layer2.1.conv2", 16, 16, 2),
    ]
    student = convert(TinyResNet(), p).model
    assert student(torch.randn(2, *SIZE)).shape == (2, 10)
    assert count_params(student) == p.params_after


def test_shared_gradient_is_sum_over_uses() -> None:
    model = randomize_bn(TinyResNet())
    p = plan(model, mode="mix", init="mean", input_size=SIZE)
    _tie(model, p)
    student = convert(model, p).model
    x = torch.randn(4, *SIZE)
    model.train()
    student.train()
    model(x).square().sum().backward()
    student(x).square().sum().backward()
    mods = dict(model.named_modules())
    for grp in p.groups:
        expected = sum(mods[m].weight.grad for m in grp.members)
        got = getattr(student.dacnn_anchors, grp.name).grad
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_state_dict_key_difference_is_exact() -> None:
    model = TinyResNet()
    p = plan(model, mode="mix", regulators="1", input_size=SIZE)
    student = convert(model, p).model
    before, after = set(model.state_dict()), set(student.state_dict())
    members = {m for g in p.groups for m in g.members}
    assert before - after == {f"{m}.weight" for m in members}
    added = after - before
    anchors = {f"dacnn_anchors.{g.name}" for g in p.groups}
    regs = {
        f"{r.host}.regulator.{k}"
        for r in p.regulators
        for k in ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked")
    }
    assert added == anchors | regs
    # each anchor exists once among the parameters, whatever number of convs use it
    assert len([n for n, _ in student.named_parameters() if n.startswith("dacnn_anchors.")]) == len(p.groups)


def test_original_is_untouched() -> None:
    model = randomize_bn(TinyResNet())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    anchor(model, mode="mix", regulators="all", input_size=SIZE)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    assert model.training


@pytest.mark.parametrize("mode", ["mix", "plain", "sharesnet", "none"])
@pytest.mark.parametrize("regulators", ["none", "all"])
@pytest.mark.parametrize("factory", [TinyResNet, TinyVGG])
def test_plan_arithmetic_equals_built_model(mode: str, regulators: str, factory) -> None:
    model = factory()
    p = plan(model, mode=mode, regulators=regulators, input_size=SIZE)
    student = convert(model, p).model
    assert count_params(student) == p.params_after
    assert student(torch.randn(2, *SIZE)).shape == (2, 10)


def test_tiny_resnet_counts_by_hand() -> None:
    model = TinyResNet()
    before = count_params(model)
    # convs: stem 3*8*9=216; layer1 4x 8*8*9=576; layer2: 8->16 1152, 3x 16*16*9=2304, 1x1 8*16=128
    # BNs: 2*(8 + 4*8 + 3*16 + 16 + 16)=... counted by the model; fc 16*10+10=170
    p = plan(model, mode="mix", input_size=SIZE)
    assert p.saved_params == 3 * 576 + 2 * 2304
    assert count_params(anchor(model, mode="mix", input_size=SIZE)) == before - (3 * 576 + 2 * 2304)
    # plain: one 16x16x3x3 master for every 3x3 conv except the stem (fed by the image)
    p = plan(model, mode="plain", input_size=SIZE)
    assert len(p.groups) == 1 and p.groups[0].shape == (16, 16, 3, 3)
    assert p.saved_params == (4 * 576 + 1152 + 3 * 2304) - 2304
    # sharesnet: the second conv of each block, per stage
    p = plan(model, mode="sharesnet", input_size=SIZE)
    assert [g.members for g in p.groups] == [("layer1.0.conv2", "layer1.1.conv2"), ("layer2.0.conv2", "layer2.1.conv2")]


def test_plain_slices_and_fit_beats_mean() -> None:
    model = TinyVGG()
    p = plan(model, mode="plain", init="fit", input_size=SIZE)
    conv = convert(model, p)
    small = conv.model.get_submodule("features.3")  # 8 -> 8 uses W[:8, :8]
    full = getattr(conv.model.dacnn_anchors, p.groups[0].name)
    assert small.weight.shape == (8, 8, 3, 3) and small.weight.data_ptr() == full.data_ptr()
    mean = convert(model, plan(model, mode="plain", init="mean", input_size=SIZE))
    fit_err = sum(conv.fit_errors[p.groups[0].name].values())
    mean_err = sum(mean.fit_errors[p.groups[0].name].values())
    assert fit_err < mean_err


def test_mode_none_is_identical() -> None:
    model = randomize_bn(TinyResNet()).eval()
    student = anchor(model, mode="none", input_size=SIZE).eval()
    x = torch.randn(2, *SIZE)
    torch.testing.assert_close(student(x), model(x), atol=0, rtol=0)
    assert count_params(student) == count_params(model)


def test_grouped_convs_share_only_with_identical_config() -> None:
    class DW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.c = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
            self.d = nn.Conv2d(8, 8, 3, padding=1, groups=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.d(self.c(self.b(self.a(x))))

    p = plan(DW(), mode="mix", input_size=(8, 8, 8))
    assert [g.members for g in p.groups] == [("a", "b")]


def test_errors_teach_the_fix() -> None:
    with pytest.raises(TraceError, match="leaf"):
        plan(Untraceable(), input_size=SIZE)
    with pytest.raises(PlanError, match="no nn.Conv2d"):
        plan(NoConv(), input_size=SIZE)
    with pytest.raises(UsageError, match="mode 'mixx'.*Did you mean: mix"):
        plan(TinyResNet(), mode="mixx", input_size=SIZE)
    with pytest.raises(UsageError, match="out of range.*1..2"):
        plan(TinyResNet(), regulators="3", input_size=SIZE)
    with pytest.raises(UsageError, match=r"input_size= is \(C, H, W\) of one example"):
        plan(TinyResNet(), input_size=(3, 0, 0))  # refused before tracing
    with pytest.raises(PlanError, match="Is input_size= right"):
        plan(TinyVGG(), input_size=(3, 1, 1))  # its max-pool needs 2x2


def test_leaf_module_makes_untraceable_model_convertible() -> None:
    from .models import Gate

    p = plan(Untraceable(), input_size=SIZE, leaf_modules=[Gate])
    assert [s.name for s in p.sites] == ["conv"] and p.groups == ()


def _calib(n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, *SIZE, generator=g), torch.zeros(16, dtype=torch.long)) for _ in range(n)]


def test_act_init_matches_outputs_better_than_weight_fits() -> None:
    """The data-aware fit minimises the error of each member's output on the data it sees."""
    model = randomize_bn(TinyResNet()).eval()
    data = _calib()
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        target = model(x)
    errors = {}
    for init in ("mean", "fit", "act", "act-seq"):
        student = convert(model, plan(model, init=init, input_size=SIZE), calib_loader=data).model.eval()
        with torch.no_grad():
            errors[init] = (student(x) - target).pow(2).mean().item()
    assert errors["act"] < errors["fit"] and errors["act"] < errors["mean"]
    assert errors["act-seq"] < errors["fit"] and errors["act-seq"] < errors["mean"]


@pytest.mark.parametrize("init", ["act", "act-seq"])
def test_act_init_is_exact_for_identical_members(init: str) -> None:
    model = randomize_bn(TinyResNet()).eval()
    p = plan(model, init=init, input_size=SIZE)
    _tie(model, p)
    student = convert(model, p, calib_loader=_calib()).model.eval()
    x = torch.randn(2, *SIZE)
    torch.testing.assert_close(student(x), model(x), atol=1e-4, rtol=1e-4)


def test_act_init_needs_data() -> None:
    with pytest.raises(UsageError, match="calib_loader"):
        convert(TinyResNet(), plan(TinyResNet(), init="act", input_size=SIZE))


def test_torch_compile_and_jit_trace_match_eager() -> None:
    student = anchor(randomize_bn(TinyResNet()), mode="plain", regulators="all", input_size=SIZE).eval()
    x = torch.randn(2, *SIZE)
    expected = student(x)
    traced = torch.jit.trace(student, x)
    torch.testing.assert_close(traced(x), expected)
    compiled = torch.compile(student, backend="eager")  # graph capture without a C++ toolchain in tests
    torch.testing.assert_close(compiled(x), expected)


def test_anchor_with_calibration_data_defaults_to_act() -> None:
    model = randomize_bn(TinyResNet()).eval()
    data = _calib()
    student = anchor(model, input_size=SIZE, calib_loader=data)
    assert student.dacnn_plan.init == "act-seq"  # the paper's modes fit layer by layer on the student
    assert anchor(model, mode="bank", input_size=SIZE, calib_loader=data).dacnn_plan.init == "act"
    assert anchor(model, input_size=SIZE).dacnn_plan.init == "fit"


def test_macs_count_every_op_a_model_uses() -> None:
    from dacnn_convert.core.report import count_macs

    class Mixed(nn.Module):  # a Conv1d (as ECA attention has) and an einsum: no hook counter sees them
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.eca = nn.Conv1d(1, 1, 3, padding=1, bias=False)
            self.proj = nn.Parameter(torch.randn(4, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)  # 4 * 3 * 9 MACs at 8 x 8 positions
            w = self.eca(y.mean((2, 3)).unsqueeze(1))  # 1 * 3 MACs at 4 positions
            return torch.einsum("bc,cd->bd", (y * w.squeeze(1)[..., None, None]).mean((2, 3)), self.proj)  # 4 * 5

    assert count_macs(Mixed(), (3, 8, 8)) == 4 * 3 * 9 * 64 + 3 * 4 + 4 * 5


@pytest.mark.parametrize("mode", ["mix", "none", "bank"])
def test_convs_tied_by_the_user_are_refused_in_one_line_before_the_arithmetic(mode: str) -> None:
    model = TinyResNet()
    model.layer1[1].conv1.weight = model.layer1[0].conv1.weight
    with pytest.raises(PlanError, match=r"layer1.1.conv1 and layer1.0.conv1 share one weight tensor .* Untie them"):
        plan(model, mode=mode, input_size=SIZE)
    with pytest.raises(PlanError, match="share one weight tensor"):
        plan(model, input_size=SIZE, target_params=1000)


def test_the_literal_types_of_the_public_api_name_exactly_the_registered_choices() -> None:
    from typing import get_args

    from dacnn_convert.core.fitting import FITS
    from dacnn_convert.core.planning import INITS, MODES, REGULATOR_STYLES, InitName, ModeName, RegulatorStyleName

    assert set(get_args(ModeName)) == set(MODES)
    assert set(get_args(InitName)) == set(INITS) | {"none"} and set(FITS) <= set(INITS)
    assert set(get_args(RegulatorStyleName)) == set(REGULATOR_STYLES)
