"""The built-in synthetic corpus: deterministic from a seed, with structure a model can learn.

- mlp: features from a Gaussian; labels from a fixed random teacher (a 2-layer tanh net), so the
  Bayes error is zero and the loss can fall far below the uniform baseline log(num_classes).
- cnn: images whose class sets the orientation and frequency of a sinusoidal grating, plus noise.
- gpt: tokens from a sparse Markov chain: every token has `branching` likely successors, so the
  achievable loss is about log(branching), well below the uniform log(vocab_size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class SyntheticConfig:
    """Size and shape of the synthetic corpus."""

    num_samples: int = 4096
    """Samples (sequences for gpt)."""
    seed: int = 0
    """Everything is generated from this seed: the same seed gives the same bytes."""
    in_features: int = 784
    """mlp: feature width."""
    num_classes: int = 10
    """mlp/cnn: number of classes."""
    image_size: int = 32
    """cnn: height and width."""
    in_channels: int = 3
    """cnn: channels."""
    vocab_size: int = 256
    """gpt: vocabulary."""
    seq_len: int = 64
    """gpt: tokens per sequence (targets are the next tokens)."""
    branching: int = 4
    """gpt: likely successors per token."""


def _classification(cfg: SyntheticConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(cfg.num_samples, cfg.in_features, generator=g)
    w1 = torch.randn(cfg.in_features, 64, generator=g) / math.sqrt(cfg.in_features)
    w2 = torch.randn(64, cfg.num_classes, generator=g)
    return x, torch.tanh(x @ w1).matmul(w2).argmax(dim=1)


def _images(cfg: SyntheticConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(cfg.num_classes, (cfg.num_samples,), generator=g)
    coords = torch.linspace(-1, 1, cfg.image_size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    angle = y.float() * math.pi / cfg.num_classes
    freq = 2.0 + (y % 3).float() * 2.0
    proj = xx[None] * torch.cos(angle)[:, None, None] + yy[None] * torch.sin(angle)[:, None, None]
    grating = torch.sin(math.pi * freq[:, None, None] * proj)
    x = grating[:, None].expand(-1, cfg.in_channels, -1, -1).clone()
    x += 0.5 * torch.randn(x.shape, generator=g)
    return x, y


def _tokens(cfg: SyntheticConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    successors = torch.randint(cfg.vocab_size, (cfg.vocab_size, cfg.branching), generator=g)
    seq = torch.empty(cfg.num_samples, cfg.seq_len + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(cfg.vocab_size, (cfg.num_samples,), generator=g)
    choice = torch.randint(cfg.branching, (cfg.num_samples, cfg.seq_len), generator=g)
    for t in range(cfg.seq_len):
        seq[:, t + 1] = successors[seq[:, t], choice[:, t]]
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def make_dataset(kind: str, cfg: SyntheticConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of the synthetic corpus for model `kind`."""
    cfg = cfg or SyntheticConfig()
    g = torch.Generator().manual_seed(cfg.seed)
    makers = {"mlp": _classification, "cnn": _images, "gpt": _tokens}
    if kind not in makers:
        raise ValueError(f"make_dataset: kind={kind!r} is not allowed; expected one of {sorted(makers)}")
    return makers[kind](cfg, g)


def uniform_loss(kind: str, cfg: SyntheticConfig | None = None) -> float:
    """Cross-entropy of a model that guesses uniformly: the baseline the loss must fall well below."""
    cfg = cfg or SyntheticConfig()
    return math.log(cfg.vocab_size if kind == "gpt" else cfg.num_classes)
