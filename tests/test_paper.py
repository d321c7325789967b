"""The paper's DACNNs: exact parameter integers, shapes, real sharing, recipes, the params table."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dacnn_convert.cli import app
from dacnn_convert.core.layers import AnchoredConv2d
from dacnn_convert.core.models import Block, dacnn, from_name, kernel_and_fc_params
from dacnn_convert.core.plan import count_params
from dacnn_convert.errors import UsageError
from dacnn_convert.io.sources import parse_spec
from dacnn_convert.paper import param_rows
from dacnn_convert.recipes import find_recipes, load_recipe

K3 = 9  # a 3x3 kernel


def fc(c: int, classes: int = 100) -> int:
    return c * classes + classes


EXACT = {
    # stem 3x128 + one shared 128x128 + FC(128 -> 100): the same for every plain depth
    "14-plain": 3 * 128 * K3 + 128 * 128 * K3 + fc(128),  # 163,812
    "34-plain": 3 * 128 * K3 + 128 * 128 * K3 + fc(128),
    # expansions 3->64->128->256->512 + one shared kernel per section + FC(512 -> 100)
    "14-mix": (3 * 64 + 64 * 128 + 128 * 256 + 256 * 512) * K3 + (64**2 + 128**2 + 256**2 + 512**2) * K3 + fc(512),
    # residual: + 1x1 projections where the channels change
    "18-mix": 4_734_756 + 64 * 128 + 128 * 256 + 256 * 512,
    # + one 1x1 regulator per block: 2 blocks per section
    "18-mix-reg": 4_906_788 + 2 * (64**2 + 128**2 + 256**2 + 512**2),
    "34-mix-reg": 4_906_788 + 3 * 64**2 + 4 * 128**2 + 6 * 256**2 + 3 * 512**2,
    "18-plain-reg3": 163_812 + 2 * 128 * 128,  # Table 4: 32K for one section
    "18-plain-reg": 163_812 + 8 * 128 * 128,  # Table 4: 128K for all
    # free (no sharing) DACNN-18: stem + 16 block convs of 128x128
    "18-plain-free": 3 * 128 * K3 + 16 * 128 * 128 * K3 + fc(128),
}


@pytest.mark.parametrize("name", EXACT)
def test_exact_parameter_integers(name: str) -> None:
    assert kernel_and_fc_params(from_name(name)) == EXACT[name]


@pytest.mark.slow
def test_paper_values_reproduced_where_consistent() -> None:
    assert EXACT["14-mix"] == 4_734_756 and round(EXACT["14-mix"] / 1e6, 2) == 4.73
    assert round(EXACT["18-mix-reg"] / 1e6, 2) == 5.60
    ok = {(r.table, r.row) for r in param_rows() if r.matches}
    assert {
        ("3", "DACNN-14 (MIX)"),
        ("6", "DACNN-18 (MIX, REG)"),
        ("4", "regulators: all"),
        ("4", "regulators: section 3"),
    } <= ok


def test_all_params_add_free_batchnorms() -> None:
    m = from_name("18-plain")
    bn_channels = 128 * (1 + 16)  # stem + every block conv, each with a free BN (weight + bias)
    assert count_params(m) == EXACT["34-plain"] + 2 * bn_channels
    assert count_params(from_name("18-plain-nobn")) == EXACT["34-plain"]


@pytest.mark.parametrize(
    "name",
    [
        "3-plain",
        "5-mix",
        "11-plain",
        "17-mix",
        "18-plain",
        "24-plain-reg",
        "34-mix",
        "18-mix-reg",
        "14-plain-free",
        "18-plain-nobn",
        "18-mix-reg-sharedbn",
    ],
)
def test_forward_shapes(name: str) -> None:
    assert from_name(name, num_classes=7)(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_sharing_is_one_tensor_and_gradients_sum_over_uses() -> None:
    torch.manual_seed(0)
    shared, free = dacnn(5, "plain"), dacnn(5, "plain", shared=False)
    assert [k for k in shared.state_dict() if "anchors" in k] == ["dacnn_anchors.shared"]
    anchor = shared.dacnn_anchors.shared
    convs = [name for name, m in shared.named_modules() if type(m).__name__ == "AnchoredConv2d"]
    assert len(convs) == 3  # 4 convs: the stem is free, the other 3 read the anchor
    free.load_state_dict({k: v for k, v in shared.state_dict().items() if "anchors" not in k}, strict=False)
    with torch.no_grad():
        for name in convs:
            free.get_submodule(name).weight.copy_(anchor)
    x = torch.randn(4, 3, 32, 32)
    out_s, out_f = shared(x), free(x)
    torch.testing.assert_close(out_s, out_f)
    out_s.square().sum().backward()
    out_f.square().sum().backward()
    total = sum(free.get_submodule(name).weight.grad for name in convs)
    torch.testing.assert_close(anchor.grad, total, rtol=1e-4, atol=1e-5)


def test_shared_bn_ties_gamma_and_beta_of_the_convs_of_one_kernel_not_their_statistics(tmp_path) -> None:
    from dacnn_convert import load, save

    plain = from_name("18-plain-sharedbn", 10)
    # the stem's BN and every block BN: 16 block BNs follow the one shared kernel and share one gamma/beta pair
    assert count_params(plain) == count_params(from_name("18-plain", 10)) - 2 * 128 * 15
    blocks = [m for n, m in plain.named_modules() if isinstance(m, nn.BatchNorm2d) and n.startswith("sections")]
    assert len(blocks) == 16 and len({id(m.weight) for m in blocks}) == 1
    assert len({id(m.running_mean) for m in blocks}) == 16
    mix = from_name("18-mix-reg-sharedbn", 10)
    after_shared = [
        (k, bn)
        for k, section in enumerate(mix.sections)
        for block in section
        if isinstance(block, Block)
        for conv, bn in ((block.conv1, block.bn1), (block.conv2, block.bn2))
        if isinstance(conv, AnchoredConv2d)
    ]
    assert {k: len({id(bn.weight) for j, bn in after_shared if j == k}) for k in range(4)} == dict.fromkeys(range(4), 1)
    others = [m for m in mix.modules() if isinstance(m, nn.BatchNorm2d) and all(m is not bn for _, bn in after_shared)]
    assert len({id(m.weight) for m in others}) == len(others)  # stem, expansion, shortcut, regulator BNs stay free
    torch.manual_seed(0)
    plain.train()
    plain(torch.randn(8, 3, 32, 32))  # statistics differ per layer after a batch
    assert not torch.equal(blocks[0].running_mean, blocks[-1].running_mean)
    path = save(plain.eval(), tmp_path / "m.safetensors", source="dacnn:18-plain-sharedbn")
    again = load(path).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again(x), plain(x), rtol=0, atol=0)
    again_blocks = [m for n, m in again.named_modules() if isinstance(m, nn.BatchNorm2d) and n.startswith("sections")]
    assert len({id(m.weight) for m in again_blocks}) == 1  # still tied after loading


def test_bad_builder_arguments_teach_the_fix() -> None:
    with pytest.raises(UsageError, match="3..17"):
        dacnn(20)
    with pytest.raises(UsageError, match="residual"):
        dacnn(14, regulators="all")
    with pytest.raises(UsageError, match="1..4"):
        dacnn(18, regulators="5")
    with pytest.raises(UsageError, match="DEPTH-VARIANT"):
        from_name("18-mixed")
    with pytest.raises(UsageError, match="drop -free / -nobn"):
        dacnn(18, shared=False, shared_bn=True)
    with pytest.raises(UsageError, match="DEPTH-VARIANT"):
        from_name("18-plain-nobn-sharedbn")


def test_every_bundled_recipe_loads_and_names_a_known_model() -> None:
    recipes = find_recipes("recipes")
    assert len(recipes) >= 50
    for path in recipes:
        r = load_recipe(path)
        assert r.model is not None and r.dataset is not None, path
        parse_spec(r.model)  # raises for an unknown model


def test_recipe_smoke_run_on_synthetic_data(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        "task: train\nmodel: dacnn:5-plain\ndataset: cifar100\nepochs: 90\noptimizer: adagrad\nlr: 0.1\n"
        "schedule: step\ninput_size: '16'\npaper_table: '2'\npaper_error: 40.11\n"
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "recipe",
            "run",
            str(path),
            "--dataset",
            "synthetic",
            "--epochs",
            "1",
            "--limit-batches",
            "2",
            "--seed",
            "3",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "result.json").read_text())
    assert record["params"] == count_params(from_name("5-plain", 10)) and record["paper_error"] == 40.11
    assert record["seed"] == 3
    resolved = load_recipe(out / "recipe.yaml")
    assert resolved.epochs == 1 and resolved.dataset == "synthetic" and resolved.optimizer == "adagrad"
    assert resolved.seed == 3


def test_table_params_cli() -> None:
    result = CliRunner().invoke(app, ["table", "params", "--markdown"])
    assert result.exit_code == 0, result.output
    assert "| 6 | DACNN-18 (MIX, REG) | 5.6M | 5.603M (5,603,108)" in result.output


def test_filter_visualisation_raises_the_filter_response(tmp_path) -> None:
    from dacnn_convert.visualize import visualize_filters

    from .models import TinyResNet

    torch.manual_seed(0)
    model = TinyResNet()
    few = visualize_filters(model, ["layer1.0.conv1"], 3, (3, 16, 16), steps=1)
    many = visualize_filters(model, ["layer1.0.conv1"], 3, (3, 16, 16), steps=40)
    assert all(b > a for a, b in zip(few.activation["layer1.0.conv1"], many.activation["layer1.0.conv1"], strict=True))
    assert many.images["layer1.0.conv1"].shape == (3, 3, 16, 16)
    assert many.save_grid(tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    assert all(p.requires_grad for p in model.parameters())  # the model is given back as it was
    with pytest.raises(UsageError, match="Did you mean"):
        visualize_filters(model, ["layer1.0.conv"], 1, (3, 16, 16), steps=1)


def test_saved_dacnn_reloads_and_inspects_with_its_sharing(tmp_path) -> None:
    from dacnn_convert import inspect_file, load, save

    model = from_name("5-plain", 10).eval()
    path = save(model, tmp_path / "m.safetensors", source="dacnn:5-plain")
    again = load(path).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    info = inspect_file(path)
    assert info.params == count_params(model)
    assert [(name, len(users)) for name, _, users in info.shared] == [("dacnn_anchors.shared", 3)]
