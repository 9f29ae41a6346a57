"""Sharded checkpoints (`ampray.actors.sharded_state`) in two real processes (gloo, CPU, FSDP2): a model with
tied weights (the gpt's head is its embedding) saved after some steps, loaded into a fresh sharded copy and
trained on ends bitwise equal to the run that never stopped; an optimizer with no state yet is saved
without creating any; `consolidate` gives the whole model, and refuses a shard that does not match its
manifest; the same checkpoint loads on one and on three ranks (FSDP shards the full state anew)."""

from __future__ import annotations

import json
import os
import shutil
import traceback
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
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


@contextmanager
def _gloo_rank(rank: int, world: int, port: int, err: Path):
    """One spawned rank in a gloo group of `world`; a failure's traceback goes to `err` for the test."""
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
        yield
    except BaseException:
        err.write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _save(folder: Path, model, opt, rank: int, world: int) -> None:
    """This rank's shards, sealed in its manifest (the checkpoint verifies once every rank has sealed)."""
    from ampray.actors.sharded_state import save_shards

    files = Files(folder, rank)
    save_shards(files, model, opt, rank, world)
    files.seal(world)


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    out = Path(out_dir)
    with _gloo_rank(rank, world, port, out / f"rank{rank}.err"):
        from ampray.actors.sharded_state import SHARD_FILE, load_shards

        # Saved before any optimizer step: nothing is created (no zero-gradient step by torch).
        model, opt = _build()
        empty = out / "empty"
        _save(empty, model, opt, rank, world)
        assert not opt.state, "saving created optimizer state"
        saved = torch.load(empty / SHARD_FILE.format(rank=rank), weights_only=True)
        assert saved["optimizer"]["state"] == {}
        fresh, fresh_opt = _build()
        dist.barrier()  # every rank's part sealed
        load_shards(empty, fresh, fresh_opt, rank, world)
        assert not fresh_opt.state

        # Three steps, saved, two more; against a fresh copy loaded from the save, then the same two.
        for step in range(3):
            _step(model, opt, step)
        folder = out / "ckpt"
        _save(folder, model, opt, rank, world)
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


def _load_main(rank: int, world: int, port: int, out_dir: str) -> None:
    """A world of another size loads the 2-rank checkpoint: its shards hold the consolidated state, bit for
    bit, and it trains on."""
    out = Path(out_dir)
    with _gloo_rank(rank, world, port, out / f"w{world}rank{rank}.err"):
        from ampray.actors.sharded_state import consolidate, load_shards

        model, opt = _build()
        load_shards(out / "ckpt", model, opt, rank, world)
        full = consolidate(out / "ckpt")
        names = {id(p): n for n, p in model.named_parameters()}
        same = all(torch.equal(p.full_tensor(), full["model"][n]) for n, p in model.named_parameters())
        for p, state in opt.state.items():
            for k, v in state.items():
                v = v.full_tensor() if hasattr(v, "full_tensor") else v
                same = same and torch.equal(v, full["optimizer"]["state"][names[id(p)]][k])
        _step(model, opt, 3)
        finite = all(bool(torch.isfinite(p.full_tensor()).all()) for p in model.parameters())
        (out / f"w{world}rank{rank}.json").write_text(json.dumps({"same": same, "finite": finite}))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two ranks: the save/resume scenario above; its folder holds the checkpoint `ckpt`."""
    out = tmp_path_factory.mktemp("sharded")
    port = free_port()
    codes, hung = spawn_ranks(_rank_main, lambda r: (r, 2, port, str(out)), 2, DEADLINE_S)
    errors = [p.read_text() for p in out.glob("rank*.err")]
    assert not hung and codes == [0, 0], (codes, hung, errors)
    return out


def test_a_tied_model_resumes_bitwise_from_its_shards_and_consolidates(saved):
    from ampray.actors.sharded_state import consolidate

    tmp_path = saved
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"same": True}
    full = consolidate(tmp_path / "ckpt")["model"]
    assert full["wte.weight"].shape == (5, 6)  # the uneven shards (3 + 2 rows) joined
    assert torch.equal(full["head.weight"], full["wte.weight"])
    single = Tied()
    single.load_state_dict(full)  # an unsharded model takes the consolidated state


@pytest.mark.parametrize("world", [1, 3])
def test_a_checkpoint_of_two_ranks_loads_on_another_number_of_ranks(saved, world):
    port = free_port()
    codes, hung = spawn_ranks(_load_main, lambda r: (r, world, port, str(saved)), world, DEADLINE_S)
    errors = [p.read_text() for p in saved.glob(f"w{world}rank*.err")]
    assert not hung and codes == [0] * world, (codes, hung, errors)
    for rank in range(world):
        assert json.loads((saved / f"w{world}rank{rank}.json").read_text()) == {"same": True, "finite": True}


def test_consolidate_and_load_shards_refuse_a_shard_that_does_not_match_its_manifest(saved, tmp_path):
    from ampray.actors.checkpoint import CheckpointError
    from ampray.actors.sharded_state import SHARD_FILE, consolidate, load_shards

    folder = tmp_path / "ckpt"
    shutil.copytree(saved / "ckpt", folder)
    path = folder / SHARD_FILE.format(rank=1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, inside the tensors' bytes: torch.load would not notice
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="shard_rank1.pt"):
        consolidate(folder)
    with pytest.raises(CheckpointError, match="shard_rank1.pt"):
        load_shards(folder, None, None, 1, 2)  # checked before anything is loaded
    (folder / SHARD_FILE.format(rank=0)).unlink()
    with pytest.raises(CheckpointError, match="shard_rank0.pt"):
        consolidate(folder)
