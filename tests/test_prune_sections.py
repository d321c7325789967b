"""Per-section channel pruning (issue 25 item 2): each section at its own ratio, chosen by kl, exact, round-tripping."""

from __future__ import annotations

import json

import pytest
import torch

from dacnn_convert import AnchorConfig, convert, count_macs, count_params, load, save
from dacnn_convert.core.plan import Plan
from dacnn_convert.core.pruning import Pruning, channel_prune
from dacnn_convert.errors import PlanError
from dacnn_convert.io.sources import ModelSpec
from dacnn_convert.pipeline import plan_search
from dacnn_convert.prune_search import (
    PrunedModels,
    SectionPruning,
    layers_at,
    per_section_ratios,
    prune,
    search_pruned,
    section_layers,
    section_scores,
    with_pruning,
)
from dacnn_convert.train import make_loaders

from .models import TinyResNet, randomize_bn

SIZE = (3, 16, 16)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyResNet(width=16).eval()


def _stage2(model: torch.nn.Module) -> tuple[tuple[str, float], ...]:
    return tuple((n, 0.5) for n in section_layers(model, SIZE)[1])


def test_sections_are_the_layers_by_output_resolution_without_the_logits_layer(model) -> None:
    sections = section_layers(model, SIZE)
    assert sections == [
        ("conv1", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"),
        ("layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv1", "layer2.1.conv2"),
    ]  # fc produces the logits: never pruned


def test_named_layers_are_pruned_at_their_own_ratio_and_the_rest_left_whole(model) -> None:
    narrow, spec = prune(model, 0.0, "group", SIZE, layers=_stage2(model), sections=(0.0, 0.5))
    assert narrow.layer1[0].conv1.out_channels == 16 and narrow.conv1.out_channels == 16  # section 1 whole
    assert narrow.layer2[0].conv1.out_channels == 16 and narrow.layer2[1].conv2.out_channels == 16  # 32 -> 16
    assert narrow.fc.in_features == 16 and narrow.fc.out_features == 10
    assert spec.params_saved == count_params(model) - count_params(narrow) > 0
    assert spec.macs_saved == count_macs(model, SIZE) - count_macs(narrow, SIZE) > 0
    assert spec.label == "prune 0/0.5 by section (group)"
    assert spec.amount == "0/0.5 of the channels of each section's layers"
    with pytest.raises(PlanError, match="'layer9.conv' that this model does not have"):
        channel_prune(TinyResNet(width=16), 0.0, "group", SIZE, layers=(("layer9.conv", 0.5),))
    with pytest.raises(PlanError, match="'fc', which produces the model's outputs"):
        channel_prune(TinyResNet(width=16), 0.0, "group", SIZE, layers=(("fc", 0.5),))
    kept = channel_prune(TinyResNet(width=16), 0.0, "group", SIZE, layers=(("fc", 0.0), ("layer2.0.conv1", 0.5)))
    assert kept.fc.out_features == 10 and kept.layer2[0].conv1.out_channels == 16


def test_bad_per_layer_prunings_are_refused_in_one_line() -> None:
    for kwargs, match in [
        ({"layers": (("a", 0.0),)}, "one must prune"),
        ({"layers": (("a", 1.0),)}, "in \\(0, 1\\)"),
        ({"layers": (("a", 0.5), ("a", 0.25))}, "distinct module names"),
        ({"layers": (("", 0.5),)}, "distinct module names"),
        ({"sections": (0.5,)}, "come with the layers"),
    ]:
        with pytest.raises(PlanError, match=match):
            Pruning(0.0 if "layers" in kwargs else 0.5, **kwargs)  # type: ignore[arg-type]


def test_a_per_section_plan_round_trips_converts_exactly_and_saves_and_loads(model, tmp_path) -> None:
    narrow, spec = prune(model, 0.0, "group", SIZE, layers=_stage2(model), sections=(0.0, 0.5))
    plan, _ = plan_search(narrow, AnchorConfig(mode="bank", bank_size=0.5), input_size=SIZE)
    plan = with_pruning(plan, spec, count_params(model))
    assert Plan.from_json(plan.to_json()) == plan and plan.prune == spec
    assert json.loads(plan.to_json())["prune"]["sections"] == [0.0, 0.5]
    student = convert(model, plan).model
    assert count_params(student) == plan.params_after
    assert count_macs(student, SIZE) == count_macs(model, SIZE) - plan.macs_saved
    path = save(student, tmp_path / "m.safetensors", source=ModelSpec("module", "tests.models:TinyResNet", 10))
    back = load(path, model=TinyResNet(width=16))  # the unpruned skeleton: the plan's shapes narrow it
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.allclose(back.eval()(x), student.eval()(x), atol=1e-5)
    uniform, _ = plan_search(model, AnchorConfig(mode="bank", prune=0.5), input_size=SIZE)
    assert "layers" not in json.loads(uniform.to_json())["prune"]  # files of uniform prunings as they were


def test_the_knapsack_picks_the_least_kl_per_section_ratios_that_remove_enough() -> None:
    scores = [
        SectionPruning(1, 0.25, 10, 100, 0.5),
        SectionPruning(1, 0.5, 20, 200, 2.0),
        SectionPruning(2, 0.25, 30, 50, 0.1),
        SectionPruning(2, 0.5, 60, 120, 0.3),
    ]
    assert per_section_ratios(scores, 2, 150, "macs") == (0.25, 0.25)  # 150 MACs: kl 0.6 (0.5/0.5 would cost 2.3)
    assert per_section_ratios(scores, 2, 200, "macs") == (0.25, 0.5)  # 220 MACs at kl 0.8 beats 200 at kl 2.0
    assert per_section_ratios(scores, 2, 60, "params") == (0.0, 0.5)  # params: section 2 alone, kl 0.3
    assert per_section_ratios(scores, 2, 1000, "macs") is None  # out of reach
    assert per_section_ratios(scores, 3, 0, "macs") == (0.0, 0.0, 0.0)


def test_section_scores_prune_each_section_alone() -> None:
    small = TinyResNet(width=8).eval()
    loaders = make_loaders("synthetic", batch_size=8, input_size=16)
    pruned = PrunedModels(small, SIZE, "group")
    batches = [x for x, _ in [next(iter(loaders.train))]]
    with torch.no_grad():
        reference = [torch.log_softmax(small(x), 1) for x in batches]
    sections = section_layers(small, SIZE)
    found = section_scores(pruned, sections, (batches, reference), grid=(0.5,))
    assert [(s.section, s.ratio) for s in found] == [(1, 0.5), (2, 0.5)]
    for s in found:
        ratios = [0.5 if k == s.section else 0.0 for k in (1, 2)]
        narrow, spec = prune(small, 0.0, "group", SIZE, layers=layers_at(sections, ratios))
        assert (s.params_saved, s.macs_saved) == (spec.params_saved, spec.macs_saved) and s.kl > 0
        other = sections[2 - s.section]  # the section left whole keeps every width
        modules = dict(narrow.named_modules())
        assert all(modules[n].out_channels == dict(small.named_modules())[n].out_channels for n in other)


class PooledStem(torch.nn.Module):
    """stem conv at 16 x 16, max-pool, a residual block at 8 x 8 adding the stem's output: one channel group
    spans two sections."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def test_a_group_spanning_two_sections_is_pruned_by_one_of_them() -> None:
    torch.manual_seed(0)
    m = PooledStem().eval()
    sections = section_layers(m, SIZE)
    assert sections == [("stem.0",), ("conv1", "conv2"), ("conv3",)]
    alone = [
        prune(m, 0.0, "group", SIZE, layers=layers_at(sections, [0.5 if i == k else 0.0 for i in range(3)]))
        for k in range(3)
    ]
    narrowed = [narrow.stem[0].out_channels < 8 for narrow, _ in alone[:2]]
    assert narrowed.count(True) == 1  # the stem's channels (also conv2's, by the addition) go with one section
    both, spec = prune(m, 0.0, "group", SIZE, layers=layers_at(sections, [0.5, 0.5, 0.5]))
    assert spec.params_saved <= sum(s.params_saved for _, s in alone)  # overlap only takes away
    assert both.stem[0].out_channels == both.conv2.out_channels == 4 and both.conv3.out_channels == 8


def test_auto_tries_per_section_pruning_and_scores_it_whole() -> None:
    from dacnn_convert.budget import search

    loaders = make_loaders("synthetic", batch_size=16, input_size=16)
    small = TinyResNet(width=8).eval()
    pruned = PrunedModels(small, SIZE, "group", loaders.train, 1)
    target = count_params(small) // 2

    def at(narrow, reuse, final):
        return search(narrow, target, SIZE, loaders.train, 1, "kl", rescore_rounds=0, reuse=reuse)

    found = search_pruned(pruned, (0.0, 0.25, 0.5), at, loaders.train, 1, "kl", per_section="params")
    per = [t for t in found.prune_tries if t[4]]
    assert per, found.prune_tries  # at least one per-section pruning was searched and scored
    assert all(kl is not None and kl >= 0 and len(by) == 2 for _, kl, _, _, by in per)
    assert found.plan.params_after <= target
    assert any("channel pruning per section" in line for line in found.explain())
    assert all("sections" in t for t in found.to_dict()["prune_tries"])
    student = convert(small, found.plan, calib_loader=loaders.train, calib_batches=1).model
    assert count_params(student) == found.plan.params_after


def test_a_per_section_winner_is_searched_once_more_in_full(monkeypatch) -> None:
    import dacnn_convert.prune_search as ps
    from dacnn_convert.budget import search

    loaders = make_loaders("synthetic", batch_size=16, input_size=16)
    small = TinyResNet(width=8).eval()
    pruned = PrunedModels(small, SIZE, "group", loaders.train, 1)
    per_section_models = lambda: {id(m) for (_, layers), (m, _) in pruned.made.items() if layers}  # noqa: E731
    monkeypatch.setattr(ps, "_whole_kl", lambda model, *a: 0.01 if id(model) in per_section_models() else 1.0)
    calls = []

    def at(narrow, reuse, final):
        calls.append((id(narrow), final))
        return search(narrow, count_params(small) // 2, SIZE, loaders.train, 1, "kl", rescore_rounds=0, reuse=reuse)

    found = search_pruned(pruned, (0.0, 0.25), at, loaders.train, 1, "kl", per_section="params")
    assert found.plan.prune is not None and found.plan.prune.sections and found.plan.prune.layers
    assert calls[-1] == (calls[-1][0], True) and calls[-1][0] in per_section_models()  # the winner, in full
    assert [f for _, f in calls].count(True) == 1


def test_section_scores_with_the_prefix_cache_match_whole_runs(monkeypatch) -> None:
    """Each pruned section scored from the cached activations before it, as if the whole student ran."""
    from dacnn_convert import budget

    small = randomize_bn(TinyResNet(width=8)).eval()
    loaders = make_loaders("synthetic", batch_size=8, input_size=16)
    batches = [x for x, _ in [next(iter(loaders.train))]]
    with torch.no_grad():
        reference = [torch.log_softmax(small(x), 1) for x in batches]
    sections = section_layers(small, SIZE)
    cached = section_scores(PrunedModels(small, SIZE, "group"), sections, (batches, reference), grid=(0.5,))
    monkeypatch.setattr(budget, "prefix_cache", lambda *a, **k: None)
    whole = section_scores(PrunedModels(small, SIZE, "group"), sections, (batches, reference), grid=(0.5,))
    assert [(s.section, s.ratio) for s in cached] == [(s.section, s.ratio) for s in whole]
    for a, b in zip(cached, whole, strict=True):
        assert a.kl == pytest.approx(b.kl, rel=1e-4)
