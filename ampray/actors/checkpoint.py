"""Full training state: save to a checkpoint folder, restore from one.

One file, `state.pt`, read back with `torch.load(weights_only=True)` (plain containers and tensors only),
plus `job.toml`, the resolved config, for people. The state holds the model (unwrapped from DDP), the
optimizer, the LR scheduler, the engine (scaler, hysteresis, counters, adaptation), the step, the RNG
states of every generator a step can draw from, and the data position, so that a restored run takes
the same next step the uninterrupted run would have.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ampray.actors.manifest import Files, verify

STATE_FILE = "state.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP's (or DataParallel's) wrapper; any other model as it is (a model of
    the user's own may have a submodule named `module`)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def rng_state() -> dict[str, Any]:
    """The generators a step can draw from: torch's CPU one, Python's, and the current CUDA device's.
    One device only: a worker uses its own GPU, while it may see others (Ray shares CUDA_VISIBLE_DEVICES
    among a node's workers), and a restart may see a different number of them or put the rank on another."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _python_rng()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _python_rng() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # written by ampray <= 0.1: one state per visible device
            device = torch.cuda.current_device()
            if device >= len(cuda):
                return
            cuda = cuda[device]
        torch.cuda.set_rng_state(cuda)


def save_checkpoint(directory: str | Path, *, model: nn.Module, optimizer, scheduler, engine, step: int,
                    data_state: dict[str, Any], job: dict[str, Any], job_toml: str = "",
                    files: Files | None = None, sharded_world: int = 0) -> Path:
    """Write the whole training state into `directory` (created); returns the state file. With `files`
    (rank 0's manifest in the making) the files are hashed as they are written and the caller seals the
    manifest once every file of the rank is in; without, this writes and seals a one-rank checkpoint.
    `sharded_world` > 0 (FSDP): model and optimizer are left out, every rank writes its own shards of them
    (`sharded_state.save_shards`), and the state records over how many ranks."""
    directory = Path(directory)
    own = files is None
    files = files if files is not None else Files(directory, 0)
    # The engine first: its state_dict settles a deferred optimizer step (and the scheduler step that goes
    # with it), which the optimizer's and scheduler's states below must include.
    engine_state = engine.state_dict()
    state = {
        "format": 1,
        "step": int(step),
        "model": None if sharded_world else unwrap(model).state_dict(),
        "optimizer": None if sharded_world else optimizer.state_dict(),
        "sharded": {"world": int(sharded_world)} if sharded_world else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "engine": engine_state,
        "rng": rng_state(),
        "data": dict(data_state),
        "job": job,
    }
    path = files.save(STATE_FILE, state)
    if job_toml:
        files.text("job.toml", job_toml)
    if own:
        files.seal(world=1)
    return path


class CheckpointError(RuntimeError):
    """A checkpoint that does not verify against its manifest."""


def load_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The state of a checkpoint, verified first (every rank's manifest, every file's size and SHA-256)."""
    reason = verify(directory)
    if reason is not None:
        raise CheckpointError(f"checkpoint {directory} does not verify: {reason}")
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def restore(state: dict[str, Any], *, model: nn.Module, optimizer, scheduler, engine,
            shards: tuple[Path, int, int] | None = None) -> int:
    """Load a checkpoint's state into live objects; returns the step to continue from. The engine's state
    is checked before anything is loaded: one it cannot take changes nothing."""
    engine.check_state(state["engine"])
    if state.get("shards_in_memory") is not None:  # a rollback's snapshot of an FSDP model (same world)
        from ampray.actors.sharded_state import load_local_state

        load_local_state(state["shards_in_memory"], model, optimizer)
    elif state.get("sharded"):  # model and optimizer are in every rank's shard files: (folder, rank, world now)
        if shards is None:
            raise CheckpointError("a sharded (FSDP) checkpoint's state must be restored from its folder")
        from ampray.actors.sharded_state import load_shards

        folder, rank, world = shards
        load_shards(folder, model, optimizer, rank, world, verified=True)  # state came from load_checkpoint(folder)
    else:
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    engine.load_state_dict(state["engine"])
    set_rng_state(state["rng"])
    return int(state["step"])


def restore_folder(folder: Path, rank: int, *, model: nn.Module, optimizer, scheduler, engine,
                   batches=None, world: int = 1) -> tuple[int, dict[str, Any]]:
    """Restore a verified checkpoint folder into one rank's live objects: the shared state, then the rank's
    own RNG and engine files (and its shards of a sharded model, `world` ranks now). `batches` None leaves
    the data where it is (a rollback skips the batches that diverged). Returns (the step to continue from,
    the shared state)."""
    state = load_checkpoint(folder)
    own_engine = folder / f"engine_rank{rank}.pt"
    # The engine's state is each rank's own: the scale and hysteresis agree across ranks under DDP, but the
    # counters, the OOM policy's learned chunk size and the adaptation's measurements are the rank's.
    if own_engine.is_file():
        state["engine"] = torch.load(own_engine, weights_only=True)
    step = restore(state, model=model, optimizer=optimizer, scheduler=scheduler, engine=engine,
                   shards=(Path(folder), rank, world))
    if batches is not None:
        batches.load_state_dict(state["data"])
    own_rng = folder / f"rng_rank{rank}.pt"
    if own_rng.is_file():
        set_rng_state(torch.load(own_rng, weights_only=True))
    return step, state


def newest_verified(run_dir: Path, at_most: int) -> Path | None:
    """The run's newest checkpoint folder (checkpoint_<step>) at a step <= `at_most` that verifies against
    its manifests, or None."""
    folders = []
    for path in Path(run_dir).glob("checkpoint_*"):
        try:
            step = int(path.name.removeprefix("checkpoint_"))
        except ValueError:
            continue
        if path.is_dir() and step <= at_most:
            folders.append((step, path))
    for _, path in sorted(folders, reverse=True):
        if verify(path) is None:
            return path
    return None


def snapshot(*, model: nn.Module, optimizer, scheduler, engine, step: int) -> dict[str, Any]:
    """The state `restore` takes, in memory (on the CPU): what a rollback returns to when the run has no
    checkpoint yet."""
    import copy

    engine_state = engine.state_dict()  # first: it settles a deferred step (see save_checkpoint)
    from ampray.actors.sharded_state import cpu_copy
    from ampray.amp.sharding import is_sharded

    if is_sharded(model):
        # FSDP: this rank's shards as plain CPU tensors, put back as sharded_state puts a checkpoint's back.
        import torch.distributed as dist

        from ampray.actors.sharded_state import local_state

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return {"step": int(step), "engine": engine_state, "shards_in_memory": local_state(model, optimizer, rank, world),
                "sharded": True, "scheduler": copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None,
                "rng": rng_state()}
    return {
        "step": int(step),
        "engine": engine_state,
        "model": {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()},
        "optimizer": cpu_copy(optimizer.state_dict()),  # load_state_dict moves it back to the parameters' device
        "scheduler": copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None,
        "rng": rng_state(),
    }

