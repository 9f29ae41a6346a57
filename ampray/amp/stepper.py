"""The optimizer step of the engine: one object owns it and returns a typed `StepResult`.

One read of the gradients (a foreach norm per parameter) gives everything: whether any gradient is
inf/NaN, which parameters overflowed, and the global norm for clipping. Unscaling and clipping then
happen in one multiply. The skip decision stays on the device when every optimizer accepts `found_inf`
(fused Adam/AdamW/SGD, as `GradScaler.step` uses them); then the bookkeeping that needs host values
(skipped-step count, scale history, the `booked` policies, schedulers) runs one step later, from flags
copied to pinned memory without waiting. Other optimizers need the flags on the host before `step()`:
one sync per optimizer step, the same one `GradScaler.step` makes.

Several optimizers (a list) share one read of the gradients, one scale update and one skip decision:
an overflow in any of them skips them all (they share the clipping norm and the window; torch's
GradScaler skips each optimizer on its own gradients, and `ampray.GradScaler` keeps that rule). Every
optimizer's gradients are unscaled before any steps. Sparse gradients are coalesced in place (so the norm is the
tensor's) and unscaled and clipped through their values; fused optimizers do not take them, so a step
with a sparse gradient takes the host path.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ampray.amp.trainer import MixedPrecisionTrainer


@dataclass
class StepResult:
    """What one `train_step` did. The tensor fields are 0-d tensors on the engine's device, whichever
    optimizer ran (reading one synchronises; logging them every N steps costs one sync per N steps).

    `scale` is the loss scale after this step's update (what `GradScaler.get_scale()` returns after
    `update()`); `scale_used` is the one this step's backward ran with."""

    loss: torch.Tensor
    is_boundary: bool
    optimizer_stepped: torch.Tensor
    skipped: torch.Tensor
    scale: torch.Tensor
    scale_used: torch.Tensor
    grad_norm: torch.Tensor | None = None
    step_time_s: float = 0.0

    def __getitem__(self, key: str) -> Any:
        """`result["loss"]`: the mapping access of earlier versions."""
        if key not in _FIELDS:
            raise KeyError(f"StepResult has no field {key!r}; fields are {sorted(_FIELDS)}")
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers (one sync)."""
        out: dict[str, Any] = {}
        for name in _FIELDS:
            value = getattr(self, name)
            out[name] = value.item() if torch.is_tensor(value) else value
        return out


_FIELDS = tuple(f.name for f in dataclasses.fields(StepResult))


def _on(grads: list[torch.Tensor], factor: torch.Tensor) -> torch.Tensor:
    """The factor on the gradients' device (they live on the CPU under FSDP's CPU offload)."""
    return factor if factor.device == grads[0].device else factor.to(grads[0].device)


class OverflowAttribution:
    """Overflowing steps per parameter, counted on the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.names: list[str] = []
        self.slot: dict[int, int] = {}
        self.counts = torch.zeros(0, dtype=torch.int64, device=device)
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}  # slots per set of parameters with a gradient

    def index(self, model) -> None:
        """Name the model's parameters by their FQN. A parameter replaced under the same name (fully_shard
        swaps each for a sharded DTensor) keeps the name's slot and count."""
        where = {name: i for i, name in enumerate(self.names)}
        for name, p in model.named_parameters():
            if id(p) not in self.slot:
                # DDP's wrapper prefix, and torch's activation checkpoint wrapper's (shard_model(checkpoint=True))
                name = name.removeprefix("module.").replace("_checkpoint_wrapped_module.", "")
                if name not in where:
                    where[name] = len(self.names)
                    self.names.append(name)
                self.slot[id(p)] = where[name]
        self._cache.clear()
        self._grow()

    def _grow(self) -> None:
        extra = len(self.names) - self.counts.numel()
        if extra > 0:
            self.counts = torch.cat([self.counts, self.counts.new_zeros(extra)])

    def count(self, params, mask: torch.Tensor) -> None:
        key = tuple(id(p) for p in params)
        slots = self._cache.get(key)
        if slots is None:  # a new set (a branch that did not run): one upload, then cached
            for p in params:  # parameters the optimizer holds but the model did not name
                if id(p) not in self.slot:
                    self.slot[id(p)] = len(self.names)
                    self.names.append(f"param{len(self.names)}")
            self._grow()
            if len(self._cache) >= 64:
                self._cache.clear()
            slots = self._cache[key] = torch.tensor([self.slot[i] for i in key], device=self.device)
        self.counts.index_add_(0, slots, mask.long())

    def read(self) -> Counter:
        return Counter({n: k for n, k in zip(self.names, self.counts.tolist()) if k})

    def load(self, offenders: dict[str, int]) -> None:
        for name in offenders:
            if name not in self.names:
                self.names.append(name)
        self._grow()
        self.counts.zero_()
        for name, count in offenders.items():
            self.counts[self.names.index(name)] = int(count)


def _check_all_sharded(params, attribution: OverflowAttribution) -> None:
    """Under FSDP every parameter the optimizers step must be a DTensor: FSDP reduces no other gradient,
    so a plain one would differ from rank to rank (and the summed norms would count it once per rank)."""
    plain = [p for p in params if type(p).__name__ != "DTensor"]
    if plain:
        from ampray.amp.config import ConfigError

        names = [attribution.names[attribution.slot[id(p)]] if id(p) in attribution.slot else
                 f"a {tuple(p.shape)} tensor" for p in plain]
        raise ConfigError(f"optimizer parameters {names[:4]} are not sharded by FSDP (not DTensors) while the "
                          "model is: FSDP reduces no gradient of theirs, so each rank would step its own; expected "
                          "every parameter the optimizer steps inside the fully_shard-ed model")


class OptimizerStep:
    """Unscale, clip, step or skip, update the scale, and book the step (now, or one step later)."""

    def __init__(self, engine: "MixedPrecisionTrainer"):
        self.engine = engine
        self.attribution = OverflowAttribution(engine.device)
        # Device-side steps not yet booked, oldest first: (host flags, event, schedulers, step).
        self._pending: deque[tuple[torch.Tensor, Any, list, int]] = deque()
        self._free: list[tuple[torch.Tensor, Any]] = []  # pinned buffers and events ready for reuse
        self._cuda = engine.device.type == "cuda"
        # How many device-side steps may wait for their booking. With a scheduler or the adaptation
        # policy the previous step is booked before the next one steps (its learning rate, its scaler
        # settings depend on it); otherwise up to `depth` steps, so that the host never waits on the
        # device while it has steps to launch (AMPRAY_DEFER_DEPTH=1 restores the tight coupling).
        self.depth = max(1, int(os.environ.get("AMPRAY_DEFER_DEPTH", "4")))
        self._sharded_checked: set[int] = set()  # optimizers whose parameters were all found sharded

    def __call__(self, model, optimizers: list, schedulers: list) -> dict[str, Any]:
        try:
            return self._step(model, optimizers, schedulers)
        except BaseException:
            if self.engine.counters.micro_in_window:  # a raising policy never leaves a window open
                self.engine.end_window(optimizers)
            raise

    def _step(self, model, optimizers: list, schedulers: list) -> dict[str, Any]:
        e = self.engine
        cfg, c, scaler = e.config, e.counters, e.scaler
        if schedulers or any(getattr(p, "settles_each_step", False) for p in e.booked_policies()):
            self.settle()  # this step's learning rate and settings follow from the last one's booking
        else:
            self._book_due()
        if c.window_poisoned:
            # An OOM dropped the window (on every rank alike): nothing to read, nothing to average.
            e.reduce_gradients(model, poisoned=True)
            self.settle()
            return self._finish(optimizers, {}, [1.0, 0.0, 0.0, e.last_scale], schedulers, poisoned=True)
        e.reduce_gradients(model)
        sharded = e.consensus.sharded
        params, seen = [], set()
        for opt in optimizers:
            for g in opt.param_groups:
                for p in g["params"]:
                    # Sharded: every parameter, so that each rank's list of norms lines up with the others'.
                    if (p.grad is not None or sharded) and id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
        if sharded and id(optimizers[0]) not in self._sharded_checked:
            _check_all_sharded(params, self.attribution)
            self._sharded_checked.add(id(optimizers[0]))
        sparse = False
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                sparse = True
                p.grad = p.grad.coalesce()  # duplicates summed: the norm is the gradient's own
        grads = [p.grad._values() if p.grad.is_sparse else p.grad for p in params if p.grad is not None]
        if sharded:
            grads = [g.to_local() for g in grads]  # views of this rank's shards: scaling them scales the DTensors
        out: dict[str, Any] = {}
        if not grads or not (scaler.enabled or cfg.max_grad_norm is not None or e.nonfinite.checked):
            self.settle()
            for opt in optimizers if grads else ():
                opt.step()
            return self._finish(optimizers, out, [0.0, 0.0, 0.0, e.last_scale], schedulers)
        if sharded:
            # The norms of this rank's shards, summed over the ranks: the same flags, attribution and
            # clipping norm on every rank (the one collective FSDP adds; see consensus.py).
            empty = grads[0].new_zeros(0)
            local = [p.grad.to_local() if p.grad is not None else empty for p in params]
            norms = e.consensus.global_norms(torch.stack(torch._foreach_norm(local)).to(e.device))
        else:
            norms = torch.stack(torch._foreach_norm(grads))
        nonfinite = ~torch.isfinite(norms)
        found = nonfinite.any()
        if e.nonfinite.checked and not e.poisons:
            # One process: a non-finite loss is known here, so it joins the skip directly (under a group
            # it made this rank's gradients non-finite instead, and the all-reduce carried it). Either way
            # it is skipped and counted by the scaler as an overflow, as torch's GradScaler would.
            found = found | c.window_bad_loss
        # A step whose every gradient is non-finite (a NaN loss, an overflow spread by backward) names
        # no offender: it carries no information about where the overflow started.
        self.attribution.count(params, nonfinite & (nonfinite.sum() < len(grads)))
        # The device-side skip: fused optimizers take found_inf (and unscale by grad_scale themselves),
        # unless the step must read its flags first (nonfinite_loss_policy="raise").
        fused = not sparse and not e.nonfinite.gathers and grads[0].device.type == e.device.type and \
            all(getattr(o, "_step_supports_amp_scaling", False) for o in optimizers)
        grad_scale = self._unscale_and_clip(grads, norms, fused, out)
        flags = torch.cat([torch.stack([found, found, c.window_bad_loss]).float(), scaler.scale_tensor.view(1)])
        if fused:
            # The skip stays on the device: the fused kernels read found_inf (and unscale by grad_scale).
            found_inf = found.float()
            for opt in optimizers:
                opt.grad_scale, opt.found_inf = grad_scale, found_inf
                try:
                    opt.step()
                finally:
                    del opt.grad_scale, opt.found_inf
            scaler.update(found)
            self._defer(flags, schedulers)
            out.update(skipped=found, optimizer_stepped=~found, scale_used=flags[3])
            return self._finish(optimizers, out, None, None)
        self.settle()  # booked in order: the earlier device-side steps first
        values = flags.tolist()  # the one sync of the step: flags and scale in one copy
        if e.nonfinite.gathers:
            bad = e.consensus.ranks_where(values[2] > 0)
            if bad:
                e.end_window(optimizers)
            e.nonfinite.check(bad, e.consensus.world, f"training step {c.training_steps} (optimizer step "
                                                      f"{c.optimizer_steps + 1})")
        if values[0] == 0:
            for opt in optimizers:
                opt.step()  # gradients were unscaled above: grad_scale is only for fused kernels
        scaler.update(found)
        out["scale_used"] = flags[3]
        return self._finish(optimizers, out, values, schedulers)

    def _unscale_and_clip(self, grads, norms, fused: bool, out: dict[str, Any]) -> torch.Tensor | None:
        """Unscale (and clip) in one multiply; returns the scale a fused optimizer should divide by."""
        scaler, max_norm = self.engine.scaler, self.engine.config.max_grad_norm
        if max_norm is not None:
            total = torch.linalg.vector_norm(norms)
            inv = scaler.inv_scale() if scaler.enabled else None
            if inv is not None:
                total = total * inv  # the norm of the unscaled gradients: clipping sees true values
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, _on(grads, coef * inv if inv is not None else coef))
            out["grad_norm"] = total
            return None
        if not scaler.enabled:
            return None
        # The per-parameter norms are at hand: the unscaled global norm costs one small op, no sync.
        out["grad_norm"] = torch.linalg.vector_norm(norms) * scaler.inv_scale()
        if fused:
            return scaler.scale_tensor
        torch._foreach_mul_(grads, _on(grads, scaler.inv_scale()))
        return None

    def _finish(self, optimizers, out, values, schedulers, poisoned: bool = False) -> dict[str, Any]:
        e = self.engine
        e.counters.optimizer_steps += 1
        e.end_window(optimizers)
        if values is not None:
            skipped = values[0] > 0 or poisoned
            out.update(skipped=e.flag(skipped), optimizer_stepped=e.flag(not skipped))
            self._book(values, schedulers, e.counters.optimizer_steps, poisoned)
        return out

    # -- deferred bookkeeping ---------------------------------------------------------------------
    def _defer(self, flags: torch.Tensor, schedulers: list) -> None:
        step = self.engine.counters.optimizer_steps + 1
        if not self._cuda:
            self._pending.append((flags, None, schedulers, step))
            return
        host, event = self._free.pop() if self._free else (torch.empty(4, pin_memory=True), torch.cuda.Event())
        host.copy_(flags, non_blocking=True)
        event.record()
        self._pending.append((host, event, schedulers, step))

    def _book_due(self) -> None:
        """Book the oldest device-side steps while `depth` of them are pending (the wait is then for a
        step launched `depth` steps ago). On a fixed schedule, never on whether the device happens to be
        done: every rank books, and so decides (collapse, fallback), at the same step."""
        while len(self._pending) >= self.depth:
            self._book_oldest()

    def settle(self) -> None:
        """Book every pending device-side step (their flags arrived long ago; the wait is normally zero)."""
        while self._pending:
            self._book_oldest()

    def discard(self) -> None:
        """Forget the device-side steps not yet booked: a loaded state replaces what they would book."""
        self._pending.clear()

    def _book_oldest(self) -> None:
        host, event, schedulers, step = self._pending.popleft()
        if event is not None:
            event.synchronize()
            self._free.append((host, event))
        self._book(host.tolist(), schedulers, step, False)

    def _book(self, values: list[float], schedulers: list, step: int, poisoned: bool) -> None:
        e = self.engine
        skipped, overflow = values[0] > 0 or poisoned, values[1] > 0 and not poisoned
        e.note_scale(values[3], step)
        e.counters.skipped_steps += int(skipped)
        if not skipped:
            for scheduler in schedulers:
                scheduler.step()
        if not poisoned:  # a dropped window is neither clean nor an overflow
            e.booked_loss_nonfinite = values[2] > 0  # this rank's own loss flag: words the stall's message
            for policy in e.booked_policies():
                policy.on_booked(e, step, overflow)
