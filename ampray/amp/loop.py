"""train_with_mixed_precision: the engine over a DataLoader for a number of epochs."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ampray.amp.adaptive import AdaptiveMixedPrecisionTrainer
from ampray.amp.config import MixedPrecisionConfig
from ampray.amp.trainer import MixedPrecisionTrainer


def train_with_mixed_precision(model: nn.Module, train_loader: Iterable, optimizer: torch.optim.Optimizer,
                               criterion: Callable, num_epochs: int = 10,
                               config: MixedPrecisionConfig | None = None, adaptive: bool = True,
                               scheduler: Any = None, device: torch.device | str | None = None,
                               on_step: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train `model` in place; returns times, losses, the performance summary and, when adaptive, the
    adaptation summary. `train_loader` yields `(input, target)` pairs. The optimizer must already hold
    `model`'s parameters; the model is moved to the engine's device first (in place for nn.Module)."""
    if not isinstance(num_epochs, int) or num_epochs < 1:
        raise ValueError(f"train_with_mixed_precision: num_epochs={num_epochs!r} is not allowed; expected an "
                         "integer >= 1")
    cls = AdaptiveMixedPrecisionTrainer if adaptive else MixedPrecisionTrainer
    trainer = cls(config, device)
    model = trainer.prepare_model(model)
    epoch_losses: list[float] = []
    t0 = time.perf_counter()
    step = 0
    for _ in range(num_epochs):
        # Sum on the device, read once per epoch: no sync per step for bookkeeping.
        total, batches = torch.zeros((), dtype=torch.float64, device=trainer.device), 0
        for data, target in train_loader:
            out = trainer.train_step(model, optimizer, criterion, data, target, scheduler)
            loss = out["loss"]
            total += torch.nan_to_num(loss.double(), nan=0.0) if torch.is_tensor(loss) else float(loss)
            batches += 1
            step += 1
            if on_step is not None:
                on_step(step, out)
        epoch_losses.append(total.item() / max(batches, 1))
    result: dict[str, Any] = {
        "total_training_time": time.perf_counter() - t0,
        "final_loss": epoch_losses[-1],
        "epoch_losses": epoch_losses,
        "performance_summary": trainer.get_performance_summary(),
        "trainer": trainer,
    }
    if adaptive:
        result["adaptation_summary"] = trainer.get_adaptation_summary()
    return result
