"""The optimizer step of the engine and the policies that follow from it.

One read of the gradients (a foreach norm per parameter) gives everything: whether any gradient is
inf/NaN, which parameters overflowed, and the global norm for clipping. Unscaling and clipping then
happen in one multiply. The skip decision stays on the device when the optimizer accepts `found_inf`
(fused Adam/AdamW/SGD, as `GradScaler.step` uses them); then the bookkeeping that needs host values
(skipped-step count, scale history, collapse policy, scheduler, adaptation) runs one step later, from
flags copied to pinned memory without waiting. Other optimizers need the flags on the host before
`step()`: one sync per optimizer step, the same one `GradScaler.step` makes.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from ampray.amp.autocast import autocast_supported


class NonFiniteLossError(FloatingPointError):
    """The loss was NaN/inf and `nonfinite_loss_policy="raise"`."""


class ScaleCollapseError(FloatingPointError):
    """Overflows continued at `min_scale` and `collapse_policy="raise"`."""


class StepMixin:
    """The optimizer step of MixedPrecisionTrainer (state lives on the trainer)."""

    def _init_stepping(self) -> None:
        self.scale_history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._param_names: list[str] = []
        self._param_slot: dict[int, int] = {}
        self._offender_counts = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._slot_cache: tuple[tuple[int, ...], torch.Tensor] | None = None
        self._pending: tuple[Any, int] | None = None
        self._host_flags: torch.Tensor | None = None
        self._flags_event = torch.cuda.Event() if self.device.type == "cuda" else None

    # -- the step --------------------------------------------------------------------------------
    def _optimizer_step(self, model, optimizer, scheduler) -> dict[str, Any]:
        cfg, c, scaler = self.config, self.counters, self.scaler
        self._settle()
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        out: dict[str, Any] = {}
        decide = scaler.enabled or cfg.max_grad_norm is not None or cfg.nonfinite_loss_policy != "ignore"
        if not grads or not (decide or c.window_poisoned):
            if grads:
                optimizer.step()
            return self._finish(optimizer, out, [0.0, 0.0, 0.0, self._last_scale], scheduler, c.window_poisoned)
        norms = torch.stack(torch._foreach_norm(grads))
        nonfinite = ~torch.isfinite(norms)
        found = nonfinite.any()
        bad_loss = c.window_bad_loss
        checked = cfg.nonfinite_loss_policy != "ignore"  # else bad_loss stays False: save the ops
        skip = found | bad_loss if checked else found
        self._count_offenders(params, nonfinite & ~bad_loss if checked else nonfinite)
        fused = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        grad_scale = self._unscale_and_clip(grads, norms, fused, out)
        flags = torch.cat([torch.stack([skip, found, bad_loss]).float(), scaler.scale_tensor.view(1)])
        if fused and cfg.nonfinite_loss_policy != "raise" and not c.window_poisoned:
            # The skip stays on the device: the fused kernel reads found_inf (and unscales by grad_scale).
            optimizer.grad_scale, optimizer.found_inf = grad_scale, skip.float()
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale, optimizer.found_inf
            scaler.update(found, valid=~bad_loss if checked else None)  # a NaN loss is no overflow
            self._defer(flags, scheduler)
            out.update(skipped=skip, optimizer_stepped=~skip, scale=flags[3])
            return self._finish(optimizer, out, None, None, False)
        values = flags.tolist()  # the one sync of the step: flags and scale in one copy
        skipped = values[0] > 0 or c.window_poisoned
        if values[2] > 0 and cfg.nonfinite_loss_policy == "raise":
            self._end_window(optimizer)
            raise NonFiniteLossError(f"non-finite loss at training step {c.training_steps} (optimizer step "
                                     f"{c.optimizer_steps + 1}); nonfinite_loss_policy='raise'")
        if not skipped:
            optimizer.step()  # gradients were unscaled above: grad_scale is only for fused kernels
        if values[2] == 0 and not c.window_poisoned:
            scaler.update(found)
        return self._finish(optimizer, out, values, scheduler, c.window_poisoned)

    def _unscale_and_clip(self, grads, norms, fused: bool, out: dict[str, Any]) -> torch.Tensor | None:
        """Unscale (and clip) in one multiply; returns the scale a fused optimizer should divide by."""
        scaler, max_norm = self.scaler, self.config.max_grad_norm
        if max_norm is not None:
            total = torch.linalg.vector_norm(norms)
            inv = scaler.inv_scale() if scaler.enabled else None
            if inv is not None:
                total = total * inv  # the norm of the unscaled gradients: clipping sees true values
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, coef * inv if inv is not None else coef)
            out["grad_norm"] = total
            return None
        if not scaler.enabled:
            return None
        if fused:
            return scaler.scale_tensor
        torch._foreach_mul_(grads, scaler.inv_scale())
        return None

    def _finish(self, optimizer, out, values, scheduler, poisoned: bool) -> dict[str, Any]:
        self.counters.optimizer_steps += 1
        if values is not None:
            skipped = values[0] > 0 or poisoned
            out.update(skipped=skipped, optimizer_stepped=not skipped, scale=values[3])
            self._book(values, scheduler, self.counters.optimizer_steps, poisoned)
        self._end_window(optimizer)
        return out

    def _end_window(self, optimizer) -> None:
        self.counters.end_window()
        optimizer.zero_grad(set_to_none=self.config.memory_efficient)

    # -- deferred bookkeeping ---------------------------------------------------------------------
    def _defer(self, flags: torch.Tensor, scheduler: Any) -> None:
        if self._flags_event is not None:
            if self._host_flags is None:
                self._host_flags = torch.empty(4, pin_memory=True)
            self._host_flags.copy_(flags, non_blocking=True)
            self._flags_event.record()
        else:
            self._host_flags = flags
        self._pending = (scheduler, self.counters.optimizer_steps + 1)

    def _settle(self) -> None:
        """Book the previous device-side step (its flags arrived long ago; the wait is normally zero)."""
        if self._pending is None:
            return
        scheduler, step = self._pending
        self._pending = None
        if self._flags_event is not None:
            self._flags_event.synchronize()
        self._book(self._host_flags.tolist(), scheduler, step, False)

    def _book(self, values: list[float], scheduler: Any, step: int, poisoned: bool) -> None:
        skipped, found, bad_loss = values[0] > 0 or poisoned, values[1] > 0, values[2] > 0
        self._note_scale(values[3], step)
        self.counters.skipped_steps += int(skipped)
        overflow = found and not bad_loss
        if not skipped and scheduler is not None:
            scheduler.step()
        if overflow:
            self._on_overflow(step)
        self._after_optimizer_step(overflow=overflow, step=step)

    def _after_optimizer_step(self, overflow: bool, step: int) -> None:
        """Hook for subclasses (the adaptive trainer), called once per booked optimizer step."""

    # -- overflow attribution --------------------------------------------------------------------
    def _index_params(self, model) -> None:
        for name, p in model.named_parameters():
            if id(p) not in self._param_slot:
                self._param_slot[id(p)] = len(self._param_names)
                self._param_names.append(name.removeprefix("module."))  # DDP's wrapper prefix
        self._grow_counts()

    def _grow_counts(self) -> None:
        extra = len(self._param_names) - self._offender_counts.numel()
        if extra > 0:
            self._offender_counts = torch.cat([self._offender_counts, self._offender_counts.new_zeros(extra)])

    def _count_offenders(self, params, mask: torch.Tensor) -> None:
        key = tuple(id(p) for p in params)
        if self._slot_cache is None or self._slot_cache[0] != key:
            for p in params:  # parameters the optimizer holds but the model did not name
                if id(p) not in self._param_slot:
                    self._param_slot[id(p)] = len(self._param_names)
                    self._param_names.append(f"param{len(self._param_names)}")
            self._grow_counts()
            slots = torch.tensor([self._param_slot[i] for i in key], device=self.device)
            self._slot_cache = (key, slots)
        self._offender_counts.index_add_(0, self._slot_cache[1], mask.long())

    @property
    def offenders(self) -> Counter:
        """Overflowing steps per parameter name (reads the device counters)."""
        counts = self._offender_counts.tolist()
        return Counter({n: k for n, k in zip(self._param_names, counts) if k})

    def _load_offenders(self, offenders: dict[str, int]) -> None:
        for name in offenders:
            if name not in self._param_names:
                self._param_names.append(name)
        self._grow_counts()
        self._offender_counts.zero_()
        for name, count in offenders.items():
            self._offender_counts[self._param_names.index(name)] = int(count)

    # -- policies --------------------------------------------------------------------------------
    def _note_scale(self, scale: float, step: int) -> None:
        """Record a scale change seen at `step` (the update of the step before made it)."""
        if scale != self._last_scale and self.config.log_scaling:
            reason = "growth" if scale > self._last_scale else "backoff"
            self.scale_history.append({"optimizer_step": step - 1, "old": self._last_scale, "new": scale,
                                       "reason": reason})
        self._last_scale = scale

    def _on_overflow(self, step: int) -> None:
        c = self.counters
        at_floor = self._last_scale <= self.scaler.min_scale
        c.overflows_at_floor = c.overflows_at_floor + 1 if at_floor else 0
        if c.overflows_at_floor >= self.config.collapse_patience:
            self._on_collapse(step)

    def _on_collapse(self, step: int) -> None:
        c, k = self.counters, self.config.attribution_top_k
        offenders = [name for name, _ in self.offenders.most_common(k)]
        event = {"kind": "scale_collapse", "optimizer_step": step, "scale": self._last_scale,
                 "offenders": offenders, "action": "raise"}
        can_fallback = autocast_supported(self.device.type, torch.bfloat16)
        self.events.append(event)
        if self.config.collapse_policy == "fallback_bf16" and can_fallback:
            event["action"] = "fallback_bf16"
            self.amp_dtype = torch.bfloat16
            self.scaler.disable()
            self._last_scale = 1.0
            c.overflows_at_floor = 0
            return
        raise ScaleCollapseError(
            f"loss scale collapsed: {c.overflows_at_floor} overflowing steps in a row at min_scale="
            f"{self.scaler.min_scale} (optimizer step {step}, scale {self._last_scale}); "
            f"offending parameters: {offenders}"
            + ("" if can_fallback else f"; bf16 fallback unavailable on {self.device}"))
