"""MixedPrecisionTrainer: one `train_step` that does autocast, loss scaling, accumulation, clipping and the
OOM / non-finite / scale-collapse policies, with counters and state that resume exactly.

Host-device synchronisation (see `stepping.py`): none on accumulation micro-steps; none on optimizer
steps with an optimizer that takes `found_inf` (fused Adam/AdamW/SGD: the skip happens on the device,
the bookkeeping one step later); one per optimizer step otherwise, the same one `GradScaler.step` makes,
and none at all for unscaled runs with `nonfinite_loss_policy="ignore"` and no clipping. Loss sums and
scaler counters stay on the device until a summary or `state_dict()` reads them."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from typing import Any, Callable

import torch
from torch import nn

from ampray.amp.autocast import Fp32Islands, autocast_supported, default_device
from ampray.amp.config import MixedPrecisionConfig, dtype_name, parse_dtype
from ampray.amp.memory import memory_stats
from ampray.amp.records import MemoryStats, ScalerState, StepStats
from ampray.amp.scaler import LossScaler
from ampray.amp.stepping import NonFiniteLossError, ScaleCollapseError, StepMixin  # noqa: F401
from ampray.amp.state import TrainerCounters, atomic_save, count_params, estimate_memory_savings

OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class _WindowPoisoned(Exception):
    """An OOM struck mid-backward after gradients had been accumulated: this window cannot be exact."""


class MixedPrecisionTrainer(StepMixin):
    """Mixed-precision training engine: `prepare_model`, then `train_step` per batch."""

    def __init__(self, config: MixedPrecisionConfig | None = None, device: torch.device | str | None = None):
        # A copy: adaptation and retune change the engine's settings, never the caller's config object.
        self.config = copy.deepcopy(config) if config is not None else MixedPrecisionConfig()
        self.device = torch.device(device) if device is not None else default_device()
        self.amp_dtype = self.config.dtype if self.config.autocast_enabled else torch.float32
        if not autocast_supported(self.device.type, self.amp_dtype):
            raise ValueError(f"MixedPrecisionConfig.dtype={self.amp_dtype} is not supported for autocast on "
                             f"device={self.device}; use fp16 on CUDA, bf16 on Ampere+/CPU, or fp32")
        self.scaler = LossScaler(self.config, self.device)
        self.counters = TrainerCounters(self.device)
        self._init_stepping()
        self._islands = Fp32Islands(self.config.fp32_modules, self.device.type)
        self._prepared: set[int] = set()
        self._last_scale = self.scaler.init_scale
        self._num_params = 0

    # -- setup ------------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move the model to the device (fp32 master weights), channels_last for conv nets on CUDA when
        memory_efficient, and hook the configured fp32 modules."""
        model = model.to(self.device)
        if self.config.memory_efficient and self.device.type == "cuda" and any(
                isinstance(m, nn.Conv2d) for m in model.modules()):
            model = model.to(memory_format=torch.channels_last)
        self._attach(model)
        return model

    def _attach(self, model: nn.Module) -> None:
        if id(model) not in self._prepared:
            self._prepared.add(id(model))
            self._num_params = count_params(model)
            self._index_params(model)
            if self.config.fp32_modules:
                self._islands.attach(model)

    def build_optimizer(self, model: nn.Module, name: str = "adamw", lr: float = 1e-3, **kwargs: Any):
        """Adam/AdamW/SGD; fused on CUDA when memory_efficient (one kernel per step, no per-param loop)."""
        classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
        if name not in classes:
            raise ValueError(f"build_optimizer: name={name!r} is not allowed; expected one of {sorted(classes)}")
        if self.config.memory_efficient and self.device.type == "cuda":
            kwargs.setdefault("fused", True)
        return classes[name](model.parameters(), lr=lr, **kwargs)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # -- the step --------------------------------------------------------------------------------
    def train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion: Callable,
                   data: Any, target: Any, scheduler: Any = None) -> dict[str, Any]:
        """One micro-batch; the optimizer steps on every `gradient_accumulation_steps`-th call."""
        t0 = time.perf_counter()
        self._attach(model)
        self.counters.mark_start()
        c, k = self.counters, self.config.gradient_accumulation_steps
        c.micro_in_window += 1
        boundary = c.micro_in_window == k
        data, target = to_device(data, self.device), to_device(target, self.device)
        try:
            loss = self._forward_backward(model, criterion, data, target, 1.0 / k, boundary)
            c.add_loss(loss, check=self.config.nonfinite_loss_policy != "ignore")
        except _WindowPoisoned:
            loss = torch.full((), math.nan, device=self.device)
            c.window_poisoned = True
        c.training_steps += 1
        c.samples += _batch_size(data)
        out: dict[str, Any] = {"loss": loss, "scale": self._last_scale, "skipped": False,
                               "optimizer_stepped": False, "is_boundary": boundary}
        if boundary:
            out.update(self._optimizer_step(model, optimizer, scheduler))
        c.mark_end()
        out["step_time_s"] = time.perf_counter() - t0  # host time: launch time where nothing waited
        c.host_time_s += out["step_time_s"]
        return out

    def _forward_backward(self, model, criterion, data, target, weight: float, boundary: bool) -> torch.Tensor:
        """Forward and backward over the micro-batch (in chunks once OOM splitting has been needed)."""
        return self._span(model, criterion, data, target, 0, _batch_size(data), weight, boundary)

    def _span(self, model, criterion, data, target, start, stop, weight, sync) -> torch.Tensor:
        """Rows [start, stop) in chunks of at most `max_chunk` rows (re-read after each chunk: an OOM
        inside one shrinks the chunks that follow it too)."""
        n, c, losses = _batch_size(data), self.counters, []
        while start < stop:
            end = min(stop, start + c.max_chunk) if c.max_chunk else stop
            losses.append(self._chunk(model, criterion, data, target, start, end, n, weight, sync and end == stop))
            start = end
        return losses[0] if len(losses) == 1 else torch.stack(losses).sum()

    def _chunk(self, model, criterion, data, target, start, stop, n, weight, sync) -> torch.Tensor:
        """Run rows [start, stop); on OOM apply the policy (retry halves, skip, or raise)."""
        c, policy = self.counters, self.config.oom_policy
        frac = (stop - start) / n
        phase = "forward"
        try:
            x, y = _rows(data, start, stop), _rows(target, start, stop)
            # Only the last chunk of the last micro-step all-reduces gradients under DDP.
            no_sync = model.no_sync() if (not sync and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with no_sync, self._islands.guard():
                with self.autocast():
                    loss = criterion(model(x), y)
                phase = "backward"
                w = weight * frac
                self.scaler.scale(loss if w == 1.0 else loss.float() * w).backward()
            c.grads_dirty = True
            loss = loss.detach().float()
            return loss if frac == 1.0 else loss * frac
        except OutOfMemoryError:
            c.oom_events += 1
            if policy == "raise":
                raise
        # Out of the except block: the traceback (and the activations it pins) is released.
        _free_memory(self.device)
        if policy == "split" and stop - start > 1:
            # Whatever happens to this window, later chunks are at most half the size that failed.
            c.max_chunk = (stop - start + 1) // 2
        if phase == "backward" and c.grads_dirty:
            # Earlier chunks' gradients are mixed with partial sums of this one: not recoverable exactly.
            c.oom_skipped_batches += 1
            raise _WindowPoisoned()
        if phase == "backward":
            for p in model.parameters():
                p.grad = None  # a partial backward left partial sums; nothing else was accumulated yet
        if policy == "skip" or stop - start == 1:
            c.oom_skipped_batches += 1
            raise _WindowPoisoned()
        c.oom_split_retries += 1
        return self._span(model, criterion, data, target, start, stop, weight, sync)

    # -- settings changed while training (adaptation, PBT) ----------------------------------------
    def update_scaler_settings(self, **changes: Any) -> dict[str, tuple[Any, Any]]:
        """Change growth/backoff/interval/hysteresis/floor/ceiling mid-run, keeping the growth tracker."""
        diff = self.scaler.set(**changes)
        for name, (_, after) in diff.items():
            setattr(self.config, name, after)
        return diff

    def retune(self, changes: dict[str, Any], reason: str = "manual") -> dict[str, tuple[Any, Any]]:
        """Apply new values of the settings a live run can change, and record it as an event.

        `changes` holds scaler settings (growth_factor, backoff_factor, growth_interval, hysteresis,
        min_scale, max_scale; applied through the scaler's setter, so the current scale and growth
        tracker are kept) and/or {"adaptation": {threshold: value}}. Anything else (dtype, init_scale,
        ...) cannot change in a live run and is a ConfigError. Returns {name: (before, after)} of what
        changed. Used by PBT (a trial restarted from another trial's checkpoint with mutated settings) and
        by a resumed run whose job file was edited.
        """
        from ampray.amp.config import AdaptationConfig, ConfigError
        from ampray.amp.scaler import SETTINGS

        other = sorted(set(changes) - set(SETTINGS) - {"adaptation"})
        if other:
            raise ConfigError(f"retune: {other} cannot change in a live run; allowed are {list(SETTINGS)} "
                              "and adaptation.<threshold>")
        diff = dict(self.update_scaler_settings(**{k: v for k, v in changes.items() if k in SETTINGS}))
        if changes.get("adaptation"):
            old = self.config.adaptation
            new = AdaptationConfig(**{**dataclasses.asdict(old), **changes["adaptation"]})  # validated
            diff.update({f"adaptation.{k}": (getattr(old, k), getattr(new, k))
                         for k in changes["adaptation"] if getattr(old, k) != getattr(new, k)})
            self.config.adaptation = new
        if diff:
            self.events.append({"kind": "retune", "optimizer_step": self.counters.optimizer_steps,
                                "reason": reason, "changes": {k: [b, a] for k, (b, a) in diff.items()}})
        return diff

    # -- summaries and state ---------------------------------------------------------------------
    def get_performance_summary(self) -> dict[str, Any]:
        """Counters, scaler, memory and estimates; reads device counters (one sync)."""
        from ampray.amp.summary import performance_summary

        self._settle()
        return performance_summary(self)

    def records(self) -> tuple["StepStats", "ScalerState", "MemoryStats"]:
        """The typed records a report sends: counters, scaler, memory (one sync)."""
        from ampray.amp.summary import step_stats

        self._settle()
        return step_stats(self), self.scaler.read(), memory_stats(self.device)

    def memory(self) -> dict[str, Any]:
        return memory_stats(self.device).to_dict()

    def estimated_memory_savings(self) -> dict[str, Any]:
        return estimate_memory_savings(self.amp_dtype, self._num_params)

    def state_dict(self) -> dict[str, Any]:
        self._settle()
        state = {
            "config": self.config.to_dict(),
            "amp_dtype": dtype_name(self.amp_dtype),
            "scaler_enabled": self.scaler.enabled,
            "counters": self.counters.state_dict(),
            "offenders": dict(self.offenders),
            "scale_history": list(self.scale_history),
            "events": list(self.events),
            "last_scale": self._last_scale,
        }
        if self.config.save_scaler_state:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the whole engine, its config included (settings changed by adaptation survive); to
        change settings of a resumed run (a PBT mutation), call `update_scaler_settings` afterwards."""
        self.config = MixedPrecisionConfig.from_dict(state["config"])
        self.amp_dtype = parse_dtype(state["amp_dtype"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
            self.scaler.dynamic = bool(state["scaler"]["dynamic"])
        self.scaler.enabled = bool(state["scaler_enabled"])
        self.counters.load_state_dict(state["counters"])
        self._load_offenders(state["offenders"])
        self.scale_history = list(state["scale_history"])
        self.events = list(state["events"])
        self._last_scale = float(state["last_scale"])

    def save_scaler_state(self, path) -> None:
        """Write the engine state to `path`; `torch.load(path, weights_only=True)` reads it."""
        atomic_save(self.state_dict(), path)

    def load_scaler_state(self, path) -> None:
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def to_device(value: Any, device: torch.device) -> Any:
    """A tensor, or the tensors of a tuple, list or dict batch, on `device` (other values as they are)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def _rows(value: Any, start: int, stop: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value if (start == 0 and stop == value.shape[0]) else value[start:stop]
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, start, stop) for v in value)
    if isinstance(value, dict):
        return {k: _rows(v, start, stop) for k, v in value.items()}
    return value


def _batch_size(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.dim() else 1
    if isinstance(value, (tuple, list)) and value:
        return _batch_size(value[0])
    if isinstance(value, dict) and value:
        return _batch_size(next(iter(value.values())))
    return 1


def _free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
