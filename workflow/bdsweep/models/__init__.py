"""Architectures, one module each, registered in ``bdsweep.registry.ARCHITECTURES``.

``create_model(name, num_classes, image_size)`` builds one (as timm does). Every model carries a
``parts`` description (:class:`ModelParts`) naming the layers defenses address, so a defense
asks the model for its classifier or its conv->BN pairs and never checks an architecture's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..registry import ARCHITECTURES


@dataclass(frozen=True)
class ModelParts:
    """Names (as in ``model.named_modules()``) of the layers defenses work on."""

    classifier: str  # the final nn.Linear
    last_conv: str  # the last convolution of the feature extractor
    features: str  # the module whose output, flattened, is the penultimate feature vector


def create_model(name: str, num_classes: int, image_size: int) -> nn.Module:
    model = ARCHITECTURES.get(name)(num_classes=num_classes, image_size=image_size)
    if not isinstance(getattr(model, "parts", None), ModelParts):
        raise TypeError(f"architecture {name!r} does not describe its parts (ModelParts)")
    return model


def conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d, str]]:
    """Pair every BatchNorm2d with the convolution registered most recently before it that has
    as many output channels: the conv whose output that BN normalises in post-activation
    networks, and the same pairing the survey's toolkit uses for pre-activation ResNets."""
    pairs, last_conv = [], None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            last_conv = module
        elif isinstance(module, nn.BatchNorm2d) and last_conv is not None:
            if last_conv.out_channels == module.num_features:
                pairs.append((last_conv, module, name))
    return pairs


ARCHITECTURES.declare_planned({
    "vgg19_bn": "VGG19 with batch norm (torchvision, from scratch)",
    "efficientnet_b3": "EfficientNet-B3 (torchvision, from scratch)",
    "mobilenet_v3_large": "MobileNetV3-Large (torchvision, from scratch)",
})
