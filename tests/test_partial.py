"""The planner's prefix cache: a candidate run from its first changed layer scores exactly as run whole."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from dacnn_convert import budget
from dacnn_convert.core.fitting import BasisCache
from dacnn_convert.core.partial import PrefixCache
from tests.models import TinyResNet, randomize_bn, tiny_vgg

OPTIONS = ("mix", "plain", "bank:0.5", "bank:0.125")  # each kind of option once or twice: the grid is slow here
RANKS = ("lr:0.25", "out:0.5")


def _space(model: nn.Module, side: int = 16) -> tuple[budget._Space, budget.Scorer]:
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, side, side) for _ in range(2)]
    loader = [(x, None) for x in batches]
    space = budget._Space.build(model, (3, side, side), loader, "kl", "adapter", None, (), "bank", None)
    return space, space.scorer(model, loader, 2)


@pytest.mark.parametrize("factory", [lambda: TinyResNet(), tiny_vgg], ids=["resnet", "vgg"])
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
    assert 0 < scorer.prefix.runs < len(whole) / 2
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


def test_other_inputs_run_the_whole_student():
    model = randomize_bn(TinyResNet()).eval()
    space, scorer = _space(model)
    assert scorer.prefix is not None
    p = _last_stage(space)
    from dacnn_convert.core.convert import convert

    student = convert(model, p, init="fit").model.eval()
    partial = scorer.prefix.partial(student)
    assert partial is not student
    x = torch.randn(3, 3, 16, 16)  # not a cached batch
    torch.testing.assert_close(partial(x), student(x))
    # an unchanged copy: nothing to skip, the student itself
    import copy

    same = copy.deepcopy(model)
    assert scorer.prefix.partial(same) is same


def test_untraceable_models_score_whole():
    from tests.models import untraceable

    model = untraceable().eval()
    batches = [torch.randn(2, 3, 16, 16)]
    assert budget.prefix_cache(model, batches) is None
    assert budget.prefix_cache(model, []) is None
