"""The planner's prefix cache: a candidate run from its first changed layer scores exactly as run whole."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from dacnn_convert import budget
from dacnn_convert.core.convert import convert
from dacnn_convert.core.fitting import BasisCache, fit_bank
from dacnn_convert.core.partial import PrefixCache
from tests.models import TinyResNet, randomize_bn, tiny_vgg, untraceable

OPTIONS = ("mix", "plain", "bank:0.5", "bank:0.125")  # each kind of option once or twice: the grid is slow here
RANKS = ("lr:0.25", "out:0.5")


def _space(model: nn.Module, side: int = 16) -> tuple[budget._Space, budget.Scorer]:
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, side, side) for _ in range(2)]
    loader = [(x, None) for x in batches]
    space = budget._Space.build(model, (3, side, side), loader, "kl", "adapter", None, (), "bank", None)
    return space, space.scorer(model, loader, 2)


class InPlace(nn.Module):
    """torchvision's own blocks: ReLU(inplace=True) and ``out += identity``, a 1x1 downsample."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2, down), BasicBlock(16, 16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


class Halve(nn.Module):
    """Halves its input in train mode only: code fx fixes at trace time, as stochastic depth and F.dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5 if self.training else x


class ModeBranches(TinyResNet):
    def __init__(self) -> None:
        super().__init__()
        self.halve = Halve()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.halve(self.relu(self.bn1(self.conv1(x))))
        x = self.halve(self.layer2(self.halve(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.mark.parametrize(
    "factory", [TinyResNet, tiny_vgg, InPlace, ModeBranches], ids=["resnet", "vgg", "inplace", "mode-branches"]
)
def test_every_option_scores_as_the_whole_model(factory):
    """Banks, mix + regulators, low-rank, head ranks, in every section: the same kl with and without the cache."""
    model = randomize_bn(factory()).eval()
    space, scorer = _space(model)
    assert scorer.prefix is not None

    def scores(prefix: PrefixCache | None, bases: BasisCache | None) -> dict[tuple[int, str], float]:
        again = replace(scorer, prefix=prefix, bases=bases)
        found = budget.score_sections(model, space.mix, space.plain, "kl", again, OPTIONS, RANKS)
        return {(s.section, s.option): s.sensitivity for s in found}

    cached, whole = scores(scorer.prefix, scorer.bases), scores(None, None)
    assert cached.keys() == whole.keys()
    assert len([v for v in whole.values() if v > 0]) >= 6
    for key, v in whole.items():
        assert cached[key] == pytest.approx(v, rel=1e-4, abs=1e-7), key
    # each section's frontier is filled once per pass over the options, not once per candidate; each group's
    # whitened decomposition is made once for all its bank sizes
    assert 0 < scorer.prefix.runs < len(whole)  # a run: one mode, every batch
    assert scorer.bases is not None and scorer.bases.hits > 0


def _last_stage(space: budget._Space) -> budget.Plan:
    k = space.mix.sections.index(space.mix.site("layer2.1.conv2").out_size) + 1
    n = len(space.mix.sections)
    return budget.compose(space.mix, space.plain, ["mix" if j == k else "free" for j in range(1, n + 1)])


def test_only_the_changed_part_runs():
    """A candidate that changes the last stage never runs the stem: the cached activations feed it."""
    model = randomize_bn(TinyResNet()).eval()
    space, scorer = _space(model)
    assert scorer.prefix is not None
    p = _last_stage(space)
    assert p.groups

    def stem_runs(prefix: PrefixCache | None) -> tuple[int, float]:
        calls: list[int] = []
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, i, o: calls.append(1) if type(m) is nn.Conv2d and m.in_channels == 3 else None
        )
        try:
            kl = replace(scorer, prefix=prefix).kl(p)
            return len(calls), kl
        finally:
            handle.remove()

    scorer.kl(p)  # fills the cache for this frontier
    (cached_runs, cached), (whole_runs, whole) = stem_runs(scorer.prefix), stem_runs(None)
    assert cached_runs == 0 and whole_runs == 4  # 2 batches, recalibrated then measured
    assert cached == pytest.approx(whole, rel=1e-5)


def test_a_frontier_above_the_memory_bound_runs_whole():
    model = randomize_bn(TinyResNet()).eval()
    space, scorer = _space(model)
    p = _last_stage(space)
    bounded = budget.prefix_cache(model, scorer.batches)
    assert bounded is not None
    bounded.max_bytes = 1000  # less than one batch's activations
    assert replace(scorer, prefix=bounded).kl(p) == pytest.approx(replace(scorer, prefix=None).kl(p), rel=1e-5)
    assert bounded.too_big and not bounded.values
    # released: activations made again on demand, the same score
    scorer.kl(p)
    assert scorer.prefix is not None and scorer.prefix.values
    first = scorer.kl(p)
    scorer.release()
    assert not scorer.prefix.values
    assert scorer.kl(p) == pytest.approx(first, rel=1e-6)


def test_other_inputs_run_the_whole_student():
    model = randomize_bn(TinyResNet()).eval()
    space, scorer = _space(model)
    assert scorer.prefix is not None
    p = _last_stage(space)
    student = convert(model, p, init="fit").model.eval()
    partial = scorer.prefix.partial(student)
    assert partial is not student
    x = torch.randn(3, 3, 16, 16)  # not a cached batch
    torch.testing.assert_close(partial(x), student(x))
    # an unchanged copy: nothing to skip, the student itself
    same = copy.deepcopy(model)
    assert scorer.prefix.partial(same) is same


def test_untraceable_models_score_whole():
    model = untraceable().eval()
    batches = [torch.randn(2, 3, 16, 16)]
    assert budget.prefix_cache(model, batches) is None
    assert budget.prefix_cache(model, []) is None


def test_in_place_ops_of_the_changed_part_leave_the_cache_alone():
    """Only a downsample changed: ``out += identity`` then adds into the unchanged branch's cached output."""
    model = randomize_bn(InPlace()).eval()
    space, scorer = _space(model)
    assert scorer.prefix is not None
    k = space.mix.sections.index(space.mix.site("layer2.0.downsample.0").out_size) + 1
    n = len(space.mix.sections)
    ranked = budget.compose(
        space.mix, space.plain, ["free"] * n, ranks=["lr:0.25" if j == k else "dense" for j in range(1, n + 1)]
    )
    p = replace(ranked, groups=tuple(g for g in ranked.groups if g.members == ("layer2.0.downsample.0",)))
    assert len(p.groups) == 1
    whole = replace(scorer, prefix=None).kl(p)
    assert [scorer.kl(p) for _ in range(3)] == pytest.approx([whole] * 3, rel=1e-5)


def test_the_basis_cache_refits_when_a_weight_changes_in_place():
    weights = [torch.randn(8, 4, 3, 3), torch.randn(8, 4, 3, 3)]
    cache = BasisCache()
    first = cache.get(("a", "b"), weights, weights, None)
    assert cache.get(("a", "b"), weights, weights, None) is first and cache.hits == 1
    with torch.no_grad():
        weights[0].mul_(2)  # the same storage, a new version: the old basis no longer describes it
    again = cache.get(("a", "b"), weights, weights, None)
    assert again is not first and not torch.equal(again.m, first.m)
    cached = fit_bank(weights, 4, basis=again, errors=False)
    fresh = fit_bank(weights, 4)
    torch.testing.assert_close(cached.bank, fresh.bank)
    assert cached.errors == [] and len(fresh.errors) == 2


def test_kl_scores_without_a_scorer_are_refused_in_one_line():
    model = TinyResNet().eval()
    space, _ = _space(model)
    with pytest.raises(budget.UsageError, match=r"pass scorer=Scorer\(model, batches, reference\)"):
        budget.score_sections(model, space.mix, space.plain, "kl", None, ("mix",))
