"""Held-out evaluation of one rank's shard: under the engine's autocast, without gradients, on the bare
module (DDP's forward may broadcast buffers, a collective that ranks with different numbers of held-out
batches would wait on forever)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ampray.actors.checkpoint import unwrap
from ampray.amp.trainer import to_device
from ampray.models.registry import class_dim, logits_of


@dataclass
class EvalStats:
    """One rank's evaluation: the aggregator weights ranks by `samples` for the cross-rank figures."""

    loss: float
    """Mean of the loss over the rank's held-out samples (NaN when it had none)."""
    accuracy: float | None
    """Share of classification targets the output's argmax got right (None for other targets)."""
    samples: int
    """Held-out samples this rank evaluated."""

    def to_dict(self) -> dict[str, Any]:
        out = {"val/loss": self.loss, "val/samples": self.samples}
        if self.accuracy is not None:
            out["val/accuracy"] = self.accuracy
        return out


def _classes(output: Any, target: torch.Tensor) -> int | None:
    """For integer targets, the dimension of the output's class scores (`logits_of`: a tensor, a dict's
    "logits", a tuple's first item) that pairs with them (last, or torch's dimension 1); else None."""
    logits = logits_of(output)
    if logits is None or target.is_floating_point() or target.dtype == torch.bool:
        return None
    return class_dim(logits, target)


@torch.no_grad()
def evaluate(model: torch.nn.Module, engine, criterion, batches, max_batches: int = 0,
             lockstep: bool = False) -> EvalStats:
    """The loss (weighted by batch size) and, for classification targets, the accuracy over `batches`;
    `max_batches` > 0 stops after that many. Restores the module's train/eval mode afterwards.
    `lockstep`: every rank runs as many forwards as the rank with the most batches (`batches.most_batches`),
    the extra ones on one filler row whose output is not counted: a model sharded with FSDP all-gathers its
    parameters in each forward, which every rank must join."""
    module = unwrap(model)
    was_training = module.training
    module.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    right = torch.zeros((), dtype=torch.float64, device=engine.device)
    counted = torch.zeros((), dtype=torch.float64, device=engine.device)
    samples, classified = 0, None
    try:
        for i, (x, y) in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            x, y = to_device(x, engine.device), y.to(engine.device, non_blocking=True)
            with engine.autocast():
                output = module(x)
                loss = criterion(output, y)
            n = len(y)
            loss_sum += loss.detach().double() * n
            samples += n
            if classified is None:
                dim = _classes(output, y)
                classified = dim is not None
            if classified:
                predicted, labels = logits_of(output).argmax(dim), y
                if predicted.shape != labels.shape:  # the same rows up to dimensions of size 1
                    predicted, labels = predicted.reshape(-1), labels.reshape(-1)
                valid = labels >= 0  # negative targets are ignored, as cross_entropy's ignore_index=-100
                right += ((predicted == labels) & valid).sum()
                counted += valid.sum()
        if lockstep:
            todo = min(batches.most_batches, max_batches) if max_batches else batches.most_batches
            x, _ = batches.filler()
            x = to_device(x, engine.device)
            for _ in range(todo - min(len(batches), todo)):
                with engine.autocast():
                    module(x)
    finally:
        module.train(was_training)
    # One sync for the whole evaluation, not one per batch.
    total, hits, count = torch.stack([loss_sum, right, counted]).tolist()
    accuracy = (hits / count if count else math.nan) if classified else None
    return EvalStats(total / samples if samples else math.nan, accuracy, samples)

