"""Model cards and the hub folder layout (local folders only: no network in tests)."""

from __future__ import annotations

import pytest
import torch
import yaml
from typer.testing import CliRunner

from dacnn_convert import anchor, count_params, from_pretrained, save_pretrained
from dacnn_convert.cli import convert_app
from dacnn_convert.errors import CheckpointError
from dacnn_convert.io.card import HubError

from .models import TinyResNet

TINY = ["tests.models:tiny_resnet", "--weights", "none", "--input-size", "16"]


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_every_conversion_folder_gets_a_model_card(tmp_path) -> None:
    result = CliRunner().invoke(convert_app, [*TINY, "--mode", "bank", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    card = (tmp_path / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "dacnn-convert" and "weight-sharing" in meta["tags"]
    assert meta["base_model"] == "tests.models:tiny_resnet"
    assert "--mode bank" in card and "from_pretrained" in card and "--format dense" in card
    assert "| unique parameters |" in card and "| MACs at 3x16x16 |" in card


def test_a_distilled_conversion_card_has_the_accuracy_of_each_step_and_the_dataset(tmp_path) -> None:
    result = CliRunner().invoke(
        convert_app,
        [
            *TINY,
            "--dataset",
            "synthetic",
            "--epochs",
            "1",
            "--limit-batches",
            "1",
            "--calib-batches",
            "1",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    card = (tmp_path / "README.md").read_text()
    assert _front_matter(card)["datasets"] == ["synthetic"]
    for step in ("original", "right after conversion", "after BN recalibration", "after KD fine-tune"):
        assert f"| {step} |" in card


def test_save_and_load_pretrained_round_trip_a_local_folder(tmp_path) -> None:
    student = anchor(TinyResNet(), mode="mix", regulators="all", input_size=(3, 16, 16)).eval()
    folder = save_pretrained(student, tmp_path / "hub", card="# card\n", source="tests.models:tiny_resnet")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "model.safetensors"]
    again = from_pretrained(folder, model=TinyResNet()).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(again(x), student(x))
    assert count_params(again) == count_params(student)


def test_hub_ids_offline_and_bad_names_are_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("dacnn_convert.io.sources.hub_reachable", lambda timeout_s=3.0: False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(HubError, match="cannot fetch someone/model from the Hugging Face hub"):
        from_pretrained("someone/model")
    with pytest.raises(CheckpointError, match="neither a folder, a file, nor a hub id"):
        from_pretrained("not-a-thing")
    with pytest.raises(HubError, match="unreachable .* written but not pushed"):
        save_pretrained(TinyResNet(), tmp_path / "x", push_to_hub="someone/model")
    assert (tmp_path / "x" / "model.safetensors").is_file()
