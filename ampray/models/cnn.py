"""Convolutional classifiers: ResNet-18/50 from scratch, and a small net that trains fast on CPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

CNNArch = Literal["small", "resnet18", "resnet50"]

# Residual blocks per stage (He et al. 2016, table 1).
_RESNET_LAYOUT = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}
_DEFAULT_WIDTH = {"small": 32, "resnet18": 64, "resnet50": 64}


@dataclass
class CNNConfig:
    """Shape of a convolutional image classifier."""

    arch: CNNArch = "small"
    """Architecture: a 3-conv net for 32x32 images, or a standard ResNet."""
    in_channels: int = 3
    """Channels of the input images."""
    num_classes: int = 10
    """Number of output logits."""
    width: int | None = None
    """Channels of the first stage, doubled per later stage; None: 32 (small) or 64 (ResNets)."""
    image_size: int = 32
    """Side of the square input images, for flop estimates and example batches."""

    def __post_init__(self) -> None:
        if self.arch not in get_args(CNNArch):
            raise ValueError(f"CNNConfig.arch={self.arch!r}: expected one of {get_args(CNNArch)}")
        # Resolved here so that a saved config records the width that was actually built.
        if self.width is None:
            self.width = _DEFAULT_WIDTH[self.arch]
        for name in ("in_channels", "num_classes", "width", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"CNNConfig.{name}={value!r}: expected an int >= 1")


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    # No conv bias: the BatchNorm right after it has its own shift, so a bias would be redundant.
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)
    return [conv, nn.BatchNorm2d(out_ch)]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut: the ResNet-18 block."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            *_conv_bn(in_ch, width, 3, stride), nn.ReLU(inplace=True), *_conv_bn(width, width, 3)
        )
        self.shortcut = _shortcut(in_ch, width * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.branch(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a shortcut: the ResNet-50 block."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        # Striding in the 3x3 rather than the first 1x1 (ResNet v1.5) drops no input pixels.
        self.branch = nn.Sequential(
            *_conv_bn(in_ch, width, 1), nn.ReLU(inplace=True),
            *_conv_bn(width, width, 3, stride), nn.ReLU(inplace=True),
            *_conv_bn(width, width * self.expansion, 1),
        )
        self.shortcut = _shortcut(in_ch, width * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.branch(x) + self.shortcut(x))


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    # A strided 1x1 projection matches the branch's shape when a stage changes width or resolution.
    return nn.Sequential(*_conv_bn(in_ch, out_ch, 1, stride))


def _resnet_features(config: CNNConfig) -> tuple[nn.Sequential, int]:
    block = BasicBlock if config.arch == "resnet18" else Bottleneck
    layers: list[nn.Module] = [
        nn.Conv2d(config.in_channels, config.width, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(config.width), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    ]
    in_ch = config.width
    for stage, num_blocks in enumerate(_RESNET_LAYOUT[config.arch]):
        width = config.width * 2**stage
        for i in range(num_blocks):
            # The first stage follows the max-pool, so only later stages halve the resolution.
            stride = 2 if i == 0 and stage > 0 else 1
            layers.append(block(in_ch, width, stride))
            in_ch = width * block.expansion
    return nn.Sequential(*layers), in_ch


def _small_features(config: CNNConfig) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    in_ch = config.in_channels
    for stage in range(3):
        out_ch = config.width * 2**stage
        layers += [*_conv_bn(in_ch, out_ch, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        in_ch = out_ch
    return nn.Sequential(*layers), in_ch


class CNN(nn.Module):
    """Convolutional features, global average pooling, and a linear classifier."""

    def __init__(self, config: CNNConfig) -> None:
        super().__init__()
        self.config = config
        build = _small_features if config.arch == "small" else _resnet_features
        self.features, feature_dim = build(config)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(feature_dim, config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He init keeps activation variance steady through ReLUs (fan_out, as torchvision).
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (BasicBlock, Bottleneck)):
                # Each residual branch starts at zero, so the net begins as a shallower, easier one
                # (Goyal et al. 2017); this steadies early training, in low precision too.
                nn.init.zeros_(m.branch[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))

    def flops_per_sample(self, image_size: int | None = None) -> int:
        """Training flops per sample: conv and linear MACs x2 (flops) x3 (forward + backward)."""
        size = image_size or self.config.image_size
        # A meta-device twin gives the output shapes without computing anything, and leaves this
        # model's BatchNorm running statistics untouched.
        with torch.device("meta"):
            twin = CNN(self.config)
            macs = [0]
            hooks = [m.register_forward_hook(_make_mac_counter(macs)) for m in twin.modules()]
            twin(torch.empty(1, self.config.in_channels, size, size))
        for hook in hooks:
            hook.remove()
        # BatchNorm, activations, pooling and residual adds are left out: they are a few percent.
        return 2 * 3 * macs[0]


def _make_mac_counter(total: list[int]):
    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total[0] += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total[0] += output.numel() * module.in_features

    return count
