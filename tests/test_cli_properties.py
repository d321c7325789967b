"""The CLI's invariant, drawn by hypothesis over commands, option values and tampered files:
exit 0 with its artefact written, or exit 1/2 with one `error:` line (click's own usage panel
for a malformed flag) and no traceback; and never a change to a file that existed before."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dacnn_convert import anchor, save
from dacnn_convert.cli import app

from .models import TinyResNet

RUNNER = CliRunner()
OUTCOMES: list[tuple[str, int]] = []  # (command, exit code) of every example run
MODEL = "tests.models:tiny_resnet"
NUMBERS = st.sampled_from(["0", "-1", "1", "2", "0.5", "nan", "inf", "-inf", "1e999", "abc", "", "3x", "16"])
SIZES = st.sampled_from(["16", "0", "-3", "3x16x16", "3x0x16", "99999999", "x", "1x16x16", "16,16"])


def _tree(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _files(root: Path) -> dict[str, Path]:
    """A valid checkpoint, and the ways a file can be wrong."""
    torch.manual_seed(0)
    good = save(anchor(TinyResNet(), input_size=(3, 16, 16)), root / "good.safetensors", source=MODEL)
    blob = good.read_bytes()
    (root / "truncated.safetensors").write_bytes(blob[: len(blob) // 3])
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    (root / "flipped.safetensors").write_bytes(bytes(flipped))
    (root / "garbage.pt").write_bytes(random.Random(29).randbytes(64))  # seeded: CI sees one file
    (root / "empty.safetensors").write_bytes(b"")
    (root / "folder").mkdir()
    os.mkfifo(root / "fifo.safetensors")
    (root / "recipe.yaml").write_text(  # a runnable recipe, and ways a recipe can be wrong
        f"model: {MODEL}\nweights: none\ninput_size: '16'\ndataset: synthetic\nepochs: 1\nprecision: fp32\n"
    )
    (root / "latin1.yaml").write_bytes("model: r\xe9snet\n".encode("latin-1"))
    (root / "deep.yaml").write_text("model: " + "[" * 3000 + "]" * 3000 + "\n")
    (root / "unknown.yaml").write_text("modle: resnet18\n")
    (root / "dup.yaml").write_text(f"model: {MODEL}\nepochs: 1\nepochs: 5\n")
    # issue 23, session 8: edited metadata, brackets in a name, a nested state dict, safetensors by another name
    _with_metadata(good, root / "kind.safetensors", "source", '{"kind": "weird", "name": "x", "num_classes": 10}')
    _with_metadata(
        good,
        root / "classes.safetensors",
        "source",
        f'{{"kind": "module", "name": "{MODEL}", "num_classes": 1000000000000}}',
    )
    _with_metadata(good, root / "plan.safetensors", "plan", "{not json")
    (root / "model[v2].safetensors").write_bytes(blob)
    (root / "renamed.bin").write_bytes(blob)
    torch.save({"state_dict": TinyResNet().state_dict(), "epoch": 3}, root / "wrapped.pt")
    return {p.name: p for p in root.iterdir()} | {"missing.safetensors": root / "missing.safetensors"}


def _with_metadata(src: Path, dst: Path, key: str, value: str) -> None:
    """``src`` with one metadata entry replaced, as a hand edit of the file's JSON header would."""
    import json
    import struct

    blob = src.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    header["__metadata__"][key] = value
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])


FILE_NAMES = st.sampled_from(
    [
        "good.safetensors",
        "truncated.safetensors",
        "flipped.safetensors",
        "garbage.pt",
        "empty.safetensors",
        "folder",
        "fifo.safetensors",
        "missing.safetensors",
        "kind.safetensors",
        "classes.safetensors",
        "plan.safetensors",
        "model[v2].safetensors",
        "renamed.bin",
        "wrapped.pt",
    ]
)
RECIPES = st.sampled_from(
    ["recipe.yaml", "latin1.yaml", "deep.yaml", "unknown.yaml", "dup.yaml", "folder", "garbage.pt", "good.safetensors"]
)
ENVIRONMENTS = st.sampled_from(  # a torchrun environment left half-set in the shell
    [{}, {}, {}, {"WORLD_SIZE": "2"}, {"WORLD_SIZE": "\u00b2"}, {"WORLD_SIZE": "x"}]
)


@st.composite
def invocations(draw: st.DrawFn) -> tuple[str, list[str]]:
    """(command name, its arguments before paths are filled in: FILE and OUT are placeholders)."""
    commands = ["convert", "plan", "inspect", "eval", "export", "latency", "visualize", "table", "recipe"]
    command = draw(st.sampled_from(commands))
    if command == "convert":
        args = [MODEL, "--weights", "none", "--input-size", draw(SIZES), "--dry-run"]
        args += draw(st.sampled_from([[], ["--mode", "bank", "--bank-size", draw(NUMBERS)], ["--regulators", "9"]]))
        args += draw(st.sampled_from([[], ["--target-params", draw(NUMBERS)], ["--target-ratio", draw(NUMBERS)]]))
    elif command == "plan":
        args = [MODEL, "--weights", "none", "--input-size", draw(SIZES), "--target-bytes", draw(NUMBERS)]
    elif command == "inspect":
        args = ["FILE"]
    elif command == "eval":
        args = ["FILE", "--dataset", "synthetic", "--limit-batches", "1", "--batch-size", draw(NUMBERS)]
    elif command == "export":
        fmt = draw(st.sampled_from(["safetensors", "dense", "torchscript", "onnx"]))
        args = ["FILE", "--format", fmt, "--out", "OUT", "--input-size", draw(SIZES)]
        args += draw(
            st.sampled_from([[], [], ["--dtype", "int8"], ["--opset", draw(st.sampled_from(["999", "0", "x"]))]])
        )
    elif command == "latency":
        args = ["FILE", "--batch", draw(NUMBERS), "--repeats", draw(st.sampled_from(["1", "0", "-2"]))]
        args += ["--input-size", draw(SIZES)]
    elif command == "table":
        args = [draw(st.sampled_from(["params", "accuracy"])), *draw(st.sampled_from([[], ["--markdown"]]))]
        if args[0] == "accuracy":
            args += draw(st.sampled_from([[], ["--results", "FILE"], ["--results", "RECIPE"]]))
    elif command == "recipe":
        args = draw(
            st.sampled_from(
                [
                    ["run", "RECIPE", "--limit-batches", draw(st.sampled_from(["1", "0", "-1"])), "--out", "OUT"],
                    ["list", "--root", draw(st.sampled_from(["FILE", "RECIPE"]))],
                ]
            )
        )
    else:
        args = ["FILE", "--filters", draw(NUMBERS), "--steps", "1", "--out", "OUT"]
        args += draw(
            st.sampled_from([[], [], ["--layers", draw(st.sampled_from(["", "fc", "dacnn_anchors", "conv1"]))]])
        )
    if command in ("eval", "export", "latency", "visualize"):  # user code is named, never read from a file
        args += draw(st.sampled_from([["--model", MODEL], ["--model", MODEL], []]))
    return command, args


def _check(
    tmp: Path,
    files: dict[str, Path],
    command: str,
    args: list[str],
    file_name: str,
    recipe: str,
    n: int,
    env: dict[str, str] | None = None,
) -> None:
    out = tmp / f"out{n}"
    target = out if command == "recipe" else out / ("o.png" if command == "visualize" else "o.bin")
    fill = {"FILE": str(files[file_name]), "OUT": str(target), "RECIPE": str(files[recipe])}
    argv = [command, *[fill.get(a, a) for a in args]]
    before = _tree(tmp)
    result = RUNNER.invoke(app, argv, env=env or None)
    OUTCOMES.append((command, result.exit_code))
    shown = f"dacnn {' '.join(argv)}\n{result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), shown
    assert "Traceback" not in result.output, shown
    assert result.exit_code in (0, 1, 2), shown
    if result.exit_code != 0:
        errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
        click_usage = "Invalid value" in result.output or "Error" in result.output
        usage_panel = result.exit_code == 2 and not errors and click_usage
        assert usage_panel or (len(errors) == 1 and result.output.strip().splitlines()[-1] == errors[0]), shown
    elif "OUT" in args:
        assert any(out.rglob("*")), shown  # success wrote its artefact
    after = _tree(tmp)
    assert {k: v for k, v in after.items() if k in before} == before, shown  # no existing file changed


def _run(tmp_path_factory: pytest.TempPathFactory, examples: int) -> None:
    tmp = tmp_path_factory.mktemp("cli")
    files = _files(tmp)
    count = iter(range(10**6))

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(invocations(), FILE_NAMES, RECIPES, ENVIRONMENTS)
    def check(invocation: tuple[str, list[str]], file_name: str, recipe: str, env: dict[str, str]) -> None:
        _check(tmp, files, invocation[0], invocation[1], file_name, recipe, next(count), env)

    check()


def test_every_command_exits_cleanly_on_drawn_options_and_tampered_files(tmp_path_factory) -> None:
    OUTCOMES.clear()
    _run(tmp_path_factory, examples=30)
    assert len(OUTCOMES) >= 30 and {code for _, code in OUTCOMES} >= {0, 1, 2}  # the draw reaches every outcome


@pytest.mark.slow
def test_every_command_exits_cleanly_many_examples(tmp_path_factory) -> None:
    _run(tmp_path_factory, examples=500)
