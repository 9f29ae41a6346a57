"""LossScaler: dynamic loss scaling with hysteresis, a floor and a ceiling, state kept on the device.

What it adds to `torch.amp.GradScaler`:
- hysteresis: the scale backs off only after `hysteresis` overflowing steps in a row (1 = GradScaler);
  once that budget is spent, every further overflow backs off until a clean step refills it
  (`hysteresis_refill="clean"`, DeepSpeed's rule) or until the scale grows ("growth", Megatron-LM's rule).
  With hysteresis=2, refill "clean" and the pattern x x x . x x: 1024, 512, 256, 256, 256, 128;
  refill "growth": 1024, 512, 256, 256, 128, 64;
- `min_scale` / `max_scale`: backoff never goes below the floor, growth never above the ceiling;
- settings (`growth_factor`, `backoff_factor`, `growth_interval`, `hysteresis`, floor, ceiling) can be
  changed while training without losing the growth tracker;
- counters (overflows, backoffs, growths, min/max scale seen) live on the device beside the scale, so
  updating them costs no host-device synchronisation; they are read when a summary asks.

The skip decision (whether the optimizer may step) is the caller's: `found_inf` is a device tensor that
the trainer reads once per optimizer step, the same single sync that `GradScaler.step` makes.

On CUDA the update (about 25 tiny element-wise kernels: hysteresis, floor, ceiling, counters) is captured
once into a CUDA graph and replayed each optimizer step: one launch instead of 25, which matters when a
step is bound by the CPU's kernel launches. It is recaptured when a setting changes (the settings are
constants inside it) and never used while the caller is itself capturing a graph.
`AMPRAY_SCALER_GRAPHS=0` turns it off (the eager update runs the same arithmetic).
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from typing import Any, Iterable

import torch

from ampray.amp.config import ConfigError, MixedPrecisionConfig
from ampray.amp.records import ScalerState
from ampray.amp.settings import SCALER

SETTINGS = SCALER  # the live settings (ampray.amp.settings defines them)
_STATE = ("_scale", "_growth_tracker", "_hysteresis_left", "_overflows", "_backoffs", "_growths", "_min_seen",
          "_max_seen")


class LossScaler:
    """Scales the loss, unscales gradients and finds non-finite ones, and updates the scale on the device."""

    def __init__(self, config: MixedPrecisionConfig, device: torch.device | str = "cpu"):
        self.enabled = config.scaling_enabled
        self.dynamic = config.use_dynamic_loss_scaling
        self.device = _concrete(torch.device(device))
        self.init_scale = float(config.init_scale) if self.enabled else 1.0
        self._growth_factor = float(config.growth_factor)
        self._backoff_factor = float(config.backoff_factor)
        self._growth_interval = int(config.growth_interval)
        self._hysteresis = int(config.hysteresis)
        self._min_scale = float(config.min_scale)
        self._max_scale = float(config.max_scale)
        self.refill = config.hysteresis_refill
        self.use_graphs = self.device.type == "cuda" and os.environ.get("AMPRAY_SCALER_GRAPHS", "1") != "0"
        self._reset_tensors(self.init_scale)

    def _reset_tensors(self, scale: float) -> None:
        f32 = dict(dtype=torch.float32, device=self.device)
        i64 = dict(dtype=torch.int64, device=self.device)
        self._scale = torch.tensor(scale, **f32)
        self._growth_tracker = torch.tensor(0, **i64)
        self._hysteresis_left = torch.tensor(self._hysteresis, **i64)
        self._overflows = torch.tensor(0, **i64)
        self._backoffs = torch.tensor(0, **i64)
        self._growths = torch.tensor(0, **i64)
        self._min_seen = torch.tensor(scale, **f32)
        self._max_seen = torch.tensor(scale, **f32)
        self._found_inf = torch.zeros((), **f32)
        self._unscaled = False
        self._done: set[int] = set()
        # The graph's inputs (copied in before each replay) and the captured updates, keyed by "has a
        # valid mask"; new state tensors mean new captures.
        self._in_found = torch.zeros((), dtype=torch.bool, device=self.device)
        self._in_valid = torch.ones((), dtype=torch.bool, device=self.device)
        self._graphs: dict[bool, Any] = {}

    # -- settings: validated, and applied from the next update on ---------------------------------
    def settings(self) -> dict[str, float | int]:
        return {name: getattr(self, name) for name in SETTINGS}

    def set(self, **changes: Any) -> dict[str, tuple[Any, Any]]:
        """Change scaler settings mid-run; returns {name: (before, after)}. The growth tracker is kept."""
        unknown = sorted(set(changes) - set(SETTINGS))
        if unknown:
            raise ConfigError(f"LossScaler.set: unknown setting(s) {unknown}; allowed are {list(SETTINGS)}")
        merged = {**self.settings(), **changes}
        # Validate the combination through the config's own rules, so there is one source of truth.
        MixedPrecisionConfig(
            growth_factor=merged["growth_factor"], backoff_factor=merged["backoff_factor"],
            growth_interval=int(merged["growth_interval"]), hysteresis=int(merged["hysteresis"]),
            min_scale=merged["min_scale"], max_scale=merged["max_scale"], init_scale=merged["min_scale"],
        )
        before = self.settings()
        for name, value in changes.items():
            setattr(self, "_" + name, int(value) if name in ("growth_interval", "hysteresis") else float(value))
        if "hysteresis" in changes:
            # A smaller budget applies at once; a larger one starts counting from the next clean step.
            self._hysteresis_left.clamp_(max=self._hysteresis)
        if self.enabled and ("min_scale" in changes or "max_scale" in changes):
            # A moved floor or ceiling applies at once too: the scale never lies outside them.
            self._scale.clamp_(min=self._min_scale, max=self._max_scale)
        self._graphs = {}  # the captured updates hold the old settings as constants
        return {n: (before[n], v) for n, v in self.settings().items() if before[n] != v}

    @property
    def dynamic(self) -> bool:
        """False: a static scale (only overflows are counted)."""
        return self._dynamic

    @dynamic.setter
    def dynamic(self, value: bool) -> None:
        self._dynamic = bool(value)
        self._graphs = {}  # the captured update holds it as a constant

    growth_factor = property(lambda self: self._growth_factor)
    backoff_factor = property(lambda self: self._backoff_factor)
    growth_interval = property(lambda self: self._growth_interval)
    hysteresis = property(lambda self: self._hysteresis)
    min_scale = property(lambda self: self._min_scale)
    max_scale = property(lambda self: self._max_scale)

    # -- the three verbs of a step ---------------------------------------------------------------
    def to(self, device: torch.device | str) -> "LossScaler":
        device = _concrete(torch.device(device))
        if device != self.device:
            self.device = device
            for name, value in list(vars(self).items()):
                if isinstance(value, torch.Tensor):
                    setattr(self, name, value.to(device))
            self._graphs = {}
            self.use_graphs = self.use_graphs and device.type == "cuda"
        return self

    @property
    def scale_tensor(self) -> torch.Tensor:
        """The current scale as a 0-d device tensor (no sync)."""
        return self._scale

    @property
    def growth_tracker_tensor(self) -> torch.Tensor:
        """Clean steps since the last overflow or growth, as a 0-d int64 device tensor (no sync)."""
        return self._growth_tracker

    @property
    def refill(self) -> str:
        """When a spent hysteresis budget is refilled: "clean" (DeepSpeed) or "growth" (Megatron-LM)."""
        return self._refill

    @refill.setter
    def refill(self, value: str) -> None:
        if value not in ("clean", "growth"):
            raise ConfigError(f"LossScaler.hysteresis_refill={value!r} is not allowed: expected one of "
                              "['clean', 'growth']")
        self._refill = value
        self._graphs = {}  # the captured update holds it as a constant

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return loss
        # fp32 multiply: an fp16 loss times 2**16 would itself overflow before backward starts.
        return loss.float() * self._scale

    @torch.no_grad()
    def unscale_(self, grads: Iterable[torch.Tensor]) -> torch.Tensor:
        """Divide gradients by the scale in place; return `found_inf` (0-d float tensor, 1.0 if any
        gradient unscaled since the last `update()` is inf/NaN).

        A gradient already unscaled since the last update is not divided again, and calls with other
        gradients (a second optimizer) unscale those and add to the same flag: one update then sees the
        overflow of every optimizer. Sparse gradients are unscaled through their values, coalesced or
        not (a view: the multiply distributes over duplicate indices)."""
        if not self.enabled:
            return self._found_inf
        if not self._unscaled:
            self._found_inf.zero_()
            self._done: set[int] = set()
        inv_scale = self._scale.double().reciprocal().float()
        by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
        for g in grads:
            if id(g) in self._done:
                continue
            self._done.add(id(g))
            if g.dtype == torch.float16:
                raise TypeError(
                    "LossScaler.unscale_: found an fp16 gradient; keep parameters in fp32 and let autocast "
                    "cast activations (call model.float() before training)")
            by_device[(g.device, g.dtype)].append(g._values() if g.is_sparse else g)
        for (device, _), group in by_device.items():
            found = self._found_inf if device == self.device else torch.zeros((), device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv_scale.to(device))
            if found is not self._found_inf:
                self._found_inf.copy_(torch.maximum(self._found_inf, found.to(self.device)))
        self._unscaled = True
        return self._found_inf

    def inv_scale(self) -> torch.Tensor:
        """1/scale as a 0-d device tensor (no sync)."""
        return torch.reciprocal(self._scale)

    @torch.no_grad()
    def update(self, found_inf: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> None:
        """Advance the scale by one optimizer step, on the device (no sync). `valid` (0-d bool tensor)
        masks the whole update off for a step that must not count (a non-finite *loss*), when that is
        known only on the device."""
        if not self.enabled:
            return
        found_inf = self._found_inf if found_inf is None else found_inf
        self._unscaled = False
        graph = self._graph(valid is not None) if self._graphable(found_inf, valid) else None
        if graph is None:
            self._advance(found_inf > 0, valid)
            return
        self._in_found.copy_(found_inf)  # nonzero -> True: the same as found_inf > 0 for a 0/1 flag
        if valid is not None:
            self._in_valid.copy_(valid)
        graph.replay()

    def _advance(self, found: torch.Tensor, valid: torch.Tensor | None) -> None:
        """The update's arithmetic, in place on the state tensors (eager, or recorded into a graph)."""
        if valid is not None:
            found = found & valid
        self._overflows += found
        if not self.dynamic:
            return
        scale = self._scale
        # The budget counts down on each overflow and stays spent (0): every further overflow backs off.
        left = (self._hysteresis_left - found.long()).clamp(min=0)
        backoff = found & (left == 0)
        tracker = torch.where(found, 0, self._growth_tracker + 1)
        grow = tracker >= self._growth_interval
        # In float64, rounded once to float32: torch's GradScaler kernel does the same, so the trajectories
        # agree to the bit for factors that are not powers of two too.
        shrunk = (scale.double() * self._backoff_factor).float().clamp(min=self._min_scale)
        grown = (scale.double() * self._growth_factor).float().clamp(max=self._max_scale)
        new_scale = torch.where(backoff, shrunk, torch.where(grow, grown, scale))
        if valid is not None:
            grow = grow & valid
        refill = grow if self.refill == "growth" else ~found
        _commit(self._hysteresis_left, torch.where(refill, self._hysteresis, left), valid)
        _commit(self._growth_tracker, torch.where(grow, 0, tracker), valid)
        _commit(self._scale, new_scale, valid)
        self._backoffs += backoff
        self._growths += grow
        torch.minimum(self._min_seen, self._scale, out=self._min_seen)
        torch.maximum(self._max_seen, self._scale, out=self._max_seen)

    # -- the CUDA-graph form of the update ---------------------------------------------------------
    def _graphable(self, found_inf: torch.Tensor, valid: torch.Tensor | None) -> bool:
        return (self.use_graphs and found_inf.device == self.device
                and (valid is None or valid.device == self.device)
                and not torch.cuda.is_current_stream_capturing())

    def _graph(self, with_valid: bool):
        """The captured update (captured on first use after a change of settings or state tensors).
        Returns None, and turns graphs off for this scaler, if the capture fails."""
        graph = self._graphs.get(with_valid)
        if graph is not None:
            return graph
        valid = self._in_valid if with_valid else None
        # Warm-up on scratch copies of the state (kernels are loaded lazily; loading must not happen
        # during capture), then capture on a side stream; capturing runs nothing, so state is untouched.
        real = {name: getattr(self, name) for name in _STATE}
        try:
            for name, value in real.items():
                setattr(self, name, value.clone())
            self._advance(self._in_found, valid)
        finally:
            for name, value in real.items():
                setattr(self, name, value)
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        try:
            with torch.cuda.stream(side):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    self._advance(self._in_found, valid)
                finally:
                    graph.capture_end()
        except Exception as err:  # an unusual setup (a debugger, an old driver): the eager path works
            warnings.warn(f"LossScaler: capturing the scale update as a CUDA graph failed ({err}); "
                          "using the eager update", RuntimeWarning, stacklevel=3)
            self.use_graphs = False
            return None
        finally:
            current.wait_stream(side)
        self._graphs[with_valid] = graph
        return graph

    def set_scale(self, value: float) -> None:
        """Put the scale at `value` (within [min_scale, max_scale]) with a fresh growth tracker: a restart
        from a lower scale (the remedy after a rollback)."""
        value = float(value)
        if not self._min_scale <= value <= self._max_scale:
            raise ConfigError(f"LossScaler.set_scale: value={value!r} is not allowed: expected min_scale="
                              f"{self._min_scale:g} <= value <= max_scale={self._max_scale:g}")
        self._scale.fill_(value)
        self._growth_tracker.zero_()
        torch.minimum(self._min_seen, self._scale, out=self._min_seen)

    def disable(self) -> None:
        """Stop scaling from now on (the bf16 fallback); counters keep their history."""
        self.enabled = False
        self._scale.fill_(1.0)
        self._found_inf.zero_()
        self._unscaled = False

    # -- reading and resuming (these synchronise; call them when reporting, not per step) --------
    def read(self) -> ScalerState:
        values = torch.stack([
            self._scale.double(), self._growth_tracker.double(), self._hysteresis_left.double(),
            self._overflows.double(), self._backoffs.double(), self._growths.double(),
            self._min_seen.double(), self._max_seen.double(),
        ]).tolist()
        return ScalerState(values[0], int(values[1]), int(values[2]), int(values[3]), int(values[4]),
                           int(values[5]), values[6], values[7])

    def state_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "dynamic": self.dynamic, "hysteresis_refill": self.refill,
                **self.read().to_dict(), **self.settings()}

    def check_state(self, state: Any, owner: str = "scaler") -> dict[str, Any]:
        """The values `load_state_dict` would set, checked first: every field present, the scale a finite
        positive float32, counters non-negative integers, settings valid together. Raises EngineStateError
        (naming the field and value) or ConfigError (a setting); nothing is changed."""
        from ampray.amp.config import FLOAT32_MAX
        from ampray.amp.state import EngineStateError, state_number

        if not isinstance(state, dict):
            raise EngineStateError(f"{owner}={state!r} is not allowed: expected a dict (LossScaler.state_dict())")
        out: dict[str, Any] = {}
        for name in ("scale", "min_scale_seen", "max_scale_seen"):
            out[name] = state_number(owner, state, name)
            if not 0.0 < out[name] <= FLOAT32_MAX:
                raise EngineStateError(f"{owner}.{name}={state[name]!r} is not allowed: expected a number in "
                                       f"(0, {FLOAT32_MAX:.8g}] (a loss scale is a finite positive float32)")
        for name in ("growth_tracker", "hysteresis_left", "overflows", "backoffs", "growths"):
            out[name] = state_number(owner, state, name, int, minimum=0)
        settings = {**self.settings(), **{k: state[k] for k in SETTINGS if k in state}}
        for name in ("growth_interval", "hysteresis"):
            settings[name] = state_number(owner, settings, name, int, minimum=1)
        for name in ("growth_factor", "backoff_factor", "min_scale", "max_scale"):
            settings[name] = state_number(owner, settings, name)
        MixedPrecisionConfig(init_scale=settings["min_scale"], **settings)  # the settings' own rules
        out["settings"] = settings
        refill = state.get("hysteresis_refill", self.refill)
        if refill not in ("clean", "growth"):
            raise EngineStateError(f"{owner}.hysteresis_refill={refill!r} is not allowed: expected one of "
                                   "['clean', 'growth']")
        out["hysteresis_refill"] = refill
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        values = self.check_state(state)  # first: a bad state changes nothing
        self.set(**{k: values["settings"][k] for k in SETTINGS if k in state})
        self.refill = values["hysteresis_refill"]
        self._reset_tensors(values["scale"])
        for name in ("growth_tracker", "hysteresis_left", "overflows", "backoffs", "growths"):
            getattr(self, "_" + name).fill_(values[name])
        self._min_seen.fill_(values["min_scale_seen"])
        self._max_seen.fill_(values["max_scale_seen"])


def _concrete(device: torch.device) -> torch.device:
    """"cuda" -> "cuda:<current>": tensors report their device with its index, and the two must compare equal."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _commit(state: torch.Tensor, new: torch.Tensor, valid: torch.Tensor | None) -> None:
    state.copy_(new if valid is None else torch.where(valid, new, state))
