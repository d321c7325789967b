"""Budget-targeted planning: never over budget, exact arithmetic, meaningful sensitivities."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dacnn_convert import convert, plan
from dacnn_convert.budget import calibration_reference, compose, pick, resolve_target, score_sections, search
from dacnn_convert.cli import app
from dacnn_convert.core.plan import count_params
from dacnn_convert.core.planning import make_plan
from dacnn_convert.errors import PlanError, UsageError
from dacnn_convert.train import make_loaders

from .models import TinyResNet, randomize_bn

SIZE = (3, 16, 16)


@pytest.fixture(scope="module")
def searched():
    torch.manual_seed(0)
    model = randomize_bn(TinyResNet()).eval()
    mix = make_plan(model, "mix", "all", input_size=SIZE)
    plain = make_plan(model, "plain", "all", input_size=SIZE)
    return model, mix, plain, score_sections(model, mix, plain, "fit")


@settings(max_examples=60, deadline=None)
@given(fraction=st.floats(0.0, 1.2))
def test_budget_is_never_exceeded(searched, fraction: float) -> None:
    model, mix, plain, scores = searched
    target = int(fraction * count_params(model))
    try:
        result = pick(mix, plain, scores, target)
    except PlanError as exc:
        assert "smallest possible is 3,058" in str(exc) and target < 3058
        return
    assert result.plan.params_after <= target
    assert result.feasible >= 1 and result.candidates == 9  # 3 options ^ 2 sections


@pytest.mark.parametrize("choice", [("free", "mix"), ("mix", "plain"), ("plain", "plain"), ("mix", "mix")])
@pytest.mark.parametrize("regs", [(), (2,), (1, 2)])
def test_plan_arithmetic_equals_the_built_model(searched, choice, regs) -> None:
    model, mix, plain, _ = searched
    p = compose(mix, plain, choice, regs)
    student = convert(model, p).model
    assert count_params(student) == p.params_after
    assert student(torch.randn(2, *SIZE)).shape == (2, 10)


def test_identical_members_have_zero_sensitivity() -> None:
    model = TinyResNet().eval()
    with torch.no_grad():  # the three 16x16 convs of section 2 become one kernel
        for name in ("layer2.0.conv2", "layer2.1.conv1", "layer2.1.conv2"):
            model.get_submodule(name).weight.copy_(model.layer2[0].conv2.weight)
    mix = make_plan(model, "mix", "all", input_size=SIZE)
    plain = make_plan(model, "plain", "all", input_size=SIZE)
    by = {(s.section, s.option): s.sensitivity for s in score_sections(model, mix, plain, "fit")}
    assert by[2, "mix"] == pytest.approx(0.0, abs=1e-10)
    assert by[1, "mix"] > 0 and by[2, "plain"] > by[2, "mix"]  # section 1's kernels still differ


def test_search_is_deterministic_and_uses_the_budget_for_regulators(searched) -> None:
    model, *_ = searched
    a = search(model, 7_500, SIZE, space="anchor")
    b = search(model, 7_500, SIZE, space="anchor")
    assert a.plan == b.plan and a.choice == b.choice == ("free", "mix", "free")  # section 3: the classifier
    assert a.regulator_sections == (2,) and a.plan.params_after <= 7_500


def test_kl_sensitivity_with_data(searched) -> None:
    model, *_ = searched
    loaders = make_loaders("synthetic", batch_size=32, input_size=16)
    result = search(model, 8_000, SIZE, calib_loader=loaders.train, calib_batches=2, rescore_rounds=0)
    assert result.metric == "kl" and result.plan.init == "act" and result.plan.params_after <= 8_000
    assert all(s.sensitivity >= 0 for s in result.scores)
    assert result.advice() is None and "Spearman" in search(model, 8_000, SIZE).advice()
    batches, reference = calibration_reference(model.train(), loaders.train, 2)
    assert model.training and len(batches) == len(reference) == 2  # the caller's mode is restored
    assert torch.allclose(reference[0].exp().sum(1), torch.ones(len(batches[0])))
    assert all(s.sensitivity > 0 for s in result.scores if s.option != "free")  # random kernels differ


def test_public_plan_takes_targets() -> None:
    model = TinyResNet()
    assert plan(model, input_size=SIZE, target_ratio=2).params_after <= count_params(model) / 2
    assert plan(model, input_size=SIZE, target_bytes=30_000).params_after <= 7_500
    with pytest.raises(UsageError, match="exactly one"):
        resolve_target(100, target_params=10, target_ratio=2)
    with pytest.raises(UsageError, match="needs calibration data"):
        search(model, 8_000, SIZE, metric="kl")


def test_explain_lists_every_group_and_section() -> None:
    result = CliRunner().invoke(
        app,
        [
            "plan",
            "tests.models:tiny_resnet",
            "--weights",
            "none",
            "--input-size",
            "16",
            "--target-params",
            "5K",
            "--explain",
        ],
    )
    assert result.exit_code == 0, result.output
    p = search(TinyResNet(), 5_000, SIZE).plan
    for g in p.groups:
        assert g.name in result.output
    assert "section 1:" in result.output and "section 2:" in result.output and "candidate" in result.output
    quiet = CliRunner().invoke(
        app, ["plan", "tests.models:tiny_resnet", "--weights", "none", "--input-size", "16", "--target-params", "5K"]
    )
    assert quiet.exit_code == 0 and "candidate" not in quiet.output and p.groups[0].name in quiet.output
    assert "note: scored by fit" in quiet.output and "--dataset" in quiet.output  # no data: say how to do better
    bad = CliRunner().invoke(app, ["plan", "tests.models:tiny_resnet", "--weights", "none", "--target-params", "six"])
    assert bad.exit_code == 2 and "6M" in bad.output


def test_budget_planner_is_a_bench_method() -> None:
    from dacnn_convert.baselines import Context, get_method

    method = get_method("dacnn-budget")
    assert not method.fixed_size
    out = method.compress(TinyResNet().eval(), 7_000, Context(SIZE))
    assert out.params <= 7_000 and out.params == count_params(out.model)
    assert "sections free/mix" in out.notes


@settings(max_examples=25, deadline=None)
@given(fraction=st.floats(0.2, 0.95))
def test_bank_search_fills_at_least_97_percent_and_never_exceeds(searched, fraction: float) -> None:
    model, mix, plain, _ = searched
    from dacnn_convert.budget import BANK_OPTIONS, RANK_OPTIONS

    scores = _bank_scores(model, mix, plain, BANK_OPTIONS, RANK_OPTIONS)
    target = int(fraction * count_params(model))
    result = pick(mix, plain, scores, target)
    assert 0.97 * target <= result.plan.params_after <= target
    assert count_params(convert(model, result.plan).model) == result.plan.params_after  # arithmetic = built model


_SCORES: dict = {}


def _bank_scores(model, mix, plain, options, ranks):
    if "s" not in _SCORES:  # scored once: the search itself is what hypothesis varies
        _SCORES["s"] = score_sections(model, mix, plain, "fit", options=options, ranks=ranks)
    return _SCORES["s"]


def test_bank_search_explains_each_bank_size(searched) -> None:
    model, *_ = searched
    result = search(model, 6_000, SIZE)
    lines = "\n".join(result.explain())
    assert "bank:0.5" in lines and "bank:0.0625" in lines  # every size on the grid, scored, per section
    assert any(g.kind == "bank" for g in result.plan.groups)
    assert result.plan.params_after <= 6_000


def test_refine_rescales_a_section_that_costs_more_in_company(searched) -> None:
    """A whole-plan score that is not the sum of the parts: section 2 costs 40x its score alone when another
    section is converted too. The additive search cannot see it; refine must, and never does worse."""
    from dacnn_convert import budget

    model, mix, plain, _ = searched
    scores = score_sections(model, mix, plain, "fit", options=budget.BANK_OPTIONS)
    by = {(s.section, s.option): s.sensitivity for s in scores}

    class Compounding(budget.Scorer):
        def __call__(self, mix, plain, picks):
            parts = {k: by.get((k, q.share), 0.0) + by.get((k, q.rank), 0.0) for k, q in enumerate(picks, 1)}
            converted = [k for k, v in parts.items() if v > 0]
            self.seen[picks] = sum(parts[k] * (40.0 if k == 2 and len(converted) > 1 else 1.0) for k in converted)
            return self.seen[picks]

    target = count_params(model) * 6 // 10
    found = pick(mix, plain, scores, target, "kl")
    scorer = Compounding(model, [], [])
    refined = budget.refine(model, mix, plain, found, scorer, rounds=2)
    additive = scorer(mix, plain, budget._picks(found))
    assert found.choice[1] != "free"  # the additive search converts section 2 ...
    assert refined.plan.params_after <= target
    assert refined.sensitivity < additive  # ... and the whole-plan score finds a better plan
    assert refined.rescored[0][1] == refined.sensitivity  # best first, and it is the one returned
    assert tuple(q.label for q in budget._picks(found)) in [c for c, _ in refined.rescored]
    assert [v for _, v in refined.rescored] == sorted(v for _, v in refined.rescored)
    assert refined.scores == found.scores  # the explanation keeps the scores measured alone


def test_search_rescore_rounds_zero_is_the_additive_plan(searched) -> None:
    model, *_ = searched
    loaders = make_loaders("synthetic", batch_size=32, input_size=16)
    additive = search(model, 8_000, SIZE, calib_loader=loaders.train, calib_batches=2, rescore_rounds=0)
    refined = search(model, 8_000, SIZE, calib_loader=loaders.train, calib_batches=2, rescore_rounds=1)
    assert additive.rescored == () and refined.rescored
    assert refined.plan.params_after <= 8_000
    kl_of = dict(refined.rescored)
    # the additive plan was scored whole
    assert additive.choice in {tuple(c.split("+")[0] for c in choice) for choice in kl_of}
    assert refined.sensitivity == min(kl_of.values())
    assert any("re-scored whole" in line for line in refined.explain())
    assert refined.to_dict()["rescored"][0]["kl"] == refined.sensitivity


def test_smaller_banks_and_ranks_never_score_below_larger_ones() -> None:
    from dacnn_convert.budget import SectionScore, monotone

    measured = [
        SectionScore(1, "free", 0.0, 0),
        SectionScore(1, "bank:0.5", 0.2, 10),
        SectionScore(1, "bank:0.25", 0.1, 20),  # lucky: below the larger bank
        SectionScore(1, "bank:0.125", 0.3, 30),
        SectionScore(1, "lr:0.5", 0.05, 5),
        SectionScore(1, "lr:0.25", 0.01, 8),
        SectionScore(2, "bank:0.25", 0.05, 20),  # another section: its own chain
        SectionScore(1, "mix", 0.01, 15),  # not a bank: untouched
    ]
    got = {(s.section, s.option): s.sensitivity for s in monotone(measured)}
    assert got[1, "bank:0.25"] == 0.2 and got[1, "bank:0.125"] == 0.3 and got[1, "bank:0.5"] == 0.2
    assert got[1, "lr:0.25"] == 0.05 and got[2, "bank:0.25"] == 0.05 and got[1, "mix"] == 0.01
    assert [s.params_saved for s in monotone(measured)] == [s.params_saved for s in measured]


def test_each_share_group_of_a_section_can_take_its_own_bank_size() -> None:
    from dacnn_convert import budget

    from .models import TwoGroups

    torch.manual_seed(0)
    model = randomize_bn(TwoGroups()).eval()
    mix = budget.every_resolution(make_plan(model, "mix", "all", input_size=SIZE))
    plain = make_plan(model, "plain", "all", input_size=SIZE)
    indices = [index for index, _ in budget.share_groups(mix, 1)]
    assert len(indices) == 2  # the 3x3 group and the 1x1 group
    scores = score_sections(model, mix, plain, "fit", options=budget.BANK_OPTIONS, ranks=budget.RANK_OPTIONS)
    per_group = [s for s in scores if s.option.startswith("bank@")]
    assert {s.option.partition(":")[0] for s in per_group} == {f"bank@{i}" for i in indices}
    combos = budget._group_combinations(scores)
    assert combos and all(c.option.startswith("banks:") for c in combos)
    assert len(combos) <= budget.GROUP_COMBINATIONS
    for c in combos:  # each combination's arithmetic is its groups' and composes exactly
        p = compose(mix, plain, [c.option, *(["free"] * (len(mix.sections) - 1))])
        assert p.saved_params - p.scale_params == c.params_saved and p.macs_saved == c.macs_saved
        assert count_params(convert(model, p).model) == p.params_after
    # a combination the uniform options cannot express: one group at a large bank, the other at a small one
    mixed = [c for c in combos if len(set(budget._per_group(c.option).values())) > 1]
    assert mixed
    found = search(model, count_params(model) // 2, SIZE)
    assert found.plan.params_after <= count_params(model) // 2
    explained = [line for line in found.explain() if " alone, bank size: " in line]
    assert len(explained) == 2 and all("chosen:" in line for line in explained)
    assert budget._per_group("banks:0=0.25,l1=0.5") == {"0": 0.25, "l1": 0.5}
    assert budget._per_group("bank@3:0.125") == {"3": 0.125}


def test_refine_rescales_a_share_group_that_costs_more_in_company() -> None:
    """Two share groups in one section: the 1x1 group costs 40x its score alone in the company of any other
    converted layer. Refine leaves each banked group free in turn, rescales that group's own bank sizes, and
    finds a plan that spares it; the whole-plan score never gets worse."""
    from dacnn_convert import budget

    from .models import TwoGroups

    torch.manual_seed(0)
    model = randomize_bn(TwoGroups()).eval()
    mix = budget.every_resolution(make_plan(model, "mix", "all", input_size=SIZE))
    plain = make_plan(model, "plain", "all", input_size=SIZE)
    scores = score_sections(model, mix, plain, "fit", options=budget.BANK_OPTIONS, ranks=budget.RANK_OPTIONS)
    by = {(s.section, s.option): s.sensitivity for s in scores}
    costly = next(i for i, members in budget.share_groups(mix, 1) if members[0].weight_shape[2] == 1)

    def parts(picks):
        for k, q in enumerate(picks, start=1):
            sizes = budget._group_sizes(mix, k, q.share)
            yield from ((i, by.get((k, f"bank@{i}:{f}"), 0.0)) for i, f in sizes.items())
            if not sizes:
                yield None, by.get((k, q.share), 0.0)
            yield None, by.get((k, q.rank), 0.0)

    class Compounding(budget.Scorer):
        def __call__(self, mix, plain, picks):
            converted = [(i, v) for i, v in parts(picks) if v > 0]
            self.seen[picks] = sum(v * (40.0 if i == costly and len(converted) > 1 else 1.0) for i, v in converted)
            return self.seen[picks]

    target = count_params(model) * 4 // 10
    found = pick(mix, plain, scores, target, "kl")
    assert costly in budget._group_sizes(mix, 1, found.choice[0])  # the additive search banks the 1x1 group
    scorer = Compounding(model, [], [])
    refined = budget.refine(model, mix, plain, found, scorer, rounds=3)
    assert refined.plan.params_after <= target
    assert refined.sensitivity < scorer(mix, plain, budget._picks(found))
    before = budget._group_sizes(mix, 1, found.choice[0])[costly]
    after = budget._group_sizes(mix, 1, refined.choice[0]).get(costly, 1.0)
    assert after > before  # the group that compounds keeps more filters (or stays free)
    assert budget._without({"0": 0.25, "1": 0.5}, "0") == "banks:1=0.5" and budget._without({"1": 0.5}, "1") == "free"
