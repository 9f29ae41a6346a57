"""Checkpoint manifests: every file hashed as written, the manifest last; a resume verifies and falls back
to the newest checkpoint that verifies, setting the others aside and pointing Ray's snapshot at it."""

import json

import pytest
import torch

from ampray.actors.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ampray.actors.manifest import Files, verify
from ampray.amp.config import ConfigError
from ampray.amp.trainer import MixedPrecisionTrainer
from ampray.orchestrator.checkpoints import SNAPSHOT, settle_checkpoints


def write_checkpoint(folder, step: int, world: int = 2):
    for rank in range(world):
        files = Files(folder, rank)
        if rank == 0:
            files.save("state.pt", {"step": step, "w": torch.full((256,), float(step))})
            files.text("job.toml", "[run]\nsteps = 100\n")
        else:
            files.save(f"engine_rank{rank}.pt", {"scale": 2.0**16})
        files.save(f"rng_rank{rank}.pt", {"seed": rank})
        files.text(f"report_rank{rank}.json", json.dumps({"step": step, "rank": rank}))
        files.seal(world=world if rank == 0 else None)


def flip_bit(path, at: float = 0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x40
    path.write_bytes(data)


CORRUPTIONS = {
    "bit flip": lambda f: flip_bit(f / "state.pt"),
    "truncated": lambda f: (f / "state.pt").write_bytes((f / "state.pt").read_bytes()[:100]),
    "zero bytes": lambda f: (f / "rng_rank1.pt").write_bytes(b""),
    "deleted": lambda f: (f / "engine_rank1.pt").unlink(),
    "no manifest": lambda f: (f / "manifest_rank1.json").unlink(),
    "bad manifest": lambda f: (f / "manifest_rank0.json").write_text("{not json"),
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_verify_names_what_is_wrong(tmp_path, how):
    write_checkpoint(tmp_path, 40)
    assert verify(tmp_path) is None
    CORRUPTIONS[how](tmp_path)
    reason = verify(tmp_path)
    assert reason is not None
    expected = {"bit flip": "state.pt does not match its SHA-256", "truncated": "state.pt has 100 bytes",
                "zero bytes": "rng_rank1.pt has 0 bytes", "deleted": "engine_rank1.pt is missing",
                "no manifest": "manifest_rank1.json is missing", "bad manifest": "manifest_rank0.json cannot be read"}
    assert reason.startswith(expected[how]), reason


def test_verify_for_some_ranks_hashes_their_files_and_checks_every_size(tmp_path):
    write_checkpoint(tmp_path, 40)
    flip_bit(tmp_path / "engine_rank1.pt")
    assert verify(tmp_path, ranks=[0]) is None  # rank 0 reads none of rank 1's files
    assert verify(tmp_path, ranks=[1]).startswith("engine_rank1.pt does not match its SHA-256")
    assert verify(tmp_path).startswith("engine_rank1.pt does not match its SHA-256")
    (tmp_path / "rng_rank1.pt").write_bytes(b"")
    assert verify(tmp_path, ranks=[0]).startswith("rng_rank1.pt has 0 bytes")


def test_a_bit_flip_that_torch_load_accepts_is_refused(tmp_path):
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path, model=model, optimizer=opt, scheduler=None, engine=MixedPrecisionTrainer(device="cpu"),
                    step=5, data_state={}, job={})
    assert load_checkpoint(tmp_path)["step"] == 5
    flip_bit(tmp_path / "state.pt", 0.6)
    torch.load(tmp_path / "state.pt", weights_only=True)  # loads without a word: no CRC check in torch
    with pytest.raises(CheckpointError, match="state.pt does not match its SHA-256"):
        load_checkpoint(tmp_path)


def _run_with_snapshot(tmp_path, steps=(20, 40, 60)):
    run = tmp_path / "run"
    results = []
    for step in steps:
        write_checkpoint(run / f"checkpoint_{step:06d}", step)
        results.append({"version": 0, "checkpoint_dir_name": f"checkpoint_{step:06d}", "metrics": {"step": step}})
    (run / SNAPSHOT).write_text(json.dumps({
        "ray_version": "x", "checkpoint_results": results, "checkpoint_report_indices": [1, 3, 5],
        "latest_checkpoint_result": results[-1], "pending_training_results": [], "pending_validation_specs": [],
        "current_report_index": 6, "validated_checkpoint_dir_names": [],
        "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}))
    return run


def test_settle_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    run = _run_with_snapshot(tmp_path)
    CORRUPTIONS["bit flip"](run / "checkpoint_000060")
    CORRUPTIONS["deleted"](run / "checkpoint_000040")
    notes = settle_checkpoints(run)
    assert "checkpoint_000060 does not verify (state.pt does not match its SHA-256" in notes[0]
    assert "checkpoint_000040 does not verify (engine_rank1.pt is missing)" in notes[1]
    assert notes[-1] == "falling back to checkpoint_000020, the newest checkpoint that verifies"
    assert sorted(p.name for p in (run / "unverified").iterdir()) == ["checkpoint_000040", "checkpoint_000060"]
    snap = json.loads((run / SNAPSHOT).read_text())
    assert [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]] == ["checkpoint_000020"]
    assert snap["checkpoint_report_indices"] == [1] and snap["current_report_index"] == 6
    assert snap["latest_checkpoint_result"]["checkpoint_dir_name"] == "checkpoint_000020"
    assert settle_checkpoints(run) == []  # settled: nothing more to say


def test_a_registered_checkpoint_whose_folder_is_gone_falls_back_to_the_one_before(tmp_path):
    """The newest checkpoint folder deleted (a clean-up, a partial copy of the run folder): the run resumes
    from the newest that is there and verifies, and Ray's list no longer names the missing one."""
    import shutil

    run = _run_with_snapshot(tmp_path)
    shutil.rmtree(run / "checkpoint_000060")
    notes = settle_checkpoints(run)
    assert notes == ["checkpoint_000060, which Ray registered, is missing: taken off its checkpoint list",
                     "falling back to checkpoint_000040, the newest checkpoint that verifies"]
    snap = json.loads((run / SNAPSHOT).read_text())
    assert [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]] == ["checkpoint_000020", "checkpoint_000040"]
    assert snap["latest_checkpoint_result"]["checkpoint_dir_name"] == "checkpoint_000040"
    assert settle_checkpoints(run) == []
    for name in ("checkpoint_000020", "checkpoint_000040"):
        shutil.rmtree(run / name)
    with pytest.raises(ConfigError, match=r"no checkpoint verifies \(checkpoint_000040: its folder is missing; "
                                          r"checkpoint_000020: its folder is missing\)"):
        settle_checkpoints(run)


def test_an_unreadable_snapshot_is_rebuilt_from_the_checkpoints_that_verify(tmp_path):
    run = _run_with_snapshot(tmp_path)
    (run / SNAPSHOT).write_text('{"ray_version": "2.60.0", "checkpoint_res')
    CORRUPTIONS["truncated"](run / "checkpoint_000060")
    notes = settle_checkpoints(run)
    assert any("could not be read" in n and "rebuilt from the 2 checkpoint(s)" in n for n in notes)
    snap = json.loads((run / SNAPSHOT).read_text())
    assert [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]] == ["checkpoint_000020", "checkpoint_000040"]
    assert snap["latest_checkpoint_result"]["metrics"] == {"step": 40, "rank": 0}  # its verified rank-0 report


def test_no_checkpoint_that_verifies_stops_the_run_with_every_reason(tmp_path):
    run = _run_with_snapshot(tmp_path, steps=(20, 40))
    CORRUPTIONS["zero bytes"](run / "checkpoint_000040")
    CORRUPTIONS["no manifest"](run / "checkpoint_000020")
    with pytest.raises(ConfigError, match=r"no checkpoint verifies \(checkpoint_000040: rng_rank1.pt has 0 bytes.*"
                                          r"checkpoint_000020: manifest_rank1.json is missing"):
        settle_checkpoints(run)
    assert (run / "checkpoint_000040").is_dir()  # nothing moved when nothing can be resumed
