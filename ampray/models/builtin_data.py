"""What the built-in kinds take as data: their built-in corpus, and the checks of a Parquet dataset in
ampray's own schema against a model's config (from the files' footers, before any worker starts)."""

from __future__ import annotations

from typing import Any

import torch

from ampray.amp.config import ConfigError


def synthetic_corpus(kind: str, options: dict[str, Any], rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The built-in corpus of `rows` samples, shaped for the model that `options` configure."""
    from ampray.data.synthetic import SyntheticConfig, make_dataset
    from ampray.models import build_config

    cfg = build_config(kind, **options)
    shape = {"mlp": lambda: dict(in_features=cfg.in_features, num_classes=cfg.num_classes),
             "cnn": lambda: dict(in_channels=cfg.in_channels, image_size=cfg.image_size,
                                 num_classes=cfg.num_classes),
             "gpt": lambda: dict(vocab_size=cfg.vocab_size, seq_len=cfg.block_size)}[kind]()
    return make_dataset(kind, SyntheticConfig(num_samples=rows, seed=seed, **shape))


def check_builtin_data(kind: str, options: dict[str, Any], info: dict[str, Any], where: str) -> None:
    """A dataset in ampray's schema (`info`: kind, shape, vocab_size, label_range) fits the model."""
    from ampray.models import build_config

    model = build_config(kind, **options)
    found, shape = info["kind"], info["shape"]
    if found is not None and found != kind:
        raise ConfigError(f"{where} holds {found!r} data (its ampray.kind); model.kind={kind!r} needs "
                          f"{kind!r} data (`ampray data synth --kinds {kind}`)")
    if shape is None:
        return
    if kind == "mlp" and shape != [model.in_features]:
        raise ConfigError(f"{where} holds rows of {shape[0] if len(shape) == 1 else shape} features; "
                          f"model.options.in_features={model.in_features} must match them")
    if kind == "cnn" and (len(shape) != 3 or shape[0] != model.in_channels):
        raise ConfigError(f"{where} holds images of shape {shape} (C, H, W); "
                          f"model.options.in_channels={model.in_channels} must equal C")
    if kind == "gpt":
        if shape[0] > model.block_size:
            raise ConfigError(f"{where} holds sequences of {shape[0]} tokens; the model takes at most "
                              f"model.options.block_size={model.block_size}")
        if info["vocab_size"] is not None and info["vocab_size"] > model.vocab_size:
            raise ConfigError(f"{where} holds tokens up to {info['vocab_size'] - 1} (ampray.vocab_size="
                              f"{info['vocab_size']}); model.options.vocab_size={model.vocab_size} is too small")
    if kind in ("mlp", "cnn") and info["label_range"] is not None:
        lo, hi = info["label_range"]
        if lo < 0 or hi >= model.num_classes:
            raise ConfigError(f"{where} holds labels in [{lo}, {hi}]; model.options.num_classes="
                              f"{model.num_classes} needs them in [0, {model.num_classes - 1}]")
