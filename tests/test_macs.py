"""Plan.macs_saved is exact: the MACs a plan removes (minus its regulators') are known before any weight
moves and match what FlopCounter measures on the converted model (issue 25's compute arithmetic)."""

from __future__ import annotations

import pytest
import torchvision

from dacnn_convert import apply, convert, count_macs, plan
from tests.models import TinyResNet

SIZE = (3, 32, 32)


@pytest.mark.parametrize(
    "settings",
    [
        {"mode": "mix", "regulators": "all"},
        {"mode": "plain", "regulators": "all"},
        {"mode": "bank", "bank_size": 0.25},  # bank conv + 1x1: fewer MACs
        {"mode": "bank", "bank_size": 1.0},  # the merged kernel is cheaper: the conv's own MACs
        {"mode": "bank", "bank_size": 0.75, "factorize_unshared": 0.25},
    ],
)
def test_macs_arithmetic_matches_the_measured_count(settings) -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    p = plan(model, input_size=SIZE, **settings)
    before = count_macs(model, SIZE)
    structure = convert(model, p, init="none").model  # MACs do not depend on the fitted values
    assert count_macs(structure, SIZE) == before - p.macs_saved


def test_the_planners_plans_and_a_low_rank_head() -> None:
    tiny = TinyResNet().eval()
    for settings in ({"target_ratio": 3}, {"mode": "bank", "bank_size": 0.5, "factorize_unshared": 0.25}):
        p = plan(tiny, input_size=(3, 16, 16), **settings)
        assert (
            count_macs(convert(tiny, p, init="none").model, (3, 16, 16)) == count_macs(tiny, (3, 16, 16)) - p.macs_saved
        )


@pytest.mark.slow
def test_a_linear_bank_and_a_tiny_model_too() -> None:
    model = torchvision.models.vgg11_bn(num_classes=10).eval()
    p = plan(model, input_size=SIZE, mode="bank", bank_size=0.1, factorize_unshared=0.05)
    assert any(p.site(m).layer == "linear" for g in p.groups for m in g.members)
    assert count_macs(apply(model, p), SIZE) == count_macs(model, SIZE) - p.macs_saved
    tiny = TinyResNet().eval()
    q = plan(tiny, input_size=(3, 16, 16), mode="mix", regulators="all")
    assert q.macs_saved < 0  # mix shares kernels, saves no MACs; its regulators add some
    assert count_macs(apply(tiny, q), (3, 16, 16)) == count_macs(tiny, (3, 16, 16)) - q.macs_saved
