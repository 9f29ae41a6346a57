"""A disk that fills up during a real run: the run fails saying so, leaves no checkpoint behind that does not
verify, and once space is free the rerun resumes from the last complete checkpoint and ends bitwise equal
to an uninterrupted run. The run's storage is a small tmpfs of its own (mounting one needs root: skipped
without)."""

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from ampray.actors.manifest import verify
from ampray.job import JobConfig
from ampray.orchestrator.train import run_training

pytestmark = pytest.mark.ray


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _job(storage: Path, name: str, steps: int, ray_address: str) -> JobConfig:
    return JobConfig.load(None, {
        "run.name": name, "run.storage_path": str(storage), "run.steps": steps, "run.report_every": 20,
        "run.checkpoint_every": 40, "optimizer.schedule": "constant", "model.options.hidden": 32,
        "model.options.dropout": 0.1, "model.options.in_features": 32, "data.num_samples": 512,
        "data.batch_size": 32, "run.address": ray_address, "precision.dtype": "bf16"})


def _fill_when(run_dir: Path, step: int, stop: threading.Event, filler: Path) -> None:
    """Fill the disk once rank 0 reports `step` or later (the next checkpoint then cannot be written)."""
    while not stop.is_set():
        try:
            at = json.loads((run_dir / "progress" / "rank0.json").read_text())["step"]
        except (OSError, ValueError, KeyError):
            at = -1
        if at >= step:
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * (1 << 16))
                except OSError:
                    pass
            return
        time.sleep(0.02)


def test_a_disk_that_fills_mid_run_leaves_only_verified_checkpoints_and_the_rerun_resumes(
        ray_address, small_disk, tmp_path):
    run_dir = small_disk / "run"
    run_training(_job(small_disk, "run", 80, ray_address))
    stop, filler = threading.Event(), small_disk / "filler"
    filling = threading.Thread(target=_fill_when, args=(run_dir, 90, stop, filler), daemon=True)
    filling.start()
    notes: list[str] = []
    try:
        with pytest.raises(Exception) as failed:
            run_training(_job(small_disk, "run", 200, ray_address), notify=notes.append)
    finally:
        stop.set()
        filling.join(10)
    assert "No space left on device" in repr(failed.value) or any(
        "No space left on device" in str(e) for e in (getattr(failed.value, "worker_failures", None) or {}).values()
    ), repr(failed.value)
    assert filler.exists(), "the disk was never filled: the run ended before step 90"
    # Nothing left behind that does not verify: each checkpoint folder is complete, or gone.
    folders = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert folders and all(verify(run_dir / name) is None for name in folders), (folders, notes)
    assert "checkpoint_000040" in folders and "checkpoint_000080" in folders
    filler.unlink()
    outcome = run_training(_job(small_disk, "run", 200, ray_address), notify=notes.append)
    starts = [json.loads(x)["start_step"] for x in (run_dir / "progress" / "starts.jsonl").read_text().splitlines()
              if json.loads(x)["rank"] == 0]
    assert starts[0] == 0 and starts[-1] in (80, 120), starts  # from the last checkpoint that was complete
    reference = run_training(_job(tmp_path, "reference", 200, ray_address))
    got = torch.load(Path(outcome.checkpoint) / "state.pt", weights_only=True)["model"]
    want = torch.load(Path(reference.checkpoint) / "state.pt", weights_only=True)["model"]
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert not os.path.exists(filler)
