"""Files written by earlier releases keep loading, to the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dacnn_convert import count_params, load

DATA = Path(__file__).parent / "data"
OUTPUTS = json.loads((DATA / "v0.1-outputs.json").read_text())
UNIQUE_PARAMS = {"v0.1-squeezenet1_1-mix.safetensors": 550_986, "v0.1-resnet18-bank.safetensors": 436_042}


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_a_v0_1_checkpoint_loads_to_the_outputs_it_gave_when_written(name: str) -> None:
    model = load(DATA / name).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.tensor(OUTPUTS[name]), rtol=1e-4, atol=1e-4)
    # sharing is restored: the unique parameter count is the converted one, not the dense one
    assert count_params(model) == UNIQUE_PARAMS[name]
