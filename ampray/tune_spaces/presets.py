"""Named search spaces over the scaler and adaptation settings, and loading a user space from TOML.

Presets are plain data (no Ray import here): {"params": {dotted path: spec}, "fixed": {dotted path: value}},
the same shape as a user's TOML file:

    [params]
    "precision.init_scale" = { loguniform = [256.0, 16777216.0] }
    "precision.hysteresis" = { choice = [1, 2, 4] }
    [fixed]
    "run.adaptive" = true

`load_space` checks the whole space before any trial starts; see ampray.tune_spaces.space for the rules
and for who validates which paths.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

from ampray.amp.config import ConfigError
from ampray.tune_spaces.space import Space, Validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Scales and intervals span orders of magnitude, so they are searched on a log scale; factors are not.
SCALER: dict[str, Any] = {
    "params": {
        "precision.init_scale": {"loguniform": [2.0**8, 2.0**24]},
        "precision.growth_factor": {"uniform": [1.1, 4.0]},
        "precision.backoff_factor": {"uniform": [0.25, 0.9]},
        "precision.growth_interval": {"lograndint": [50, 5000]},
        "precision.hysteresis": {"choice": [1, 2, 3, 4]},
    },
    "fixed": {},
}
"""The loss scaler's policy: where the scale starts, how fast it grows and backs off."""

ADAPTIVE: dict[str, Any] = {
    "params": {
        "precision.adaptation.window": {"choice": [25, 50, 100, 200, 400]},
        "precision.adaptation.overflow_rate_high": {"loguniform": [0.005, 0.2]},
        "precision.adaptation.clean_steps_to_increase": {"lograndint": [50, 5000]},
        "precision.adaptation.cooldown": {"randint": [0, 500]},
        "precision.adaptation.min_growth_interval": {"lograndint": [10, 1000]},
    },
    # The thresholds only act under AdaptiveMixedPrecisionTrainer.
    "fixed": {"run.adaptive": True},
}
"""The adaptive trainer's thresholds: how it reads overflow rates and how often it retunes."""

PRECISION: dict[str, Any] = {
    "params": {
        "precision.dtype": {"choice": ["fp16", "bf16"]},
        "precision.init_scale": {"loguniform": [2.0**8, 2.0**24]},
        "precision.hysteresis": {"choice": [1, 2, 3, 4]},
    },
    "fixed": {},
}
"""fp16 against bf16, with the scaler settings that matter to fp16 (bf16 runs them unscaled)."""


def _union(*spaces: dict[str, Any]) -> dict[str, Any]:
    """Merge spaces; a path may appear in several only with the same spec or value."""
    out: dict[str, Any] = {"params": {}, "fixed": {}}
    for space in spaces:
        for part in ("params", "fixed"):
            for path, spec in space[part].items():
                if out[part].get(path, spec) != spec:
                    raise ConfigError(f"preset union: {path} is {out[part][path]!r} and {spec!r}")
                out[part][path] = copy.deepcopy(spec)
    return out


FULL: dict[str, Any] = _union(SCALER, ADAPTIVE, PRECISION)
"""Everything above: scaler, adaptation and dtype together."""

PRESETS: dict[str, dict[str, Any]] = {"scaler": SCALER, "adaptive": ADAPTIVE, "precision": PRECISION,
                                      "full": FULL}
"""Named spaces: `ampray tune --space NAME`."""


def load_space(name_or_path: str | Path, validate: Validator | None = None) -> Space:
    """A preset name or a TOML file -> a Space whose every bound and choice has passed `validate`.

    The orchestrator passes `validate=lambda o: JobConfig.load(None, o)`; without it, only precision.*
    values are checked (through MixedPrecisionConfig). Every error is a ConfigError naming the space, the
    parameter, the value and what is allowed.
    """
    text = str(name_or_path)
    if text in PRESETS:
        data, source = copy.deepcopy(PRESETS[text]), text
    else:
        data, source = _read_toml(text), text
    unknown = sorted(set(data) - {"params", "fixed"})
    if unknown:
        raise ConfigError(f"search space {source!r}: unknown table(s) {unknown}; allowed are [params], [fixed]")
    if "params" not in data:
        raise ConfigError(f"search space {source!r}: no [params] table; expected "
                          '[params] "<section>.<field>" = {<kind> = [...]}')
    return Space(params=data["params"], fixed=data.get("fixed", {}), source=source).check(validate)


def _read_toml(text: str) -> dict[str, Any]:
    path = Path(text).expanduser()
    looks_like_path = path.suffix == ".toml" or "/" in text or "\\" in text or path.exists()
    if not looks_like_path:
        raise ConfigError(f"search space {text!r} is not allowed: expected a preset in {list(PRESETS)} "
                          "or the path of a TOML file")
    if not path.is_file():
        raise ConfigError(f"search space {text!r}: no such file (or use a preset in {list(PRESETS)})")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"search space {text!r}: not valid TOML: {err}") from None
