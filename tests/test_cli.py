"""The command line: success path, offline weights, bad flags; exit codes and written files."""

from __future__ import annotations

import json
import urllib.error

import pytest
import torch
from typer.testing import CliRunner

from dacnn_convert.cli import app, convert_app

runner = CliRunner()
TINY = ["tests.models:tiny_resnet", "--weights", "none", "--input-size", "16"]


def test_convert_writes_checkpoint_and_reports(tmp_path) -> None:
    result = runner.invoke(convert_app, [*TINY, "--regulators", "all", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mode"] == "mix" and report["regulators"] == 4
    assert report["params_after"] < report["params_before"]
    assert report["macs_after"] >= report["macs_before"]
    assert (tmp_path / "report.md").read_text().startswith("# Conversion report")
    assert (tmp_path / "model.safetensors").stat().st_size == report["bytes_after"]
    assert "summary" in result.output


def test_dacnn_convert_subcommand_is_the_same(tmp_path) -> None:
    result = runner.invoke(app, ["convert", *TINY, "--dry-run", "--out", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    assert "dry run: nothing written" in result.output
    assert not (tmp_path / "x").exists()


def test_offline_pretrained_weights_fail_in_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    result = runner.invoke(convert_app, ["resnet18", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "--weights none" in result.output and "--weights PATH" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["resnet18", "--mode", "bogus"], 2, "bogus"),
        (["resnt18", "--weights", "none"], 1, "Did you mean: resnet18"),
        ([*TINY, "--regulators", "9"], 2, "out of range"),
        ([*TINY, "--input-size", "abc"], 2, "--input-size"),
        (["tests.models:no_conv", "--weights", "none", "--input-size", "16"], 1, "no nn.Conv2d"),
        ([*TINY[:1], "--weights", "/nonexistent.pt"], 1, "does not exist"),
    ],
)
def test_bad_input_exit_codes(args, code, text) -> None:
    result = runner.invoke(convert_app, args)
    assert result.exit_code == code, result.output
    assert text in result.output
    assert "Traceback" not in result.output


def test_weights_path_of_wrong_model_is_refused(tmp_path) -> None:
    from safetensors.torch import save_file

    from .models import TinyResNet

    state = TinyResNet(num_classes=3).state_dict()
    save_file(state, str(tmp_path / "w.safetensors"))
    result = runner.invoke(convert_app, [*TINY, "--weights", str(tmp_path / "w.safetensors"), "--num-classes", "10"])
    assert result.exit_code == 1
    assert "fc.weight" in result.output and "num-classes" in result.output


def test_no_shareable_group_exits_zero_with_warning(tmp_path) -> None:
    result = runner.invoke(convert_app, [*TINY, "--mode", "none", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "warning" in result.output
    assert json.loads((tmp_path / "report.json").read_text())["ratio"] == 1.0


def test_help_documents_every_option() -> None:
    result = runner.invoke(convert_app, ["--help"])
    for opt in (
        "--mode",
        "--regulators",
        "--regulator-style",
        "--init",
        "--weights",
        "--num-classes",
        "--input-size",
        "--out",
        "--dry-run",
        "--leaf-module",
        "--dtype",
    ):
        assert opt in result.output


SYN = ["--dataset", "synthetic", "--epochs", "1", "--limit-batches", "2", "--precision", "fp32"]


def test_distill_train_eval_on_synthetic_data(tmp_path) -> None:
    result = runner.invoke(
        app, ["train", "tests.models:tiny_resnet", "--input-size", "16", "--out", str(tmp_path / "t"), *SYN]
    )
    assert result.exit_code == 0, result.output
    teacher = tmp_path / "t" / "best.safetensors"
    result = runner.invoke(
        app,
        [
            "distill",
            "tests.models:tiny_resnet",
            "--weights",
            str(teacher),
            "--input-size",
            "16",
            "--regulators",
            "all",
            "--calib-batches",
            "2",
            "--out",
            str(tmp_path / "s"),
            "--plot",
            "--feature-loss",
            "mse",
            *SYN,
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["conversion"]["init"] == "act-seq"  # the default for mix when data is given
    for key in ("teacher_acc", "converted_acc", "calibrated_acc", "finetuned_acc"):
        assert 0.0 <= report[key] <= 1.0, key
    assert report["drop"] == pytest.approx(report["teacher_acc"] - report["finetuned_acc"])
    assert (tmp_path / "s" / "metrics.csv").is_file() and (tmp_path / "s" / "state.pt").is_file()
    # resuming a finished run trains nothing more and reports the same final accuracy
    again = runner.invoke(
        app,
        [
            "distill",
            "tests.models:tiny_resnet",
            "--weights",
            str(teacher),
            "--input-size",
            "16",
            "--regulators",
            "all",
            "--calib-batches",
            "2",
            "--out",
            str(tmp_path / "s"),
            "--resume",
            *SYN,
        ],
    )
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "s" / "report.json").read_text())["finetuned_acc"] == report["finetuned_acc"]
    # --json: one document on stdout, nothing else
    student = [str(tmp_path / "s" / "model.safetensors"), "--model", "tests.models:tiny_resnet", "--json"]
    ev = runner.invoke(app, ["eval", *student, "--dataset", "synthetic", "--input-size", "16", "--limit-batches", "1"])
    assert ev.exit_code == 0, ev.output
    doc = json.loads(ev.stdout)
    assert 0.0 <= doc["top1"] <= 1.0 and doc["images"] > 0 and doc["dataset"] == "synthetic"
    lat = runner.invoke(app, ["latency", *student, "--batch", "1", "--repeats", "1"])
    assert lat.exit_code == 0, lat.output
    rows = json.loads(lat.stdout)["rows"]
    assert {r["model"] for r in rows} == {"original", "anchored", "anchored+reg"}
    assert all(r["median_ms"] > 0 for r in rows) and rows[0]["vs_original"] == pytest.approx(1.0)


def _macs_saved(plan: dict) -> int:
    from dacnn_convert import Plan

    return Plan.from_dict(plan).macs_saved


def test_plan_json_is_the_plan_and_the_search_and_version_prints() -> None:
    result = runner.invoke(app, ["plan", *TINY, "--target-ratio", "1.5", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["params_after"] <= doc["params_before"] / 1.5 and doc["plan"]["mode"] == "budget"
    assert doc["search"]["target"] == int(doc["params_before"] / 1.5) and doc["search"]["options"]
    assert doc["macs_after"] == doc["macs_before"] - _macs_saved(doc["plan"])
    by_mode = json.loads(runner.invoke(app, ["plan", *TINY, "--mode", "mix", "--json"]).stdout)
    assert by_mode["search"] is None and by_mode["plan"]["groups"]
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.stdout.startswith("dacnn-convert ")


def test_act_init_without_data_is_a_usage_error() -> None:
    result = runner.invoke(convert_app, [*TINY, "--init", "act"])
    assert result.exit_code == 2 and "--dataset" in result.output


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path) -> None:
    import os
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29533",
        "-m",
        "dacnn_convert.cli",
        "distill",
        "tests.models:tiny_resnet",
        "--weights",
        "none",
        "--input-size",
        "16",
        "--calib-batches",
        "1",
        "--out",
        str(tmp_path),
        *SYN,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=os.getcwd())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (tmp_path / "model.safetensors").is_file()
    assert done.stdout.count("accuracy teacher") == 1  # rank 0 alone reports


def test_timm_offline_fails_fast_without_hub_retries(tmp_path, monkeypatch) -> None:
    import socket
    import time

    def unreachable(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    result = runner.invoke(convert_app, ["timm:resnet18", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1, result.output
    assert "--weights none" in result.output
    assert time.perf_counter() - start < 20  # huggingface_hub alone would retry for ~45 s


# -- issue 14: choices, help speed, one set of fine-tune options and defaults, the reported bugs --


@pytest.mark.parametrize(
    ("command", "flag", "value"),
    [
        (["convert"], "--optimizer", "foo"),
        (["convert"], "--schedule", "linear"),
        (["convert"], "--precision", "fp8"),
        (["convert"], "--augment", "mixup"),
        (["convert"], "--metric", "mse"),
        (["train"], "--optimizer", "sgdd"),
        (["bench"], "--precision", "half"),
    ],
)
def test_every_choice_is_validated_up_front(command, flag, value) -> None:
    args = [*command, *TINY, flag, value, "--dry-run"] if command == ["convert"] else [*command, *TINY, flag, value]
    if command == ["bench"]:
        args += ["--dataset", "synthetic"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert value in result.output and "is not one of" in result.output


def test_help_lists_the_valid_choices() -> None:
    out = runner.invoke(convert_app, ["--help"], env={"COLUMNS": "200"}).output
    for choices in ("sgd", "adamw", "adagrad", "cosine", "step", "fp32", "bf16", "fp16", "flip"):
        assert choices in out


def test_help_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, dacnn_convert.cli; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


FINETUNE_FLAGS = {
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "schedule",
    "warmup_steps",
    "weight_decay",
    "kd_temperature",
    "kd_alpha",
    "label_smoothing",
    "clip_grad",
    "calib_batches",
    "precision",
    "channels_last",
    "augment",
    "limit_batches",
    "train_limit",
    "seed",
    "download",
}


def _params(command) -> dict:
    import inspect

    return {n: p.default for n, p in inspect.signature(command).parameters.items()}


def test_bench_has_the_same_fine_tune_options_and_defaults_as_convert() -> None:
    from dacnn_convert.cli.bench import bench_command
    from dacnn_convert.cli.convert import convert_command
    from dacnn_convert.train import TrainConfig

    convert, bench = _params(convert_command), _params(bench_command)
    assert FINETUNE_FLAGS <= set(convert) and FINETUNE_FLAGS <= set(bench)
    for flag in FINETUNE_FLAGS - {"epochs"}:
        assert convert[flag] == bench[flag], flag
    ft = TrainConfig.finetune()  # ... and as distill() in Python
    assert (convert["lr"], convert["warmup_steps"]) == (ft.lr, ft.warmup_steps)


def test_dtype_is_kept_when_a_dataset_is_given(tmp_path) -> None:
    from safetensors import safe_open

    result = runner.invoke(
        convert_app, [*TINY, "--dtype", "fp16", "--calib-batches", "1", "--out", str(tmp_path), *SYN]
    )
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata()["dtype"] == "fp16"
        assert f.get_tensor(next(k for k in f.keys() if k.endswith("conv1.weight"))).dtype == torch.float16


@pytest.mark.parametrize("init", ["act-seq", "fit"])
def test_budget_mode_keeps_the_init_the_user_gave(init) -> None:
    result = runner.invoke(
        convert_app,
        [*TINY, "--target-ratio", "1.5", "--dataset", "synthetic", "--init", init, "--dry-run", "--limit-batches", "2"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert f"init {init}" in " ".join(result.output.split())  # the plan's title, however rich wraps it


def test_checkpoints_get_the_umask_permissions_and_are_fsynced(tmp_path, monkeypatch) -> None:
    import os

    from dacnn_convert import save
    from dacnn_convert.train.state import save_state as _save_state

    from .models import TinyResNet

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    old = os.umask(0o022)
    try:
        path = save(TinyResNet(), tmp_path / "m.safetensors")
        state = _save_state(tmp_path / "state.pt", {"x": torch.zeros(1)})
    finally:
        os.umask(old)
    for p in (path, state):
        assert (p.stat().st_mode & 0o777) == 0o644  # 0666 & ~umask, not mkstemp's 0600
    assert len(synced) >= 4  # each file's data and its folder entry
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "state.pt"]  # no temp files left


def test_report_table_never_cuts_a_number_at_80_columns(tmp_path, monkeypatch) -> None:
    from dacnn_convert.cli.common import console

    args = ["resnet18", "--weights", "none", "--num-classes", "10", "--input-size", "32", "--out", str(tmp_path / "r")]
    # as a CI log or a small terminal; the console's own unset width (read from COLUMNS) comes back after
    monkeypatch.setattr(console, "_width", 80)
    result = runner.invoke(convert_app, [*args, "--mode", "mix", "--regulators", "all"])
    assert result.exit_code == 0, result.output
    assert "1,769,472" in result.stdout and "7,077,888" in result.stdout and "…" not in result.stdout
    assert "left out at 80 columns: energy" in result.stdout


def test_every_help_example_parses_with_its_command() -> None:
    import shlex

    import typer

    from dacnn_convert.cli import EXAMPLES

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    assert set(EXAMPLES) <= set(commands)
    for name, example in EXAMPLES.items():
        words = shlex.split(example)
        assert words[:2] == ["dacnn", name], example
        commands[name].make_context(name, words[2:])  # unknown flags or bad values raise here
