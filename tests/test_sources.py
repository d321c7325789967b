"""The model names and defaults users copy from timm and torchvision (offline)."""

from __future__ import annotations

import socket

import pytest
import torchvision
from typer.testing import CliRunner

from dacnn_convert.cli import convert_app
from dacnn_convert.errors import UnknownModelError, WeightsError
from dacnn_convert.io.sources import (
    InputConfig,
    ModelSpec,
    build_model,
    hub_reachable,
    input_config,
    parse_spec,
    torchvision_weights,
)

runner = CliRunner()


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    def unreachable(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def test_timm_names_with_pretrained_tags_are_models() -> None:
    spec = parse_spec("timm:resnet18.a1_in1k")
    assert spec == ModelSpec("timm", "resnet18.a1_in1k") and spec.display == "timm:resnet18.a1_in1k"
    model = build_model(spec, weights="none")
    assert model.pretrained_cfg["tag"] == "a1_in1k"
    with pytest.raises(UnknownModelError, match="unknown timm model 'resnet1800.a1_in1k'.*list_pretrained"):
        parse_spec("timm:resnet1800.a1_in1k")
    with pytest.raises(UnknownModelError, match="no pretrained tag 'bogus'.*Its tags: .*a1_in1k"):
        parse_spec("timm:resnet18.bogus")


def test_hf_hub_names_are_timm_models() -> None:
    spec = parse_spec("hf-hub:timm/resnet18.a1_in1k", 10)
    assert spec == ModelSpec("timm", "hf-hub:timm/resnet18.a1_in1k", 10)
    assert spec.display == "hf-hub:timm/resnet18.a1_in1k"
    with pytest.raises(UnknownModelError, match="hf-hub:OWNER/NAME"):
        parse_spec("hf-hub:resnet18")


def test_hf_hub_offline_is_one_line_not_a_module_import(no_network) -> None:
    result = runner.invoke(convert_app, ["hf-hub:timm/resnet18.a1_in1k", "--weights", "none", "--dry-run"])
    assert result.exit_code == 1, result.output
    assert "cannot fetch" in result.output and "hf-hub:timm/resnet18.a1_in1k" in result.output
    # with --weights none already given, the advice is the architecture from timm (was: "use --weights none")
    assert "name the architecture from timm" in " ".join(result.output.split())
    assert "Traceback" not in result.output and "import" not in result.output


@pytest.mark.parametrize("weights", ["IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2", "DEFAULT", "default"])
def test_torchvision_weight_enums_are_weights_not_paths(weights) -> None:
    enum = torchvision_weights(ModelSpec("torchvision", "resnet50"), weights)
    expected = torchvision.models.ResNet50_Weights
    assert enum is (expected.IMAGENET1K_V2 if "V2" in weights or weights.upper() == "DEFAULT" else None)


def test_a_weight_enum_offline_fails_as_a_download_and_a_wrong_one_lists_the_valid(no_network, tmp_path) -> None:
    result = runner.invoke(convert_app, ["resnet18", "--weights", "IMAGENET1K_V1", "--dry-run"])
    assert result.exit_code == 1 and "cannot download pretrained weights for resnet18" in result.output
    with pytest.raises(WeightsError, match="resnet18's pretrained weights are IMAGENET1K_V1, DEFAULT"):
        build_model(ModelSpec("torchvision", "resnet18"), str(tmp_path / "IMAGENET1K_V9"))


def test_input_config_comes_from_the_models_own_pretrained_config() -> None:
    import timm

    timm_cfg = input_config(timm.create_model("resnet18.a1_in1k", pretrained=False))
    assert timm_cfg.interpolation == "bicubic" and timm_cfg.crop_pct == pytest.approx(0.95)
    tv = input_config(torchvision.models.resnet50(), ModelSpec("torchvision", "resnet50"), "IMAGENET1K_V2")
    assert tv.input_size == (3, 224, 224) and tv.crop_pct == pytest.approx(224 / 232)
    v1 = input_config(torchvision.models.resnet50(), ModelSpec("torchvision", "resnet50"), "IMAGENET1K_V1")
    assert v1.crop_pct == pytest.approx(224 / 256)
    assert input_config(torchvision.models.resnet18(), None, None) == InputConfig()  # a user model: ImageNet


def test_dataset_sizes_are_32_px_only_for_the_32_px_datasets() -> None:
    from dacnn_convert.cli.common import DataOptions

    assert DataOptions.of("fashion-mnist").input_size(None, (3, 224, 224)) == (3, 32, 32)
    assert DataOptions.of("imagefolder:/data").input_size(None, (3, 288, 288)) == (3, 288, 288)
    assert DataOptions.of("imagefolder:/data").input_size((3, 64, 64), (3, 288, 288)) == (3, 64, 64)


def test_hub_reachability_uses_the_hub_clients_settings(monkeypatch) -> None:
    from huggingface_hub import constants

    asked = []

    class Session:
        def head(self, url, timeout):
            asked.append(url)

    monkeypatch.setattr("huggingface_hub.get_session", lambda: Session())
    monkeypatch.setattr(constants, "ENDPOINT", "https://hf-mirror.example")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert hub_reachable() and asked == ["https://hf-mirror.example"]  # a mirror, through the hub's session
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert not hub_reachable() and len(asked) == 1  # the user's offline flag: no request at all
