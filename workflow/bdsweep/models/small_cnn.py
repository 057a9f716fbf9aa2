"""A four-convolution network for the CPU demo and the tests: conv-BN-ReLU blocks (post-activation,
so every BN normalises the conv just before it), two max-pools, adaptive pooling, one linear."""

from __future__ import annotations

import torch
from torch import nn

from ..registry import ARCHITECTURES
from . import ModelParts


def _block(in_channels: int, channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    parts = ModelParts(classifier="classifier", last_conv="features.11",
                       stages=("features.5", "features.9", "features.13"), polarizer="features.11")

    def __init__(self, num_classes: int, image_size: int = 32, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            *_block(3, width), *_block(width, width), nn.MaxPool2d(2),
            *_block(width, 2 * width), nn.MaxPool2d(2), *_block(2 * width, 2 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# Forward GFLOPs per image (torch.utils.flop_counter, 10 classes): bdsweep cost's fallback throughput.
ARCHITECTURES.register("small_cnn", "four-conv CNN for the CPU demo and tests",
                       forward_gflops={32: 0.0348, 64: 0.1392})(SmallCNN)
