"""benchmark_mixed_precision: the same model and batch trained under each precision, side by side.

Each precision gets a fresh deep copy of the model (same initial weights), its own optimizer and a
MixedPrecisionTrainer; steps are timed after a warm-up, with the device synchronised so a time covers the
work and not just its launch. Medians, not means: one slow step (a page fault, an allocator resize) should
not move the result.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ampray.amp.advice import detect_hardware
from ampray.amp.autocast import autocast_supported, default_device
from ampray.amp.config import MixedPrecisionConfig
from ampray.amp.records import BenchResult
from ampray.amp.trainer import MixedPrecisionTrainer

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@contextlib.contextmanager
def tf32_mode(enabled: bool) -> Iterator[None]:
    """Set TF32 for CUDA matmuls and cuDNN convolutions for one run, restoring the previous flags.

    Both are set explicitly either way: cuDNN's flag defaults to True, so an "fp32" run that left it alone
    would time TF32 convolutions.
    """
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def available_precisions(device: torch.device | str) -> list[str]:
    """The precisions `device` can run: tf32 on CUDA cc >= 8.0, fp16/bf16 where autocast has them."""
    device = torch.device(device)
    hw = detect_hardware(device)
    out = ["fp32"]
    if hw["tf32"]:
        out.append("tf32")
    out += [p for p in ("fp16", "bf16") if autocast_supported(device.type, _DTYPES[p])]
    return out


def time_steps(step: Callable[[], Any], n: int, device: torch.device) -> list[float]:
    """Seconds per call of `step`, n calls. On CUDA, events around each call on the stream (synchronised
    once at the end, so the timing adds no sync of its own); on CPU, perf_counter around each call."""
    if device.type != "cuda":
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return times
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1000.0 for start, end in events]


def default_criterion(output: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy for integer targets ((B, T, V) logits are flattened), MSE for float targets, and the
    mean of squared outputs when there is no target (a loss that exercises the whole backward pass)."""
    if target is None:
        return output.float().pow(2).mean()
    if target.dtype in (torch.int64, torch.int32):
        if output.dim() == 3:
            output, target = output.flatten(0, 1), target.flatten()
        return F.cross_entropy(output.float(), target)
    return F.mse_loss(output.float(), target.float())


def _split(data: Any) -> tuple[Any, Any]:
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data[0], data[1]
    return data, None


def _check(precisions: list[str], available: list[str], num_iterations: Any, warmup: Any) -> None:
    if isinstance(num_iterations, bool) or not isinstance(num_iterations, int) or num_iterations < 1:
        raise ValueError(f"benchmark_mixed_precision: num_iterations={num_iterations!r} is not allowed: "
                         f"expected an integer >= 1")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"benchmark_mixed_precision: warmup={warmup!r} is not allowed: expected an integer >= 0")
    for p in precisions:
        if p not in available:
            raise ValueError(f"benchmark_mixed_precision: precisions contains {p!r}, which is not allowed "
                             f"on this device: expected a subset of {available}")


def _run_one(model: nn.Module, precision: str, x: Any, y: Any, criterion: Callable, lr: float,
             iterations: int, warmup: int, device: torch.device,
             compile: bool = False) -> tuple[list[float], int | None]:
    """Train a deep copy of `model` under `precision` (torch.compile'd with `compile`: the warm-up steps
    compile it); returns per-step seconds and the peak bytes."""
    trainer = MixedPrecisionTrainer(MixedPrecisionConfig(dtype=_DTYPES[precision]), device=device)
    work = copy.deepcopy(model)
    if compile:
        # Compiled in place through a forward of our own: Module.compile() on one of torch's own containers
        # (an nn.Sequential) compiles nothing, since dynamo skips a top-level frame in torch's code.
        work = _Forward(work)
        work.compile()
    work = trainer.prepare_model(work)
    work.train()
    optimizer = trainer.build_optimizer(work, "adamw", lr)
    step = functools.partial(trainer.train_step, work, optimizer, criterion, x, y)
    try:
        with tf32_mode(precision == "tf32"):
            for _ in range(warmup):
                step()
            peak = None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            times = time_steps(step, iterations, device)
            if device.type == "cuda":
                peak = int(torch.cuda.max_memory_allocated(device))
    finally:
        del trainer, work, optimizer, step
        if compile:
            from torch import _dynamo  # not `import torch._dynamo`: that would make `torch` local here

            # The next precision compiles its own copy. Dynamo's caches are per process: this also drops
            # the graphs of anything else compiled in it, which recompiles on its next call.
            _dynamo.reset()
        _release(device)
    return times, peak


class _Forward(nn.Module):
    """A module whose forward is ours, around any model: what `compile=True` compiles."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


def _release(device: torch.device) -> None:
    gc.collect()  # the copy, its gradients and the optimizer state go before the next precision starts
    if device.type == "cuda":
        torch.cuda.empty_cache()


def benchmark_mixed_precision(model: nn.Module, data: Any, num_iterations: int = 100,
                              precisions: list[str] | None = None, warmup: int = 10,
                              criterion: Callable | None = None, lr: float = 1e-3,
                              device: torch.device | str | None = None, compile: bool = False) -> dict[str, Any]:
    """Time training steps of `model` on `data` (a batch, or an (input, target) pair) per precision.

    Without a target the loss is the mean of squared outputs; without a criterion it is cross-entropy for
    integer targets and MSE otherwise (`default_criterion`). fp32 is always measured, first, because the
    speed and memory figures are relative to it. `speed_improvement_percent` is (t_fp32 / t_p - 1) * 100 of
    the median step times; `memory_savings_percent` is (1 - peak_p / peak_fp32) * 100 of the CUDA
    allocator's peak (None on CPU, where the process RSS cannot be reset between precisions).
    With `compile`, every precision's copy is torch.compile'd (fp32 too, so the ratios compare compiled with
    compiled); the warm-up steps pay for the compilation and must be at least 1. Between precisions it
    resets dynamo, which also drops the caller's own compiled graphs (they recompile on their next call).
    """
    device = torch.device(device) if device is not None else default_device()
    available = available_precisions(device)
    precisions = list(precisions) if precisions is not None else available
    _check(precisions, available, num_iterations, warmup)
    if compile and warmup < 1:
        raise ValueError(f"benchmark_mixed_precision: warmup={warmup} with compile=True is not allowed; "
                         "expected >= 1 (the first step compiles and must not be timed)")
    order = ["fp32"] + [p for p in precisions if p != "fp32"]
    # Moved once: the timed steps should not include a host-to-device copy of the batch.
    x, y = (v.to(device) if isinstance(v, torch.Tensor) else v for v in _split(data))
    criterion = criterion or default_criterion
    batch = int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else 1
    times, peaks = {}, {}
    for p in order:
        times[p], peaks[p] = _run_one(model, p, x, y, criterion, lr, num_iterations, warmup, device, compile)
    return _summarise(str(device), times, peaks, batch, num_iterations) | {"compiled": compile}


def _summarise(device: str, times: dict[str, list[float]], peaks: dict[str, int | None], batch: int,
               iterations: int) -> dict[str, Any]:
    medians = {p: statistics.median(t) for p, t in times.items()}
    base_t, base_mem = medians["fp32"], peaks["fp32"]
    results, speed, saving = {}, {}, {}
    for p, t in medians.items():
        speed[p] = (base_t / t - 1.0) * 100.0
        saving[p] = (1.0 - peaks[p] / base_mem) * 100.0 if peaks[p] is not None and base_mem else None
        results[p] = BenchResult(precision=p, median_step_time_s=t, mean_step_time_s=statistics.fmean(times[p]),
                                 throughput_samples_per_s=batch / t, peak_memory_bytes=peaks[p],
                                 speed_improvement_percent=speed[p], memory_savings_percent=saving[p],
                                 iterations=iterations).to_dict()
    return {"device": device, "results": results, "step_times_s": times, "speed_improvement_percent": speed,
            "memory_savings_percent": saving, "best": min(medians, key=medians.__getitem__)}


def format_bench_table(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One plain row per precision (milliseconds, MiB, rounded) for printing or a results table."""
    rows = []
    for p, r in result["results"].items():
        peak = r["peak_memory_bytes"]
        saving = r["memory_savings_percent"]
        rows.append({"precision": p, "median_ms": round(r["median_step_time_s"] * 1e3, 3),
                     "samples_per_s": round(r["throughput_samples_per_s"], 1),
                     "speedup_percent": round(r["speed_improvement_percent"], 1),
                     "peak_mib": None if peak is None else round(peak / 2**20, 1),
                     "memory_savings_percent": None if saving is None else round(saving, 1),
                     "best": p == result["best"]})
    return rows


def process_environment() -> str:
    """What differs between launchers around the same step (torchrun against a Ray worker): visible
    devices, thread settings, CPU affinity, the process's thread count and the NCCL/torch variables."""
    keys = sorted(k for k in os.environ if k.startswith(("NCCL_", "TORCH_NCCL", "CUDA_", "OMP_", "MKL_",
                                                          "PYTORCH_", "LD_PRELOAD", "MALLOC")))
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:
        threads = -1
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else -1
    return (f"env: pid {os.getpid()}, threads {threads}, cpu affinity {affinity} cpus, "
            f"torch threads {torch.get_num_threads()}, switch interval {sys.getswitchinterval() * 1e3:.1f} ms; "
            + ", ".join(f"{k}={os.environ[k]}" for k in keys))


def _cpu_ticks(stat_path: str) -> tuple[str, int]:
    """(name, user + system clock ticks) of a task from its /proc .../stat line."""
    with open(stat_path) as f:
        line = f.read()
    name = line[line.index("(") + 1:line.rindex(")")]
    fields = line[line.rindex(")") + 2:].split()
    return name, int(fields[11]) + int(fields[12])


def cpu_snapshot() -> dict[str, Any]:
    """CPU time so far of this process's threads, of every process on the host, and the host's busy and
    total jiffies (Linux /proc; empty elsewhere). Two snapshots give who used the CPU in between."""
    snap: dict[str, Any] = {"threads": {}, "procs": {}, "host": (0, 0), "t": time.perf_counter()}
    if not os.path.isdir("/proc/self/task"):
        return snap
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError, ValueError):
            snap["threads"][tid] = _cpu_ticks(f"/proc/self/task/{tid}/stat")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, ValueError):
            snap["procs"][pid] = _cpu_ticks(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/stat") as f:
            # user nice system idle iowait irq softirq steal (guest time is inside user and nice already)
            jiffies = [int(v) for v in f.readline().split()[1:9]]
        snap["host"] = (sum(jiffies) - jiffies[3] - jiffies[4], sum(jiffies))  # busy = all but idle, iowait
    snap["t"] = time.perf_counter()  # the end of the scan: the span between two snapshots covers both
    return snap


def cpu_usage(before: dict[str, Any], after: dict[str, Any], top: int = 8) -> str:
    """Who used the CPU between two snapshots, in cores (1.0 = one core busy from the first snapshot's
    start to the second's end; the counts come in clock ticks, 10 ms, so short windows are coarse)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    wall_s = max(after["t"] - before["t"], 1e-9)

    def busiest(kind: str) -> str:
        used = [(after[kind][k][1] - before[kind].get(k, (None, 0))[1], k, after[kind][k][0]) for k in after[kind]]
        used = sorted((u for u in used if u[0] > 0), reverse=True)[:top]
        return ", ".join(f"{name}[{k}] {t / tick / wall_s:.2f}" for t, k, name in used) or "-"

    busy = after["host"][0] - before["host"][0]
    total = max(after["host"][1] - before["host"][1], 1)
    cores = os.cpu_count() or 1
    return (f"cpu: host busy {busy / total:.1%} of {cores} cores; this process's busiest threads (cores): "
            f"{busiest('threads')}; busiest processes (cores): {busiest('procs')}")


class GcTimer:
    """Collections of Python's garbage collector and the time they took, per generation, while active."""

    def __init__(self) -> None:
        self.count, self.seconds, self._t0 = [0, 0, 0], [0.0, 0.0, 0.0], 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.count[info["generation"]] += 1
            self.seconds[info["generation"]] += time.perf_counter() - self._t0

    def __enter__(self) -> "GcTimer":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> str:
        return "gc: " + ", ".join(f"gen{g} {self.count[g]}x {self.seconds[g] * 1e3:.1f} ms" for g in range(3)) + (
            f" (automatic collection {'on' if gc.isenabled() else 'off'}, {gc.get_freeze_count()} frozen objects)")


class StepProfiler:
    """Profiles a window of training steps with `torch.profiler` and writes the operator table to a file.

    `spec` is "START:COUNT" (steps counted from 0 by `step()` calls), e.g. from the environment variable
    AMPRAY_PROFILE, which `ampray train` workers read; empty means off. The file holds the wall time of
    the window, the summed device time of its kernels (busy share = how much of the window the GPU
    worked), the process's environment, who used the host's CPUs during the window, and the operators
    sorted by device time and by host time. "START:COUNT:cpu" counts CPU use only, without the profiler's
    own overhead.
    """

    def __init__(self, spec: str, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._prof = None
        self._n = 0
        self.start = self.count = 0
        self.cpu_only = spec.endswith(":cpu")
        if spec:
            try:
                start, count = (int(v) for v in spec.removesuffix(":cpu").split(":"))
            except ValueError:
                raise ValueError(f"StepProfiler: spec={spec!r} is not allowed; expected 'START:COUNT' or "
                                 "'START:COUNT:cpu', START and COUNT integers") from None
            if start < 0 or count < 1:
                raise ValueError(f"StepProfiler: spec={spec!r} is not allowed; expected START >= 0, COUNT >= 1")
            self.start, self.count = start, count
            if start == 0:  # before the first step: no step() call comes first
                self._begin()

    def step(self) -> None:
        """Call once after each training step."""
        if not self.count:
            return
        self._n += 1
        if self._n == self.start:
            self._begin()
        elif self._prof is not None and self._n == self.start + self.count:
            self._end()

    def close(self) -> None:
        """Stop a window that training left before its end (nothing is written)."""
        if self._prof is not None:
            self._gc.__exit__()
            self._prof.__exit__(None, None, None)
            self._prof = None

    def _begin(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._cpu = cpu_snapshot()
        self._gc = GcTimer().__enter__()
        self._t0 = time.perf_counter()
        self._prof = contextlib.nullcontext() if self.cpu_only else profile(activities=acts)
        self._prof.__enter__()

    def _end(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._t0
        self._gc.__exit__()
        cpu = cpu_usage(self._cpu, cpu_snapshot()) + "\n" + self._gc.summary()
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.cpu_only:  # no operator tables: the steps ran at full speed, only CPU use was counted
            self.path.write_text(f"steps {self.start}..{self.start + self.count - 1}: wall "
                                 f"{wall * 1e3 / self.count:.2f} ms/step (not profiled)\n"
                                 f"{process_environment()}\n{cpu}\n")
            return
        self._write_tables(prof, wall, cpu)

    def _write_tables(self, prof, wall: float, cpu: str) -> None:
        from torch.autograd import DeviceType

        events = prof.key_averages()
        # Kernel rows only: an operator's row repeats the time of the kernels it launched.
        device_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
        lines = [f"steps {self.start}..{self.start + self.count - 1}: wall {wall * 1e3 / self.count:.2f} ms/step, "
                 f"kernels {device_us / 1e3 / self.count:.2f} ms/step "
                 f"(busy {device_us / 1e6 / wall:.1%} of the window, overlapping streams counted twice)"]
        lines += [process_environment(), cpu]
        if torch.cuda.is_available():
            lines.append(events.table(sort_by="self_device_time_total", row_limit=25))
        lines.append(events.table(sort_by="self_cpu_time_total", row_limit=25))
        self.path.write_text("\n".join(lines))
