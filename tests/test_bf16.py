"""Every path under forced bf16 autocast on CPU (issue 23): a kernel cached under autocast must
never be reused in fp32, and nothing may crash on a machine (or GPU) where ``auto`` picks bf16.

CI machines may lack bf16 units; ``precision="bf16"`` forces autocast there too (slowly, on tiny
models), so these tests run everywhere.
"""

from __future__ import annotations

import pytest
import torch

from dacnn_convert import TrainConfig, anchor, compress, load, save
from dacnn_convert.bench import BenchConfig, run_bench
from dacnn_convert.core.layers import AnchoredConv2d
from dacnn_convert.core.report import count_macs
from dacnn_convert.io.dense import export_dense
from dacnn_convert.io.export import export_torchscript
from dacnn_convert.latency import measure_latency
from dacnn_convert.train import make_loaders
from dacnn_convert.train.evaluation import evaluate

from .models import TinyResNet

SIZE = (3, 16, 16)


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    return make_loaders("synthetic", batch_size=16, input_size=16)


def _merged_bank_model() -> torch.nn.Module:
    """A bank model whose convs take the merged-kernel (cached) path at inference."""
    torch.manual_seed(0)
    student = anchor(TinyResNet(), mode="bank", bank_size=1.0, input_size=SIZE).eval()
    banked = [m for m in student.modules() if isinstance(m, AnchoredConv2d) and m.coeff is not None]
    assert banked and any(m.merged_is_cheaper for m in banked)
    return student


def test_a_kernel_merged_under_bf16_autocast_is_not_reused_in_fp32() -> None:
    student = _merged_bank_model()
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = student(x)  # the first pass builds the cache, under autocast
        again = student(x)  # crashed: "Input type (float) and weight type (bfloat16) should be the same"
    with torch.enable_grad():  # the uncached path: coeff(conv(x, B)) in fp32
        reference = student(x).detach()
    assert low.dtype == torch.bfloat16 and again.dtype == torch.float32
    torch.testing.assert_close(again, reference, atol=1e-5, rtol=1e-4)  # an fp32 kernel, not a bf16 one
    assert torch.allclose(low.float(), reference, atol=0.1, rtol=0.1)
    count_macs(student, SIZE)  # the MAC count at the end of every run (where the crash surfaced)


def test_the_merged_kernel_cache_follows_the_module_to_another_dtype() -> None:
    student = _merged_bank_model()
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        student(x)  # cache an fp32 kernel
        out = student.double()(x.double())
    assert out.dtype == torch.float64


def test_evaluate_and_latency_under_bf16(data) -> None:
    student = _merged_bank_model()
    assert 0.0 <= evaluate(student, data.val, "bf16", limit_batches=1) <= 1.0
    row = measure_latency(student, SIZE, batch=2, precision="bf16", repeats=2, warmup=1)
    assert row.precision == "bf16" and row.median_ms > 0
    assert 0.0 <= evaluate(student, data.val, "fp32", limit_batches=1) <= 1.0  # and fp32 after it


def test_compress_with_bf16_finishes_with_its_report(data, tmp_path) -> None:
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=1, lr=0.01, precision="bf16", limit_batches=2)
    result = compress(
        TinyResNet().eval(),
        data.train,
        data.val,
        train=cfg,
        calib_batches=2,
        out=tmp_path,
        mode="bank",
        bank_size=1.0,
    )
    assert result.report.macs_after > 0
    assert (tmp_path / "report.md").is_file() and (tmp_path / "model.safetensors").is_file()


def test_bench_under_bf16(data, tmp_path) -> None:
    config = BenchConfig(
        ("dacnn-bank",),
        budget=0.5,
        calib_batches=1,
        latency_batches=(1,),
        latency_repeats=2,
        train=TrainConfig(epochs=1, limit_batches=1, precision="bf16"),
    )
    torch.manual_seed(0)
    result = run_bench(TinyResNet().eval(), data, SIZE, config, out=tmp_path)
    assert result.rows[0].macs > 0 and result.rows[0].latency_b1_ms


def test_exports_after_a_bf16_pass_read_the_fp32_weights(tmp_path) -> None:
    student = _merged_bank_model()
    x = torch.randn(1, *SIZE)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        student(x)
    with torch.no_grad():
        reference = student(x)
    traced = torch.jit.load(str(export_torchscript(student, tmp_path / "m.pt", SIZE)))
    torch.testing.assert_close(traced(x), reference, atol=1e-5, rtol=1e-4)
    export = export_dense(student, tmp_path / "dense.safetensors", TinyResNet(), SIZE)
    assert export.max_abs_diff is not None and export.max_abs_diff < 1e-4
    save(student, tmp_path / "s.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / "s.safetensors", model=TinyResNet()).eval()(x), reference)
