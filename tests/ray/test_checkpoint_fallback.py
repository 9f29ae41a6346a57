"""A corrupt latest checkpoint on a real run: the rerun verifies it, sets it aside, resumes from the newest
checkpoint that verifies and ends bitwise equal to an uninterrupted run of the same steps: a flipped bit, a
truncated file, a zero-byte file and a deleted file (the manifest cases: tests/unit/test_checkpoint_manifest.py)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from ampray.job import JobConfig
from ampray.orchestrator.train import run_training
from tests.unit.test_checkpoint_manifest import CORRUPTIONS

pytestmark = pytest.mark.ray


def _job(storage: Path, name: str, steps: int, ray_address: str) -> JobConfig:
    return JobConfig.load(None, {
        "run.name": name, "run.storage_path": str(storage), "run.steps": steps, "run.report_every": 20,
        "run.checkpoint_every": 40, "optimizer.schedule": "constant", "model.options.hidden": 32,
        "model.options.dropout": 0.1, "model.options.in_features": 32, "data.num_samples": 512,
        "data.batch_size": 32, "run.address": ray_address})


@pytest.fixture(scope="module")
def runs(ray_address, tmp_path_factory):
    """One run to step 80 (checkpoints 40 and 80) to copy for each corruption, and the uninterrupted run to
    step 120 that each rerun must end bitwise equal to."""
    root = tmp_path_factory.mktemp("fallback")
    run_training(_job(root / "original", "run", 80, ray_address))
    reference = run_training(_job(root / "reference", "run", 120, ray_address))
    return root / "original" / "run", torch.load(Path(reference.checkpoint) / "state.pt", weights_only=True)["model"]


@pytest.mark.parametrize("how,reason", [("bit flip", "state.pt does not match its SHA-256"),
                                        ("truncated", "state.pt has 100 bytes"),
                                        ("zero bytes", "rng_rank1.pt has 0 bytes"),
                                        ("deleted", "engine_rank1.pt is missing")])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(ray_address, runs, tmp_path, how, reason):
    original, want = runs
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)  # Ray's snapshot names the checkpoints relative to the run's folder
    CORRUPTIONS[how](run_dir / "checkpoint_000080")
    notes: list[str] = []
    outcome = run_training(_job(tmp_path, "run", 120, ray_address), notify=notes.append)
    assert any(n.startswith(f"checkpoint_000080 does not verify ({reason}") for n in notes), notes
    assert "falling back to checkpoint_000040, the newest checkpoint that verifies" in notes
    assert (run_dir / "unverified" / "checkpoint_000080").is_dir()
    starts = [json.loads(x)["start_step"] for x in (run_dir / "progress" / "starts.jsonl").read_text().splitlines()
              if json.loads(x)["rank"] == 0]
    assert starts == [0, 40]
    got = torch.load(Path(outcome.checkpoint) / "state.pt", weights_only=True)["model"]
    for key in want:
        assert torch.equal(got[key], want[key]), key
