"""Reliability round 3b: recipes, tables, visualisation, inspection and export refuse bad input in one line.

Each test checks the exit code (or the typed error), one line without a traceback, and that a
refused command changed no file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dacnn_convert import inspect_file, save
from dacnn_convert.cli import app
from dacnn_convert.errors import CheckpointError, RecipeError, UsageError
from dacnn_convert.recipes import load_recipe

from .models import TinyResNet
from .test_reliability3 import SOURCE, _one_error, _snapshot, runner


def _result(recipe: str = "r.yaml", **changes: object) -> str:
    """A result.json as `dacnn recipe run` writes it (the fields the accuracy table prints)."""
    record = {"recipe": recipe, "model": "resnet18", "dataset": "cifar10", "epochs": 1, "paper_error": 6.47}
    record |= {"error": 10.0, "params": 11_000_000, "device": "CPU", "wall_s": 3.0, "paper_params": 11.1}
    return json.dumps(record | changes)


# tables and recipe folders (R31-R36)


def test_a_result_that_is_not_json_is_one_line_naming_it(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "result.json").write_text(_result())
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "result.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[]")  # valid JSON but no result: skipped, as a history is
    result = runner.invoke(app, ["table", "accuracy", "--results", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert "b/result.json" in result.output and "not readable JSON" in result.output, result.output
    _one_error(result.output)


def test_a_result_lacking_a_field_of_the_table_is_one_line(tmp_path: Path) -> None:
    record = json.loads(_result())
    del record["params"]
    (tmp_path / "result.json").write_text(json.dumps(record))
    result = runner.invoke(app, ["table", "accuracy", "--results", str(tmp_path)])
    assert result.exit_code == 1 and "lacks params" in result.output, result.output
    _one_error(result.output)


def test_the_accuracy_figure_into_a_folder_is_refused_before_the_table(tmp_path: Path) -> None:
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "result.json").write_text(_result())
    (tmp_path / "fig").mkdir()
    before = _snapshot(tmp_path)
    result = runner.invoke(
        app, ["table", "accuracy", "--results", str(tmp_path / "res"), "--png", str(tmp_path / "fig")]
    )
    assert result.exit_code == 2, result.output
    assert "--png" in result.output and "is a folder" in result.output and "| recipe |" not in result.output
    _one_error(result.output)
    assert _snapshot(tmp_path) == before


def test_the_accuracy_table_and_figure_of_a_good_result(tmp_path: Path) -> None:
    (tmp_path / "result.json").write_text(_result("recipes/x.yaml"))
    png = tmp_path / "fig.png"
    result = runner.invoke(app, ["table", "accuracy", "--results", str(tmp_path), "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert "| x | resnet18 | cifar10 | 1 | 6.47 | 10.00 | 11,000,000 | CPU | 3 |" in result.output
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kind", ["missing", "file"])
@pytest.mark.parametrize(
    ("command", "flag"),
    [(["recipe", "list"], "--root"), (["table", "accuracy"], "--results")],
    ids=["recipes", "table"],
)
def test_a_folder_to_search_that_is_missing_or_a_file_is_exit_2(
    tmp_path: Path, kind: str, command: list[str], flag: str
) -> None:
    folder = tmp_path / "nowhere"
    if kind == "file":
        folder = tmp_path / "f.yaml"
        folder.write_text("model: resnet18\n")
    result = runner.invoke(app, [*command, flag, str(folder)])
    assert result.exit_code == 2, result.output
    assert str(folder) in result.output and flag in result.output, result.output
    assert ("does not exist" if kind == "missing" else "is a file, not a folder") in result.output
    _one_error(result.output)


# recipes (R03, R30)


def test_a_recipe_key_given_twice_is_refused_naming_key_and_lines(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("model: resnet18\nepochs: 1\ndataset: cifar10\nepochs: 5\n")
    with pytest.raises(RecipeError, match=r"key 'epochs' is given twice \(lines 2 and 4\)"):
        load_recipe(path)
    result = runner.invoke(app, ["recipe", "run", str(path)])
    assert result.exit_code == 2 and "epochs" in result.output, result.output
    _one_error(result.output)
    assert _snapshot(tmp_path) == {"r.yaml": path.read_bytes()}


def test_recipes_are_still_read_with_the_safe_loader_only(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("model: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)
    path.write_text("model: resnet18\x07\n")  # the reader refuses it before any parsing: still one RecipeError
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)
    path.write_text("epochs: 3\nmodel: resnet18\n")
    assert load_recipe(path).epochs == 3


def test_a_train_recipe_with_user_code_named_on_the_command_line_runs_to_its_result(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: train\nmodel: tests.models:tiny_resnet\nweights: none\ninput_size: '16'\n")
    recipe.write_text(recipe.read_text() + "dataset: synthetic\nepochs: 90\n")
    out = tmp_path / "o"
    args = ["recipe", "run", str(recipe), *SOURCE, "--out", str(out), "--epochs", "1", "--limit-batches", "1"]
    result = runner.invoke(app, [*args, "--train-limit", "64", "--batch-size", "8", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "result.json").read_text())
    assert record["params"] == sum(p.numel() for p in TinyResNet().parameters())  # 11,122: read from best.safetensors


# visualisation (V01, V03, V17)


@pytest.mark.parametrize(
    ("layers", "why"),
    [("", "--layers names no layer"), ("fc", "outputs shape (1, 10)"), ("dacnn_anchors", "not called")],
    ids=["empty", "linear", "anchor-bank"],
)
def test_a_layer_that_cannot_be_visualised_is_one_line_naming_those_that_can(
    checkpoint: Path, tmp_path: Path, layers: str, why: str
) -> None:
    out = tmp_path / "f.png"
    args = ["visualize", str(checkpoint), *SOURCE, "--filters", "1", "--steps", "1", "--layers", layers]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert why in result.output and "layers that can be visualised: conv1, layer1.0.conv1" in result.output
    _one_error(result.output)
    assert not out.exists()


def test_visualising_a_conv_still_works_after_the_probe(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.png"
    args = ["visualize", str(checkpoint), *SOURCE, "--filters", "2", "--steps", "1", "--layers", "layer1.0.conv1"]
    result = runner.invoke(app, [*args, "--out", str(out), "--input-size", "16"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"\x89PNG"


# inspection (I10, I14, I15, A33)


def test_an_onnx_initializer_whose_shape_disagrees_with_its_data_is_a_checkpoint_error(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    t = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    t.dims[0] = 1000
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", io[:1], io[1:], [t])
    onnx.save(helper.make_model(graph), str(tmp_path / "bad.onnx"))
    with pytest.raises(CheckpointError, match=r"initializer 'w' of shape \(1000,\) cannot be read"):
        inspect_file(tmp_path / "bad.onnx")
    result = runner.invoke(app, ["inspect", str(tmp_path / "bad.onnx")])
    assert result.exit_code == 1, result.output
    _one_error(result.output)


@pytest.mark.parametrize("key", ["state_dict", "model_ema"])
def test_a_training_checkpoint_dict_is_inspected_through_its_state_dict(tmp_path: Path, key: str) -> None:
    state = TinyResNet().state_dict()
    torch.save(state, tmp_path / "plain.pt")
    torch.save({key: state, "epoch": 3}, tmp_path / "wrapped.pt")
    plain, wrapped = inspect_file(tmp_path / "plain.pt"), inspect_file(tmp_path / "wrapped.pt")
    assert wrapped.params == plain.params == 11_122 and wrapped.tensors == plain.tensors
    assert wrapped.notes == (f"read the state dict under key {key!r} (the file also holds: epoch)",)
    result = runner.invoke(app, ["inspect", str(tmp_path / "wrapped.pt")])
    assert result.exit_code == 0 and "11,122 unique parameters" in result.output and key in result.output


def test_a_torch_file_with_no_tensors_anywhere_is_refused(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"holds no tensors at its top level \(keys: 'epoch', 'optimizer'\)"):
        inspect_file(tmp_path / "w.pt")


@pytest.mark.parametrize("name", ["model.bin", "x.pt", "noext"])
def test_safetensors_under_another_name_is_inspected_as_safetensors(
    checkpoint: Path, tmp_path: Path, name: str
) -> None:
    renamed = tmp_path / name
    renamed.write_bytes(checkpoint.read_bytes())
    info, reference = inspect_file(renamed), inspect_file(checkpoint)
    assert info.format == "safetensors" and info.params == reference.params and info.shared == reference.shared


def test_save_under_a_pt_name_inspects_back(tmp_path: Path) -> None:
    path = save(TinyResNet(), tmp_path / "x.pt")
    info = inspect_file(path)
    assert (info.format, info.params) == ("safetensors", 11_122)


# export (X03)


def test_an_opset_the_exporter_cannot_write_is_exit_2_and_writes_nothing(checkpoint: Path, tmp_path: Path) -> None:
    import onnx

    out = tmp_path / "m.onnx"
    before = _snapshot(tmp_path)
    args = ["export", str(checkpoint), *SOURCE, "--format", "onnx", "--opset", "999", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    top = onnx.defs.onnx_opset_version()
    assert f"choose --opset from 18 to {top}" in result.output, result.output
    _one_error(result.output)
    assert _snapshot(tmp_path) == before
    from dacnn_convert.io.export import export_onnx

    with pytest.raises(UsageError, match=f"opset {top + 1}: "):
        export_onnx(TinyResNet(), out, (3, 16, 16), opset=top + 1)
    assert not out.exists()


def test_an_opset_the_exporter_falls_back_from_is_refused_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An onnx that claims an opset its converter cannot reach: the exporter keeps 18 and only logs it."""
    import onnx

    from dacnn_convert.errors import DacnnError
    from dacnn_convert.io.export import export_onnx

    top = onnx.defs.onnx_opset_version()
    monkeypatch.setattr(onnx.defs, "onnx_opset_version", lambda: top + 1)
    with pytest.raises(DacnnError, match=f"the exporter wrote opset 18, not the {top + 1} asked for"):
        export_onnx(TinyResNet(), tmp_path / "m.onnx", (3, 16, 16), opset=top + 1, check=False)
    assert list(tmp_path.iterdir()) == []
