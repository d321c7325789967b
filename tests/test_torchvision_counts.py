"""Exact unique-parameter counts of mix-mode conversions of real torchvision networks."""

from __future__ import annotations

import pytest
import torchvision

from dacnn_convert import anchor, count_params, plan

K3 = 9  # 3x3 kernel


def test_resnet18_mix() -> None:
    model = torchvision.models.resnet18()
    assert count_params(model) == 11_689_512
    # per stage, one kernel kept of the convs with identical configuration:
    # layer1: 4 x 64*64*9 -> save 3; layer2..4: 3 members (the strided expansion conv stays free) -> save 2
    saved = 3 * 64 * 64 * K3 + 2 * 128 * 128 * K3 + 2 * 256 * 256 * K3 + 2 * 512 * 512 * K3
    assert saved == 6_303_744
    student = anchor(model, mode="mix", input_size=(3, 32, 32))
    assert count_params(student) == 11_689_512 - saved == 5_385_768


def test_resnet18_mix_regulators_all() -> None:
    model = torchvision.models.resnet18()
    # adapter regulators, one per basic block on conv2: 1x1 conv c*c + BN 2c, two blocks per stage
    regs = sum(2 * (c * c + 2 * c) for c in (64, 128, 256, 512))
    p = plan(model, mode="mix", regulators="all", input_size=(3, 32, 32))
    assert p.regulator_params == regs == 700_160
    assert count_params(anchor(model, mode="mix", regulators="all", input_size=(3, 32, 32))) == 5_385_768 + regs


def test_resnet34_mix() -> None:
    model = torchvision.models.resnet34()
    assert count_params(model) == 21_797_672
    # layer1: 6 convs of 64x64 -> save 5; layer2: 7 of 128x128 -> 6; layer3: 11 of 256x256 -> 10; layer4: 5 -> 4
    saved = 5 * 64 * 64 * K3 + 6 * 128 * 128 * K3 + 10 * 256 * 256 * K3 + 4 * 512 * 512 * K3
    assert count_params(anchor(model, mode="mix", input_size=(3, 32, 32))) == 21_797_672 - saved == 5_393_192


@pytest.mark.slow
def test_vgg16_bn_mix() -> None:
    model = torchvision.models.vgg16_bn()
    assert count_params(model) == 138_365_992
    # convs per resolution: [3->64, 64->64], [64->128, 128->128], [128->256, 2x 256->256],
    # [256->512, 2x 512->512], [3x 512->512]: groups of 2, 2 and 3 members; biases stay free
    saved = 256 * 256 * K3 + 512 * 512 * K3 + 2 * 512 * 512 * K3
    p = plan(model, mode="mix", input_size=(3, 32, 32))
    assert p.saved_params == saved == 7_667_712
    assert p.params_after == 138_365_992 - saved
