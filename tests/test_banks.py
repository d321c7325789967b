"""Filter banks: plan arithmetic, the whitened closed-form fit, exactness at full rank, bad input."""

from __future__ import annotations

import pytest
import torch

from dacnn_convert import convert, count_params, load, plan, save
from dacnn_convert.core.banks import parse_bank_size
from dacnn_convert.core.fitting import fit_bank
from dacnn_convert.core.layers import AnchoredConv2d
from dacnn_convert.errors import UsageError

from .models import TinyResNet, randomize_bn

SIZE = (3, 16, 16)


def _calib(n: int = 3, batch: int = 16) -> list[tuple[torch.Tensor, None]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(batch, *SIZE, generator=g), None) for _ in range(n)]


def test_bank_plan_arithmetic_is_exact() -> None:
    """TinyResNet (w=8): stage 1 shares 4 convs 8x8x3x3, stage 2 three 16x16x3x3; bank_size 0.5."""
    model = TinyResNet()
    p = plan(model, mode="bank", bank_size=0.5, input_size=SIZE)
    assert [(g.kind, g.shape, len(g.members)) for g in p.groups] == [
        ("bank", (4, 8, 3, 3), 4),
        ("bank", (8, 16, 3, 3), 3),
    ]
    # stage 1: 4*72 bank + 4 members * 8*4 coefficients = 416 instead of 4*576 = 2304
    # stage 2: 8*144 bank + 3 members * 16*8 coefficients = 1536 instead of 3*2304 = 6912
    assert p.saved_params == (2304 - 416) + (6912 - 1536)
    assert p.params_after == count_params(model) - 1888 - 5376
    student = convert(model, p).model
    assert count_params(student) == p.params_after
    keys = set(student.state_dict()) - set(model.state_dict())
    assert {k for k in keys if k.startswith("dacnn_anchors.")} == {f"dacnn_anchors.{g.name}" for g in p.groups}
    assert {k for k in keys if not k.startswith("dacnn_anchors.")} == {
        f"{m}.coeff.weight" for g in p.groups for m in g.members
    }


def test_per_section_sizes_and_factorized_unshared_convs() -> None:
    model = TinyResNet()
    p = plan(model, mode="bank", bank_size="2:0.25", factorize_unshared=0.5, input_size=SIZE)
    banks = [g for g in p.groups if len(g.members) > 1]
    assert [(g.shape, g.sections) for g in banks] == [((4, 16, 3, 3), (2,))]  # section 1 stays free
    single = {g.members[0]: g.shape for g in p.groups if len(g.members) == 1}
    # layer2.0.conv1 (16x8x3x3, stride 2) at rank 8: 8*72 + 16*8 = 704 < 1152. The downsample
    # (16x8x1x1 = 128) would grow (8*8 + 16*8 = 192) and the stem is fed by the image: both stay dense.
    # The classifier (10x16 Linear) produces the logits: it stays dense (rank 5 would bound theirs).
    assert single == {"layer2.0.conv1": (8, 8, 3, 3)}
    assert any("fc stays dense: it produces the model's outputs" in n for n in p.notes)
    assert any("layer2.0.downsample.0 stays dense" in n for n in p.notes)
    assert count_params(convert(model, p).model) == p.params_after


@pytest.mark.parametrize("init", ["fit", "act"])
def test_full_rank_bank_reproduces_the_original(init: str) -> None:
    """k = min(members x C_out, C_in kh kw) spans every member: the function is unchanged."""
    model = randomize_bn(TinyResNet()).eval()
    p = plan(model, mode="bank", bank_size="1:4.0,2:3.0", init=init, input_size=SIZE)  # k = 32 and 48
    assert [g.rank for g in p.groups] == [32, 48]
    conv = convert(model, p, calib_loader=_calib() if init == "act" else None)
    x = torch.randn(4, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(conv.model.eval()(x), model(x), atol=1e-4, rtol=1e-4)
    assert all(e < 1e-5 for errs in conv.fit_errors.values() for e in errs.values())
    assert all(abs(e - 1.0) < 1e-9 for e in conv.fit_energy.values())


def test_whitened_fit_beats_the_weight_fit_on_its_own_inputs() -> None:
    """With inputs concentrated in a few directions, the whitened fit's output error is far lower."""
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(8, 4, 3, 3, generator=g) for _ in range(3)]
    basis = torch.randn(36, 6, generator=g, dtype=torch.float64)
    x = torch.randn(500, 6, generator=g, dtype=torch.float64) @ basis.T  # inputs span 6 of 36 dims
    h = x.T @ x
    h = h / h.diagonal().mean()
    whitened, plain = fit_bank(weights, 6, [h, h, h]), fit_bank(weights, 6)

    def out_err(fit) -> float:
        errs = []
        for w, c in zip(weights, fit.coefficients, strict=True):
            approx = c.double() @ fit.bank.reshape(6, -1).double()
            ref = w.reshape(8, -1).double()
            errs.append(float(((ref - approx) @ x.T).norm() / (ref @ x.T).norm()))
        return max(errs)

    assert out_err(whitened) < 1e-2  # six directions seen, six filters: exact on the data but for the ridge
    assert out_err(plain) > 0.3
    assert max(whitened.errors) == pytest.approx(out_err(whitened), abs=1e-4)  # reported = measured


def test_bank_gradients_reach_bank_and_coefficients_and_eval_merge_is_exact() -> None:
    model = randomize_bn(TinyResNet()).eval()
    p = plan(model, mode="bank", bank_size=2, input_size=SIZE)
    student = convert(model, p).model
    x = torch.randn(2, *SIZE)
    student.train()
    student(x).sum().backward()
    for g in p.groups:
        assert getattr(student.dacnn_anchors, g.name).grad.abs().sum() > 0
        for m in g.members:
            assert student.get_submodule(m).coeff.weight.grad.abs().sum() > 0
    student.eval()
    conv: AnchoredConv2d = student.get_submodule(p.groups[0].members[0])
    conv.coeff.weight.data[0, 0] += 10.0  # k=2 < C_out: the two-step path; big k merges
    with torch.no_grad():
        y_inf = student(x)
    with torch.enable_grad():
        y_train_path = student(x)
    torch.testing.assert_close(y_inf, y_train_path.detach(), atol=1e-5, rtol=1e-5)


def test_merged_kernel_is_used_when_cheaper_and_refreshed_after_updates() -> None:
    model = randomize_bn(TinyResNet()).eval()
    p = plan(model, mode="bank", bank_size=1.0, input_size=SIZE)  # k = C_out: merged is cheaper
    student = convert(model, p).model.eval()
    conv: AnchoredConv2d = student.get_submodule(p.groups[0].members[0])
    assert conv.merged_is_cheaper
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        before = student(x)
        conv.coeff.weight.mul_(2.0)  # an in-place update moves the version counter
        after = student(x)
    with torch.enable_grad():
        ref = student(x).detach()
    torch.testing.assert_close(after, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, after)


def test_bank_checkpoint_round_trip(tmp_path) -> None:
    model = randomize_bn(TinyResNet()).eval()
    student = convert(model, plan(model, mode="bank", bank_size=0.5, factorize_unshared=0.5, input_size=SIZE)).model
    path = save(student, tmp_path / "m.safetensors")
    again = load(path, model=TinyResNet()).eval()
    x = torch.randn(2, *SIZE)
    torch.testing.assert_close(again(x), student.eval()(x), atol=0, rtol=0)
    assert count_params(again) == count_params(student)


def test_macs_fall_with_small_banks() -> None:
    from dacnn_convert.core.report import count_macs

    model = TinyResNet()
    small = convert(model, plan(model, mode="bank", bank_size=0.25, input_size=SIZE)).model
    full = convert(model, plan(model, mode="bank", bank_size=1.0, input_size=SIZE)).model
    assert count_macs(small, SIZE) < count_macs(model, SIZE)
    assert count_macs(full, SIZE) == count_macs(model, SIZE)  # merged at inference: the original's MACs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(bank_size=0), "must be positive"),
        (dict(bank_size=-0.5), "must be positive"),
        (dict(bank_size="1:0"), "must be positive"),
        (dict(bank_size=float("nan")), "must be positive"),
        (dict(bank_size=1000), "above the 32 the group can use"),
        (dict(bank_size="1:33"), "above the 32 the group can use"),
        (dict(bank_size="9:0.5"), "section 9 has no group to give a bank"),
        (dict(bank_size="1:x"), "is not a bank size"),
        (dict(bank_size="1:0.5,1:0.25"), "given twice"),
        (dict(bank_size=0.5, factorize_unshared=0), "must be positive"),
    ],
)
def test_bad_bank_sizes_name_the_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        plan(TinyResNet(), mode="bank", input_size=SIZE, **kwargs)


def test_bank_for_a_section_without_a_group_is_refused() -> None:
    from torch import nn

    class Chain(nn.Module):  # two sections; section 2 has one conv of its configuration only
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.c = nn.Conv2d(8, 8, 3, padding=1)
            self.d = nn.Conv2d(8, 16, 3, 2, 1)

        def forward(self, x):
            return self.d(self.c(self.b(self.a(x))))

    with pytest.raises(UsageError, match="section 2 has no group to give a bank.*factori"):
        plan(Chain(), mode="bank", bank_size="1:0.5,2:0.5", input_size=SIZE)


def test_factorize_with_nothing_unshared_is_a_note_not_an_error() -> None:
    from torch import nn

    class Twins(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.b(self.a(self.stem(x)))

    p = plan(Twins(), mode="bank", bank_size=0.5, factorize_unshared=0.5, input_size=SIZE)
    assert any("nothing changed" in n for n in p.notes)


def test_parse_bank_size_forms() -> None:
    assert parse_bank_size(0.25).value(3) == 0.25
    assert parse_bank_size(64).value(1) == 64
    spec = parse_bank_size("0.5,1:1.0,4:0.125")
    assert (spec.value(1), spec.value(2), spec.value(4)) == (1.0, 0.5, 0.125)
    spec = parse_bank_size("1:1.0,2:free")
    assert (spec.value(1), spec.value(2), spec.value(3)) == (1.0, None, None)
    assert parse_bank_size({2: 0.5}).value(2) == 0.5


@pytest.mark.slow
def test_onnx_one_initialiser_per_bank_and_torchscript(tmp_path) -> None:
    from dacnn_convert import export_onnx, export_torchscript, inspect_file

    model = randomize_bn(TinyResNet()).eval()
    p = plan(model, mode="bank", bank_size=0.5, factorize_unshared=0.5, input_size=SIZE)
    student = convert(model, p).model.eval()
    result = export_onnx(student, tmp_path / "m.onnx", SIZE)
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    info = inspect_file(result.path)
    assert info.params == count_params(student)  # every bank stored once, coefficients once each
    users = {name: len(u) for name, _, u in info.shared}
    for g in p.groups:
        if len(g.members) > 1:
            assert users[f"dacnn_anchors.{g.name}"] == len(g.members)
    ts = export_torchscript(student, tmp_path / "m.torchscript.pt", SIZE)
    x = torch.randn(2, *SIZE)
    torch.testing.assert_close(torch.jit.load(str(ts))(x), student(x), atol=1e-5, rtol=1e-5)
    st = inspect_file(save(student, tmp_path / "m.safetensors"))
    assert st.params == count_params(student)


def test_torch_compile_matches_eager_for_banks() -> None:
    model = randomize_bn(TinyResNet()).eval()
    student = convert(model, plan(model, mode="bank", bank_size=0.5, input_size=SIZE)).model.eval()
    x = torch.randn(2, *SIZE)
    compiled = torch.compile(student, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), student(x), atol=1e-5, rtol=1e-5)


def test_cli_bank_mode_and_bad_values(tmp_path) -> None:
    from typer.testing import CliRunner

    from dacnn_convert.cli import app

    runner = CliRunner()
    base = ["convert", "tests.models:tiny_resnet", "--weights", "none", "--input-size", "16"]
    ok = runner.invoke(
        app,
        [
            *base,
            "--mode",
            "bank",
            "--bank-size",
            "1:0.5,2:0.25",
            "--factorize-unshared",
            "0.5",
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert "bank 4x8x3x3" in (tmp_path / "b" / "report.md").read_text()
    for flags, message in (
        (["--bank-size", "0"], "must be positive"),
        (["--bank-size", "-1"], "must be positive"),
        (["--bank-size", "1:500"], "the group can use"),
        (["--bank-size", "7:0.5"], "section 7 has no group"),
        (["--factorize-unshared", "abc"], "--factorize-unshared 'abc' is not a bank size"),
    ):
        bad = runner.invoke(app, [*base, "--mode", "bank", *flags, "--dry-run"])
        assert bad.exit_code == 2, (flags, bad.output)
        assert message in bad.output and "Traceback" not in bad.output
        assert bad.output.strip().splitlines()[-1].startswith("error:")


def test_channel_alignment_keeps_the_function_and_raises_similarity() -> None:
    from dacnn_convert.core.align import align_channels, private_chains

    model = randomize_bn(TinyResNet()).eval()
    p = plan(model, mode="bank", bank_size=0.5, input_size=SIZE)
    chains = private_chains(model)
    assert chains["layer1.0.conv2"].producer == "layer1.0.conv1" and chains["layer1.0.conv2"].bn == "layer1.0.bn1"
    assert "layer1.1.conv1" not in chains  # its input is the residual stream, shared by every block
    # a permuted copy of block 1.0's private channels in block 1.1: alignment must find it back
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.layer1[1].conv1.weight.copy_(model.layer1[0].conv1.weight[perm])
        model.layer1[1].conv2.weight.copy_(model.layer1[0].conv2.weight[:, perm])
    aligned, report = align_channels(model, p)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(aligned.eval()(x), model(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aligned.layer1[1].conv2.weight, aligned.layer1[0].conv2.weight)
    assert all(after >= before - 1e-9 for _, before, after in report.permuted)
    conv = convert(model, p, align=True)
    assert any("aligned the private channels" in n for n in conv.notes)


def test_per_member_refit_never_raises_the_output_error() -> None:
    g = torch.Generator().manual_seed(5)
    weights = [torch.randn(8, 4, 3, 3, generator=g) for _ in range(3)]
    hs = []
    for i in range(3):  # members see different input statistics
        x = torch.randn(400, 36, generator=g, dtype=torch.float64) * torch.linspace(0.1, 1 + i, 36, dtype=torch.float64)
        h = x.T @ x
        hs.append(h / h.diagonal().mean())
    plain, refit = fit_bank(weights, 5, hs), fit_bank(weights, 5, hs, refit=True)
    assert all(b <= a + 1e-9 for a, b in zip(plain.errors, refit.errors, strict=True))
    assert sum(refit.errors) < sum(plain.errors)


@pytest.mark.parametrize(("k", "stride", "pad", "dil"), [(3, 1, 1, 1), (3, 2, 1, 1), (1, 2, 0, 1), (3, 1, 2, 2)])
def test_sampled_patches_are_rows_of_the_full_unfold(k: int, stride: int, pad: int, dil: int) -> None:
    from torch import nn

    from dacnn_convert.core.fitting import _patches

    conv = nn.Conv2d(3, 4, k, stride, pad, dil)
    x = torch.randn(2, 3, 9, 9)
    full = _patches(conv, x)
    some = _patches(conv, x, rows=7, seed=1)
    assert some.shape == (7, full.shape[1])
    hits = [(row - full).abs().amax(dim=1).min().item() for row in some]  # each sampled row is one of full's
    assert max(hits) == 0.0
    torch.testing.assert_close(some, _patches(conv, x, rows=7, seed=1))  # seeded: teacher and student agree


def test_a_fraction_above_a_groups_rank_is_clamped_with_a_note() -> None:
    p = plan(TinyResNet(), mode="bank", bank_size="1:5.0,2:0.5", input_size=SIZE)  # 5 x 8 = 40 > 32 in stage 1
    assert [g.rank for g in p.groups] == [32, 8]
    assert any("clamped to the 32 filters" in n for n in p.notes)


def test_lowrank_and_bank_bench_methods_fit_the_budget() -> None:
    from dacnn_convert.baselines import Context, get_method
    from dacnn_convert.core.planning import make_plan, with_low_rank

    model = randomize_bn(TinyResNet()).eval()
    base = make_plan(model, "none", input_size=SIZE)
    assert with_low_rank(base, 0.5) == make_plan(model, "none", input_size=SIZE, factorize_unshared=0.5)
    target = count_params(model) // 2
    for name in ("lowrank", "dacnn-bank"):
        out = get_method(name).compress(model, target, Context(SIZE))
        assert out.params == count_params(out.model) <= target
        assert out.params >= 0.8 * target, (name, out.params)  # uses the budget, not a token fraction of it
    assert "rank fraction" in get_method("lowrank").compress(model, target, Context(SIZE)).notes


def test_a_bank_size_for_a_section_of_depthwise_convs_is_one_usage_error(tmp_path) -> None:
    from typer.testing import CliRunner

    from dacnn_convert.cli import app

    from .models import DepthwiseStage

    with pytest.raises(UsageError, match=r"section 1 holds only grouped or depthwise convs \(dw1, groups=8"):
        plan(DepthwiseStage(), mode="bank", bank_size="1:0.5", input_size=SIZE)
    assert len(plan(DepthwiseStage(), mode="bank", bank_size=0.5, input_size=SIZE).groups) == 1  # a default skips it
    out = tmp_path / "out"
    args = ["convert", "tests.models:depthwise_stage", "--weights", "none", "--input-size", "16"]
    result = CliRunner().invoke(app, [*args, "--mode", "bank", "--bank-size", "1:0.5", "--out", str(out)])
    assert result.exit_code == 2 and "depthwise" in result.output and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("shapes", [[(16, 8, 3, 3)] * 3, [(64, 4, 1, 1)] * 2, [(10, 40, 1, 1)], [(40, 10, 1, 1)]])
def test_one_spectrum_prices_every_bank_size_as_the_fit_does(shapes) -> None:
    from dacnn_convert.core.fitting import bank_spectrum

    torch.manual_seed(0)
    weights = [torch.randn(*s) for s in shapes]
    spectrum = bank_spectrum(weights)
    for k in (1, 2, 5, 8):
        assert spectrum.errors(k) == pytest.approx(fit_bank(weights, k).errors, abs=1e-4)
