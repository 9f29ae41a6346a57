"""JobConfig: defaults, TOML < overrides, validation errors, resource checks; no Ray needed."""

import pytest

from ampray.job import ConfigError, JobConfig, parse_overrides
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
    # As typed: not read as TOML first (1.10 would be the number 1.1, a date-like name a date).
    for typed in ("1.10", "1e3", "0x1F", "1_000", "2024-01-01", "true", "12:30:00"):
        assert JobConfig.load(None, parse_overrides(["--run.name", typed])).run.name == typed
    assert parse_overrides(["--run.name", '"quoted"'])["run.name"] == "quoted"  # a TOML string is unquoted
    assert parse_overrides(["--run.steps", "10", "--precision.adaptation.window", "3"]) == {
        "run.steps": 10, "precision.adaptation.window": 3}


@pytest.mark.parametrize("address", ["", "auto", "127.0.0.1:6379", "head:6379", "ray://head:10001"])
def test_cluster_addresses_of_ray_forms_are_taken(address):
    assert JobConfig.load(None, {"run.address": address}).run.address == address


@pytest.mark.parametrize("address", ["bogus", "head:", "ray://head", "head:99999", "http://head:8265"])
def test_other_addresses_are_refused_before_ray_starts(address):
    with pytest.raises(ConfigError, match=rf"run.address='{address}' is not allowed: expected auto, host:port"):
        JobConfig.load(None, {"run.address": address})


def test_a_closed_port_fails_in_seconds_instead_of_ray_retrying_for_minutes():
    import socket
    import time

    from ampray.orchestrator.train import check_reachable

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ConfigError, match=rf"run.address='127.0.0.1:{port}': no Ray cluster answers there"):
        check_reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 10


def test_unknown_fields_get_a_suggestion_and_a_job_files_own_mistake_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"\[precision\]: unknown field\(s\) \['dtyp'\] \(did you mean 'dtype' for 'dtyp'\?\)"):
        JobConfig.load(None, {"precision.dtyp": "bf16"})
    path = tmp_path / "job.toml"
    path.write_text('[modle]\nkind = "gpt"\n')
    with pytest.raises(ConfigError, match=r"--config '.*job.toml': the job's sections: unknown field\(s\) \['modle'\] "
                                          r"\(did you mean 'model' for 'modle'\?\)"):
        JobConfig.load(path)
    path.write_text('[run]\nsteps = "ten"\n')
    with pytest.raises(ConfigError, match=r"--config '.*job.toml': run.steps='ten' is not allowed"):
        JobConfig.load(path, {"run.name": "x"})
    assert JobConfig.load(path, {"run.steps": 5}).run.steps == 5  # the command line fixes the file
    with pytest.raises(ConfigError, match=r"^run.steps='x' is not allowed"):  # the override's mistake: no file named
        JobConfig.load(tmp_path / "job.toml", {"run.steps": "x"})


def test_train_help_lists_every_section_with_its_defaults(capsys):
    from ampray.orchestrator.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for needle in ("[model] kind='mlp'", "[data] path=''", "[precision] enabled=True", "[optimizer] name='adamw'",
                   "[scaling] num_workers=-1", "[run] name='ampray'", "adaptation.window=100", "steps=200"):
        assert needle in text, needle


def test_a_flag_and_its_dotted_field_must_agree(capsys):
    from ampray.orchestrator.cli import main

    assert main(["train", "--name", "x", "--run.name", "y"]) == 2
    assert "--name 'x' and --run.name 'y' disagree" in capsys.readouterr().err


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


def test_tune_resume_refuses_job_fields_it_would_not_use(tmp_path, capsys):
    """`ampray tune --resume NAME --run.steps 250`: the search goes on with its saved job, so the new length
    would be ignored; refused before anything starts (and not checked against a default mlp job)."""
    from ampray.orchestrator.cli import main

    code = main(["tune", "--resume", "s", "--run.storage_path", str(tmp_path), "--run.steps", "250",
                 "--model.options.delay", "0.0"])
    err = capsys.readouterr().err
    assert code == 2
    assert ("--resume s goes on with the job the search began with, so --model.options.delay, --run.steps would "
            "not be used") in err
    code = main(["tune", "--resume", "s", "--run.storage_path", str(tmp_path)])
    assert code == 2 and "--resume s: no search to resume in" in capsys.readouterr().err


def test_search_resume_refuses_job_changes_it_would_not_use(tmp_path):
    from ampray.amp.config import ConfigError
    from ampray.orchestrator.api import search

    with pytest.raises(ConfigError, match=r"goes on with the job the search began with, so run.steps, loss would not"):
        search(overrides={"run.steps": 5, "run.storage_path": str(tmp_path)}, loss="torch.nn:MSELoss",
               resume=True, name="s")
