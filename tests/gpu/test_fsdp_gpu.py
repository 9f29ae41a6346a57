"""scaling.strategy = "fsdp" on the GPU host: one worker (NCCL, a one-rank mesh) trains the built-in gpt in
fp16 and bf16 with the engine's scaler, the sharded checkpoint resumes bitwise, and the shards hold the
whole model. Needs Ray on the GPU host (the .gpukit bundle)."""

import math
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.ray]
ray = pytest.importorskip("ray")


def _job(tmp_path, name, dtype, steps, **extra):
    from ampray.job import JobConfig

    model = {"model.kind": "gpt", "model.options": {"preset": "micro"}}
    return JobConfig.load(None, {**model, "precision.dtype": dtype,
                                 "run.name": name, "run.storage_path": str(tmp_path), "run.steps": steps,
                                 "run.report_every": 10, "run.checkpoint_every": 20, "data.batch_size": 16,
                                 "scaling.strategy": "fsdp", "scaling.num_workers": 1, "data.num_samples": 2048, **extra})


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_fsdp_trains_the_gpt_on_one_gpu(gpu_cluster, tmp_path, dtype):
    from ampray.actors.aggregator import read_scalars
    from ampray.actors.sharded_state import consolidate
    from ampray.orchestrator.train import run_training

    outcome = run_training(_job(tmp_path, f"fsdp-{dtype}", dtype, 60))
    assert outcome.use_gpu and outcome.num_workers == 1
    scalars = read_scalars(str(outcome.logdir))
    losses = [v for _, v in scalars["all/loss/mean"]]
    assert losses[-1] < 0.8 * losses[0], losses
    scale = scalars["rank0/scaler/scale"][-1][1]
    assert scale == 1.0 if dtype == "bf16" else scale > 1.0
    assert scalars["rank0/memory/peak_allocated_bytes"][-1][1] > 0
    full = consolidate(outcome.checkpoint)["model"]
    assert "blocks.0.attn.qkv.weight" in full or any(k.startswith("blocks.0.") for k in full), sorted(full)[:5]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_fsdp_steps_gpt2_small_on_one_gpu(gpu_cluster, tmp_path, dtype):
    """GPT-2 small itself (124M parameters, 1024 tokens a row): every step after the scale has found its
    level is taken, the loss stays finite, and the scaler works on its sharded fp32 gradients. (Its loss
    on the built-in corpus barely moves in 30 steps: a random bigram table over 50,304 tokens needs far
    more than 250K tokens, so the learning itself is the micro preset's test above.)"""
    from ampray.orchestrator.train import run_training

    outcome = run_training(_job(tmp_path, f"small-{dtype}", dtype, 30, **{
        "model.options": {"preset": "small"}, "data.batch_size": 8, "data.num_samples": 512,
        "run.report_every": 15, "run.checkpoint_every": 30}))
    rank0 = outcome.final[0]
    assert outcome.use_gpu and rank0["perf/optimizer_steps"] == 30  # windows, skipped ones too
    # fp16 starts at 2**16 and backs off on its first overflows; bf16 never skips.
    assert rank0["perf/skipped_steps"] <= (8 if dtype == "fp16" else 0), rank0
    assert 0 < rank0["loss"] < 12, rank0
    assert rank0["scaler/scale"] == 1.0 if dtype == "bf16" else rank0["scaler/scale"] > 1.0
    assert rank0["memory/peak_allocated_bytes"] > 2**30  # GPT-2 small's fp32 state alone is ~2 GB


def test_a_sharded_checkpoint_resumes_bitwise_on_the_gpu(gpu_cluster, tmp_path):
    from ampray.actors.sharded_state import consolidate
    from ampray.orchestrator.train import run_training

    # The mlp: its CUDA kernels are deterministic (the gpt's attention and embedding backward are not).
    # A constant schedule: a cosine one would end at step 20 in the first run and at 40 in the straight one.
    mlp = {"model.kind": "mlp", "model.options": {"hidden": 256, "dropout": 0.1}, "optimizer.schedule": "constant"}
    run_training(_job(tmp_path, "resumed", "fp16", 20, **mlp))
    resumed = run_training(_job(tmp_path, "resumed", "fp16", 40, **mlp))
    straight = run_training(_job(tmp_path, "straight", "fp16", 40, **mlp))
    got, want = consolidate(resumed.checkpoint), consolidate(straight.checkpoint)
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), key
    assert Path(resumed.checkpoint).name == "checkpoint_000040"


def test_batchnorm_trains_under_a_bf16_fsdp_policy_on_the_gpu(monkeypatch):
    """A user's conv net with BatchNorm, sharded with FSDP's bf16 policy on one GPU (NCCL, one rank): torch's
    kernels refuse bf16 BatchNorm weights beside fp32 running statistics (recorded here on CUDA as on the
    CPU), so shard_model keeps each BatchNorm an fp32 unit, and the net trains."""
    import torch.distributed as dist

    from ampray.amp.config import MixedPrecisionConfig
    from ampray.amp.sharding import build_mp_policy, shard_model
    from ampray.amp.trainer import MixedPrecisionTrainer
    from tests.unit.helpers import free_port
    from tests.unit.test_fsdp_models import ConvNet, _image_batch

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        from torch.distributed.fsdp import fully_shard

        engine = MixedPrecisionTrainer(MixedPrecisionConfig(dtype="bf16"), "cuda")
        torch.manual_seed(0)
        raw = fully_shard(engine.prepare_model(ConvNet()), mp_policy=build_mp_policy(engine.config))
        x, y = _image_batch(0, 0)
        try:
            with engine.autocast():
                raw(x.cuda())
            cast_bn = "ran"
        except RuntimeError as err:
            cast_bn = str(err)
        print("bf16 BatchNorm weights under FSDP on CUDA:", cast_bn[:200])
        engine = MixedPrecisionTrainer(MixedPrecisionConfig(dtype="bf16"), "cuda")
        torch.manual_seed(0)
        model = shard_model(engine.prepare_model(ConvNet()), policy=build_mp_policy(engine.config),
                            blocks=("ConvBlock",))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for step in range(20):
            x, y = _image_batch(step % 2, 0)
            losses.append(float(engine.train_step(model, opt, torch.nn.functional.cross_entropy, x, y).loss))
        assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], losses
        assert model.bn.weight.dtype == torch.float32 and model.bn.running_mean.dtype == torch.float32
    finally:
        dist.destroy_process_group()
