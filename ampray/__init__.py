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
from ampray.amp.loop import train_with_mixed_precision
from ampray.amp.records import BenchResult, MemoryStats, ScalerState, StepStats
from ampray.amp.scaler import LossScaler
from ampray.amp.trainer import MixedPrecisionTrainer, NonFiniteLossError, ScaleCollapseError

__version__ = "0.1.0"

__all__ = [
    "AdaptationConfig",
    "AdaptiveMixedPrecisionTrainer",
    "BenchResult",
    "ConfigError",
    "LossScaler",
    "MemoryStats",
    "MixedPrecisionConfig",
    "MixedPrecisionTrainer",
    "NonFiniteLossError",
    "ScaleCollapseError",
    "ScalerState",
    "StepStats",
    "benchmark_mixed_precision",
    "create_mixed_precision_config",
    "detect_hardware",
    "get_mixed_precision_recommendations",
    "mixed_precision_context",
    "optimize_mixed_precision_settings",
    "should_use_mixed_precision",
    "train_with_mixed_precision",
]
