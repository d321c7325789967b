"""Library calls leave the process as they found it (STYLE: no global seeds, signal handlers,
backends or import paths set behind the caller's back; a borrowed model comes back as it was)."""

from __future__ import annotations

import signal
import sys

import torch

from dacnn_convert import TrainConfig, compress
from dacnn_convert.core.modes import mode
from dacnn_convert.core.report import plot_accuracy
from dacnn_convert.io.sources import build_model, parse_spec
from dacnn_convert.train import make_loaders
from dacnn_convert.visualize import visualize_filters

from .models import TinyResNet


def _process_state() -> tuple:
    import matplotlib

    handlers = tuple(signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM))
    return torch.get_rng_state(), list(sys.path), handlers, matplotlib.get_backend()


def test_compress_plot_visualize_and_a_user_factory_change_no_process_state(tmp_path) -> None:
    import matplotlib

    data = make_loaders("synthetic", batch_size=16, input_size=16, train_limit=64)
    teacher = TinyResNet()
    teacher.layer1.eval()  # a partly frozen model: its mixed modes must come back exactly
    teacher_modes = [m.training for m in teacher.modules()]
    torch.manual_seed(123)
    before = _process_state()
    cfg = TrainConfig.finetune(epochs=1, limit_batches=2, precision="fp32")
    compress(teacher, data.train, data.val, mode="mix", epochs=1, train=cfg, calib_batches=2, out=tmp_path)
    plot_accuracy([{"epoch": 1, "val_acc": 0.5}], {"teacher": 0.6}, tmp_path / "acc.png")
    visualize_filters(teacher, ["layer1.0.conv1"], filters=2, input_size=(3, 16, 16), steps=2)
    after = _process_state()
    assert torch.equal(before[0], after[0]), "the global torch RNG was reseeded or drawn from"
    build_model(parse_spec("tests.models:tiny_resnet"), weights=None)  # imports from the working directory
    after = _process_state()  # (building a model draws its initial weights from the RNG, as torch does)
    assert before[1:] == after[1:], "sys.path, signal handlers or the matplotlib backend changed"
    assert matplotlib.get_backend() == before[3]
    assert [m.training for m in teacher.modules()] == teacher_modes
    assert next(teacher.parameters()).requires_grad


def test_mode_restores_every_submodules_own_flag() -> None:
    model = TinyResNet().train()
    model.layer2.eval()
    flags = [m.training for m in model.modules()]
    with mode(model):
        assert not any(m.training for m in model.modules())
    with mode(model, train=True):
        assert all(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == flags
