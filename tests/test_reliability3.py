"""Reliability round 3 (issue 23): no file overwritten unasked, a folder written by one run at a time.

Rows 69-76 of docs/reliability.md. Each checks the exit code, one line, and that no existing
file changed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from dacnn_convert import anchor, save
from dacnn_convert.cli import app, convert_app
from dacnn_convert.cli.guards import LOCK

from .models import TinyResNet

runner = CliRunner()
SOURCE = ["--model", "tests.models:tiny_resnet"]
TRAIN = ["train", "tests.models:tiny_resnet", "--dataset", "synthetic", "--input-size", "16"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _one_error(output: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output and sum(line.startswith("error:") for line in lines) == 1, output


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_export_never_writes_over_its_own_input(checkpoint: Path, extra: list[str]) -> None:
    before = _snapshot(checkpoint.parent)
    args = ["export", str(checkpoint), "--format", "safetensors", "--dtype", "int8", "--out", str(checkpoint)]
    result = runner.invoke(app, [*args, *SOURCE, *extra])
    assert result.exit_code == 2 and "own input" in result.output, result.output
    _one_error(result.output)
    assert _snapshot(checkpoint.parent) == before  # the fp32 checkpoint was not replaced by its int8 copy


def test_export_replaces_an_existing_file_only_with_overwrite(checkpoint: Path, tmp_path: Path) -> None:
    other = tmp_path / "notes.onnx"
    other.write_text("not ours")
    args = ["export", str(checkpoint), "--format", "torchscript", "--out", str(other), *SOURCE]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--overwrite" in result.output, result.output
    _one_error(result.output)
    assert other.read_text() == "not ours"
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert other.read_bytes()[:2] == b"PK"  # a TorchScript archive now


def test_export_to_a_folder_is_one_line(checkpoint: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", str(checkpoint), "--out", str(tmp_path), *SOURCE])
    assert result.exit_code == 2 and "is a folder" in result.output, result.output
    _one_error(result.output)


def test_a_conversion_into_a_folder_with_a_readme_does_not_replace_it(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("# my project\n")
    before = _snapshot(tmp_path)
    args = ["convert", "tests.models:tiny_resnet", "--weights", "none", "--input-size", "16", "--out", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "README.md" in result.output and "--overwrite" in result.output, result.output
    _one_error(result.output)
    assert _snapshot(tmp_path) == before
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / LOCK).exists()


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_first(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (out / LOCK).write_text(f"{holder.pid} {socket.gethostname()} tok dacnn-convert resnet18 --out {out}")
        args = ["convert", "tests.models:tiny_resnet", "--weights", "none", "--input-size", "16", "--out", str(out)]
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and f"process {holder.pid}" in result.output, result.output
        _one_error(result.output)
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # the first run's lock is left alone
    finally:
        holder.kill()
        holder.wait()
    # its process is gone: the lock is stale and taken over
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and not (out / LOCK).exists()


def test_a_garbled_lock_counts_as_held_and_says_how_to_remove_it(tmp_path: Path) -> None:
    (tmp_path / LOCK).write_text("")  # a run between creating and writing its lock would look like this
    args = ["convert", "tests.models:tiny_resnet", "--weights", "none", "--input-size", "16", "--out", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "remove" in result.output and LOCK in result.output, result.output
    _one_error(result.output)


def test_a_refused_run_never_removes_the_folder_of_the_run_that_holds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    from dacnn_convert.cli import guards
    from dacnn_convert.errors import UsageError

    out = tmp_path / "new"  # absent when this run starts; the first run creates it right after
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    writable = guards.check_writable

    def first_run_starts_meanwhile(folder: Path) -> None:
        writable(folder)
        (folder / LOCK).write_text(f"{holder.pid} {socket.gethostname()} tok the first run")
        (folder / "partial.bin").write_bytes(b"the first run's work")

    monkeypatch.setattr(guards, "check_writable", first_run_starts_meanwhile)
    try:
        with pytest.raises(UsageError, match=f"process {holder.pid}"):
            with guards.output_guard(out):
                pass
        assert (out / "partial.bin").is_file() and (out / LOCK).is_file()  # was: the whole folder removed
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture()
def evil_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A recipe naming a module in the working folder whose import writes a marker file."""
    (tmp_path / "evilmod.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('pwned').write_text('ran')\n"
        "from tests.models import tiny_resnet as make\n"
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: convert\nmodel: evilmod:make\nweights: none\ninput_size: '16'\nmode: mix\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1]))  # tests.models stays importable
    return recipe


@pytest.mark.parametrize(
    "command",
    [
        lambda r: (app, ["convert", "--recipe", str(r), "--dry-run"]),
        lambda r: (app, ["recipe", "run", str(r)]),
        lambda r: (app, ["convert", "--recipe", str(r)]),
    ],
)
def test_a_recipe_alone_never_imports_user_code(evil_recipe: Path, command) -> None:
    cli, args = command(evil_recipe)
    result = runner.invoke(cli, args)
    assert result.exit_code == 2 and "user code" in result.output and "evilmod:make" in result.output, result.output
    _one_error(result.output)
    assert not (evil_recipe.parent / "pwned").exists()


def test_a_model_named_on_the_command_line_replaces_the_recipes_and_its_code_is_never_imported(
    evil_recipe: Path,
) -> None:
    args = ["recipe", "run", str(evil_recipe), "--model", "tests.models:tiny_resnet", "--dataset", "synthetic"]
    result = runner.invoke(app, [*args, "--epochs", "1", "--limit-batches", "1", "--out", "run"])
    assert result.exit_code == 0, result.output
    assert not (evil_recipe.parent / "pwned").exists()


def test_a_recipes_leaf_modules_need_the_command_line_too(evil_recipe: Path) -> None:
    evil_recipe.write_text(evil_recipe.read_text() + "leaf_module: evilmod.Block\n")
    args = ["convert", "tests.models:tiny_resnet", "--recipe", str(evil_recipe), "--dry-run"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--leaf-module" in result.output, result.output
    _one_error(result.output)
    assert not (evil_recipe.parent / "pwned").exists()


def test_a_recipe_naming_user_code_runs_when_the_command_line_names_it_too(evil_recipe: Path) -> None:
    result = runner.invoke(app, ["convert", "evilmod:make", "--recipe", str(evil_recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert (evil_recipe.parent / "pwned").exists()  # consented: the name was given on the command line


def test_a_model_with_nan_outputs_gets_no_accuracy(tmp_path: Path) -> None:
    from dacnn_convert.errors import NonFiniteOutputError
    from dacnn_convert.train import make_loaders
    from dacnn_convert.train.evaluation import evaluate

    model = TinyResNet().eval()
    with torch.no_grad():
        model.bn1.running_var.fill_(-1.0)  # a tampered checkpoint: sqrt of a negative variance
    with pytest.raises(NonFiniteOutputError, match="NaN or infinite on batch 0"):
        evaluate(model, make_loaders("synthetic", batch_size=8, input_size=16).val, "fp32", 1)
    path = save(model, tmp_path / "nan.safetensors")
    args = ["eval", str(path), "--dataset", "synthetic", "--input-size", "16", "--limit-batches", "1", *SOURCE]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "NaN" in result.output and "top-1" not in result.output, result.output
    _one_error(result.output)


def test_an_empty_evaluation_set_is_no_accuracy() -> None:
    from dacnn_convert.errors import UsageError
    from dacnn_convert.train.evaluation import evaluate

    with pytest.raises(UsageError, match="yielded no examples"):
        evaluate(TinyResNet(), [], "fp32")


def test_eval_says_how_many_images_it_scored(checkpoint: Path) -> None:
    args = ["eval", str(checkpoint), "--dataset", "synthetic", "--input-size", "16", "--limit-batches", "1", *SOURCE]
    result = runner.invoke(app, [*args, "--batch-size", "16"])
    assert result.exit_code == 0 and " synthetic validation images" in result.output, result.output
    seen = int(result.output.split(" on ")[1].split()[0].replace(",", ""))
    assert seen >= 1


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["plan", "tests.models:tiny_resnet", "--weights", "none", "--target-ratio", "0.5"], "must be > 1"),
        (
            ["plan", "tests.models:tiny_resnet", "--weights", "none", "--mode", "bank", "--bank-size", "0.5,0.25"],
            "two sizes for every",
        ),
        (["latency", "CKPT", "--batch", "100000", *SOURCE], "at most 4,096"),
    ],
)
def test_numbers_that_would_lie_are_refused_in_one_line(checkpoint: Path, args: list[str], text: str) -> None:
    args = [str(checkpoint) if a == "CKPT" else a for a in args]
    result = runner.invoke(app, [*args, "--input-size", "16"])
    assert result.exit_code == 2 and text in result.output, result.output
    _one_error(result.output)


def test_an_error_without_a_message_still_reads_as_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CI found it: 64 random bytes made torch.load raise with an empty message, and taking the
    message's first line crashed ``dacnn inspect`` with an IndexError."""
    from dacnn_convert.errors import CheckpointError, first_line
    from dacnn_convert.io.inspection import inspect_file

    assert first_line(ValueError()) == "ValueError"
    assert first_line(ValueError("\n  \nsecond")) == "second"
    assert first_line(ValueError("x" * 500), 10) == "x" * 10

    def empty(*args: object, **kwargs: object) -> None:
        raise RuntimeError()

    monkeypatch.setattr(torch, "load", empty)
    (tmp_path / "g.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError, match="RuntimeError"):
        inspect_file(tmp_path / "g.pt")


def test_inspect_refuses_every_garbled_file_cleanly(tmp_path: Path) -> None:
    """Seeded garbage, zip- and pickle-looking prefixes: a CheckpointError each, never a traceback."""
    import random

    from dacnn_convert.errors import CheckpointError
    from dacnn_convert.io.inspection import inspect_file

    rng = random.Random(0)
    prefixes = [b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x05", b"PK\x05\x06" + b"\0" * 18]
    for i in range(200):
        path = tmp_path / f"g{i}.pt"
        path.write_bytes(prefixes[i % len(prefixes)] + rng.randbytes(rng.randrange(0, 96)))
        with pytest.raises(CheckpointError):
            inspect_file(path)


def _tampered(src: Path, dst: Path, entry: str, value: object) -> Path:
    """``src`` with one metadata entry replaced (a dict merged into a JSON-valued entry)."""
    import json
    import struct

    blob = src.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    meta = header["__metadata__"]
    if isinstance(value, dict):
        meta[entry] = json.dumps({**json.loads(meta[entry]), **value})
    else:
        meta[entry] = str(value)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])
    return dst


@pytest.fixture(scope="module")
def torchvision_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    return save(
        anchor(model, input_size=(3, 16, 16)), tmp_path_factory.mktemp("tv") / "m.safetensors", source="resnet18"
    )


TAMPERED = [  # (entry, value, what the one line says)
    ("source", {"kind": "weird"}, "source kind 'weird' is none of"),
    ("source", {"num_classes": 10**12}, "not an integer from 1 to 1,000,000"),
    ("source", {"num_classes": "ten"}, "not an integer from 1 to 1,000,000"),
    ("source", {"name": ""}, "is not a model name"),
    ("source", {"name": "resnet1888"}, "names the model resnet1888, which this installation cannot build"),
    ("source", {"kind": "timm", "name": "hf-hub:timm/resnet18.a1_in1k"}, "would contact the hub"),
    ("plan", {"input_size": [3, 100000, 100000]}, "input_size [3, 100000, 100000] is not three positive sizes"),
    ("plan", {"input_size": 16}, "input_size 16 is not three positive sizes"),
]


@pytest.mark.parametrize(("entry", "value", "text"), TAMPERED, ids=[t[2][:24] for t in TAMPERED])
def test_tampered_metadata_is_one_line_before_anything_is_built(
    torchvision_checkpoint: Path, tmp_path: Path, entry: str, value: dict, text: str
) -> None:
    """Rows 87-88: a kind no source has, a 10^12-class head (it tried to allocate 64 TB), an input
    size of 3x100000x100000 (120 GB), a model name this torchvision lacks (was: a ValueError
    traceback) and a hub name (was: a network call from ``eval``) are refused by eval, latency and load()."""
    from dacnn_convert import load
    from dacnn_convert.errors import CheckpointError

    bad = _tampered(torchvision_checkpoint, tmp_path / "bad.safetensors", entry, value)
    with pytest.raises(CheckpointError, match=re.escape(text)):
        load(bad)
    for argv in (["eval", str(bad), "--dataset", "synthetic", "--limit-batches", "1"], ["latency", str(bad)]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 1, result.output
        _one_error(result.output)
        assert text in " ".join(result.output.split()), result.output


def test_a_hub_or_renamed_source_loads_when_the_skeleton_is_given(torchvision_checkpoint: Path, tmp_path: Path) -> None:
    import torchvision

    from dacnn_convert import load

    bad = _tampered(
        torchvision_checkpoint, tmp_path / "hub.safetensors", "source", {"name": "hf-hub:a/b", "kind": "timm"}
    )
    model = load(bad, model=torchvision.models.resnet18(num_classes=10)).eval()
    assert model(torch.zeros(1, 3, 16, 16)).shape == (1, 10)
    result = runner.invoke(
        app, ["eval", str(bad), "--model", "resnet18", "--dataset", "synthetic", "--limit-batches", "1"]
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("seed", ["1234567890123456789012", "-1", "4294967296"])
def test_a_seed_out_of_range_is_one_line_and_writes_nothing(tmp_path: Path, seed: str) -> None:
    """Row 86: a 22-digit --seed overflowed torch's generator with a traceback."""
    from dacnn_convert.errors import UsageError
    from dacnn_convert.train.config import TrainConfig

    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            *TRAIN,
            "--seed",
            seed,
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 2 and "seed" in result.output and not out.exists(), result.output
    with pytest.raises(UsageError, match=r"seed must be \[0, 4294967295\]"):
        TrainConfig(seed=int(seed))


@pytest.mark.parametrize(
    ("env", "text"),
    [
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a non-negative integer"),
        (
            {"WORLD_SIZE": "2", "RANK": "5", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
            "RANK=5 is not below WORLD_SIZE=2",
        ),
        ({"WORLD_SIZE": "\u00b2"}, "is not a non-negative integer"),  # "²" passes str.isdigit()
        (
            {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "99999"},
            "MASTER_PORT=99999 is not a TCP port",
        ),
        (  # the rendezvous waited 30 minutes for it
            {
                "WORLD_SIZE": "2",
                "RANK": "0",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "no.such.host.invalid",
                "MASTER_PORT": "1",
            },
            "MASTER_ADDR='no.such.host.invalid' does not resolve",
        ),
    ],
)
def test_a_broken_torchrun_environment_is_one_line_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], text: str
) -> None:
    """Row 89: WORLD_SIZE=2 left in a shell without torchrun's other variables was a traceback from
    torch.distributed's rendezvous, after the run folder had been created."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    args = [
        *TRAIN,
        "--limit-batches",
        "1",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    _one_error(result.output)
    assert text in " ".join(result.output.split()) and not out.exists(), result.output


@pytest.mark.parametrize("fraction", [0.8, 0.6])
def test_a_byte_target_bounds_the_file_written_not_only_its_parameters(tmp_path: Path, fraction: float) -> None:
    """Row 91: --target-bytes counted 4 bytes per parameter and nothing else, and the file came out
    over the target (BatchNorm statistics and the plan's metadata are stored too)."""
    from dacnn_convert.errors import UsageError

    torch.manual_seed(0)
    model = TinyResNet()
    full = save(model, tmp_path / "full.safetensors").stat().st_size
    target = int(full * fraction)
    written = save(anchor(model, target_bytes=target, input_size=(3, 16, 16)), tmp_path / "m.safetensors")
    assert written.stat().st_size <= target
    with pytest.raises(UsageError, match="leaves nothing for parameters: a file of this model holds about"):
        anchor(model, target_bytes=full // 4, input_size=(3, 16, 16))


def _finished_run(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    args = [*TRAIN, "--epochs", "1"]
    result = runner.invoke(app, [*args, "--limit-batches", "2", "--precision", "fp32", "--out", str(out)])
    assert result.exit_code == 0 and (out / "state.pt").is_file(), result.output
    return out


def test_resume_and_overwrite_together_is_one_line_and_changes_nothing(tmp_path: Path) -> None:
    """Row 92: --resume --overwrite resumed and ignored --overwrite silently."""
    out = _finished_run(tmp_path)
    before = _snapshot(out)
    args = [*TRAIN, "--epochs", "2"]
    result = runner.invoke(app, [*args, "--out", str(out), "--resume", "--overwrite"])
    assert result.exit_code == 2 and "give one of them" in result.output, result.output
    assert _snapshot(out) == before


def test_resume_on_other_data_is_refused_naming_both(tmp_path: Path) -> None:
    """Row 93: a run resumed with another --dataset went on silently on the new data."""
    out = _finished_run(tmp_path)
    before = _snapshot(out)
    args = ["train", "tests.models:tiny_resnet", "--dataset", "fashion-mnist", "--input-size", "16", "--epochs", "2"]
    result = runner.invoke(app, [*args, "--limit-batches", "2", "--precision", "fp32", "--out", str(out), "--resume"])
    assert result.exit_code == 1, result.output
    _one_error(result.output)
    text = " ".join(result.output.split())
    assert "written training on synthetic: 512 images at 3x16x16 and this run reads fashion-mnist" in text, text
    assert _snapshot(out) == before


def test_an_overwrite_that_fails_keeps_the_run_it_was_to_replace(tmp_path: Path) -> None:
    """Row 94 (data loss): --overwrite removed the old run's files before the new run checked its
    data, so a typo in --dataset cost the previous run. They are now moved aside and put back."""
    out = _finished_run(tmp_path)
    before = _snapshot(out)
    args = ["train", "tests.models:tiny_resnet", "--dataset", f"imagefolder:{tmp_path / 'none'}", "--input-size", "16"]
    result = runner.invoke(app, [*args, "--out", str(out), "--overwrite"])
    assert result.exit_code != 0, result.output
    _one_error(result.output)
    assert _snapshot(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)
    args = [*TRAIN, "--epochs", "1"]
    result = runner.invoke(app, [*args, "--limit-batches", "1", "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not any(p.name.startswith(".dacnn-replaced") for p in out.iterdir())
    assert len((out / "metrics.csv").read_text().splitlines()) == 2  # the new run's row only


def test_brackets_in_paths_and_names_are_printed_as_given(checkpoint: Path, tmp_path: Path) -> None:
    """Row 95: rich read "[/]" in a path or model name as a style tag and crashed (MarkupError), and
    dropped "[v2]" from "model[v2].safetensors", so the path printed was not the file's."""
    odd = tmp_path / "model[v2]"
    odd.mkdir()
    bracketed = odd / "m[b].safetensors"
    bracketed.write_bytes(checkpoint.read_bytes())
    result = runner.invoke(app, ["inspect", str(bracketed)], env={"COLUMNS": "400"})
    assert result.exit_code == 0 and str(bracketed) in result.output, result.output
    for argv in (["inspect", str(tmp_path / "missing[/x].safetensors")], ["plan", "resnet[/]18", "--weights", "none"]):
        result = runner.invoke(app, argv, env={"COLUMNS": "400"})
        assert result.exit_code in (1, 2), result.output
        _one_error(result.output)
        assert "[/" in result.output


@pytest.mark.parametrize(
    ("entry", "value"),
    [
        ("plan", "{not json"),
        ("plan", "[1, 2]"),
        ("plan", '{"groups": [{"name": "g"}]}'),
        ("plan", "[" * 100_000 + "]" * 100_000),
        ("source", "{bad json"),
        ("source", '{"kind": "dacnn", "name": "18-mix", "num_classes": 1000000000000}'),
    ],
    ids=["not-json", "list", "keys-missing", "nested-1e5", "source-not-json", "classes-1e12"],
)
def test_inspect_of_tampered_metadata_is_one_line(checkpoint: Path, tmp_path: Path, entry: str, value: str) -> None:
    """Row 96: inspect parsed the metadata itself and raised JSONDecodeError, KeyError,
    RecursionError or a 10^12-class allocation; it now reads it through the checked path."""
    bad = _tampered(checkpoint, tmp_path / "bad.safetensors", entry, value)
    result = runner.invoke(app, ["inspect", str(bad)])
    assert result.exit_code == 1, result.output
    _one_error(result.output)
    assert "malformed metadata" in result.output


def test_an_allocation_the_machine_cannot_make_is_one_line() -> None:
    """Row 97: a 3x4096x4096 batch of 64 for latency, a 10^12-class head: allocator tracebacks."""
    import typer

    from dacnn_convert.cli.common import handled

    def greedy() -> None:
        raise RuntimeError(
            "[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes."
        )

    def other() -> None:
        raise RuntimeError("a bug")

    with pytest.raises(typer.Exit) as exit_info:
        handled(greedy)()
    assert exit_info.value.exit_code == 1
    with pytest.raises(RuntimeError, match="a bug"):  # anything else is not dressed up as a resource error
        handled(other)()
    result = runner.invoke(
        app, ["plan", *SOURCE[1:], "--weights", "none", "--input-size", "16", "--num-classes", "1000000000000"]
    )
    assert result.exit_code == 2 and "must be from 1 to 1,000,000" in result.output, result.output


def test_resume_from_a_state_that_is_not_a_file_or_a_finished_run_without_its_model(tmp_path: Path) -> None:
    """Row 98: state.pt a folder or FIFO made --resume start from scratch and append duplicate metrics;
    a finished run whose best/last checkpoints were deleted resumed to "wrote None", exit 0."""
    out = _finished_run(tmp_path)
    args = [*TRAIN, "--epochs", "1"]
    args += ["--limit-batches", "2", "--precision", "fp32", "--out", str(out), "--resume"]
    (out / "best.safetensors").unlink()
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "best.safetensors is gone" in " ".join(result.output.split()), result.output
    (out / "state.pt").unlink()
    (out / "state.pt").mkdir()
    before = _snapshot(out)
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "it is not a file" in result.output, result.output
    assert _snapshot(out) == before


@pytest.mark.parametrize("device", ["cuda:abc", "", "tpu"])
def test_plan_checks_the_device_without_data_too(device: str) -> None:
    """Row 99: dacnn plan --device tpu exited 0 (the device was resolved only with --dataset)."""
    result = runner.invoke(app, ["plan", *SOURCE[1:], "--weights", "none", "--input-size", "16", "--device", device])
    assert result.exit_code == 2 and "device" in result.output, result.output


def test_a_model_factory_that_cannot_be_called_or_raises_is_one_line() -> None:
    """Row 100: a factory needing an argument, or raising, was a TypeError traceback."""
    result = runner.invoke(app, ["plan", "tests.models:randomize_bn", "--weights", "none", "--input-size", "16"])
    assert result.exit_code == 1, result.output
    _one_error(result.output)
    assert "cannot be called with no arguments" in " ".join(result.output.split())


def _batches(n: int = 2, labels: Any = None, images: Any = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 16, 16, generator=g) if images is None else images
    y = torch.randint(0, 10, (8,), generator=g) if labels is None else labels
    return [(x, y)] * n


def _compress(**kwargs: Any) -> Any:
    from dacnn_convert import TrainConfig, compress

    args = {"train_loader": _batches(), "val_loader": _batches(), "mode": "mix", "epochs": 1, "calib_batches": 1}
    args.update(kwargs)
    return compress(TinyResNet(), train=TrainConfig.finetune(precision="fp32"), **args)


API_CASES = [  # (call, what the UsageError says); rows 101-104
    (
        lambda p: anchor(TinyResNet(), calib_loader=[torch.randint(0, 255, (8, 3, 16, 16), dtype=torch.uint8)]),
        "the images are uint8",
    ),
    (lambda p: anchor(TinyResNet(), calib_loader=[torch.full((8, 3, 16, 16), float("nan"))]), "NaN or infinite"),
    (lambda p: _compress(val_loader=_batches(labels=torch.rand(8))), "labels must be class indices"),
    (lambda p: _compress(train_loader=_batches(labels=torch.eye(10)[:8])), "one-hot labels? give y.argmax(1)"),
    (
        lambda p: _compress(train_loader=_batches(labels=torch.full((8,), 50))),
        "a label is 50, but the model has 10 outputs",
    ),
    (lambda p: _compress(out=p / "file.txt"), "is a file; give a folder"),
    (lambda p: _compress(out=3), "must be a folder path"),
    (lambda p: save(TinyResNet(), p / "x.safetensors", source=123), "source= is where the model comes from"),
    (lambda p: __import__("dacnn_convert").count_macs(TinyResNet(), (3, 0, 16)), "input_size= is (C, H, W)"),
    (lambda p: __import__("dacnn_convert").TrainConfig(lr=10**400), "lr must be a finite number"),
    (lambda p: anchor(TinyResNet().half(), input_size=(3, 16, 16)), "the model's parameters are float16"),
    (
        lambda p: __import__("dacnn_convert").export_torchscript(TinyResNet(), p / "x.pt", input_size="16"),
        "input_size= is (C, H, W)",
    ),
    (lambda p: anchor(TinyResNet().double(), input_size=(3, 16, 16)), "the model's parameters are float64"),
]


@pytest.mark.parametrize(("call", "text"), API_CASES, ids=[c[1][:28] for c in API_CASES])
def test_api_inputs_that_crashed_or_lied_are_one_usage_error(tmp_path: Path, call: Any, text: str) -> None:
    """Rows 101-104 (the adversarial pass of session 8): uint8 or NaN images, float, one-hot or
    out-of-range labels (an IndexError, or every accuracy silently 0), ``out`` a str path that
    crashed, an existing file, ``source=123``, a zero input size, ``lr=10**400`` accepted, and a
    half or double model blamed on the input size."""
    from dacnn_convert.errors import UsageError

    (tmp_path / "file.txt").write_text("keep")
    with pytest.raises(UsageError, match=re.escape(text)):
        call(tmp_path)
    assert (tmp_path / "file.txt").read_text() == "keep"


def test_compress_takes_a_str_folder_and_distill_checks_feature_layers(tmp_path: Path) -> None:
    from dacnn_convert import TrainConfig, distill
    from dacnn_convert.errors import UsageError

    result = _compress(out=str(tmp_path / "run"))
    assert (tmp_path / "run" / "model.safetensors").is_file() and result.checkpoint is not None
    student = anchor(TinyResNet(), input_size=(3, 16, 16))
    with pytest.raises(UsageError, match="feature layer 'nonexistent' is not a module of the student"):
        distill(
            student,
            TinyResNet(),
            _batches(),
            _batches(),
            config=TrainConfig(feature_weight=1.0),
            feature_layers=["nonexistent"],
        )


def _image_folder(root: Path, splits: dict[str, list[str]]) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        (root / split).mkdir(parents=True)
        for name in classes:
            (root / split / name).mkdir()
            for i in range(4):
                Image.fromarray((rng.random((20, 20, 3)) * 255).astype("uint8")).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.parametrize(
    ("splits", "garbage", "text"),
    [
        ({"train": [], "val": []}, False, "Couldn't find any class folder"),
        (
            {"train": ["cat", "dog"], "val": ["dog", "zebra"]},
            False,
            "train/ and val/ have different classes (cat, zebra",
        ),
        (
            {"train": ["cat", "dog"], "val": ["cat", "dog"]},
            True,
            "could not read: PIL.UnidentifiedImageError: cannot identify",
        ),
    ],
    ids=["no-classes", "other-classes", "corrupt-image"],
)
def test_data_errors_are_not_blamed_on_the_output_folder(
    tmp_path: Path, splits: dict, garbage: bool, text: str
) -> None:
    """Row 105: an empty or corrupt image folder was "could not write OUT ... Free some space" (every
    OSError was taken for a failed write), and train/val with other classes scored labels that did not match."""
    root = _image_folder(tmp_path / "if", splits)
    if garbage:
        (root / "train" / "cat" / "9.png").write_text("not an image")
    args = [
        "train",
        "tests.models:tiny_resnet",
        "--dataset",
        f"imagefolder:{root}",
        "--input-size",
        "16",
        "--epochs",
        "1",
    ]
    result = runner.invoke(
        app, [*args, "--limit-batches", "2", "--batch-size", "8", "--precision", "fp32", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1, result.output
    _one_error(result.output)
    assert text in " ".join(result.output.split()) and "Free some space" not in result.output, result.output


def test_a_data_root_that_is_a_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DACNN_DATA", str(tmp_path / "file"))
    (tmp_path / "file").write_text("x")
    args = [
        "train",
        "tests.models:tiny_resnet",
        "--dataset",
        "fashion-mnist",
        "--input-size",
        "16",
        "--out",
        str(tmp_path / "o"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "is not a folder: point it at a folder" in " ".join(result.output.split()), (
        result.output
    )


def test_a_float_tensor_relabelled_as_integers_is_refused(torchvision_checkpoint: Path, tmp_path: Path) -> None:
    """Row 106: a header saying fc.bias is I32 loaded its float bytes as integers (~1e9) and scored, exit 0."""
    import json
    import struct

    from dacnn_convert import load
    from dacnn_convert.errors import CheckpointError

    blob = torchvision_checkpoint.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    header["fc.bias"]["dtype"] = "I32"
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])
    with pytest.raises(CheckpointError, match="fc.bias is stored as int32, the model's is float32"):
        load(bad)


def test_a_safetensors_file_named_pth_is_read_as_safetensors(tmp_path: Path) -> None:
    """Row 106: weights saved with safetensors under a .pth name were refused as pickles."""
    from safetensors.torch import save_file

    from dacnn_convert.io.files import is_safetensors
    from dacnn_convert.io.sources import read_state_dict

    torch.manual_seed(0)
    model = TinyResNet()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.pth")
    assert is_safetensors(tmp_path / "w.pth") and not is_safetensors(tmp_path / "missing.pth")
    state = read_state_dict(tmp_path / "w.pth", model)
    assert torch.equal(state["fc.weight"], model.fc.weight)


def test_a_leaf_module_that_is_not_a_module_class_is_named() -> None:
    """Row 106: --leaf-module os.system, or leaf_modules=['pkg.Name'], was blamed on tracing bn1."""
    from dacnn_convert import plan
    from dacnn_convert.errors import UsageError

    with pytest.raises(UsageError, match="import the class and pass it, not its name"):
        plan(TinyResNet(), input_size=(3, 16, 16), leaf_modules=["tests.models.Gate"])
    result = runner.invoke(
        app, ["plan", *SOURCE[1:], "--weights", "none", "--input-size", "16", "--leaf-module", "os.system"]
    )
    assert result.exit_code == 2 and "not an nn.Module class" in result.output, result.output


def test_wrong_causes_now_name_the_real_one(checkpoint: Path, tmp_path: Path) -> None:
    """Row 114 (class 7): a converted checkpoint as --weights was asked "is it the same architecture?";
    --format dense --dtype int8 was answered about ONNX; a meta-device model was reported as tied weights."""
    result = runner.invoke(convert_app, [*SOURCE[1:], "--weights", str(checkpoint), "--input-size", "16", "--dry-run"])
    assert result.exit_code == 1 and "is already converted by dacnn-convert" in " ".join(result.output.split())
    out = tmp_path / "d.safetensors"
    args = ["export", str(checkpoint), *SOURCE, "--format", "dense", "--dtype", "int8", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--format dense takes fp32, fp16 or bf16" in " ".join(result.output.split())
    assert not out.exists()
    with torch.device("meta"):
        ghost = TinyResNet()
    from dacnn_convert.errors import UsageError

    with pytest.raises(UsageError, match="on the meta device"):
        anchor(ghost, input_size=(3, 16, 16))


class _TopLevelBranch(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y


def test_a_trace_failure_never_advises_making_a_torch_module_a_leaf() -> None:
    """Row 115 (class 7): any fx failure advised "mark BatchNorm2d as a leaf module", which changes nothing."""
    from dacnn_convert import plan
    from dacnn_convert.errors import TraceError

    with pytest.raises(TraceError) as info:
        plan(_TopLevelBranch(), input_size=(3, 16, 16))
    assert "the model's own forward" in str(info.value) and "BatchNorm2d" not in str(info.value)


class _HeadDeclaredFirst(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 10)  # the head, declared before the layer that feeds it
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.proj(self.conv(x).mean((2, 3))))


def test_the_class_count_is_the_heads_a_teacher_must_match_and_save_pretrained_wants_a_folder(tmp_path: Path) -> None:
    """Row 116: the class count came from the last-declared Linear (here the 8-wide projection);
    a teacher with another class count was a broadcast RuntimeError; save_pretrained into a file
    was NotADirectoryError."""
    from dacnn_convert import distill, save_pretrained
    from dacnn_convert.errors import UsageError
    from dacnn_convert.io.checkpoint import _num_classes
    from dacnn_convert.io.checkpoint import read_metadata as meta

    model = anchor(_HeadDeclaredFirst(), mode="none", input_size=(3, 16, 16))
    assert _num_classes(model) == 10
    written = save(model, tmp_path / "m.safetensors", source="tests.models:tiny_resnet")
    assert '"num_classes": 10' in meta(written)["source"]
    student = anchor(TinyResNet(), input_size=(3, 16, 16))
    with pytest.raises(UsageError, match=r"teacher's outputs have shape \(8, 5\) and the student's \(8, 10\)"):
        distill(
            student, TinyResNet(num_classes=5), _batches(labels=torch.zeros(8, dtype=torch.long)), _batches(), epochs=1
        )
    (tmp_path / "file").write_text("keep")
    with pytest.raises(UsageError, match="is a file; give a folder"):
        save_pretrained(student, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "keep"


def test_weights_and_inspect_read_the_same_checkpoint_layouts(tmp_path: Path) -> None:
    """--weights unwrapped only {"state_dict": ...}; inspect also model / *_ema: one unwrapping for both."""
    from dacnn_convert.io.inspection import inspect_file
    from dacnn_convert.io.sources import read_state_dict

    torch.manual_seed(0)
    model = TinyResNet()
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    state = read_state_dict(tmp_path / "ckpt.pt", model)
    assert torch.equal(state["fc.weight"], model.fc.weight)
    assert inspect_file(tmp_path / "ckpt.pt").params == sum(p.numel() for p in model.parameters())
