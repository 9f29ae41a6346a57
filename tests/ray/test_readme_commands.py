"""README's training examples run: the job TOML shown there, and the default `ampray train` on its own
embedded Ray (as `make run` does)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ampray.actors.aggregator import read_scalars
from ampray.job import JobConfig
from ampray.orchestrator.train import run_training

pytestmark = pytest.mark.ray
README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_job_toml_trains(ray_address, tmp_path):
    text = re.search(r"resolved config is saved as\n.*?```toml\n(.*?)```", README.read_text(), re.S).group(1)
    (tmp_path / "job.toml").write_text(text)
    job = JobConfig.load(tmp_path / "job.toml", {"run.storage_path": str(tmp_path), "run.steps": 20,
                                                 "run.address": ray_address})
    assert (job.model.kind, job.precision.hysteresis, job.run.name) == ("gpt", 2, "gpt-fp16")
    outcome = run_training(job)
    assert outcome.num_workers == 2 and sorted(outcome.final) == [0, 1]
    assert all(rec["step"] == 20 for rec in outcome.final.values())


def test_default_train_command_on_an_embedded_cluster(tmp_path):
    # `make run` runs plain `ampray train`; only the run folder is moved into tmp_path
    proc = subprocess.run([sys.executable, "-m", "ampray.orchestrator.cli", "train", "--run.storage_path",
                           str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "tensorboard --logdir" in proc.stdout and "2 worker(s), CPU" in proc.stdout
    losses = [v for _, v in read_scalars(str(tmp_path / "ampray" / "tensorboard"))["all/loss/mean"]]
    assert losses[-1] < 0.5 * losses[0]
