"""A search space as plain data, checked before any trial starts, and its Ray Tune form.

A space is two dicts keyed by dotted JobConfig paths ("precision.init_scale", "optimizer.lr"):
`params` maps each searched path to a spec with a single key -- {"loguniform": [lo, hi]},
{"uniform": [lo, hi]}, {"qloguniform": [lo, hi, q]}, {"randint": [lo, hi]}, {"lograndint": [lo, hi]}
(the integer kinds exclude hi, as Ray does) or {"choice": [v1, v2, ...]} -- and `fixed` maps paths to
plain values that every trial gets and nothing searches or mutates (run.adaptive = true).

Layering: tune_spaces sits below orchestrator and never imports it, yet JobConfig's model, data,
optimizer, scaling and run sections belong to the orchestrator. So checking comes in two parts:
- shape, at construction: the section is one of JobConfig's; precision.* paths name a leaf field of
  MixedPrecisionConfig / AdaptationConfig (found by walking the dataclasses); model.options.* is free
  (options is a free dict); other sections take <section>.<field>. Every spec has a known kind, the right
  number of arguments, numbers where numbers belong, low < high, and low > 0 on a log scale.
- values, in `Space.check(validate)`: each bound of each distribution, and each choice, goes together with
  `fixed` through `validate(overrides)`, which raises ConfigError when the engine would refuse it. The
  orchestrator passes `lambda o: JobConfig.load(None, o)`, so the engine's own rules decide, field names of
  every section included. With validate=None, precision.* values are checked through MixedPrecisionConfig
  and the other paths only for shape.
Float kinds are checked with float bounds, so uniform/loguniform over an integer field (growth_interval,
hysteresis, window) fails: integer fields take randint, lograndint or choice. Each bound is checked against
the defaults plus `fixed`; neighbours in a chain of fields that must stay ordered (min_scale <= init_scale
<= max_scale, the adaptation's min/max growth factor and interval) that are both searched are also checked
against each other's ranges, so that no draw and no PBT mutation can break the order.

Ray is imported inside to_tune() and mutations() only: the rest runs (and is tested) without Ray.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from ampray.amp.config import ConfigError, MixedPrecisionConfig, set_dotted

SECTIONS = ("model", "data", "precision", "optimizer", "scaling", "run")
"""JobConfig's sections (the orchestrator owns JobConfig; this layer may not import it)."""
KINDS = ("loguniform", "uniform", "qloguniform", "randint", "lograndint", "choice")
"""Distribution kinds; each is also the name of the ray.tune function that builds it."""
_ARGS = {"loguniform": "[low, high]", "uniform": "[low, high]", "qloguniform": "[low, high, q]",
         "randint": "[low, high)", "lograndint": "[low, high)"}
_INT_KINDS = ("randint", "lograndint")
_LOG_KINDS = ("loguniform", "qloguniform", "lograndint")

ORDERED = (("precision.min_scale", "precision.init_scale", "precision.max_scale"),
           ("precision.adaptation.min_growth_factor", "precision.adaptation.max_growth_factor"),
           ("precision.adaptation.min_growth_interval", "precision.adaptation.max_growth_interval"))
"""Chains of fields the engine requires in non-decreasing order (see MixedPrecisionConfig's checks)."""

Validator = Callable[[dict[str, Any]], None]
"""Takes {dotted path: value} overrides; raises ConfigError if a job built from them is not allowed."""


def _error(source: str, path: Any, spec: Any, problem: str) -> ConfigError:
    return ConfigError(f"search space {source!r}: {path} = {spec!r}: {problem}")


@dataclass
class Space:
    """Distributions over dotted JobConfig paths plus fixed values; its shape is checked at construction."""

    params: dict[str, Any]
    """Dotted path -> distribution spec with one key, e.g. {"loguniform": [256.0, 16777216.0]}."""
    fixed: dict[str, Any] = field(default_factory=dict)
    """Dotted path -> plain value given to every trial; neither searched nor mutated."""
    source: str = field(default="<space>", compare=False)
    """Where the space came from (a preset name or a TOML path); every error names it."""

    def __post_init__(self) -> None:
        if not isinstance(self.params, dict) or not self.params:
            raise ConfigError(f"search space {self.source!r}: [params]={self.params!r} is not allowed: "
                              "expected a non-empty table of <dotted path> = {<kind> = [...]}")
        if not isinstance(self.fixed, dict):
            raise ConfigError(f"search space {self.source!r}: [fixed]={self.fixed!r} is not allowed: "
                              "expected a table of <dotted path> = <value>")
        for path, spec in self.params.items():
            check_path(path, self.source)
            _parse(self.source, path, spec)
        for path in self.fixed:
            check_path(path, self.source)
        both = sorted(set(self.params) & set(self.fixed))
        if both:
            raise ConfigError(f"search space {self.source!r}: {both} appear in both [params] and [fixed]; "
                              "a path is either searched or fixed")

    def check(self, validate: Validator | None = None) -> "Space":
        """Run every bound and every choice (with `fixed`) through `validate`; see the module doc."""
        validate = validate or validate_precision
        try:
            validate(dict(self.fixed))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"search space {self.source!r}: [fixed] {self.fixed!r} is not allowed: {err}") \
                from None
        for path, spec in self.params.items():
            kind, args = _parse(self.source, path, spec)
            for value in _candidates(kind, args):
                try:
                    validate({**self.fixed, path: value})
                except (TypeError, ValueError) as err:
                    hint = ""
                    if kind not in _INT_KINDS and kind != "choice" and "integer" in str(err):
                        hint = f"; {kind} draws floats: use randint, lograndint or choice for an integer field"
                    raise _error(self.source, path, spec, f"value {value!r} is not allowed: {err}{hint}") \
                        from None
        self._check_order()
        return self

    def _check_order(self) -> None:
        """Fields that must stay ordered (min_scale <= init_scale <= max_scale, ...): when two neighbours
        of a chain are both searched, every value of the one's range must stay at or below every value of
        the other's. Then any draw keeps the order, and so does any PBT mutation, which `clip` keeps inside
        each range. A neighbour that is fixed or comes from the job was checked against each bound above."""
        for chain in ORDERED:
            for a, b in zip(chain, chain[1:]):
                if a not in self.params or b not in self.params:
                    continue
                a_hi, b_lo = self._span(a)[1], self._span(b)[0]
                if a_hi > b_lo:
                    raise ConfigError(
                        f"search space {self.source!r}: {a} (up to {a_hi}) and {b} (from {b_lo}) are not allowed "
                        f"together: every draw must keep {' <= '.join(chain)}; make {a}'s range end at or "
                        f"below the start of {b}'s")

    def _span(self, path: str) -> tuple[float, float]:
        """The smallest and largest value a searched path can draw."""
        kind, args = _parse(self.source, path, self.params[path])
        low, high = (min(args), max(args)) if kind == "choice" else _range(kind, args)
        return float(low), float(high)

    def sample(self, rng: random.Random) -> dict[str, Any]:
        """One plain configuration ({dotted path: value}, fixed values included), drawn without Ray."""
        drawn = {path: _sample(*_parse(self.source, path, spec), rng) for path, spec in self.params.items()}
        return {**copy.deepcopy(self.fixed), **drawn}

    def to_tune(self) -> dict[str, Any]:
        """Tuner's param_space: {dotted path: ray.tune distribution}, fixed values as constants."""
        domains = {path: _to_tune(*_parse(self.source, path, spec)) for path, spec in self.params.items()}
        return {**copy.deepcopy(self.fixed), **domains}

    def mutations(self) -> dict[str, Any]:
        """PopulationBasedTraining's hyperparam_mutations: choices as lists (PBT steps to a neighbour),
        the rest as ray.tune distributions. Pair it with `custom_explore_fn=space.clip`."""
        out: dict[str, Any] = {}
        for path, spec in self.params.items():
            kind, args = _parse(self.source, path, spec)
            out[path] = list(args) if kind == "choice" else _to_tune(kind, args)
        return out

    def clip(self, config: dict[str, Any]) -> dict[str, Any]:
        """Bring numeric values back inside their distribution's range (integers rounded, qloguniform
        snapped to q): PBT perturbs by factors such as 1.2 and would otherwise leave the validated range."""
        out = dict(config)
        for path, spec in self.params.items():
            kind, args = _parse(self.source, path, spec)
            if kind != "choice" and isinstance(out.get(path), (int, float)):
                out[path] = _snap(kind, args, out[path])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"params": copy.deepcopy(self.params), "fixed": copy.deepcopy(self.fixed)}

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())


def check_path(path: Any, source: str = "<space>") -> None:
    """Raise ConfigError unless `path` has the shape of a JobConfig path (see the module doc)."""
    parts = path.split(".") if isinstance(path, str) else []
    if len(parts) < 2 or parts[0] not in SECTIONS or not all(parts):
        raise ConfigError(f"search space {source!r}: parameter {path!r} is not allowed: expected "
                          f"<section>.<field> with section in {list(SECTIONS)}")
    section, rest = parts[0], parts[1:]
    if section == "precision":
        _walk(MixedPrecisionConfig, rest, path, source)
    elif section == "model" and rest[0] == "options":
        if len(rest) < 2:
            raise ConfigError(f"search space {source!r}: parameter {path!r} is not allowed: "
                              "expected model.options.<name>")
    elif len(rest) != 1:
        raise ConfigError(f"search space {source!r}: parameter {path!r} is not allowed: "
                          f"expected {section}.<field>")


def _walk(cls: type, rest: list[str], path: str, source: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    name = rest[0]
    if name not in fields:
        raise ConfigError(f"search space {source!r}: parameter {path!r} is not allowed: {name!r} is not a "
                          f"field of {cls.__name__}; allowed fields are {list(fields)}")
    factory = fields[name].default_factory
    if isinstance(factory, type) and dataclasses.is_dataclass(factory):
        if len(rest) == 1:
            raise ConfigError(f"search space {source!r}: parameter {path!r} is not allowed: it is a table; "
                              f"name one of its fields {[f.name for f in dataclasses.fields(factory)]}")
        _walk(factory, rest[1:], path, source)
    elif len(rest) > 1:
        raise ConfigError(f"search space {source!r}: parameter {path!r} is not allowed: "
                          f"{cls.__name__}.{name} is not a table")


def _parse(source: str, path: str, spec: Any) -> tuple[str, list[Any]]:
    """Check one distribution spec's shape and bounds; return (kind, args)."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise _error(source, path, spec, f"expected one distribution such as {{loguniform = [low, high]}} "
                     f"with a kind in {list(KINDS)} (plain values go under [fixed])")
    ((kind, args),) = spec.items()
    if kind not in KINDS:
        raise _error(source, path, spec, f"unknown distribution {kind!r}; allowed kinds are {list(KINDS)}")
    if not isinstance(args, (list, tuple)) or not args:
        raise _error(source, path, spec, f"{kind} takes a non-empty list")
    args = list(args)
    if kind == "choice":
        return kind, args
    if len(args) != (3 if kind == "qloguniform" else 2):
        raise _error(source, path, spec, f"{kind} takes {_ARGS[kind]}, got {args!r}")
    integer = kind in _INT_KINDS
    for a in args:
        ok = isinstance(a, int) if integer else isinstance(a, (int, float)) and math.isfinite(a)
        if isinstance(a, bool) or not ok:
            raise _error(source, path, spec, f"{kind} bounds must be {'integers' if integer else 'finite numbers'}"
                         f", got {a!r}")
    low, high = args[0], args[1]
    if not low < high:
        raise _error(source, path, spec, f"low={low!r} must be < high={high!r}")
    if kind in _LOG_KINDS and not low > 0:
        raise _error(source, path, spec, f"a log scale needs low > 0, got low={low!r}")
    if kind == "qloguniform" and not (args[2] > 0 and math.ceil(low / args[2]) <= math.floor(high / args[2])):
        raise _error(source, path, spec, f"q={args[2]!r} must be > 0 with a multiple of q in [low, high]")
    return kind, args


def _range(kind: str, args: list[Any]) -> tuple[Any, Any]:
    """The inclusive range a distribution draws from (qloguniform: its inner multiples of q, as Ray)."""
    low, high = args[0], args[1]
    if kind in _INT_KINDS:
        return low, high - 1
    if kind == "qloguniform":
        q = args[2]
        return float(math.ceil(low / q) * q), float(math.floor(high / q) * q)
    return float(low), float(high)


def _candidates(kind: str, args: list[Any]) -> list[Any]:
    """The values whose validity stands for the whole distribution: its bounds, or every choice."""
    return list(args) if kind == "choice" else list(dict.fromkeys(_range(kind, args)))


def _sample(kind: str, args: list[Any], rng: random.Random) -> Any:
    if kind == "choice":
        return copy.deepcopy(rng.choice(args))
    low, high = _range(kind, args)
    if kind == "randint":
        return rng.randint(low, high)
    if kind == "uniform":
        return _snap(kind, args, rng.uniform(low, high))
    # Log kinds draw like Ray: exp(uniform(log lo, log hi)); lograndint floors over [lo, hi + 1)
    top = high + 1 if kind == "lograndint" else high
    value = math.exp(rng.uniform(math.log(low), math.log(top)))
    return _snap(kind, args, math.floor(value) if kind == "lograndint" else value)


def _snap(kind: str, args: list[Any], value: float) -> Any:
    """Clamp into the range; exp/log round-off can otherwise land one ulp past a bound the engine checks."""
    low, high = _range(kind, args)
    if kind in _INT_KINDS:
        return min(max(int(round(value)), low), high)
    if kind == "qloguniform":
        value = round(value / args[2]) * args[2]
    return min(max(float(value), low), high)


def _to_tune(kind: str, args: list[Any]) -> Any:
    from ray import tune

    return tune.choice(list(args)) if kind == "choice" else getattr(tune, kind)(*args)


def validate_precision(overrides: dict[str, Any]) -> None:
    """The default validator: build MixedPrecisionConfig from the precision.* overrides; others pass."""
    nested: dict[str, Any] = {}
    for path, value in overrides.items():
        section, _, rest = path.partition(".")
        if section == "precision":
            set_dotted(nested, rest, value)
    MixedPrecisionConfig.from_dict(nested)


def apply(base: Any, sampled: dict[str, Any]) -> Any:
    """Set dotted values onto a base job without changing it. A JobConfig (anything with to_dict() and a
    from_dict() classmethod) gives back a new, validated one of its type; a nested dict (or None) gives
    back a new nested dict for JobConfig.from_dict."""
    has_dict = hasattr(base, "to_dict") and hasattr(type(base), "from_dict")
    data = copy.deepcopy(base.to_dict() if has_dict else dict(base or {}))
    for path, value in sampled.items():
        set_dotted(data, path, copy.deepcopy(value))
    return type(base).from_dict(data) if has_dict else data
