"""nn.Linear layers are first-class (issue 22): low-rank heads, banks shared by same-shape MLP Linears,
exact arithmetic, one key per basis, files, exports and the planner on a VGG-style classifier."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dacnn_convert import convert, count_params, export_onnx, inspect_file, load, plan, save
from dacnn_convert.budget import search
from dacnn_convert.core.layers import AnchoredLinear
from dacnn_convert.core.report import count_macs
from dacnn_convert.errors import PlanError
from dacnn_convert.io.dense import export_dense
from dacnn_convert.train.data import make_loaders

from .models import TinyMixer, VGGHead

SIZE = (3, 16, 16)


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn(n, *SIZE, generator=torch.Generator().manual_seed(1))


def test_same_shape_linears_of_a_stage_share_one_bank_and_full_rank_is_exact() -> None:
    torch.manual_seed(0)
    model = TinyMixer().eval()
    # fc1 (16x8) pairs: rank <= 8 = C_in; fc2 (8x16) pairs: rank <= 16 = 2 x C_out
    p = plan(model, mode="bank", bank_size=2.0, input_size=SIZE)  # fractions of C_out, clamped per group
    linear = {g.members: g.shape for g in p.groups}
    assert linear[("stage1.0.fc1", "stage1.1.fc1")] == (8, 8, 1, 1)  # 2.0 x 16 clamped to the 8 the pair can use
    assert linear[("stage1.0.fc2", "stage1.1.fc2")] == (16, 16, 1, 1)  # 2.0 x 8 = 16 = C_in
    assert linear[("stage2.0.fc2", "stage2.1.fc2")] == (32, 32, 1, 1)
    student = convert(model, p).model.eval()
    assert isinstance(student.stage1[0].fc1, AnchoredLinear)
    with torch.no_grad():
        torch.testing.assert_close(student(_x()), model(_x()), atol=1e-4, rtol=1e-4)  # full rank reproduces


def test_plan_arithmetic_is_the_built_model_and_each_basis_is_one_key() -> None:
    torch.manual_seed(0)
    model = TinyMixer().eval()
    p = plan(model, mode="bank", bank_size=0.5, factorize_unshared=0.5, input_size=SIZE)
    student = convert(model, p).model
    # stage 2's fc2 pair (16x32 each): k = 8, 8*32 + 2*16*8 = 512 instead of 2*512
    assert p.group_params(next(g for g in p.groups if g.members[0] == "stage2.0.fc2")) == 512
    assert count_params(student) == p.params_after < count_params(model)
    keys = set(student.state_dict())
    before = set(model.state_dict())
    members = {m for g in p.groups for m in g.members}
    assert keys - before == {f"dacnn_anchors.{g.name}" for g in p.groups} | {f"{m}.coeff.weight" for m in members}
    assert before - keys == {f"{m}.weight" for m in members}  # biases stay where they were


def test_a_low_rank_head_cuts_params_and_macs_and_exports_to_stock_linears(tmp_path) -> None:
    torch.manual_seed(0)
    model = VGGHead().eval()
    p = plan(model, mode="none", factorize_unshared=8, input_size=SIZE)
    heads = {g.members[0]: g.rank for g in p.groups if p.site(g.members[0]).layer == "linear"}
    assert heads == {"classifier.0": 8, "classifier.2": 8}  # classifier.4 produces the logits: it stays dense
    assert any("classifier.4 stays dense: it produces the model's outputs" in n for n in p.notes)
    student = convert(model, p).model.eval()
    assert count_params(student) == p.params_after
    # classifier.0: 64x128 -> 8*(128 + 64): MACs fall by the same 8192 - 1536 (the merged path is dearer)
    assert count_macs(model, SIZE) - count_macs(student, SIZE) >= 8192 - 1536
    export = export_dense(student, tmp_path / "dense.safetensors", VGGHead(), SIZE)
    assert export.max_abs_diff is not None and export.max_abs_diff < 1e-5


def test_linear_banks_round_trip_through_files_and_int8(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyMixer().eval()
    student = convert(model, plan(model, mode="bank", bank_size=0.5, factorize_unshared=4, input_size=SIZE)).model
    student.eval()
    x = _x()
    with torch.no_grad():
        ref = student(x)
        back = load(save(student, tmp_path / "m.safetensors"), model=TinyMixer()).eval()
        torch.testing.assert_close(back(x), ref)
        low = load(save(student, tmp_path / "q.safetensors", dtype="int8"), model=TinyMixer()).eval()
        assert (low(x) - ref).abs().max() < 0.1 * ref.abs().max()
    info = inspect_file(tmp_path / "m.safetensors")
    assert info.params == count_params(student)
    assert {name: len(users) for name, _, users in info.shared}["dacnn_anchors.g0_s1_bank8x8x1x1"] == 2


def test_onnx_stores_each_linear_basis_once(tmp_path) -> None:
    torch.manual_seed(0)
    model = TinyMixer().eval()
    student = convert(model, plan(model, mode="bank", bank_size=0.5, input_size=SIZE)).model.eval()
    result = export_onnx(student, tmp_path / "m.onnx", SIZE)
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    info = inspect_file(result.path)
    assert info.params == count_params(student)  # the initialisers hold each basis once
    assert {name: len(users) for name, _, users in info.shared} == {
        f"dacnn_anchors.{g.name}": 2 for g in student.dacnn_plan.groups
    }


def test_data_aware_fit_of_a_linear_bank_beats_the_weight_fit_on_its_data() -> None:
    torch.manual_seed(0)
    model = TinyMixer().eval()
    with torch.no_grad():  # inputs with one dominant direction: whitening should follow it
        for blk in (*model.stage1, *model.stage2):
            blk.norm.weight.mul_(torch.linspace(0.1, 3.0, blk.norm.weight.numel()))
    batches = [(torch.randn(8, *SIZE), None) for _ in range(3)]
    p = plan(model, mode="bank", bank_size="1:3,2:4", input_size=SIZE)
    weight_fit = convert(model, p, init="fit").model.eval()
    act_fit = convert(model, p, init="act", calib_loader=batches, calib_batches=3).model.eval()
    with torch.no_grad():
        ref = torch.cat([model(x) for x, _ in batches])
        err_w = (torch.cat([weight_fit(x) for x, _ in batches]) - ref).pow(2).mean()
        err_a = (torch.cat([act_fit(x) for x, _ in batches]) - ref).pow(2).mean()
    assert err_a < err_w


def test_a_linear_bank_under_bf16_autocast_then_fp32() -> None:
    torch.manual_seed(0)
    model = TinyMixer().eval()
    student = convert(model, plan(model, mode="bank", bank_size=1.0, input_size=SIZE)).model.eval()
    assert any(isinstance(m, AnchoredLinear) and m.merged_is_cheaper for m in student.modules())
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            student(_x())
        assert student(_x()).dtype == torch.float32


def test_the_planner_reaches_a_quarter_of_a_vgg_style_net_by_factorising_its_head() -> None:
    torch.manual_seed(0)
    model = VGGHead().eval()
    total = count_params(model)
    result = search(model, total // 4, SIZE)
    assert result.plan.params_after <= total // 4
    assert any(result.plan.site(g.members[0]).layer == "linear" for g in result.plan.groups)
    assert count_params(convert(model, result.plan).model) == result.plan.params_after
    with pytest.raises(PlanError, match=r"smallest possible is [\d,]+ .*BatchNorm"):
        search(model, 100, SIZE)


def test_a_model_with_only_linears_says_what_can_be_done() -> None:
    mlp = nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    with pytest.raises(PlanError, match="no nn.Conv2d.*3 nn.Linear layer.*factorize.unshared"):
        plan(mlp, input_size=SIZE)
    p = plan(mlp, mode="none", factorize_unshared=4, input_size=SIZE)
    # the first is fed by the image and the last produces the outputs: both stay dense
    assert [g.members for g in p.groups] == [("3",)]


def test_the_output_layer_is_known_and_ranked_on_its_own() -> None:
    """The logits layer's rank bounds the logits' (a 10-class head at rank 2 tells at most 3 classes apart):
    a section's rank option for its unshared layers never carries it along; it has options of its own
    (``out:f``), scored alone, which the search may take (a 1000-class head) and pays for like any other."""
    from dacnn_convert import budget
    from dacnn_convert.core.graph import ConvSite, analyze

    torch.manual_seed(0)
    model = VGGHead().eval()
    sites = analyze(model, SIZE)
    assert [s.name for s in sites if s.feeds_output] == ["classifier.4"]
    head = next(s for s in sites if s.feeds_output)
    assert ConvSite.from_dict(head.to_dict()) == head
    assert "feeds_output" not in sites[0].to_dict()  # files of layers that are not heads read as before
    mix = budget.every_resolution(plan(model, mode="mix", regulators="all", input_size=SIZE))
    assert "classifier.4" not in {s.name for s in budget.unshared_sites(mix)}
    assert [s.name for s in budget.output_sites(mix)] == ["classifier.4"]
    k = next(i for i, r in enumerate(mix.sections, start=1) if tuple(r) == head.out_size)
    n = len(mix.sections)

    def factorised(rank: str) -> set[str]:
        ranks = [rank if j == k else "dense" for j in range(1, n + 1)]
        return {m for g in budget.compose(mix, mix, ["free"] * n, ranks=ranks).groups for m in g.members}

    assert "classifier.4" not in factorised("lr:0.5") and "classifier.0" in factorised("lr:0.5")
    assert factorised("out:0.5") == {"classifier.4"}
    assert factorised("lr:0.5|out:0.5") == factorised("lr:0.5") | {"classifier.4"}
    # without data the weight-space fit prices a layer by its share of the parameters, and a head always looks
    # cheap by that: the output layer's own ranks are offered only to the kl score, which measures the logits
    result = search(model, count_params(model) // 8, SIZE)
    assert not any(s.option.startswith("out:") for s in result.scores)
    assert "classifier.4" not in {m for g in result.plan.groups for m in g.members}
    loaders = make_loaders("synthetic", batch_size=8, input_size=16)
    result = search(
        model, count_params(model) // 4, SIZE, calib_loader=loaders.train, calib_batches=1, rescore_rounds=0
    )
    options = {s.option for s in result.scores if s.section == k}
    assert {"lr:0.5", "out:0.5"} <= options
    assert result.plan.params_after <= count_params(model) // 4
    assert count_params(convert(model, result.plan, init="fit").model) == result.plan.params_after


class _TwoHeads(nn.Module):
    """Two same-shape 100-class heads summed (DeiT-distilled style) over a small conv trunk."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, padding=1)
        self.head = nn.Linear(64, 100)
        self.head_dist = nn.Linear(64, 100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean((2, 3))
        return self.head(h) + self.head_dist(h)


class _FunctionalHead(nn.Module):
    """The logits come from a functional linear (a cosine classifier's form): fc is a hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 16)
        self.weight = nn.Parameter(torch.randn(10, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.fc(self.conv(x).mean((2, 3))), self.weight)


def test_only_the_layers_that_produce_the_outputs_are_output_layers() -> None:
    from dacnn_convert import budget
    from dacnn_convert.core.graph import analyze

    class Sub(nn.Linear):  # changes the function: not a plain Linear (core.kinds), still a weighted layer
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    subclass = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(16), nn.ReLU(), Sub(16, 10))
    subclass(torch.zeros(1, *SIZE))
    assert not any(s.feeds_output for s in analyze(_FunctionalHead(), SIZE))  # fc feeds a weighted op
    assert not any(s.feeds_output for s in analyze(subclass, SIZE))  # a Linear subclass is a layer too
    two = analyze(_TwoHeads(), SIZE)
    assert [s.name for s in two if s.feeds_output] == ["head", "head_dist"]
    # same-shape heads are not banked together (a shared bank would bound both logits); each ranks on its own
    mix = budget.every_resolution(plan(_TwoHeads(), mode="mix", regulators="all", input_size=SIZE))
    assert all(
        not any(s.feeds_output for s in m)
        for k in range(1, len(mix.sections) + 1)
        for _, m in budget.share_groups(mix, k)
    )
    assert [s.name for s in budget.output_sites(mix)] == ["head", "head_dist"]
    hand = plan(_TwoHeads(), mode="bank", bank_size=0.25, input_size=SIZE)  # hand-written banks: the same rule
    assert not any(m.startswith("head") for g in hand.groups for m in g.members)


def test_without_data_the_floor_names_the_output_layer() -> None:
    torch.manual_seed(0)
    model = VGGHead(num_classes=1000).eval()
    with pytest.raises(
        PlanError, match=r"output layer\(s\), factorised only when scored on calibration data [^;]*64,000"
    ):
        search(model, count_params(model) // 10, SIZE)


def test_a_plan_with_the_unshared_and_the_output_ranks_together_is_exact_in_params_and_macs() -> None:
    """A 200-class head worth factorising: the search combines the section's rank and the head's own
    (``lr:f|out:g``), and the composed model has exactly the params and MACs the search costed."""
    from dacnn_convert import budget

    torch.manual_seed(0)
    model = VGGHead(num_classes=200).eval()
    mix = budget.every_resolution(plan(model, mode="mix", regulators="all", input_size=SIZE))
    ranks = (*budget.RANK_OPTIONS, *budget.HEAD_OPTIONS)
    scores = budget.score_sections(model, mix, mix, "fit", options=budget.BANK_OPTIONS, ranks=ranks)
    macs_before = count_macs(model, SIZE)
    both = 0
    for ratio in (3, 5, 8):
        found = budget.pick(mix, mix, scores, count_params(model) // ratio, "kl", (), macs_before * 2 // 3, macs_before)
        both += any("|" in r for r in found.ranks)
        student = convert(model, found.plan, init="fit").model
        assert count_params(student) == found.plan.params_after <= count_params(model) // ratio
        assert count_macs(student, SIZE) == macs_before - found.plan.macs_saved <= macs_before * 2 // 3
    assert both  # at least one plan took both ranks in the head's section
