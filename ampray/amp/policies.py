"""The engine's policies: small objects that `MixedPrecisionTrainer` calls at named events.

Events of one `train_step`, in order, and who answers them:

- `piece_loss`   NonFiniteLoss.backward_factor(loss, factor), under a process group: the factor the
                 piece's backward multiplies the loss by (the loss scale times the piece's weight), made
                 NaN when the loss is not finite, so that the rank's gradients carry the skip through
                 DDP's all-reduce (one process reads its own loss flag at the optimizer step instead).
- `oom`          OOM.decide(rows_left_to_split): after the ranks agreed that some rank ran out of memory
                 in a piece's forward or backward: "split" it into halves (and every later micro-batch into
                 as many pieces), or "drop" the window (its optimizer step is skipped). "raise" never gets
                 here: the error propagates on the rank where it happened.
- `boundary`     NonFiniteLoss.check(bad_ranks, where): at the optimizer step, before stepping: raise
                 NonFiniteLossError naming the ranks whose loss was non-finite ("raise" only).
- `booked`       Collapse.on_booked(engine, step, overflow) and, for the adaptive trainer,
                 ScaleAdaptation.on_booked(engine, step, overflow): once per optimizer step, in step order,
                 with host values (one step late on the no-sync path). Collapse counts overflows at the
                 floor in a row (a clean step resets the count) and at `collapse_patience` raises
                 ScaleCollapseError or falls back to bf16.

Every input of a decision is the same on every rank (all-reduced gradients, agreed OOM flags, the same
scale), so every rank decides the same; see `consensus.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ampray.amp.autocast import autocast_supported

if TYPE_CHECKING:
    from ampray.amp.trainer import MixedPrecisionTrainer


class NonFiniteLossError(FloatingPointError):
    """The loss was NaN/inf and `nonfinite_loss_policy="raise"`."""


class ScaleCollapseError(FloatingPointError):
    """Overflows continued at `min_scale` and `collapse_policy="raise"`."""


class OOM:
    """`oom_policy`: "raise" the error, "skip" the window, or "split" the piece into halves and retry."""

    def __init__(self, kind: str):
        self.kind = kind

    @property
    def collective(self) -> bool:
        """Whether the ranks must agree on each piece (every policy but "raise")."""
        return self.kind != "raise"

    def decide(self, splittable: bool) -> str:
        return "split" if self.kind == "split" and splittable else "drop"


class NonFiniteLoss:
    """`nonfinite_loss_policy`: "skip" the step, "raise" an error, or "ignore" (no check at all)."""

    def __init__(self, kind: str):
        self.kind = kind

    @property
    def checked(self) -> bool:
        return self.kind != "ignore"

    @property
    def gathers(self) -> bool:
        """Whether the optimizer step must learn which ranks saw a non-finite loss."""
        return self.kind == "raise"

    def backward_factor(self, loss: torch.Tensor, factor: torch.Tensor | float):
        """The piece's backward factor, NaN where the loss is not finite (unchanged when unchecked)."""
        if not self.checked:
            return factor
        return torch.where(torch.isfinite(loss.detach()), factor, torch.nan)

    def check(self, bad_ranks: list[int], world: int, where: str) -> None:
        if self.kind == "raise" and bad_ranks:
            on = f" on rank(s) {bad_ranks}" if world > 1 else ""
            raise NonFiniteLossError(f"non-finite loss{on} at {where}; nonfinite_loss_policy='raise'")


class Collapse:
    """`collapse_policy` after `collapse_patience` overflowing steps in a row at `min_scale`."""

    # The count lives in the engine's counters (`overflows_at_floor`), so that it resumes exactly.

    def on_booked(self, engine: "MixedPrecisionTrainer", step: int, overflow: bool) -> None:
        c = engine.counters
        if engine.fallback_due:
            return  # decided: the steps booked until it applies change nothing
        at_floor = overflow and engine.scaler.enabled and engine.last_scale <= engine.scaler.min_scale
        c.overflows_at_floor = c.overflows_at_floor + 1 if at_floor else 0
        if c.overflows_at_floor >= engine.config.collapse_patience:
            self._collapse(engine, step)

    def _collapse(self, engine: "MixedPrecisionTrainer", step: int) -> None:
        k = engine.config.attribution_top_k
        offenders = [name for name, _ in engine.offenders.most_common(k)]
        event: dict[str, Any] = {"kind": "scale_collapse", "optimizer_step": step, "scale": engine.last_scale,
                                 "offenders": offenders, "action": "raise"}
        can_fallback = autocast_supported(engine.device.type, torch.bfloat16)
        engine.events.append(event)
        if engine.config.collapse_policy == "fallback_bf16" and can_fallback:
            event["action"] = "fallback_bf16"
            engine.fall_back_to_bf16()
            engine.counters.overflows_at_floor = 0
            return
        raise ScaleCollapseError(
            f"loss scale collapsed: {engine.counters.overflows_at_floor} overflowing steps in a row at min_scale="
            f"{engine.scaler.min_scale} (optimizer step {step}, scale {engine.last_scale}); "
            f"offending parameters: {offenders}"
            + ("" if can_fallback else f"; bf16 fallback unavailable on {engine.device}"))
