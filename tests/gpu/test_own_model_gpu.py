"""A user's own model (a dict of two input columns, a custom loss) trained on every GPU by `ampray train`,
in memory and streamed through Ray Data, with held-out evaluation under CUDA autocast. Needs Ray on the
GPU host (the .gpukit bundle)."""

import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.ray]
ray = pytest.importorskip("ray")


@pytest.mark.parametrize("dtype,streaming", [("fp16", "false"), ("bf16", "false"), ("fp16", "true")])
def test_own_model_on_every_gpu(gpu_cluster, tmp_path, monkeypatch, dtype, streaming):
    from ampray.actors.aggregator import read_scalars
    from ampray.job import JobConfig
    from ampray.orchestrator.train import run_training
    from tests.own_project import write_project

    root = write_project(tmp_path / "proj", train_rows=2048, val_rows=256, files=4)
    monkeypatch.chdir(root)
    try:
        job = JobConfig.load("job.toml", {"precision.dtype": dtype, "data.streaming": streaming,
                                          "run.name": f"own-{dtype}-{streaming}", "run.storage_path": str(tmp_path),
                                          "run.steps": 120, "run.eval_every": 40})
        outcome = run_training(job)
    finally:
        sys.modules.pop("mynets", None)
    gpus = torch.cuda.device_count()
    assert outcome.use_gpu and outcome.num_workers == gpus
    assert JobConfig.load(outcome.run_dir / "job.toml").data.streaming == streaming
    scalars = read_scalars(str(outcome.logdir))
    for rank in range(gpus):
        assert [s for s, _ in scalars[f"rank{rank}/val/loss"]] == [40, 80, 120]
        assert scalars[f"rank{rank}/memory/peak_allocated_bytes"][-1][1] > 0
        scale = scalars[f"rank{rank}/scaler/scale"][-1][1]
        assert scale == 1.0 if dtype == "bf16" else scale > 1.0
    assert outcome.aggregate["val/accuracy/mean"] > 0.6 and outcome.aggregate["val/samples/total"] == 256
    losses = [v for _, v in scalars["all/loss/mean"]]
    assert losses[-1] < 0.7 * losses[0]
