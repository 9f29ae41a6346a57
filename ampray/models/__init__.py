"""The built-in model zoo: an MLP, CNNs (small, ResNet-18/50) and a GPT-2-style decoder.

Pure PyTorch. `build_model(kind, **kwargs)` is the one entry point the trainer needs; the
kwargs are plain data (a job config's `[model]` table), so a Tune space can replace any of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ampray.models.cnn import CNN, CNNConfig
from ampray.models.gpt import GPT, GPT_PRESETS, GPTConfig, lm_loss
from ampray.models.mlp import MLP, MLPConfig

__all__ = [
    "CNN", "CNNConfig", "GPT", "GPTConfig", "GPT_PRESETS", "MLP", "MLPConfig", "MODEL_KINDS",
    "build_config", "build_criterion", "build_model", "example_batch", "lm_loss",
]

ModelConfig = MLPConfig | CNNConfig | GPTConfig

MODEL_KINDS = ("mlp", "cnn", "gpt")

_CONFIGS: dict[str, type] = {"mlp": MLPConfig, "cnn": CNNConfig, "gpt": GPTConfig}
_MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": CNN, "gpt": GPT}


def _check_kind(kind: str) -> None:
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind={kind!r} is not a model kind; allowed: {', '.join(MODEL_KINDS)}")


def build_config(kind: str, **kwargs: Any) -> ModelConfig:
    """The config dataclass for `kind` from plain keyword values; gpt also takes `preset=`."""
    _check_kind(kind)
    config_cls = _CONFIGS[kind]
    allowed = [f.name for f in fields(config_cls)] + (["preset"] if kind == "gpt" else [])
    for key in kwargs:
        if key not in allowed:
            raise ValueError(
                f"build_model(kind={kind!r}): unknown argument {key!r}; "
                f"allowed: {', '.join(allowed)}"
            )
    if kind == "gpt" and "preset" in kwargs:
        preset = kwargs.pop("preset")
        return GPTConfig.preset(preset, **kwargs)
    return config_cls(**kwargs)


def build_model(kind: str, **kwargs: Any) -> nn.Module:
    """A freshly initialised model of `kind` ("mlp", "cnn" or "gpt"); kwargs go to its config."""
    config = build_config(kind, **kwargs)
    return _MODELS[kind](config)


def build_criterion(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss `criterion(output, target)` for `kind`: cross-entropy, next-token for gpt."""
    _check_kind(kind)
    return lm_loss if kind == "gpt" else F.cross_entropy


def example_batch(
    kind: str,
    model_config: ModelConfig | Mapping[str, Any],
    batch_size: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random (input, target) pair shaped for the model; model_config: a config or its kwargs."""
    config = _resolve_config(kind, model_config)
    if isinstance(config, MLPConfig):
        x = torch.randn(batch_size, config.in_features, generator=generator)
        return x, torch.randint(config.num_classes, (batch_size,), generator=generator)
    if isinstance(config, CNNConfig):
        shape = (batch_size, config.in_channels, config.image_size, config.image_size)
        x = torch.randn(shape, generator=generator)
        return x, torch.randint(config.num_classes, (batch_size,), generator=generator)
    # One extra token so that inputs and targets are the same sequence shifted by one.
    tokens = torch.randint(
        config.vocab_size, (batch_size, config.block_size + 1), generator=generator
    )
    return tokens[:, :-1], tokens[:, 1:]


def _resolve_config(kind: str, model_config: ModelConfig | Mapping[str, Any]) -> ModelConfig:
    if isinstance(model_config, Mapping):
        return build_config(kind, **model_config)
    _check_kind(kind)
    if not isinstance(model_config, _CONFIGS[kind]):
        raise ValueError(
            f"model_config={type(model_config).__name__}: expected a {_CONFIGS[kind].__name__} "
            f"or a dict of its fields for kind={kind!r}"
        )
    return model_config
