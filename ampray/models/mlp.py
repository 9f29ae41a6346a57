"""A multilayer perceptron: the smallest model in the zoo, for quick tests and tabular data."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MLPConfig:
    """Shape of an MLP classifier."""

    in_features: int = 784
    """Input features per sample; inputs of any shape are flattened to this many."""
    hidden: int = 256
    """Width of every hidden layer."""
    depth: int = 2
    """Number of hidden layers; 0 gives a linear (logistic regression) model."""
    num_classes: int = 10
    """Number of output logits."""
    dropout: float = 0.0
    """Dropout probability after each hidden activation."""

    def __post_init__(self) -> None:
        for name in ("in_features", "hidden", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MLPConfig.{name}={value!r}: expected an int >= 1")
        if not isinstance(self.depth, int) or self.depth < 0:
            raise ValueError(f"MLPConfig.depth={self.depth!r}: expected an int >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MLPConfig.dropout={self.dropout!r}: expected 0 <= dropout < 1")


class MLP(nn.Module):
    """Linear -> ReLU -> Dropout, `depth` times, then a linear classifier head."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = config.in_features
        for _ in range(config.depth):
            layers += [nn.Linear(width, config.hidden), nn.ReLU(), nn.Dropout(config.dropout)]
            width = config.hidden
        layers.append(nn.Linear(width, config.num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Image batches arrive as (B, C, H, W); flattening lets the same MLP take them unchanged.
        return self.layers(x.flatten(1))

    def flops_per_sample(self) -> int:
        """Training flops per sample: forward matmuls (2 * in * out per linear) x3 for backward."""
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        forward = sum(2 * m.in_features * m.out_features for m in linears)
        # Backward costs about twice the forward (gradients for both inputs and weights).
        return 3 * forward
