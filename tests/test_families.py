"""The size-targeted planner on every torchvision classification model and a dozen timm families
(slow tier): no KeyError-class failure, every target from 50% down to the floor reached exactly,
and below the floor one PlanError naming it. Sizes only (``metric="size"``): the scores do not
change which plans exist, and scoring every model would take an hour."""

from __future__ import annotations

import pytest
import torch
import torchvision

from dacnn_convert import convert, count_params
from dacnn_convert.budget import (
    BANK_OPTIONS,
    HEAD_OPTIONS,
    RANK_OPTIONS,
    every_resolution,
    fixed_parts,
    pick,
    score_sections,
)
from dacnn_convert.core.planning import make_plan
from dacnn_convert.errors import PlanError
from dacnn_convert.io.sources import build_model, parse_spec

# the input side each needs (the smallest that runs), and the giants left out: building a
# randomly initialised 600M-parameter model takes longer than the rest together
SIDE = {"alexnet": 64, "inception_v3": 75, "maxvit_t": 224}
GIANT = {"regnet_y_128gf", "vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_32gf", "regnet_y_16gf", "vit_b_32"}
TORCHVISION = sorted(
    n
    for n in torchvision.models.list_models(module=torchvision.models)
    if n not in GIANT and not n.startswith(("vit_", "swin", "maxvit")) or n in ("vit_b_16", "swin_t", "maxvit_t")
)
TIMM = [
    "timm:vgg11_bn",
    "timm:inception_v3",
    "timm:mobilenetv2_100",
    "timm:mobilenetv3_large_100",
    "timm:efficientnet_b0",
    "timm:mnasnet_100",
    "timm:convnext_atto",
    "timm:regnetx_002",
    "timm:densenet121",
    "timm:repvgg_a0",
    "timm:resnext26ts",
    "timm:resnet50d",
    "timm:ghostnet_100",
]


def _side(name: str) -> int:
    bare = name.removeprefix("timm:")
    return SIDE.get(bare, 224 if bare.startswith(("vit_", "maxvit")) else 75 if "inception" in bare else 32)


@pytest.mark.slow
@pytest.mark.parametrize("name", [*TORCHVISION, *TIMM])
def test_every_target_from_half_down_to_the_floor(name: str) -> None:
    side = _side(name)
    torch.manual_seed(0)
    model = build_model(parse_spec(name, 10), weights=None).eval()
    size = (3, side, side)
    mix = every_resolution(make_plan(model, "mix", "all", input_size=size))
    plain = make_plan(model, "plain", "all", input_size=size)
    # the space a search with data has: the output layer ranked on its own too ("lr:f|out:g" at the floor)
    scores = score_sections(model, mix, plain, "size", options=BANK_OPTIONS, ranks=(*RANK_OPTIONS, *HEAD_OPTIONS))
    total = count_params(model)
    with pytest.raises(PlanError, match="smallest possible is") as info:
        pick(mix, plain, scores, 1, fixed=fixed_parts(model, mix))
    floor = int(str(info.value).split("smallest possible is ")[1].split(" ")[0].replace(",", ""))
    assert floor < total
    for target in sorted({t for t in (total // 2, (total // 2 + floor) // 2, floor) if t >= floor}):
        result = pick(mix, plain, scores, target)
        assert result.plan.params_after <= target
        # init="none": the arithmetic and the swap are under test, not the fits (minutes for a VGG head)
        student = convert(model, result.plan, init="none").model
        assert count_params(student) == result.plan.params_after  # the arithmetic is the built model
    student.eval()
    with torch.no_grad():
        assert student(torch.randn(1, *size)).shape == (1, 10)
