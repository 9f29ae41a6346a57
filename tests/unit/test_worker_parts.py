"""Pieces of the Ray Train worker loop that run without Ray: the reported loss, the objective a search
sees from it, and the local checkpoint copies a killed worker leaves behind."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
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


def _folder(tmp_path, name: str):
    import tempfile

    folder = tempfile.TemporaryDirectory(prefix=name, dir=tmp_path)
    (Path(folder.name) / "state.pt").write_bytes(b"x")
    return folder


def test_the_reporter_keeps_one_checkpoint_in_flight_and_reports_in_order(tmp_path):
    """While Ray uploads one checkpoint, the next submit with a checkpoint waits (each is a full copy on
    local disk); reports without one never wait. Every folder is deleted once handed over."""
    import threading
    import time

    from ampray.actors.worker import Reporter

    release, seen = threading.Event(), []

    def report(metrics, folder, name):
        if name == "checkpoint_000010":
            release.wait(10)  # a slow upload
        seen.append((metrics["step"], name, folder is not None and Path(folder).is_dir()))

    reporter = Reporter(tmp_path, 0, report=report)
    first, second = _folder(tmp_path, "a"), _folder(tmp_path, "b")
    reporter.submit({"step": 10}, first, "checkpoint_000010")
    reporter.submit({"step": 15}, None, "")  # no checkpoint: returns at once
    waited = threading.Thread(target=reporter.submit, args=({"step": 20}, second, "checkpoint_000020"))
    waited.start()
    time.sleep(0.3)
    assert waited.is_alive() and seen == []  # the second checkpoint waits for the first's upload
    release.set()
    waited.join(5)
    reporter.close()
    assert seen == [(10, "checkpoint_000010", True), (15, "", False), (20, "checkpoint_000020", True)]
    assert not Path(first.name).exists() and not Path(second.name).exists()
    assert json.loads((tmp_path / "progress" / "rank0.json").read_text())["step"] == 20


def test_a_failed_report_is_raised_and_no_checkpoint_copy_is_left(tmp_path):
    import threading

    import pytest

    from ampray.actors.worker import Reporter

    go = threading.Event()

    def report(metrics, folder, name):
        go.wait(10)
        raise ConnectionError("controller gone")

    reporter = Reporter(tmp_path, 0, report=report)
    first, queued, late = _folder(tmp_path, "a"), _folder(tmp_path, "b"), _folder(tmp_path, "c")
    reporter.submit({"step": 10}, None, "")
    reporter.submit({"step": 20}, first, "checkpoint_000020")
    blocked = threading.Thread(target=lambda: pytest.raises(ConnectionError, reporter.submit, {"step": 30}, queued,
                                                             "checkpoint_000030"))
    blocked.start()  # waits for the slot that the failing thread holds, then sees the error
    go.set()
    blocked.join(5)
    assert not blocked.is_alive()
    with pytest.raises(ConnectionError, match="controller gone"):
        reporter.submit({"step": 40}, late, "checkpoint_000040")
    with pytest.raises(ConnectionError):
        reporter.close()
    assert not any(Path(f.name).exists() for f in (first, queued, late))


def test_the_model_is_built_in_the_folder_the_user_started_ampray_in(tmp_path, monkeypatch):
    """Ray starts a worker in a folder of its own: the model is built in the driver's folder when the node
    has it (a relative path in model.options names the same file), and the worker's folder is restored
    after, on an error too; a folder this node lacks leaves the worker where it is."""
    import os

    from ampray.actors.worker import in_user_folder

    user, worker = tmp_path / "user", tmp_path / "worker"
    user.mkdir()
    worker.mkdir()
    (user / "weights.txt").write_text("pretrained")
    monkeypatch.chdir(worker)
    with in_user_folder(str(user)):
        assert open("weights.txt").read() == "pretrained"
    assert os.getcwd() == str(worker)
    with pytest.raises(ValueError):
        with in_user_folder(str(user)):
            raise ValueError("the factory failed")
    assert os.getcwd() == str(worker)
    for missing in (str(tmp_path / "elsewhere"), None, ""):
        with in_user_folder(missing):
            assert os.getcwd() == str(worker)
