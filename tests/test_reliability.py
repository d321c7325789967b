"""The bad-input matrix of docs/reliability.md, one test per row, and fault injection.

Every row: a one-line error, exit 1 (2 for usage errors), no traceback, and no output
folder left behind. Fault injection: disk full while saving, Ctrl-C, SIGKILL at random
steps, NaN in the loss.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dacnn_convert import anchor, save
from dacnn_convert.cli import app, convert_app
from dacnn_convert.errors import OutputError, UsageError
from dacnn_convert.train import TrainConfig, make_loaders, train
from dacnn_convert.train.state import NonFiniteLossError

from .faults import Killed, kill_after
from .models import NanAfter, TinyResNet, TinyVGG

runner = CliRunner()
TINY = ["tests.models:tiny_resnet", "--weights", "none", "--input-size", "16"]


class Evil:
    """Unpickling this runs code: weights_only loading must refuse it before it does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _files(tmp: Path) -> dict[str, Path]:
    """Weights files broken in every way the matrix lists."""
    good = TinyResNet().state_dict()
    save_file(good, str(tmp / "good.safetensors"))
    blob = (tmp / "good.safetensors").read_bytes()
    (tmp / "truncated.safetensors").write_bytes(blob[: len(blob) // 2])
    (tmp / "garbage.safetensors").write_bytes(b"this is not a safetensors file at all")
    torch.save([1, 2, 3], tmp / "list.pt")
    save_file(TinyVGG().state_dict(), str(tmp / "vgg.safetensors"))
    save_file(TinyResNet(num_classes=3).state_dict(), str(tmp / "three.safetensors"))
    with (tmp / "evil.pt").open("wb") as f:
        pickle.dump({"conv1.weight": Evil(str(tmp / "pwned"))}, f, protocol=2)
    os.mkfifo(tmp / "fifo.safetensors")
    (tmp / "latin1.yaml").write_bytes("model: r\xe9snet\n".encode("latin-1"))
    (tmp / "deep.yaml").write_text("model: " + "[" * 5000 + "]" * 5000 + "\n")
    return {p.stem: p for p in tmp.iterdir()}


def _recipe(tmp: Path, text: str) -> list[str]:
    path = tmp / "recipe.yaml"
    path.write_text("model: tests.models:tiny_resnet\nweights: none\ninput_size: '16'\n" + text)
    return ["--recipe", str(path)]


SYNTH = ["--dataset", "synthetic", "--epochs", "1", "--limit-batches", "1"]

# (row name, command builder given tmp_path and the broken files, exit code, text in the error)
MATRIX = [
    ("unknown model name", lambda t, f: ["resnt18", "--weights", "none"], 1, "Did you mean: resnet18"),
    (
        "model fails to trace",
        lambda t, f: ["tests.models:untraceable", "--weights", "none", "--input-size", "16"],
        1,
        "--leaf-module tests.models.Gate",
    ),
    (
        "model without Conv2d",
        lambda t, f: ["tests.models:no_conv", "--weights", "none", "--input-size", "16"],
        1,
        "no nn.Conv2d",
    ),
    (
        "input size too small",
        lambda t, f: ["tests.models:tiny_vgg", "--weights", "none", "--input-size", "1"],
        1,
        "too small",
    ),
    ("weights file missing", lambda t, f: [*TINY[:1], "--weights", str(t / "nope.safetensors")], 1, "does not exist"),
    (
        "weights not a state dict",
        lambda t, f: [*TINY[:1], "--weights", str(f["list"]), "--input-size", "16"],
        1,
        "state dict",
    ),
    (
        "weights of another architecture",
        lambda t, f: [*TINY[:1], "--weights", str(f["vgg"]), "--input-size", "16"],
        1,
        "conv1.weight",
    ),
    (
        "weights with another num_classes",
        lambda t, f: [*TINY[:1], "--weights", str(f["three"]), "--input-size", "16", "--num-classes", "10"],
        1,
        "num-classes",
    ),
    (
        "weights file truncated",
        lambda t, f: [*TINY[:1], "--weights", str(f["truncated"]), "--input-size", "16"],
        1,
        "safetensors",
    ),
    (
        "not safetensors despite the suffix",
        lambda t, f: [*TINY[:1], "--weights", str(f["garbage"]), "--input-size", "16"],
        1,
        "safetensors",
    ),
    (
        ".pt pickle that runs code",
        lambda t, f: [*TINY[:1], "--weights", str(f["evil"]), "--input-size", "16"],
        1,
        "weights_only",
    ),
    ("recipe with an unknown key", lambda t, f: _recipe(t, "epoch: 3\n"), 2, "Did you mean: epochs"),
    ("recipe with a wrong type", lambda t, f: _recipe(t, "epochs: three\n"), 2, "epochs must be an integer"),
    ("recipe with negative epochs", lambda t, f: _recipe(t, "epochs: -2\n"), 2, "epochs must be >= 1"),
    ("dataset missing offline", lambda t, f: [*TINY, "--dataset", "cifar10"], 1, "--download"),
    ("--regulators 9 on a 2-section net", lambda t, f: [*TINY, "--regulators", "9"], 2, "out of range"),
    (
        "--precision fp16 on CPU",
        lambda t, f: [*TINY, "--dataset", "synthetic", "--precision", "fp16"],
        2,
        "needs a CUDA device",
    ),
    ("output folder not writable", lambda t, f: [*TINY, "--out", str(f["good"] / "sub")], 1, "cannot write"),
    # numbers a user types: zero, NaN, infinity, overflow and out-of-range values get one line naming the range
    ("--kd-temperature 0", lambda t, f: [*TINY, *SYNTH, "--kd-temperature", "0"], 2, "kd_temperature must be > 0"),
    ("--lr inf", lambda t, f: [*TINY, *SYNTH, "--lr", "inf"], 2, "lr must be a finite number"),
    ("--lr nan", lambda t, f: [*TINY, *SYNTH, "--lr", "nan"], 2, "lr must be a finite number"),
    ("--kd-alpha 2", lambda t, f: [*TINY, *SYNTH, "--kd-alpha", "2"], 2, "kd_alpha must be [0, 1]"),
    ("--weight-decay inf", lambda t, f: [*TINY, *SYNTH, "--weight-decay", "inf"], 2, "must be a finite number"),
    ("--seed -1", lambda t, f: [*TINY, *SYNTH, "--seed", "-1"], 2, "seed must be >= 0"),
    ("--target-ratio 0", lambda t, f: [*TINY, "--target-ratio", "0"], 2, "--target-ratio must be > 1, got 0"),
    ("--target-params -5", lambda t, f: [*TINY, "--target-params", "-5"], 2, "--target-params must be >= 1, got -5"),
    ("--target-bytes 1e999", lambda t, f: [*TINY, "--target-bytes", "1e999"], 2, "must be a finite size"),
    ("--num-classes 0", lambda t, f: [*TINY, "--num-classes", "0"], 2, "--num-classes must be from 1 to 1,000,000"),
    ("--input-size 99999999", lambda t, f: [*TINY[:3], "--input-size", "99999999"], 2, "out of range"),
    ("--input-size 3x-1x16", lambda t, f: [*TINY[:3], "--input-size", "3x-1x16"], 2, "each >= 1"),
    ("--bank-size nan", lambda t, f: [*TINY, "--mode", "bank", "--bank-size", "nan"], 2, "is not a bank size"),
    # files that are not what they should be
    (
        "weights is a directory",
        lambda t, f: [*TINY[:1], "--weights", str(t), "--input-size", "16"],
        1,
        "is a directory",
    ),
    ("weights is a FIFO", lambda t, f: [*TINY[:1], "--weights", str(f["fifo"]), "--input-size", "16"], 1, "is a FIFO"),
    ("recipe is a directory", lambda t, f: ["--recipe", str(t)], 2, "is a directory"),
    ("recipe value not finite", lambda t, f: _recipe(t, "lr: .inf\n"), 2, "lr must be a finite number"),
    ("recipe not UTF-8", lambda t, f: ["--recipe", str(f["latin1"])], 2, "not UTF-8"),
    ("recipe nested absurdly deep", lambda t, f: ["--recipe", str(f["deep"])], 2, "flat mapping"),
]


@pytest.mark.parametrize(("row", "build", "code", "text"), MATRIX, ids=[m[0] for m in MATRIX])
def test_bad_input_matrix(tmp_path, monkeypatch, row, build, code, text) -> None:
    monkeypatch.setenv("DACNN_DATA", str(tmp_path / "data"))  # no datasets here
    files = _files(tmp_path)
    args = build(tmp_path, files)
    out = tmp_path / "out"
    if "--out" not in args:
        args = [*args, "--out", str(out)]
    result = runner.invoke(convert_app, args)
    assert result.exit_code == code, result.output
    assert text in result.output
    assert "Traceback" not in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0] == result.output.strip().splitlines()[-1]  # one line, last
    assert not out.exists()  # no partial output
    assert not (tmp_path / "pwned").exists()  # no code ran from a data file


def test_cuda_requested_but_absent(tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = save(
        anchor(TinyResNet(), input_size=(3, 16, 16)), tmp_path / "m.safetensors", source="tests.models:tiny_resnet"
    )
    result = runner.invoke(app, ["latency", str(path), "--device", "cuda", "--model", "tests.models:tiny_resnet"])
    assert result.exit_code == 2 and "no CUDA device" in result.output and "Traceback" not in result.output


def _disk_full_after(nbytes: int):
    """A writer that writes ``nbytes`` of the file, then fails as a full disk does."""

    def write(*args, **kwargs) -> None:
        path = next(a for a in (*args, *kwargs.values()) if isinstance(a, (str, Path)))
        Path(path).write_bytes(b"\0" * nbytes)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    return write


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    path = save(TinyResNet(), tmp_path / "model.safetensors")
    before = path.read_bytes()
    monkeypatch.setattr("safetensors.torch.save_file", _disk_full_after(100))
    with pytest.raises(OutputError, match="No space left on device.*previous file there is intact"):
        save(TinyResNet(), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temp file left


def test_disk_full_while_checkpointing_training_keeps_the_last_state(tmp_path, monkeypatch) -> None:
    loaders = make_loaders("synthetic", batch_size=64, input_size=16)
    cfg = TrainConfig(epochs=1, precision="fp32", checkpoint_every=2)
    with pytest.raises(Killed):
        train(TinyResNet(), loaders.train, loaders.val, cfg, out=tmp_path, on_step=kill_after(2))
    state = (tmp_path / "state.pt").read_bytes()
    monkeypatch.setattr(torch, "save", _disk_full_after(10))
    with pytest.raises(OutputError, match="state.pt"):
        train(TinyResNet(), loaders.train, loaders.val, cfg, out=tmp_path, resume=True)
    assert (tmp_path / "state.pt").read_bytes() == state
    assert not (tmp_path / ".state.pt.tmp").exists()


def test_nan_in_the_loss_names_the_step_and_the_last_good_checkpoint(tmp_path) -> None:
    loaders = make_loaders("synthetic", batch_size=64, input_size=16)
    model = NanAfter(TinyResNet(), after=5)
    cfg = TrainConfig(epochs=2, precision="fp32", checkpoint_every=2)
    with pytest.raises(NonFiniteLossError, match=f"step 5; the last good checkpoint is {tmp_path / 'state.pt'}"):
        train(model, loaders.train, loaders.val, cfg, out=tmp_path)
    assert torch.load(tmp_path / "state.pt", weights_only=True)["step"] == 4  # the last checkpoint before the NaN


TRAIN = [
    sys.executable,
    "-m",
    "dacnn_convert.cli",
    "train",
    "tests.models:tiny_resnet",
    "--dataset",
    "synthetic",
    "--input-size",
    "16",
    "--epochs",
    "6",
    "--batch-size",
    "32",
    "--lr",
    "0.05",
    "--precision",
    "fp32",
    "--checkpoint-every",
    "1",
]


def _start(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*TRAIN, "--out", str(out), *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_for_training(proc: subprocess.Popen, state: Path, old_step: int) -> None:
    """Until the run has written a checkpoint past ``old_step`` (so a kill lands mid-training)."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if torch.load(state, weights_only=True)["step"] > old_step:
                return
        except (FileNotFoundError, RuntimeError, EOFError, KeyError):
            pass
        time.sleep(0.05)


def _final(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "last.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("reference")
    proc = _start(out)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    return _final(out)


@pytest.mark.slow
def test_sigkill_at_five_random_steps_then_resume_matches_an_uninterrupted_run(tmp_path, reference) -> None:
    rng = random.Random(0)
    out = tmp_path / "run"
    step, kills = 0, 0
    while kills < 5:
        proc = _start(out, *(["--resume"] if kills else []))
        _wait_for_training(proc, out / "state.pt", step)
        time.sleep(rng.uniform(0.0, 0.4))  # anywhere: mid-step, mid-checkpoint-write, mid-evaluation
        if proc.poll() is not None:
            break  # finished before the kill: no more kill points available
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = torch.load(out / "state.pt", weights_only=True)  # never corrupt
        assert state["step"] >= step
        step, kills = state["step"], kills + 1
    assert kills == 5, "the run finished before five kills; make it longer"
    proc = _start(out, "--resume")
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    final = _final(out)
    for key, value in reference.items():  # resume is exact, so "within noise" is "equal"
        torch.testing.assert_close(final[key], value, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_save_a_checkpoint_and_say_how_to_resume(tmp_path, reference, sig, code) -> None:
    out = tmp_path / "run"
    proc = _start(out)
    _wait_for_training(proc, out / "state.pt", 3)
    proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == code, output
    assert f"interrupted ({signal.Signals(sig).name})" in output
    assert "at epoch" in output and "--resume" in output and "Traceback" not in output
    assert torch.load(out / "state.pt", weights_only=True)["step"] > 3
    proc = _start(out, "--resume")
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    for key, value in reference.items():
        torch.testing.assert_close(_final(out)[key], value, rtol=0, atol=0)


def test_a_finished_run_is_never_overwritten_unless_asked(tmp_path) -> None:
    from dacnn_convert.cli import app

    run = tmp_path / "t"
    args = [
        "train",
        "tests.models:tiny_resnet",
        "--input-size",
        "16",
        "--dataset",
        "synthetic",
        "--epochs",
        "1",
        "--limit-batches",
        "1",
        "--precision",
        "fp32",
        "--out",
        str(run),
    ]
    assert CliRunner().invoke(app, args).exit_code == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--resume" in again.output and "--overwrite" in again.output, again.output
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing touched
    assert CliRunner().invoke(app, [*args, "--resume"]).exit_code == 0
    replaced = CliRunner().invoke(app, [*args, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert len((run / "metrics.csv").read_text().splitlines()) == 2  # header + one epoch: nothing appended


def test_a_conversion_never_overwrites_its_own_input(tmp_path) -> None:
    from dacnn_convert.cli import app

    run = tmp_path / "t"
    CliRunner().invoke(
        app,
        [
            "train",
            "tests.models:tiny_resnet",
            "--input-size",
            "16",
            "--dataset",
            "synthetic",
            "--epochs",
            "1",
            "--limit-batches",
            "1",
            "--out",
            str(run),
        ],
    )
    teacher = (run / "best.safetensors").read_bytes()
    for extra in ([], ["--overwrite"]):
        result = CliRunner().invoke(
            app,
            [
                "convert",
                "tests.models:tiny_resnet",
                "--weights",
                str(run / "best.safetensors"),
                "--input-size",
                "16",
                "--dataset",
                "synthetic",
                "--epochs",
                "1",
                "--limit-batches",
                "1",
                "--out",
                str(run),
                *extra,
            ],
        )
        assert result.exit_code == 2 and "own input" in result.output, result.output
    assert (run / "best.safetensors").read_bytes() == teacher


def test_a_library_error_names_python_keywords_and_the_cli_names_flags() -> None:
    from dacnn_convert.errors import UsageError

    exc = UsageError("give «budget» or «match», or «dataset»; «precision=fp16» needs CUDA; use «overwrite»")
    assert str(exc) == "give budget= or match=, or calib_loader=; precision='fp16' needs CUDA; use resume=False"
    assert exc.cli_message() == "give --budget or --match, or --dataset; --precision fp16 needs CUDA; use --overwrite"


def test_latency_of_batch_zero_is_refused_not_reported() -> None:
    from dacnn_convert import measure_latency

    with pytest.raises(UsageError, match="latency needs batch= >= 1"):
        measure_latency(TinyResNet(), (3, 16, 16), batch=0)


def test_limit_batches_caps_the_validation_of_a_fine_tune_too(monkeypatch) -> None:
    from dacnn_convert.train import TrainConfig, loop, make_loaders, train

    seen: list[int | None] = []
    real = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda m, b, p, limit=None: seen.append(limit) or real(m, b, p, limit))
    loaders = make_loaders("synthetic", batch_size=16, input_size=16)
    train(TinyResNet(), loaders.train, loaders.val, TrainConfig(epochs=1, precision="fp32", limit_batches=2))
    assert seen == [2]  # the accuracy compared with the teacher's is measured on the same capped set


def test_eval_warns_when_the_model_has_other_classes_than_the_dataset(tmp_path) -> None:
    student = anchor(TinyResNet(num_classes=1000), input_size=(3, 16, 16))
    path = save(student, tmp_path / "k.safetensors", source="tests.models:tiny_resnet")
    args = ["eval", str(path), "--dataset", "synthetic", "--limit-batches", "1", "--input-size", "16"]
    result = runner.invoke(app, [*args, "--model", "tests.models:tiny_resnet"])
    assert result.exit_code == 0, result.output
    assert "warning: the model has 1000 outputs and synthetic 10 classes" in result.output
