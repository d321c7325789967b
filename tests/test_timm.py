"""timm models: traced with timm's leaf modules; subclasses like Conv2dSame are never converted."""

from __future__ import annotations

import timm
import torch

from dacnn_convert import convert, count_params, plan


def test_tf_efficientnet_keeps_conv2d_same_and_shares_the_rest() -> None:
    model = timm.create_model("tf_efficientnet_b0", pretrained=False).eval()
    same = {n for n, m in model.named_modules() if type(m).__name__ == "Conv2dSame"}
    assert same  # the premise: this model has Conv2dSame layers (a subclass of nn.Conv2d)
    p = plan(model, mode="mix", input_size=(3, 32, 32))
    assert not same & {s.name for s in p.sites}
    student = convert(model, p).model.eval()
    for name in same:
        assert type(student.get_submodule(name)).__name__ == "Conv2dSame"
    assert count_params(student) == p.params_after < count_params(model)
    assert student(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
