"""Dense export: the original class loads the weights with strict=True and computes the same."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

from dacnn_convert import anchor, save
from dacnn_convert.io.dense import DenseExportError, check_dense, dense_state_dict, export_dense
from dacnn_convert.train import make_loaders

from .models import randomize_bn

SIZE = (3, 32, 32)


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()


def _wake_regulators(student: nn.Module) -> nn.Module:
    """Adapters start at zero (function kept): give them weights and statistics, as after training."""
    g = torch.Generator().manual_seed(1)
    for name, m in student.named_modules():
        if name.endswith("regulator"):
            m.bn.weight.data.copy_(torch.randn(m.bn.num_features, generator=g) * 0.5)
            m.bn.bias.data.copy_(torch.randn(m.bn.num_features, generator=g) * 0.1)
            m.bn.running_mean.copy_(torch.randn(m.bn.num_features, generator=g) * 0.1)
    return student


CASES = {
    "mix": dict(mode="mix"),
    "plain": dict(mode="plain"),
    "sharesnet": dict(mode="sharesnet"),
    "mix+adapters": dict(mode="mix", regulators="all"),
    "bank+lowrank": dict(mode="bank", bank_size="1:1.0,2:0.5,3:0.25,4:0.125", factorize_unshared=0.25),
}


@pytest.mark.parametrize("case", list(CASES))
def test_stock_torchvision_class_loads_dense_weights_and_matches(teacher, case) -> None:
    student = _wake_regulators(anchor(teacher, input_size=SIZE, **CASES[case]).eval())
    state = dense_state_dict(student)
    assert not any(k.startswith("dacnn_anchors") for k in state)
    stock = torchvision.models.resnet18(num_classes=10)
    assert set(state) == set(stock.state_dict())
    assert check_dense(student, stock, state, SIZE) < 1e-5  # strict load inside
    ptrs = [t.untyped_storage().data_ptr() for t in state.values()]
    assert len(ptrs) == len(set(ptrs))  # no shared storage: safetensors' save_file accepts it


def test_a_timm_class_loads_dense_weights_too() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    teacher = randomize_bn(timm.create_model("resnet18", num_classes=10)).eval()
    student = anchor(teacher, mode="bank", bank_size=0.5, input_size=SIZE).eval()
    assert check_dense(student, timm.create_model("resnet18", num_classes=10), dense_state_dict(student), SIZE) < 1e-5


@pytest.mark.slow
def test_data_fitted_bank_round_trips_through_a_file(teacher, tmp_path) -> None:
    from safetensors.torch import load_file

    loaders = make_loaders("synthetic", batch_size=8, input_size=32)
    student = anchor(teacher, mode="bank", calib_loader=loaders.train, calib_batches=2).eval()
    result = export_dense(student, tmp_path / "m.safetensors", torchvision.models.resnet18(num_classes=10), SIZE)
    fresh = torchvision.models.resnet18(num_classes=10).eval()
    fresh.load_state_dict(load_file(str(result.path)), strict=True)  # no dacnn in the loop
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        expected = student(x)
        # where a bank runs as conv(x, B) then its 1x1, the dense kernel sums in another order:
        # fp32 rounding, about 2e-5 of the logits here
        torch.testing.assert_close(fresh(x), expected, atol=1e-4, rtol=1e-4)
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4 * max(1.0, float(expected.abs().max()))


def test_serial_regulators_are_refused_with_the_reason(teacher) -> None:
    student = anchor(teacher, mode="mix", regulators="all", regulator_style="paper", input_size=SIZE)
    with pytest.raises(DenseExportError, match="serial .paper-style. regulator.*regulator_style='adapter'"):
        dense_state_dict(student)


def test_cli_exports_dense_and_checks_it(teacher, tmp_path) -> None:
    from dacnn_convert.cli import app

    ckpt = save(anchor(teacher, mode="mix", input_size=SIZE), tmp_path / "m.safetensors", source="resnet18")
    result = CliRunner().invoke(app, ["export", str(ckpt), "--format", "dense"])
    assert result.exit_code == 0, result.output
    assert "strict=True" in result.output and (tmp_path / "m-fp32.dense.safetensors").is_file()
