"""The model and optimizer state of an FSDP run (scaling.strategy = "fsdp"): each rank writes its own shards.

Each rank writes `shard_rank<r>.pt` into the checkpoint, through the same hashing writer and manifest as
every other file (`manifest.py`): its local shard of every parameter and of every optimizer state tensor
(FSDP2 shards each along dim 0), keyed by the parameter's name, as plain tensors, so the file loads with
`torch.load(weights_only=True)`. Nothing is gathered: no rank ever holds the whole model.

- **Same world size** (a resume, a restarted worker): each rank reads its own file and puts its shards
  back into the model's and optimizer's sharded tensors bit for bit.
- **Another world size**: every rank reads every rank's file, concatenates the shards along dim 0 (the
  whole tensor, bit for bit) and loads the full state, which FSDP shards anew
  (`set_model_state_dict`/`set_optimizer_state_dict` with `full_state_dict=True`). Every rank then holds
  the whole state for a moment: the price of changing the world size. `consolidate(folder)` gives the same
  full state on any machine, to load into an unsharded model (`model.load_state_dict(full["model"])`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ampray.actors.manifest import Files

SHARD_FILE = "shard_rank{rank}.pt"
FORMAT = 1


def _is_dtensor(t: Any) -> bool:
    return torch.is_tensor(t) and type(t).__name__ == "DTensor"


def cpu_copy(t: Any) -> Any:
    """`t` with every tensor copied to the CPU, a DTensor as its local shard (a plain tensor), inside dicts
    and lists; other values as they are."""
    if _is_dtensor(t):
        return t.to_local().detach().to("cpu", copy=True)
    if torch.is_tensor(t):
        return t.detach().to("cpu", copy=True)
    if isinstance(t, dict):
        return {k: cpu_copy(v) for k, v in t.items()}
    if isinstance(t, list):
        return [cpu_copy(v) for v in t]
    return t


def local_state(model: nn.Module, optimizer, rank: int, world: int) -> dict[str, Any]:
    """This rank's shards of the model's parameters and buffers and of the optimizer's state, as plain
    tensors on the CPU (what `save_shards` writes, and a rollback's in-memory snapshot keeps)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_sd = get_model_state_dict(model)
    # An optimizer without state yet (every step so far skipped): torch's get_optimizer_state_dict would
    # create it by stepping on zero gradients, which changes the run (Adam's step count). Its groups'
    # settings are kept, so that a load into an optimizer that has stepped since puts them back.
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optim_sd = get_optimizer_state_dict(model, optimizer) if optimizer.state else {"state": {}, "param_groups": None}
    sharded = sorted(k for k, v in model_sd.items() if _is_dtensor(v))
    return {"format": FORMAT, "rank": rank, "world": world, "sharded": sharded, "model": cpu_copy(model_sd),
            "optimizer": cpu_copy(optim_sd), "groups": cpu_copy(groups)}


def save_shards(files: Files, model: nn.Module, optimizer, rank: int, world: int) -> None:
    """Write this rank's shards of the model's parameters and buffers and of the optimizer's state."""
    files.save(SHARD_FILE.format(rank=rank), local_state(model, optimizer, rank, world))


def _verify(folder: Path, ranks=None) -> None:
    from ampray.actors.checkpoint import CheckpointError
    from ampray.actors.manifest import verify

    reason = verify(folder, ranks)
    if reason is not None:
        raise CheckpointError(f"checkpoint {folder} does not verify: {reason}")


def _read(folder: Path, rank: int) -> dict[str, Any]:
    return torch.load(Path(folder) / SHARD_FILE.format(rank=rank), map_location="cpu", weights_only=True)


def load_shards(folder: Path, model: nn.Module, optimizer, rank: int, world: int, verified: bool = False) -> None:
    """Put the checkpoint's shards back into `model` and `optimizer` (sharded with FSDP over `world` ranks):
    this rank's own shards when the checkpoint was written by as many ranks, else the full state rebuilt
    from every rank's file. The checkpoint is verified first (CheckpointError); `verified=True`: the caller
    has just done that (`load_checkpoint` does)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    if not verified:  # the same world size reads this rank's file only: hash that one (every size is checked)
        from ampray.actors.manifest import saved_world

        _verify(folder, [rank] if saved_world(folder) == world else None)
    own = _read(folder, rank) if (Path(folder) / SHARD_FILE.format(rank=rank)).is_file() else None
    if own is not None and own["world"] == world:
        load_local_state(own, model, optimizer)
        return
    full = consolidate(folder, verified=True)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, full["model"], options=options)
    if full["optimizer"]["state"]:
        set_optimizer_state_dict(model, optimizer, full["optimizer"], options=options)
    else:
        _reset_optimizer(optimizer, own or _read(folder, 0))


def load_local_state(own: dict[str, Any], model: nn.Module, optimizer) -> None:
    """Put one rank's `local_state` back into the sharded model and optimizer (the same world size)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    params = _named_tensors(model)
    model_sd = {k: _shard_like(v, params.get(k)) for k, v in own["model"].items()}
    optim = own["optimizer"]
    optim_sd = {"state": {k: {n: _shard_like(v, params.get(k)) for n, v in s.items()}
                          for k, s in optim["state"].items()},
                "param_groups": optim["param_groups"]}
    set_model_state_dict(model, model_sd)
    if optim_sd["state"]:
        set_optimizer_state_dict(model, optimizer, optim_sd)
    else:
        _reset_optimizer(optimizer, own)


def _reset_optimizer(optimizer, saved: dict[str, Any]) -> None:
    """Saved before the optimizer's first step: no state (a rollback to it drops what the steps since made),
    and the groups' settings as they were (files of format 1 written before "groups" was kept have none)."""
    optimizer.state.clear()
    for group, settings in zip(optimizer.param_groups, saved.get("groups") or ()):
        group.update({k: v for k, v in settings.items() if k != "params"})


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by the names `get_model_state_dict` uses (no checkpoint-wrapper prefix)."""
    out = {}
    # Every name of a tied tensor (the gpt's lm_head.weight is its wte.weight): the state dict has both.
    for name, t in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        out[name.replace("_checkpoint_wrapped_module.", "")] = t
    return out


def _shard_like(value: Any, like: torch.Tensor | None) -> Any:
    """A saved local shard as a DTensor laid out as the live parameter `like` (same mesh, placements and
    global shape); a value of another shape (an optimizer's step count) as it is."""
    if not torch.is_tensor(value) or like is None or not _is_dtensor(like):
        return value
    local = like.to_local()
    if value.shape != local.shape:
        return value
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(value.to(local.device), like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def consolidate(folder: str | Path, verified: bool = False) -> dict[str, Any]:
    """The full model and optimizer state of a sharded checkpoint (every rank's file, shards concatenated
    along dim 0), keyed by parameter name: `{"model": ..., "optimizer": {"state": ..., "param_groups": ...}}`.
    The checkpoint is verified against its manifests first (a CheckpointError names the file that does not
    match); `verified=True`: the caller has just done that."""
    folder = Path(folder)
    if not verified:
        _verify(folder)
    first = _read(folder, 0)
    parts = [first] + [_read(folder, r) for r in range(1, first["world"])]
    sharded = set(first["sharded"])
    model = {}
    for key, value in first["model"].items():
        model[key] = torch.cat([p["model"][key] for p in parts]) if key in sharded else value
    state = {}
    for key, entries in first["optimizer"]["state"].items():
        state[key] = {}
        for name, value in entries.items():
            pieces = [p["optimizer"]["state"][key][name] for p in parts]
            joinable = key in sharded and torch.is_tensor(value) and value.dim() > 0 and \
                sum(t.shape[0] for t in pieces) == model[key].shape[0]
            state[key][name] = torch.cat(pieces) if joinable else value
    return {"model": model, "optimizer": {"state": state, "param_groups": first["optimizer"]["param_groups"]}}
