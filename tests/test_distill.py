"""Distillation: KD golden values, BN recalibration, data, and that training learns."""

from __future__ import annotations

import gzip
import struct

import pytest
import torch
from torch import nn

from dacnn_convert import anchor
from dacnn_convert.errors import DatasetError, UsageError
from dacnn_convert.train import TrainConfig, distill, evaluate, kd_loss, make_loaders, recalibrate_bn, train
from dacnn_convert.train import data as data_mod
from dacnn_convert.train.precision import resolve_precision
from dacnn_convert.train.state import NonFiniteLossError

from .models import TinyResNet


def test_kd_loss_golden_values() -> None:
    s = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.tensor([[3.0, 2.0, 1.0]])
    y = torch.tensor([0])
    # CE = log(e+e^2+e^3) - 1 = 2.40760596; KL(p_t || p_s) at T=2 = 0.32015667 (computed by hand)
    torch.testing.assert_close(kd_loss(s, t, y, temperature=2.0, alpha=0.0), torch.tensor(2.40760596444438))
    expected = 0.5 * 2.40760596444438 + 0.5 * 4 * 0.32015666782980645  # (1-a) CE + a T^2 KL
    torch.testing.assert_close(kd_loss(s, t, y, temperature=2.0, alpha=0.5), torch.tensor(expected))
    assert kd_loss(t, t, y, temperature=3.0, alpha=1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_recalibration_estimates_exact_batch_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    batches = [(torch.randn(8, 3, 8, 8) * 3 + 1, None) for _ in range(3)]
    used = recalibrate_bn(model, batches, num_batches=2)
    assert used == 2
    with torch.no_grad():
        acts = torch.cat([model[0](b[0]) for b in batches[:2]])
    # cumulative average of per-batch means equals the mean over both batches (equal sizes)
    torch.testing.assert_close(model[1].running_mean, acts.mean(dim=(0, 2, 3)), atol=1e-4, rtol=1e-4)
    assert model[1].momentum == 0.1 and model.training


def test_training_reduces_loss_on_synthetic_data() -> None:
    torch.manual_seed(0)
    loaders = make_loaders("synthetic", batch_size=32, input_size=16)
    model = TinyResNet()
    before = evaluate(model, loaders.val, "fp32")
    result = train(model, loaders.train, loaders.val, TrainConfig(epochs=2, lr=0.1, precision="fp32"))
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.final_acc > max(before, 0.5)


def test_distill_student_learns_from_teacher(tmp_path) -> None:
    torch.manual_seed(0)
    loaders = make_loaders("synthetic", batch_size=32, input_size=16)
    teacher = TinyResNet()
    train(teacher, loaders.train, loaders.val, TrainConfig(epochs=2, lr=0.1, precision="fp32"))
    student = anchor(teacher, mode="plain", init="random", input_size=(3, 16, 16))
    start = evaluate(student, loaders.val, "fp32")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = distill(
        student,
        teacher,
        loaders.train,
        loaders.val,
        epochs=2,
        config=TrainConfig(lr=0.1, precision="fp32"),
        out=tmp_path,
    )
    assert result.final_acc > start
    assert (tmp_path / "best.safetensors").is_file() and (tmp_path / "last.safetensors").is_file()
    for key, value in teacher.state_dict().items():  # never updated, BN statistics included
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert all(p.requires_grad for p in teacher.parameters())  # its flags are given back


def test_non_finite_loss_names_the_step() -> None:
    loaders = make_loaders("synthetic", batch_size=64, input_size=16)
    model = TinyResNet()
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="step 0"):
        train(model, loaders.train, loaders.val, TrainConfig(precision="fp32"))


def test_config_and_precision_errors() -> None:
    with pytest.raises(UsageError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(UsageError, match="optimizer"):
        TrainConfig(optimizer="adam")
    with pytest.raises(UsageError, match="precision='fp16' needs a CUDA device; on CPU use precision='bf16'"):
        resolve_precision("fp16", torch.device("cpu"))


def test_fashion_mnist_from_debian_idx_files(tmp_path, monkeypatch) -> None:
    """Our own idx reader on files laid out like Debian's package (2 train, 1 test image)."""
    debian = tmp_path / "debian"
    debian.mkdir()

    def write(name: str, header: bytes, payload: bytes) -> None:
        (debian / f"{name}.gz").write_bytes(gzip.compress(header + payload))

    imgs = bytes([7] * (28 * 28 * 2))
    write("train-images-idx3-ubyte", struct.pack(">BBBBIII", 0, 0, 8, 3, 2, 28, 28), imgs)
    write("train-labels-idx1-ubyte", struct.pack(">BBBBI", 0, 0, 8, 1, 2), bytes([3, 9]))
    write("t10k-images-idx3-ubyte", struct.pack(">BBBBIII", 0, 0, 8, 3, 1, 28, 28), bytes([255] * 28 * 28))
    write("t10k-labels-idx1-ubyte", struct.pack(">BBBBI", 0, 0, 8, 1, 1), bytes([1]))
    monkeypatch.setattr(data_mod, "DEBIAN_FASHION_MNIST", debian)
    monkeypatch.setenv("DACNN_DATA", str(tmp_path / "cache"))
    loaders = make_loaders("fashion-mnist", batch_size=2, input_size=32)
    x, y = next(iter(loaders.val))
    assert x.shape == (1, 3, 32, 32) and y.tolist() == [1]
    assert loaders.num_classes == 10
    assert (tmp_path / "cache" / "fashion-mnist" / "train-images-idx3-ubyte").is_file()


def test_missing_dataset_offline_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DACNN_DATA", str(tmp_path))
    with pytest.raises(DatasetError, match="pass download=True to fetch it"):
        make_loaders("cifar10")
    with pytest.raises(UsageError, match="Did you mean: cifar10"):
        make_loaders("cifar1O")


def test_feature_loss_matches_stages_by_name() -> None:
    from dacnn_convert import plan
    from dacnn_convert.train.losses import FeatureTaps, feature_mse

    teacher = TinyResNet().eval()
    p = plan(teacher, input_size=(3, 16, 16))
    assert p.stage_outputs() == ["layer1.1.bn2", "layer2.1.bn2"]
    same = anchor(teacher, mode="none", input_size=(3, 16, 16)).eval()
    other = anchor(teacher, mode="mix", init="random", input_size=(3, 16, 16)).eval()
    x = torch.randn(2, 3, 16, 16)
    taps = [FeatureTaps(m, p.stage_outputs()) for m in (teacher, same, other)]
    for m in (teacher, same, other):
        m(x)
    assert feature_mse(taps[1].outputs, taps[0].outputs).item() == 0.0
    assert feature_mse(taps[2].outputs, taps[0].outputs).item() > 0.0


def test_distill_with_feature_loss_runs_and_cleans_up_hooks() -> None:
    loaders = make_loaders("synthetic", batch_size=64, input_size=16)
    teacher = TinyResNet()
    student = anchor(teacher, input_size=(3, 16, 16))
    p = student.dacnn_plan
    cfg = TrainConfig(precision="fp32", feature_weight=1.0, limit_batches=2)
    result = distill(student, teacher, loaders.train, loaders.val, config=cfg, feature_layers=p.stage_outputs())
    assert result.history and all(not m._forward_hooks for m in student.modules())


def test_imagefolder_dataset(tmp_path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (20, 24), color=(i * 100, 50, 200 if cls == "cat" else 0)).save(
                    tmp_path / split / cls / f"{i}.png"
                )
    loaders = make_loaders(f"imagefolder:{tmp_path}", batch_size=2, input_size=16)
    x, y = next(iter(loaders.val))
    assert loaders.num_classes == 2 and x.shape == (4, 3, 16, 16) and len(loaders.train) == 2
    with pytest.raises(DatasetError, match="train"):
        make_loaders(f"imagefolder:{tmp_path / 'nothing'}")


def test_auto_precision_needs_native_bf16_units(tmp_path, monkeypatch) -> None:
    """AVX-512 without bf16 units emulates bf16 (slower than fp32): auto must pick fp32 there."""
    from dacnn_convert.train import precision

    plain = tmp_path / "cpuinfo"
    plain.write_text("flags\t\t: fpu sse avx2 avx512f avx512bw\n")
    native = tmp_path / "cpuinfo-bf16"
    native.write_text("flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n")
    assert not precision.cpu_has_bf16_units(str(plain)) and precision.cpu_has_bf16_units(str(native))
    assert not precision.cpu_has_bf16_units(str(tmp_path / "missing"))
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    assert resolve_precision("auto", torch.device("cpu")) == "bf16"
