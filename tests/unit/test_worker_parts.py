"""Pieces of the Ray Train worker loop that run without Ray: the reported loss, the objective a search
sees from it, and the local checkpoint copies a killed worker leaves behind."""

import math
import os
import subprocess
import sys

import torch

from ampray.actors.worker import CHECKPOINT_TMP_PREFIX, IntervalLoss, remove_stale_checkpoint_copies
from ampray.orchestrator.search import trial_metrics


def test_the_interval_loss_is_the_mean_of_its_finite_losses_and_nan_when_none_was():
    meter = IntervalLoss(torch.device("cpu"))
    for value in (2.0, float("nan"), 4.0, float("inf")):
        meter.add(torch.tensor(value, dtype=torch.float16))
    assert meter.take() == 3.0
    assert math.isnan(meter.take())  # a fresh interval with nothing in it
    meter.add(torch.tensor(float("nan")))
    meter.add(torch.tensor(float("-inf")))
    assert math.isnan(meter.take())  # diverged: not 0, not 3.4e38


def test_a_diverged_trial_ranks_last():
    def report(rank: int, loss: float) -> dict:
        return {"step": 40, "rank": rank, "loss": loss, "perf/optimizer_steps": 40, "perf/skipped_steps": 0}

    healthy = trial_metrics([report(0, 3.0), report(1, 3.2)], skip_penalty=1.0)
    diverged = trial_metrics([report(0, 0.5), report(1, math.nan)], skip_penalty=1.0)
    assert math.isclose(healthy["objective"], 3.1)
    assert diverged["objective"] == math.inf and math.isnan(diverged["loss"])
    assert min([diverged, healthy], key=lambda r: r["objective"]) is healthy


def test_copies_left_by_dead_workers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    gone = tmp_path / f"{CHECKPOINT_TMP_PREFIX}{dead_pid}-abc"
    live = tmp_path / f"{CHECKPOINT_TMP_PREFIX}{os.getpid()}-def"
    other = tmp_path / f"{CHECKPOINT_TMP_PREFIX}notapid-x"
    for folder in (gone, live, other):
        folder.mkdir()
        (folder / "state.pt").write_bytes(b"x")
    assert remove_stale_checkpoint_copies(str(tmp_path)) == [gone]
    assert not gone.exists() and live.is_dir() and other.is_dir()
