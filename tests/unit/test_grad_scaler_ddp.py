"""ampray.GradScaler's consensus: two real processes (gloo, CPU); the gradients are all-reduced, then rank 1
alone gets an inf (as in a rank-local shard, a pipeline stage, a gradient its peers never see).

Without `process_group` the ranks split: rank 0 steps and grows, rank 1 skips and backs off, and their
parameters and scales differ from then on. With `process_group="world"` the found-inf flag is all-reduced
before `step` decides: both skip, both back off, parameters stay bitwise equal.
"""

from __future__ import annotations

import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ampray import GradScaler
from tests.unit.helpers import spawn_ranks

DEADLINE_S = 90
STEPS, FAULT_STEP, FAULT_RANK = 6, 2, 1


def _train(rank: int, process_group) -> dict:
    torch.manual_seed(0)  # the same initial weights on both ranks
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = GradScaler("cpu", init_scale=2.0**8, growth_interval=2, process_group=process_group)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    skipped, scales = [], []
    for step in range(STEPS):
        opt.zero_grad()
        x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        for p in model.parameters():  # what DDP does; the fault comes after it
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
        if rank == FAULT_RANK and step == FAULT_STEP:
            model[2].bias.grad[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        skipped.append(bool(scaler.last_step_skipped))
        scales.append(scaler.get_scale())
    return {"params": [p.detach().clone() for p in model.parameters()], "skipped": skipped, "scales": scales,
            "stats": scaler.stats().to_dict()}


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=60))
        out = {"none": _train(rank, None), "world": _train(rank, "world"),
               "group": _train(rank, dist.new_group([0, 1]))}
        dist.destroy_process_group()
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grad_scaler_ddp")
    codes, hung = spawn_ranks(_rank_main, lambda r: (r, str(tmp / "init"), str(tmp)), 2, DEADLINE_S)
    errors = {r: (tmp / f"rank{r}.err").read_text() for r in range(2) if (tmp / f"rank{r}.err").exists()}
    assert not hung, f"ranks {hung} still running after {DEADLINE_S} s; errors: {errors}"
    assert codes == [0, 0], errors
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.timeout(150)
def test_without_consensus_the_ranks_split(ranks):
    a, b = ranks[0]["none"], ranks[1]["none"]
    assert a["skipped"][FAULT_STEP] is False and b["skipped"][FAULT_STEP] is True
    assert a["scales"][FAULT_STEP] == 2.0**9 and b["scales"][FAULT_STEP] == 2.0**8
    assert not all(torch.equal(p, q) for p, q in zip(a["params"], b["params"]))


@pytest.mark.timeout(150)
@pytest.mark.parametrize("mode", ["world", "group"])
def test_with_consensus_every_rank_skips_and_stays_bitwise_equal(ranks, mode):
    a, b = ranks[0][mode], ranks[1][mode]
    expected = [step == FAULT_STEP for step in range(STEPS)]
    assert a["skipped"] == b["skipped"] == expected
    assert a["scales"] == b["scales"] == [2.0**8, 2.0**9, 2.0**8, 2.0**8, 2.0**9, 2.0**9]
    assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"]))
    assert a["stats"] == b["stats"] and a["stats"]["skipped_steps"] == 1
