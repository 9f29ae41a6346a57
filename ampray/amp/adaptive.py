"""AdaptiveMixedPrecisionTrainer: retunes the loss scaler from what it measures while training.

Policy (thresholds in `MixedPrecisionConfig.adaptation`, so a search can tune them):
- overflow rate in the last window above `overflow_rate_high`: gentler scaling, i.e. growth_factor
  halfway towards 1 (not below `min_growth_factor`) and growth_interval doubled (not above
  `max_growth_interval`): the scale was growing into overflows faster than it should;
- `clean_steps_to_increase` optimizer steps in a row without an overflow: more aggressive scaling,
  i.e. growth_factor twice as far from 1 (not above `max_growth_factor`) and growth_interval halved
  (not below `min_growth_interval`): a larger scale keeps more small gradients out of fp16 underflow;
- after any change, `cooldown` optimizer steps pass before the next one;
- throughput below `min_speedup` times an fp32 baseline (when one is given) is reported as "mixed
  precision is not paying off"; that is a warning, the config is left as it is.
The policy runs by itself at the end of every `window` optimizer steps; `adapt_config` is the same
policy called by hand. Overflows are known on the host from the step's single sync: no extra sync.

The policy is a `ScaleAdaptation` object called at the engine's `booked` event (policies.py); its inputs
(overflows, clean streak) are the same on every rank, so every rank adapts alike. Throughput is each
rank's own, and only ever produces a warning.
"""

from __future__ import annotations

from typing import Any

import torch

from ampray.amp.config import MixedPrecisionConfig
from ampray.amp.trainer import MixedPrecisionTrainer


class ScaleAdaptation:
    """The adaptation policy and what it has measured (windows, clean streak, history, warnings)."""

    settles_each_step = True
    """A step's scaler settings follow from the previous step's booking: the stepper books at once."""

    def __init__(self, baseline_performance: dict[str, Any] | None = None):
        self.baseline_performance = baseline_performance
        self.adaptation_history: list[dict[str, Any]] = []
        self.warnings: list[dict[str, Any]] = []
        self._clean_streak = 0
        self._last_adapt_step: int | None = None
        self._window = {"overflows": 0, "steps": 0, "samples": 0, "time_s": 0.0}
        self._window_t0 = (0, 0.0)

    def on_booked(self, engine: MixedPrecisionTrainer, step: int, overflow: bool) -> None:
        w = self._window
        w["steps"] += 1
        w["overflows"] += int(overflow)
        self._clean_streak = 0 if overflow else self._clean_streak + 1
        if w["steps"] >= engine.config.adaptation.window:
            c = engine.counters
            samples0, time0 = self._window_t0
            elapsed = c.host_time_s - time0
            current = {"overflow_rate": w["overflows"] / w["steps"], "clean_steps": self._clean_streak,
                       "samples_per_s": (c.samples - samples0) / elapsed if elapsed > 0 else 0.0}
            self.adapt(engine, current, self.baseline_performance, source="window", step=step)
            self._window = {"overflows": 0, "steps": 0, "samples": 0, "time_s": 0.0}
            self._window_t0 = (c.samples, c.host_time_s)

    def adapt(self, engine: MixedPrecisionTrainer, current_performance: dict[str, Any],
              baseline_performance: dict[str, Any] | None = None,
              source: str = "manual", step: int | None = None) -> dict[str, dict[str, Any]]:
        """Apply the policy to measured performance; returns {field: {"before", "after"}} of the changes.

        `current_performance` needs "overflow_rate"; optional "clean_steps" (defaults to the trainer's own
        streak) and "samples_per_s"; `baseline_performance` may give the fp32 "samples_per_s".
        """
        a = engine.config.adaptation
        step = engine.counters.optimizer_steps if step is None else step
        self._check_speedup(engine, current_performance, baseline_performance, step)
        if self._last_adapt_step is not None and step - self._last_adapt_step < a.cooldown:
            return {}
        if not (engine.scaler.enabled and engine.scaler.dynamic):
            return {}
        rate = float(current_performance["overflow_rate"])
        clean = int(current_performance.get("clean_steps", self._clean_streak))
        gf, gi = engine.scaler.growth_factor, engine.scaler.growth_interval
        if rate > a.overflow_rate_high:
            target = {"growth_factor": max(a.min_growth_factor, 1.0 + (gf - 1.0) / 2.0),
                      "growth_interval": min(a.max_growth_interval, gi * 2)}
            reason = f"overflow rate {rate:.4f} > overflow_rate_high {a.overflow_rate_high}: gentler scaling"
        elif clean >= a.clean_steps_to_increase:
            target = {"growth_factor": min(a.max_growth_factor, 1.0 + (gf - 1.0) * 2.0),
                      "growth_interval": max(a.min_growth_interval, gi // 2)}
            reason = f"{clean} clean steps >= clean_steps_to_increase {a.clean_steps_to_increase}: bolder scaling"
        else:
            return {}
        diff = engine.update_scaler_settings(**target)
        if not diff:
            return {}  # already at the bounds: nothing changed, no cool-down started
        self._last_adapt_step = step
        if clean >= a.clean_steps_to_increase:
            self._clean_streak = 0  # the next increase needs a fresh clean stretch
        changes = {name: {"before": b, "after": v} for name, (b, v) in diff.items()}
        self.adaptation_history.append({
            "step": step, "source": source, "reason": reason,
            "before": {n: c["before"] for n, c in changes.items()},
            "after": {n: c["after"] for n, c in changes.items()},
            "observed": {"overflow_rate": rate, "clean_steps": clean},
        })
        return changes

    def _check_speedup(self, engine: MixedPrecisionTrainer, current: dict[str, Any],
                       baseline: dict[str, Any] | None, step: int) -> None:
        if not baseline or not baseline.get("samples_per_s") or not current.get("samples_per_s"):
            return
        speedup = float(current["samples_per_s"]) / float(baseline["samples_per_s"])
        if speedup < engine.config.adaptation.min_speedup:
            self.warnings.append({
                "step": step, "speedup": speedup, "min_speedup": engine.config.adaptation.min_speedup,
                "message": f"mixed precision is not paying off: {speedup:.2f}x the fp32 baseline "
                           f"< min_speedup {engine.config.adaptation.min_speedup}",
            })

    def summary(self, engine: MixedPrecisionTrainer) -> dict[str, Any]:
        return {
            "total_adaptations": len(self.adaptation_history),
            "current_config": engine.config.to_dict(),
            "history": list(self.adaptation_history),
            "warnings": list(self.warnings),
            "clean_streak": self._clean_streak,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.adaptation_history), "warnings": list(self.warnings),
            "clean_streak": self._clean_streak, "last_adapt_step": self._last_adapt_step,
            "window": dict(self._window), "window_t0": list(self._window_t0),
        }

    @staticmethod
    def check_state(a: Any) -> None:
        """Raise EngineStateError (naming the field) unless `load_state_dict(a)` can load all of it."""
        from ampray.amp.state import EngineStateError, state_number

        if not a:
            return
        owner = "engine state adaptation"
        if not isinstance(a, dict):
            raise EngineStateError(f"{owner}={a!r} is not allowed: expected a dict (ScaleAdaptation.state_dict())")
        for name, kind in (("history", list), ("warnings", list), ("window", dict), ("window_t0", list)):
            if not isinstance(a.get(name), kind):
                raise EngineStateError(f"{owner}.{name}={a.get(name)!r} is not allowed: expected a {kind.__name__}")
        state_number(owner, a, "clean_streak", int, minimum=0)
        if a.get("last_adapt_step") is not None:
            state_number(owner, a, "last_adapt_step", int, minimum=0)
        if len(a["window_t0"]) != 2:
            raise EngineStateError(f"{owner}.window_t0={a['window_t0']!r} is not allowed: expected [samples, time_s]")

    def load_state_dict(self, a: dict[str, Any] | None) -> None:
        self.check_state(a)
        if a:
            self.adaptation_history = list(a["history"])
            self.warnings = list(a["warnings"])
            self._clean_streak = int(a["clean_streak"])
            self._last_adapt_step = a["last_adapt_step"]
            self._window = dict(a["window"])
            self._window_t0 = (int(a["window_t0"][0]), float(a["window_t0"][1]))


class AdaptiveMixedPrecisionTrainer(MixedPrecisionTrainer):
    """MixedPrecisionTrainer plus the ScaleAdaptation policy over the loss-scaler settings."""

    def __init__(self, config: MixedPrecisionConfig | None = None, device: torch.device | str | None = None,
                 baseline_performance: dict[str, Any] | None = None, process_group: Any = "auto"):
        super().__init__(config, device, process_group=process_group)
        self.adaptation = ScaleAdaptation(baseline_performance)

    def booked_policies(self) -> list:
        return [self.collapse, self.stall, self.adaptation]

    @property
    def baseline_performance(self) -> dict[str, Any] | None:
        return self.adaptation.baseline_performance

    @baseline_performance.setter
    def baseline_performance(self, value: dict[str, Any] | None) -> None:
        self.adaptation.baseline_performance = value

    @property
    def adaptation_history(self) -> list[dict[str, Any]]:
        return self.adaptation.adaptation_history

    @property
    def warnings(self) -> list[dict[str, Any]]:
        return self.adaptation.warnings

    def adapt_config(self, current_performance: dict[str, Any],
                     baseline_performance: dict[str, Any] | None = None,
                     source: str = "manual", step: int | None = None) -> dict[str, dict[str, Any]]:
        """Apply the policy to measured performance; returns {field: {"before", "after"}} of the changes.

        `current_performance` needs "overflow_rate"; optional "clean_steps" (defaults to the trainer's own
        streak) and "samples_per_s"; `baseline_performance` may give the fp32 "samples_per_s".
        """
        return self.adaptation.adapt(self, current_performance, baseline_performance, source, step)

    def get_adaptation_summary(self) -> dict[str, Any]:
        return self.adaptation.summary(self)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["adaptation"] = self.adaptation.state_dict()
        return state

    def check_state(self, state: Any) -> None:
        super().check_state(state)
        self.adaptation.check_state(state.get("adaptation"))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)  # checks the whole state (this class's check_state) first
        self.adaptation.load_state_dict(state.get("adaptation"))
        # The scaler's settings were restored by the base class; mirror them into the config.
        for name, value in self.scaler.settings().items():
            setattr(self.config, name, value)
