"""DDP with shared (anchored) parameters: 2 gloo processes on CPU end with identical weights."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dacnn_convert import anchor

from .models import TinyResNet


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    student = anchor(TinyResNet(), mode="mix", regulators="all", input_size=(3, 16, 16))
    ddp = torch.nn.parallel.DistributedDataParallel(student)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    for _ in range(3):
        x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    flat = torch.cat([p.detach().flatten() for p in student.parameters()])
    torch.save(flat, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_ranks_identical_parameters(tmp_path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    start = torch.cat([p.detach().flatten() for p in _fresh().parameters()])
    assert not torch.equal(a, start)  # training did move the shared kernels


def _fresh() -> torch.nn.Module:
    torch.manual_seed(0)
    return anchor(TinyResNet(), mode="mix", regulators="all", input_size=(3, 16, 16))
