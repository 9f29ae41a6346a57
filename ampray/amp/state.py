"""Counters of the training loop (host integers and device-side loss sums) and safe state files."""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

_HOST_FIELDS = ("training_steps", "optimizer_steps", "skipped_steps", "samples", "oom_events",
                "oom_skipped_batches", "oom_split_retries", "pieces", "micro_in_window",
                "overflows_at_floor", "skipped_in_a_row", "nonfinite_in_a_row")
_FLOAT_FIELDS = ("host_time_s", "loss_sum", "loss_count", "last_loss", "nonfinite_losses")  # required ones


class EngineStateError(ValueError):
    """An engine state (a checkpoint's, a state file's) that cannot be loaded: the message names the field,
    its value and what is allowed. Nothing was changed by the load that raised it."""


def state_number(owner: str, state: dict[str, Any], name: str, kind: type = float, default: Any = None,
                 finite: bool = True, minimum: float | None = None) -> Any:
    """state[name] as a `kind` (int or float), checked; EngineStateError naming `owner.name` otherwise."""
    if name not in state:
        if default is not None:
            return default
        raise EngineStateError(f"{owner}: the required field {name!r} is missing (fields present: "
                               f"{sorted(state)})")
    value = state[name]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) or (torch.is_tensor(value) and
                                                                              value.numel() == 1)
    number = float(value) if ok else None
    if number is not None and finite and not math.isfinite(number):
        ok = False
    if ok and kind is int and number != int(number):
        ok = False
    if ok and minimum is not None and number < minimum:
        ok = False
    if not ok:
        what = "an integer" if kind is int else ("a finite number" if finite else "a number")
        raise EngineStateError(f"{owner}.{name}={value!r} is not allowed: expected {what}"
                               + (f" >= {minimum:g}" if minimum is not None else ""))
    return int(number) if kind is int else number


class TrainerCounters:
    """Counts what the trainer did. Integers known on the host cost nothing to keep; the loss sums stay
    on the device and are read only by `read()` / `state_dict()`."""

    def __init__(self, device: torch.device):
        self.device = device
        for name in _HOST_FIELDS:
            setattr(self, name, 0)
        self.pieces = 1  # the OOM policy's split of each micro-batch (a power of two)
        self.present: list[int] | None = None  # agreed gradient presence (OOM-safe path under DDP)
        self.host_time_s = 0.0
        self.wall_time_before_s = 0.0  # wall time of earlier sessions of a resumed run
        self._t_start: float | None = None
        self._t_end = 0.0
        cuda = device.type == "cuda"
        self._ev_start = torch.cuda.Event(enable_timing=True) if cuda else None
        self._ev_end = torch.cuda.Event(enable_timing=True) if cuda else None
        # A report interval: from begin_interval() (called once a report, its evaluation and its checkpoint
        # are done: they are not step time; loading the next batch is) or else the first step's start.
        self._stepped = False
        self._t_interval: float | None = None
        self._ev_interval = torch.cuda.Event(enable_timing=True) if cuda else None
        self.grads_dirty = False      # a backward of this accumulation window has completed
        self.window_poisoned = False  # an OOM left this window's gradients unusable
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_count = torch.zeros((), dtype=torch.int64, device=device)
        self.last_loss = torch.full((), float("nan"), device=device)
        self.nonfinite_losses = torch.zeros((), dtype=torch.int64, device=device)
        self.window_bad_loss = torch.zeros((), dtype=torch.bool, device=device)

    def mark_start(self) -> None:
        if self._t_start is None:
            self._t_start = time.perf_counter()
            if self._ev_start is not None:
                self._ev_start.record()
        if self._t_interval is None:
            self.begin_interval()

    def begin_interval(self) -> None:
        """Start a new interval now (`interval_time_s` measures from here to the end of its last step)."""
        self._stepped = False
        self._t_interval = time.perf_counter()
        if self._ev_interval is not None:
            self._ev_interval.record()

    def interval_time_s(self) -> float:
        """Time from the interval's start to its last step's end (0.0 before a step): on CUDA by events on
        the stream, else on the host."""
        if self._t_interval is None or not self._stepped:
            return 0.0
        return self._until_end(self._t_interval, self._ev_interval)

    def _until_end(self, t0: float, ev0) -> float:
        """From a start (its host time, its event on CUDA) to the last step's end: on CUDA by the events on
        the stream (the GPU's own time, waiting for it), else on the host."""
        if ev0 is not None:
            self._ev_end.synchronize()
            return ev0.elapsed_time(self._ev_end) / 1e3
        return self._t_end - t0

    def mark_end(self) -> None:
        self._stepped = True
        self._t_end = time.perf_counter()
        if self._ev_end is not None:
            self._ev_end.record()

    def wall_time_s(self) -> float:
        """Time from the first step's start to the last step's end: on CUDA measured by events on the
        stream (the GPU's own time, waiting for it), else on the host."""
        if self._t_start is None:
            return self.wall_time_before_s
        return self.wall_time_before_s + self._until_end(self._t_start, self._ev_start)

    @torch.no_grad()
    def add_loss(self, loss: torch.Tensor, check: bool) -> None:
        self.last_loss = loss
        if check:
            bad = ~torch.isfinite(loss)
            self.window_bad_loss |= bad
            self.nonfinite_losses += bad
            self.loss_sum += torch.where(bad, 0.0, loss.double())
            self.loss_count += ~bad
        else:
            self.loss_sum += loss.double()
            self.loss_count += 1

    def end_window(self) -> None:
        self.micro_in_window = 0
        self.grads_dirty = False
        self.window_poisoned = False
        self.window_bad_loss.zero_()

    def read(self) -> dict[str, Any]:
        """All counters as plain numbers (one sync)."""
        loss_sum, count, last, nonfinite = torch.stack([
            self.loss_sum, self.loss_count.double(), self.last_loss.double(), self.nonfinite_losses.double()
        ]).tolist()
        out = {name: getattr(self, name) for name in _HOST_FIELDS}
        out.update(host_time_s=self.host_time_s, wall_time_s=self.wall_time_s(), loss_sum=loss_sum, loss_count=int(count), last_loss=last,
                   nonfinite_losses=int(nonfinite))
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.read()

    @staticmethod
    def check_state(state: Any, owner: str = "counters") -> dict[str, Any]:
        """The values `load_state_dict` would set, checked (EngineStateError naming the field otherwise)."""
        if not isinstance(state, dict):
            raise EngineStateError(f"{owner}={state!r} is not allowed: expected a dict of counters")
        out = {name: state_number(owner, state, name, int, default=1 if name == "pieces" else 0, minimum=0)
               for name in _HOST_FIELDS}
        for name in _FLOAT_FIELDS:
            kind = int if name in ("loss_count", "nonfinite_losses") else float
            # A diverged run's last loss is NaN, and a resumed one must load it as it was.
            out[name] = state_number(owner, state, name, kind, finite=name != "last_loss",
                                     minimum=None if name in ("loss_sum", "last_loss") else 0)
        out["wall_time_s"] = state_number(owner, state, "wall_time_s", default=0.0, minimum=0)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        values = self.check_state(state)  # first: a bad state changes nothing
        for name in _HOST_FIELDS:
            setattr(self, name, values[name])
        self.host_time_s = values["host_time_s"]
        self.wall_time_before_s = values["wall_time_s"]
        self._t_start = None
        self.loss_sum.fill_(values["loss_sum"])
        self.loss_count.fill_(values["loss_count"])
        self.last_loss = torch.tensor(values["last_loss"], device=self.device)
        self.nonfinite_losses.fill_(values["nonfinite_losses"])
        self.end_window()


_REQUIRED_STATE = ("config", "amp_dtype", "scaler_enabled", "counters", "offenders", "scale_history", "events",
                   "last_scale")


def check_engine_state(state: Any, scaler) -> None:
    """`MixedPrecisionTrainer.check_state`: every field of an engine state checked against what loading it
    needs (`scaler`, the engine's LossScaler, checks its own part); EngineStateError otherwise."""
    from ampray.amp.config import ConfigError, MixedPrecisionConfig, parse_dtype

    if not isinstance(state, dict):
        raise EngineStateError(f"engine state={type(state).__name__} is not allowed: expected a dict "
                               "(MixedPrecisionTrainer.state_dict())")
    missing = [k for k in _REQUIRED_STATE if k not in state]
    if missing:
        raise EngineStateError(f"engine state: required field(s) {missing} missing (present: {sorted(state)}); "
                               "expected a MixedPrecisionTrainer.state_dict()")
    try:
        config = MixedPrecisionConfig.from_dict(state["config"])
        parse_dtype(state["amp_dtype"], "engine state", "amp_dtype")
    except ConfigError as err:
        raise EngineStateError(f"engine state: {err}") from None
    TrainerCounters.check_state(state["counters"], "engine state counters")
    if not state_number("engine state", state, "last_scale") > 0:
        raise EngineStateError(f"engine state.last_scale={state['last_scale']!r} is not allowed: expected a "
                               "finite number > 0")
    offenders = state["offenders"]
    if not isinstance(offenders, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in offenders.items()):
        raise EngineStateError(f"engine state.offenders={offenders!r} is not allowed: expected "
                               "{parameter name: overflow count >= 0}")
    for name in ("scale_history", "events"):
        if not isinstance(state[name], list):
            raise EngineStateError(f"engine state.{name}={state[name]!r} is not allowed: expected a list")
    if "scaler" not in state:
        if config.save_scaler_state and state["scaler_enabled"]:
            raise EngineStateError("engine state: the required field 'scaler' is missing (its config has "
                                   "save_scaler_state=True)")
        return
    part = state["scaler"]
    try:
        values = scaler.check_state(part, "engine state scaler")
    except ConfigError as err:
        raise EngineStateError(f"engine state scaler: {err}") from None
    if not isinstance(part.get("dynamic"), bool):
        raise EngineStateError(f"engine state scaler.dynamic={part.get('dynamic')!r} is not allowed: expected a "
                               "boolean")
    lo, hi = values["settings"]["min_scale"], values["settings"]["max_scale"]
    if part.get("enabled", state["scaler_enabled"]) and not lo <= values["scale"] <= hi:
        raise EngineStateError(f"engine state scaler.scale={part['scale']!r} is not allowed: expected "
                               f"min_scale={lo:g} <= scale <= max_scale={hi:g}")


def estimate_memory_savings(amp_dtype: torch.dtype, num_params: int) -> dict[str, Any]:
    """What a half-precision autocast saves and costs, from first principles (not a measurement; see
    `benchmark_mixed_precision` for measured numbers)."""
    half = amp_dtype in (torch.float16, torch.bfloat16)
    return {
        # Activations saved for backward are produced by autocast ops in 2 bytes instead of 4.
        "activation_fraction_saved": 0.5 if half else 0.0,
        # fp32 master weights stay; autocast caches a 2-byte copy of each weight during forward.
        "weight_cast_cache_bytes": 2 * num_params if half else 0,
        "param_and_optimizer_bytes_saved": 0,
        "num_params": num_params,
    }


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def count_params(model: nn.Module) -> int:
    """The model's parameters; a lazy module's (nn.LazyLinear before its first forward) count once known."""
    from torch.nn.parameter import is_lazy

    return sum(p.numel() for p in model.parameters() if not is_lazy(p))
