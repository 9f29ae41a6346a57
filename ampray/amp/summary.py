"""The performance summary of a trainer: counters, scaler, offenders, memory, estimates."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ampray.amp.config import dtype_name
from ampray.amp.records import StepStats

if TYPE_CHECKING:
    from ampray.amp.trainer import MixedPrecisionTrainer


def step_stats(trainer: "MixedPrecisionTrainer") -> StepStats:
    """Counters as a typed record (reads the device once)."""
    c = trainer.counters.read()
    steps, opt_steps = c["training_steps"], c["optimizer_steps"]
    overflows = trainer.scaler.read().overflows if trainer.scaler.enabled or trainer.scaler.dynamic else 0
    t = c["wall_time_s"]
    return StepStats(
        training_steps=steps,
        optimizer_steps=opt_steps,
        skipped_steps=c["skipped_steps"],
        overflow_rate=overflows / opt_steps if opt_steps else 0.0,
        nonfinite_losses=c["nonfinite_losses"],
        oom_events=c["oom_events"],
        oom_skipped_batches=c["oom_skipped_batches"],
        oom_split_retries=c["oom_split_retries"],
        avg_step_time_s=t / steps if steps else 0.0,
        samples_per_s=c["samples"] / t if t > 0 else 0.0,
        loss=c["last_loss"],
    )


def performance_summary(trainer: "MixedPrecisionTrainer") -> dict[str, Any]:
    c = trainer.counters.read()
    stats = step_stats(trainer)
    scaler = trainer.scaler.read()
    k = trainer.config.attribution_top_k
    performance = stats.to_dict()
    performance.update(
        samples=c["samples"],
        mean_loss=c["loss_sum"] / c["loss_count"] if c["loss_count"] else float("nan"),
        wall_time_s=c["wall_time_s"],
        host_time_s=c["host_time_s"],
        oom_pieces=c["pieces"],
    )
    scaler_info = scaler.to_dict()
    scaler_info.update(
        current_scale=scaler.scale,
        enabled=trainer.scaler.enabled,
        dynamic=trainer.scaler.dynamic,
        autocast_dtype=dtype_name(trainer.amp_dtype),
        settings=trainer.scaler.settings(),
        top_overflow_params=trainer.offenders.most_common(k),
        scale_history=list(trainer.scale_history),
        events=list(trainer.events),
    )
    return {
        "performance": performance,
        "scaler_info": scaler_info,
        "memory": trainer.memory(),
        "estimated_memory_savings": trainer.estimated_memory_savings(),
    }
