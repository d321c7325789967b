"""Which modules count as a plain conv or Linear: exact types, marker subclasses and timm's ``Linear`` are
converted; subclasses that change the function (``Conv2dSame``, ``StdConv2d``, parametrised layers) are not."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from dacnn_convert import convert, count_params, load, plan, save
from dacnn_convert.core.kinds import plain_kind
from dacnn_convert.core.layers import AnchoredLinear
from dacnn_convert.io.dense import export_dense

from .models import VGGHead

timm_layers = pytest.importorskip("timm.layers")
SIZE = (3, 16, 16)


def _timm_head(model: VGGHead) -> VGGHead:
    """The same network with timm's Linear in the classifier (as timm's MobileNetV3 and EfficientNet have)."""
    for i, m in enumerate(model.classifier):
        if type(m) is nn.Linear:
            t = timm_layers.Linear(m.in_features, m.out_features)
            t.load_state_dict(m.state_dict())
            model.classifier[i] = t
    return model


def test_plain_kind_accepts_equal_functions_and_refuses_changed_ones() -> None:
    assert plain_kind(nn.Conv2d(2, 3, 1)) is nn.Conv2d
    assert plain_kind(nn.Linear(2, 3)) is nn.Linear
    assert plain_kind(timm_layers.Linear(2, 3)) is nn.Linear
    assert plain_kind(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 3)) is nn.Linear  # a marker class
    assert plain_kind(timm_layers.Conv2dSame(2, 3, 3)) is None  # pads at run time
    assert plain_kind(timm_layers.StdConv2d(2, 3, 3)) is None  # standardises its weight
    conv = nn.Conv2d(2, 3, 1)
    parametrize.register_parametrization(conv, "weight", nn.Identity())
    assert plain_kind(conv) is None  # its weight is computed
    assert plain_kind(nn.BatchNorm2d(3)) is None

    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    assert plain_kind(Scaled(2, 3)) is None

    class Marker(nn.Conv2d):
        pass

    hooked = Marker(2, 3, 1)
    hooked.register_forward_hook(lambda m, i, o: 2 * o)
    assert plain_kind(Marker(2, 3, 1)) is nn.Conv2d and plain_kind(hooked) is None  # a hook changes its output

    class Called(nn.Linear):
        def __call__(self, *args: object, **kwargs: object) -> torch.Tensor:
            return 2 * super().__call__(*args, **kwargs)

    assert plain_kind(Called(2, 3)) is None


def test_a_timm_linear_head_is_factorised_saved_loaded_and_exported_as_a_stock_one(tmp_path) -> None:
    torch.manual_seed(0)
    model = _timm_head(VGGHead()).eval()
    p = plan(model, mode="none", factorize_unshared=8, input_size=SIZE)
    assert {g.members[0] for g in p.groups if p.site(g.members[0]).layer == "linear"} == {
        "classifier.0",
        "classifier.2",
    }
    student = convert(model, p).model.eval()
    assert isinstance(student.classifier[0], AnchoredLinear)
    assert count_params(student) == p.params_after < count_params(model)
    save(student, tmp_path / "s.safetensors")
    back = load(tmp_path / "s.safetensors", _timm_head(VGGHead())).eval()
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(back(x), student(x))
    export = export_dense(student, tmp_path / "dense.safetensors", _timm_head(VGGHead()), SIZE)
    assert export.max_abs_diff is not None and export.max_abs_diff < 1e-5


def test_full_rank_through_a_timm_linear_reproduces_the_model() -> None:
    torch.manual_seed(0)
    model = _timm_head(VGGHead()).eval()
    p = plan(model, mode="none", factorize_unshared=64, input_size=SIZE)
    x = torch.randn(3, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(convert(model, p).model.eval()(x), model(x), atol=1e-4, rtol=1e-4)
