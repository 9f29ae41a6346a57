"""data.fill_gpu: the decision from probed micro-batches, and what the driver keeps without probing.
The probe itself runs on a GPU (tests/gpu/test_batch_probe_gpu.py)."""

import types

import pytest
import torch
from torch import nn

from ampray.actors.batch_probe import MIN_GAIN, Probe, choose_fill, choose_micro, measure_micro_batches
from ampray.amp.trainer import OutOfMemoryError
from ampray.job import JobConfig
from tests.own_project import write_project

GIB = 2 ** 30


def gpu(fixed_gib: float, per_row_gib: float, step_s, oom_above: int | None = None):
    """A GPU's answers: peak = fixed + rows x per_row, the step time `step_s(m)`; OOM above `oom_above`."""
    asked = []

    def measure(m: int) -> Probe:
        asked.append(m)
        if oom_above is not None and m > oom_above:
            return Probe(m, None, None)
        return Probe(m, int((fixed_gib + m * per_row_gib) * GIB), step_s(m))

    return measure, asked


def test_grows_while_throughput_grows_and_stops_when_the_gpu_is_busy():
    # Launch-bound up to 64 rows (the step takes as long whatever the batch), then linear: 64 is the batch
    # that fills the GPU; 128 gains nothing and is not taken although it fits.
    measure, asked = gpu(2, 0.01, lambda m: 0.05 * max(m, 64) / 64)
    micro, probes = choose_micro(measure, start=8, cap=10_000, budget_bytes=70 * GIB)
    assert micro == 64
    assert asked == [8, 16, 32, 64, 128]
    assert probes[-1].samples_per_s < MIN_GAIN * probes[-2].samples_per_s


def test_stops_below_the_memory_budget_and_at_an_out_of_memory_error():
    always_faster = lambda m: 0.01 * m ** 0.5  # noqa: E731
    measure, asked = gpu(2, 1.0, always_faster)  # 1 GiB per row: 32 rows peak at 34 GiB, 64 at 66
    assert choose_micro(measure, 8, 10_000, budget_bytes=40 * GIB)[0] == 32
    assert asked == [8, 16, 32, 64]
    measure, asked = gpu(2, 0.001, always_faster, oom_above=100)
    assert choose_micro(measure, 8, 10_000, budget_bytes=70 * GIB)[0] == 64
    assert asked[-1] == 128


def test_halves_a_micro_batch_that_does_not_fit_and_respects_the_rows_cap():
    measure, asked = gpu(2, 1.0, lambda m: 0.01 * m, oom_above=20)
    micro, probes = choose_micro(measure, 64, 10_000, budget_bytes=70 * GIB)
    assert (micro, asked) == (16, [64, 32, 16])
    assert not probes[0].fits
    measure, asked = gpu(0, 0.0, lambda m: 0.01)  # always faster per row: only the data stops it
    assert choose_micro(measure, 8, 40, budget_bytes=70 * GIB)[0] == 32
    assert max(asked) <= 40
    measure, asked = gpu(100, 0.0, lambda m: 0.01)  # nothing fits: one row, the smallest there is
    assert choose_micro(measure, 4, 100, budget_bytes=70 * GIB)[0] == 1


def test_the_driver_keeps_the_batch_where_it_cannot_probe_and_a_resumed_run_keeps_its_trained_batch(tmp_path):
    notes = []
    plan = types.SimpleNamespace(rows=4096, bytes=0)
    job = JobConfig.load(None, {"data.fill_gpu": True, "data.batch_size": 32, "run.storage_path": str(tmp_path),
                                "run.name": "r"})
    assert choose_fill(job, plan, 1, False, None, None, notes.append) is job
    assert "no GPU" in notes[-1] and "data.batch_size=32 kept" in notes[-1]
    half = JobConfig.load(None, {"data.fill_gpu": True, "scaling.gpus_per_worker": 0.5,
                                 "run.storage_path": str(tmp_path), "run.name": "half"})
    assert choose_fill(half, plan, 1, True, None, None, notes.append) is half
    assert "fraction of a GPU" in notes[-1]
    assert choose_fill(job, plan, 1, True, None, None, notes.append, stream=object()) is job
    assert "ray.data.Dataset" in notes[-1]
    # A job.toml in the run folder alone (a start that never checkpointed) is not a trained run ...
    job.run_dir().mkdir(parents=True)
    (job.run_dir() / "job.toml").write_text(JobConfig.load(None, {"data.batch_size": 512}).to_toml())
    assert choose_fill(job, plan, 1, False, None, None, notes.append) is job
    # ... the latest checkpoint's is: the rerun resumes from it, with its batch, and nothing is probed.
    checkpoint = job.run_dir() / "checkpoint_000040"
    checkpoint.mkdir()
    (checkpoint / "job.toml").write_text(JobConfig.load(None, {"data.batch_size": 256}).to_toml())
    import json

    from ampray.orchestrator.checkpoints import SNAPSHOT

    # Ray Train's own record of the checkpoint it registered last: the one a rerun resumes from.
    (job.run_dir() / SNAPSHOT).write_text(json.dumps({"latest_checkpoint_result": {
        "checkpoint_dir_name": checkpoint.name}}))
    kept = choose_fill(job, plan, 1, True, None, None, notes.append)
    assert kept.data.batch_size == 256 and "as the run was trained" in notes[-1]


class _OutOfMemoryAbove(nn.Module):
    """The user's model, raising torch's OutOfMemoryError for a batch of more than `limit` rows, as the CUDA
    allocator would."""

    def __init__(self, net: nn.Module, limit: int):
        super().__init__()
        self.net, self.limit = net, limit

    def forward(self, batch):
        if batch["pixels"].shape[0] > self.limit:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (test)")
        return self.net(batch)


def test_the_probe_halves_after_an_out_of_memory_error_and_its_optimizer_still_steps(tmp_path, monkeypatch):
    """On the CPU (the probe's own code, no memory figures): the job's micro-batch of 32 rows runs out of
    memory, 16 fits; the window the error left open is closed, so the 16-row steps are optimizer steps."""
    root = write_project(tmp_path / "project")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.chdir(root)
    import mynets

    job = JobConfig.load(root / "job.toml", {"precision.dtype": "fp32"})
    objects = {"model.factory": lambda **options: _OutOfMemoryAbove(mynets.build(**options), 16)}
    found = measure_micro_batches(job, objects, start=32, cap=512)
    assert [(p["micro"], p["peak_bytes"] is None) for p in found["probes"]] == [(32, True), (16, False)]
    assert found["micro"] == 16
    assert found["optimizer_steps"] == 5  # two warm-up and three timed steps of 16 rows, none lost
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("use_gpu,overrides,expected", [
    (True, {}, True), (True, {"data.batch_size": 16}, False), (False, {}, False),
    (True, {"scaling.strategy": "fsdp"}, False),
])
def test_the_cli_fills_gpus_only_where_no_batch_was_set(tmp_path, use_gpu, overrides, expected):
    from ampray.orchestrator.cli import _precision_chooser

    job = JobConfig.load(None, {"run.storage_path": str(tmp_path), **overrides})
    chosen = _precision_chooser(set(overrides), lambda note: None)(job, use_gpu)
    assert chosen.data.fill_gpu is expected
