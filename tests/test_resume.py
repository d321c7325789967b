"""A run killed mid-epoch and resumed ends exactly where an uninterrupted run ends (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

from dacnn_convert.train import TrainConfig, make_loaders, train

from .faults import Killed, kill_after
from .models import TinyResNet


def _run(out, stop_after=None, resume=False):
    torch.manual_seed(0)
    model = TinyResNet()
    loaders = make_loaders("synthetic", batch_size=64, input_size=16)  # 8 batches per epoch
    cfg = TrainConfig(epochs=2, lr=0.05, precision="fp32", checkpoint_every=3)
    if stop_after is not None:
        with pytest.raises(Killed):
            train(model, loaders.train, loaders.val, cfg, out=out, on_step=kill_after(stop_after))
        return model, None
    result = train(model, loaders.train, loaders.val, cfg, out=out, resume=resume)
    return model, result


def test_resume_after_kill_matches_uninterrupted(tmp_path) -> None:
    reference, ref_result = _run(tmp_path / "a")
    for kill_at in (5, 11):  # mid-epoch 1 (last checkpoint at step 3) and mid-epoch 2 (step 9)
        out = tmp_path / f"b{kill_at}"
        _run(out, stop_after=kill_at)
        assert (out / "state.pt").is_file()
        resumed, result = _run(out, resume=True)
        for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
            torch.testing.assert_close(b, a, atol=0, rtol=0, msg=name)
        assert result.final_acc == ref_result.final_acc
        assert [h["epoch"] for h in result.history] == [1, 2]
    rows = (tmp_path / "a" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,train_acc,val_acc") and len(rows) == 3


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "not a readable training state"),
        ("foreign", "not a dacnn training state"),
        ("model", "belongs to another model"),
        ("optimizer", "written with optimizer sgd, this run uses adamw"),
        ("batch", "written with 2 steps per epoch and this run has 1"),
    ],
)
def test_resume_checks_the_state_file_first_and_says_what_differs(tmp_path, damage, message) -> None:
    from dacnn_convert.train import TrainConfig, make_loaders, train
    from dacnn_convert.train.state import ResumeError

    from .models import TinyResNet

    loaders = make_loaders("synthetic", batch_size=16, input_size=16)
    cfg = TrainConfig(epochs=1, lr=1e-3, precision="fp32", limit_batches=2)
    train(TinyResNet(), loaders.train, loaders.val, cfg, out=tmp_path)
    state = tmp_path / "state.pt"
    model, again = TinyResNet(), {**cfg.__dict__, "epochs": 2}
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(2)}, state)
    elif damage == "model":
        model = TinyResNet(width=4)
    elif damage == "optimizer":
        again["optimizer"] = "adamw"
    else:
        again["limit_batches"] = 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ResumeError, match=message):
        train(model, loaders.train, loaders.val, TrainConfig(**again), out=tmp_path, resume=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-restored
