"""Configuration of the AMP engine: small dataclasses, validated at construction, plain-data round trip.

Every field has a type, a default and a one-line docstring. Errors name the field, the bad value and
what is allowed, so that a bad TOML file or a bad search space fails before any training starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}

OOMPolicy = Literal["raise", "skip", "split"]
NonFinitePolicy = Literal["raise", "skip", "ignore"]
CollapsePolicy = Literal["raise", "fallback_bf16"]
StallPolicy = Literal["raise", "fallback_bf16"]
HysteresisRefill = Literal["clean", "growth"]


FLOAT32_MAX = float(torch.finfo(torch.float32).max)
"""The largest finite float32: the loss scale (and its floor and ceiling) must not exceed it."""


class ConfigError(ValueError):
    """A config field holds a value that is not allowed; the message names field, value and rule."""


def _fail(owner: str, name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{owner}.{name}={value!r} is not allowed: expected {allowed}")


def parse_dtype(value: Any, owner: str = "MixedPrecisionConfig", name: str = "dtype") -> torch.dtype:
    """Map `torch.float16`, `"fp16"`, `"bfloat16"`, ... to a torch dtype."""
    if isinstance(value, torch.dtype) and value in _DTYPE_NAMES:
        return value
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    _fail(owner, name, value, f"one of torch.float16/bfloat16/float32 or {sorted(_DTYPES)}")
    raise AssertionError  # unreachable


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def _check_type(owner: str, f: dataclasses.Field, value: Any) -> None:
    """Reject values of the wrong kind (a string where a number belongs, a float for a count)."""
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if t == "bool" and not isinstance(value, bool):
        _fail(owner, f.name, value, "a boolean")
    if t == "str" and not isinstance(value, str):
        _fail(owner, f.name, value, "a string")
    if t == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        _fail(owner, f.name, value, "an integer")
    if t in ("float", "float | None") and value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            _fail(owner, f.name, value, "a finite number")


def _check_choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(owner, name, value, f"one of {list(choices)}")


@dataclass
class AdaptationConfig:
    """When and how AdaptiveMixedPrecisionTrainer retunes the loss scaler from measured behaviour."""

    window: int = 100
    """Optimizer steps per observation window; the policy runs once at the end of each window."""
    overflow_rate_high: float = 0.05
    """Overflow rate in a window above which scaling becomes gentler (lower growth, longer interval)."""
    clean_steps_to_increase: int = 500
    """Consecutive overflow-free optimizer steps after which scaling becomes more aggressive again."""
    cooldown: int = 100
    """Optimizer steps after an adaptation during which no further adaptation is made."""
    min_speedup: float = 1.1
    """Speedup over the fp32 baseline below which the policy reports that mixed precision is not paying off."""
    min_growth_factor: float = 1.05
    """Lower bound for growth_factor when scaling is made gentler."""
    max_growth_factor: float = 2.0
    """Upper bound for growth_factor when scaling is made more aggressive."""
    min_growth_interval: int = 50
    """Lower bound for growth_interval when scaling is made more aggressive."""
    max_growth_interval: int = 32000
    """Upper bound for growth_interval when scaling is made gentler."""

    def __post_init__(self) -> None:
        owner = "AdaptationConfig"
        for f in dataclasses.fields(self):
            _check_type(owner, f, getattr(self, f.name))
        for name in ("window", "clean_steps_to_increase", "min_growth_interval"):
            if getattr(self, name) < 1:
                _fail(owner, name, getattr(self, name), "an integer >= 1")
        if self.cooldown < 0:
            _fail(owner, "cooldown", self.cooldown, "an integer >= 0")
        if not 0.0 < self.overflow_rate_high < 1.0:
            _fail(owner, "overflow_rate_high", self.overflow_rate_high, "a rate in (0, 1)")
        if self.min_speedup <= 0:
            _fail(owner, "min_speedup", self.min_speedup, "a number > 0")
        if not 1.0 < self.min_growth_factor <= self.max_growth_factor:
            _fail(owner, "min_growth_factor", self.min_growth_factor,
                  f"a number in (1, max_growth_factor={self.max_growth_factor}]")
        if self.max_growth_interval < self.min_growth_interval:
            _fail(owner, "max_growth_interval", self.max_growth_interval,
                  f"an integer >= min_growth_interval={self.min_growth_interval}")


@dataclass
class MixedPrecisionConfig:
    """Everything the AMP engine needs to know: precision, loss scaling, accumulation, failure policies.

    `memory_efficient=True` changes three real things: gradients are released with
    `zero_grad(set_to_none=True)` after each optimizer step (no zero-filled gradient buffers live between
    steps), `prepare_model` converts models that contain 2-D convolutions to `channels_last` on CUDA
    (tensor-core friendly, no layout transposes inside cuDNN), and `build_optimizer` creates fused
    Adam/AdamW/SGD on CUDA (one kernel per step instead of one per parameter, and the fused kernel takes
    the scaler's `found_inf` on the device). With False, gradients are zero-filled in place and the model
    and optimizer are left as they are.
    """

    enabled: bool = True
    """Run under autocast; False means plain fp32 behind the same API."""
    dtype: Any = torch.float16
    """Autocast dtype: torch.float16/bfloat16/float32 or "fp16"/"float16"/"bf16"/"bfloat16"/"fp32"/"float32"."""
    init_scale: float = 2.0**16
    """Initial loss scale (and the static scale when use_dynamic_loss_scaling=False)."""
    growth_factor: float = 2.0
    """Factor by which the scale grows after growth_interval clean steps; > 1."""
    backoff_factor: float = 0.5
    """Factor by which the scale shrinks after hysteresis overflowing steps in a row; in (0, 1)."""
    growth_interval: int = 2000
    """Consecutive clean optimizer steps before the scale grows; >= 1."""
    memory_efficient: bool = True
    """Release gradients between steps, channels_last conv nets and fused optimizers on CUDA (see class doc)."""
    use_dynamic_loss_scaling: bool = True
    """Adjust the scale from overflows; False keeps init_scale fixed (overflowing steps are still skipped)."""
    use_grad_scaling: bool = True
    """Scale the loss at all (fp16 only unless bf16_grad_scaling); False means no scaling and no skipping."""
    bf16_grad_scaling: bool = False
    """Ask explicitly for loss scaling under bf16 (bf16 has fp32's range and rarely needs it)."""
    log_scaling: bool = True
    """Keep a history of scale changes (step, old, new, reason) in the summary; read when asked for."""
    track_performance: bool = True
    """Time each step and keep the counters behind get_performance_summary()."""
    save_scaler_state: bool = True
    """Include the scaler in state_dict() so that a resumed run continues the same scale trajectory."""
    hysteresis: int = 1
    """Overflowing steps in a row before the scale backs off; once spent, every further overflow backs off
    until the budget is refilled (see hysteresis_refill); 1 is GradScaler's behaviour."""
    hysteresis_refill: HysteresisRefill = "clean"
    """When a spent hysteresis budget is refilled: "clean" on the next clean step (DeepSpeed's
    consecutive_hysteresis), or "growth" only when the scale grows (Megatron-LM's DynamicGradScaler)."""
    min_scale: float = 1.0
    """Floor of the loss scale; backoff never goes below it."""
    max_scale: float = 2.0**24
    """Ceiling of the loss scale; growth never goes above it."""
    max_grad_norm: float | None = None
    """Clip the global gradient norm (computed on unscaled gradients) to this value; None disables clipping."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; the update equals one batch this many times larger."""
    oom_policy: OOMPolicy = "raise"
    """On out-of-memory: "raise", "skip" the batch, or "split" it into halves and retry."""
    nonfinite_loss_policy: NonFinitePolicy = "skip"
    """On a NaN/inf loss: "raise" with the step, "skip" the optimizer step, or "ignore" (no check)."""
    collapse_policy: CollapsePolicy = "raise"
    """When overflows continue at min_scale: "raise" an error, or "fallback_bf16" where the device has bf16."""
    collapse_patience: int = 10
    """Overflowing steps in a row at min_scale that count as a scale collapse."""
    stall_policy: StallPolicy = "raise"
    """When stall_patience optimizer steps in a row were skipped (a non-finite loss or an overflow, at any
    scale): "raise" TrainingStalledError, or "fallback_bf16" where the device has bf16 (once: a stall or
    collapse after the fallback raises)."""
    stall_patience: int = 50
    """Skipped optimizer steps in a row that count as a stalled run (no progress at all)."""
    fp32_modules: tuple[str, ...] = ()
    """Modules that run in fp32 inside autocast: qualified-name globs ("head.*") or class names ("LayerNorm")."""
    attribution_top_k: int = 10
    """How many of the most frequent overflow offenders the summary lists."""
    adaptation: AdaptationConfig = field(default_factory=AdaptationConfig)
    """Thresholds of the adaptive trainer."""

    def __post_init__(self) -> None:
        owner = "MixedPrecisionConfig"
        self.dtype = parse_dtype(self.dtype)
        if isinstance(self.fp32_modules, str):
            self.fp32_modules = (self.fp32_modules,)
        self.fp32_modules = tuple(self.fp32_modules)
        if isinstance(self.adaptation, dict):
            self.adaptation = AdaptationConfig(**_known(AdaptationConfig, self.adaptation))
        for f in dataclasses.fields(self):
            _check_type(owner, f, getattr(self, f.name))
        if not 0.0 < self.backoff_factor < 1.0:
            _fail(owner, "backoff_factor", self.backoff_factor, "a number in (0, 1)")
        if not self.growth_factor > 1.0:
            _fail(owner, "growth_factor", self.growth_factor, "a number > 1")
        if self.growth_interval < 1:
            _fail(owner, "growth_interval", self.growth_interval, "an integer >= 1")
        if self.hysteresis < 1:
            _fail(owner, "hysteresis", self.hysteresis, "an integer >= 1")
        if not self.min_scale > 0:
            _fail(owner, "min_scale", self.min_scale, "a number > 0")
        for name in ("min_scale", "init_scale", "max_scale"):
            # The scale lives in a float32 tensor: a larger value would be inf there (or fail to convert).
            if getattr(self, name) > FLOAT32_MAX:
                _fail(owner, name, getattr(self, name), f"a number in (0, {FLOAT32_MAX:.8g}] (float32's finite range)")
        if not self.min_scale <= self.init_scale <= self.max_scale:
            _fail(owner, "init_scale", self.init_scale,
                  f"min_scale={self.min_scale} <= init_scale <= max_scale={self.max_scale}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            _fail(owner, "max_grad_norm", self.max_grad_norm, "a number > 0 or None")
        if self.gradient_accumulation_steps < 1:
            _fail(owner, "gradient_accumulation_steps", self.gradient_accumulation_steps, "an integer >= 1")
        if self.collapse_patience < 1:
            _fail(owner, "collapse_patience", self.collapse_patience, "an integer >= 1")
        if self.stall_patience < 1:
            _fail(owner, "stall_patience", self.stall_patience, "an integer >= 1")
        if self.attribution_top_k < 1:
            _fail(owner, "attribution_top_k", self.attribution_top_k, "an integer >= 1")
        _check_choice(owner, "oom_policy", self.oom_policy, ("raise", "skip", "split"))
        _check_choice(owner, "nonfinite_loss_policy", self.nonfinite_loss_policy, ("raise", "skip", "ignore"))
        _check_choice(owner, "collapse_policy", self.collapse_policy, ("raise", "fallback_bf16"))
        _check_choice(owner, "stall_policy", self.stall_policy, ("raise", "fallback_bf16"))
        _check_choice(owner, "hysteresis_refill", self.hysteresis_refill, ("clean", "growth"))
        for pattern in self.fp32_modules:
            if not isinstance(pattern, str) or not pattern:
                _fail(owner, "fp32_modules", self.fp32_modules, "a list of non-empty name patterns or class names")

    # -- derived facts: the rest of the engine asks these instead of re-deriving them --------------
    @property
    def autocast_enabled(self) -> bool:
        return self.enabled and self.dtype != torch.float32

    @property
    def scaling_enabled(self) -> bool:
        """Loss scaling runs for fp16, or for bf16 when asked for explicitly."""
        if not (self.autocast_enabled and self.use_grad_scaling):
            return False
        return self.dtype == torch.float16 or self.bf16_grad_scaling

    # -- plain data -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["dtype"] = dtype_name(self.dtype)
        out["fp32_modules"] = list(self.fp32_modules)
        if out["max_grad_norm"] is None:
            del out["max_grad_norm"]  # TOML has no null; absence means the default (None)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MixedPrecisionConfig":
        return cls(**_known(cls, data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MixedPrecisionConfig":
        return cls.from_dict(json.loads(text))

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_toml(cls, text: str) -> "MixedPrecisionConfig":
        return cls.from_dict(tomllib.loads(text))

    def replace(self, **changes: Any) -> "MixedPrecisionConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _known(cls: type, data: dict[str, Any], label: str | None = None) -> dict[str, Any]:
    """Reject keys the dataclass does not have, naming them and the allowed ones."""
    label = label or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a table/dict of fields, got {data!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        import difflib

        hints = [f"{close[0]!r} for {u!r}" for u in unknown if (close := difflib.get_close_matches(u, names, 1))]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise ConfigError(f"{label}: unknown field(s) {unknown}{hint}; allowed fields are {names}")
    return dict(data)


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """data["a"]["b"]["c"] = value for dotted="a.b.c", creating tables on the way (plain-data configs)."""
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}={value!r} is not allowed: {key!r} is not a table")
    node[keys[-1]] = value
