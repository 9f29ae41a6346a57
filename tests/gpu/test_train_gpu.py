"""`ampray train` on GPUs: one worker per GPU (NCCL when there are two), bf16 and fp16 (and fp16 with the
model compiled), every rank's CUDA allocator stats in TensorBoard. Needs Ray on the GPU host (the .gpukit
bundle)."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.ray]
ray = pytest.importorskip("ray")


@pytest.mark.parametrize("dtype,compile", [("bf16", False), ("fp16", False), ("fp16", True)])
def test_train_gpt_on_every_gpu(gpu_cluster, tmp_path, dtype, compile):
    from ampray.actors.aggregator import read_scalars
    from ampray.job import JobConfig
    from ampray.orchestrator.train import run_training

    job = JobConfig.load(None, {"model.kind": "gpt", "model.options.preset": "micro", "precision.dtype": dtype,
                                "run.name": f"gpu-{dtype}", "run.storage_path": str(tmp_path), "run.steps": 60,
                                "run.report_every": 10, "run.checkpoint_every": 30, "data.batch_size": 16,
                                "model.compile": compile})
    outcome = run_training(job)
    gpus = torch.cuda.device_count()
    assert outcome.use_gpu and outcome.num_workers == gpus
    scalars = read_scalars(str(outcome.logdir))
    for rank in range(gpus):
        assert scalars[f"rank{rank}/memory/peak_allocated_bytes"][-1][1] > 0  # the CUDA allocator's figure
        scale = scalars[f"rank{rank}/scaler/scale"][-1][1]
        assert scale == 1.0 if dtype == "bf16" else scale > 1.0  # bf16 is not loss-scaled
    losses = [v for _, v in scalars["all/loss/mean"]]
    assert losses[-1] < 0.8 * losses[0]
    assert scalars["all/scaler/scale_disagreements"][-1][1] == 0
    if compile:  # compiled on every rank once, and never again over the 60 steps
        for rank in range(gpus):
            graphs = [v for _, v in scalars[f"rank{rank}/compile/graphs"]]
            assert graphs[0] >= 1 and graphs[-1] == graphs[0], graphs
    # Each rank reports the physical GPU Ray gave it: one each, all different.
    placed = [outcome.final[rank]["placement/gpu"] for rank in range(gpus)]
    assert sorted(placed) == sorted(str(i) for i in range(gpus)), placed


def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights(gpu_cluster, tmp_path):
    """Stopped at step 20 and rerun to 40 against straight to 40, on every GPU, with dropout drawing from
    each rank's CUDA generator: the checkpoint restores model, optimizer, scaler, data position and RNG."""
    from pathlib import Path

    from ampray.job import JobConfig
    from ampray.orchestrator.train import run_training

    def job(name: str, steps: int) -> JobConfig:
        return JobConfig.load(None, {"model.options": {"hidden": 256, "dropout": 0.1}, "precision.dtype": "fp16",
                                     "optimizer.schedule": "constant", "run.name": name, "run.steps": steps,
                                     "run.storage_path": str(tmp_path), "run.report_every": 10,
                                     "run.checkpoint_every": 20, "data.batch_size": 64})

    run_training(job("resumed", 20))
    resumed = run_training(job("resumed", 40))
    straight = run_training(job("straight", 40))
    starts = (tmp_path / "resumed" / "progress" / "starts.jsonl").read_text()
    assert '"start_step": 20' in starts
    got, want = (torch.load(Path(o.checkpoint) / "state.pt", weights_only=True) for o in (resumed, straight))
    assert got["step"] == want["step"] == 40
    for key in want["model"]:
        assert torch.equal(got["model"][key], want["model"][key]), key


def test_the_cli_chooses_bf16_on_these_gpus_and_says_so(gpu_cluster, tmp_path, capsys):
    """`ampray train` with no precision set, on an H100/H200 (compute capability 9.0): bf16 chosen on the
    driver (nvidia-smi, no CUDA context there), printed as a note, and the workers train unscaled bf16."""
    from ampray.actors.aggregator import read_scalars
    from ampray.orchestrator.cli import main
    from ampray.orchestrator.train import local_gpus_bf16

    major, _ = torch.cuda.get_device_capability(0)
    assert local_gpus_bf16() is (major >= 8)
    code = main(["train", "--name", "defaults", "--model", "gpt", "--model.options.preset", "micro",
                 "--run.storage_path", str(tmp_path), "--run.steps", "20", "--run.report_every", "10",
                 "--run.checkpoint_every", "20"])
    out = capsys.readouterr().out
    assert code == 0
    if major >= 8:
        assert "precision.dtype='bf16' chosen for GPU workers" in out, out
        assert "model.compile=false: a run of 20 steps does not pay for compiling" in out, out
        scalars = read_scalars(str(tmp_path / "defaults" / "tensorboard"))
        assert scalars["rank0/scaler/scale"][-1][1] == 1.0  # unscaled bf16
    saved = (tmp_path / "defaults" / "job.toml").read_text()
    assert ('dtype = "bfloat16"' in saved or 'dtype = "bf16"' in saved) is (major >= 8), saved
