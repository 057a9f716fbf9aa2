"""MobileNetV3-Large (torchvision). Its head has two linear layers (960 -> 1280 -> classes); the
penultimate features are the 1280-wide input of the last. Stages end where the resolution halves
next (features.1, .3, .6, .12) and at the final 1x1 convolution block (features.16)."""

from . import ModelParts, register_torchvision

# Forward GFLOPs per image (torch.utils.flop_counter, 10 classes): bdsweep cost's fallback throughput.
register_torchvision("mobilenet_v3_large", "MobileNetV3-Large (torchvision, from scratch)",
                     ModelParts(
                         classifier="classifier.3",
                         last_conv="features.16.0",
                         stages=("features.1", "features.3", "features.6", "features.12", "features.16"),
                         polarizer="features.16.0",
                     ), forward_gflops={32: 0.0142, 64: 0.0402})
