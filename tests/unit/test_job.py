"""JobConfig: defaults, TOML < overrides, validation errors, resource checks; no Ray needed."""

import pytest

from ampray.orchestrator.job import ConfigError, JobConfig, parse_overrides
from ampray.orchestrator.train import ResourceError, resolve_scaling


def test_defaults_and_round_trip(tmp_path):
    job = JobConfig()
    assert (job.model.kind, job.scaling.num_workers, job.run.steps) == ("mlp", -1, 200)
    path = tmp_path / "job.toml"
    path.write_text(job.to_toml())
    assert JobConfig.load(path) == job


def test_cli_beats_file_beats_defaults(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[precision]\ndtype = "bf16"\ninit_scale = 1024.0\n[run]\nsteps = 50\n')
    overrides = parse_overrides(["--precision.init_scale", "256.0", "--run.name=x",
                                 "--model.options.hidden", "32", "--scaling.use_gpu", "false"])
    job = JobConfig.load(path, overrides)
    assert job.precision.dtype.is_floating_point and str(job.precision.dtype) == "torch.bfloat16"
    assert (job.precision.init_scale, job.run.steps, job.run.name) == (256.0, 50, "x")
    assert job.model.options == {"hidden": 32} and job.scaling.use_gpu == "false"


@pytest.mark.parametrize("overrides,needle", [
    ({"model.kind": "resnet"}, "model.kind='resnet'"),
    ({"model.options.depth_of_field": 3}, "depth_of_field"),
    ({"model.compile": "yes"}, "model.compile='yes' is not allowed: expected a boolean"),
    ({"run.steps": "ten"}, "run.steps='ten' is not allowed: expected an integer"),
    ({"run.name": [1]}, "run.name=[1] is not allowed: expected a string"),
    ({"precision.growth_interval": "ten"}, "precision.growth_interval='ten' is not allowed"),
    ({"precision.adaptation.window": "x"}, "precision.adaptation.window='x' is not allowed"),
    ({"scaling.num_workers": 0}, "scaling.num_workers=0"),
    ({"optimizer.lr": -1.0}, "optimizer.lr=-1.0"),
    ({"precision.backoff_factor": 2.0}, "backoff_factor=2.0"),
    ({"run.steps": 0}, "run.steps=0"),
    ({"data.path": "/no/such/dir"}, "data.path='/no/such/dir'"),
    ({"data.batch_size": 10, "precision.gradient_accumulation_steps": 4}, "data.batch_size=10"),
    ({"scaling.allreduce_dtype": "int8"}, "scaling.allreduce_dtype='int8'"),
    ({"scaling.allreduce_dtype": "fp16", "precision.dtype": "bf16"}, "scaling.allreduce_dtype='fp16'"),
    ({"run.seed": 2**62}, f"run.seed={2**62} is not allowed: expected an integer in [0, 4294967295]"),
    ({"data.seed": -1}, "data.seed=-1 is not allowed: expected an integer in [0, 4294967295]"),
    ({"run.storage_path": "s3://bucket/runs"}, "run.storage_path='s3://bucket/runs' is not allowed: expected a "
                                                "folder every node sees"),
    ({"runn.steps": 3}, "section in"),
    ({"run.stepz": 3}, "unknown field(s) ['stepz']"),
])
def test_bad_configs_name_field_and_value(overrides, needle):
    with pytest.raises(ConfigError) as err:
        JobConfig.load(None, overrides)
    assert needle in str(err.value)


def test_a_number_for_a_text_field_is_its_text():
    job = JobConfig.load(None, parse_overrides(["--run.name", "2024", "--run.storage_path", "7"]))
    assert (job.run.name, job.run.storage_path) == ("2024", "7")


def test_resource_checks_fail_fast():
    job = JobConfig.load(None, {"scaling.num_workers": 8})
    with pytest.raises(ResourceError, match="needs 8 CPUs; the cluster has 4"):
        resolve_scaling(job, {"CPU": 4.0})
    with pytest.raises(ResourceError, match="no GPU"):
        resolve_scaling(JobConfig.load(None, {"scaling.use_gpu": True}), {"CPU": 4.0})
    with pytest.raises(ResourceError, match="needs 16 GPUs; the cluster has 2"):
        resolve_scaling(JobConfig.load(None, {"scaling.num_workers": 16}), {"CPU": 64.0, "GPU": 2.0})
    with pytest.raises(ResourceError, match="allreduce_dtype=bf16 is not possible on CPU"):
        resolve_scaling(JobConfig.load(None, {"scaling.allreduce_dtype": "bf16"}), {"CPU": 4.0})
    assert resolve_scaling(JobConfig(), {"CPU": 4.0}) == (2, False)
    assert resolve_scaling(JobConfig(), {"CPU": 32.0, "GPU": 2.0}) == (2, True)


def test_compressed_allreduce_rounds_gradients_to_fp16(tmp_path):
    """scaling.allreduce_dtype=fp16: DDP's gradients come back as the fp16-rounded average (one-rank gloo)."""
    import torch
    import torch.distributed as dist

    from ampray.actors.worker import compress_allreduce

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        x = torch.randn(8, 16)
        grads = {}
        for dtype in ("fp32", "fp16"):
            torch.manual_seed(1)
            model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(16, 4))
            compress_allreduce(model, dtype)
            (model(x) * 1e-3).sum().backward()
            grads[dtype] = model.module.weight.grad.clone()
        assert not torch.equal(grads["fp32"], grads["fp16"])
        assert torch.equal(grads["fp16"], grads["fp32"].half().float())
        compress_allreduce(torch.nn.Linear(2, 2), "fp16")  # not DDP-wrapped (one worker): nothing to do
    finally:
        dist.destroy_process_group()
