"""Exports keep anchors stored once: ONNX (onnxruntime round trip), TorchScript, inspect, latency."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from dacnn_convert import anchor, count_params, export_onnx, export_torchscript, inspect_file, save
from dacnn_convert.cli import app
from dacnn_convert.latency import measure_latency

from .models import TinyResNet, randomize_bn

runner = CliRunner()


@pytest.fixture(scope="module")
def r18_mix_reg() -> torch.nn.Module:
    model = randomize_bn(torchvision.models.resnet18(num_classes=10))
    return anchor(model, mode="mix", regulators="all", input_size=(3, 32, 32)).eval()


def test_onnx_round_trip_one_initialiser_per_anchor(tmp_path, r18_mix_reg) -> None:
    result = export_onnx(r18_mix_reg, tmp_path / "m.onnx", (3, 32, 32))
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4  # onnxruntime, batch 3 (dynamic axis)
    param_bytes = 4 * count_params(r18_mix_reg)
    assert param_bytes <= result.bytes <= 1.03 * param_bytes  # no folded copy per use
    info = inspect_file(result.path)
    assert info.params == count_params(r18_mix_reg)
    users = {name: len(u) for name, _, u in info.shared}
    plan = r18_mix_reg.dacnn_plan
    for g in plan.groups:
        assert users[f"dacnn_anchors.{g.name}"] == len(g.members)


@pytest.mark.slow
def test_onnx_half_storage(tmp_path) -> None:
    student = anchor(randomize_bn(TinyResNet()), mode="mix", regulators="all", input_size=(3, 16, 16)).eval()
    full = export_onnx(student, tmp_path / "a.onnx", (3, 16, 16))
    half = export_onnx(student, tmp_path / "b.onnx", (3, 16, 16), dtype="fp16")
    assert half.bytes < full.bytes
    assert half.max_abs_diff is not None and half.max_abs_diff < 1e-2


def test_torchscript_and_inspect_every_format(tmp_path) -> None:
    student = anchor(randomize_bn(TinyResNet()), mode="plain", input_size=(3, 16, 16)).eval()
    ts = export_torchscript(student, tmp_path / "m.torchscript.pt", (3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(torch.jit.load(str(ts))(x), student(x))
    st = save(student, tmp_path / "m.safetensors")
    torch.save(student.state_dict(), tmp_path / "m.pt")
    n = count_params(student)
    for path, fmt in ((st, "safetensors"), (tmp_path / "m.pt", "state-dict"), (ts, "torchscript")):
        info = inspect_file(path)
        assert (info.format, info.params) == (fmt, n)
    anchor_name = f"dacnn_anchors.{student.dacnn_plan.groups[0].name}"
    assert inspect_file(st).shared[0][0] == anchor_name
    assert len(inspect_file(st).shared[0][2]) == len(student.dacnn_plan.groups[0].members)


def test_latency_median_and_p90_are_the_order_statistics_of_the_samples() -> None:
    from dacnn_convert.latency import _row

    row = _row("m", [5.0, 1.0, 4.0, 2.0, 3.0, 9.0, 7.0, 6.0, 8.0, 10.0, 0.5], 2, "fp32", "cpu")
    # 11 samples: the median is the 6th smallest, p90 the sample at rank round(0.9 * 10) = 9 of 0..10
    assert (row.median_ms, row.p90_ms, row.repeats) == (5.0, 9.0, 11)


def test_latency_rows_and_cli(tmp_path) -> None:
    row = measure_latency(TinyResNet(), (3, 16, 16), batch=2, repeats=3)
    assert 0 < row.median_ms <= row.p90_ms and row.repeats == 3
    result = runner.invoke(
        app,
        [
            "convert",
            "tests.models:tiny_resnet",
            "--weights",
            "none",
            "--input-size",
            "16",
            "--regulators",
            "all",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app,
        [
            "latency",
            str(tmp_path / "model.safetensors"),
            "--batch",
            "1,4",
            "--repeats",
            "2",
            "--model",
            "tests.models:tiny_resnet",
        ],
    )
    assert result.exit_code == 0, result.output
    for name in ("original", "anchored ", "anchored+reg"):
        assert name in result.output
    bad = runner.invoke(app, ["latency", str(tmp_path / "model.safetensors"), "--device", "cuda"])
    if not torch.cuda.is_available():
        assert bad.exit_code == 2 and "no CUDA device" in bad.output


def test_export_and_inspect_cli(tmp_path) -> None:
    runner.invoke(
        app, ["convert", "tests.models:tiny_resnet", "--weights", "none", "--input-size", "16", "--out", str(tmp_path)]
    )
    out = tmp_path / "m.onnx"
    result = runner.invoke(
        app,
        [
            "export",
            str(tmp_path / "model.safetensors"),
            "--format",
            "onnx",
            "--out",
            str(out),
            "--model",
            "tests.models:tiny_resnet",
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["inspect", str(out), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output)["format"] == "onnx"
    missing = runner.invoke(app, ["inspect", str(tmp_path / "nope.onnx")])
    assert missing.exit_code == 1 and "does not exist" in missing.output


@pytest.mark.slow
def test_onnx_opset_and_dynamic_spatial_axes(tmp_path, r18_mix_reg) -> None:
    import onnx
    import onnxruntime as ort

    from dacnn_convert.errors import UsageError

    with pytest.raises(UsageError, match="opset 17: the exporter .* writes opset 18 or later"):
        export_onnx(r18_mix_reg, tmp_path / "old.onnx", (3, 32, 32), opset=17)
    result = export_onnx(r18_mix_reg, tmp_path / "m.onnx", (3, 32, 32), opset=20, dynamic_spatial=True)
    proto = onnx.load(str(result.path))
    assert proto.opset_import[0].version == 20
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in dims[:1]) and all(d.dim_param for d in dims[2:])  # batch, H, W symbolic
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 48, 40)  # another size than the export's
    with torch.no_grad():
        expected = r18_mix_reg(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - expected).max() < 1e-4


@pytest.mark.slow
def test_onnx_export_of_non_finite_weights_fails_and_writes_nothing(tmp_path) -> None:
    from dacnn_convert.errors import DacnnError

    model = anchor(TinyResNet(), mode="mix", input_size=(3, 16, 16)).eval()
    with torch.no_grad():
        next(iter(model.dacnn_anchors.parameters())).fill_(float("nan"))
    with pytest.raises(DacnnError, match="does not reproduce the model .max .diff. nan"):
        export_onnx(model, tmp_path / "nan.onnx", (3, 16, 16))
    assert not (tmp_path / "nan.onnx").exists()


def test_inspect_reads_torchscript_without_running_it(tmp_path, monkeypatch) -> None:
    import os
    import pickle
    import zipfile

    class Payload:  # what a hostile archive's __setstate__/reduce would run under torch.jit.load
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    bad = tmp_path / "evil.pt"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"weight": Payload()}, protocol=2))
        z.writestr("evil/constants.pkl", pickle.dumps(()))
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load runs archive code"))
    info = inspect_file(bad)
    assert info.format == "torchscript" and info.params == 0
    assert not (tmp_path / "ran").exists()
    result = runner.invoke(app, ["inspect", str(bad)])
    assert result.exit_code == 0 and not (tmp_path / "ran").exists()


def test_inspect_counts_a_real_torchscript_archive_like_the_model(tmp_path, r18_mix_reg) -> None:
    path = export_torchscript(r18_mix_reg, tmp_path / "m.pt", (3, 32, 32))
    info = inspect_file(path)
    assert info.params == count_params(r18_mix_reg) and info.param_bytes == 4 * count_params(r18_mix_reg)
    assert {name for name, _, _ in info.shared} == {
        f"dacnn_anchors.{k}" for k, _ in r18_mix_reg.dacnn_anchors.named_parameters()
    }


@pytest.mark.slow
def test_static_int8_onnx_quantizes_each_anchor_once(tmp_path) -> None:
    import onnx

    from dacnn_convert.io.export import onnx_accuracy, quantize_onnx_int8
    from dacnn_convert.train import make_loaders

    loaders = make_loaders("synthetic", batch_size=16, input_size=16)
    student = anchor(randomize_bn(TinyResNet()), mode="mix", input_size=(3, 16, 16)).eval()
    fp32 = export_onnx(student, tmp_path / "a.onnx", (3, 16, 16))
    result = quantize_onnx_int8(fp32.path, tmp_path / "q.onnx", loaders.train, 2)
    proto = onnx.load(str(result.path))
    inits = {i.name: i for i in proto.graph.initializer}
    names = [f"dacnn_anchors.{k}" for k, _ in student.dacnn_anchors.named_parameters()]
    assert not any(n in inits for n in names)  # no anchor left in fp32 (behind an Identity)
    assert all(inits[f"{n}_quantized"].data_type == onnx.TensorProto.INT8 for n in names)  # each quantized once
    assert sum(1 for k in inits if k.startswith("dacnn_anchors.") and k.endswith("_quantized")) == len(names)
    assert result.shared_int8 >= 1 and result.int8_weights >= len(names)  # (QDQ overhead outweighs a tiny model)
    assert 0.0 <= onnx_accuracy(result.path, loaders.val, 1) <= 1.0


@pytest.mark.slow
def test_cli_int8_onnx_needs_a_dataset(tmp_path) -> None:
    ckpt = save(
        anchor(TinyResNet(), input_size=(3, 16, 16)), tmp_path / "m.safetensors", source="tests.models:tiny_resnet"
    )
    bad = runner.invoke(
        app, ["export", str(ckpt), "--format", "onnx", "--quantize", "int8", "--model", "tests.models:tiny_resnet"]
    )
    assert bad.exit_code == 2 and "needs --dataset" in bad.output
    ok = runner.invoke(
        app,
        [
            "export",
            str(ckpt),
            "--format",
            "onnx",
            "--quantize",
            "int8",
            "--dataset",
            "synthetic",
            "--calib-batches",
            "2",
            "--limit-batches",
            "1",
            "--model",
            "tests.models:tiny_resnet",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert "int8 weights" in ok.output and "fp32" in ok.output


def test_a_safetensors_export_keeps_its_source_so_it_loads_again(tmp_path) -> None:
    from dacnn_convert import load
    from dacnn_convert.io.checkpoint import read_metadata

    model = anchor(torchvision.models.resnet18(num_classes=10), mode="mix", input_size=(3, 32, 32))
    ckpt = save(model, tmp_path / "m.safetensors", source="resnet18")
    result = runner.invoke(app, ["export", str(ckpt), "--format", "safetensors", "--dtype", "int8"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "m-int8.safetensors"
    assert json.loads(read_metadata(out)["source"]) == {"kind": "torchvision", "name": "resnet18", "num_classes": 10}
    assert count_params(load(out)) == count_params(model)  # no --model needed: the file names its source
