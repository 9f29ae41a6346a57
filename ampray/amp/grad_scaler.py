"""ampray.GradScaler: a drop-in for `torch.amp.GradScaler` whose scale update is ampray's LossScaler.

Why: an existing loop (nanoGPT's, Lightning's `MixedPrecision(..., scaler=...)`, a Hugging Face loop) gets
hysteresis, a floor and a ceiling, cross-rank consensus, skip signals and overflow attribution by changing
one import; nothing else in the loop changes.

What is torch's and what is ampray's:
- It *is* a `torch.amp.GradScaler` (a subclass: isinstance checks in Lightning and HF pass). `scale`,
  `unscale_` and `step` are torch's own: per-optimizer stages and their errors ("unscale_() has already
  been called ...", closures rejected), fused optimizers through `_step_supports_amp_scaling`, sparse and
  fp16 gradients, the single sync of a non-fused `step`.
- The update arithmetic is `LossScaler.update` (no host sync). torch's `_scale` and `_growth_tracker` are
  the very tensors that the LossScaler holds (created at torch's lazy init, on the device of the first
  scaled tensor), so torch's `scale`/`unscale_` always use the current scale.
- `state_dict()` has torch's five keys plus an "ampray" sub-dict (hysteresis, its budget, floor, ceiling,
  counters, attribution); torch's GradScaler loads it (it reads only its own keys) and this one loads a
  state saved by torch's (the extras then keep this scaler's settings, a full budget and zero counters).

Defaults, and parity with torch: with the extras at their defaults every trajectory is torch's, because
hysteresis=1 is GradScaler's rule and the floor and ceiling sit at float32's ends. MixedPrecisionConfig
requires a floor > 0, so the default floor is 2**-149 (the smallest positive float32) and the default
ceiling 2**127 (float32's largest power of two: torch grows unless the result is inf, which from a power of
two is the same). The one difference of trajectory: torch's scale can halve down to 0.0, from where it never
recovers; this one stops at 2**-149. Beyond trajectories: `set_growth_factor` & co. validate (torch's
accept anything), and a growth interval lowered below the current tracker grows at the next clean step
(torch's `tracker + 1 == interval` test would never fire again).

Consensus (`process_group`): the found-inf flag of each optimizer is all-reduced (MAX) right after the
gradients are checked, before `step` decides whether to skip, so no rank steps while another skips. Ranks
need it when their inf checks can disagree: gradients sharded (FSDP's flat shards, ZeRO-style optimizers),
pipeline stages (each rank holds other parameters), local SGD. Plain DDP does not: its gradients are already
all-reduced, so every rank sees the same infs. Nothing is paid unless `process_group` is set.

Skip signals: after `step`, `last_step_skipped` is a 0-d bool tensor on the scale's device (no sync);
`stats()` reads the LossScaler's counters plus the step and skipped-step counts (this syncs).

Attribution (`attribution=True`): each inf check also counts, on the device, how often each parameter's
gradient was non-finite (one foreach inf-norm per device and dtype, an isfinite and an index_add_);
`attach(model)` names the parameters, `top_offenders(k)` reads the counts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ampray.amp.config import ConfigError, MixedPrecisionConfig
from ampray.amp.records import ScalerState
from ampray.amp.scaler import SETTINGS, LossScaler

FLOOR = 2.0**-149  # the smallest positive float32: MixedPrecisionConfig wants a floor > 0
CEILING = 2.0**127  # float32's largest power of two; torch stops growing where the next growth is inf
_OWNER = "ampray.GradScaler"
_COUNTERS = ("hysteresis_left", "overflows", "backoffs", "growths", "min_scale_seen", "max_scale_seen")


@dataclass
class GradScalerStats(ScalerState):
    """The LossScaler's state plus the optimizer steps asked for through `step()` and how many were skipped."""

    steps: int
    skipped_steps: int


class GradScaler(torch.amp.GradScaler):
    """`torch.amp.GradScaler` with ampray's update: hysteresis, floor, ceiling, consensus, skip signals, attribution.

    The positional arguments are torch's. The extras are keyword-only:
    - hysteresis: overflowing steps in a row before the scale backs off (1 = torch's rule); once spent,
      every further overflow backs off until refilled per hysteresis_refill: "clean" (DeepSpeed: the next
      clean step) or "growth" (Megatron-LM: only when the scale grows);
    - min_scale / max_scale: floor and ceiling (None: 2**-149 and 2**127, torch's trajectories);
    - process_group: all-reduce the found-inf flag across ranks before deciding to skip (a
      torch.distributed group, or "world"/True for the default group when it is initialised; see the
      module doc for when it is needed: not for plain DDP);
    - attribution: count non-finite gradients per parameter (see `attach` and `top_offenders`).

    Setting changes (`set`, `set_growth_factor`, ...) are validated and keep the growth tracker.
    """

    def __init__(
        self,
        device: str = "cuda",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
        *,
        hysteresis: int = 1,
        hysteresis_refill: str = "clean",
        min_scale: float | None = None,
        max_scale: float | None = None,
        process_group: Any = None,
        attribution: bool = False,
    ) -> None:
        super().__init__(device, init_scale, growth_factor, backoff_factor, growth_interval, enabled)
        if isinstance(process_group, str) and process_group != "world":
            raise ConfigError(f"{_OWNER}.process_group={process_group!r} is not allowed: expected None, "
                              "'world', True or a torch.distributed process group")
        self._extras: dict[str, Any] = {
            "hysteresis": hysteresis, "hysteresis_refill": hysteresis_refill,
            "min_scale": min(FLOOR, init_scale) if min_scale is None else min_scale,
            "max_scale": max(CEILING, init_scale) if max_scale is None else max_scale,
        }
        self.process_group = process_group
        self.attribution = bool(attribution)
        self._loss_scaler: LossScaler | None = None
        self._pending: dict[str, Any] = {}  # state loaded (or unpickled) before the scale tensor exists
        self._steps = 0
        self._skipped: torch.Tensor | None = None
        self._last_skipped: torch.Tensor | None = None
        # attribution: parameter names given by attach(), a row per parameter seen, counts on the device
        self._attached: dict[int, str] = {}
        self._rows: dict[int, int] = {}
        self._row_of_name: dict[str, int] = {}
        self._names: list[str] = []
        self._unnamed = 0
        self._counts: torch.Tensor | None = None
        self._index_cache: dict[tuple, torch.Tensor] = {}
        if self._enabled:
            self._config(init_scale=init_scale)  # reject bad extras now, not at the first scale()
        else:  # torch keeps no settings when disabled; these keep get_*/set/stats answering
            self._growth_factor, self._backoff_factor = growth_factor, backoff_factor
            self._growth_interval, self._init_scale, self._init_growth_tracker = growth_interval, init_scale, 0

    # -- settings ---------------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        return {"growth_factor": self._growth_factor, "backoff_factor": self._backoff_factor,
                "growth_interval": self._growth_interval, "hysteresis": self._extras["hysteresis"],
                "min_scale": self._extras["min_scale"], "max_scale": self._extras["max_scale"]}

    def _config(self, init_scale: float | None = None, **changes: Any) -> MixedPrecisionConfig:
        """The LossScaler's config, validated by MixedPrecisionConfig's rules (errors name this class)."""
        s = {**self._settings(), **changes}
        try:
            return MixedPrecisionConfig(
                dtype=torch.float16, hysteresis_refill=self._extras["hysteresis_refill"],
                init_scale=s["min_scale"] if init_scale is None else init_scale, **s)
        except ConfigError as err:
            raise ConfigError(str(err).replace("MixedPrecisionConfig.", f"{_OWNER}.")) from None

    def set(self, **changes: Any) -> dict[str, tuple[Any, Any]]:
        """Change settings mid-run (names as in LossScaler.SETTINGS); returns {name: (before, after)}.
        The growth tracker and the hysteresis budget are kept (a smaller budget applies at once)."""
        unknown = sorted(set(changes) - set(SETTINGS))
        if unknown:
            raise ConfigError(f"{_OWNER}.set: unknown setting(s) {unknown}; allowed are {list(SETTINGS)}")
        before = self._settings()
        self._config(**changes)
        if self._loss_scaler is not None:
            self._loss_scaler.set(**changes)
        for name, value in changes.items():
            if name in ("growth_factor", "backoff_factor", "growth_interval"):
                setattr(self, "_" + name, value)
            else:
                self._extras[name] = value
        return {n: (before[n], v) for n, v in self._settings().items() if before[n] != v}

    def set_growth_factor(self, new_factor: float) -> None:
        self.set(growth_factor=new_factor)

    def set_backoff_factor(self, new_factor: float) -> None:
        self.set(backoff_factor=new_factor)

    def set_growth_interval(self, new_interval: int) -> None:
        self.set(growth_interval=new_interval)

    hysteresis = property(lambda self: self._extras["hysteresis"])
    hysteresis_refill = property(lambda self: self._extras["hysteresis_refill"])
    min_scale = property(lambda self: self._extras["min_scale"])
    max_scale = property(lambda self: self._extras["max_scale"])

    # -- torch's lazy init: the LossScaler's tensors become torch's ---------------------------------
    def _lazy_init_scale_growth_tracker(self, dev: torch.device) -> None:
        if self._growth_tracker is not None:
            raise AssertionError("_growth_tracker initialized before _scale")
        s = self._settings()
        init = min(max(float(self._init_scale), s["min_scale"]), s["max_scale"])
        self._loss_scaler = LossScaler(self._config(init_scale=init), dev)
        state = {**self._fresh_state(self._init_scale, self._init_growth_tracker), **self._pending}
        self._loss_scaler.load_state_dict(state)
        self._adopt()
        self._skipped = torch.tensor(int(state.get("skipped_steps", 0)), dtype=torch.int64, device=self._scale.device)
        self._last_skipped = torch.zeros((), dtype=torch.bool, device=self._scale.device)
        self._pending = {}

    def _adopt(self) -> None:
        """torch's `_scale`/`_growth_tracker` are the LossScaler's tensors (again after it replaced them)."""
        self._scale = self._loss_scaler.scale_tensor
        self._growth_tracker = self._loss_scaler._growth_tracker

    def _fresh_state(self, scale: float, growth_tracker: int) -> dict[str, Any]:
        """A LossScaler state at `scale`: this scaler's settings, a full hysteresis budget, zero counters."""
        return {"scale": float(scale), "growth_tracker": int(growth_tracker),
                "hysteresis_left": self._extras["hysteresis"], "overflows": 0, "backoffs": 0, "growths": 0,
                "min_scale_seen": float(scale), "max_scale_seen": float(scale),
                "hysteresis_refill": self._extras["hysteresis_refill"], **self._settings()}

    # -- the inf checks: consensus and attribution ride on torch's own -----------------------------
    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        found = super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
        if self.attribution:
            self._attribute(optimizer)
        return found

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """torch's unscale_ (and its errors); then, with a process group, the ranks agree on the flag."""
        super().unscale_(optimizer)
        if self._enabled:
            self._agree(optimizer)

    def _check_inf_per_device(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        super()._check_inf_per_device(optimizer)  # the fused optimizers' check (no unscaling)
        self._agree(optimizer)
        return self._found_inf_per_device(optimizer)

    def _group(self) -> Any:
        """The group to agree in, or False for none (None is torch.distributed's default group)."""
        pg = self.process_group
        if pg is None or pg is False:
            return False
        world = pg is True or isinstance(pg, str)
        if not (dist.is_available() and dist.is_initialized()):
            if world:
                return False  # "world" in a single process: nothing to agree with
            raise RuntimeError(f"{_OWNER}.process_group is a group but torch.distributed is not initialised")
        group = None if world else pg
        return False if dist.get_world_size(group) == 1 else group

    def _agree(self, optimizer: torch.optim.Optimizer) -> None:
        """All-reduce (MAX) this optimizer's found-inf flags: every rank then skips, or none does."""
        group = self._group()
        if group is False:
            return
        state = self._per_optimizer_states[id(optimizer)]
        flag = torch.zeros((), dtype=torch.float32, device=self._scale.device)
        for found in state["found_inf_per_device"].values():
            flag += found.to(flag.device, non_blocking=True)
        if flag.device.type != "cpu" and "gloo" in str(dist.get_backend(group)):
            wire = flag.cpu()  # gloo reduces host tensors (NCCL device ones: no copy, no sync)
            dist.all_reduce(wire, op=dist.ReduceOp.MAX, group=group)
            flag.copy_(wire)
        else:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        state["found_inf_per_device"] = {flag.device: flag}

    # -- step and update ---------------------------------------------------------------------------
    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """torch's step (skipped when the gradients are not finite); then the skip signal, on the device."""
        retval = super().step(optimizer, *args, **kwargs)
        if self._enabled:
            self._steps += 1
            found = list(self._found_inf_per_device(optimizer).values())
            if found:  # a 0-d device flag; no sync
                flag = found[0] if len(found) == 1 else torch.stack([f.to(found[0].device) for f in found]).sum()
                self._last_skipped.copy_(flag > 0)
                self._skipped += self._last_skipped
        return retval

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """Advance the scale with LossScaler.update from the found-inf flags of every optimizer stepped since
        the last update (no sync); `new_scale` sets the scale as torch does (budget and tracker kept)."""
        if not self._enabled:
            return
        if new_scale is not None:
            return super().update(new_scale)
        scale, _ = self._check_scale_growth_tracker("update")
        found = [f.to(scale.device, non_blocking=True)
                 for state in self._per_optimizer_states.values() for f in state["found_inf_per_device"].values()]
        if not found:
            raise AssertionError("No inf checks were recorded prior to update.")
        self._loss_scaler.update(found[0] if len(found) == 1 else torch.stack(found).sum())
        self._per_optimizer_states = defaultdict(self._per_optimizer_states.default_factory)

    # -- skip signals and counters -----------------------------------------------------------------
    @property
    def last_step_skipped(self) -> torch.Tensor:
        """0-d bool tensor: the last `step(optimizer)` was skipped for non-finite gradients (no sync)."""
        if self._last_skipped is None:
            return torch.zeros((), dtype=torch.bool)
        return self._last_skipped

    def stats(self) -> GradScalerStats:
        """The scale, its tracker and budget, the LossScaler's counters, steps and skipped steps (syncs)."""
        if not self._enabled:
            return GradScalerStats(1.0, 0, 0, 0, 0, 0, 1.0, 1.0, self._steps, 0)
        if self._loss_scaler is None:
            state = {**self._fresh_state(self._init_scale, self._init_growth_tracker), **self._pending}
            base = ScalerState.from_dict(state)
            skipped = int(state.get("skipped_steps", 0))
        else:
            base, skipped = self._loss_scaler.read(), int(self._skipped.item())
        return GradScalerStats(**base.to_dict(), steps=self._steps, skipped_steps=skipped)

    # -- attribution -------------------------------------------------------------------------------
    def attach(self, model: torch.nn.Module | Iterable[tuple[str, torch.Tensor]]) -> GradScaler:
        """Name parameters for attribution from `model.named_parameters()` (or such pairs); returns self."""
        pairs = model.named_parameters() if isinstance(model, torch.nn.Module) else model
        for name, p in pairs:
            self._attached[id(p)] = name
        return self

    def _row(self, p: torch.Tensor) -> int:
        row = self._rows.get(id(p))
        if row is None:
            name = self._attached.get(id(p))
            if name is None:
                name, self._unnamed = f"param{self._unnamed}", self._unnamed + 1
            row = self._row_of_name.setdefault(name, len(self._names))
            if row == len(self._names):
                self._names.append(name)
            self._rows[id(p)] = row
        return row

    @torch.no_grad()
    def _attribute(self, optimizer: torch.optim.Optimizer) -> None:
        groups: dict[tuple, list[tuple[int, torch.Tensor]]] = defaultdict(list)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad._values() if p.grad.is_sparse else p.grad
                if g.numel():  # the inf-norm of nothing is undefined, and nothing is finite
                    groups[(g.device, g.dtype)].append((self._row(p), g))
        if not groups:
            return
        device = self._scale.device if self._scale is not None else next(iter(groups))[0]
        if self._counts is None or self._counts.device != device or len(self._counts) < len(self._names):
            counts = torch.zeros(len(self._names), dtype=torch.int64, device=device)
            if self._counts is not None:
                counts[:len(self._counts)] = self._counts.to(device)
            self._counts = counts
        for items in groups.values():
            rows = tuple(r for r, _ in items)
            index = self._index_cache.get((device, rows))
            if index is None:  # built once per parameter list: a host-to-device copy each step would sync
                index = self._index_cache[(device, rows)] = torch.tensor(rows, dtype=torch.int64, device=device)
            norms = torch._foreach_norm([g for _, g in items], float("inf"))  # inf/NaN iff a non-finite entry
            bad = ~torch.isfinite(torch.stack([n.float() for n in norms]))
            self._counts.index_add_(0, index, bad.to(device=device, dtype=torch.int64))

    def top_offenders(self, k: int = 10) -> list[tuple[str, int]]:
        """The k parameters whose gradients were non-finite most often, as (name, count), most first (syncs)."""
        if self._counts is None:
            return []
        counts = self._counts.tolist()
        ranked = sorted(((n, c) for n, c in zip(self._names, counts) if c > 0), key=lambda nc: -nc[1])
        return ranked[:k]

    def _attribution_state(self) -> dict[str, int]:
        counts = self._counts.tolist() if self._counts is not None else []
        return {n: int(c) for n, c in zip(self._names, counts + [0] * (len(self._names) - len(counts)))}

    def _load_attribution(self, saved: dict[str, int]) -> None:
        self._names = list(saved)
        self._row_of_name = {n: i for i, n in enumerate(self._names)}
        self._rows, self._unnamed, self._index_cache = {}, 0, {}
        device = self._scale.device if self._scale is not None else "cpu"
        self._counts = torch.tensor(list(saved.values()), dtype=torch.int64, device=device) if saved else None

    # -- state: torch's five keys, ampray's under "ampray" ------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's keys ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker") and
        "ampray": settings, the hysteresis budget, counters, attribution. Empty when disabled, as torch's."""
        if not self._enabled:
            return {}
        if self._loss_scaler is None:
            state = {**self._fresh_state(self._init_scale, self._init_growth_tracker), **self._pending}
            skipped = int(state.get("skipped_steps", 0))
        else:
            state = self._loss_scaler.read().to_dict()
            skipped = int(self._skipped.item())
        extras = {k: self._extras[k] for k in ("hysteresis", "hysteresis_refill", "min_scale", "max_scale")}
        extras.update({k: state[k] for k in _COUNTERS}, steps=self._steps, skipped_steps=skipped,
                      attribution=self._attribution_state())
        return {"scale": float(state["scale"]), "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": int(state["growth_tracker"]), "ampray": extras}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state of this class or of torch's GradScaler (whose state keeps this scaler's extras,
        with a full hysteresis budget and zero counters). A no-op when disabled, as torch's."""
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError("The source state dict is empty, possibly because it was saved "
                               "from a disabled instance of GradScaler.")
        extras = dict(state_dict.get("ampray", {}))
        changes = {k: state_dict[k] for k in ("growth_factor", "backoff_factor", "growth_interval")}
        changes.update({k: extras[k] for k in ("hysteresis", "min_scale", "max_scale") if k in extras})
        refill = self._extras["hysteresis_refill"]
        self._extras["hysteresis_refill"] = extras.get("hysteresis_refill", refill)
        try:
            self.set(**changes)  # validated; the live LossScaler gets them too
        except ConfigError:
            self._extras["hysteresis_refill"] = refill
            raise
        self._init_scale = state_dict["scale"]
        self._init_growth_tracker = state_dict["_growth_tracker"]
        state = self._fresh_state(state_dict["scale"], state_dict["_growth_tracker"])
        state.update({k: extras[k] for k in _COUNTERS if k in extras})
        state["skipped_steps"] = int(extras.get("skipped_steps", 0))
        self._steps = int(extras.get("steps", 0))
        if self._loss_scaler is None:
            self._pending = state
        else:
            self._loss_scaler.load_state_dict(state)
            self._adopt()
            self._skipped.fill_(state["skipped_steps"])
        self._load_attribution(dict(extras.get("attribution", {})))

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # torch's: only between iterations; tensors re-created lazily
        if self._enabled:
            saved = self.state_dict()
            pending = self._fresh_state(saved["scale"], saved["_growth_tracker"])
            pending.update({k: saved["ampray"][k] for k in _COUNTERS}, skipped_steps=saved["ampray"]["skipped_steps"])
            state.update(_loss_scaler=None, _pending=pending, _skipped=None, _last_skipped=None, _counts=None,
                         _rows={}, _row_of_name={}, _names=[], _unnamed=0, _index_cache={},
                         _saved_attribution=saved["ampray"]["attribution"])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        saved = state.pop("_saved_attribution", None)
        self.__dict__.update(state)
        if saved:
            self._load_attribution(saved)
