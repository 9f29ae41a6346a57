"""scaling.strategy = "fsdp" on a real local Ray (2 CPU workers, gloo, FSDP2): the built-in gpt trains to
DDP's weights (fp32, to rounding), a user's model trains too, an overflow born on one rank that lands in
one rank's shard skips the step on every rank, and a killed worker resumes from the sharded checkpoint
bitwise equal to an uninterrupted run."""

import os
import signal
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from ampray.actors.aggregator import read_scalars
from ampray.actors.sharded_state import consolidate
from ampray.job import JobConfig
from ampray.orchestrator.train import run_training
from tests.own_project import write_project
from tests.ray.test_train import _starts, _wait_for_step

pytestmark = pytest.mark.ray

# The user's model, with an overflow injected on rank 1 only: at its `poison_at`-th training forward, the
# gradient flowing into the first layer's output gets an inf in its first unit, so only row 0 of that
# layer's weight gradient (and element 0 of its bias's) is non-finite; FSDP reduce-scatters them into the
# shards that hold row 0 (rank 0's), while rank 1's own shards stay finite.
POISON = textwrap.dedent('''
    import os

    import torch
    from torch import nn

    from mynets import Net


    class _InfIntoUnit0(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h):
            return h.view_as(h)

        @staticmethod
        def backward(ctx, grad):
            grad = grad.clone()
            grad[:, 0] = float("inf")
            return grad


    class Poisoned(Net):
        def __init__(self, poison_at: int, **options):
            super().__init__(options.get("width", 32), options.get("features", 16), options.get("classes", 4))
            self.poison_at, self.calls = poison_at, 0
            self.rank1 = os.environ.get("RANK") == "1"

        def forward(self, batch):
            x = torch.cat([batch["pixels"], batch["bonus"][:, None]], dim=1)
            first, rest = self.body[0], self.body[1:]
            h = first(x)
            if self.training:
                self.calls += 1
                if self.rank1 and self.calls == self.poison_at:
                    h = _InfIntoUnit0.apply(h)
            return rest(h)


    def build(poison_at: int = -1, **options) -> nn.Module:
        return Poisoned(poison_at, **options)
''')


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = write_project(tmp_path / "proj", train_rows=512, val_rows=130)  # 130: the ranks' eval batches differ
    (root / "poisoned.py").write_text(POISON)
    monkeypatch.chdir(root)
    return root


def _gpt_overrides(tmp_path: Path, name: str, ray_address: str, strategy: str = "fsdp") -> dict:
    return {"model.kind": "gpt", "model.options": {"preset": "nano"}, "precision.dtype": "fp32",
            "run.name": name, "run.storage_path": str(tmp_path), "run.steps": 30, "run.report_every": 10,
            "run.checkpoint_every": 30, "data.num_samples": 512, "data.batch_size": 16, "scaling.strategy": strategy,
            "optimizer.schedule": "constant", "run.address": ray_address}


def _gpt(tmp_path: Path, name: str, strategy: str, ray_address: str) -> JobConfig:
    return JobConfig.load(None, _gpt_overrides(tmp_path, name, ray_address, strategy))


def test_fsdp_trains_the_gpt_to_ddps_weights(ray_address, tmp_path):
    ddp = run_training(_gpt(tmp_path, "ddp", "ddp", ray_address))
    fsdp = run_training(_gpt(tmp_path, "fsdp", "fsdp", ray_address))
    assert sorted(p.name for p in Path(fsdp.checkpoint).glob("shard_rank*.pt")) == ["shard_rank0.pt",
                                                                                     "shard_rank1.pt"]
    assert torch.load(Path(fsdp.checkpoint) / "state.pt", weights_only=True)["model"] is None  # nothing gathered
    want = torch.load(Path(ddp.checkpoint) / "state.pt", weights_only=True)["model"]
    got = consolidate(fsdp.checkpoint)["model"]
    assert got.keys() == want.keys()
    for key in want:  # fp32: the same steps, summed in another order (reduce-scatter against all-reduce)
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
    for rank in (0, 1):
        assert fsdp.final[rank]["loss"] == pytest.approx(ddp.final[rank]["loss"], rel=1e-4)


def _own(project: Path, name: str, ray_address: str, **extra) -> JobConfig:
    return JobConfig.load("job.toml", {"run.name": name, "run.storage_path": str(project / "runs"),
                                       "run.address": ray_address, "scaling.strategy": "fsdp",
                                       "precision.dtype": "bf16", **extra})


def test_an_overflow_from_one_rank_in_one_shard_skips_the_step_on_every_rank(ray_address, project):
    outcome = run_training(_own(project, "poisoned", ray_address, **{
        "model.factory": "poisoned:build", "model.options": {"width": 64, "poison_at": 5}, "run.steps": 20}))
    for rank in (0, 1):
        assert outcome.final[rank]["perf/skipped_steps"] == 1, outcome.final[rank]
    folder = Path(outcome.checkpoint)
    engines = [torch.load(folder / "state.pt", weights_only=True)["engine"],
               torch.load(folder / "engine_rank1.pt", weights_only=True)]
    for engine in engines:  # named alike on both ranks, though only rank 0's shard held the inf
        assert engine["offenders"] == {"body.0.weight": 1, "body.0.bias": 1}, engine["offenders"]
    scalars = read_scalars(str(outcome.logdir))
    assert scalars["all/scaler/scale_disagreements"][-1][1] == 0
    losses = [v for _, v in scalars["all/loss/mean"]]
    assert all(v == v for v in losses)  # the skipped step left no NaN behind


def test_a_killed_worker_resumes_from_the_sharded_checkpoint_bitwise(ray_address, project):
    def job(name: str) -> JobConfig:
        return _own(project, name, ray_address, **{"model.options": {"width": 64, "dropout": 0.1},
                                                   "run.steps": 120, "run.max_failures": 1})

    box: dict = {}

    def target():
        try:
            box["outcome"] = run_training(job("killed"))
        except BaseException as err:  # surfaced below
            box["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    run_dir = project / "runs" / "killed"
    victim = _wait_for_step(run_dir, 1, 50)
    os.kill(victim["pid"], signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in box, box.get("error")
    assert _starts(run_dir, 1)[0] == 0 and _starts(run_dir, 1)[1] in (40, 80)
    reference = run_training(job("reference"))
    got, want = consolidate(box["outcome"].checkpoint), consolidate(reference.checkpoint)
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), key
    for key, entries in want["optimizer"]["state"].items():
        for name, value in entries.items():
            assert torch.equal(got["optimizer"]["state"][key][name], value), (key, name)


def test_the_gpt_resumes_from_its_sharded_checkpoint_bitwise(ray_address, tmp_path):
    """The built-in gpt ties its head to its embedding: a rerun loads both names from the shards."""
    def job(name: str, steps: int) -> JobConfig:
        return JobConfig.load(None, {**_gpt_overrides(tmp_path, name, ray_address), "run.steps": steps,
                                     "run.checkpoint_every": 20})

    run_training(job("resumed", 20))
    resumed = run_training(job("resumed", 40))
    straight = run_training(job("straight", 40))
    assert _starts(tmp_path / "resumed", 0) == [0, 20]
    got, want = consolidate(resumed.checkpoint), consolidate(straight.checkpoint)
    assert torch.equal(got["model"]["lm_head.weight"], got["model"]["wte.weight"])
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), key


def test_a_divergence_rolls_every_rank_back_to_its_shards_of_the_last_checkpoint(ray_address, project):
    """run.on_divergence = "rollback" under fsdp: a loss that is NaN for optimizer steps 25..29 stalls the run
    at step 29 on both ranks; each rank reloads its shards of checkpoint_000020, and since FSDP keeps the
    parameters cast to fp16 the remedy is gentler loss scaling (not bf16). The run completes. Each Linear is
    sharded on its own by a wrap policy in a module of the user's that only scaling.fsdp_blocks names (it
    reaches the workers as model.factory's module does)."""
    import math
    import sys

    from tests.ray.test_rollback import DIVERGE

    (project / "diverge.py").write_text(DIVERGE)
    (project / "wraps.py").write_text("import torch\n\n\ndef linears(module):\n"
                                      "    return isinstance(module, torch.nn.Linear)\n")
    notes: list[str] = []
    try:
        outcome = run_training(_own(project, "healed", ray_address, **{
            "model.loss": "diverge:nan_window", "precision.dtype": "fp16", "precision.stall_patience": 5,
            "run.on_divergence": "rollback", "run.steps": 60, "run.report_every": 10, "run.checkpoint_every": 20,
            "data.val_path": "", "scaling.fsdp_blocks": ["wraps:linears"]}), notify=notes.append)
    finally:
        for name in ("diverge", "wraps"):
            sys.modules.pop(name, None)
    expected = ("rolled back at optimizer step 29 to checkpoint_000020 (step 20) after TrainingStalledError: "
                "training stalled: 5 optimizer steps in a row were skipped")
    assert any(n.startswith(expected) for n in notes), notes
    assert any("remedy: gentler loss scaling" in n and "9 step(s) of data skipped" in n for n in notes), notes
    for rank in (0, 1):
        assert outcome.final[rank]["step"] == 60
        assert math.isfinite(outcome.final[rank]["loss"])
        assert outcome.final[rank]["events/rollback"] == 1.0
    folder = Path(outcome.checkpoint)
    assert sorted(p.name for p in folder.glob("shard_rank*.pt")) == ["shard_rank0.pt", "shard_rank1.pt"]
    shard = torch.load(folder / "shard_rank1.pt", weights_only=True)
    assert shard["model"]["body.0.weight"].shape == (32, 17)  # rank 1's half of the first Linear's 64 rows
    state = torch.load(folder / "state.pt", weights_only=True)
    (event,) = [e for e in state["engine"]["events"] if e["kind"] == "rollback"]
    assert (event["failed_at"], event["to_step"], event["to"]) == (29, 20, "checkpoint_000020")
    assert state["engine"]["scaler_enabled"]  # still fp16 with loss scaling, gentler
    scalars = read_scalars(str(outcome.logdir))
    assert scalars["all/scaler/scale_disagreements"][-1][1] == 0
