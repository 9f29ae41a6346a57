"""A local, single-process training run of the engine on the built-in data (no Ray).

This is what `ampray train --local` runs: a small model on the synthetic corpus, CPU or GPU, with a
progress bar and a summary table at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ampray.amp.adaptive import AdaptiveMixedPrecisionTrainer
from ampray.amp.autocast import autocast_supported, default_device
from ampray.amp.config import MixedPrecisionConfig, dtype_name
from ampray.amp.trainer import MixedPrecisionTrainer
from ampray.data.synthetic import SyntheticConfig, make_dataset, uniform_loss
from ampray.models import build_criterion, build_model

_DEMO_MODELS: dict[str, dict[str, Any]] = {
    "mlp": {"in_features": 784, "hidden": 256, "depth": 2, "num_classes": 10},
    "cnn": {"arch": "small", "num_classes": 10},
    "gpt": {"preset": "micro"},
}


@dataclass
class LocalRunConfig:
    """A local demo run."""

    model: str = "mlp"
    """Model kind: mlp, cnn or gpt."""
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 64
    """Samples per step."""
    lr: float = 3e-3
    """AdamW learning rate."""
    dtype: str = "auto"
    """auto (fp16 on CUDA, bf16 on CPU), fp16, bf16 or fp32."""
    adaptive: bool = True
    """Use the adaptive trainer."""
    seed: int = 0
    """Seed of model init, data and shuffling."""
    device: str | None = None
    """cpu, cuda or None for the best available."""

    def __post_init__(self) -> None:
        if self.model not in _DEMO_MODELS:
            raise ValueError(f"model={self.model!r} is not allowed; expected one of {sorted(_DEMO_MODELS)}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; expected an integer >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} is not allowed; expected a number > 0")


def _resolve_dtype(run: LocalRunConfig, device: torch.device) -> str:
    if run.dtype != "auto":
        return run.dtype
    return "fp16" if device.type == "cuda" else ("bf16" if autocast_supported("cpu", torch.bfloat16) else "fp32")


def run_local(run: LocalRunConfig, console: Console | None = None) -> dict[str, Any]:
    """Train the demo model; returns losses and the engine's summaries."""
    console = console or Console()
    device = torch.device(run.device) if run.device else default_device()
    torch.manual_seed(run.seed)
    data_cfg = SyntheticConfig(num_samples=max(2048, run.batch_size * 8), seed=run.seed)
    x, y = make_dataset(run.model, data_cfg)
    model = build_model(run.model, **_DEMO_MODELS[run.model])
    config = MixedPrecisionConfig(dtype=_resolve_dtype(run, device), growth_interval=100)
    trainer = (AdaptiveMixedPrecisionTrainer if run.adaptive else MixedPrecisionTrainer)(config, device)
    model = trainer.prepare_model(model)
    optimizer = trainer.build_optimizer(model, "adamw", lr=run.lr)
    criterion = build_criterion(run.model)
    g = torch.Generator().manual_seed(run.seed)
    losses: list[float] = []
    order = torch.randperm(len(x), generator=g)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=console,
                  transient=False) as progress:
        task = progress.add_task(f"{run.model} {dtype_name(trainer.amp_dtype)}", total=run.steps, loss="-")
        for step in range(run.steps):
            start = (step * run.batch_size) % (len(x) - run.batch_size + 1)
            idx = order[start:start + run.batch_size]
            out = trainer.train_step(model, optimizer, criterion, x[idx], y[idx])
            if step % 25 == 0 or step == run.steps - 1:
                losses.append(float(out["loss"]))  # a sync, but only every 25 steps
                progress.update(task, loss=f"{losses[-1]:.4f}")
            progress.advance(task)
    summary = trainer.get_performance_summary()
    result = {"losses": losses, "uniform_loss": uniform_loss(run.model, data_cfg), "summary": summary,
              "device": str(device), "dtype": dtype_name(trainer.amp_dtype)}
    if run.adaptive:
        result["adaptation"] = trainer.get_adaptation_summary()
    console.print(summary_table(result))
    return result


def summary_table(result: dict[str, Any]) -> Table:
    perf, scaler, mem = (result["summary"][k] for k in ("performance", "scaler_info", "memory"))
    table = Table(title=f"ampray local run ({result['device']}, {result['dtype']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("first loss", f"{result['losses'][0]:.4f}"),
        ("final loss", f"{result['losses'][-1]:.4f}"),
        ("uniform-guess loss", f"{result['uniform_loss']:.4f}"),
        ("optimizer steps", str(perf["optimizer_steps"])),
        ("skipped steps", str(perf["skipped_steps"])),
        ("overflow rate", f"{perf['overflow_rate']:.4f}"),
        ("throughput (samples/s)", f"{perf['samples_per_s']:.0f}"),
        ("avg step time (ms)", f"{perf['avg_step_time_s'] * 1e3:.2f}"),
        ("loss scale", f"{scaler['current_scale']:g}"),
        ("scale backoffs / growths", f"{scaler['backoffs']} / {scaler['growths']}"),
        ("peak memory (MiB)", f"{max(mem['peak_allocated_bytes'], 0) / 2**20:.1f}"),
    ]
    if result.get("adaptation") is not None:
        rows.append(("adaptations", str(result["adaptation"]["total_adaptations"])))
    for name, value in rows:
        table.add_row(name, value)
    return table
