"""Driver-side checks before any worker starts: data against model and batch, a rerun against its
checkpoint, workers against the cluster's nodes, and the RNG state a checkpoint carries."""

import dataclasses
import json
import random

import pytest
import torch

from ampray.actors.checkpoint import rng_state, set_rng_state
from ampray.data.parquet import write_synthetic
from ampray.data.synthetic import SyntheticConfig
from ampray.job import ConfigError, JobConfig
from ampray.orchestrator.preflight import check_data, check_resume, latest_checkpoint
from ampray.orchestrator.train import ResourceError, resolve_scaling, resolved


@pytest.fixture(scope="module")
def mlp_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "mlp"
    write_synthetic(out, "mlp", SyntheticConfig(num_samples=96, in_features=12, num_classes=5, seed=3))
    return out


def _job(**overrides) -> JobConfig:
    return JobConfig.load(None, {k.replace("__", "."): v for k, v in overrides.items()})


def test_data_that_fits_passes(mlp_data):
    check_data(_job(data__path=str(mlp_data), model__options={"in_features": 12, "num_classes": 5},
                    data__batch_size=48), num_workers=2)


@pytest.mark.parametrize("overrides, needle", [
    ({"model.options": {"in_features": 16, "num_classes": 5}}, "12 features; model.options.in_features=16"),
    ({"model.options": {"in_features": 12, "num_classes": 3}},  # the full data check names the shard and row
     "part-00000.parquet: column 'label' holds 3 in row 2 (rows 0 to 23 hold values in [0, 4]); "
     "expected integers in [0, 3): class labels below model.options.num_classes=3"),
    ({"model.kind": "gpt"}, "holds 'mlp' data (its ampray.kind); model.kind='gpt'"),
    ({"model.options": {"in_features": 12, "num_classes": 5}, "data.batch_size": 64},
     "data.batch_size=64 is not allowed: expected at most 48"),
])
def test_data_that_does_not_fit_names_the_field(mlp_data, overrides, needle):
    job = JobConfig.load(None, {"data.path": str(mlp_data), **overrides})
    with pytest.raises(ConfigError) as err:
        check_data(job, num_workers=2)
    assert needle in str(err.value)


def test_micro_batch_is_what_must_fit():
    """With accumulation the per-rank micro-batch, not the optimizer-step batch, must fit the rank's rows."""
    job = _job(data__num_samples=100, data__batch_size=100, precision__gradient_accumulation_steps=4)
    check_data(job, num_workers=4)  # micro-batch 25 of 25 rows per rank
    with pytest.raises(ConfigError, match=r"data.batch_size=100 .* at most 80 .* data.num_samples=100"):
        check_data(job, num_workers=5)


def _checkpoint(run_dir, job: JobConfig, step: int, world: int, register: bool = True):
    """A checkpoint folder as the workers write it, registered in Ray's snapshot as Ray does once every
    rank's upload is complete (unless `register` is False: an upload a crash cut short)."""
    folder = run_dir / f"checkpoint_{step:06d}"
    folder.mkdir(parents=True)
    (folder / "job.toml").write_text(job.to_toml())
    (folder / "state.pt").write_bytes(b"")
    for rank in range(world):
        (folder / f"rng_rank{rank}.pt").write_bytes(b"")
    if register:
        _register(run_dir, folder.name)
    return folder


def _run(tmp_path, **overrides) -> JobConfig:
    base = {"run.storage_path": str(tmp_path), "run.name": "r", "model.options": {"hidden": 32}}
    return resolved(JobConfig.load(None, {**base, **{k.replace("__", "."): v for k, v in overrides.items()}}),
                    2, False)


RESUMING_40 = "resuming from checkpoint_000040 (step 40 of 200)"


def test_a_new_run_and_an_unchanged_rerun_pass(tmp_path):
    assert check_resume(_run(tmp_path), 2) == []
    _checkpoint(tmp_path / "r", _run(tmp_path), 40, 2)
    newest = _checkpoint(tmp_path / "r", _run(tmp_path), 80, 2)
    assert latest_checkpoint(tmp_path / "r") == newest
    assert check_resume(_run(tmp_path), 2) == ["resuming from checkpoint_000080 (step 80 of 200)"]


def test_a_rerun_may_change_live_settings_length_and_resources(tmp_path):
    _checkpoint(tmp_path / "r", _run(tmp_path), 40, 2)
    job = _run(tmp_path, precision__growth_interval=50, precision__adaptation__window=10, run__report_every=5,
               run__max_failures=3, scaling__cpus_per_worker=0.5, model__compile=True, run__steps=200)
    assert check_resume(job, 2) == [RESUMING_40]  # run.steps is the default (200): unchanged
    notes = check_resume(_run(tmp_path, run__steps=400), 2)
    assert notes[0] == "resuming from checkpoint_000040 (step 40 of 400)"
    assert len(notes) == 2 and "run.steps changed from 200 to 400" in notes[1] and "cosine" in notes[1]
    with pytest.raises(ConfigError, match="optimizer.schedule: 'cosine' in the checkpoint, 'constant' now"):
        check_resume(_run(tmp_path, run__steps=400, optimizer__schedule="constant"), 2)


def test_a_rerun_that_changes_what_was_trained_is_refused(tmp_path):
    _checkpoint(tmp_path / "r", _run(tmp_path), 40, 2)
    changed = _run(tmp_path, optimizer__lr=0.1, precision__dtype="bf16", precision__gradient_accumulation_steps=2,
                   data__batch_size=32, model__options={"hidden": 64})
    with pytest.raises(ConfigError) as err:
        check_resume(changed, 2)
    text = str(err.value)
    for field in ("optimizer.lr", "precision.dtype", "precision.gradient_accumulation_steps", "data.batch_size",
                  "model.options.hidden: 32 in the checkpoint, 64 now"):
        assert field in text, field
    assert "checkpoint_000040" in text and "--name" in text
    assert "precision.growth_interval" not in text


def test_a_removed_model_option_is_a_change_and_a_spelled_out_default_is_not(tmp_path):
    _checkpoint(tmp_path / "r", _run(tmp_path), 40, 2)
    with pytest.raises(ConfigError, match="model.options.hidden"):
        check_resume(_run(tmp_path, model__options={}), 2)  # back to the default width
    assert check_resume(_run(tmp_path, model__options={"hidden": 32, "depth": 2}), 2) == [RESUMING_40]  # depth's default


def _register(run_dir, name):
    """What Ray Train writes once every rank's upload of a checkpoint is complete."""
    latest = {"checkpoint_dir_name": name, "metrics": {}} if name else None
    (run_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps({"latest_checkpoint_result": latest}))


def test_the_checkpoint_compared_is_the_one_ray_registered(tmp_path):
    """A rerun resumes from the checkpoint in Ray's snapshot: a newer folder whose upload a crash cut
    short (here it lacks rank 1's files and would count one worker) is neither resumed from nor compared,
    and without a snapshot (the first upload cut short) Ray starts over: nothing to compare."""
    run_dir = tmp_path / "r"
    first = _checkpoint(run_dir, _run(tmp_path), 40, 2, register=False)
    assert latest_checkpoint(run_dir) is None and check_resume(_run(tmp_path), 2) == []
    _register(run_dir, first.name)
    _checkpoint(run_dir, _run(tmp_path), 80, 1, register=False)
    assert latest_checkpoint(run_dir) == first
    assert check_resume(_run(tmp_path), 2) == [RESUMING_40]
    _register(run_dir, None)  # Ray knows of no checkpoint: the run starts over
    assert latest_checkpoint(run_dir) is None
    (run_dir / "checkpoint_manager_snapshot.json").write_text("{trunc")
    with pytest.raises(ConfigError, match="Ray's checkpoint list .* cannot be read"):
        latest_checkpoint(run_dir)


def test_a_relative_data_path_is_made_absolute_for_the_workers(tmp_path, mlp_data, monkeypatch):
    """Ray starts each worker in a folder of its own: the path the workers get is the driver's, absolute,
    and a checkpoint that holds it relative (an earlier version) still compares equal."""
    monkeypatch.chdir(mlp_data.parent)
    job = _run(tmp_path, data__path="mlp", model__options={"hidden": 32, "in_features": 12, "num_classes": 5})
    assert job.data.path == str(mlp_data)
    link = tmp_path / "link"
    link.symlink_to(mlp_data)  # an absolute path is the user's: its links are not resolved on the driver
    assert _run(tmp_path, data__path=str(link), model__options={"in_features": 12, "num_classes": 5}).data.path == str(link)
    relative = dataclasses.replace(job, data=dataclasses.replace(job.data, path="mlp"))
    _checkpoint(tmp_path / "r", relative, 40, 2)
    assert check_resume(job, 2) == [RESUMING_40]


def test_a_rerun_without_a_checkpoint_sets_the_earlier_events_aside(tmp_path):
    """The earlier attempt ended before its first checkpoint: the rerun starts at step 0 in an empty
    TensorBoard folder (the aggregator would drop its steps up to the old ones), the old events are kept."""
    from ampray.orchestrator.train import set_aside_stale_events

    run_dir = tmp_path / "r"
    (run_dir / "tensorboard").mkdir(parents=True)
    (run_dir / "tensorboard" / "events.out.tfevents.1.vm").write_bytes(b"old")
    (run_dir / "progress").mkdir()
    (run_dir / "progress" / "all.json").write_text('{"step": 30}')
    moved = set_aside_stale_events(run_dir)
    assert moved is not None and moved.parent == run_dir and moved.name.startswith("tensorboard.before-")
    assert (moved / "events.out.tfevents.1.vm").read_bytes() == b"old"
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "progress" / "all.json").exists()
    assert set_aside_stale_events(run_dir) is None  # nothing left to move
    (run_dir / "tensorboard").mkdir()
    (run_dir / "tensorboard" / "events.out.tfevents.2.vm").write_bytes(b"resumable")
    _checkpoint(run_dir, _run(tmp_path), 40, 2)
    assert set_aside_stale_events(run_dir) is None  # a checkpoint to resume from: the events go on
    assert (run_dir / "tensorboard" / "events.out.tfevents.2.vm").is_file()


def test_a_rerun_shorter_than_its_checkpoint_is_refused_and_a_complete_one_says_so(tmp_path):
    _checkpoint(tmp_path / "r", _run(tmp_path), 60, 2)
    with pytest.raises(ConfigError, match=r"run.steps=20: the run is already at step 60 \(expected run.steps >= 60"):
        check_resume(_run(tmp_path, run__steps=20), 2)
    assert check_resume(_run(tmp_path, run__steps=60, optimizer__schedule="cosine"), 2)[0] == (
        "the run is complete at step 60 (checkpoint_000060): nothing to train; its final records follow")
    # Another held-out set for the finished model: the workers evaluate it on that set, and the note says so.
    import pyarrow as pa
    import pyarrow.parquet as pq

    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1.0]}), other)
    assert check_resume(_run(tmp_path, run__steps=60, data__val_path=str(other)), 2)[1] == (
        f"data.val_path={str(other)!r} (the run was trained with 'none'): the final model is evaluated on it")
    assert not any("evaluated on it" in n for n in check_resume(_run(tmp_path, run__steps=80, data__val_path=str(other)), 2))


def test_a_rerun_on_another_number_of_workers_is_refused(tmp_path):
    _checkpoint(tmp_path / "r", _run(tmp_path), 40, 2)
    with pytest.raises(ConfigError, match=r"number of workers: 2 in the checkpoint, 4 now \(pass --scaling.num_workers 2"):
        check_resume(_run(tmp_path), 4)


def test_workers_must_fit_on_single_nodes():
    job = JobConfig.load(None, {"scaling.gpus_per_worker": 4.0, "scaling.num_workers": 2})
    nodes = [{"CPU": 48.0, "GPU": 4.0}, {"CPU": 48.0, "GPU": 4.0}]
    assert resolve_scaling(job, {"CPU": 96.0, "GPU": 8.0}, nodes) == (2, True)
    job8 = JobConfig.load(None, {"scaling.gpus_per_worker": 8.0, "scaling.num_workers": 1})
    with pytest.raises(ResourceError, match=r"gpus_per_worker=8 from one node, and the cluster's nodes .* hold at most 0"):
        resolve_scaling(job8, {"CPU": 96.0, "GPU": 8.0}, nodes)
    cpu = JobConfig.load(None, {"scaling.cpus_per_worker": 3.0, "scaling.num_workers": 3})
    with pytest.raises(ResourceError, match="hold at most 2"):
        resolve_scaling(cpu, {"CPU": 10.0}, [{"CPU": 5.0}, {"CPU": 5.0}])


def test_fractional_gpus_are_refused_for_several_ddp_workers():
    job = JobConfig.load(None, {"scaling.gpus_per_worker": 0.5})
    with pytest.raises(ResourceError, match=r"scaling.gpus_per_worker=0.5 is not allowed with 2 GPU workers"):
        resolve_scaling(job, {"CPU": 16.0, "GPU": 2.0})  # -1: one worker per GPU, not one per half
    assert resolve_scaling(job, {"CPU": 16.0, "GPU": 1.0}) == (1, True)
    one = JobConfig.load(None, {"scaling.gpus_per_worker": 0.5, "scaling.num_workers": 1})
    assert resolve_scaling(one, {"CPU": 16.0, "GPU": 2.0}, [{"CPU": 16.0, "GPU": 2.0}]) == (1, True)


def test_resolved_job_records_what_ran():
    job = resolved(JobConfig(), 2, False)
    assert (job.scaling.num_workers, job.scaling.use_gpu) == (2, "false")
    assert JobConfig().scaling.num_workers == -1  # the original is not changed


def test_rng_state_round_trip_restores_every_generator():
    torch.manual_seed(5)
    random.seed(7)
    saved = rng_state()
    want = (torch.rand(3), random.random())
    torch.manual_seed(99)
    random.seed(99)
    set_rng_state(saved)
    got = (torch.rand(3), random.random())
    assert torch.equal(got[0], want[0]) and got[1] == want[1]


def test_a_failed_run_is_summarised_one_line_per_rank():
    from ray.train.v2.api.exceptions import WorkerGroupError

    from ampray.orchestrator.cli import _failure_summary

    err = WorkerGroupError("long traceback text\nmore", {1: ValueError("first line\nShardedBatches: batch_size=9"),
                                                         0: RuntimeError("NCCL error")})
    assert _failure_summary(err) == ("\n  rank 0: RuntimeError: NCCL error"
                                     "\n  rank 1: ValueError: first line ... ShardedBatches: batch_size=9")
    ddp = RuntimeError("Expected to have finished reduction in the prior iteration before starting a new one. "
                       "This error indicates that your module has parameters that were not used in producing loss.\n"
                       "In addition, you can set the environment variable TORCH_DISTRIBUTED_DEBUG to either INFO or "
                       "DETAIL to print out information about which particular parameters did not receive gradient")
    summary = _failure_summary(WorkerGroupError("x", {0: ddp, 1: ddp}))
    assert summary.startswith("\n  rank 0: RuntimeError: Expected to have finished reduction in the prior iteration")
    assert summary.count('hint: some parameters got no gradient in a step (a branch only some batches take): set '
                         'scaling.find_unused_parameters = "true"') == 1
    changed = RuntimeError("Error(s) in loading state_dict for Net:\n\tsize mismatch for 2.bias: copying a param "
                           "with shape torch.Size([4]) from checkpoint, the shape in current model is torch.Size([32]).")
    summary = _failure_summary(WorkerGroupError("x", {0: changed}))
    assert "rank 0: RuntimeError: Error(s) in loading state_dict for Net: ... size mismatch for 2.bias" in summary
    assert "hint: the model no longer matches the checkpoint the run resumes from" in summary


def test_a_launcher_made_cluster_counts_the_nodes_it_can_grow_to(tmp_path):
    """On the head of `ray up cluster.yaml` (CPU head, up to 2 nodes of 4 GPUs), a job submitted before any
    GPU node runs is sized for what the autoscaler can add, not trained on the head's CPUs."""
    from pathlib import Path

    from ampray.orchestrator.train import autoscaler_nodes

    nodes = autoscaler_nodes(Path(__file__).resolve().parents[2] / "cluster.yaml")
    assert nodes == [{"CPU": 8, "GPU": 0}, {"CPU": 48, "GPU": 4}, {"CPU": 48, "GPU": 4}]
    totals = {"CPU": 104.0, "GPU": 8.0}
    assert resolve_scaling(JobConfig(), totals, nodes) == (8, True)
    with pytest.raises(ResourceError, match="hold at most 2"):
        resolve_scaling(JobConfig.load(None, {"scaling.gpus_per_worker": 2.5, "scaling.num_workers": 3}), totals, nodes)
    assert autoscaler_nodes(tmp_path / "absent.yaml") == []
    (tmp_path / "capped.yaml").write_text(
        "max_workers: 1\nhead_node_type: h\navailable_node_types:\n"
        "  h: {resources: {CPU: 4}, max_workers: 0}\n  g: {resources: {CPU: 8, GPU: 1}, max_workers: 3}\n")
    assert autoscaler_nodes(tmp_path / "capped.yaml") == [{"CPU": 4}, {"CPU": 8, "GPU": 1}]
    # A provider the launcher does not fill in resources for: the config cannot size the cluster, so only
    # the live nodes count (instead of refusing every job against nodes counted as empty).
    (tmp_path / "bare.yaml").write_text(
        "head_node_type: h\navailable_node_types:\n  h: {max_workers: 0}\n  g: {max_workers: 3}\n")
    assert autoscaler_nodes(tmp_path / "bare.yaml") == []
    (tmp_path / "bare_head.yaml").write_text(  # the head alone without: the nodes it can add still count
        "head_node_type: h\navailable_node_types:\n  h: {max_workers: 0}\n  g: {resources: {GPU: 1}, max_workers: 2}\n")
    assert autoscaler_nodes(tmp_path / "bare_head.yaml") == [{}, {"GPU": 1}, {"GPU": 1}]


def test_one_driver_at_a_time_trains_a_run(tmp_path):
    """A second `ampray train` of the same run while the first is still going is refused, naming the first;
    the lock goes with the driver (the OS's flock: also when the driver is killed)."""
    import os

    from ampray.orchestrator.train import run_lock

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    with run_lock(run_dir):
        with pytest.raises(ConfigError, match=rf"run 'r' in .* is already being trained \(pid {os.getpid()} on .*\); "
                                              "wait for it to end, or give this run a new --name"):
            with run_lock(run_dir):
                pass
    with run_lock(run_dir):  # released
        pass


def test_a_storage_path_that_cannot_hold_the_run_fails_before_ray(tmp_path):
    from ampray.orchestrator.train import make_run_dir

    (tmp_path / "afile").write_text("")
    job = JobConfig.load(None, {"run.storage_path": str(tmp_path / "afile")})
    with pytest.raises(ConfigError, match=r"run.storage_path='.*afile' is not allowed: cannot create and write the "
                                          r"run folder .*afile/ampray \(Not a directory\)"):
        make_run_dir(job)
    assert make_run_dir(JobConfig.load(None, {"run.storage_path": str(tmp_path)})) == tmp_path / "ampray"


def test_a_model_option_set_on_one_side_only_is_compared_with_the_factorys_default(tmp_path, monkeypatch):
    """A user's factory `build(width=32, p=0.0, sizes=(4, 4))`: a rerun that sets an option the run left out
    (or leaves out one it set) resumes when the value is the factory's default, and is refused otherwise."""
    import sys

    from ampray.models.registry import resolve_spec

    (tmp_path / "optnet.py").write_text(
        "from torch import nn\n"
        "def build(width=32, p=0.0, sizes=(4, 4), extra=None):\n"
        "    return nn.Sequential(nn.Linear(8, width), nn.Dropout(p), nn.Linear(width, 4))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        spec = resolve_spec("custom", "optnet:build")

        def job(**options) -> JobConfig:
            return resolved(JobConfig.load(None, {"run.storage_path": str(tmp_path), "run.name": "r",
                                                  "model.factory": "optnet:build", "model.options": options,
                                                  "data.path": str(tmp_path), "data.input": "x",
                                                  "data.target": "y"}), 2, False)

        _checkpoint(tmp_path / "r", job(width=32), 40, 2)
        assert check_resume(job(width=32, p=0.0, sizes=[4, 4]), 2, spec) == [RESUMING_40]  # the defaults
        assert check_resume(job(), 2, spec) == [RESUMING_40]  # width left out: its default, as saved
        with pytest.raises(ConfigError, match=r"model.options.p: 0.0 in the checkpoint, 0.9 now"):
            check_resume(job(width=32, p=0.9), 2, spec)
        with pytest.raises(ConfigError, match=r"model.options.extra: None in the checkpoint, 'x' now"):
            check_resume(job(extra="x"), 2, spec)  # left out: the factory's None
        with pytest.raises(ConfigError, match=r"model.options.depth: not set in the checkpoint, 3 now"):
            check_resume(job(depth=3), 2)  # no spec, no defaults: an option on one side only is a change
    finally:
        sys.modules.pop("optnet", None)
