"""Sharded checkpoints (`ampray.actors.sharded_state`) in two real processes (gloo, CPU, FSDP2): a model with
tied weights (the gpt's head is its embedding) saved after some steps, loaded into a fresh sharded copy and
trained on ends bitwise equal to the run that never stopped; an optimizer with no state yet is saved
without creating any; `consolidate` gives the whole model."""

from __future__ import annotations

import json
import os
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ampray.actors.manifest import Files
from tests.unit.helpers import free_port, spawn_ranks

DEADLINE_S = 120


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class Tied(nn.Module):
    """An embedding and an output head that share one weight (5 rows: uneven shards over 2 ranks)."""

    def __init__(self, vocab: int = 5, d: int = 6):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _build():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Tied()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model, opt, step: int) -> None:
    g = torch.Generator().manual_seed(100 * step + dist.get_rank())
    idx = torch.randint(0, 5, (4, 3), generator=g)
    loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _locals(model, opt) -> dict[str, list[float]]:
    out = {f"p:{n}": p.to_local().flatten().tolist() for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in opt.state.items():
        for k, v in state.items():
            out[f"s:{names[id(p)]}:{k}"] = (v.to_local() if hasattr(v, "to_local") else v).flatten().tolist()
    return out


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    out = Path(out_dir)
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
        from ampray.actors.sharded_state import SHARD_FILE, load_shards, save_shards

        # Saved before any optimizer step: nothing is created (no zero-gradient step by torch).
        model, opt = _build()
        empty = out / "empty"
        save_shards(Files(empty, rank), model, opt, rank, world)
        assert not opt.state, "saving created optimizer state"
        saved = torch.load(empty / SHARD_FILE.format(rank=rank), weights_only=True)
        assert saved["optimizer"]["state"] == {}
        fresh, fresh_opt = _build()
        load_shards(empty, fresh, fresh_opt, rank, world)
        assert not fresh_opt.state

        # Three steps, saved, two more; against a fresh copy loaded from the save, then the same two.
        for step in range(3):
            _step(model, opt, step)
        folder = out / "ckpt"
        save_shards(Files(folder, rank), model, opt, rank, world)
        for step in range(3, 5):
            _step(model, opt, step)
        resumed, resumed_opt = _build()
        dist.barrier()
        load_shards(folder, resumed, resumed_opt, rank, world)
        assert resumed.head.weight is resumed.wte.weight  # still tied after the load
        for step in range(3, 5):
            _step(resumed, resumed_opt, step)
        same = _locals(model, opt) == _locals(resumed, resumed_opt)
        (out / f"rank{rank}.json").write_text(json.dumps({"same": same}))
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_tied_model_resumes_bitwise_from_its_shards_and_consolidates(tmp_path):
    from ampray.actors.sharded_state import consolidate

    port = free_port()
    codes, hung = spawn_ranks(_rank_main, lambda r: (r, 2, port, str(tmp_path)), 2, DEADLINE_S)
    errors = [p.read_text() for p in tmp_path.glob("rank*.err")]
    assert not hung and codes == [0, 0], (codes, hung, errors)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"same": True}
    full = consolidate(tmp_path / "ckpt")["model"]
    assert full["wte.weight"].shape == (5, 6)  # the uneven shards (3 + 2 rows) joined
    assert torch.equal(full["head.weight"], full["wte.weight"])
    single = Tied()
    single.load_state_dict(full)  # an unsharded model takes the consolidated state
