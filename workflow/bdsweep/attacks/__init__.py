"""Attacks, one module each, registered in ``bdsweep.registry.ATTACKS``.

A data-poisoning attack has two functions. ``make_resource(image_size, params)`` builds what the
trigger needs once per dataset (BadNets: the patch and its mask) and is the attack-resources
stage; ``apply_trigger(images, resource, params)`` stamps a whole uint8 NHWC array at once. The
poison stage (``bdsweep.poison``) chooses which training images receive the trigger and builds the
backdoor test set, identically for every such attack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..registry import ATTACKS

Resource = dict[str, np.ndarray]


@dataclass(frozen=True)
class DataPoisoningAttack:
    params: type  # frozen dataclass of defaults
    make_resource: Callable[[int, object], Resource]  # (image size, params) -> arrays
    apply_trigger: Callable[[np.ndarray, Resource, object], np.ndarray]  # uint8 NHWC -> uint8 NHWC
    clean_label: bool = False  # poisons only target-class images and keeps their labels


def data_poisoning(name: str, description: str, params: type, make_resource, clean_label: bool = False):
    """Register ``apply_trigger(images, resource, params)`` as the attack ``name``."""

    def decorate(apply_trigger):
        ATTACKS.register(name, description)(DataPoisoningAttack(params, make_resource, apply_trigger, clean_label))
        return apply_trigger

    return decorate


ATTACKS.declare_planned({
    "blended": "Blended: x' = 0.8 x + 0.2 image",
    "sig": "SIG: clean-label sinusoidal signal",
    "lf": "LF: low-frequency universal perturbation",
    "ssba": "SSBA: sample-specific invisible trigger from an encoder",
    "iab": "IAB: input-aware dynamic trigger generator",
    "wanet": "WaNet: warping-based trigger",
    "bpp": "BPP: colour-quantisation trigger",
})
