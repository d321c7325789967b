"""Property tests: random small CNNs through anchor() in every mode keep their invariants."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from dacnn_convert import convert, count_params, load, plan, save

SIZE = (3, 12, 12)


class RandomNet(nn.Module):
    """Stages of conv(-BN)-ReLU units, optionally residual, with strides, kernels and groups drawn."""

    def __init__(self, stages: list[dict]) -> None:
        super().__init__()
        self.units = nn.ModuleList()
        self.residual: list[bool] = []
        cin = 3
        for s in stages:
            for i in range(s["depth"]):
                stride = s["stride"] if i == 0 else 1
                groups = s["groups"] if cin % s["groups"] == 0 and s["width"] % s["groups"] == 0 else 1
                k = s["kernel"]
                layers: list[nn.Module] = [
                    nn.Conv2d(cin, s["width"], k, stride, k // 2, groups=groups, bias=not s["bn"])
                ]
                if s["bn"]:
                    layers.append(nn.BatchNorm2d(s["width"]))
                layers.append(nn.ReLU())
                self.units.append(nn.Sequential(*layers))
                self.residual.append(s["residual"] and stride == 1 and cin == s["width"])
                cin = s["width"]
        self.head = nn.Linear(cin, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit, res in zip(self.units, self.residual, strict=True):
            x = x + unit(x) if res else unit(x)
        return self.head(x.mean(dim=(2, 3)))


stage = st.fixed_dictionaries(
    {
        "depth": st.integers(1, 3),
        "width": st.sampled_from([4, 8]),
        "stride": st.sampled_from([1, 2]),
        "kernel": st.sampled_from([1, 3]),
        "groups": st.sampled_from([1, 1, 2, 4]),
        "bn": st.booleans(),
        "residual": st.booleans(),
    }
)


ANCHOR_CASES = dict(
    stages=st.lists(stage, min_size=1, max_size=3),
    mode=st.sampled_from(["mix", "plain", "sharesnet", "none"]),
    regulators=st.sampled_from(["none", "all"]),
    seed=st.integers(0, 2**16),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**ANCHOR_CASES)
def test_anchor_invariants(stages, mode, regulators, seed) -> None:
    check_anchor_invariants(stages, mode, regulators, seed)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**ANCHOR_CASES)
def test_anchor_invariants_many(stages, mode, regulators, seed) -> None:
    check_anchor_invariants(stages, mode, regulators, seed)


def check_anchor_invariants(stages, mode, regulators, seed) -> None:
    """Shape kept, count = plan arithmetic, one tensor per anchor, mode none is the identity."""
    torch.manual_seed(seed)
    model = RandomNet(stages).eval()
    p = plan(model, mode=mode, regulators=regulators, input_size=SIZE)
    student = convert(model, p).model.eval()
    x = torch.randn(2, *SIZE)
    assert student(x).shape == model(x).shape
    assert count_params(student) == p.params_after
    anchors = dict(student.dacnn_anchors.named_parameters())
    assert len(anchors) == len(p.groups)
    for g in p.groups:  # every member reads the one anchor tensor
        for m in g.members:
            assert student.get_submodule(m).weight.data_ptr() == anchors[g.name].data_ptr()
    if mode == "none":
        torch.testing.assert_close(student(x), model(x), atol=0, rtol=0)


@settings(max_examples=25, deadline=None)
@given(stages=st.lists(stage, min_size=1, max_size=2), mode=st.sampled_from(["mix", "plain"]))
def test_save_load_round_trip_is_exact(tmp_path_factory, stages, mode) -> None:
    model = RandomNet(stages).eval()
    student = convert(model, plan(model, mode=mode, regulators="all", input_size=SIZE)).model.eval()
    path = save(student, tmp_path_factory.mktemp("rt") / "m.safetensors")
    again = load(path, model=RandomNet(stages)).eval()
    x = torch.randn(2, *SIZE)
    torch.testing.assert_close(again(x), student(x), atol=0, rtol=0)


def test_conversion_is_deterministic() -> None:
    stages = [{"depth": 2, "width": 8, "stride": 1, "kernel": 3, "groups": 1, "bn": True, "residual": True}] * 2
    torch.manual_seed(0)
    model = RandomNet(stages).eval()
    a = convert(model, plan(model, input_size=SIZE)).model.state_dict()
    b = convert(model, plan(model, input_size=SIZE)).model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_no_unsafe_deserialisation_in_the_package() -> None:
    """torch.load only with weights_only=True, YAML only through safe_load, no torch.jit.load
    (it runs an archive's code), pickle only in inspection's unpickler that resolves no global."""
    root = Path(__file__).parents[1] / "dacnn_convert"
    for f in root.rglob("*.py"):
        text = f.read_text()
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{f}: {line.strip()}"
        assert not re.search(r"yaml\.load\(|torch\.jit\.load\(|pickle\.loads?\(", text), f
        if re.search(r"^\s*import pickle", text, re.M):
            assert f.name == "inspection.py" and "def find_class" in text, f


def test_fine_tuning_is_deterministic() -> None:
    """Same seed and flags: identical metrics, epoch by epoch, and identical weights."""
    from dacnn_convert import anchor
    from dacnn_convert.train import TrainConfig, distill, make_loaders

    from .models import TinyResNet

    runs = []
    for _ in range(2):  # everything built afresh, as two processes with the same flags would
        loaders = make_loaders("synthetic", batch_size=64, input_size=16)
        torch.manual_seed(0)
        teacher = TinyResNet().eval()
        student = anchor(teacher, input_size=(3, 16, 16), calib_loader=loaders.train, calib_batches=2)
        fit = distill(student, teacher, loaders.train, loaders.val, config=TrainConfig(epochs=2, precision="fp32"))
        runs.append(([{k: v for k, v in h.items() if k != "wall_s"} for h in fit.history], student.state_dict()))
    assert runs[0][0] == runs[1][0]
    for key, value in runs[0][1].items():
        assert torch.equal(value, runs[1][1][key]), key


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stages=st.lists(stage, min_size=1, max_size=3),
    size=st.sampled_from([0.25, 0.5, 1.0, 2]),
    factorize=st.sampled_from([None, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_bank_invariants(stages, size, factorize, seed) -> None:
    """Banks: shape kept, count = plan arithmetic, one tensor per bank; full rank reproduces the original."""
    from dacnn_convert.errors import UsageError

    torch.manual_seed(seed)
    model = RandomNet(stages).eval()
    try:
        p = plan(model, mode="bank", bank_size=size, factorize_unshared=factorize, input_size=SIZE)
    except UsageError as exc:  # k above what a small group can use is refused, with the limit named
        assert "the group can use" in str(exc)
        return
    student = convert(model, p).model.eval()
    x = torch.randn(2, *SIZE)
    assert student(x).shape == model(x).shape
    assert count_params(student) == p.params_after
    assert len(dict(student.dacnn_anchors.named_parameters())) == len(p.groups)
    limits: dict[int, set[int]] = {}  # per section, k = min(members x C_out, C_in kh kw) of each bank
    for g in p.groups:
        if len(g.members) > 1:
            site = p.site(g.members[0])
            limits.setdefault(g.sections[0], set()).add(
                min(len(g.members) * site.out_channels, site.weight_numel // site.out_channels)
            )
    if limits and all(len(ks) == 1 for ks in limits.values()):  # one full rank per section: the function is unchanged
        exact = plan(model, mode="bank", bank_size={k: ks.pop() for k, ks in limits.items()}, input_size=SIZE)
        with torch.no_grad():
            torch.testing.assert_close(convert(model, exact).model.eval()(x), model(x), atol=1e-4, rtol=1e-4)
