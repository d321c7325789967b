"""save/load: sharing survives the round trip, files stay small, tampering is refused."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import torchvision

from dacnn_convert import anchor, count_params, load, save
from dacnn_convert.errors import CheckpointError
from dacnn_convert.io.sources import ModelSpec

from .models import TinyResNet, randomize_bn

SIZE = (3, 16, 16)


def test_round_trip_keeps_sharing_and_outputs(tmp_path) -> None:
    student = anchor(randomize_bn(TinyResNet()), mode="mix", regulators="all", input_size=SIZE).eval()
    path = save(student, tmp_path / "m.safetensors", source=ModelSpec("module", "tests.models:tiny_resnet", 10))
    again = load(path, model=TinyResNet()).eval()
    x = torch.randn(2, *SIZE)
    torch.testing.assert_close(again(x), student(x), atol=0, rtol=0)
    assert count_params(again) == count_params(student)
    a = again.get_submodule("layer1.0.conv1").weight
    b = again.get_submodule("layer1.1.conv2").weight
    assert a.data_ptr() == b.data_ptr()


def test_user_code_is_never_imported_from_metadata(tmp_path) -> None:
    student = anchor(TinyResNet(), input_size=SIZE)
    path = save(student, tmp_path / "m.safetensors", source=ModelSpec("module", "tests.models:tiny_resnet", 10))
    with pytest.raises(CheckpointError, match="never imported"):
        load(path)


def test_torchvision_source_rebuilds_without_user_code(tmp_path) -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    student = anchor(model, mode="mix", regulators="all", input_size=(3, 32, 32)).eval()
    path = save(student, tmp_path / "r18.safetensors", source="resnet18")
    again = load(path).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(again(x), student(x), atol=0, rtol=0)
    # file size within 2% of the unique-parameter bytes
    assert path.stat().st_size <= 1.02 * 4 * count_params(student)


def _data_bytes(path) -> int:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return len(raw) - 8 - n


def _rewrite_header(path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_tampered_plan_is_refused(tmp_path) -> None:
    student = anchor(TinyResNet(), input_size=SIZE)
    path = save(student, tmp_path / "m.safetensors")

    def drop_group(h):
        plan = json.loads(h["__metadata__"]["plan"])
        plan["groups"] = plan["groups"][:1]
        h["__metadata__"]["plan"] = json.dumps(plan)

    _rewrite_header(path, drop_group)
    with pytest.raises(CheckpointError, match="does not match its recorded plan"):
        load(path, model=TinyResNet())


def test_garbage_and_truncated_files_are_refused(tmp_path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a valid"):
        load(bad, model=TinyResNet())
    good = save(anchor(TinyResNet(), input_size=SIZE), tmp_path / "m.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError):
        load(cut, model=TinyResNet())
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "missing.safetensors")


def test_half_precision_storage_loads_back_as_fp32(tmp_path) -> None:
    student = anchor(TinyResNet(), input_size=SIZE)
    full = save(student, tmp_path / "a.safetensors")
    half = save(student, tmp_path / "b.safetensors", dtype="bf16")
    floats = sum(v.numel() for v in student.state_dict().values() if v.is_floating_point())
    assert _data_bytes(full) - _data_bytes(half) == 2 * floats
    again = load(half, model=TinyResNet())
    assert again.dacnn_anchors.g0_s1_8x8x3x3.dtype == torch.float32


def test_state_dict_keys_do_not_depend_on_the_conversion_size() -> None:
    small = anchor(TinyResNet(), mode="mix", regulators="all", input_size=(3, 16, 16))
    large = anchor(TinyResNet(), mode="mix", regulators="all", input_size=(3, 64, 64))
    assert list(small.state_dict()) == list(large.state_dict())
    assert "dacnn_anchors.g0_s1_8x8x3x3" in small.state_dict()


def test_files_with_the_older_resolution_names_still_load(tmp_path) -> None:
    import dataclasses

    from dacnn_convert import convert, plan

    model = TinyResNet()
    p = plan(model, mode="mix", input_size=SIZE)
    old = dataclasses.replace(
        p, groups=tuple(dataclasses.replace(g, name=g.name.replace("_s1_", "_16px_")) for g in p.groups)
    )  # as written before the rename
    student = convert(model, old).model
    path = save(student, tmp_path / "old.safetensors", source="tests.models:tiny_resnet")
    again = load(path, model=TinyResNet())
    assert "dacnn_anchors.g0_16px_8x8x3x3" in again.state_dict()
    x = torch.randn(2, *SIZE)
    student.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), student(x))


def test_int8_storage_quantizes_each_anchor_once_and_loads_back_close(tmp_path) -> None:
    from safetensors import safe_open

    student = anchor(TinyResNet(), mode="bank", bank_size=0.5, input_size=SIZE).eval()
    full = save(student, tmp_path / "a.safetensors")
    small = save(student, tmp_path / "b.safetensors", dtype="int8")
    tensors = student.state_dict()
    expected = sum(
        v.numel() + 2 * v.shape[0] if v.dim() >= 2 else v.numel() * v.element_size() for v in tensors.values()
    )  # 1 byte per weight + an fp16 scale per output channel
    assert _data_bytes(small) == expected < 0.5 * _data_bytes(full)
    with safe_open(str(small), "pt") as f:
        meta = f.metadata()
        anchors = [k for k in f.keys() if k.startswith("dacnn_anchors.") and not k.endswith(".int8_scale")]
        assert all(f.get_tensor(k).dtype == torch.int8 for k in anchors)
        assert len(anchors) == len(list(student.dacnn_anchors.parameters()))  # each bank stored once
    assert meta["dtype"] == "int8" and meta["int8"] == "per-channel"
    again = load(small, model=TinyResNet()).eval()
    x = torch.randn(4, *SIZE)
    with torch.no_grad():
        ref, got = student(x), again(x)
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()  # 8 bits per channel: close, not equal
    for name, w in student.state_dict().items():
        if w.dim() >= 2:  # per channel: half an int8 step, plus |q| <= 127 times the fp16 scale's rounding
            step = w.reshape(w.shape[0], -1).abs().amax(1) / 127
            err = (again.state_dict()[name] - w).reshape(w.shape[0], -1).abs().amax(1)
            assert bool((err <= step * (0.5 + 127 * 2**-11) + 1e-7).all()), name


def test_a_file_with_non_finite_weights_is_refused_on_load(tmp_path) -> None:
    student = anchor(TinyResNet(), mode="mix", input_size=SIZE)
    with torch.no_grad():
        next(iter(student.dacnn_anchors.parameters())).fill_(float("nan"))
    path = save(student, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="holds NaN or infinite values"):
        load(path, model=TinyResNet())


def test_weights_the_users_model_ties_are_stored_once_and_tied_again_on_load(tmp_path) -> None:
    model = TinyResNet().eval()
    model.fc2 = torch.nn.Linear(16, 10)
    model.fc2.weight = model.fc.weight  # tied by the user (as language models tie embeddings)
    path = save(model, tmp_path / "m.safetensors")
    skeleton = TinyResNet()
    skeleton.fc2 = torch.nn.Linear(16, 10)  # untied: load() ties it as it was saved
    back = load(path, model=skeleton).eval()
    assert back.fc2.weight is back.fc.weight and count_params(back) == count_params(model)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(back(x), model(x))


def test_a_converted_mnasnet_loads_again_its_modules_get_their_state_dict_version(tmp_path) -> None:
    # MNASNet refuses a state dict without the per-module version that safetensors cannot store
    model = torchvision.models.mnasnet0_5(num_classes=10).eval()
    student = anchor(model, input_size=(3, 32, 32))
    back = load(save(student, tmp_path / "m.safetensors", source=ModelSpec("torchvision", "mnasnet0_5", 10))).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), student.eval()(x))


@pytest.mark.parametrize("key", ["plan", "source", "tied"])
def test_metadata_nested_absurdly_deep_is_refused_in_one_line(tmp_path, key: str) -> None:
    from safetensors.torch import save_file

    meta = {"format": "dacnn-convert/1", "dtype": "fp32", key: "[" * 100_000 + "]" * 100_000}
    save_file(TinyResNet().state_dict(), str(tmp_path / "deep.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="malformed"):
        load(tmp_path / "deep.safetensors", model=TinyResNet())


def test_a_tied_model_file_given_as_weights_fills_in_its_tied_keys(tmp_path) -> None:
    from dacnn_convert.io.sources import read_state_dict

    model = TinyResNet()
    model.fc2 = torch.nn.Linear(16, 10)
    model.fc2.weight = model.fc.weight
    state = read_state_dict(save(model, tmp_path / "m.safetensors"))
    assert set(state) == set(model.state_dict())  # the stored-once tensor comes back under both names
    torch.testing.assert_close(state["fc2.weight"], state["fc.weight"])
