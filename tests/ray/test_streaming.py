"""Data larger than a worker's share of memory streams through Ray Data: `data.max_in_memory_mb` below the
data's size makes `auto` stream it (many files, one equal shard per worker), the run learns, resumes from
its checkpoint in streaming mode, and a ray.data.Dataset handed to `ampray.fit` streams too."""

import sys

import pyarrow.parquet as pq
import pytest

from ampray.actors.aggregator import read_scalars
from ampray.job import JobConfig
from ampray.orchestrator.cli import main
from tests.own_project import teacher_data, write_project

pytestmark = pytest.mark.ray


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = write_project(tmp_path / "proj", train_rows=16, val_rows=128, files=1)
    table = teacher_data(2048, seed=7)
    for old in (root / "data" / "train").glob("*.parquet"):
        old.unlink()
    for i in range(16):  # 16 files of 128 rows
        pq.write_table(table.slice(i * 128, 128), root / "data" / "train" / f"part-{i:02d}.parquet")
    monkeypatch.chdir(root)
    yield root
    sys.modules.pop("mynets", None)


def test_data_over_the_memory_limit_streams_learns_and_resumes(ray_address, project, capsys):
    args = ["train", "--config", "job.toml", "--address", ray_address, "--name", "stream", "--run.storage_path",
            str(project / "runs"), "--data.max_in_memory_mb", "0.05", "--run.checkpoint_every", "40"]
    assert main([*args, "--run.steps", "80"]) == 0, capsys.readouterr().err[-3000:]
    run_dir = project / "runs" / "stream"
    assert JobConfig.load(run_dir / "job.toml").data.streaming == "true"  # auto chose to stream
    scalars = read_scalars(str(run_dir / "tensorboard"))
    losses = [v for _, v in scalars["all/loss/mean"]]
    assert losses[-1] < 0.7 * losses[0]
    assert scalars["all/val/samples/total"][-1][1] == 128  # the held-out set, in memory on every rank
    # 2048 rows in two equal shards of 1024, 32 per step: an epoch is 32 steps, so step 80 is in epoch 2.
    import torch

    state = torch.load(run_dir / "checkpoint_000080" / "state.pt", weights_only=True)
    assert state["data"] == {"epoch": 2, "batch_index": 16}
    assert main([*args, "--run.steps", "100"]) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr()
    assert "resuming from checkpoint_000080" in out.err + out.out
    state = torch.load(run_dir / "checkpoint_000100" / "state.pt", weights_only=True)
    assert state["data"] == {"epoch": 3, "batch_index": 4}
    assert [s for s, _ in read_scalars(str(run_dir / "tensorboard"))["rank1/loss"]][-2:] == [90, 100]


def test_a_ray_dataset_given_to_fit_streams(ray_address, project):
    import ray.data

    import ampray

    rows = teacher_data(512, seed=9).drop(["note"])
    dataset = ray.data.from_arrow(rows)
    result = ampray.fit("job.toml", train_data=dataset,
                        overrides={"run.steps": 20, "run.report_every": 10, "run.checkpoint_every": 20,
                                   "run.name": "from-ray", "run.storage_path": str(project / "runs"),
                                   "run.address": ray_address})
    assert result.job.data.streaming == "true" and result.job.data.path == ""
    assert set(result.per_rank) == {0, 1} and all(r["step"] == 20 for r in result.per_rank.values())
    assert result.metrics["val/samples/total"] == 128


def test_streaming_with_no_cpu_left_for_ray_data_is_refused_before_any_worker(ray_address, project, capsys):
    """Ray Data reads in tasks of one CPU on what the workers leave free: 2 workers of 2 CPUs on the test
    cluster's 4 would wait at step 0 forever (seen with 2 workers on a 2-CPU machine); refused instead."""
    args = ["train", "--config", "job.toml", "--address", ray_address, "--name", "starved", "--run.storage_path",
            str(project / "runs"), "--data.streaming", "true", "--scaling.num_workers", "2",
            "--scaling.cpus_per_worker", "2", "--run.steps", "10"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert ("data.streaming: the training rows stream through Ray Data, whose reads need a CPU the workers leave "
            "free; scaling.num_workers=2 x cpus_per_worker=2 take 4 of the cluster's 4 CPUs; expected at most 3 "
            "CPUs for the workers") in err, err[-2000:]
    assert not (project / "runs" / "starved" / "checkpoint_000010").exists()


def test_streams_fit_leaves_one_cpu_for_ray_data():
    from ampray.orchestrator.train import ResourceError, streams_fit

    job = JobConfig.load(None, {"data.streaming": "true"})
    assert streams_fit(job, 2, 3.0) == 1 and streams_fit(job, 1, 8.0, trials=10) == 7
    assert streams_fit(job, 2, 8.0, trials=2) == 2 and streams_fit(job, 2, 8.0, trials=5) == 3
    assert streams_fit(JobConfig.load(None, {"data.streaming": "false"}), 2, 2.0, trials=4) == 4
    with pytest.raises(ResourceError, match="take 2 of the cluster's 2 CPUs"):
        streams_fit(job, 2, 2.0)
