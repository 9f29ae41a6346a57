"""A user's own model: a small convolutional net for 8x8 handwritten digits, and its loss.

Nothing here knows about ampray: `build` returns a plain nn.Module, `loss` is a plain criterion. The job
file names them by import path (`digits_net:build`, `digits_net:loss`); ampray ships this file to every
Ray worker.
"""

import torch
import torch.nn.functional as F
from torch import nn


class DigitsNet(nn.Module):
    def __init__(self, channels: int = 32, dropout: float = 0.1, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels * 16, classes))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # The Parquet column holds each image as 64 values in [0, 16]: shape and scale them here.
        return self.head(self.features(pixels.view(-1, 1, 8, 8) / 16.0))


def build(channels: int = 32, dropout: float = 0.1) -> nn.Module:
    return DigitsNet(channels, dropout)


def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target, label_smoothing=0.1)
