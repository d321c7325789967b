"""Fixtures the tests share."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dacnn_convert import anchor, save

from .models import TinyResNet


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    """A small converted checkpoint (TinyResNet, mix), as `dacnn-convert` writes one."""
    torch.manual_seed(0)
    model = anchor(TinyResNet(), mode="mix", input_size=(3, 16, 16))
    return save(model, tmp_path / "m.safetensors", source="tests.models:tiny_resnet")


@pytest.fixture(autouse=True)
def _short_reconstruction(monkeypatch):
    """Section-wise reconstruction runs by default whenever anchor()/compress() get data (300 steps a
    section); the fast tier's tiny models need a few steps to exercise it. Tests of the default itself
    set pipeline.DEFAULT_RECONSTRUCT back."""
    from dacnn_convert import pipeline
    from dacnn_convert.train.reconstruct import ReconstructConfig

    monkeypatch.setattr(pipeline, "DEFAULT_RECONSTRUCT", ReconstructConfig(steps=3, batches=2))
