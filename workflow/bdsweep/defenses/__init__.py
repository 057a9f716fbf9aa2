"""Defenses, one module each, registered in ``bdsweep.registry.DEFENSES``.

The defense API is deliberately narrow. A defense is a function

    defend(model, data: MitigationData, params, device) -> nn.Module | Defended

It receives a freshly built model carrying only weights (no metadata), the mitigation data
(SPC clean images per class of the training set and their labels, with normalisation, image size
and class count, and the extra image per class a validation split may use), its own
hyperparameters and a device. Nothing it is given leads to test data,
poisoned data, the trigger or the target label: the defend stage builds these arguments before it
loads any of those, and loads them only after the defense returns (see ``bdsweep.runs``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..engine import Normalisation
from ..passes import PassCount
from ..registry import DEFENSES, smoke_settings

FAMILIES = ("none", "pruning", "fine-tuning")


@dataclass(frozen=True)
class MitigationData:
    """SPC clean training images per class, as the defend stage hands them to a defense.

    Within each class the images are in the order they were drawn (a seeded random order; see
    ``bdsweep.partition``): a validation split holds out the first ones, as FORK does
    (``support.split_held_out``). ``spare`` is FORK's extra draw, one more image per class drawn
    after the SPC ones; only such a split uses it (where 10 % of SPC is under one image, FORK
    draws SPC + 1 per class). A defense that does not split trains on ``images`` alone, exactly
    FORK's SPC images."""

    images: torch.Tensor  # uint8 NHWC, on the defense's device
    labels: torch.Tensor  # int64
    normalisation: Normalisation
    image_size: int
    num_classes: int
    spare: MitigationData | None = None

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise TypeError("MitigationData.images must be a uint8 NHWC tensor")
        if len(self.images) != len(self.labels):
            raise ValueError("MitigationData images and labels differ in length")
        if self.spare is not None and (self.spare.spare is not None
                                       or self.spare.images.shape[1:] != self.images.shape[1:]):
            raise ValueError("MitigationData.spare must hold images like the SPC images, without a spare of its own")

    def __len__(self) -> int:
        return len(self.labels)


def run_seed() -> int:
    """A seed for a defense's own randomness. The defend stage seeds torch per run (from the
    model, defense and partition), so this differs between runs and repeats within one."""
    return int(torch.randint(0, 2**62, ()).item())


@dataclass(frozen=True)
class Defended:
    """What a defense may return instead of a bare model, to report what it did."""

    model: nn.Module
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Defense:
    """Everything bdsweep knows about a defense, declared where it is implemented."""

    name: str
    run: Callable[[nn.Module, MitigationData, object, torch.device], nn.Module | Defended]
    params: type
    family: str  # "none", "pruning" or "fine-tuning" (the survey's grouping; a column of the results)
    needs_data: bool = True  # False: one run per model, without mitigation data (CLP, none)
    passes: PassCount | None = None  # work of one run, for `bdsweep cost` (bdsweep.passes)
    featured: bool = False  # one of the defenses the survey's section VI discusses (figures' selection)
    # For tests only: hyperparameter overrides that make a run take well under a second on a tiny model
    # (one epoch, a few steps, small batches). The contract suite (tests/test_contract.py) runs every
    # defense with them on every architecture; never used for results.
    smoke: dict = field(default_factory=dict, hash=False)


def defense(name: str, description: str, params: type, family: str, needs_data: bool = True,
            passes: PassCount | None = None, featured: bool = False, smoke: dict | None = None):
    """Register ``run(model, data, params, device)`` as the defense ``name``, with the facts planning
    and the figures use: its ``passes`` per run and whether the survey ``featured`` it; and, for
    the tests, its ``smoke`` settings (see :class:`Defense`)."""
    if family not in FAMILIES:
        raise ValueError(f"defense {name!r}: family must be one of {FAMILIES}")
    smoke = smoke_settings("defense", name, params, smoke)

    def decorate(run):
        DEFENSES.register(name, description)(
            Defense(name, run, params, family, needs_data, passes, featured, smoke))
        return run

    return decorate
