"""Banks shared across stages (issue 26): merge_banks joins bank groups whose members read patches of one shape
when a joint bank is smaller at no larger fitted error, and everything downstream keeps working."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from dacnn_convert import convert, count_params, load, plan, save
from dacnn_convert.core.convert import kernel_of
from dacnn_convert.core.fitting import input_moments
from dacnn_convert.core.merging import merge_banks

SIZE = (3, 16, 16)


class TwoStage(nn.Module):
    """A stem, two same-shape convs at 16x16 and a stride-2 expansion reading the same 8x3x3 patches."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.a2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.b = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.stem, self.a1, self.a2, self.b):
            x = torch.relu(conv(x))
        return self.head(x.mean((2, 3)))


def _model(common: bool) -> TwoStage:
    """Every conv's filters are combinations of one set of 4 (``common``), or each conv's of its own 4."""
    torch.manual_seed(0)
    m = TwoStage().eval()
    basis = torch.randn(4, 8, 3, 3)
    with torch.no_grad():
        for c in (m.a1, m.a2, m.b):
            own = basis if common or c is not m.b else torch.randn(4, 8, 3, 3)
            c.weight.copy_(torch.einsum("ok,kchw->ochw", torch.randn(c.out_channels, 4), own))
    return m


def _kernels(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: kernel_of(m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_filters_in_one_span_share_one_bank_across_stages_exactly() -> None:
    model = _model(common=True)
    p = plan(model, mode="bank", bank_size=0.5, factorize_unshared=4, input_size=SIZE)
    assert sorted(g.members for g in p.groups) == [("a1", "a2"), ("b",)]
    merged, merges = merge_banks(p, _kernels(model))
    (g,) = merged.groups
    assert g.members == ("a1", "a2", "b") and g.rank == 4 and g.resolution is None  # 16x16 and 8x8 members
    # separately 2 x (4*72 + 16*4); jointly 4*72 + (8 + 8 + 16)*4
    assert [(m.ranks, m.rank, m.params_saved) for m in merges] == [((4, 4), 4, 2 * 352 - 416)]
    assert merged.params_after == p.params_after - 288
    student = convert(model, merged).model.eval()
    assert count_params(student) == merged.params_after
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(student(x), model(x), atol=1e-4, rtol=1e-4)


def test_filters_of_different_spans_stay_apart() -> None:
    model = _model(common=False)
    p = plan(model, mode="bank", bank_size=0.5, factorize_unshared=4, input_size=SIZE)
    merged, merges = merge_banks(p, _kernels(model))
    # jointly they need all 8 filters: 8*72 + 32*8 = 832 > 704, so no joint bank is smaller at the same error
    assert merges == () and merged.groups == p.groups


def test_data_aware_merge_fits_and_converts_with_calibration_data(tmp_path) -> None:
    model = _model(common=True)
    p = plan(model, mode="bank", bank_size=0.5, factorize_unshared=4, input_size=SIZE, init="act")
    batches = [(torch.randn(8, *SIZE), None) for _ in range(3)]
    moments = input_moments(model, ["a1", "a2", "b"], batches, len(batches))
    merged, merges = merge_banks(p, _kernels(model), {n: h for n, (h, _) in moments.items()})
    assert len(merges) == 1
    done = convert(model, merged, calib_loader=batches, calib_batches=3)
    (name,) = done.fit_errors  # fitted whitened, members of two C_outs together, as merge_banks priced it
    assert sum(e * e for e in done.fit_errors[name].values()) == pytest.approx(merges[0].error_after, abs=1e-9)
    student = done.model.eval()
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(student(x), model(x), atol=1e-3, rtol=1e-3)
    path = save(student, tmp_path / "m.safetensors")
    again = load(path, _model(common=True)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), student(x))


def test_a_merge_the_caller_refuses_is_not_made() -> None:
    model = _model(common=True)
    p = plan(model, mode="bank", bank_size=0.5, factorize_unshared=4, input_size=SIZE)
    merged, merges = merge_banks(p, _kernels(model), allowed=lambda q: False)
    assert merges == () and merged == p


def test_the_planner_merges_where_the_whole_plan_scores_better_and_says_so() -> None:
    from dacnn_convert.budget import search

    model = _model(common=True)
    target = count_params(model) // 3
    within = search(model, target, SIZE)  # no data: weight-space fits, the fit score
    found = search(model, target, SIZE, across=True)
    # within stages the budget leaves stage 1 a bank of 2 and b a rank of 3 (lossy); one joint bank of 4 serves
    # all three convs exactly in fewer parameters
    assert sorted(len(g.members) for g in within.plan.groups) == [1, 2]
    assert found.across[-1].startswith("kept: whole-plan fit"), found.across
    (g,) = found.plan.groups
    assert g.name.startswith("x0_s1_2_bank") and g.members == ("a1", "a2", "b") and g.rank == 4
    assert found.plan.params_after <= target
    assert any(line.startswith("  across stages: kept") for line in found.explain())
    assert found.to_dict()["across"] == list(found.across)
    student = convert(model, found.plan).model.eval()
    assert count_params(student) == found.plan.params_after
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(student(x), model(x), atol=1e-4, rtol=1e-4)
    # a plan whose banks share no span is left as the search found it, and says why
    apart = _model(common=False)
    kept = search(apart, count_params(apart) // 2, SIZE, across=True)
    assert kept.plan == search(apart, count_params(apart) // 2, SIZE).plan and len(kept.across) >= 1


def test_merged_names_stay_unique_when_a_merged_plan_is_merged_again() -> None:
    model = _model(common=True)
    p = plan(model, mode="bank", bank_size=0.5, factorize_unshared=4, input_size=SIZE)
    first, second = p.groups
    earlier = replace(p, groups=(replace(first, name="x0_s1_bank4x8x3x3"), second))  # as a merge had named it
    merged, merges = merge_banks(earlier, _kernels(model))
    assert [g.name for g in merged.groups] == ["x1_s1_bank4x8x3x3"] == [m.group for m in merges]


def test_share_across_needs_a_budget_search_and_no_sweep() -> None:
    from dacnn_convert import AnchorConfig
    from dacnn_convert.errors import UsageError
    from dacnn_convert.pipeline import plan_sweep

    with pytest.raises(UsageError, match="merges the banks a budget search chose"):
        AnchorConfig(mode="bank", share_across=True)
    with pytest.raises(UsageError, match="must be True or False"):
        AnchorConfig(target_ratio=2.0, share_across=1)
    with pytest.raises(UsageError, match="for the sweep"):
        plan_sweep(_model(common=True), AnchorConfig(target_ratio=2.0, share_across=True), input_size=SIZE)


def test_one_decomposition_gives_the_same_fit_at_every_size() -> None:
    from dacnn_convert.core.fitting import bank_basis, fit_bank

    torch.manual_seed(0)
    weights = [torch.randn(6, 4, 3, 3), torch.randn(10, 4, 3, 3)]  # members of two C_outs
    x = torch.randn(200, 36, dtype=torch.float64)
    moments = [x.T @ x / 200, (x + 1).T @ (x + 1) / 200]
    basis = bank_basis(weights, moments)
    for k in (1, 5, 16):
        once, again = fit_bank(weights, k, moments, basis=basis), fit_bank(weights, k, moments)
        torch.testing.assert_close(once.bank, again.bank)
        assert once.errors == again.errors


def test_reconstruction_trains_a_bank_shared_across_stages_in_its_earliest_section() -> None:
    from dacnn_convert.core.plan import Group
    from dacnn_convert.train import recalibrate_bn, reconstruct_sections
    from dacnn_convert.train.reconstruct import ReconstructConfig

    model = _model(common=False)
    p = plan(model, mode="bank", bank_size=0.5, factorize_unshared=4, input_size=SIZE)
    joint = Group("x0_s1_2_bank3x8x3x3", ("a1", "a2", "b"), (3, 8, 3, 3), None, (1, 2), "bank")  # lossy: rank 3
    merged = replace(p, groups=(joint,), sections=((16, 16), (8, 8)))  # the bank spans both stages
    batches = [(torch.randn(8, *SIZE), None) for _ in range(5)]
    student = convert(model, merged, calib_loader=batches, calib_batches=5).model
    recalibrate_bn(student, batches, 5)
    bank = student.dacnn_anchors.x0_s1_2_bank3x8x3x3
    found = reconstruct_sections(student, model, batches, ReconstructConfig(steps=3, batches=5))
    # section 1 (a1, a2) is the bank's earliest user: it trains the bank; section 2 (b) its own coefficients only
    # section 1: the bank + the stem (8x3x3x3 + 8) + a1's and a2's 8x3 coefficients; section 2: b's 16x3
    # coefficients + the head (16x10 + 10), not the bank
    assert found.trained == [bank.numel() + 224 + 2 * 24, 48 + 170]
