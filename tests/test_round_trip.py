"""Files the tool writes load again: convert -> save -> load / inspect / TorchScript, for a model of
every torchvision classification family and a sample of timm families, at small inputs (slow tier)."""

from __future__ import annotations

import pytest
import torch

from dacnn_convert import convert, count_params, export_torchscript, inspect_file, load, plan, save
from dacnn_convert.io.sources import build_model, parse_spec

# the smallest member of each torchvision family, and the input side it needs
TORCHVISION = {
    "alexnet": 64,
    "convnext_tiny": 32,
    "densenet121": 32,
    "efficientnet_b0": 32,
    "efficientnet_v2_s": 32,
    "googlenet": 32,
    "inception_v3": 75,
    "mnasnet0_5": 32,
    "mnasnet1_3": 32,
    "mobilenet_v2": 32,
    "mobilenet_v3_small": 32,
    "regnet_x_400mf": 32,
    "regnet_y_400mf": 32,
    "resnet18": 32,
    "resnext50_32x4d": 32,
    "shufflenet_v2_x0_5": 32,
    "squeezenet1_1": 32,
    "vgg11_bn": 32,
    "wide_resnet50_2": 32,
    "swin_t": 32,
    "maxvit_t": 224,
    "vit_b_16": 224,
}
TIMM = {
    "timm:resnet10t": 32,
    "timm:efficientnet_b0": 32,
    "timm:mixnet_s": 32,
    "timm:ghostnet_100": 32,
    "timm:repvgg_a0": 32,
    "timm:regnetx_002": 32,
    "timm:mobilenetv3_small_050": 32,
    "timm:convnext_atto": 32,
}
MODELS = {**TORCHVISION, **TIMM}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_convert_save_load_inspect_and_trace_round_trip(tmp_path, name: str) -> None:
    side = MODELS[name]
    spec = parse_spec(name, 10)
    torch.manual_seed(0)
    model = build_model(spec, weights=None).eval()
    student = convert(model, plan(model, input_size=(3, side, side), init="fit")).model.eval()
    path = save(student, tmp_path / "m.safetensors", source=spec)
    back = load(path).eval()
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        torch.testing.assert_close(back(x), student(x), rtol=1e-4, atol=1e-4)
    assert inspect_file(path).params == count_params(back) == count_params(student)
    traced = export_torchscript(back, tmp_path / "m.pt", input_size=(3, side, side))
    assert inspect_file(traced).params == count_params(student)
