"""EfficientNet-B3 (torchvision): stochastic depth and dropout as torchvision sets them. Stages
end where the resolution halves next (features.1, .2, .3, .5) and at the final 1x1 convolution
block (features.8, whose conv features.8.0 is the last convolution)."""

from . import ModelParts, register_torchvision

# Forward GFLOPs per image (torch.utils.flop_counter, 10 classes): bdsweep cost's fallback throughput.
register_torchvision("efficientnet_b3", "EfficientNet-B3 (torchvision, from scratch)", ModelParts(
    classifier="classifier.1",
    last_conv="features.8.0",
    stages=("features.1", "features.2", "features.3", "features.5", "features.8"),
    polarizer="features.8.0",
), forward_gflops={32: 0.0429, 64: 0.1604})
