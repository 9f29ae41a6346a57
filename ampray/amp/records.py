"""Typed records that cross process boundaries (Ray reports, TensorBoard tags, Parquet columns).

Each record is a flat dataclass of plain values; `to_dict()` gives the names that become tags and
columns, so a metric has one name everywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


class _Record:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class ScalerState(_Record):
    """The loss scaler as numbers: where the scale is and how it got there."""

    scale: float
    growth_tracker: int
    hysteresis_left: int
    overflows: int
    backoffs: int
    growths: int
    min_scale_seen: float
    max_scale_seen: float


@dataclass
class StepStats(_Record):
    """Counters of the training loop since the start of the run."""

    training_steps: int
    optimizer_steps: int
    skipped_steps: int
    overflow_rate: float
    nonfinite_losses: int
    oom_events: int
    oom_skipped_batches: int
    oom_split_retries: int
    avg_step_time_s: float
    samples_per_s: float
    loss: float


@dataclass
class MemoryStats(_Record):
    """Memory of one process: the CUDA caching allocator on a GPU, the resident set on a CPU."""

    device: str
    allocated_bytes: int
    reserved_bytes: int
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    rss_bytes: int
    peak_rss_bytes: int
    alloc_retries: int
    ooms: int


@dataclass
class BenchResult(_Record):
    """One precision's line of a benchmark: timings, throughput and memory, relative to fp32."""

    precision: str
    median_step_time_s: float
    mean_step_time_s: float
    throughput_samples_per_s: float
    peak_memory_bytes: int | None
    speed_improvement_percent: float
    memory_savings_percent: float | None
    iterations: int
