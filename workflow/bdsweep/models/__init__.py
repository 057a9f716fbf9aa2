"""Architectures, one module per family, registered in ``bdsweep.registry.ARCHITECTURES``.

``create_model(name, num_classes, image_size)`` builds one (as timm does). Every model carries a
``parts`` description (:class:`ModelParts`) naming the layers defenses address, so a defense asks
the model for its classifier, last convolution or stages and never checks an architecture's name.
The helpers below answer the rest from the module tree alone: the BN layers (:func:`batch_norms`,
:func:`conv_bn_pairs`) and the penultimate features (:func:`penultimate_features`, the input of
the classifier).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..registry import ARCHITECTURES


@dataclass(frozen=True)
class ModelParts:
    """Names (as in ``model.named_modules()``) of the layers defenses work on.

    - ``classifier``: the final ``nn.Linear``; its input is the penultimate feature vector.
    - ``last_conv``: the feature extractor's last convolution.
    - ``stages``: the modules whose outputs end each stage of the feature extractor (one per
      resolution, shallow to deep); the last one is the last conv block.
    - ``polarizer``: the convolution after which NPD inserts its polarizer (the survey's choice
      per architecture, "near the end of the feature extractor").
    """

    classifier: str
    last_conv: str
    stages: tuple[str, ...]
    polarizer: str


def create_model(name: str, num_classes: int, image_size: int) -> nn.Module:
    model = ARCHITECTURES.get(name)(num_classes=num_classes, image_size=image_size)
    if not isinstance(getattr(model, "parts", None), ModelParts):
        raise TypeError(f"architecture {name!r} does not describe its parts (ModelParts)")
    return model


def register_torchvision(name: str, description: str, parts: ModelParts, **facts) -> None:
    """Register torchvision architecture ``torchvision.models.<name>`` as is: ``num_classes``
    set, random initialisation (from scratch). Their adaptive pooling makes them run at any image
    size the stem's strides allow. torchvision is imported when a model is built, not when the
    workflow plans."""

    def build(num_classes: int, image_size: int) -> nn.Module:
        from torchvision import models

        model = getattr(models, name)(weights=None, num_classes=num_classes)
        model.parts = parts
        return model

    ARCHITECTURES.register(name, description, **facts)(build)


def batch_norms(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """Every BatchNorm2d with its name, in registration order (ANP and RNP mask these)."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)]


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


def insert_after(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` right after the layer ``name`` for good: the layer becomes
    ``Sequential(layer, module)`` in its parent (its parameters are then named ``name.0.*``).
    Defenses use it for masks, bounds and polarizers that the returned model must keep."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, child, nn.Sequential(model.get_submodule(name), module))
    return module


def penultimate_features(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features, logits) of normalised NCHW ``images``, in one forward pass."""
    captured = []
    classifier = model.get_submodule(model.parts.classifier)
    handle = classifier.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0]))
    try:
        logits = model(images)
    finally:
        handle.remove()
    return captured[0], logits
