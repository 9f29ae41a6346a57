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
                 Stall.on_booked(engine, step, overflow): counts skipped optimizer steps in a row at any
                 scale (an overflow or a non-finite loss; a clean step resets the count) and at
                 `stall_patience` raises TrainingStalledError or falls back to bf16. A fallback is made
                 once: a collapse or stall after it raises (bf16 overflowing too: the model diverged).

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


class TrainingStalledError(FloatingPointError):
    """`stall_patience` optimizer steps in a row were skipped and `stall_policy="raise"` (or bf16, after
    the fallback, stalled too): the run makes no progress."""


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
        offenders = _offenders(engine)
        event: dict[str, Any] = {"kind": "scale_collapse", "optimizer_step": step, "scale": engine.last_scale,
                                 "offenders": offenders, "action": "raise"}
        why_not = _record_and_fall_back(engine, event, "collapse_policy")
        if why_not is None:
            return
        raise ScaleCollapseError(
            f"loss scale collapsed: {engine.counters.overflows_at_floor} overflowing steps in a row at min_scale="
            f"{engine.scaler.min_scale} (optimizer step {step}, scale {engine.last_scale}); "
            f"offending parameters: {offenders}{why_not}")


class Stall:
    """`stall_policy` after `stall_patience` skipped optimizer steps in a row, at any scale."""

    # The counts live in the engine's counters (`skipped_in_a_row`, `nonfinite_in_a_row`), so that they
    # resume exactly. Whether a skip came with a non-finite loss is this rank's own flag (under a group
    # another rank's NaN loss reaches this one as non-finite gradients): it words the message only, the
    # decision follows from the skip flags, which every rank shares.

    def on_booked(self, engine: "MixedPrecisionTrainer", step: int, overflow: bool) -> None:
        c = engine.counters
        if engine.fallback_due:
            return
        if overflow:
            c.skipped_in_a_row += 1
            c.nonfinite_in_a_row += int(engine.booked_loss_nonfinite)
        else:
            c.skipped_in_a_row = c.nonfinite_in_a_row = 0
        if c.skipped_in_a_row >= engine.config.stall_patience:
            self._stall(engine, step)

    def _stall(self, engine: "MixedPrecisionTrainer", step: int) -> None:
        c = engine.counters
        n, bad = c.skipped_in_a_row, c.nonfinite_in_a_row
        offenders = _offenders(engine)
        if bad == n:
            reason = "the loss was not finite in every one of them"
        elif bad:
            reason = (f"the loss was not finite in {bad} of them, the gradients overflowed (inf/NaN) in the "
                      "others")
        else:
            reason = "the gradients overflowed (inf/NaN) in every one of them"
            if engine.consensus is not None and engine.consensus.active:
                reason += " (on this rank; a non-finite loss on another rank reaches it as non-finite gradients)"
        scale = f"{engine.last_scale:g}" if engine.scaler.enabled else "none (unscaled)"
        event: dict[str, Any] = {"kind": "stall", "optimizer_step": step, "skipped_in_a_row": n,
                                 "nonfinite_loss_steps": bad, "scale": engine.last_scale,
                                 "dtype": str(engine.amp_dtype).removeprefix("torch."),
                                 "offenders": offenders, "action": "raise"}
        why_not = _record_and_fall_back(engine, event, "stall_policy")
        if why_not is None:
            return
        named = offenders or "none singled out (every gradient was non-finite)"
        raise TrainingStalledError(
            f"training stalled: {n} optimizer steps in a row were skipped (optimizer steps {step - n + 1} to "
            f"{step}; dtype {event['dtype']}, loss scale {scale}): {reason}; offending parameters: {named}; "
            f"stall_patience={engine.config.stall_patience}{why_not}")


def _offenders(engine: "MixedPrecisionTrainer") -> list[str]:
    return [name for name, _ in engine.offenders.most_common(engine.config.attribution_top_k)]


def _record_and_fall_back(engine: "MixedPrecisionTrainer", event: dict[str, Any], field: str) -> str | None:
    """Record the policy's `event`; fall back to bf16 where the policy `field` asks for it and can (returns
    None), else return the end of the error message saying why not (the caller raises)."""
    engine.events.append(event)
    why_not = _why_no_fallback(engine, getattr(engine.config, field), field)
    if why_not is None:
        event["action"] = "fallback_bf16"
        engine.fall_back_to_bf16()
    return why_not


def _why_no_fallback(engine: "MixedPrecisionTrainer", policy: str, field: str) -> str | None:
    """None when the bf16 fallback applies now, else the end of the error message saying why it does not."""
    if policy != "fallback_bf16":
        return ""
    if engine.fell_back:
        return (f"; {field}='fallback_bf16' already fell back to bf16, and bf16 fails too: the model "
                "diverged (lower the learning rate, clip gradients, or check the data)")
    if engine.amp_dtype == torch.bfloat16 and not engine.scaler.enabled:
        return f"; {field}='fallback_bf16' cannot help: the run is already in bf16 without loss scaling"
    if not autocast_supported(engine.device.type, torch.bfloat16):
        return f"; bf16 fallback unavailable on {engine.device}"
    return None
