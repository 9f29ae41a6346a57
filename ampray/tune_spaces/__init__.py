"""Search spaces over the engine's scaler and adaptation settings, as plain data.

Nothing here imports Ray at import time, and nothing imports ampray.orchestrator (the layer above):
the orchestrator passes a validator that builds a JobConfig (see ampray.tune_spaces.space).
"""

from ampray.tune_spaces.presets import ADAPTIVE, FULL, PRECISION, PRESETS, SCALER, load_space
from ampray.tune_spaces.space import KINDS, SECTIONS, Space, Validator, apply, check_path, validate_precision

__all__ = [
    "ADAPTIVE",
    "FULL",
    "KINDS",
    "PRECISION",
    "PRESETS",
    "SCALER",
    "SECTIONS",
    "Space",
    "Validator",
    "apply",
    "check_path",
    "load_space",
    "validate_precision",
]
