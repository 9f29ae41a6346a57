"""The settings a live run may change, defined once.

A running engine can take new values of the loss scaler's settings (applied through its setter: the
current scale, growth tracker and hysteresis budget are kept) and of the adaptation's thresholds. Everything
else (dtype, init_scale, accumulation, the policies) is fixed for the life of a run. The trainer's `retune`,
the worker (a resumed run whose job file changed), the pre-flight (what a resume may change) and the search
(what PBT may mutate) all ask this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ampray.amp.config import AdaptationConfig

SCALER = ("growth_factor", "backoff_factor", "growth_interval", "hysteresis", "min_scale", "max_scale")
"""MixedPrecisionConfig fields the loss scaler takes while running."""
ADAPTATION = tuple(f.name for f in dataclasses.fields(AdaptationConfig))
"""MixedPrecisionConfig.adaptation fields (the adaptive trainer reads them at each window)."""


def is_live(key: str) -> bool:
    """Whether a precision setting may change in a live run: "growth_factor", "adaptation.window", or the
    same under the job's "precision." prefix."""
    key = key.removeprefix("precision.")
    if key.startswith("adaptation."):
        return key.removeprefix("adaptation.") in ADAPTATION
    return key in SCALER


def described() -> str:
    """The live settings, for error messages."""
    return f"{', '.join(SCALER)} and adaptation.{{{', '.join(ADAPTATION)}}}"


def changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The live settings that differ between two precision sections (plain dicts), in `retune`'s form:
    {scaler setting: value, "adaptation": {threshold: value}}."""
    out: dict[str, Any] = {k: after[k] for k in SCALER if k in after and after.get(k) != before.get(k)}
    adaptation = {k: v for k, v in after.get("adaptation", {}).items()
                  if k in ADAPTATION and before.get("adaptation", {}).get(k) != v}
    if adaptation:
        out["adaptation"] = adaptation
    return out
