"""PBT mutates the scaler settings of a live run from checkpoints; a search whose driver is SIGKILLed
resumes with `--resume` and ends with every trial finished exactly once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from ampray.orchestrator.cli import main
from ampray.job import JobConfig
from ampray.orchestrator.search import SearchConfig, run_search

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
SMALL = {"model.options.hidden": 32, "model.options.in_features": 16, "data.num_samples": 512,
         "data.batch_size": 32, "run.adaptive": False}


def starts(run_dir: Path) -> list[dict]:
    path = run_dir / "progress" / "starts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_until_the_job_is_gone(driver_pid: int, timeout_s: float = 60) -> None:
    """The killed driver's actors (trial actors and the Train runs they own) go down with its job."""
    from ray.util.state import list_actors, list_jobs

    def pid_of(job) -> str:
        info = job.driver_info
        return str(info.get("pid") if isinstance(info, dict) else getattr(info, "pid", ""))

    job_ids = [j.job_id for j in list_jobs() if j.job_id and pid_of(j) == str(driver_pid)]
    assert job_ids, f"no Ray job for the driver pid {driver_pid}"
    deadline = time.time() + timeout_s
    while list_actors(filters=[("job_id", "=", job_ids[0]), ("state", "=", "ALIVE")]):
        assert time.time() < deadline, "actors of the killed search are still alive"
        time.sleep(0.5)


def registered_step(run_dir: Path) -> int:
    """The step of the latest checkpoint Ray Train had registered for a run (0: none)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return 0
    names = [c["checkpoint_dir_name"] for c in json.loads(snapshot.read_text())["checkpoint_results"]]
    return max((int(n.split("_")[1]) for n in names), default=0)


def test_pbt_clones_the_better_trial_and_retunes_its_scaler(ray_address, tmp_path):
    # growth_interval 1 doubles an fp16 scale of 2^24 after every clean step, so that trial overflows
    # again and again and scores worse (skip penalty): at the perturbation it continues from the other
    # trial's checkpoint, with a perturbed backoff_factor applied through the engine's setter.
    space = tmp_path / "space.toml"
    space.write_text('[params]\n"precision.growth_interval" = { choice = [1, 1000] }\n'
                     '"precision.backoff_factor" = { uniform = [0.3, 0.7] }\n'
                     '[fixed]\n"precision.init_scale" = 16777216.0\n"precision.dtype" = "fp16"\n')
    job = JobConfig.load(None, {**SMALL, "run.steps": 40, "run.report_every": 10,
                                "run.storage_path": str(tmp_path), "run.address": ray_address})
    search = SearchConfig(space=str(space), samples=2, scheduler="pbt", name="pbt", seed=1,
                          perturbation_interval=20, pbt_synch=True, skip_penalty=10.0)
    out = run_search(job, search)
    rows = pq.read_table(out["folder"] / "results.parquet").to_pylist()
    assert len(rows) == 2 and {r["status"] for r in rows} == {"completed"}
    trials = out["folder"] / "trials"
    # Under synch PBT every trial pauses at the interval and restarts from a checkpoint (a "-g1" run);
    # the exploited one restarted from the *other* trial's state with mutated settings: a retune event.
    retuned = {}
    for run in sorted(p for p in trials.iterdir() if "-g" in p.name):
        final = torch.load(run / "checkpoint_000040" / "state.pt", weights_only=True)
        events = [e for e in final["engine"]["events"] if e["kind"] == "retune"]
        if events:
            retuned[run] = (final, events)
    assert len(retuned) == 1, f"expected exactly one exploited trial, got {sorted(r.name for r in retuned)}"
    clone, (final, retunes) = next(iter(retuned.items()))
    assert starts(clone)[0]["start_step"] == 20  # continued from the checkpoint at the perturbation, not 0
    assert retunes[0]["optimizer_step"] == 20
    assert "backoff_factor" in retunes[0]["changes"]
    mutated = retunes[0]["changes"]["backoff_factor"][1]
    assert final["engine"]["config"]["backoff_factor"] == pytest.approx(mutated)
    row = next(r for r in rows if clone.name.startswith(r["trial"]))
    assert row["precision.backoff_factor"] == pytest.approx(mutated)  # what Tune reports is what ran
    assert row["step"] == 40
    # The clone's state at the perturbation was the better trial's: its growth_interval travelled along.
    assert row["precision.growth_interval"] == 1000 or "growth_interval" in retunes[0]["changes"]


def test_killed_search_resumes_and_finishes_every_trial_once(ray_address, tmp_path):
    name, steps = "killed", 40
    args = ["tune", "--address", ray_address, "--space", "scaler", "--samples", "3", "--scheduler", "fifo",
            "--max-concurrent", "2", "--name", name, "--run.storage_path", str(tmp_path),
            "--model.options.hidden", "32", "--model.options.in_features", "16", "--data.num_samples", "512",
            "--data.batch_size", "32", "--run.steps", str(steps), "--run.report_every", "10",
            "--run.checkpoint_every", "20", "--run.adaptive", "false"]
    driver = subprocess.Popen([sys.executable, "-m", "ampray.orchestrator.cli", *args], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    trials = tmp_path / name / "trials"
    try:
        deadline = time.time() + 240
        # Kill once one trial has finished: with 3 trials, 2 at a time, the others are then running or
        # waiting to start.
        while time.time() < deadline:
            runs = list(trials.glob("trial_*")) if trials.exists() else []
            if any((r / f"checkpoint_{steps:06d}").is_dir() for r in runs):
                break
            assert driver.poll() is None, "the search ended before it could be killed"
            time.sleep(0.1)
        else:
            pytest.fail("no trial finished within 240 s")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert not (tmp_path / name / "results.parquet").exists()
    _wait_until_the_job_is_gone(driver.pid)
    latest = {r.name: registered_step(r) for r in trials.glob("trial_*")}

    assert main(["tune", "--resume", name, "--address", ray_address, "--run.storage_path", str(tmp_path)]) == 0
    rows = pq.read_table(tmp_path / name / "results.parquet").to_pylist()
    assert len(rows) == 3 and len({r["trial"] for r in rows}) == 3
    assert all(r["status"] == "completed" and r["step"] == steps for r in rows), [(r["trial"], r["status"], r["step"]) for r in rows]
    for row in rows:
        run = trials / row["trial"]
        begun = [s["start_step"] for s in starts(run) if s["rank"] == 0]
        # The first start was from 0; a rerun continued from the latest checkpoint Train had registered
        # at the kill (a trial that had finished only reports its end again).
        assert begun[0] == 0 and len(begun) <= 2, begun
        if len(begun) == 2:
            assert begun[1] == latest.get(row["trial"], 0), (row["trial"], begun, latest)
