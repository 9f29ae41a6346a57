"""data.fill_gpu on a GPU: the probe's measurements, and `ampray train`'s choice of the batch that fills the
GPU (kept by a rerun)."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_the_probe_measures_growing_batches_within_the_memory_budget():
    from ampray.actors.batch_probe import MEMORY_FRACTION, measure_micro_batches
    from ampray.job import JobConfig

    job = JobConfig.load(None, {"model.kind": "gpt", "model.options.preset": "small", "precision.dtype": "bf16",
                                "data.batch_size": 2, "data.num_samples": 64})
    found = measure_micro_batches(job, None, start=2, cap=512)
    probes = found["probes"]
    assert [p["micro"] for p in probes] == [2 * 2 ** i for i in range(len(probes))]  # doubling from 2
    fitting = [p for p in probes if p["peak_bytes"] is not None]
    peaks = [p["peak_bytes"] for p in fitting]
    assert peaks == sorted(peaks) and peaks[-1] > peaks[0]  # more rows, more activation memory
    chosen = next(p for p in probes if p["micro"] == found["micro"])
    assert found["micro"] >= 4  # GPT-2 small at 2 x 1024 tokens does not keep a GPU busy
    assert chosen["peak_bytes"] <= MEMORY_FRACTION * found["total_bytes"]
    import gc

    gc.collect()
    assert torch.cuda.memory_allocated() < 2 ** 30  # the probe's model and batches are gone


@pytest.mark.ray
def test_train_chooses_the_batch_and_a_rerun_keeps_it(gpu_cluster, tmp_path):
    pytest.importorskip("ray")
    from ampray.job import JobConfig
    from ampray.orchestrator.train import run_training

    notes = []

    def job(steps: int) -> JobConfig:
        return JobConfig.load(None, {"model.kind": "gpt", "model.options.preset": "micro", "precision.dtype": "bf16",
                                     "data.fill_gpu": True, "data.batch_size": 4, "run.name": "fill",
                                     "run.storage_path": str(tmp_path), "run.steps": steps, "run.report_every": 5,
                                     "run.checkpoint_every": 5})

    first = run_training(job(5), notify=notes.append)
    chosen = [n for n in notes if "chosen to fill the GPU" in n]
    assert chosen, notes
    batch = int(chosen[0].split("data.batch_size=")[1].split()[0])
    assert batch > 4
    saved = (first.run_dir / "job.toml").read_text()
    assert f"batch_size = {batch}" in saved
    notes.clear()
    run_training(job(10), notify=notes.append)
    assert any(f"data.batch_size={batch}: as the run was trained" in n for n in notes), notes
