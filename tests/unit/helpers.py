"""Small models and fault injectors shared by the engine's unit tests."""

from __future__ import annotations

import torch
from torch import nn

from ampray.amp.trainer import OutOfMemoryError


def tiny_mlp(seed: int = 0, d_in: int = 8, hidden: int = 16, d_out: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


def batches(n: int, batch: int = 8, d_in: int = 8, d_out: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, d_in, generator=g), torch.randint(0, d_out, (batch,), generator=g))
            for _ in range(n)]


class GradPoison:
    """Makes one parameter's gradient inf on chosen calls (counted per backward)."""

    def __init__(self, param: torch.Tensor, steps: set[int] | None = None, always: bool = False):
        self.calls, self.steps, self.always = 0, steps or set(), always
        self.handle = param.register_hook(self._hook)

    def _hook(self, grad):
        self.calls += 1
        if self.always or (self.calls - 1) in self.steps:
            return torch.full_like(grad, float("inf"))
        return grad

    def remove(self):
        self.handle.remove()


class OOMAbove(nn.Module):
    """Raises torch's OutOfMemoryError when the batch is larger than `limit` rows: in forward, or in
    backward (phase="backward"), as the CUDA allocator would for a batch that does not fit."""

    def __init__(self, limit: int, phase: str = "forward"):
        super().__init__()
        self.limit, self.phase, self.raised = limit, phase, 0

    def forward(self, x):
        if x.shape[0] > self.limit and self.phase == "forward":
            self.raised += 1
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (test)")
        if self.phase == "backward":
            # the input is the first node of the graph: backward reaches it last, after every
            # parameter's gradient has been accumulated, the worst case for a retry
            return _OOMInBackward.apply(x.detach().requires_grad_(), self)
        return x


class _OOMInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, owner):
        ctx.owner = owner
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if grad.shape[0] > ctx.owner.limit:
            ctx.owner.raised += 1
            raise OutOfMemoryError("CUDA out of memory in backward (test)")
        return grad, None


def _rank_entry(target, args, log: str) -> None:
    """A spawned rank's first frame: its stdout/stderr (C++ included) go to `log`, a fatal signal dumps every
    thread's Python stack there, and the process ends with os._exit once `target` returns. Skipping the
    interpreter's shutdown keeps gloo's and the TCP store's C++ threads from racing static destructors (an
    abort, SIGABRT, after the test's work was done and written)."""
    import faulthandler
    import os
    import sys
    import traceback

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    faulthandler.enable(file=sys.stderr, all_threads=True)
    code = 0
    try:
        target(*args)
    except SystemExit as stop:
        code = 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def spawn_ranks(target, args_of_rank, world: int, deadline_s: float) -> tuple[list, list[int]]:
    """Start `world` spawned processes `target(*args_of_rank(r))`, wait up to `deadline_s` for them, kill
    the ones still running; returns their exit codes and the ranks that had to be killed (a hung
    collective fails the test on its own deadline instead of hanging the suite). The output of a rank that
    failed or hung is printed (pytest shows it with the failure): its traceback, or the C++ message and
    the Python stacks of a rank that aborted."""
    import multiprocessing as mp
    import shutil
    import tempfile
    import time
    from pathlib import Path

    ctx = mp.get_context("spawn")
    logs = Path(tempfile.mkdtemp(prefix="ranks-"))
    procs = [ctx.Process(target=_rank_entry, args=(target, args_of_rank(r), str(logs / f"rank{r}.log")))
             for r in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    codes = [p.exitcode for p in procs]
    for r, code in enumerate(codes):
        log = logs / f"rank{r}.log"
        if (code != 0 or r in hung) and log.exists():
            text = log.read_text(errors="replace")
            print(f"--- rank {r} (exit code {code}{', killed on the deadline' if r in hung else ''}) ---")
            print(text[-6000:])
    shutil.rmtree(logs, ignore_errors=True)
    return codes, hung


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process group's or a server's address)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_scenarios(names, run, rank: int, out_dir) -> None:
    """In one rank of a multi-process test: `run(name)` for each scenario; its result, or the error it raised
    (every rank must report the same one), into out_dir/rank<r>.json."""
    import json
    import traceback
    from pathlib import Path

    results = {}
    for name in names:
        try:
            results[name] = run(name)
        except Exception as err:  # the error itself is the result: every rank must report the same one
            results[name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def mesh_rank_main(scenario, rank: int, world: int, port: int, names: list[str], out_dir: str) -> None:
    """One spawned rank of a gloo world on the CPU with a 1-D device mesh over it: `scenario(name, rank,
    mesh)` for each name, through `run_scenarios` (`scenario` a module-level function, so it pickles)."""
    import os
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30))
    mesh = init_device_mesh("cpu", (world,))
    run_scenarios(names, lambda name: scenario(name, rank, mesh), rank, out_dir)
    dist.destroy_process_group()
