"""MixedPrecisionTrainer: one `train_step` that does autocast, loss scaling, accumulation, clipping and the
OOM / non-finite / scale-collapse / stall policies, with counters and state that resume exactly.

The trainer is a composition: a `LossScaler` (the scale and its rules), `TrainerCounters`, an
`OptimizerStep` (owns the optimizer step and the overflow attribution, `stepper.py`), the policies
called at named events (`policies.py` lists them) and a `Consensus` over the model's process group
(`consensus.py`: why every rank decides the same, and the two decisions that need a collective).

Host-device synchronisation (see `stepper.py`): none on accumulation micro-steps; none on optimizer
steps with optimizers that take `found_inf` (fused Adam/AdamW/SGD: the skip happens on the device,
the bookkeeping one step later); one per optimizer step otherwise, the same one `GradScaler.step` makes,
and none at all for unscaled runs with `nonfinite_loss_policy="ignore"` and no clipping. Loss sums and
scaler counters stay on the device until a summary or `state_dict()` reads them. Under a process group,
`oom_policy="skip"`/`"split"` add two flag all-reduces per piece (see `consensus.py`). A model sharded
with FSDP2 (`fully_shard`) adds one all-reduce of per-parameter norms per optimizer step (`sharding.py`).

An OOM under "split" cuts the micro-batch into pieces: the failing piece is retried as two halves, and
every later micro-batch is cut into as many pieces as the smallest one that was needed (a power of two,
the same number on every rank whatever its batch size)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
import weakref
from typing import Any, Callable

import torch
from torch import nn

from ampray.amp.autocast import Fp32Islands, autocast_supported, default_device
from ampray.amp.config import MixedPrecisionConfig, dtype_name, parse_dtype
from ampray.amp.consensus import Consensus
from ampray.amp.memory import memory_stats
from ampray.amp.policies import (OOM, Collapse, NonFiniteLoss, NonFiniteLossError, ScaleCollapseError,  # noqa: F401
                                  Stall, TrainingStalledError)
from ampray.amp.records import MemoryStats, ScalerState, StepStats
from ampray.amp.scaler import LossScaler
from ampray.amp.state import (EngineStateError, TrainerCounters, atomic_save, check_engine_state,  # noqa: F401
                              count_params, estimate_memory_savings)
from ampray.amp.stepper import OptimizerStep, StepResult

OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class _WindowDropped(Exception):
    """The OOM policy dropped this accumulation window (on every rank): its optimizer step is skipped."""


class MixedPrecisionTrainer:
    """Mixed-precision training engine: `prepare_model`, then `train_step` per batch.

    `process_group`: the group whose ranks must decide alike; "auto" takes a DDP/FSDP-wrapped model's,
    None means this process alone."""

    def __init__(self, config: MixedPrecisionConfig | None = None, device: torch.device | str | None = None,
                 process_group: Any = "auto"):
        # A copy: adaptation and retune change the engine's settings, never the caller's config object.
        self.config = copy.deepcopy(config) if config is not None else MixedPrecisionConfig()
        self.device = torch.device(device) if device is not None else default_device()
        self.amp_dtype = self.config.dtype if self.config.autocast_enabled else torch.float32
        if not autocast_supported(self.device.type, self.amp_dtype):
            raise ValueError(f"MixedPrecisionConfig.dtype={self.amp_dtype} is not supported for autocast on "
                             f"device={self.device}; use fp16 on CUDA, bf16 on Ampere+/CPU, or fp32")
        self.scaler = LossScaler(self.config, self.device)
        self.counters = TrainerCounters(self.device)
        self.stepper = OptimizerStep(self)
        self.scale_history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._build_policies()
        self._process_group = process_group
        self.consensus: Consensus | None = None  # resolved from the first model trained
        self.poisons = False
        self.params_cast: torch.dtype | None = None  # FSDP's param_dtype (fp16/bf16) of the bound model
        self.fallback_due = False
        self.fell_back = False  # the bf16 fallback was made: a further collapse or stall raises
        self.booked_loss_nonfinite = False  # whether the step being booked had a non-finite loss here
        self._engine_reduces = False
        self._islands = Fp32Islands(self.config.fp32_modules, self.device.type)
        self._prepared: set[int] = set()
        self._last_scale = self.scaler.init_scale
        self._num_params = 0
        self._counted: weakref.ref | None = None
        self._flags = {v: torch.tensor(v, device=self.device) for v in (False, True)}
        self._one = torch.ones((), device=self.device)  # the scale of an unscaled run
        self._scale_after = torch.tensor(self._last_scale, device=self.device)

    def _build_policies(self) -> None:
        self.oom = OOM(self.config.oom_policy)
        self.nonfinite = NonFiniteLoss(self.config.nonfinite_loss_policy)
        self.collapse = Collapse()
        self.stall = Stall()

    def booked_policies(self) -> list:
        """The policies called at the `booked` event (see policies.py), in order."""
        return [self.collapse, self.stall]

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
            self._counted = weakref.ref(model)  # counted again when asked: a lazy module's after its forward
            self.stepper.attribution.index(model)
            if self.config.fp32_modules:
                self._islands.attach(model)

    def _bind(self, model: nn.Module) -> None:
        """Resolve the process group on the first step, and check what the OOM-safe path cannot do."""
        from ampray.amp import sharding

        self.stepper.attribution.index(model)  # parameters replaced since prepare_model (fully_shard) by name
        self.params_cast = None
        if sharding.is_sharded(model):
            sharding.check_engine_config(self.config, self.amp_dtype, model)
            self.params_cast = sharding.low_precision_params(model)
        self.consensus = Consensus.resolve(model, self._process_group)
        if self.consensus.active and self.oom.collective and not hasattr(model, "no_sync"):
            from ampray.amp.config import ConfigError

            raise ConfigError(f"MixedPrecisionConfig.oom_policy={self.config.oom_policy!r} is not allowed for a "
                              f"{type(model).__name__} under a process group: the ranks can agree on an OOM "
                              "only around a DDP-wrapped model's no_sync(); use oom_policy='raise'")
        # Under a group a non-finite loss makes this rank's gradients non-finite, so that DDP's own
        # all-reduce takes the skip to every rank; one process just reads its loss flag at the step.
        self.poisons = self.consensus.active and self.nonfinite.checked
        self._engine_reduces = self.consensus.active and self.oom.collective and hasattr(model, "no_sync")
        if self._engine_reduces and any(getattr(m, "sparse", False) for m in model.modules()
                                        if isinstance(m, (nn.Embedding, nn.EmbeddingBag))):
            from ampray.amp.config import ConfigError

            raise ConfigError(f"MixedPrecisionConfig.oom_policy={self.config.oom_policy!r} is not allowed with "
                              "sparse embeddings under DDP (the engine all-reduces dense gradients on that "
                              "path); use oom_policy='raise' or nn.Embedding(sparse=False)")

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
    def train_step(self, model: nn.Module, optimizer: Any, criterion: Callable, data: Any, target: Any,
                   scheduler: Any = None) -> StepResult:
        """One micro-batch; the optimizers step on every `gradient_accumulation_steps`-th call.

        `optimizer` (and `scheduler`) may be one or a list: they share one skip decision and one scale."""
        t0 = time.perf_counter()
        self._attach(model)
        if self.consensus is None:
            self._bind(model)
        optimizers, schedulers = _as_list(optimizer), _as_list(scheduler)
        self.counters.mark_start()
        c, k = self.counters, self.config.gradient_accumulation_steps
        if self.fallback_due and c.micro_in_window == 0:
            self._apply_fallback()
        c.micro_in_window += 1
        boundary = c.micro_in_window == k
        data, target = to_device(data, self.device), to_device(target, self.device)
        try:
            loss = self._forward_backward(model, criterion, data, target, 1.0 / k, boundary)
            c.add_loss(loss, check=self.nonfinite.checked)
        except _WindowDropped:
            loss = torch.full((), math.nan, device=self.device)
            c.window_poisoned = True
        c.training_steps += 1
        c.samples += batch_size(data)
        scale = self._scale_after
        out = StepResult(loss=loss, is_boundary=boundary, optimizer_stepped=self._flags[False],
                         skipped=self._flags[False], scale=scale, scale_used=scale)
        if boundary:
            done = self.stepper(model, optimizers, schedulers)
            self._scale_after = self.scaler.scale_tensor.clone() if self.scaler.enabled else self._flags_one()
            done.setdefault("scale_used", scale)
            for name, value in done.items():
                setattr(out, name, value)
            out.scale = self._scale_after
        c.mark_end()
        out.step_time_s = time.perf_counter() - t0  # host time: launch time where nothing waited
        c.host_time_s += out.step_time_s
        return out

    def flag(self, value: bool) -> torch.Tensor:
        """A 0-d bool device tensor for a value known on the host (shared: read it, do not write it)."""
        return self._flags[bool(value)]

    def _flags_one(self) -> torch.Tensor:
        return self._one

    def end_window(self, optimizers: list) -> None:
        self.counters.end_window()
        for opt in optimizers:
            opt.zero_grad(set_to_none=self.config.memory_efficient)

    def reduce_gradients(self, model: nn.Module, poisoned: bool = False) -> None:
        """The OOM-safe path under DDP: backward ran under no_sync; average the gradients now (not those
        of a dropped window) and, as DDP would before the next forward, take rank 0's buffers."""
        if self._engine_reduces:
            module = model.module
            if not poisoned:
                self.consensus.average_gradients(module, self.counters.present)
            if getattr(model, "broadcast_buffers", False):
                self.consensus.broadcast_buffers(module)

    def _forward_backward(self, model, criterion, data, target, weight: float, boundary: bool) -> torch.Tensor:
        """Forward and backward over the micro-batch, piece by piece once the OOM policy has split it."""
        n, c = batch_size(data), self.counters
        # Under a process group every rank cuts the same number of pieces (some may be empty).
        empty_ok = self._agreeing()
        queue = [(a, b, c.pieces) for a, b in piece_bounds(n, c.pieces, empty_ok)]
        losses = []
        while queue:
            start, stop, level = queue.pop(0)
            if level < c.pieces and (empty_ok or stop - start > 1):  # a split learnt meanwhile applies too
                queue[:0] = [(start + a, start + b, c.pieces)
                             for a, b in piece_bounds(stop - start, c.pieces // level, empty_ok)]
                continue
            loss = self._piece(model, criterion, data, target, start, stop, n, weight, boundary and not queue,
                               level)
            if loss is None:  # split: retry as two halves, each its own piece
                mid = (start + stop + 1) // 2
                queue[:0] = [(start, mid, 2 * level), (mid, stop, 2 * level)]
            else:
                losses.append(loss)
        return losses[0] if len(losses) == 1 else torch.stack(losses).sum()

    def _piece(self, model, criterion, data, target, start, stop, n, weight, sync, level):
        """Rows [start, stop): forward, agree, backward, agree. Returns the piece's weighted loss, or None
        when the ranks agreed to split it; raises _WindowDropped when they agreed to drop the window. An
        empty piece (a smaller batch than another rank's) computes nothing but takes part in both."""
        c, raising, rows = self.counters, self.oom.kind == "raise", stop - start
        no_sync = model.no_sync() if hasattr(model, "no_sync") and (not sync or self._engine_reduces) \
            else contextlib.nullcontext()
        failed, loss = False, None
        with no_sync, self._islands.guard():
            if rows:
                try:
                    x, y = _rows(data, start, stop), _rows(target, start, stop)
                    with self.autocast():
                        loss = criterion(model(x), y)
                except OutOfMemoryError:
                    if raising:
                        raise
                    failed = True
            # Out of the except block: the traceback (and the activations it pins) is released.
            oom_any, splittable = self._agree(model, failed, rows)
            if oom_any:
                del loss
                return self._after_oom(model, "forward", failed, splittable, level)
            if rows:
                factor = self.scaler.scale_tensor if self.scaler.enabled else 1.0
                w = weight * rows / n
                if w != 1.0:
                    factor = factor * w
                try:
                    if self.poisons:
                        factor = self.nonfinite.backward_factor(loss, factor)
                    (loss.float() * factor if torch.is_tensor(factor) or factor != 1.0 else loss).backward()
                except OutOfMemoryError:
                    if raising:
                        raise
                    failed = True
            oom_any, splittable = self._agree(model, failed, rows, presence=sync and self._engine_reduces)
            if oom_any:
                del loss
                return self._after_oom(model, "backward", failed, splittable, level)
        c.grads_dirty = True  # an empty piece too: every rank then makes the same decisions
        if not rows:
            return torch.zeros((), device=self.device)
        loss = loss.detach().float()
        return loss if rows == n else loss * (rows / n)

    def _agreeing(self) -> bool:
        return self.oom.collective and self.consensus.active

    def _agree(self, model, failed: bool, rows: int, presence: bool = False) -> tuple[bool, bool]:
        """(whether any rank ran out of memory in this piece, whether the pieces that failed can split: one
        of a single row cannot). With `presence` (the window's last piece on the OOM-safe DDP path) the
        ranks also agree on which parameters have a gradient on some rank: the engine's all-reduce needs
        the same list everywhere."""
        stuck = int(failed and rows < 2)
        if not self._agreeing():
            return failed, not stuck
        flags = [int(failed), stuck]
        if presence:
            flags += [int(p.grad is not None) for p in model.parameters() if p.requires_grad]
        flags = self.consensus.max(flags)
        if presence:
            self.counters.present = flags[2:]
        return bool(flags[0]), not flags[1]

    def _after_oom(self, model, phase: str, here: bool, splittable: bool, level: int) -> None:
        """Apply the OOM policy to a piece that failed (here or on another rank)."""
        c = self.counters
        c.oom_events += int(here)
        _free_memory(self.device)
        decision = self.oom.decide(splittable)
        if decision == "split":
            c.pieces = max(c.pieces, 2 * level)  # later micro-batches start at the size that is retried
        if phase == "backward" and c.grads_dirty:
            # Earlier pieces' gradients are mixed with partial sums of this one: not recoverable exactly.
            c.oom_skipped_batches += 1
            raise _WindowDropped()
        if phase == "backward":
            for p in model.parameters():
                p.grad = None  # a partial backward left partial sums; nothing else was accumulated yet
        if decision == "drop":
            c.oom_skipped_batches += 1
            raise _WindowDropped()
        c.oom_split_retries += 1
        return None

    # -- settings changed while training (adaptation, PBT) ----------------------------------------
    def update_scaler_settings(self, **changes: Any) -> dict[str, tuple[Any, Any]]:
        """Change growth/backoff/interval/hysteresis/floor/ceiling mid-run, keeping the growth tracker."""
        diff = self.scaler.set(**changes)
        for name, (_, after) in diff.items():
            setattr(self.config, name, after)
        # The config keeps its own rule (min_scale <= init_scale <= max_scale), so that a saved state loads.
        self.config.init_scale = min(max(self.config.init_scale, self.config.min_scale), self.config.max_scale)
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
        from ampray.amp import settings
        from ampray.amp.config import AdaptationConfig, ConfigError

        other = sorted(k for k in changes if k != "adaptation" and not settings.is_live(k))
        other += sorted(f"adaptation.{k}" for k in changes.get("adaptation") or {}
                        if not settings.is_live(f"adaptation.{k}"))
        if other:
            raise ConfigError(f"retune: {other} cannot change in a live run; allowed are {settings.described()}")
        diff = dict(self.update_scaler_settings(**{k: v for k, v in changes.items() if k in settings.SCALER}))
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

    # -- what the policies read and change ---------------------------------------------------------
    @property
    def last_scale(self) -> float:
        """The scale of the latest booked optimizer step, on the host."""
        return self._last_scale

    @property
    def offenders(self):
        """Overflowing steps per parameter name (reads the device counters)."""
        return self.stepper.attribution.read()

    def note_scale(self, scale: float, step: int) -> None:
        """Record a scale change seen at `step` (the update of the step before made it)."""
        if not self.scaler.enabled:
            return  # after the bf16 fallback: steps launched before it still carry the old scale
        if scale != self._last_scale and self.config.log_scaling:
            reason = "growth" if scale > self._last_scale else "backoff"
            self.scale_history.append({"optimizer_step": step - 1, "old": self._last_scale, "new": scale,
                                       "reason": reason})
        self._last_scale = scale

    def fall_back_to_bf16(self) -> None:
        """The collapse policy's fallback: autocast to bf16 without loss scaling from the next window on
        (the one in progress, if any, keeps the scale its backward ran with). Made once per run."""
        self.fallback_due = self.fell_back = True
        c = self.counters
        c.overflows_at_floor = c.skipped_in_a_row = c.nonfinite_in_a_row = 0  # bf16 gets a full patience

    def ease_after_rollback(self) -> str:
        """The remedy a rollback applies (on_divergence="rollback" in a Ray run), after the older state is
        loaded; returns what it did, in words. fp16 where the device has bf16: bf16 without loss scaling
        from now on. Otherwise, with loss scaling: the scale divided by 16 (not below min_scale),
        growth_interval doubled and hysteresis one more (recorded as a retune). Unscaled runs: nothing."""
        # Not where FSDP casts the parameters to fp16: its policy cannot change in a live run.
        if self.amp_dtype == torch.float16 and autocast_supported(self.device.type, torch.bfloat16) and \
                self.params_cast != torch.float16:
            self.fall_back_to_bf16()
            self._apply_fallback()  # at once: the loaded state starts a fresh window
            return "fp16 -> bf16 without loss scaling"
        if not self.scaler.enabled:
            return f"none ({dtype_name(self.amp_dtype)} without loss scaling: only the batches are skipped)"
        s, old = self.scaler, self._last_scale
        diff = self.retune({"growth_interval": s.growth_interval * 2, "hysteresis": s.hysteresis + 1},
                           reason="rollback: gentler loss scaling")
        new = max(s.min_scale, old / 16)
        s.set_scale(new)
        self._last_scale, self._scale_after = new, s.scale_tensor.clone()
        changes = ", ".join(f"{k} {b} -> {a}" for k, (b, a) in diff.items())
        return f"gentler loss scaling: scale {old:g} -> {new:g}" + (f", {changes}" if changes else "")

    def _apply_fallback(self) -> None:
        self.fallback_due = False
        self.amp_dtype = torch.bfloat16
        self.scaler.disable()
        self._last_scale = 1.0
        self._scale_after = self._flags_one()

    # -- summaries and state ---------------------------------------------------------------------
    def get_performance_summary(self) -> dict[str, Any]:
        """Counters, scaler, memory and estimates; reads device counters (one sync)."""
        from ampray.amp.summary import performance_summary

        self.stepper.settle()
        return performance_summary(self)

    def records(self) -> tuple["StepStats", "ScalerState", "MemoryStats"]:
        """The typed records a report sends: counters, scaler, memory (one sync)."""
        from ampray.amp.summary import step_stats

        self.stepper.settle()
        return step_stats(self), self.scaler.read(), memory_stats(self.device)

    def memory(self) -> dict[str, Any]:
        return memory_stats(self.device).to_dict()

    def estimated_memory_savings(self) -> dict[str, Any]:
        model = self._counted() if self._counted is not None else None
        if model is not None:
            self._num_params = count_params(model)
        return estimate_memory_savings(self.amp_dtype, self._num_params)

    def state_dict(self) -> dict[str, Any]:
        self.stepper.settle()
        state = {
            "config": self.config.to_dict(),
            "amp_dtype": dtype_name(self.amp_dtype),
            "scaler_enabled": self.scaler.enabled,
            "counters": self.counters.state_dict(),
            "offenders": dict(self.offenders),
            "scale_history": list(self.scale_history),
            "events": list(self.events),
            "last_scale": self._last_scale,
            "fallback_due": self.fallback_due,
            "fell_back": self.fell_back,
        }
        if self.config.save_scaler_state:
            state["scaler"] = self.scaler.state_dict()
        return state

    def check_state(self, state: Any) -> None:
        """Raise EngineStateError (naming the field and its value) unless `load_state_dict(state)` can load
        all of it: every required field present, a valid config, counters, and a scale that is a finite
        positive float32 within the state's [min_scale, max_scale]. Changes nothing."""
        check_engine_state(state, self.scaler)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the whole engine, its config included (settings changed by adaptation survive); to
        change settings of a resumed run (a PBT mutation), call `update_scaler_settings` afterwards.
        The state is checked first (`check_state`): one that cannot be loaded changes nothing."""
        self.check_state(state)
        self.stepper.discard()  # steps not yet booked belong to the trajectory the state replaces
        self.config = MixedPrecisionConfig.from_dict(state["config"])
        self.consensus, self.fallback_due = None, False  # bound again (with the loaded policies) on the next step
        self.amp_dtype = parse_dtype(state["amp_dtype"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
            self.scaler.dynamic = bool(state["scaler"]["dynamic"])
        self.scaler.enabled = bool(state["scaler_enabled"])
        self.counters.load_state_dict(state["counters"])
        self.stepper.attribution.load(state["offenders"])
        self._build_policies()
        self.scale_history = list(state["scale_history"])
        self.events = list(state["events"])
        self._last_scale = float(state["last_scale"])
        self.fallback_due = bool(state.get("fallback_due", False))
        # States written before "fell_back" existed: an fp16 run found in bf16 had fallen back.
        self.fell_back = bool(state.get("fell_back", self.fallback_due or (
            self.config.dtype == torch.float16 and self.amp_dtype == torch.bfloat16)))
        self._scale_after = self.scaler.scale_tensor.clone() if self.scaler.enabled else self._flags_one()

    def save_scaler_state(self, path) -> None:
        """Write the engine state to `path`; `torch.load(path, weights_only=True)` reads it."""
        atomic_save(self.state_dict(), path)

    def load_scaler_state(self, path) -> None:
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def piece_bounds(n: int, pieces: int, empty_ok: bool = False) -> list[tuple[int, int]]:
    """Rows [start, stop) of each of `pieces` near-equal pieces of an n-row batch (no empty piece unless
    `empty_ok`: then always `pieces` of them, as every rank of a group must cut)."""
    pieces = max(1, pieces if empty_ok else min(pieces, n))
    return [(i * n // pieces, (i + 1) * n // pieces) for i in range(pieces)]


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


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


def batch_size(value: Any) -> int:
    """Rows of a batch: a tensor's first dimension, or its first tensor's (in a tuple, list or dict)."""
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.dim() else 1
    if isinstance(value, (tuple, list)) and value:
        return batch_size(value[0])
    if isinstance(value, dict) and value:
        return batch_size(next(iter(value.values())))
    return 1


def _free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
