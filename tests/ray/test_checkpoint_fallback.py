"""A corrupt latest checkpoint on a real run: the rerun verifies it, sets it aside, resumes from the newest
checkpoint that verifies and ends bitwise equal to an uninterrupted run of the same steps."""

import json
from pathlib import Path

import pytest
import torch

from ampray.job import JobConfig
from ampray.orchestrator.train import run_training
from tests.unit.test_checkpoint_manifest import CORRUPTIONS

pytestmark = pytest.mark.ray


def _job(tmp_path: Path, name: str, steps: int, ray_address: str) -> JobConfig:
    return JobConfig.load(None, {
        "run.name": name, "run.storage_path": str(tmp_path), "run.steps": steps, "run.report_every": 20,
        "run.checkpoint_every": 40, "optimizer.schedule": "constant", "model.options.hidden": 32,
        "model.options.dropout": 0.1, "model.options.in_features": 32, "data.num_samples": 512,
        "data.batch_size": 32, "run.address": ray_address})


@pytest.mark.parametrize("how", ["bit flip"])  # the other corruptions: tests/unit/test_checkpoint_manifest.py
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(ray_address, tmp_path, how):
    run_dir = tmp_path / "run"
    run_training(_job(tmp_path, "run", 80, ray_address))
    CORRUPTIONS[how](run_dir / "checkpoint_000080")
    notes: list[str] = []
    outcome = run_training(_job(tmp_path, "run", 120, ray_address), notify=notes.append)
    assert any(n.startswith("checkpoint_000080 does not verify (state.pt") for n in notes), notes
    assert "falling back to checkpoint_000040, the newest checkpoint that verifies" in notes
    assert (run_dir / "unverified" / "checkpoint_000080").is_dir()
    starts = [json.loads(x)["start_step"] for x in (run_dir / "progress" / "starts.jsonl").read_text().splitlines()
              if json.loads(x)["rank"] == 0]
    assert starts == [0, 40]
    reference = run_training(_job(tmp_path, "reference", 120, ray_address))
    got = torch.load(Path(outcome.checkpoint) / "state.pt", weights_only=True)["model"]
    want = torch.load(Path(reference.checkpoint) / "state.pt", weights_only=True)["model"]
    for key in want:
        assert torch.equal(got[key], want[key]), key
