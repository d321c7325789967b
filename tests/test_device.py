"""Device placement: --device resolution, torchrun's process group, borrowed models given back.

CUDA is absent on CI: its branches are exercised by monkeypatching what torch reports.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dacnn_convert.errors import UsageError
from dacnn_convert.train import TrainConfig, distill, distributed, make_loaders
from dacnn_convert.train import device as device_mod
from dacnn_convert.train.device import resolve_device

from .models import TinyResNet


def _fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_auto_is_the_cpu_without_cuda(monkeypatch) -> None:
    _fake_gpus(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")


def _torchrun(monkeypatch, rank: int, world: int = 2) -> None:
    """The environment torchrun gives each process (a WORLD_SIZE alone is refused: test_reliability3)."""
    env = {"WORLD_SIZE": world, "RANK": rank, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 29500}
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))


def test_auto_and_cuda_follow_local_rank_under_torchrun(monkeypatch) -> None:
    _fake_gpus(monkeypatch, 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("auto") == torch.device("cuda", 3)
    assert resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # an explicit index wins
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("auto") == torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("spec", "gpus", "message"),
    [
        ("cuda", 0, "no CUDA device is available on this machine; use cpu or auto"),
        ("cuda:2", 2, "cuda:2 does not exist: this machine has 2 GPU"),
        ("cuda:x", 2, "must be a number"),
        ("tpu", 0, "unknown device 'tpu'; expected auto"),
    ],
)
def test_bad_devices_say_what_exists(monkeypatch, spec, gpus, message) -> None:
    _fake_gpus(monkeypatch, gpus)
    with pytest.raises(UsageError, match=message):
        resolve_device(spec)


def test_process_group_sets_the_gpu_first_and_uses_nccl(monkeypatch) -> None:
    calls = []
    _torchrun(monkeypatch, rank=1)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    assert distributed.init_from_env(torch.device("cuda", 1)) == (1, 2)
    assert calls == [("set_device", "cuda:1"), ("init", "nccl")]
    calls.clear()
    distributed.init_from_env(torch.device("cpu"))
    assert calls == [("init", "gloo")]


def test_shutdown_leaves_the_group_only_when_joined(monkeypatch) -> None:
    destroyed = []
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: destroyed.append(True))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    distributed.shutdown()
    assert destroyed == []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    distributed.shutdown()
    assert destroyed == [True]


def test_batches_stay_put_on_the_cpu() -> None:
    from dacnn_convert.train.evaluation import to_device

    x = torch.ones(2)
    assert to_device(x, torch.device("cpu")) is x


def test_distill_gives_the_teacher_back_as_it_came() -> None:
    torch.manual_seed(0)
    loaders = make_loaders("synthetic", batch_size=16, input_size=16)
    teacher, student = TinyResNet().train(), TinyResNet()
    teacher.conv1.weight.requires_grad_(False)  # the user's own freezing is kept
    cfg = TrainConfig(epochs=1, lr=1e-3, precision="fp32", limit_batches=1, channels_last=True)
    distill(student, teacher, loaders.train, loaders.val, config=cfg, calib_batches=0)
    assert teacher.training and all(m.training for m in teacher.modules())
    assert not teacher.conv1.weight.requires_grad and teacher.fc.weight.requires_grad
    assert teacher.conv1.weight.is_contiguous()  # channels_last was for the fine-tune only


def test_latency_gives_models_back_in_their_mode() -> None:
    from dacnn_convert.latency import compare_latency

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    rows = compare_latency({"m": model}, (3, 8, 8), batch=1, repeats=1, warmup=0)
    assert rows[0].device == "cpu" and model.training and model[1].training


def test_resume_state_holds_the_cuda_rng_and_scaler_slots(tmp_path) -> None:
    torch.manual_seed(0)
    loaders = make_loaders("synthetic", batch_size=16, input_size=16)
    cfg = TrainConfig(epochs=1, lr=1e-3, precision="fp32", limit_batches=1)
    distill(TinyResNet(), TinyResNet(), loaders.train, loaders.val, config=cfg, out=tmp_path, calib_batches=0)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert "cuda_rng" in state and "scaler" in state
    assert state["cuda_rng"] is None and state["scaler"] is None  # no CUDA here, no fp16 loss scaling


@pytest.mark.parametrize(
    "command",
    [
        ["train"],
        ["eval", "x.safetensors"],
        ["bench"],
        ["convert"],
        ["plan"],
        ["demo"],
        ["recipe", "run", "x.yaml"],
        ["latency", "x.safetensors"],
    ],
)
def test_every_command_that_runs_a_model_takes_device(command) -> None:
    from dacnn_convert.cli import app

    out = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).output
    assert "--device" in out, out


def test_cuda_on_a_machine_without_one_is_a_usage_error(monkeypatch, tmp_path) -> None:
    from dacnn_convert.cli import app

    _fake_gpus(monkeypatch, 0)
    result = CliRunner().invoke(
        app,
        [
            "train",
            "tests.models:tiny_resnet",
            "--dataset",
            "synthetic",
            "--input-size",
            "16",
            "--device",
            "cuda",
            "--out",
            str(tmp_path / "t"),
        ],
    )
    assert result.exit_code == 2 and "no CUDA device is available" in result.output, result.output
    assert (
        device_mod.DEVICE_HELP.split(";")[0]
        in CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "300"}).output
    )


def test_under_torchrun_an_explicit_gpu_must_be_this_ranks(monkeypatch) -> None:
    _fake_gpus(monkeypatch, 2)
    _torchrun(monkeypatch, rank=1)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UsageError, match="under torchrun each process uses the GPU of its LOCAL_RANK .here cuda:1"):
        resolve_device("cuda:0")


def test_fp16_training_scales_the_loss_and_the_scaler_resumes(tmp_path, monkeypatch) -> None:
    """The fp16 path (CUDA only in use) exercised on the CPU: GradScaler scales, unscales for
    clipping, steps, and its state travels in state.pt."""
    from dacnn_convert.train import loop

    calls = []
    real = torch.amp.GradScaler

    class Spy(real):  # type: ignore[misc, valid-type]
        def unscale_(self, opt):
            calls.append("unscale")
            return super().unscale_(opt)

    from dacnn_convert.train import evaluation

    monkeypatch.setattr(loop, "resolve_precision", lambda p, d: "fp16")
    monkeypatch.setattr(evaluation, "resolve_precision", lambda p, d: "fp16")
    monkeypatch.setattr(torch.amp, "GradScaler", Spy)
    loaders = make_loaders("synthetic", batch_size=16, input_size=16)
    cfg = TrainConfig(epochs=1, lr=1e-3, precision="fp32", limit_batches=2, clip_grad=1.0, channels_last=False)
    result = loop.train(TinyResNet(), loaders.train, loaders.val, cfg, out=tmp_path)
    assert result.precision == "fp16" and calls == ["unscale", "unscale"]  # clip the true gradients each step
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["scaler"] is not None and state["scaler"]["scale"] > 0


def test_a_state_file_from_before_the_cuda_fields_still_resumes(tmp_path) -> None:
    loaders = make_loaders("synthetic", batch_size=16, input_size=16)
    cfg = TrainConfig(epochs=1, lr=1e-3, precision="fp32", limit_batches=1)
    from dacnn_convert.train import train

    train(TinyResNet(), loaders.train, loaders.val, cfg, out=tmp_path)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    del state["cuda_rng"], state["scaler"]  # as written by earlier versions
    torch.save(state, tmp_path / "state.pt")
    result = train(
        TinyResNet(),
        loaders.train,
        loaders.val,
        TrainConfig(**{**cfg.__dict__, "epochs": 2}),
        out=tmp_path,
        resume=True,
    )
    assert len(result.history) == 2
