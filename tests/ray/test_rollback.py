"""Runs that diverge, on a real local Ray cluster (2 CPU workers, DDP over gloo, fp16 asked for: CPU workers
default to bf16): a loss that is never finite stalls and `ampray train` exits non-zero with the reason; a
loss that is NaN for a window of steps, with run.on_divergence = "rollback", rolls every rank back to the
newest verified checkpoint, falls back to bf16, skips the batches that diverged and completes; a divergence that comes back after run.max_rollbacks stops."""

import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ampray.actors.aggregator import read_scalars
from ampray.job import JobConfig
from ampray.orchestrator.cli import main
from ampray.orchestrator.train import run_training
from tests.own_project import write_project

pytestmark = pytest.mark.ray

# The user's losses: one never finite, one NaN for calls 25..29 of each worker process (one call per
# optimizer step on every rank: no held-out set, one micro-batch per step). The count lives in the
# process, which a rollback does not restart, so the window passes once.
DIVERGE = textwrap.dedent('''
    import math

    import torch.nn.functional as F

    CALLS = 0


    def always_nan(output, target):
        return F.cross_entropy(output, target) * math.nan


    def nan_window(output, target):
        global CALLS
        CALLS += 1
        loss = F.cross_entropy(output, target)
        return loss * math.nan if 25 <= CALLS <= 29 else loss
''')


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = write_project(tmp_path / "proj", train_rows=512, val_rows=64)
    (root / "diverge.py").write_text(DIVERGE)
    monkeypatch.chdir(root)
    yield root
    for name in ("mynets", "diverge"):
        sys.modules.pop(name, None)


def test_a_loss_that_is_never_finite_stops_the_run_with_the_reason(ray_address, project, capsys):
    args = ["train", "--config", "job.toml", "--address", ray_address, "--name", "stalled",
            "--run.storage_path", str(project / "runs"), "--run.steps", "40", "--data.val_path", "",
            "--model.loss", "diverge:always_nan", "--precision.dtype", "fp16",
            "--precision.stall_patience", "8",
            "--precision.dtype", "fp16"]  # explicit: CPU workers otherwise default to bf16
    assert main(args) == 1
    err = capsys.readouterr().err
    for rank in (0, 1):  # every rank stops at the same step, with the same reason
        assert (f"rank {rank}: TrainingStalledError: training stalled: 8 optimizer steps in a row were skipped "
                "(optimizer steps 1 to 8; dtype float16, loss scale 512)") in err, err[-3000:]
    assert "the loss was not finite in every one of them" in err
    assert 'The run diverged' in err and 'run.on_divergence = "rollback"' in err  # what to do about it
    assert "Traceback" not in err


def _job(project, name: str, loss: str, ray_address: str, **extra) -> JobConfig:
    return JobConfig.load("job.toml", {
        "run.name": name, "run.storage_path": str(project / "runs"), "run.steps": 60, "run.report_every": 10,
        "run.checkpoint_every": 20, "run.address": ray_address, "data.val_path": "", "model.loss": loss,
        "precision.dtype": "fp16", "precision.stall_patience": 5, "run.on_divergence": "rollback", **extra})


def test_a_divergence_rolls_back_to_the_last_checkpoint_and_the_run_completes(ray_address, project):
    notes: list[str] = []
    outcome = run_training(_job(project, "healed", "diverge:nan_window", ray_address), notify=notes.append)
    run_dir = project / "runs" / "healed"
    # Steps 25..29 skipped; the stall at step 29 rolls back to step 20; steps 21..29's batches are skipped.
    expected = ("rolled back at optimizer step 29 to checkpoint_000020 (step 20) after TrainingStalledError: "
                "training stalled: 5 optimizer steps in a row were skipped (optimizer steps 25 to 29")
    assert any(n.startswith(expected) for n in notes), notes
    assert any(n.endswith("remedy: fp16 -> bf16 without loss scaling; 9 step(s) of data skipped") for n in notes)
    for rank in (0, 1):
        assert outcome.final[rank]["step"] == 60
        assert math.isfinite(outcome.final[rank]["loss"])
        assert outcome.final[rank]["events/rollback"] == 1.0 and outcome.final[rank]["events/stall"] == 0.0
    scalars = read_scalars(str(run_dir / "tensorboard"))
    assert [v for _, v in scalars["all/events/rollback/max"]] == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    losses = [v for _, v in scalars["all/loss/mean"]]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    # No restart of the workers: the rollback happened inside the one session.
    starts = [json.loads(x) for x in (run_dir / "progress" / "starts.jsonl").read_text().splitlines()]
    assert sorted(s["rank"] for s in starts) == [0, 1] and {s["start_step"] for s in starts} == {0}
    state = torch.load(Path(outcome.checkpoint) / "state.pt", weights_only=True)
    (event,) = [e for e in state["engine"]["events"] if e["kind"] == "rollback"]
    assert (event["failed_at"], event["to_step"], event["skipped_steps"]) == (29, 20, 9)
    assert state["engine"]["amp_dtype"] == "bfloat16" and not state["engine"]["scaler_enabled"]
    # The counters are the checkpoint's: the skipped steps were rolled back with the rest.
    assert state["step"] == 60 and state["engine"]["counters"]["skipped_steps"] == 0


def test_a_divergence_that_comes_back_after_max_rollbacks_stops(ray_address, project, capsys):
    # Never finite: the stall at step 5 rolls back to the initial state (no checkpoint yet), and the bf16
    # run stalls again at step 5: with run.max_rollbacks = 1 that ends the run.
    args = ["train", "--config", "job.toml", "--address", ray_address, "--name", "relapsed",
            "--run.storage_path", str(project / "runs"), "--run.steps", "40", "--data.val_path", "",
            "--model.loss", "diverge:always_nan", "--precision.dtype", "fp16",
            "--precision.stall_patience", "5", "--precision.dtype", "fp16",
            "--run.on_divergence", "rollback", "--run.max_rollbacks", "1"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert ("rank 0: RollbackLimitError: the run diverged again after 1 rollback(s) (run.max_rollbacks=1): "
            "TrainingStalledError: training stalled: 5 optimizer steps in a row were skipped (optimizer steps 1 "
            "to 5; dtype bfloat16, loss scale none (unscaled))") in err, err[-3000:]
    log = (project / "runs" / "relapsed" / "progress" / "rollbacks.jsonl").read_text().splitlines()
    (event,) = [json.loads(line) for line in log]
    assert event["to"] == "the session's initial state" and event["failed_at"] == 5
