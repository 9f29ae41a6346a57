"""`ampray train` and `ampray tune` on a user's own model, loss and Parquet columns, on a real local Ray
cluster: the model lives in the test's temporary folder (shipped to the workers), evaluation on a held-out
set lands in TensorBoard and in the table, a killed worker resumes bitwise, and a search optimises the
held-out loss."""

import math
import os
import signal
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from ampray.actors.aggregator import read_scalars, read_text
from ampray.job import JobConfig
from ampray.orchestrator.cli import main
from ampray.orchestrator.train import run_training
from tests.own_project import write_project
from tests.ray.test_train import _final_weights, _run_in_thread, _starts, _wait_for_step

pytestmark = pytest.mark.ray


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = write_project(tmp_path / "proj")
    monkeypatch.chdir(root)  # the user runs ampray where their code is
    yield root
    sys.modules.pop("mynets", None)  # each test's project is its own


def test_own_model_trains_and_evaluates_on_every_rank(ray_address, project, capsys):
    args = ["train", "--config", "job.toml", "--address", ray_address, "--name", "own", "--run.storage_path",
            str(project / "runs"), "--run.steps", "80", "--run.eval_every", "20"]
    assert main(args) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    assert "val loss" in out and "val acc" in out  # the final table's held-out columns
    logdir = project / "runs" / "own" / "tensorboard"
    scalars = read_scalars(str(logdir))
    losses = [v for _, v in scalars["all/loss/mean"]]
    assert losses[-1] < 0.6 * losses[0]
    for rank in (0, 1):
        assert [s for s, _ in scalars[f"rank{rank}/val/loss"]] == [20, 40, 60, 80]
        assert [v for _, v in scalars[f"rank{rank}/val/samples"]] == [128.0] * 4  # 256 held-out rows / 2 ranks
    val = [v for _, v in scalars["all/val/loss/mean"]]
    assert val[-1] < val[0] and val[-1] < 0.7 * math.log(4)
    assert scalars["all/val/accuracy/mean"][-1][1] > 0.6  # 4 classes: chance is 0.25
    # The cross-rank figure is the mean over all held-out samples (equal shards here: the ranks' mean).
    per_rank = [scalars[f"rank{r}/val/loss"][-1][1] for r in (0, 1)]
    assert scalars["all/val/loss/mean"][-1][1] == pytest.approx(sum(per_rank) / 2, rel=1e-6)
    (summary,) = read_text(str(logdir), "summary")
    assert "val loss" in summary and "val accuracy" in summary
    saved = JobConfig.load(project / "runs" / "own" / "job.toml")
    assert saved.model.factory == "mynets:build" and saved.model.kind == "custom"
    assert saved.data.path == str(project / "data" / "train") and saved.data.streaming == "false"


def test_killed_worker_of_an_own_model_resumes_bitwise(ray_address, project):
    def job(name: str) -> JobConfig:
        return JobConfig.load("job.toml", {
            "run.name": name, "run.storage_path": str(project / "runs"), "run.steps": 120,
            "run.checkpoint_every": 40, "run.max_failures": 1, "run.address": ray_address,
            "model.options.dropout": 0.1})  # each rank's generator is drawn from: RNG must resume too

    thread, box = _run_in_thread(job("killed"))
    victim = _wait_for_step(project / "runs" / "killed", 1, 50)
    os.kill(victim["pid"], signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in box, box.get("error")
    assert _starts(project / "runs" / "killed", 1)[1] >= 40
    reference = run_training(job("reference"))
    got, want = _final_weights(box["outcome"].checkpoint), _final_weights(reference.checkpoint)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert box["outcome"].aggregate["val/loss/mean"] == reference.aggregate["val/loss/mean"]
    # A rerun of the finished run trains nothing; its final model is evaluated on the held-out set named now:
    # the same set gives the same figures, another set (64 of the 256 rows) its own.
    again = run_training(job("reference"))
    assert again.aggregate["val/loss/mean"] == reference.aggregate["val/loss/mean"]
    assert [r["val/samples"] for r in again.final.values()] == [128, 128]
    val = project / "data" / "val.parquet"
    pq.write_table(pq.read_table(val).slice(0, 64), project / "data" / "val_small.parquet")
    small = run_training(JobConfig.from_dict({**job("reference").to_dict(),
                                              "data": {**job("reference").to_dict()["data"],
                                                       "val_path": str(project / "data" / "val_small.parquet")}}))
    assert [r["val/samples"] for r in small.final.values()] == [32, 32]
    assert small.aggregate["val/loss/mean"] != reference.aggregate["val/loss/mean"]


def test_search_over_an_own_model_optimises_the_held_out_loss(ray_address, project, capsys):
    args = ["tune", "--config", "job.toml", "--address", ray_address, "--name", "own-search", "--samples", "2",
            "--scheduler", "fifo", "--space", "scaler", "--run.storage_path", str(project / "runs"),
            "--run.steps", "40", "--run.checkpoint_every", "40"]
    assert main(args) == 0, capsys.readouterr().err[-3000:]
    folder = project / "runs" / "own-search"
    rows = pq.read_table(folder / "results.parquet").to_pylist()
    assert len(rows) == 2
    for row in rows:
        assert row["status"] == "completed" and row["val_loss"] > 0 and 0 <= row["val_accuracy"] <= 1
        assert row["objective"] == pytest.approx(row["val_loss"] + row["skip_rate"])
    best = JobConfig.load(folder / "best.toml")
    assert best.model.factory == "mynets:build" and best.data.val_path.endswith("val.parquet")
    assert main(["train", "--config", str(folder / "best.toml"), "--address", ray_address,
                 "--run.storage_path", str(project / "runs"), "--run.steps", "20", "--run.report_every", "10"]) == 0
    assert read_scalars(str(project / "runs" / best.run.name / "tensorboard"))["all/val/loss/mean"]


def test_python_api_with_functions_and_a_table(ray_address, project):
    import ampray
    from tests.own_project import teacher_data

    sys.path.insert(0, str(project))
    try:
        import mynets
    finally:
        sys.path.remove(str(project))

    def loss(output, target):  # defined here: travels to the workers by value
        return torch.nn.functional.cross_entropy(output, target)

    result = ampray.fit(model=mynets.build, loss=loss, train_data=teacher_data(512, seed=3),
                        val_data=teacher_data(64, seed=4),
                        overrides={"data.input": ["pixels", "bonus"], "data.target": "klass", "run.steps": 30,
                                   "run.report_every": 10, "run.checkpoint_every": 30, "run.name": "api",
                                   "run.storage_path": str(project / "runs"), "run.address": ray_address,
                                   "data.batch_size": 32, "optimizer.lr": 0.01})
    assert result.job.model.factory == "mynets:build" and result.job.model.loss.startswith("ampray_by_value:loss_")
    assert result.checkpoint is not None and Path(result.checkpoint, "state.pt").is_file()
    assert result.metrics["val/loss/mean"] < math.log(4) and set(result.per_rank) == {0, 1}
    assert Path(result.job.data.path).is_file()  # the table, written into the run's folder


def test_a_model_with_parameters_the_loss_ignores_trains_under_ddp(ray_address, project):
    """Without find_unused_parameters, DDP's second step fails ("Expected to have finished reduction"): the
    driver finds the unused head on one batch and the two ranks train."""
    (project / "mynets.py").write_text((project / "mynets.py").read_text() + '''

class WithAux(nn.Module):
    def __init__(self):
        super().__init__()
        self.net, self.aux = build(), nn.Linear(17, 3)

    def forward(self, batch):
        return self.net(batch)


def with_aux():
    return WithAux()
''')
    job = JobConfig.load("job.toml", {"model.factory": "mynets:with_aux", "model.options": {}, "run.steps": 20,
                                      "run.name": "aux", "run.storage_path": str(project / "runs"),
                                      "run.address": ray_address})
    outcome = run_training(job)
    assert all(r["step"] == 20 for r in outcome.final.values()) and len(outcome.final) == 2
    assert JobConfig.load(outcome.run_dir / "job.toml").scaling.find_unused_parameters == "true"


def test_a_lazy_model_that_loads_a_relative_path_trains_under_ddp(ray_address, project):
    """nn.LazyLinear learns its input size from a first forward, which every rank runs on the same rows
    before DDP wraps the model; the factory opens weights at a path relative to the folder ampray was
    started in, where the workers build the model (Ray starts them elsewhere)."""
    (project / "lazynets.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn


        class Lazy(nn.Module):
            def __init__(self, width):
                super().__init__()
                self.body = nn.Sequential(nn.LazyLinear(width), nn.GELU(), nn.Linear(width, 4))

            def forward(self, batch):
                return self.body(torch.cat([batch["pixels"], batch["bonus"][:, None]], dim=1))


        def build(width: int = 32, head: str = ""):
            model = Lazy(width)
            if head:
                model.body[2].load_state_dict(torch.load(head, weights_only=True))
            return model
    '''))
    torch.manual_seed(5)
    (project / "weights").mkdir()
    torch.save(torch.nn.Linear(64, 4).state_dict(), project / "weights" / "head.pt")
    try:
        outcome = run_training(JobConfig.load("job.toml", {
            "model.factory": "lazynets:build", "model.options.head": "weights/head.pt", "run.name": "lazy",
            "run.storage_path": str(project / "runs"), "run.steps": 60, "run.address": ray_address}))
    finally:
        sys.modules.pop("lazynets", None)
    assert outcome.num_workers == 2
    losses = [v for _, v in read_scalars(str(outcome.logdir))["all/loss/mean"]]
    assert losses[-1] < 0.7 * losses[0], losses
    weights = _final_weights(outcome.checkpoint)
    assert weights["body.0.weight"].shape == (64, 17)  # 16 pixels and the bonus, learnt from the data
