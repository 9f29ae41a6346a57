"""ampray: mixed-precision (AMP) training of PyTorch models, orchestrated on Ray.

The public API of the engine is importable from here; the engine never imports Ray.
"""

from ampray.amp.adaptive import AdaptiveMixedPrecisionTrainer
from ampray.amp.advice import (
    create_mixed_precision_config,
    detect_hardware,
    get_mixed_precision_recommendations,
    optimize_mixed_precision_settings,
    should_use_mixed_precision,
)
from ampray.amp.autocast import mixed_precision_context
from ampray.amp.bench import benchmark_mixed_precision
from ampray.amp.config import AdaptationConfig, ConfigError, MixedPrecisionConfig
from ampray.amp.grad_scaler import GradScaler
from ampray.amp.loop import train_with_mixed_precision
from ampray.amp.records import BenchResult, MemoryStats, ScalerState, StepStats
from ampray.amp.scaler import LossScaler
from ampray.amp.trainer import (EngineStateError, MixedPrecisionTrainer, NonFiniteLossError, ScaleCollapseError,
                                TrainingStalledError)

_INTERFACE = ("benchmark_mixed_precision_interface", "train_model_with_mixed_precision_interface")
_API = ("fit", "search", "FitResult")


def __getattr__(name: str):
    """The orchestrator's functions (the Python API, the interactive face) are imported on first use, so
    that `import ampray` stays the engine alone (no orchestrator, no Ray)."""
    if name in _INTERFACE:
        from ampray.orchestrator import interface

        return getattr(interface, name)
    if name in _API:
        from ampray.orchestrator import api

        return getattr(api, name)
    raise AttributeError(f"module 'ampray' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "AdaptationConfig",
    "AdaptiveMixedPrecisionTrainer",
    "BenchResult",
    "ConfigError",
    "EngineStateError",
    "FitResult",
    "GradScaler",
    "LossScaler",
    "MemoryStats",
    "MixedPrecisionConfig",
    "MixedPrecisionTrainer",
    "NonFiniteLossError",
    "ScaleCollapseError",
    "ScalerState",
    "StepStats",
    "TrainingStalledError",
    "benchmark_mixed_precision",
    "benchmark_mixed_precision_interface",
    "create_mixed_precision_config",
    "detect_hardware",
    "fit",
    "get_mixed_precision_recommendations",
    "mixed_precision_context",
    "optimize_mixed_precision_settings",
    "search",
    "should_use_mixed_precision",
    "train_model_with_mixed_precision_interface",
    "train_with_mixed_precision",
]
