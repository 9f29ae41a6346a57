"""`data.fill_gpu`: the per-worker batch that fills a GPU, measured on one GPU before the workers start.

A Ray task on one GPU builds the job's model, engine and optimizer as a worker does (unsharded and eager,
which needs at least the memory a compiled or sharded worker does) and runs whole training steps on
micro-batches of m, 2m, 4m, ... rows, m being the job's own micro-batch. The rows are the job's first rows,
repeated. A doubling is kept while its step fits in `MEMORY_FRACTION` of the GPU's memory (its peak
measured, an out-of-memory error caught) and raises the samples per second by at least `MIN_GAIN`: the
batch stops growing once the GPU is busy, not only once it is full, so that the run keeps as many optimizer
steps as the speed allows. When even m does not fit, m is halved until a micro-batch fits.

The choice is the driver's (`choose_fill`); `measure_micro_batches` runs in the task. The decision itself
(`choose_micro`) takes the measurements as plain numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MEMORY_FRACTION = 0.85
"""The share of the GPU's memory a probed step may peak at: the rest is the allocator's fragmentation, the
evaluation's batches, NCCL's buffers and what a longer run's lazily created state needs."""
MIN_GAIN = 1.05
"""A doubling of the batch is kept when it raises samples per second by at least this factor."""
MAX_MICRO = 1 << 16
PROBE_TIMEOUT_S = 900


@dataclass
class Probe:
    """One probed micro-batch: its step's peak memory and time (None where it ran out of memory)."""

    micro: int
    peak_bytes: int | None
    step_s: float | None

    @property
    def fits(self) -> bool:
        return self.peak_bytes is not None

    @property
    def samples_per_s(self) -> float:
        return self.micro / self.step_s if self.step_s else 0.0


def choose_micro(measure: Callable[[int], Probe], start: int, cap: int, budget_bytes: float) -> tuple[int, list[Probe]]:
    """The micro-batch to train with, and every probe made. `measure(m)` runs steps of m rows; `cap` is the
    most rows a worker's share of the data holds; `budget_bytes` the peak a step may reach."""
    cap = max(1, min(cap, MAX_MICRO))
    m = min(start, cap)
    probes: list[Probe] = []

    def ok(p: Probe) -> bool:
        return p.fits and p.peak_bytes <= budget_bytes

    first = measure(m)
    probes.append(first)
    if not ok(first):  # the job's own micro-batch does not fit: the largest smaller one that does
        while m > 1:
            m //= 2
            probe = measure(m)
            probes.append(probe)
            if ok(probe):
                return m, probes
        return 1, probes
    best = first
    while 2 * best.micro <= cap:
        probe = measure(2 * best.micro)
        probes.append(probe)
        if not ok(probe) or probe.samples_per_s < MIN_GAIN * best.samples_per_s:
            break
        best = probe
    return best.micro, probes


def _repeat(data: Any, index) -> Any:
    """`data` (a tensor, or a dict, tuple or list of them) with its rows taken at `index`."""
    import torch

    if isinstance(data, torch.Tensor):
        return data.index_select(0, index.to(data.device))
    if isinstance(data, dict):
        return {k: _repeat(v, index) for k, v in data.items()}
    if isinstance(data, (tuple, list)):
        return type(data)(_repeat(v, index) for v in data)
    return data


def measure_micro_batches(job, objects: dict[str, Any] | None, start: int, cap: int, reserve_bytes: int = 0,
                          ddp: bool = False, cwd: str | None = None) -> dict[str, Any]:
    """In a task on one GPU: probe the job's training step (see the module's docstring). `reserve_bytes`:
    what a worker holds besides the step (its training data on the GPU); `ddp`: the workers also hold DDP's
    gradient buckets (4 bytes a parameter). Returns the chosen micro-batch, the probes, the memory budget,
    the GPU's name and memory, and the seconds it took."""
    import torch

    from ampray.actors.data import one_batch
    from ampray.actors.worker import build_model_and_engine
    from ampray.amp.bench import time_steps
    from ampray.amp.trainer import to_device

    from ampray.amp.trainer import OutOfMemoryError, batch_size

    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()  # the task's GPU; the CPU only in this module's tests (no memory figures)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    # Before anything of the probe: what others hold of the GPU is not ours to use.
    free, total = torch.cuda.mem_get_info(device) if cuda else (float("inf"), float("inf"))
    # One micro-batch per optimizer step, an out-of-memory error raised (so that the probe sees it).
    job = dataclasses.replace(job, precision=job.precision.replace(gradient_accumulation_steps=1, oom_policy="raise"))
    spec, engine, model = build_model_and_engine(job, device, objects, cwd)  # as a worker builds them
    opt = job.optimizer
    optimizer = engine.build_optimizer(model, opt.name, lr=opt.lr, weight_decay=opt.weight_decay)
    x0, y0 = to_device(one_batch(job, spec, min(start, 256)), device)
    rows = batch_size(x0)
    params = sum(p.numel() for p in model.parameters())
    # The step may peak at MEMORY_FRACTION of the GPU, less what other processes hold and what a worker
    # holds besides the step.
    budget = min(MEMORY_FRACTION * total, free - (1 - MEMORY_FRACTION) * total) - reserve_bytes - \
        (4 * params if ddp else 0) if cuda else float("inf")

    def measure(m: int) -> Probe:
        index = torch.arange(m) % rows
        x = y = step = None
        try:
            x, y = _repeat(x0, index), _repeat(y0, index)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            step = functools.partial(engine.train_step, model, optimizer, spec.loss, x, y)
            for _ in range(2):  # the first step creates the optimizer's state
                step()
            step_s = min(time_steps(step, 3, device))
            return Probe(m, torch.cuda.max_memory_allocated(device) if cuda else 0, step_s)
        except OutOfMemoryError:
            return Probe(m, None, None)
        finally:
            x = y = step = None  # noqa: F841 - the batch is released before the cache is emptied
            if engine.counters.micro_in_window:  # an error mid-step left its window open: close it
                engine.end_window([optimizer])
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()

    micro, probes = choose_micro(measure, start, cap, budget)
    return {"micro": micro, "probes": [dataclasses.asdict(p) for p in probes], "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
            "total_bytes": total, "budget_bytes": budget, "seconds": time.perf_counter() - t0,
            "optimizer_steps": engine.counters.optimizer_steps}


def choose_fill(job, plan, num_workers: int, use_gpu: bool, runtime_env: dict | None,
                objects: dict[str, Any] | None, notify: Callable[[str], None], stream=None):
    """The job with data.batch_size chosen to fill a GPU (data.fill_gpu), and a note of what was measured.
    Unchanged (with a note saying why) on CPU workers, on a fraction of a GPU, for a training stream the
    probe cannot read, when no GPU comes free for the probe, when it fails, or when no micro-batch fits;
    a run that resumes from a checkpoint keeps the batch it was trained with."""
    import ray

    from ampray.orchestrator.preflight import trained_job_field

    k, kept = job.precision.gradient_accumulation_steps, f"data.batch_size={job.data.batch_size} kept"
    trained = trained_job_field(job, "data.batch_size")
    if trained is not None:
        notify(f"data.batch_size={trained}: as the run was trained (data.fill_gpu chooses only a new run's batch)")
        return _with_batch(job, int(trained))
    why_not = ("the workers have no GPU" if not use_gpu else
               f"a worker has a fraction of a GPU (scaling.gpus_per_worker={job.scaling.gpus_per_worker})"
               if job.scaling.gpus_per_worker < 1 else
               "the training rows come from a ray.data.Dataset, which the probe does not read"
               if stream is not None else None)
    if why_not:
        notify(f"data.fill_gpu: {why_not}; {kept}")
        return job
    start = job.data.batch_size // k
    cap = plan.rows // num_workers if plan.rows > 0 else MAX_MICRO
    on_gpu = 0 if job.data.streaming == "true" else plan.bytes  # in-memory training data lives on the GPU
    task = ray.remote(num_gpus=1, num_cpus=1, max_calls=1)(measure_micro_batches)  # max_calls: the GPU is freed
    if runtime_env:
        task = task.options(runtime_env=runtime_env)
    ref = task.remote(job, objects, start, cap, on_gpu, num_workers > 1, os.getcwd())
    try:
        found = ray.get(ref, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)  # not left queued to take a GPU from the workers later
        notify(f"data.fill_gpu: no GPU came free for the batch probe within {PROBE_TIMEOUT_S} s; {kept}")
        return job
    except ray.exceptions.RayError as err:  # the workers meet the same failure and report it in full
        cause = getattr(err, "cause", None) or err
        notify(f"data.fill_gpu: the batch probe failed ({type(cause).__name__}: {str(cause)[:300]}); {kept}")
        return job
    micro = found["micro"]
    by = {p["micro"]: p for p in found["probes"]}
    chosen, default = by[micro], by.get(start)
    gib = 2.0 ** 30

    def speed(p) -> str:  # a micro-batch's rows per second: an optimizer step of k of them has the same rate
        return f"{p['micro'] / p['step_s']:,.0f} samples/s" if p["step_s"] else "out of memory"

    tried = ", ".join(f"{p['micro'] * k}: {speed(p)}" + (f", peak {p['peak_bytes'] / gib:.1f} GiB" if p["peak_bytes"]
                                                         else "") for p in found["probes"])
    if chosen["peak_bytes"] is None or chosen["peak_bytes"] > found["budget_bytes"]:
        notify(f"data.fill_gpu: no micro-batch fits in {found['budget_bytes'] / gib:.1f} GiB of the "
               f"{found['gpu']} (probed: {tried}); {kept}")
        return job
    notify(f"data.batch_size={micro * k} chosen to fill the GPU (none was set; data.fill_gpu): per worker and step "
           f"{micro * k} rows, peak {chosen['peak_bytes'] / gib:.1f} of {found['total_bytes'] / gib:.1f} GiB on a "
           f"{found['gpu']}, {speed(chosen)}" + (f" against {speed(default)} at {start * k}" if default and micro != start
                                                  else "")
           + f" (probed in {found['seconds']:.0f} s: {tried}); --data.batch_size N to set one")
    return _with_batch(job, micro * k)


def _with_batch(job, batch_size: int):
    return dataclasses.replace(job, data=dataclasses.replace(job.data, batch_size=batch_size))
