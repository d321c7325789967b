"""The good path in Python: anchor() with data calibrates, distill() recalibrates a fresh student,
compress() is the one call the CLI also uses."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dacnn_convert import TrainConfig, anchor, compress, convert, distill, plan, recalibrate_bn
from dacnn_convert.errors import UsageError
from dacnn_convert.train import make_loaders
from dacnn_convert.train.calibrate import needs_bn_calibration

from .models import TinyResNet


def _bn_means(model: nn.Module) -> list[torch.Tensor]:
    return [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    return make_loaders("synthetic", batch_size=16, input_size=16)


def test_conversion_marks_bn_stale_and_recalibration_clears_it(data) -> None:
    teacher = TinyResNet().eval()
    student = convert(teacher, plan(teacher, mode="mix", input_size=(3, 16, 16))).model
    assert needs_bn_calibration(student) and not needs_bn_calibration(teacher)
    recalibrate_bn(student, data.train, 2)
    assert not needs_bn_calibration(student)
    untouched = convert(teacher, plan(teacher, mode="none", input_size=(3, 16, 16))).model
    assert not needs_bn_calibration(untouched)  # nothing changed, nothing to recalibrate


def test_distill_recalibrates_an_uncalibrated_student_first(data) -> None:
    teacher = TinyResNet().eval()
    student = anchor(teacher, mode="mix", input_size=(3, 16, 16))  # no data: BN statistics stale
    assert needs_bn_calibration(student)
    expected = copy.deepcopy(student)
    recalibrate_bn(expected, data.train, 3)
    cfg = TrainConfig(epochs=1, lr=1e-12, precision="fp32", limit_batches=1, channels_last=False)
    # the recalibration is what distill does before its first step: with a vanishing lr and a
    # single step, the BN statistics afterwards are the recalibrated ones updated by one batch
    result = distill(student, teacher, data.train, data.val, config=cfg, calib_batches=3)
    assert result.calibrated_batches == 3
    assert any("re-estimated on 3 training batches" in n for n in result.notes)
    assert not needs_bn_calibration(student)
    first = next(iter(data.train))[0]
    with torch.no_grad():
        bn0 = next(m for m in expected.modules() if isinstance(m, nn.BatchNorm2d))
        conv0 = next(m for m in expected.modules() if isinstance(m, nn.Conv2d))
        batch_mean = conv0(first).mean(dim=(0, 2, 3))
    after = next(m for m in student.modules() if isinstance(m, nn.BatchNorm2d)).running_mean
    torch.testing.assert_close(after, 0.9 * bn0.running_mean + 0.1 * batch_mean, atol=1e-4, rtol=1e-4)


def test_distill_leaves_a_calibrated_student_alone(data) -> None:
    teacher = TinyResNet().eval()
    student = anchor(teacher, mode="mix", calib_loader=data.train, calib_batches=2)
    assert not needs_bn_calibration(student)  # anchor() with data recalibrated already
    cfg = TrainConfig(epochs=1, lr=1e-3, precision="fp32", limit_batches=1)
    result = distill(student, teacher, data.train, data.val, config=cfg)
    assert result.calibrated_batches == 0 and result.notes == []


def test_anchor_with_data_fits_to_activations_and_recalibrates(data) -> None:
    teacher = TinyResNet().eval()
    with_data = anchor(teacher, mode="mix", calib_loader=data.train, calib_batches=2)
    assert with_data.dacnn_plan.init == "act-seq"
    assert with_data.dacnn_plan.input_size == (3, 16, 16)  # taken from the data
    by_hand = convert(
        teacher,
        plan(teacher, mode="mix", init="act-seq", input_size=(3, 16, 16)),
        calib_loader=data.train,
        calib_batches=2,
    ).model
    before = _bn_means(by_hand)
    recalibrate_bn(by_hand, data.train, 2)
    for a, b, _ in zip(_bn_means(with_data), _bn_means(by_hand), before, strict=True):
        torch.testing.assert_close(a, b)
    assert any(not torch.allclose(b, c) for b, c in zip(_bn_means(by_hand), before, strict=True))


def test_finetune_defaults_are_not_the_from_scratch_ones() -> None:
    ft, scratch = TrainConfig.finetune(), TrainConfig()
    assert ft.lr < scratch.lr and ft.warmup_steps > 0
    assert TrainConfig.finetune(lr=0.1).lr == 0.1 and TrainConfig.finetune(lr=0.1).warmup_steps == ft.warmup_steps


def test_compress_runs_the_whole_job_in_one_call(data, tmp_path) -> None:
    torch.manual_seed(0)
    teacher = TinyResNet().train()
    cfg = TrainConfig(epochs=1, lr=0.01, precision="fp32", limit_batches=2)
    result = compress(
        teacher, data.train, data.val, train=cfg, calib_batches=2, out=tmp_path, mode="mix", regulators="all"
    )
    assert result.report.mode == "mix" and result.report.regulators > 0
    assert result.model.dacnn_plan.init == "act-seq" and not needs_bn_calibration(result.model)
    assert result.fit is not None and result.fit.calibrated_batches == 0  # calibrated once, before distill
    assert {"convert", "calibrate", "reconstruct", "finetune"} <= set(result.steps)
    assert result.reconstructed_acc is not None and "after reconstruction" in result.to_markdown()
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "report.md").is_file()
    assert all(m.training for m in teacher.modules())  # the teacher comes back in the mode it was given


def test_compress_saves_in_the_requested_dtype(data, tmp_path) -> None:
    from safetensors import safe_open

    teacher = TinyResNet().eval()
    cfg = TrainConfig(epochs=1, lr=0.01, precision="fp32", limit_batches=1)
    compress(teacher, data.train, data.val, train=cfg, calib_batches=1, out=tmp_path, dtype="fp16", mode="mix")
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(k for k in f.keys() if k.endswith("conv1.weight"))).dtype == torch.float16


def test_compress_rejects_unknown_options_and_plan_plus_options(data) -> None:
    teacher = TinyResNet().eval()
    with pytest.raises(UsageError, match="unknown option.*modee.*Did you mean: mode.*AnchorConfig's"):
        compress(teacher, data.train, data.val, modee="mix")
    p = plan(teacher, mode="mix", input_size=(3, 16, 16))
    with pytest.raises(UsageError, match="either a Plan or settings"):
        compress(teacher, data.train, data.val, p, mode="mix")


def test_every_public_name_resolves_lazily_and_no_function_is_shadowed_by_a_submodule() -> None:
    import inspect

    import dacnn_convert
    import dacnn_convert.core.convert
    import dacnn_convert.train.loop  # binds the submodule names on their packages

    assert sorted(dacnn_convert.__all__) == sorted(dacnn_convert._EXPORTS)
    for name in dacnn_convert.__all__:
        assert getattr(dacnn_convert, name) is not None, name
    assert inspect.isfunction(dacnn_convert.distill) and inspect.isfunction(dacnn_convert.convert)
    assert dacnn_convert.distill is distill and dacnn_convert.convert is convert


def test_anchor_takes_a_size_target_and_plans_with_the_data(data) -> None:
    from dacnn_convert import count_params

    teacher = TinyResNet().eval()
    student = anchor(teacher, target_ratio=1.5, calib_loader=data.train, calib_batches=2)
    assert student.dacnn_plan.mode == "budget" and student.dacnn_plan.init == "act"
    assert count_params(student) <= count_params(teacher) / 1.5
    assert not needs_bn_calibration(student)


def test_the_stale_bn_mark_survives_save_and_load(tmp_path, data) -> None:
    from dacnn_convert import load, save

    stale = anchor(TinyResNet(), mode="mix", input_size=(3, 16, 16))
    fresh = anchor(TinyResNet(), mode="mix", calib_loader=data.train, calib_batches=1)
    assert needs_bn_calibration(load(save(stale, tmp_path / "a.safetensors"), model=TinyResNet()))
    assert not needs_bn_calibration(load(save(fresh, tmp_path / "b.safetensors"), model=TinyResNet()))


def test_apply_takes_calibration_data_for_a_data_aware_plan(data) -> None:
    from dacnn_convert import apply

    teacher = TinyResNet().eval()
    p = plan(teacher, input_size=(3, 16, 16), calib_loader=data.train)
    assert p.init == "act-seq"
    student = apply(teacher, p, calib_loader=data.train, calib_batches=2)
    reference = convert(teacher, p, calib_loader=data.train, calib_batches=2).model
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(student.eval()(x), reference.eval()(x))


def test_anchor_reads_the_calibration_data_once_per_pass() -> None:
    class Counting:
        """A re-iterable loader that counts how often it is started."""

        def __init__(self) -> None:
            self.starts = 0
            self.batches = [(torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))] * 2

        def __iter__(self):
            self.starts += 1
            return iter(self.batches)

    data = Counting()
    anchor(TinyResNet(), calib_loader=data, calib_batches=2)
    # the plan reads one batch to check its shape, then the sequential fit takes a pass per share group
    # (2 here), the BN step one and the reconstruction one (it holds its batches); checking for one-shot
    # iterators starts no pass (it read 7 before, 6 while anchor() and plan() each checked the shape)
    assert data.starts == 5
