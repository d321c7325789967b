"""Fixtures the reliability tests share."""

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
